//! The state manifest: what the optimizer's state is, declared once, and the three orders it is
//! listed in, from which every adapter derives its Keras `variables()` and `set_weights`, its
//! checkpoints and its exchange with a Keras `Adafactor` built on the same variables.
//!
//! Per variable the state is its statistics (`r` and `c` for rank >= 2, else `v`; see
//! [`Stats`]), its EMA average (with `use_ema`) and its gradient accumulator (with gradient
//! accumulation), all float32; the optimizer adds the raw call count `iteration`, the constant
//! learning rate, the variables made by `add_variable` and the skipped-step counter.
//!
//! A new piece of state is a new [`Part`] and one line in [`variables`] (or [`checkpoint`] for
//! state Keras does not have); [`keras`] says where Keras keeps it.

use crate::config::{AdafactorConfig, LearningRate};
use crate::state::Stats;

/// What one listed tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Keras `_iterations`, the raw call count (int64 scalar).
    Iteration,
    /// The constant learning rate (float32 scalar; only without a schedule).
    LearningRate,
    /// EMA average of variable `i` (float32, the variable's shape).
    Average(usize),
    /// Gradient accumulator of variable `i` (float32, the variable's shape).
    Accumulator(usize),
    /// Statistic `k` of variable `i`, in [`Stats::slot_shapes`] order (`r`, `c` or `v`).
    Stat(usize, usize),
    /// Keras only: an int32 scalar it keeps for `r` and `c` of a rank < 2 variable.
    Dummy,
    /// Keras only: the full-size velocity of variable `i` (for rank >= 2 a function of `r` and
    /// `c`, see [`velocity`], in the shape [`Stats::velocity_shape`]; for rank < 2 the
    /// statistic `v` itself).
    Velocity(usize),
    /// Variable `i` made by `add_variable` (its own dtype and shape).
    Extra(usize),
    /// Steps skipped for a non-finite gradient (int64 scalar; checkpoints only).
    SkippedSteps,
}

/// One listed tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its name in the list.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// What it holds.
    pub part: Part,
}

/// The element type of a listed tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// int64.
    I64,
    /// int32.
    I32,
    /// float32.
    F32,
    /// The dtype of `add_variable` variable `i`.
    Extra(usize),
}

impl Part {
    /// The element type of the tensor.
    pub fn kind(self) -> Kind {
        match self {
            Part::Iteration | Part::SkippedSteps => Kind::I64,
            Part::Dummy => Kind::I32,
            Part::Extra(i) => Kind::Extra(i),
            _ => Kind::F32,
        }
    }
}

/// A variable or an `add_variable` variable: name and shape.
pub type Named = (String, Vec<usize>);

fn entry(name: String, shape: &[usize], part: Part) -> Entry {
    Entry {
        name,
        shape: shape.to_vec(),
        part,
    }
}

/// Keras `optimizer.variables` of this optimizer, in order: `iteration`, `learning_rate` (a
/// constant learning rate only), `{name}/average` per variable (with `use_ema`),
/// `{name}/accumulator` per variable (with accumulation), `{name}/r` and `{name}/c` (rank >= 2)
/// or `{name}/v` per variable, then the `add_variable` variables. Keras's order without its
/// full-size velocity and int32 dummies.
pub fn variables(cfg: &AdafactorConfig, vars: &[Named], extras: &[Named]) -> Vec<Entry> {
    let mut out = vec![entry("iteration".into(), &[], Part::Iteration)];
    if let LearningRate::Constant(_) = cfg.learning_rate {
        out.push(entry("learning_rate".into(), &[], Part::LearningRate));
    }
    if cfg.use_ema {
        for (i, (name, shape)) in vars.iter().enumerate() {
            out.push(entry(format!("{name}/average"), shape, Part::Average(i)));
        }
    }
    if cfg.gradient_accumulation_steps.is_some() {
        for (i, (name, shape)) in vars.iter().enumerate() {
            out.push(entry(
                format!("{name}/accumulator"),
                shape,
                Part::Accumulator(i),
            ));
        }
    }
    for (i, (name, shape)) in vars.iter().enumerate() {
        let axes = cfg.axes_of(name);
        for (k, (suffix, s)) in Stats::slot_shapes_with(shape, axes).into_iter().enumerate() {
            out.push(entry(format!("{name}/{suffix}"), &s, Part::Stat(i, k)));
        }
    }
    for (i, (name, shape)) in extras.iter().enumerate() {
        out.push(entry(name.clone(), shape, Part::Extra(i)));
    }
    out
}

/// A checkpoint's tensors: [`variables`], then `skipped_steps`.
pub fn checkpoint(cfg: &AdafactorConfig, vars: &[Named], extras: &[Named]) -> Vec<Entry> {
    let mut out = variables(cfg, vars, extras);
    out.push(entry("skipped_steps".into(), &[], Part::SkippedSteps));
    out
}

