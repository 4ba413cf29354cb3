//! The fused backend's write with the EMA, overwrite and accumulator zeroing folded in
//! ([`super::AfterWrite`]) gives the bits of the separate stages, on every kernel.

use super::fused::{Buffer, ElementType, Fused, Slice, SliceMut, SliceStore};
use super::*;
use crate::axes::FactoredAxes;
use crate::config::{AdafactorConfig, WeightRounding};
use crate::kernels::PARALLEL_THRESHOLD;
use half::bf16;
use std::sync::{Mutex, RwLock};

/// Weights and gradients in their element type.
#[derive(Debug, Clone, PartialEq)]
enum Buf {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Buf {
    fn view(&self) -> Slice<'_> {
        match self {
            Buf::F32(v) => Slice::F32(v),
            Buf::Bf16(v) => Slice::Bf16(v),
        }
    }
    fn view_mut(&mut self) -> SliceMut<'_> {
        match self {
            Buf::F32(v) => SliceMut::F32(v),
            Buf::Bf16(v) => SliceMut::Bf16(v),
        }
    }
    fn bits(&self) -> Vec<u32> {
        match self {
            Buf::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
            Buf::Bf16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
        }
    }
    fn of(ty: ElementType, values: impl Iterator<Item = f32>) -> Buf {
        match ty {
            ElementType::F32 => Buf::F32(values.collect()),
            _ => Buf::Bf16(values.map(bf16::from_f32).collect()),
        }
    }
}

/// One variable's buffers, each behind its own lock.
struct Var {
    ty: ElementType,
    weight: RwLock<Buf>,
    grad: RwLock<Buf>,
    avg: RwLock<Vec<f32>>,
    acc: RwLock<Vec<f32>>,
}

struct Store(Vec<Var>);

fn missing(var: usize) -> Error {
    Error::Internal(format!("no variable {var}"))
}

impl SliceStore for Store {
    type Error = Error;
    fn core_error(e: Error) -> Error {
        e
    }
    fn element_type(&self, var: usize) -> ElementType {
        self.0[var].ty
    }
    fn read<R>(&self, var: usize, b: Buffer, f: impl FnOnce(Slice<'_>) -> R) -> Result<R, Error> {
        let v = self.0.get(var).ok_or_else(|| missing(var))?;
        Ok(match b {
            Buffer::Weight => f(v.weight.read().expect("an unpoisoned lock").view()),
            Buffer::Gradient => f(v.grad.read().expect("an unpoisoned lock").view()),
            Buffer::Average => f(Slice::F32(&v.avg.read().expect("an unpoisoned lock"))),
            Buffer::Accumulator => f(Slice::F32(&v.acc.read().expect("an unpoisoned lock"))),
        })
    }
    fn write<R>(
        &self,
        var: usize,
        b: Buffer,
        f: impl FnOnce(SliceMut<'_>) -> R,
    ) -> Result<R, Error> {
        let v = self.0.get(var).ok_or_else(|| missing(var))?;
        Ok(match b {
            Buffer::Weight => f(v.weight.write().expect("an unpoisoned lock").view_mut()),
            Buffer::Gradient => return Err(Error::Internal("the gradient is read-only".into())),
            Buffer::Average => f(SliceMut::F32(
                &mut v.avg.write().expect("an unpoisoned lock"),
            )),
            Buffer::Accumulator => f(SliceMut::F32(
                &mut v.acc.write().expect("an unpoisoned lock"),
            )),
        })
    }
}

/// The fused backend, folding or not, logging the variables of the separate stages.
struct Probe<'s> {
    inner: Fused<'s, Store>,
    fold: bool,
    separate: Mutex<Vec<Vec<usize>>>,
}

impl Backend for Probe<'_> {
    type Error = Error;
    type Measured = <Fused<'static, Store> as Backend>::Measured;
    type Updated = <Fused<'static, Store> as Backend>::Updated;
    fn core_error(e: Error) -> Error {
        e
    }
    fn check_gradients(&mut self, t: &[Target], tr: GradTransform) -> Result<Vec<bool>, Error> {
        self.inner.check_gradients(t, tr)
    }
    fn accumulate(&mut self, t: &[Target], tr: GradTransform) -> Result<(), Error> {
        self.inner.accumulate(t, tr)
    }
    fn measure(
        &mut self,
        t: &[Target],
        s: &[Stats],
        ctx: &UpdateContext,
    ) -> Result<Vec<(Measure, Self::Measured)>, Error> {
        self.inner.measure(t, s, ctx)
    }
    fn update(
        &mut self,
        t: &[Target],
        s: &[Stats],
        m: &[(Measure, Self::Measured)],
        sc: &[GradScale],
        ctx: &UpdateContext,
    ) -> Result<Vec<(f32, Self::Updated)>, Error> {
        self.inner.update(t, s, m, sc, ctx)
    }
    fn write(
        &mut self,
        t: &[Target],
        s: &[Stats],
        u: Vec<(f32, Self::Updated)>,
        w: &[WriteScalars],
        ctx: &UpdateContext,
    ) -> Result<Vec<Stats>, Error> {
        assert_eq!(ctx.after_write.is_some(), self.fold, "the engine's choice");
        self.inner.write(t, s, u, w, ctx)
    }
    fn folds_after_write(&self) -> bool {
        self.fold && self.inner.folds_after_write()
    }
    fn zero_accumulators(&mut self, vars: &[usize]) -> Result<(), Error> {
        self.separate.lock().expect("log").push(vars.to_vec());
        self.inner.zero_accumulators(vars)
    }
    fn ema(&mut self, vars: &[usize], ema: EmaPlan) -> Result<(), Error> {
        self.separate.lock().expect("log").push(vars.to_vec());
        self.inner.ema(vars, ema)
    }
}

