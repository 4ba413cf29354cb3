//! Property tests of `apply_gradients`: arbitrary shapes (rank 0 to 4, dims 0 to 3), dtypes,
//! values (NaN, infinities, huge, subnormal), configurations and non-finite policies, on both
//! data paths, with well-formed and malformed calls. It never panics; an error changes nothing
//! (bit for bit); and which outcome a call has is predicted exactly:
//! - a malformed call (wrong shape or dtype, unknown or repeated variable, no gradient) is an
//!   error;
//! - a well-formed call with a gradient that is not finite after unscaling is an error under
//!   `error`, a counted no-op under `skip`, and a step under `propagate`;
//! - any other call is a step: `raw_iterations` grows by one.

mod common;

use candle_adafactor::{Adafactor, AdafactorConfig, LearningRateSchedule, OnNonFinite};
use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;

/// The largest dimension generated, and the smallest on each path (zero-sized dimensions are
/// generated on both: an optimizer with an empty variable runs its steps on composed ops).
const MAX_DIM: usize = 3;
const MIN_DIM_FUSED: usize = 0;

#[derive(Debug, Clone)]
struct VarSpec {
    dims: Vec<usize>,
    dtype: DType,
    init: Vec<f32>,
}

/// How one call is malformed, if at all.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    Shape,
    Dtype,
    Unknown,
    Twice,
}

#[derive(Debug, Clone)]
struct Call {
    /// One entry per variable: `None` for a missing gradient, else the values (cycled to fill).
    grads: Vec<Option<Vec<f32>>>,
    fault: Fault,
    /// Which variable the fault concerns (modulo the count).
    at: usize,
}

#[derive(Debug, Clone)]
struct Case {
    config: AdafactorConfig,
    vars: Vec<VarSpec>,
    calls: Vec<Call>,
}

/// Mostly ordinary values, with every kind of special value.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        10 => -2.0f32..2.0,
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(1e20f32),
        1 => Just(-3e38f32),
        1 => Just(1e-40f32),
        1 => Just(f32::MIN_POSITIVE),
        1 => any::<f32>(),
    ]
}

fn finite_value() -> impl Strategy<Value = f32> {
    prop_oneof![
        10 => -2.0f32..2.0,
        1 => Just(0.0f32),
        1 => Just(1e20f32),
        1 => Just(1e-40f32),
    ]
}

fn config(jit: bool) -> impl Strategy<Value = AdafactorConfig> {
    (
        (
            prop::sample::select(vec![
                OnNonFinite::Error,
                OnNonFinite::Skip,
                OnNonFinite::Propagate,
            ]),
            any::<bool>(),
            prop::option::of(1u64..4),
            prop::option::of(2u64..4),
            prop::option::of(prop::sample::select(vec![0.0, 0.1, 0.5])),
        ),
        (
            0usize..5,
            prop::option::of(prop::sample::select(vec![0.5f64, 2.0, 1024.0])),
            any::<bool>(),
            prop::sample::select(vec![1e-3f64, 0.1, 1.0]),
        ),
    )
        .prop_map(
            move |(
                (on_nonfinite, use_ema, overwrite, accumulation, weight_decay),
                (clip, loss_scale_factor, schedule, lr),
            )| {
                let learning_rate = if schedule {
                    LearningRateSchedule::cosine_decay(lr, 4.0, 0.1, None, 0.0)
                        .map(Into::into)
                        .unwrap_or_else(|_| lr.into())
                } else {
                    lr.into()
                };
                AdafactorConfig {
                    learning_rate,
                    on_nonfinite,
                    use_ema,
                    ema_momentum: 0.9,
                    ema_overwrite_frequency: if use_ema { overwrite } else { None },
                    gradient_accumulation_steps: accumulation,
                    weight_decay,
                    clipnorm: (clip == 1).then_some(0.5),
                    global_clipnorm: (clip == 2).then_some(0.5),
                    clipvalue: (clip == 3).then_some(0.25),
                    loss_scale_factor,
                    jit_compile: jit,
                    ..Default::default()
                }
            },
        )
}

fn var_spec(min_dim: usize) -> impl Strategy<Value = VarSpec> {
    (
        prop::collection::vec(min_dim..=MAX_DIM, 0..=4),
        prop::sample::select(vec![DType::F32, DType::F32, DType::BF16, DType::F16]),
        prop::collection::vec(finite_value(), 1..8),
    )
        .prop_map(|(dims, dtype, init)| VarSpec { dims, dtype, init })
}

