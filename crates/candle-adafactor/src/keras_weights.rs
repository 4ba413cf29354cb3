//! Exchanging the optimizer state with a Keras 3 `Adafactor` built on the same variables, in
//! Keras's `optimizer.variables` order (the mapping is documented on
//! [`Adafactor::set_keras_weights`]).

use crate::optimizer::{core_err, err, Adafactor};
use adafactor::manifest::{self, Part};
use adafactor::LearningRate;
use candle_core::{DType, Result, Tensor};

impl Adafactor {
    /// The optimizer state as a Keras 3 `Adafactor` built on the same variables holds it: Keras's
    /// `optimizer.variables` as `(path, tensor)`, in Keras's order (see
    /// [`Adafactor::set_keras_weights`] for the mapping). Tensors are copies.
    ///
    /// ```
    /// use candle_adafactor::{Adafactor, AdafactorConfig};
    /// use candle_core::{Device, Tensor, Var};
    /// # fn main() -> candle_core::Result<()> {
    /// let dev = Device::Cpu;
    /// let b = Var::new(&[1f32, 2.0], &dev)?;
    /// let k = Var::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev)?;
    /// let opt = Adafactor::new_named(vec![("kernel".into(), k), ("bias".into(), b)], AdafactorConfig::default())?;
    /// let names: Vec<String> = opt.keras_variables()?.into_iter().map(|(n, _)| n).collect();
    /// assert_eq!(names, ["adafactor/iteration", "adafactor/learning_rate",
    ///     "adafactor/kernel", "adafactor/kernel", "adafactor/kernel_velocity",
    ///     "adafactor/bias", "adafactor/bias", "adafactor/bias_velocity"]);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// A tensor copy fails.
    pub fn keras_variables(&self) -> Result<Vec<(String, Tensor)>> {
        manifest::keras(&self.config, &self.var_list(), &self.extra_list())
            .into_iter()
            .map(|e| Ok((e.name.clone(), self.entry_tensor(&e)?)))
            .collect()
    }

