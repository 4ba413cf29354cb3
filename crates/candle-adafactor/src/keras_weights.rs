//! Exchanging the optimizer state with a Keras 3 `Adafactor` built on the same variables, in
//! Keras's `optimizer.variables` order (the mapping is documented on
//! [`Adafactor::set_keras_weights`]).

use crate::optimizer::{core_err, err, Adafactor};
use adafactor::{LearningRate, Stats};
use candle_core::{DType, Device, Result, Tensor};

/// Relative tolerance of the check that a Keras velocity equals `r_i * c_j / mean(r)`
/// ([`Adafactor::set_keras_weights`]): Keras computes it in float32 with its own reduction order.
const VELOCITY_RTOL: f32 = 1e-5;

/// One entry of the Keras `variables` list.
#[derive(Debug, Clone, Copy, PartialEq)]
enum KerasPart {
    Iteration,
    LearningRate,
    Average(usize),
    Accumulator(usize),
    /// The int32 scalar Keras keeps for `r` and `c` of a rank < 2 variable.
    Dummy,
    /// `r` (k = 0) or `c` (k = 1) of a rank >= 2 variable.
    Factor(usize, usize),
    Velocity(usize),
    Extra(usize),
}

/// Keras's rebuilt velocity of one factored variable: per leading slice,
/// `v[i, j] = (r[i] / mean(r)) * c[j]`, in float32 as Keras computes it. A slice whose `mean(r)`
/// is 0 (a freshly built optimizer) has a zero velocity.
fn velocity(r: &[f32], c: &[f32], n: usize, m: usize) -> Vec<f32> {
    let lead = r.len().checked_div(n).unwrap_or(0);
    let mut v = Vec::with_capacity(lead * n * m);
    for l in 0..lead {
        let rs = &r[l * n..(l + 1) * n];
        let cs = &c[l * m..(l + 1) * m];
        let mean = (rs.iter().map(|&x| x as f64).sum::<f64>() / n as f64) as f32;
        for &ri in rs {
            let row = if mean == 0.0 { 0.0 } else { ri / mean };
            v.extend(cs.iter().map(|&cj| row * cj));
        }
    }
    v
}

/// Whether a Keras velocity value agrees with the one rebuilt from `r` and `c`.
fn velocity_agrees(keras: f32, rebuilt: f32, zero_mean: bool) -> bool {
    if zero_mean {
        // Zero at build; 0/0 in Keras after a step with zero statistics.
        return keras == 0.0 || keras.is_nan();
    }
    keras == rebuilt
        || (keras.is_nan() && rebuilt.is_nan())
        || (keras - rebuilt).abs() <= VELOCITY_RTOL * keras.abs().max(rebuilt.abs())
}