fn call() -> impl Strategy<Value = Call> {
    (
        prop::collection::vec(
            prop::option::weighted(0.85, prop::collection::vec(value(), 1..6)),
            3,
        ),
        prop_oneof![
            12 => Just(Fault::None),
            1 => Just(Fault::Shape),
            1 => Just(Fault::Dtype),
            1 => Just(Fault::Unknown),
            1 => Just(Fault::Twice),
        ],
        0usize..3,
    )
        .prop_map(|(grads, fault, at)| Call { grads, fault, at })
}

fn case() -> impl Strategy<Value = Case> {
    any::<bool>().prop_flat_map(|jit| {
        let min_dim = if jit { MIN_DIM_FUSED } else { 0 };
        (
            config(jit),
            prop::collection::vec(var_spec(min_dim), 1..=3),
            prop::collection::vec(call(), 1..=4),
        )
            .prop_map(|(config, vars, calls)| Case {
                config,
                vars,
                calls,
            })
    })
}

fn cycled(values: &[f32], n: usize) -> Vec<f32> {
    (0..n).map(|i| values[i % values.len()]).collect()
}

fn make(values: &[f32], dims: &[usize], dtype: DType) -> candle_core::Result<Tensor> {
    let n = dims.iter().product();
    Tensor::from_slice(&cycled(values, n), dims, &Device::Cpu)?.to_dtype(dtype)
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    counters: (bool, u64, u64, u64),
    tensors: Vec<(String, Vec<usize>, Vec<u64>)>,
}

fn snapshot(opt: &Adafactor, vars: &[Var]) -> candle_core::Result<Snapshot> {
    let mut tensors = Vec::new();
    for (i, v) in vars.iter().enumerate() {
        tensors.push((
            format!("variable {i}"),
            v.dims().to_vec(),
            common::tensor_bits(v.as_tensor()),
        ));
    }
    for (name, t) in opt.variables()? {
        tensors.push((name, t.dims().to_vec(), common::tensor_bits(&t)));
    }
    Ok(Snapshot {
        counters: (
            opt.built(),
            opt.iterations(),
            opt.raw_iterations(),
            opt.skipped_steps(),
        ),
        tensors,
    })
}

/// Whether a gradient is finite after unscaling, computed as both paths do (in float32).
fn finite_after_unscale(g: &Tensor, loss_scale: Option<f64>) -> candle_core::Result<bool> {
    let values = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(values.iter().all(|x| match loss_scale {
        Some(f) => (x / f as f32).is_finite(),
        None => x.is_finite(),
    }))
}

