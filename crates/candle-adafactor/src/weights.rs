//! Keras `variables`, `set_weights` and `add_variable`: the optimizer's own state as a named
//! list in a stable order, the order of the core's state manifest
//! ([`adafactor::manifest::variables`]): `iteration` (raw call count, i64 scalar),
//! `learning_rate` (f32 scalar, only for a constant learning rate), then per variable in build
//! order `{name}/average` (with `use_ema`), then `{name}/accumulator` (with gradient
//! accumulation), then per variable `{name}/r` and `{name}/c` (rank >= 2) or `{name}/v` (rank 0
//! and 1), then variables made by `add_variable`. This is Keras's order without the full-size
//! velocity and the int32 dummies Keras keeps.

use crate::optimizer::{core_err, err, Adafactor, MAX_ITERATION};
use adafactor::manifest::{self, Entry, Named, Part};
use adafactor::{AdafactorConfig, LearningRate};
use candle_core::{DType, Device, Result, Shape, Tensor, Var};

impl Adafactor {
    /// The variables' names and shapes, in build order (the manifest's input).
    pub(crate) fn var_list(&self) -> Vec<Named> {
        self.slots
            .iter()
            .map(|s| (s.name.clone(), s.var.dims().to_vec()))
            .collect()
    }

    /// The `add_variable` variables' names and shapes.
    pub(crate) fn extra_list(&self) -> Vec<Named> {
        self.extra
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect()
    }

    /// The current value of one manifest entry, as a new tensor (state tensors on their
    /// device, statistics and counters on the CPU).
    pub(crate) fn entry_tensor(&self, e: &Entry) -> Result<Tensor> {
        let cpu = Device::Cpu;
        let missing = |what: &str| err(format!("internal: {what} of `{}` missing", e.name));
        let stat = |i: usize, k: usize| -> Result<&[f32]> {
            let s = &self.slots[i];
            let slots = s.stats.slots(s.var.dims());
            slots
                .get(k)
                .map(|x| x.2)
                .ok_or_else(|| missing("statistic"))
        };
        let raw = self.counters.raw_iterations;
        Ok(match e.part {
            Part::Iteration => Tensor::new(raw as i64, &cpu)?,
            Part::SkippedSteps => Tensor::new(self.counters.skipped_steps as i64, &cpu)?,
            Part::LearningRate => Tensor::new(self.config.learning_rate.value(raw), &cpu)?,
            Part::Average(i) => self.slots[i]
                .ema()
                .ok_or_else(|| missing("EMA average"))?
                .copy()?,
            Part::Accumulator(i) => self.slots[i]
                .accumulator()
                .ok_or_else(|| missing("gradient accumulator"))?
                .copy()?,
            Part::Stat(i, k) => Tensor::from_slice(stat(i, k)?, e.shape.as_slice(), &cpu)?,
            Part::Dummy => Tensor::new(0i32, &cpu)?,
            Part::Velocity(i) => {
                // The velocity's shape: the variable's, or `[batch..., row, col]`.
                let dims = e.shape.as_slice();
                let values = if dims.len() >= 2 {
                    let (n, m) = (dims[dims.len() - 2], dims[dims.len() - 1]);
                    manifest::velocity(stat(i, 0)?, stat(i, 1)?, n, m)
                } else {
                    stat(i, 0)?.to_vec()
                };
                Tensor::from_vec(values, e.shape.as_slice(), &cpu)?
            }
            Part::Extra(i) => self.extra[i].1.as_tensor().copy()?,
        })
    }

    /// Keras `variables`: every piece of optimizer state, named, as copies (changing them does
    /// not change the optimizer; use [`Adafactor::set_weights`]).
    ///
    /// # Errors
    /// A tensor copy fails.
    pub fn variables(&self) -> Result<Vec<(String, Tensor)>> {
        manifest::variables(&self.config, &self.var_list(), &self.extra_list())
            .into_iter()
            .map(|e| Ok((e.name.clone(), self.entry_tensor(&e)?)))
            .collect()
    }

