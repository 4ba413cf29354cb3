//! The shared harness of the reliability tests: snapshots of everything a caller can observe,
//! compared bit for bit or within the conformance tolerance; deterministic values, shapes and
//! the standard model; twin optimizers that take the same steps.

use candle_adafactor::{Adafactor, AdafactorConfig};
use candle_core::{DType, Device, Tensor, Var};
use half::{bf16, f16};
use std::sync::mpsc;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Snapshots.

/// One tensor as raw bits (any dtype), with its name, dtype and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Bits {
    pub name: String,
    pub dtype: DType,
    pub dims: Vec<usize>,
    pub bits: Vec<u64>,
}

pub fn bits_of(name: &str, t: &Tensor) -> Bits {
    Bits {
        name: name.to_string(),
        dtype: t.dtype(),
        dims: t.dims().to_vec(),
        bits: super::tensor_bits(t),
    }
}

/// Everything a caller can observe about an optimizer and its variables.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub built: bool,
    pub iterations: u64,
    pub raw_iterations: u64,
    pub skipped_steps: u64,
    pub learning_rate: u32,
    pub config: AdafactorConfig,
    pub vars: Vec<Bits>,
    pub state: Vec<Bits>,
}

pub fn snapshot(opt: &Adafactor, vars: &[(String, Var)]) -> Snapshot {
    Snapshot {
        built: opt.built(),
        iterations: opt.iterations(),
        raw_iterations: opt.raw_iterations(),
        skipped_steps: opt.skipped_steps(),
        learning_rate: opt.current_learning_rate().to_bits(),
        config: opt.config().clone(),
        vars: vars
            .iter()
            .map(|(n, v)| bits_of(n, v.as_tensor()))
            .collect(),
        state: opt
            .variables()
            .expect("variables()")
            .iter()
            .map(|(n, t)| bits_of(n, t))
            .collect(),
    }
}

/// Asserts two snapshots are bit-identical, naming the first difference.
pub fn assert_same(before: &Snapshot, after: &Snapshot, what: &str) {
    if before == after {
        return;
    }
    let mut diffs = Vec::new();
    for (field, a, b) in [
        ("built", before.built as u64, after.built as u64),
        ("iterations", before.iterations, after.iterations),
        (
            "raw_iterations",
            before.raw_iterations,
            after.raw_iterations,
        ),
        ("skipped_steps", before.skipped_steps, after.skipped_steps),
        (
            "learning_rate",
            before.learning_rate as u64,
            after.learning_rate as u64,
        ),
    ] {
        if a != b {
            diffs.push(format!("{field}: {a} -> {b}"));
        }
    }
    if before.config != after.config {
        diffs.push("config changed".into());
    }
    for (a, b) in before
        .vars
        .iter()
        .chain(&before.state)
        .zip(after.vars.iter().chain(&after.state))
    {
        if a != b {
            diffs.push(format!("{} changed", a.name));
        }
    }
    if before.state.len() != after.state.len() {
        diffs.push(format!(
            "{} optimizer variables -> {}",
            before.state.len(),
            after.state.len()
        ));
    }
    panic!("{what}: state changed: {}", diffs.join("; "));
}

/// Runs `f` on another thread and fails if it has not finished within `secs` (a deadlock in an
/// in-place kernel would otherwise hang the test run).
pub fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("the call did not finish (deadlock?) or panicked")
}

/// Asserts two snapshots agree within the conformance tolerance `|a - b| <= 1e-6 + 1e-5 |b|`
/// (the two data paths round differently, so a call that falls back from one to the other is
/// compared this way), with identical counters, names and shapes.
pub fn assert_close(want: &Snapshot, got: &Snapshot, what: &str) {
    assert_eq!(
        (want.iterations, want.raw_iterations, want.skipped_steps),
        (got.iterations, got.raw_iterations, got.skipped_steps),
        "{what}: counters"
    );
    for (a, b) in want
        .vars
        .iter()
        .chain(&want.state)
        .zip(got.vars.iter().chain(&got.state))
    {
        assert_eq!((&a.name, &a.dims), (&b.name, &b.dims), "{what}");
        let fa = floats_of(a);
        let fb = floats_of(b);
        for (k, (x, y)) in fa.iter().zip(&fb).enumerate() {
            assert!(
                (x - y).abs() <= 1e-6 + 1e-5 * x.abs() || (x.is_nan() && y.is_nan()),
                "{what}: {} index {k}: {x} vs {y}",
                a.name
            );
        }
    }
}

pub fn floats_of(b: &Bits) -> Vec<f64> {
    b.bits
        .iter()
        .map(|x| match b.dtype {
            DType::F32 => f32::from_bits(*x as u32) as f64,
            DType::F64 => f64::from_bits(*x),
            DType::F16 => f16::from_bits(*x as u16).to_f64(),
            DType::BF16 => bf16::from_bits(*x as u16).to_f64(),
            _ => *x as i64 as f64,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Fixtures.

/// Deterministic values in about [-1.4, 1.4], never exactly zero.
pub fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let k = (i * 7 + seed * 13 + 3) % 23;
            (k as f32 - 11.0) / 8.0 + 0.0625
        })
        .collect()
}