/// A deterministic value in about `[-1, 1)`.
fn value(seed: usize, i: usize) -> f32 {
    let h = (seed as u64 * 0x9E37_79B9 + i as u64 * 0x85EB_CA6B) % 20011;
    h as f32 / 10005.5 - 1.0
}

/// A variable: shape, element type, factored axes.
type Spec = (Vec<usize>, ElementType, Option<FactoredAxes>);

/// Everything a step can change: weights, averages, accumulators, statistics (as bits), and
/// the separate stages' variable lists.
type Snapshot = (
    Vec<Vec<u32>>,
    Vec<Vec<u32>>,
    Vec<Vec<u32>>,
    Vec<Vec<u32>>,
    Vec<Vec<usize>>,
);

/// `steps` calls on fresh buffers; variable `v` has no gradient on calls where
/// `(call + v) % 5 == 0`.
fn run_steps(cfg: &AdafactorConfig, specs: &[Spec], steps: u64, fold: bool) -> Snapshot {
    let len = |s: &[usize]| s.iter().product::<usize>();
    let store = Store(
        specs
            .iter()
            .enumerate()
            .map(|(v, (shape, ty, _))| {
                let n = len(shape);
                Var {
                    ty: *ty,
                    weight: RwLock::new(Buf::of(*ty, (0..n).map(|i| value(v, i)))),
                    grad: RwLock::new(Buf::of(*ty, std::iter::empty())),
                    avg: RwLock::new((0..n).map(|i| value(v + 7, i)).collect()),
                    acc: RwLock::new(vec![0.0; n]),
                }
            })
            .collect(),
    );
    let mut stats: Vec<Stats> = specs
        .iter()
        .map(|(shape, _, axes)| Stats::zeros_with(shape, *axes))
        .collect();
    let scope: Vec<usize> = (0..specs.len()).collect();
    let mut separate = Vec::new();
    for call in 0..steps {
        for (v, (shape, ty, _)) in specs.iter().enumerate() {
            let seed = 1000 * (call as usize + 1) + v;
            let g = Buf::of(*ty, (0..len(shape)).map(|i| 0.1 * value(seed, i)));
            *store.0[v].grad.write().expect("lock") = g;
        }
        let targets: Vec<Target> = scope
            .iter()
            .filter(|&&v| !(call as usize + v).is_multiple_of(5))
            .map(|&var| Target {
                var,
                decays: var % 2 == 0,
            })
            .collect();
        let plan = StepPlan::new(cfg, call);
        let step = Step {
            plan: &plan,
            targets: &targets,
            scope: &scope,
            check_finite: true,
        };
        let mut backend = Probe {
            inner: Fused::new(&store),
            fold,
            separate: Mutex::new(Vec::new()),
        };
        let outcome = run(&mut backend, &mut stats, step, &Local).expect("a step");
        assert_eq!(outcome, Outcome::Applied);
        separate.extend(backend.separate.into_inner().expect("log"));
    }
    let f32_bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let weights = store
        .0
        .iter()
        .map(|v| v.weight.read().expect("lock").bits())
        .collect();
    let avgs = store
        .0
        .iter()
        .map(|v| f32_bits(&v.avg.read().expect("lock")))
        .collect();
    let accs = store
        .0
        .iter()
        .map(|v| f32_bits(&v.acc.read().expect("lock")))
        .collect();
    let stats = stats
        .iter()
        .map(|s| match s {
            Stats::Factored { r, c, .. } => f32_bits(&[&r[..], &c[..]].concat()),
            Stats::Unfactored { v } => f32_bits(v),
        })
        .collect();
    (weights, avgs, accs, stats, separate)
}