/// The `optimizer.variables` of a Keras 3 `Adafactor` named `cfg.name` built on these
/// variables (each variable's Keras path being its name), as Keras orders and names them.
pub fn keras(cfg: &AdafactorConfig, vars: &[Named], extras: &[Named]) -> Vec<Entry> {
    let opt = &cfg.name;
    let path = |name: &str| name.replace('/', "_");
    let leaf = |name: &str| name.rsplit('/').next().unwrap_or(name).to_string();
    let mut out = vec![entry(format!("{opt}/iteration"), &[], Part::Iteration)];
    if let LearningRate::Constant(_) = cfg.learning_rate {
        out.push(entry(
            format!("{opt}/learning_rate"),
            &[],
            Part::LearningRate,
        ));
    }
    if cfg.use_ema {
        for (i, (name, shape)) in vars.iter().enumerate() {
            let n = format!("{opt}/{}_average", path(name));
            out.push(entry(n, shape, Part::Average(i)));
        }
    }
    if cfg.gradient_accumulation_steps.is_some() {
        for (i, (name, shape)) in vars.iter().enumerate() {
            let n = format!("{opt}/{}_gradient_accumulator", path(name));
            out.push(entry(n, shape, Part::Accumulator(i)));
        }
    }
    for (i, (name, dims)) in vars.iter().enumerate() {
        let n = format!("{opt}/{}", leaf(name));
        let axes = cfg.axes_of(name);
        if dims.len() >= 2 {
            for (k, (_, shape)) in Stats::slot_shapes_with(dims, axes).into_iter().enumerate() {
                out.push(entry(n.clone(), &shape, Part::Stat(i, k)));
            }
        } else {
            out.push(entry(n.clone(), &[], Part::Dummy));
            out.push(entry(n, &[], Part::Dummy));
        }
        let v = format!("{opt}/{}_velocity", path(name));
        out.push(entry(
            v,
            &Stats::velocity_shape(dims, axes),
            Part::Velocity(i),
        ));
    }
    for (i, (name, shape)) in extras.iter().enumerate() {
        out.push(entry(name.clone(), shape, Part::Extra(i)));
    }
    out
}

/// Relative tolerance of the check that a Keras velocity equals `r_i * c_j / mean(r)`
/// ([`check_velocity`]): Keras computes it in float32 with its own reduction order.
pub const VELOCITY_RTOL: f32 = 1e-5;

/// Keras's rebuilt velocity of one factored variable: per leading slice,
/// `v[i, j] = (r[i] / mean(r)) * c[j]`, in float32 as Keras computes it. A slice whose `mean(r)`
/// is 0 (a freshly built optimizer) has a zero velocity.
pub fn velocity(r: &[f32], c: &[f32], n: usize, m: usize) -> Vec<f32> {
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
pub fn velocity_agrees(keras: f32, rebuilt: f32, zero_mean: bool) -> bool {
    if zero_mean {
        // Zero at build; 0/0 in Keras after a step with zero statistics.
        return keras == 0.0 || keras.is_nan();
    }
    keras == rebuilt
        || (keras.is_nan() && rebuilt.is_nan())
        || (keras - rebuilt).abs() <= VELOCITY_RTOL * keras.abs().max(rebuilt.abs())
}

/// Checks a Keras velocity `v` of an `n x m` factored variable against its `r` and `c`.
///
/// # Errors
/// The first disagreeing flat index, with Keras's value and the rebuilt one.
pub fn check_velocity(
    v: &[f32],
    r: &[f32],
    c: &[f32],
    n: usize,
    m: usize,
) -> Result<(), (usize, f32, f32)> {
    let rebuilt = velocity(r, c, n, m);
    for (k, (&kv, &rv)) in v.iter().zip(&rebuilt).enumerate() {
        let slice = k.checked_div(n * m).unwrap_or(0);
        let mean: f64 = r[slice * n..(slice + 1) * n]
            .iter()
            .map(|&x| x as f64)
            .sum();
        if !velocity_agrees(kv, rv, mean == 0.0) {
            return Err((k, kv, rv));
        }
    }
    Ok(())
}

/// The raw call count from a float `iteration` weight: a whole number in `[0, i64::MAX]`.
pub fn iteration_from_float(v: f64) -> Option<u64> {
    // 2^63 (= i64::MAX + 1) is the first float64 above the range.
    (v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 9_223_372_036_854_775_808.0)
        .then_some(v as u64)
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
        assert_eq!(check_velocity(&v, &[1.0, 3.0], &[2.0, 4.0], 2, 2), Ok(()));
        assert_eq!(
            check_velocity(&[1.0, 2.5], &[1.0, 3.0], &[2.0, 4.0], 2, 2),
            Err((1, 2.5, 2.0))
        );
    }

    #[test]
    fn the_three_lists_share_one_declaration() {
        let cfg = AdafactorConfig {
            use_ema: true,
            gradient_accumulation_steps: Some(2),
            ..Default::default()
        };
        let vars = vec![("d/k".to_string(), vec![2, 3]), ("b".to_string(), vec![3])];
        let extras = vec![("n".to_string(), vec![])];
        let names = |l: Vec<Entry>| l.into_iter().map(|e| e.name).collect::<Vec<_>>();
        assert_eq!(
            names(checkpoint(&cfg, &vars, &extras)),
            [
                "iteration",
                "learning_rate",
                "d/k/average",
                "b/average",
                "d/k/accumulator",
                "b/accumulator",
                "d/k/r",
                "d/k/c",
                "b/v",
                "n",
                "skipped_steps"
            ]
        );
        let k = keras(&cfg, &vars, &extras);
        assert_eq!(k.len(), 2 + 2 + 2 + 3 + 3 + 1);
        assert_eq!(k[6].name, "adafactor/k");
        assert_eq!(k[8].part, Part::Velocity(0));
        assert_eq!(k[9].part.kind(), Kind::I32);
        assert_eq!(iteration_from_float(3.0), Some(3));
        assert_eq!(iteration_from_float(9_223_372_036_854_775_808.0), None);
        assert_eq!(iteration_from_float(0.5), None);
    }
}