fn run(case: &Case) -> Result<(), TestCaseError> {
    let fail = |e: candle_core::Error| TestCaseError::fail(e.to_string());
    let vars: Vec<Var> = case
        .vars
        .iter()
        .map(|s| make(&s.init, &s.dims, s.dtype).and_then(|t| Var::from_tensor(&t)))
        .collect::<candle_core::Result<_>>()
        .map_err(fail)?;
    let named = vars
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("v{i}"), v.clone()))
        .collect();
    let mut opt = Adafactor::new_named(named, case.config.clone()).map_err(fail)?;
    let stranger = Var::new(&[1f32, 2.0], &Device::Cpu).map_err(fail)?;

    for (k, call) in case.calls.iter().enumerate() {
        let mut grads: Vec<Option<Tensor>> = Vec::new();
        let mut targets: Vec<Var> = Vec::new();
        for (i, (spec, var)) in case.vars.iter().zip(&vars).enumerate() {
            let g = match &call.grads[i] {
                Some(v) => Some(make(v, &spec.dims, spec.dtype).map_err(fail)?),
                None => None,
            };
            grads.push(g);
            targets.push(var.clone());
        }
        let at = call.at % vars.len();
        let spec = &case.vars[at];
        let n: usize = spec.dims.iter().product();
        match call.fault {
            Fault::None => {}
            Fault::Shape => {
                grads[at] = Some(make(&[1.0], &[n + 1], spec.dtype).map_err(fail)?);
            }
            Fault::Dtype => {
                let other = if spec.dtype == DType::F32 {
                    DType::F16
                } else {
                    DType::F32
                };
                grads[at] = Some(make(&[1.0], &spec.dims, other).map_err(fail)?);
            }
            Fault::Unknown => {
                grads.push(Some(make(&[1.0], &[2], DType::F32).map_err(fail)?));
                targets.push(stranger.clone());
            }
            Fault::Twice => {
                grads.push(Some(make(&[0.5], &spec.dims, spec.dtype).map_err(fail)?));
                targets.push(vars[at].clone());
            }
        }
        let well_formed = call.fault == Fault::None && grads.iter().any(Option::is_some);
        let mut finite = true;
        for g in grads.iter().flatten() {
            finite &= finite_after_unscale(g, case.config.loss_scale_factor).map_err(fail)?;
        }
        let before = snapshot(&opt, &vars).map_err(fail)?;
        let pairs: Vec<(Option<&Tensor>, &Var)> = grads
            .iter()
            .map(Option::as_ref)
            .zip(targets.iter())
            .collect();
        let result = opt.apply_gradients(&pairs);
        let after = snapshot(&opt, &vars).map_err(fail)?;
        let policy = case.config.on_nonfinite;
        let at_call = format!("call {k} (well_formed={well_formed}, finite={finite}, {policy:?})");
        match result {
            Err(e) => {
                prop_assert_eq!(
                    &before,
                    &after,
                    "{}: error `{}` changed the state",
                    at_call,
                    e
                );
                prop_assert!(
                    !well_formed || (!finite && policy == OnNonFinite::Error),
                    "{}: unexpected error `{}`",
                    at_call,
                    e
                );
            }
            Ok(_) => {
                prop_assert!(well_formed, "{}: a malformed call succeeded", at_call);
                if !finite && policy == OnNonFinite::Skip {
                    prop_assert_eq!(after.counters.3, before.counters.3 + 1, "{}", at_call);
                    let mut expected = before;
                    expected.counters.3 += 1;
                    prop_assert_eq!(
                        &expected,
                        &after,
                        "{}: a skipped call changed state",
                        at_call
                    );
                } else {
                    prop_assert!(
                        finite || policy == OnNonFinite::Propagate,
                        "{}: a non-finite gradient was applied",
                        at_call
                    );
                    prop_assert_eq!(after.counters.2, before.counters.2 + 1, "{}", at_call);
                    prop_assert_eq!(after.counters.3, before.counters.3, "{}", at_call);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn apply_gradients_never_panics_and_errors_change_nothing(case in case()) {
        run(&case)?;
    }
}

/// The property can fail: the snapshot it compares sees every change a step makes (weights,
/// statistics, counters), and the predictions hold on a hand-made case under each policy.
#[test]
fn the_snapshot_sees_every_change() {
    for jit in [true, false] {
        let var = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).expect("var");
        let vars = vec![var.clone()];
        let mut opt = Adafactor::new_named(
            vec![("w".into(), var.clone())],
            AdafactorConfig {
                on_nonfinite: OnNonFinite::Skip,
                jit_compile: jit,
                ..Default::default()
            },
        )
        .expect("build");
        let s0 = snapshot(&opt, &vars).expect("snapshot");
        let g = Tensor::new(&[[1f32, -1.0], [0.5, 2.0]], &Device::Cpu).expect("g");
        opt.apply_gradients(&[(Some(&g), &var)]).expect("step");
        let s1 = snapshot(&opt, &vars).expect("snapshot");
        for (a, b) in s0.tensors.iter().zip(&s1.tensors) {
            if a.0 != "learning_rate" {
                assert_ne!(a, b, "jit_compile={jit}: {} did not change", a.0);
            }
        }
        assert_ne!(s0.counters, s1.counters);
        let nan = Tensor::new(&[[f32::NAN, 1.0], [1.0, 1.0]], &Device::Cpu).expect("g");
        opt.apply_gradients(&[(Some(&nan), &var)]).expect("skip");
        let s2 = snapshot(&opt, &vars).expect("snapshot");
        assert_eq!(s1.tensors, s2.tensors);
        assert_eq!(s2.counters.3, s1.counters.3 + 1);
    }
    let calls = vec![Call {
        grads: vec![Some(vec![f32::NAN, 1.0]), None, None],
        fault: Fault::None,
        at: 0,
    }];
    for jit in [true, false] {
        for on_nonfinite in [
            OnNonFinite::Error,
            OnNonFinite::Skip,
            OnNonFinite::Propagate,
        ] {
            let case = Case {
                config: AdafactorConfig {
                    on_nonfinite,
                    jit_compile: jit,
                    ..Default::default()
                },
                vars: vec![VarSpec {
                    dims: vec![2, 2],
                    dtype: DType::F32,
                    init: vec![1.0, 2.0],
                }],
                calls: calls.clone(),
            };
            assert!(run(&case).is_ok(), "{on_nonfinite:?}");
        }
    }
}