/// Small tensors of every kernel, and large ones (more than [`PARALLEL_THRESHOLD`] elements,
/// written in parallel blocks) of the row, vector, short-row, few-row and strided kernels.
fn specs(ty: ElementType) -> Vec<Spec> {
    let conv = Some(FactoredAxes::CONVOLUTION);
    let mut s: Vec<Spec> = vec![
        (vec![300, 512], ty, None),
        (vec![PARALLEL_THRESHOLD + 7], ty, None),
        (vec![PARALLEL_THRESHOLD / 2, 3], ty, None),
        (vec![2, PARALLEL_THRESHOLD / 2 + 5], ty, None),
        (vec![64, 40, 3, 3], ty, conv),
        (vec![16, 4, 4], ty, None),
        (vec![6, 5, 3, 3], ElementType::F32, conv),
    ];
    let small = [
        vec![],
        vec![7],
        vec![3, 5],
        vec![2, 3, 4],
        vec![64, 64],
        vec![5, 1],
    ];
    for i in 0..30 {
        let t = if i % 3 == 0 { ElementType::F32 } else { ty };
        s.push((small[i % small.len()].clone(), t, None));
    }
    s
}

fn check(cfg: &AdafactorConfig, ty: ElementType, steps: u64) {
    let specs = specs(ty);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .expect("a thread pool");
    let folded = pool.install(|| run_steps(cfg, &specs, steps, true));
    let separate = pool.install(|| run_steps(cfg, &specs, steps, false));
    let names = ["weights", "averages", "accumulators", "statistics"];
    let parts = [
        (&folded.0, &separate.0),
        (&folded.1, &separate.1),
        (&folded.2, &separate.2),
        (&folded.3, &separate.3),
    ];
    for (name, (a, b)) in names.iter().zip(parts) {
        for (v, (a, b)) in a.iter().zip(b).enumerate() {
            assert!(a == b, "{name} of variable {v} {:?} differ", specs[v].0);
        }
    }
    // The separate stages saw only the variables without a gradient in a folded update call
    // (all of them in accumulate-only calls), and every variable when not folding.
    let accumulating = cfg.gradient_accumulation_steps.is_some();
    for (k, vars) in folded.4.iter().enumerate() {
        let whole = vars.len() == specs.len() && accumulating && cfg.use_ema;
        let without_gradient = vars.iter().all(|v| v % 5 == vars[0] % 5);
        assert!(whole || without_gradient, "list {k}: {vars:?}");
    }
    assert!(folded.4.iter().any(|v| v.len() < specs.len()));
    assert!(separate.4.iter().all(|v| v.len() == specs.len()));
    // The fold was not a no-op: the averages moved and the accumulators were used.
    if cfg.use_ema {
        let start = run_steps(cfg, &specs, 0, true);
        assert_ne!(folded.1, start.1, "the averages never changed");
    }
}

fn config(json: &str) -> AdafactorConfig {
    let value = serde_json::from_str(json).expect("JSON");
    AdafactorConfig::from_keras_config(&value).expect("a config")
}

#[test]
fn ema_folds_into_the_write_bit_for_bit() {
    for ty in [ElementType::F32, ElementType::Bf16] {
        check(&config(r#"{"use_ema": true, "weight_decay": 0.1}"#), ty, 4);
    }
}

#[test]
fn ema_overwrite_folds_into_the_write_bit_for_bit() {
    let cfg = config(r#"{"use_ema": true, "ema_overwrite_frequency": 2, "clipnorm": 1.0}"#);
    for ty in [ElementType::F32, ElementType::Bf16] {
        check(&cfg, ty, 4);
    }
}

#[test]
fn accumulator_zeroing_folds_into_the_write_bit_for_bit() {
    let cfg = config(r#"{"gradient_accumulation_steps": 2}"#);
    check(&cfg, ElementType::F32, 4);
    let cfg =
        config(r#"{"gradient_accumulation_steps": 3, "use_ema": true, "loss_scale_factor": 4.0}"#);
    check(&cfg, ElementType::Bf16, 6);
}

#[test]
fn stochastic_rounding_of_the_overwrite_folds_bit_for_bit() {
    let mut cfg = config(
        r#"{"use_ema": true, "ema_overwrite_frequency": 1, "gradient_accumulation_steps": 2}"#,
    );
    cfg.weight_rounding = WeightRounding::Stochastic;
    cfg.weight_rounding_seed = 42;
    check(&cfg, ElementType::Bf16, 4);
}