    /// Keras `set_weights` with the weights of a Keras 3 `Adafactor` built on the same variables
    /// (`[v.numpy() for v in optimizer.variables]`), in Keras's order:
    ///
    /// | Keras variable | here |
    /// | --- | --- |
    /// | `iteration` (int64) | the raw call count |
    /// | `learning_rate` (float32; only for a constant learning rate) | the constant learning rate |
    /// | `{path}_average`, one per variable (with `use_ema`) | EMA averages |
    /// | `{path}_gradient_accumulator`, one per variable (with accumulation) | accumulators |
    /// | then per variable, rank >= 2: `r` `[..., n]`, `c` `[..., m]`, `{path}_velocity` | `r`, `c`; the velocity is checked and dropped |
    /// | per variable, rank < 2: two int32 scalar dummies, `{path}_velocity` | the dummies are ignored; the velocity is `v` |
    /// | variables made by `add_variable`, last | the same |
    ///
    /// Keras also stores the full-size velocity of a factored variable. It is a function of `r`
    /// and `c`: `v[..., i, j] = r[..., i] * c[..., j] / mean(r[..., :])` per leading slice. On
    /// import it must agree with that to a relative 1e-5 (a slice whose `r` is all zero, as right
    /// after build, must have a zero velocity); on export ([`Adafactor::keras_variables`]) it is
    /// rebuilt that way. The paths assume the Keras optimizer has this optimizer's name and each
    /// variable's Keras path is its name here. The skipped-step counter is not part of Keras's
    /// state and is left as it is.
    ///
    /// # Errors
    /// Each names the problem; on any error nothing changes: not built (Keras's message); a
    /// different number of weights; a weight whose shape differs (Keras's message); an iteration
    /// that is not a whole number >= 0; an invalid learning rate; a velocity inconsistent with
    /// its variable's `r` and `c` (naming the variable and the first differing index).
    pub fn set_keras_weights(&mut self, weights: &[Tensor]) -> Result<()> {
        self.require_built_for_set_weights()?;
        let layout = manifest::keras(&self.config, &self.var_list(), &self.extra_list());
        if layout.len() != weights.len() {
            return Err(err(format!(
                "set_keras_weights: a Keras Adafactor built on the {} variables of optimizer \
                 `{}` has {} variables, got {} weights",
                self.slots.len(),
                self.config.name,
                layout.len(),
                weights.len()
            )));
        }
        for (e, w) in layout.iter().zip(weights) {
            let (name, shape) = (&e.name, &e.shape);
            if w.dims() != shape.as_slice() {
                return Err(err(format!(
                    "Optimizer variable {name} has shape {shape:?} not compatible with provided \
                     weight shape {:?}.",
                    w.dims()
                )));
            }
        }
        let floats = |w: &Tensor| -> Result<Vec<f32>> {
            w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
        };
        let mut raw = self.counters.raw_iterations;
        let mut config = self.config.clone();
        let mut emas: Vec<Option<Tensor>> = self.slots.iter().map(|_| None).collect();
        let mut accs: Vec<Option<Tensor>> = self.slots.iter().map(|_| None).collect();
        let mut factors: Vec<Vec<Vec<f32>>> = self.slots.iter().map(|_| Vec::new()).collect();
        let mut extras = Vec::with_capacity(self.extra.len());
        for (e, w) in layout.iter().zip(weights) {
            let name = &e.name;
            match e.part {
                Part::Iteration => {
                    let bad = |got: String| {
                        err(format!(
                            "set_keras_weights: {name} must be a whole number in [0, {}], got \
                             {got}",
                            i64::MAX
                        ))
                    };
                    raw = if w.dtype().is_float() {
                        let it = w.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                        manifest::iteration_from_float(it).ok_or_else(|| bad(it.to_string()))?
                    } else {
                        let it = w.to_dtype(DType::I64)?.to_scalar::<i64>()?;
                        u64::try_from(it).map_err(|_| bad(it.to_string()))?
                    };
                }
                Part::LearningRate => {
                    let lr = w.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                    config.learning_rate = LearningRate::Constant(lr as f64);
                    config.validate().map_err(core_err)?;
                }
                Part::Average(i) => {
                    emas[i] = Some(Tensor::from_vec(
                        floats(w)?,
                        self.slots[i].var.dims(),
                        self.slots[i].var.device(),
                    )?)
                }
                Part::Accumulator(i) => {
                    accs[i] = Some(Tensor::from_vec(
                        floats(w)?,
                        self.slots[i].var.dims(),
                        self.slots[i].var.device(),
                    )?)
                }
                Part::Dummy => {}
                Part::Stat(i, _) => factors[i].push(floats(w)?),
                Part::SkippedSteps => return Err(err("internal: not a Keras variable")),
                Part::Velocity(i) => {
                    // The velocity's shape: the variable's, or `[batch..., row, col]`.
                    let dims = e.shape.as_slice();
                    let v = floats(w)?;
                    if dims.len() < 2 {
                        factors[i].push(v);
                        continue;
                    }
                    let (n, m) = (dims[dims.len() - 2], dims[dims.len() - 1]);
                    let (r, c) = match factors[i].as_slice() {
                        [r, c] => (r, c),
                        _ => return Err(err("internal: r and c precede the velocity")),
                    };
                    if let Err((k, kv, rv)) = manifest::check_velocity(&v, r, c, n, m) {
                        return Err(err(format!(
                            "set_keras_weights: the velocity of variable `{}` ({name}) is not \
                             r_i * c_j / mean(r) of its r and c: at flat index {k} it is {kv}, \
                             r and c give {rv}; factored statistics cannot hold it",
                            self.slots[i].name
                        )));
                    }
                }
                Part::Extra(i) => {
                    let var = &self.extra[i].1;
                    extras.push(
                        w.to_dtype(var.dtype())?
                            .to_device(var.device())?
                            .contiguous()?
                            .copy()?,
                    );
                }
            }
        }
        let mut stats = Vec::with_capacity(self.slots.len());
        for (s, values) in self.slots.iter().zip(&factors) {
            let mut st = s.stats.clone();
            st.set_from(&s.name, values).map_err(core_err)?;
            stats.push(st);
        }
        // Commit (`Var::set` first: see `load_state_dict`).
        for ((_, var), value) in self.extra.iter().zip(extras) {
            var.set(&value)?;
        }
        for (((s, st), ema), acc) in self.slots.iter_mut().zip(stats).zip(emas).zip(accs) {
            s.stats = st;
            s.set_full_state(ema, acc);
        }
        self.counters.raw_iterations = raw;
        self.config = config;
        Ok(())
    }
}