pub fn var_from(data: &[f32], dims: &[usize], dtype: DType) -> Var {
    let t = Tensor::from_slice(data, dims, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("tensor");
    Var::from_tensor(&t).expect("var")
}

pub fn tensor(data: &[f32], dims: &[usize], dtype: DType) -> Tensor {
    Tensor::from_slice(data, dims, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("tensor")
}

/// Shapes of the standard model: a matrix, a vector, a scalar and a rank-3 tensor, so that both
/// factored and unfactored statistics are covered.
pub const MODEL: [(&str, &[usize]); 4] = [
    ("kernel", &[2, 3]),
    ("bias", &[3]),
    ("scale", &[]),
    ("conv", &[2, 2, 3]),
];

pub fn model(dtype: DType) -> Vec<(String, Var)> {
    MODEL
        .iter()
        .enumerate()
        .map(|(i, (name, dims))| {
            let n = dims.iter().product();
            (name.to_string(), var_from(&values(n, 100 + i), dims, dtype))
        })
        .collect()
}

pub fn grads(vars: &[(String, Var)], step: usize) -> Vec<Tensor> {
    vars.iter()
        .enumerate()
        .map(|(i, (_, v))| tensor(&values(v.elem_count(), step * 5 + i), v.dims(), v.dtype()))
        .collect()
}

pub fn pairs<'a>(
    grads: &'a [Option<Tensor>],
    vars: &'a [Var],
) -> Vec<(Option<&'a Tensor>, &'a Var)> {
    grads.iter().map(Option::as_ref).zip(vars.iter()).collect()
}

/// Applies the good gradients of step `step` and returns the new `iterations`.
pub fn good_step(opt: &mut Adafactor, vars: &[(String, Var)], step: usize) -> u64 {
    let g: Vec<Option<Tensor>> = grads(vars, step).into_iter().map(Some).collect();
    let v: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let iterations = opt
        .apply_gradients(&pairs(&g, &v))
        .unwrap_or_else(|e| panic!("a good step {step} failed: {e}"));
    // Fresh contiguous CPU gradients of a float type the kernels take, no empty variable: the
    // step must have run where `jit_compile` says.
    let fusable = vars.iter().all(|(_, v)| {
        v.elem_count() > 0 && matches!(v.dtype(), DType::F32 | DType::BF16 | DType::F16)
    });
    if fusable {
        let jit = opt.config().jit_compile;
        super::assert_path(opt, jit, &format!("good step {step}"));
    }
    iterations
}

/// Two optimizers on separate but identical variables.
pub struct Twins {
    pub a: Adafactor,
    pub a_vars: Vec<(String, Var)>,
    pub b: Adafactor,
    pub b_vars: Vec<(String, Var)>,
}

pub fn twins(cfg: &AdafactorConfig, dtype: DType) -> Twins {
    let a_vars = model(dtype);
    let b_vars = model(dtype);
    let mut a = Adafactor::new_named(a_vars.clone(), cfg.clone()).expect("build a");
    let mut b = Adafactor::new_named(b_vars.clone(), cfg.clone()).expect("build b");
    // Weight decay must see an exclusion too, so that the exclusion set is part of the state.
    a.exclude_from_weight_decay(&[], &["^scale$"])
        .expect("exclude");
    b.exclude_from_weight_decay(&[], &["^scale$"])
        .expect("exclude");
    Twins {
        a,
        a_vars,
        b,
        b_vars,
    }
}

impl Twins {
    /// The next good step on both, then a bit-for-bit comparison of everything.
    pub fn step_both_and_compare(&mut self, step: usize, what: &str) {
        good_step(&mut self.a, &self.a_vars, step);
        good_step(&mut self.b, &self.b_vars, step);
        assert_same(
            &snapshot(&self.b, &self.b_vars),
            &snapshot(&self.a, &self.a_vars),
            &format!("{what}: the next good step differs from an untouched optimizer's"),
        );
    }
}

/// Kinds of bad `apply_gradients` calls. Each puts its fault on variable `at`, with good
/// gradients for the others.
#[derive(Debug, Clone, Copy)]
pub enum Bad {
    /// A gradient of another shape with the same element count.
    ShapeSameCount,
    /// A gradient of another rank.
    Rank,
    /// A float64 gradient for a float32 variable.
    DtypeF64,
    /// A float16 gradient for a float32 variable.
    DtypeF16,
    /// A variable the optimizer was not built with.
    UnknownVariable,
    /// The same variable twice.
    Twice,
    /// Every gradient `None`.
    AllNone,
    /// A NaN or infinity in one gradient (with `on_nonfinite = "error"`).
    NonFinite(f32),
}

pub const BADS: [Bad; 10] = [
    Bad::ShapeSameCount,
    Bad::Rank,
    Bad::DtypeF64,
    Bad::DtypeF16,
    Bad::UnknownVariable,
    Bad::Twice,
    Bad::AllNone,
    Bad::NonFinite(f32::NAN),
    Bad::NonFinite(f32::INFINITY),
    Bad::NonFinite(f32::NEG_INFINITY),
];
