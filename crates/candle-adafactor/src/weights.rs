//! Keras `variables`, `set_weights` and `add_variable`: the optimizer's own state as a named
//! list in a stable order.
//!
//! Order: `iteration` (raw call count, i64 scalar), `learning_rate` (f32 scalar, only for a
//! constant learning rate), then per variable in build order `{name}/average` (with `use_ema`),
//! then `{name}/accumulator` (with gradient accumulation), then per variable `{name}/r` and
//! `{name}/c` (rank >= 2) or `{name}/v` (rank 0 and 1), then variables made by `add_variable`.
//! This is Keras's order without the full-size velocity and the int32 dummies Keras keeps.

use crate::optimizer::{err, Adafactor, MAX_ITERATION};
use adafactor::{AdafactorConfig, LearningRate};
use candle_core::{DType, Device, Result, Shape, Tensor, Var};

impl Adafactor {
    /// Keras `variables`: every piece of optimizer state, named, as copies (changing them does
    /// not change the optimizer; use [`Adafactor::set_weights`]).
    ///
    /// # Errors
    /// A tensor copy fails.
    pub fn variables(&self) -> Result<Vec<(String, Tensor)>> {
        let cpu = Device::Cpu;
        let mut out = vec![(
            "iteration".to_string(),
            Tensor::new(self.counters.raw_iterations as i64, &cpu)?,
        )];
        if let LearningRate::Constant(lr) = self.config.learning_rate {
            out.push(("learning_rate".into(), Tensor::new(lr as f32, &cpu)?));
        }
        for s in &self.slots {
            if let Some(e) = s.ema() {
                out.push((format!("{}/average", s.name), e.copy()?));
            }
        }
        for s in &self.slots {
            if let Some(a) = s.accumulator() {
                out.push((format!("{}/accumulator", s.name), a.copy()?));
            }
        }
        for s in &self.slots {
            for (suffix, shape, values) in s.stats.slots(s.var.dims()) {
                out.push((
                    format!("{}/{suffix}", s.name),
                    Tensor::from_slice(values, shape, &cpu)?,
                ));
            }
        }
        for (name, v) in &self.extra {
            out.push((name.clone(), v.as_tensor().copy()?));
        }
        Ok(out)
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
        let current = self.variables()?;
        if current.len() != weights.len() {
            return Err(err(format!(
                "set_weights: optimizer `{}` has {} variables, got {} weights",
                self.config.name,
                current.len(),
                weights.len()
            )));
        }
        for ((name, cur), w) in current.iter().zip(weights) {
            if cur.dims() != w.dims() {
                return Err(err(format!(
                    "Optimizer variable {name} has shape {:?} not compatible with provided \
                     weight shape {:?}.",
                    cur.dims(),
                    w.dims()
                )));
            }
        }
        // Convert everything first; only then assign.
        let mut it = weights.iter();
        let mut next = || it.next().ok_or_else(|| err("internal: weight count"));
        let raw = iteration_count(next()?)?;
        let mut config = self.config.clone();
        if let LearningRate::Constant(_) = config.learning_rate {
            let lr = next()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            config = AdafactorConfig {
                learning_rate: LearningRate::Constant(lr as f64),
                ..config
            };
            config.validate().map_err(crate::optimizer::core_err)?;
        }
        let mut emas = Vec::new();
        for s in &self.slots {
            if s.ema().is_some() {
                emas.push(to_slot(next()?, s.var.device())?);
            }
        }
        let mut accs = Vec::new();
        for s in &self.slots {
            if s.accumulator().is_some() {
                accs.push(to_slot(next()?, s.var.device())?);
            }
        }
        let mut stats = Vec::new();
        for s in &self.slots {
            let mut st = s.stats.clone();
            let values = st
                .slots_mut()
                .iter()
                .map(|_| {
                    next()?
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()
                })
                .collect::<Result<Vec<_>>>()?;
            st.set_from(&s.name, &values)
                .map_err(crate::optimizer::core_err)?;
            stats.push(st);
        }
        let mut extras = Vec::new();
        for (_, v) in &self.extra {
            extras.push(next()?.to_dtype(v.dtype())?.to_device(v.device())?);
        }
        // Commit.
        self.counters.raw_iterations = raw;
        self.config = config;
        let mut emas = emas.into_iter();
        let mut accs = accs.into_iter();
        for (s, st) in self.slots.iter_mut().zip(stats) {
            let ema = if s.ema().is_some() { emas.next() } else { None };
            let acc = if s.accumulator().is_some() {
                accs.next()
            } else {
                None
            };
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
        // 2^63 (= MAX_ITERATION + 1) is the first float64 above the range.
        if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 9_223_372_036_854_775_808.0 {
            Ok(v as u64)
        } else {
            Err(bad(v.to_string()))
        }
    }
}

fn to_slot(t: &Tensor, device: &Device) -> Result<Tensor> {
    t.to_dtype(DType::F32)?
        .to_device(device)?
        .contiguous()?
        .copy()
}