impl Adafactor {
    /// The Keras `optimizer.variables` list this optimizer corresponds to, as `(path, tensor)`.
    fn keras_layout(&self) -> Vec<(String, DType, Vec<usize>, KerasPart)> {
        let opt = &self.config.name;
        let path_ = |name: &str| name.replace('/', "_");
        let leaf = |name: &str| name.rsplit('/').next().unwrap_or(name).to_string();
        let mut out = vec![(
            format!("{opt}/iteration"),
            DType::I64,
            vec![],
            KerasPart::Iteration,
        )];
        if let LearningRate::Constant(_) = self.config.learning_rate {
            out.push((
                format!("{opt}/learning_rate"),
                DType::F32,
                vec![],
                KerasPart::LearningRate,
            ));
        }
        if self.config.use_ema {
            for (i, s) in self.slots.iter().enumerate() {
                out.push((
                    format!("{opt}/{}_average", path_(&s.name)),
                    DType::F32,
                    s.var.dims().to_vec(),
                    KerasPart::Average(i),
                ));
            }
        }
        if self.config.gradient_accumulation_steps.is_some() {
            for (i, s) in self.slots.iter().enumerate() {
                out.push((
                    format!("{opt}/{}_gradient_accumulator", path_(&s.name)),
                    DType::F32,
                    s.var.dims().to_vec(),
                    KerasPart::Accumulator(i),
                ));
            }
        }
        for (i, s) in self.slots.iter().enumerate() {
            let dims = s.var.dims();
            let name = format!("{opt}/{}", leaf(&s.name));
            if dims.len() >= 2 {
                for (k, (_, shape)) in Stats::slot_shapes(dims).into_iter().enumerate() {
                    out.push((name.clone(), DType::F32, shape, KerasPart::Factor(i, k)));
                }
            } else {
                out.push((name.clone(), DType::I32, vec![], KerasPart::Dummy));
                out.push((name, DType::I32, vec![], KerasPart::Dummy));
            }
            out.push((
                format!("{opt}/{}_velocity", path_(&s.name)),
                DType::F32,
                dims.to_vec(),
                KerasPart::Velocity(i),
            ));
        }
        for (i, (name, v)) in self.extra.iter().enumerate() {
            out.push((
                name.clone(),
                v.dtype(),
                v.dims().to_vec(),
                KerasPart::Extra(i),
            ));
        }
        out
    }

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
        let cpu = Device::Cpu;
        let mut out = Vec::new();
        for (name, _, shape, part) in self.keras_layout() {
            let t = match part {
                KerasPart::Iteration => Tensor::new(self.counters.raw_iterations as i64, &cpu)?,
                KerasPart::LearningRate => Tensor::new(
                    self.config
                        .learning_rate
                        .value(self.counters.raw_iterations),
                    &cpu,
                )?,
                KerasPart::Average(i) => self.slots[i]
                    .ema()
                    .ok_or_else(|| err("internal: EMA average missing"))?
                    .copy()?,
                KerasPart::Accumulator(i) => self.slots[i]
                    .accumulator()
                    .ok_or_else(|| err("internal: gradient accumulator missing"))?
                    .copy()?,
                KerasPart::Dummy => Tensor::new(0i32, &cpu)?,
                KerasPart::Factor(i, k) => {
                    let s = &self.slots[i];
                    let stats = s.stats.slots(s.var.dims());
                    let values = stats
                        .get(k)
                        .ok_or_else(|| err("internal: statistic missing"))?
                        .2;
                    Tensor::from_slice(values, shape, &cpu)?
                }
                KerasPart::Velocity(i) => {
                    let s = &self.slots[i];
                    let dims = s.var.dims();
                    let stats = s.stats.slots(dims);
                    let values = if dims.len() >= 2 {
                        let (n, m) = (dims[dims.len() - 2], dims[dims.len() - 1]);
                        velocity(stats[0].2, stats[1].2, n, m)
                    } else {
                        stats[0].2.to_vec()
                    };
                    Tensor::from_vec(values, shape, &cpu)?
                }
                KerasPart::Extra(i) => self.extra[i].1.as_tensor().copy()?,
            };
            out.push((name, t));
        }
        Ok(out)
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
        let layout = self.keras_layout();
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
        for ((name, _, shape, _), w) in layout.iter().zip(weights) {
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
        for ((name, _, _, part), w) in layout.iter().zip(weights) {
            match *part {
                KerasPart::Iteration => {
                    let bad = |got: String| {
                        err(format!(
                            "set_keras_weights: {name} must be a whole number in [0, {}], got \
                             {got}",
                            i64::MAX
                        ))
                    };
                    raw = if w.dtype().is_float() {
                        let it = w.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                        // 2^63 is the first float beyond i64::MAX.
                        if !(it >= 0.0 && it.fract() == 0.0 && it < 9.223_372_036_854_776e18) {
                            return Err(bad(it.to_string()));
                        }
                        it as u64
                    } else {
                        let it = w.to_dtype(DType::I64)?.to_scalar::<i64>()?;
                        u64::try_from(it).map_err(|_| bad(it.to_string()))?
                    };
                }
                KerasPart::LearningRate => {
                    let lr = w.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                    config.learning_rate = LearningRate::Constant(lr as f64);
                    config.validate().map_err(core_err)?;
                }
                KerasPart::Average(i) => {
                    emas[i] = Some(Tensor::from_vec(
                        floats(w)?,
                        self.slots[i].var.dims(),
                        self.slots[i].var.device(),
                    )?)
                }
                KerasPart::Accumulator(i) => {
                    accs[i] = Some(Tensor::from_vec(
                        floats(w)?,
                        self.slots[i].var.dims(),
                        self.slots[i].var.device(),
                    )?)
                }
                KerasPart::Dummy => {}
                KerasPart::Factor(i, _) => factors[i].push(floats(w)?),
                KerasPart::Velocity(i) => {
                    let dims = self.slots[i].var.dims();
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
                    let rebuilt = velocity(r, c, n, m);
                    for (k, (&kv, &rv)) in v.iter().zip(&rebuilt).enumerate() {
                        let slice = k.checked_div(n * m).unwrap_or(0);
                        let mean: f64 = r[slice * n..(slice + 1) * n]
                            .iter()
                            .map(|&x| x as f64)
                            .sum();
                        if !velocity_agrees(kv, rv, mean == 0.0) {
                            return Err(err(format!(
                                "set_keras_weights: the velocity of variable `{}` ({name}) is \
                                 not r_i * c_j / mean(r) of its r and c: at flat index {k} it is \
                                 {kv}, r and c give {rv}; factored statistics cannot hold it",
                                self.slots[i].name
                            )));
                        }
                    }
                }
                KerasPart::Extra(i) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn velocity_is_per_slice_and_zero_at_build() {
        // Two slices of a [2, 2, 2] variable: r = [1, 3 | 0, 0], c = [2, 4 | 5, 6].
        let v = velocity(&[1.0, 3.0, 0.0, 0.0], &[2.0, 4.0, 5.0, 6.0], 2, 2);
        assert_eq!(v, [1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 0.0]);
        assert!(velocity_agrees(0.0, 0.0, true));
        assert!(!velocity_agrees(1.0, 0.0, true));
        assert!(velocity_agrees(1.0 + 5e-6, 1.0, false));
        assert!(!velocity_agrees(1.0 + 5e-5, 1.0, false));
    }
}