    /// Keras `set_weights(weights)`: sets the optimizer state from tensors in
    /// [`Adafactor::variables`] order. Everything is checked (count, shapes, dtypes converted to
    /// the slot's) before anything is written.
    ///
    /// # Errors
    /// Not built (Keras's message); a different number of weights; a weight whose shape differs
    /// from its slot's (Keras's message); an `iteration` that is not a whole number in
    /// `[0, i64::MAX]`; an invalid learning rate.
    pub fn set_weights(&mut self, weights: &[Tensor]) -> Result<()> {
        self.require_built_for_set_weights()?;
        let list = manifest::variables(&self.config, &self.var_list(), &self.extra_list());
        if list.len() != weights.len() {
            return Err(err(format!(
                "set_weights: optimizer `{}` has {} variables, got {} weights",
                self.config.name,
                list.len(),
                weights.len()
            )));
        }
        for (e, w) in list.iter().zip(weights) {
            if e.shape != w.dims() {
                return Err(err(format!(
                    "Optimizer variable {} has shape {:?} not compatible with provided \
                     weight shape {:?}.",
                    e.name,
                    e.shape,
                    w.dims()
                )));
            }
        }
        // Convert everything first; only then assign.
        let n = self.slots.len();
        let mut raw = self.counters.raw_iterations;
        let mut config = self.config.clone();
        let mut emas: Vec<Option<Tensor>> = vec![None; n];
        let mut accs: Vec<Option<Tensor>> = vec![None; n];
        let mut values: Vec<Vec<Vec<f32>>> = vec![Vec::new(); n];
        let mut extras = Vec::new();
        for (e, w) in list.iter().zip(weights) {
            match e.part {
                Part::Iteration => raw = iteration_count(w)?,
                Part::LearningRate => {
                    let lr = w.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                    config = AdafactorConfig {
                        learning_rate: LearningRate::Constant(lr as f64),
                        ..config
                    };
                    config.validate().map_err(core_err)?;
                }
                Part::Average(i) => emas[i] = Some(to_slot(w, self.slots[i].var.device())?),
                Part::Accumulator(i) => accs[i] = Some(to_slot(w, self.slots[i].var.device())?),
                Part::Stat(i, _) => {
                    values[i].push(w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
                }
                Part::Extra(i) => {
                    let v = &self.extra[i].1;
                    extras.push(w.to_dtype(v.dtype())?.to_device(v.device())?);
                }
                Part::Dummy | Part::Velocity(_) | Part::SkippedSteps => {
                    return Err(err("internal: not a Keras `variables` entry"))
                }
            }
        }
        let mut stats = Vec::with_capacity(n);
        for (s, v) in self.slots.iter().zip(&values) {
            let mut st = s.stats.clone();
            st.set_from(&s.name, v).map_err(core_err)?;
            stats.push(st);
        }
        // Commit.
        self.counters.raw_iterations = raw;
        self.config = config;
        for (((s, st), ema), acc) in self.slots.iter_mut().zip(stats).zip(emas).zip(accs) {
            s.set_full_state(ema, acc);
            s.stats = st;
        }
        for ((_, v), value) in self.extra.iter().zip(extras) {
            v.set(&value)?;
        }
        Ok(())
    }

    /// Keras's refusal to set the weights of an optimizer that is not built yet.
    pub(crate) fn require_built_for_set_weights(&self) -> Result<()> {
        if self.built {
            return Ok(());
        }
        Err(err(
            "You are calling `set_weights()` on an optimizer that has not yet been built. \
             Please call `optimizer.build(trainable_variables)` to create the optimizer \
             weights before calling `optimizer.set_weights()`.",
        ))
    }

    /// Keras `add_variable(shape, initializer="zeros", dtype, name)`: a zero-initialised variable
    /// tracked by the optimizer (listed last in [`Adafactor::variables`], set by
    /// [`Adafactor::set_weights`]), for extensions that need extra state.
    ///
    /// # Errors
    /// A name already used by another optimizer variable.
    pub fn add_variable(
        &mut self,
        shape: impl Into<Shape>,
        dtype: DType,
        name: &str,
    ) -> Result<Var> {
        if self.variables()?.iter().any(|(n, _)| n == name) {
            return Err(err(format!(
                "an optimizer variable named `{name}` already exists"
            )));
        }
        let device = self
            .slots
            .first()
            .map(|s| s.var.device().clone())
            .unwrap_or(Device::Cpu);
        let v = Var::zeros(shape, dtype, &device)?;
        self.extra.push((name.to_string(), v.clone()));
        Ok(v)
    }

    /// The EMA average of `var` (float32), when `use_ema`.
    ///
    /// # Errors
    /// A variable the optimizer was not built with.
    pub fn moving_average(&self, var: &Var) -> Result<Option<Tensor>> {
        let i = self.slot_index(var)?;
        self.slots[i].ema().map(Tensor::copy).transpose()
    }
}

/// Reads the `iteration` weight: integer tensors exactly, float tensors when they hold a whole
/// number; in `[0, MAX_ITERATION]`, the range [`Adafactor::variables`] writes (an i64).
fn iteration_count(t: &Tensor) -> Result<u64> {
    let bad = |got: String| {
        err(format!(
            "set_weights: `iteration` must be a whole number in [0, {MAX_ITERATION}], got {got}"
        ))
    };
    if t.dtype().is_int() {
        let v = t.to_dtype(DType::I64)?.to_scalar::<i64>()?;
        u64::try_from(v).map_err(|_| bad(v.to_string()))
    } else {
        let v = t.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        manifest::iteration_from_float(v).ok_or_else(|| bad(v.to_string()))
    }
}

fn to_slot(t: &Tensor, device: &Device) -> Result<Tensor> {
    t.to_dtype(DType::F32)?
        .to_device(device)?
        .contiguous()?
        .copy()
}
