//! Reliability: bad input never corrupts anything.
//!
//! Every test runs on both data paths (`jit_compile = true`, the fused path where it applies, and
//! `jit_compile = false`, the composed path). The central tool is [`Snapshot`]: the bit patterns
//! of every trained variable and every optimizer variable, plus the counters and the config,
//! taken before a call that must fail and compared bit for bit after it. Where a failure could
//! hide in state that `variables()` does not show, a twin optimizer that never saw the failure
//! takes the same next step and the two are compared bit for bit.

mod common;

use common::harness::*;
use common::{base, configs, PATHS};

use adafactor::LearningRateSchedule;
use candle_adafactor::{Adafactor, AdafactorConfig, DataPath, OnNonFinite};
use candle_core::{DType, Device, Tensor, Var};

/// The gradients and variables of a bad call, and a fragment its error message must contain.
fn bad_call(
    kind: Bad,
    vars: &[(String, Var)],
    step: usize,
    at: usize,
) -> (Vec<Option<Tensor>>, Vec<Var>, String) {
    let mut g: Vec<Option<Tensor>> = grads(vars, step).into_iter().map(Some).collect();
    let mut v: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let name = &vars[at].0;
    let var = &vars[at].1;
    let n = var.elem_count();
    let expect = match kind {
        Bad::ShapeSameCount => {
            let mut dims = var.dims().to_vec();
            dims.reverse();
            if dims == var.dims() {
                dims = vec![n, 1];
            }
            g[at] = Some(tensor(&values(n, 9), &dims, var.dtype()));
            format!("`{name}` has shape")
        }
        Bad::Rank => {
            g[at] = Some(tensor(&values(n + 1, 9), &[n + 1], var.dtype()));
            format!("`{name}` has shape")
        }
        Bad::DtypeF64 => {
            g[at] = Some(tensor(&values(n, 9), var.dims(), DType::F64));
            format!("`{name}` has dtype")
        }
        Bad::DtypeF16 => {
            g[at] = Some(tensor(&values(n, 9), var.dims(), DType::F16));
            format!("`{name}` has dtype")
        }
        Bad::UnknownVariable => {
            let stranger = var_from(&values(n, 9), var.dims(), var.dtype());
            g.insert(at, Some(tensor(&values(n, 8), var.dims(), var.dtype())));
            v.insert(at, stranger);
            "Unknown variable".to_string()
        }
        Bad::Twice => {
            g.insert(at, Some(tensor(&values(n, 8), var.dims(), var.dtype())));
            v.insert(at, var.clone());
            format!("`{name}` appears twice")
        }
        Bad::AllNone => {
            g.iter_mut().for_each(|g| *g = None);
            "No gradients provided for any variable.".to_string()
        }
        Bad::NonFinite(x) => {
            let mut data = values(n, 9);
            data[n / 2] = x;
            g[at] = Some(tensor(&data, var.dims(), var.dtype()));
            format!("`{name}`")
        }
    };
    (g, v, expect)
}

// ---------------------------------------------------------------------------------------------
// Atomic steps.

/// Every kind of bad call, under every stateful configuration, at every phase of gradient
/// accumulation (accumulate-only calls and update calls), with the fault on a variable in the
/// middle of the list and on the last one: an error, nothing changed, and the next good step is
/// the one an untouched optimizer makes.
#[test]
fn a_failed_step_changes_nothing() {
    for jit in PATHS {
        for (label, cfg) in configs(jit) {
            // Prefixes 0..=3 put the bad call at raw steps 0..=3: first call, accumulate-only
            // calls and update calls for k = 2 and k = 3.
            for prefix in 0..=3 {
                for kind in BADS {
                    for at in [1, 3] {
                        let what = format!(
                            "jit_compile={jit}, config {label}, after {prefix} good steps, \
                             {kind:?} on variable {at}"
                        );
                        let mut t = twins(&cfg, DType::F32);
                        for s in 0..prefix {
                            good_step(&mut t.a, &t.a_vars, s);
                            good_step(&mut t.b, &t.b_vars, s);
                        }
                        let before = snapshot(&t.a, &t.a_vars);
                        let (g, v, expect) = bad_call(kind, &t.a_vars, prefix, at);
                        let e =
                            t.a.apply_gradients(&pairs(&g, &v))
                                .expect_err(&format!("{what}: must fail"));
                        assert!(
                            e.to_string().contains(&expect),
                            "{what}: message `{e}` lacks `{expect}`"
                        );
                        assert_same(&before, &snapshot(&t.a, &t.a_vars), &what);
                        t.step_both_and_compare(prefix, &what);
                    }
                }
            }
        }
    }
}

/// A failed first call on an unbuilt optimizer leaves it unbuilt and the variables untouched; it
/// then builds on the next good call exactly as a fresh optimizer does.
#[test]
fn a_failed_first_call_leaves_the_optimizer_unbuilt() {
    for jit in PATHS {
        for (label, cfg) in configs(jit) {
            for kind in BADS {
                if matches!(kind, Bad::UnknownVariable) {
                    continue; // an unbuilt optimizer knows no variables yet: nothing is unknown
                }
                let what = format!("jit_compile={jit}, config {label}, {kind:?} on first call");
                let vars = model(DType::F32);
                let mut opt = Adafactor::unbuilt(cfg.clone()).expect("unbuilt");
                let before = snapshot(&opt, &vars);
                let (g, v, expect) = bad_call(kind, &vars, 0, 1);
                let e = opt
                    .apply_gradients(&pairs(&g, &v))
                    .expect_err(&format!("{what}: must fail"));
                let e = e.to_string();
                // On an unbuilt optimizer the variables are named var0, var1, ... at build, and a
                // variable listed twice is refused by the build itself.
                let expect = match kind {
                    Bad::Twice => "listed twice".to_string(),
                    _ => expect.replace("`bias`", "`var1`"),
                };
                assert!(
                    e.contains(&expect),
                    "{what}: message `{e}` lacks `{expect}`"
                );
                assert!(!opt.built(), "{what}: built by a failed call");
                assert_same(&before, &snapshot(&opt, &vars), &what);

                // Now a good first call matches a fresh optimizer.
                let twin_vars = model(DType::F32);
                let mut twin = Adafactor::unbuilt(cfg.clone()).expect("unbuilt");
                let renamed: Vec<(String, Var)> = vars
                    .iter()
                    .enumerate()
                    .map(|(i, (_, v))| (format!("var{i}"), v.clone()))
                    .collect();
                let twin_renamed: Vec<(String, Var)> = twin_vars
                    .iter()
                    .enumerate()
                    .map(|(i, (_, v))| (format!("var{i}"), v.clone()))
                    .collect();
                good_step(&mut opt, &renamed, 0);
                good_step(&mut twin, &twin_renamed, 0);
                assert_same(
                    &snapshot(&twin, &twin_renamed),
                    &snapshot(&opt, &renamed),
                    &format!("{what}: first good call"),
                );
            }
        }
    }
}

/// `candle_nn::Optimizer::step` and `minimize` are atomic too: a NaN loss gives NaN gradients,
/// the step is refused and nothing changes.
#[test]
fn trait_step_and_minimize_are_atomic() {
    use candle_nn::Optimizer;
    for jit in PATHS {
        for (label, cfg) in configs(jit) {
            let what = format!("jit_compile={jit}, config {label}");
            let vars = model(DType::F32);
            let mut opt = Adafactor::new_named(vars.clone(), cfg).expect("build");
            good_step(&mut opt, &vars, 0);
            let kernel = &vars[0].1;
            let bias = &vars[1].1;
            let nan = Tensor::new(f32::NAN, &Device::Cpu).expect("nan");
            let loss = (kernel.as_tensor().sum_all().expect("sum")
                + bias
                    .as_tensor()
                    .sum_all()
                    .and_then(|s| s.broadcast_mul(&nan))
                    .expect("mul"))
            .expect("loss");
            let before = snapshot(&opt, &vars);
            let e = opt.backward_step(&loss).expect_err(&what);
            assert!(e.to_string().contains("`bias`"), "{what}: {e}");
            assert_same(&before, &snapshot(&opt, &vars), &format!("{what}: step"));
            let e = opt.minimize(&loss, &[kernel, bias]).expect_err(&what);
            assert!(e.to_string().contains("`bias`"), "{what}: {e}");
            assert_same(
                &before,
                &snapshot(&opt, &vars),
                &format!("{what}: minimize"),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Non-finite policies.

fn with_policy(cfg: &AdafactorConfig, p: OnNonFinite) -> AdafactorConfig {
    AdafactorConfig {
        on_nonfinite: p,
        ..cfg.clone()
    }
}

const NON_FINITE: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];

/// `error`: an error naming the variable (whichever it is), nothing changed.
#[test]
fn policy_error_names_the_variable_and_changes_nothing() {
    for jit in PATHS {
        for (label, cfg) in configs(jit) {
            for x in NON_FINITE {
                for at in 0..MODEL.len() {
                    let what = format!("jit_compile={jit}, config {label}, {x} in variable {at}");
                    let mut t = twins(&with_policy(&cfg, OnNonFinite::Error), DType::F32);
                    good_step(&mut t.a, &t.a_vars, 0);
                    good_step(&mut t.b, &t.b_vars, 0);
                    let before = snapshot(&t.a, &t.a_vars);
                    let (g, v, _) = bad_call(Bad::NonFinite(x), &t.a_vars, 1, at);
                    let e = t.a.apply_gradients(&pairs(&g, &v)).expect_err(&what);
                    let name = &t.a_vars[at].0;
                    assert!(
                        e.to_string().contains(&format!("variable `{name}`")),
                        "{what}: message `{e}` does not name `{name}`"
                    );
                    assert_same(&before, &snapshot(&t.a, &t.a_vars), &what);
                    t.step_both_and_compare(1, &what);
                }
            }
        }
    }
}

/// A finite gradient that only overflows after `1 / loss_scale_factor` is refused too, and the
/// error still names its variable.
#[test]
fn policy_error_names_the_variable_when_unscaling_overflows() {
    for jit in PATHS {
        let cfg = AdafactorConfig {
            loss_scale_factor: Some(1e-30),
            ..base(jit)
        };
        let vars = model(DType::F32);
        let mut opt = Adafactor::new_named(vars.clone(), cfg).expect("build");
        let before = snapshot(&opt, &vars);
        let mut g: Vec<Option<Tensor>> = grads(&vars, 0).into_iter().map(Some).collect();
        let conv = &vars[3].1;
        let mut data = values(conv.elem_count(), 1);
        data[4] = 1e10; // 1e10 / 1e-30 overflows float32
        g[3] = Some(tensor(&data, conv.dims(), DType::F32));
        let v: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        let e = opt.apply_gradients(&pairs(&g, &v)).expect_err("overflow");
        assert!(
            e.to_string().contains("variable `conv`"),
            "jit_compile={jit}: message `{e}` does not name `conv`"
        );
        assert_same(&before, &snapshot(&opt, &vars), "unscale overflow");
    }
}

/// Clipping must not hide a non-finite gradient from the policy: `clipvalue` clamps an infinity
/// to a finite value (and norm clipping scales it), but the check is on the unscaled gradient,
/// so `error` still refuses the step and `skip` still skips it, on every rank.
#[test]
fn clipping_does_not_hide_non_finite_gradients() {
    for jit in PATHS {
        for clip in ["clipvalue", "clipnorm", "global_clipnorm"] {
            for policy in [OnNonFinite::Error, OnNonFinite::Skip] {
                for x in NON_FINITE {
                    for at in 0..MODEL.len() {
                        let what =
                            format!("jit_compile={jit}, {clip}, {policy:?}, {x} in variable {at}");
                        let cfg = AdafactorConfig {
                            clipvalue: (clip == "clipvalue").then_some(0.25),
                            clipnorm: (clip == "clipnorm").then_some(0.5),
                            global_clipnorm: (clip == "global_clipnorm").then_some(0.5),
                            on_nonfinite: policy,
                            ..base(jit)
                        };
                        let vars = model(DType::F32);
                        let mut opt = Adafactor::new_named(vars.clone(), cfg).expect("build");
                        let before = snapshot(&opt, &vars);
                        let (g, v, _) = bad_call(Bad::NonFinite(x), &vars, 0, at);
                        let result = opt.apply_gradients(&pairs(&g, &v));
                        match policy {
                            OnNonFinite::Error => {
                                let e = result.expect_err(&what);
                                assert!(e.to_string().contains(&vars[at].0), "{what}: {e}");
                                assert_same(&before, &snapshot(&opt, &vars), &what);
                            }
                            _ => {
                                result.expect(&what);
                                let expected = Snapshot {
                                    skipped_steps: 1,
                                    ..before
                                };
                                assert_same(&expected, &snapshot(&opt, &vars), &what);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `skip`: nothing changes except `skipped_steps`, and the next good step equals the step of an
/// optimizer that never saw the bad one, bit for bit.
#[test]
fn policy_skip_changes_nothing_and_counts() {
    for jit in PATHS {
        for (label, cfg) in configs(jit) {
            for x in NON_FINITE {
                for prefix in 0..=2 {
                    let what =
                        format!("jit_compile={jit}, config {label}, {x} after {prefix} steps");
                    let mut t = twins(&with_policy(&cfg, OnNonFinite::Skip), DType::F32);
                    for s in 0..prefix {
                        good_step(&mut t.a, &t.a_vars, s);
                        good_step(&mut t.b, &t.b_vars, s);
                    }
                    let before = snapshot(&t.a, &t.a_vars);
                    let (g, v, _) = bad_call(Bad::NonFinite(x), &t.a_vars, prefix, 2);
                    let it = t.a.apply_gradients(&pairs(&g, &v)).expect(&what);
                    assert_eq!(it, before.iterations, "{what}: iterations moved");
                    let after = snapshot(&t.a, &t.a_vars);
                    assert_eq!(after.skipped_steps, before.skipped_steps + 1, "{what}");
                    let expected = Snapshot {
                        skipped_steps: before.skipped_steps + 1,
                        ..before
                    };
                    assert_same(&expected, &after, &what);
                    // A second bad step counts again.
                    t.a.apply_gradients(&pairs(&g, &v)).expect(&what);
                    assert_eq!(t.a.skipped_steps(), 2, "{what}");
                    good_step(&mut t.a, &t.a_vars, prefix);
                    good_step(&mut t.b, &t.b_vars, prefix);
                    let a = snapshot(&t.a, &t.a_vars);
                    let b = snapshot(&t.b, &t.b_vars);
                    assert_same(
                        &Snapshot {
                            skipped_steps: 2,
                            ..b
                        },
                        &a,
                        &format!("{what}: next good step"),
                    );
                }
            }
        }
    }
}

/// `skip` on the very first call of an unbuilt optimizer builds it (as Keras would) but changes
/// no variable and no statistic.
#[test]
fn policy_skip_on_an_unbuilt_optimizer() {
    for jit in PATHS {
        let vars = model(DType::F32);
        let mut opt =
            Adafactor::unbuilt(with_policy(&base(jit), OnNonFinite::Skip)).expect("unbuilt");
        let (g, v, _) = bad_call(Bad::NonFinite(f32::NAN), &vars, 0, 0);
        opt.apply_gradients(&pairs(&g, &v)).expect("skip");
        assert_eq!(opt.skipped_steps(), 1);
        assert_eq!(opt.raw_iterations(), 0);
        let fresh: Vec<(String, Var)> = model(DType::F32);
        for ((_, a), (_, b)) in vars.iter().zip(&fresh) {
            assert_eq!(bits_of("v", a.as_tensor()), bits_of("v", b.as_tensor()));
        }
        for (name, t) in opt.variables().expect("variables") {
            if name.ends_with("/r") || name.ends_with("/c") || name.ends_with("/v") {
                let all_zero = t
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("stats")
                    .iter()
                    .all(|x| *x == 0.0);
                assert!(
                    all_zero,
                    "jit_compile={jit}: {name} changed by a skipped step"
                );
            }
        }
    }
}

/// `propagate`: as Keras, the NaN or infinity reaches the weights of that variable; the step
/// counts; variables with finite gradients stay finite (no global clipping here).
#[test]
fn policy_propagate_lets_nan_into_the_weights() {
    for jit in PATHS {
        for x in NON_FINITE {
            for at in 0..MODEL.len() {
                let what = format!("jit_compile={jit}, {x} in variable {at}");
                let vars = model(DType::F32);
                let mut opt = Adafactor::new_named(
                    vars.clone(),
                    with_policy(&base(jit), OnNonFinite::Propagate),
                )
                .expect("build");
                let (g, v, _) = bad_call(Bad::NonFinite(x), &vars, 0, at);
                assert_eq!(opt.apply_gradients(&pairs(&g, &v)).expect(&what), 1);
                assert_eq!(opt.skipped_steps(), 0, "{what}");
                for (i, (name, var)) in vars.iter().enumerate() {
                    let w = var
                        .as_tensor()
                        .flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .expect("weights");
                    let finite = w.iter().all(|x| x.is_finite());
                    if i == at {
                        assert!(!finite, "{what}: {name} stayed finite: {w:?}");
                    } else {
                        assert!(finite, "{what}: {name} became non-finite: {w:?}");
                    }
                }
            }
        }
    }
}

/// A finite gradient whose square overflows float32 (1e20) is finite: it is neither refused nor
/// skipped. As in Keras, a rank-1 update is then exactly zero (g / sqrt(inf)) and the weights stay
/// finite.
#[test]
fn huge_finite_gradient_is_not_non_finite() {
    for jit in PATHS {
        for policy in [OnNonFinite::Error, OnNonFinite::Skip] {
            let what = format!("jit_compile={jit}, {policy:?}");
            let vars = model(DType::F32);
            let mut opt =
                Adafactor::new_named(vars.clone(), with_policy(&base(jit), policy)).expect("build");
            let mut g: Vec<Option<Tensor>> = grads(&vars, 0).into_iter().map(Some).collect();
            let bias = &vars[1].1;
            let bias_before = bias.as_tensor().to_vec1::<f32>().expect("bias");
            g[1] = Some(tensor(&[1e20, -1e20, 1e20], &[3], DType::F32));
            g[2] = Some(tensor(&[-3e38], &[], DType::F32));
            let v: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
            let it = opt.apply_gradients(&pairs(&g, &v)).expect(&what);
            assert_eq!(it, 1, "{what}");
            assert_eq!(opt.skipped_steps(), 0, "{what}");
            let bias_after = bias.as_tensor().to_vec1::<f32>().expect("bias");
            assert_eq!(bias_after, bias_before, "{what}: g / sqrt(inf) is 0");
            let scale = vars[2].1.as_tensor().to_scalar::<f32>().expect("scale");
            assert!(scale.is_finite(), "{what}: scale = {scale}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// float16 and bfloat16 weights.

fn to_f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("values")
}

const HALF_SHAPES: [&[usize]; 4] = [&[], &[5], &[3, 4], &[2, 3, 4]];

/// A zero gradient (all zeros or partly zeros) leaves half-precision weights finite: the
/// statistics are float32, so epsilon_1 = 1e-30 does not underflow (Keras gives NaN in float16).
/// With an all-zero gradient the update is exactly zero.
#[test]
fn half_precision_zero_gradients_stay_finite() {
    for jit in PATHS {
        for dtype in [DType::F16, DType::BF16] {
            for dims in HALF_SHAPES {
                for partly in [false, true] {
                    let what =
                        format!("jit_compile={jit}, {dtype:?}, shape {dims:?}, partly={partly}");
                    let n: usize = dims.iter().product();
                    let var = var_from(&values(n, 1), dims, dtype);
                    let start = to_f32s(var.as_tensor());
                    let mut opt = Adafactor::new_named(vec![("w".into(), var.clone())], base(jit))
                        .expect("build");
                    for step in 0..3 {
                        let data: Vec<f32> = values(n, step)
                            .iter()
                            .enumerate()
                            .map(|(i, x)| if partly && i % 2 == 1 { *x } else { 0.0 })
                            .collect();
                        let g = tensor(&data, dims, dtype);
                        opt.apply_gradients(&[(Some(&g), &var)]).expect(&what);
                        let w = to_f32s(var.as_tensor());
                        assert!(w.iter().all(|x| x.is_finite()), "{what}: {w:?}");
                        if !partly {
                            assert_eq!(w, start, "{what}: a zero gradient moved the weights");
                        }
                    }
                    for (name, t) in opt.variables().expect("variables") {
                        if t.dtype() == DType::F32 {
                            assert!(
                                to_f32s(&t).iter().all(|x| x.is_finite()),
                                "{what}: {name} not finite"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A few steps on half-precision weights track the float32 run from the same (rounded) start
/// with the same (rounded) gradients. Each step computes in float32 and rounds the weight once,
/// so after `N` steps the gap is at most about `N` roundings: the bound is
/// `N * 2^-p * max|w|` with `p` = 8 for bfloat16 and 11 for float16, and the weights must have
/// moved by much more than that.
#[test]
fn half_precision_tracks_float32() {
    const STEPS: usize = 5;
    for jit in PATHS {
        for (dtype, p) in [(DType::BF16, 8), (DType::F16, 11)] {
            for dims in HALF_SHAPES {
                let what = format!("jit_compile={jit}, {dtype:?}, shape {dims:?}");
                let n: usize = dims.iter().product();
                let half = var_from(&values(n, 4), dims, dtype);
                let full = var_from(&to_f32s(half.as_tensor()), dims, DType::F32);
                let start = to_f32s(full.as_tensor());
                let cfg = base(jit);
                let mut oh = Adafactor::new_named(vec![("w".into(), half.clone())], cfg.clone())
                    .expect("build");
                let mut of =
                    Adafactor::new_named(vec![("w".into(), full.clone())], cfg).expect("build");
                for step in 0..STEPS {
                    let _ = step; // the same gradient each step, so the weights move steadily
                    let gh = tensor(&values(n, 10), dims, dtype);
                    let gf = gh.to_dtype(DType::F32).expect("f32");
                    oh.apply_gradients(&[(Some(&gh), &half)]).expect(&what);
                    of.apply_gradients(&[(Some(&gf), &full)]).expect(&what);
                }
                let wh = to_f32s(half.as_tensor());
                let wf = to_f32s(full.as_tensor());
                let scale = wf.iter().chain(&start).fold(0f32, |m, x| m.max(x.abs()));
                let bound = STEPS as f32 * 2f32.powi(-p) * scale;
                let gap = wh
                    .iter()
                    .zip(&wf)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                let moved = wf
                    .iter()
                    .zip(&start)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(gap <= bound, "{what}: gap {gap} > bound {bound}");
                assert!(moved > 4.0 * bound, "{what}: moved {moved} only");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Threads.

fn assert_send<T: Send>() {}
fn assert_sync<T: Sync>() {}

/// `Adafactor` is `Send` and `Sync`: it can be moved to a training thread, and shared read-only
/// (for `variables()`, `get_config()`) between threads.
#[test]
fn adafactor_is_send_and_sync() {
    assert_send::<Adafactor>();
    assert_sync::<Adafactor>();
    for jit in PATHS {
        let vars = model(DType::F32);
        let mut opt = Adafactor::new_named(vars.clone(), base(jit)).expect("build");
        let moved_vars = vars.clone();
        let opt2 = within(60, move || {
            good_step(&mut opt, &moved_vars, 0);
            opt
        });
        assert_eq!(opt2.iterations(), 1);
        let shared = std::sync::Arc::new(opt2);
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let s = shared.clone();
                std::thread::spawn(move || s.variables().map(|v| v.len()))
            })
            .collect();
        for r in readers {
            let n = r.join().expect("reader").expect("variables");
            assert_eq!(n, shared.variables().expect("variables").len());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Aliasing: gradients that share storage with variables.

/// Gradients that share storage with variables of the same step: a variable's own tensor, a
/// view of another variable, and two variables that are each other's gradient. The result is
/// that of copies (within the paths' rounding tolerance: an in-place path must not read a value
/// it has already written), and there is no deadlock or panic (an in-place kernel must not lock
/// one storage for reading and writing at once).
#[test]
fn gradients_aliasing_variables() {
    for jit in PATHS {
        for cross in [false, true] {
            let what = format!("jit_compile={jit}, cross={cross}");
            let run = move |alias: bool| {
                let vars = model(DType::F32);
                let mut opt = Adafactor::new_named(vars.clone(), base(jit)).expect("build");
                let v: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
                let maybe_copy = |t: Tensor| if alias { t } else { t.copy().expect("copy") };
                // Without `cross`: kernel's gradient is kernel itself, bias's is a row of kernel.
                // With `cross`: kernel and a second matrix of the same shape swap roles.
                let other = var_from(&values(6, 77), &[2, 3], DType::F32);
                let mut v = v;
                let mut named = vars.clone();
                if cross {
                    v.push(other.clone());
                    named.push(("other".into(), other.clone()));
                    opt = Adafactor::new_named(named.clone(), base(jit)).expect("build");
                }
                let mut g: Vec<Option<Tensor>> = vec![
                    Some(maybe_copy(if cross {
                        other.as_tensor().clone()
                    } else {
                        v[0].as_tensor().clone()
                    })),
                    Some(maybe_copy(v[0].as_tensor().get(0).expect("row"))),
                    Some(maybe_copy(v[2].as_tensor().clone())),
                    Some(maybe_copy(v[3].as_tensor().clone())),
                ];
                if cross {
                    g.push(Some(maybe_copy(v[0].as_tensor().clone())));
                }
                opt.apply_gradients(&pairs(&g, &v)).expect("aliasing step");
                snapshot(&opt, &named)
            };
            let aliased = within(60, move || run(true));
            let copied = within(60, move || run(false));
            assert_close(&copied, &aliased, &what);
        }
    }
}

/// A non-contiguous gradient (a transposed view) gives the result of its contiguous copy.
#[test]
fn non_contiguous_gradients() {
    for jit in PATHS {
        let run = |contiguous: bool| {
            let var = var_from(&values(12, 1), &[4, 3], DType::F32);
            let mut opt =
                Adafactor::new_named(vec![("w".into(), var.clone())], base(jit)).expect("build");
            let g = tensor(&values(12, 2), &[3, 4], DType::F32)
                .t()
                .expect("transpose");
            assert!(!g.is_contiguous());
            let g = if contiguous {
                g.contiguous().expect("copy")
            } else {
                g
            };
            opt.apply_gradients(&[(Some(&g), &var)]).expect("step");
            // A non-contiguous gradient cannot be read in place: that step ran composed, and
            // `data_path` says so.
            let want = if contiguous {
                common::expected_path(jit)
            } else {
                DataPath::Composed
            };
            assert_eq!(
                opt.data_path(),
                want,
                "contiguous={contiguous} jit_compile={jit}"
            );
            snapshot(&opt, &[("w".into(), var)])
        };
        assert_close(&run(true), &run(false), &format!("jit_compile={jit}"));
    }
}

/// A NaN or infinity anywhere in a large tensor (one the fused kernels split across threads),
/// also in its last element, is found: `error` refuses the step and changes nothing.
#[test]
fn non_finite_in_a_large_tensor_is_found() {
    for jit in PATHS {
        for (dims, at) in [
            (vec![300usize, 300], 300 * 300 - 1),
            (vec![300, 300], 0),
            (vec![70_000], 69_999),
            (vec![70_000], 40_000),
            (vec![3, 200, 150], 45_123),
        ] {
            for x in NON_FINITE {
                for accumulate in [false, true] {
                    let what = format!(
                        "jit_compile={jit}, shape {dims:?}, {x} at {at}, accumulate={accumulate}"
                    );
                    let n: usize = dims.iter().product();
                    let var = var_from(&values(n, 5), &dims, DType::F32);
                    let vars = vec![("big".to_string(), var.clone())];
                    let cfg = AdafactorConfig {
                        gradient_accumulation_steps: accumulate.then_some(2),
                        ..base(jit)
                    };
                    let mut opt = Adafactor::new_named(vars.clone(), cfg).expect("build");
                    let mut data = values(n, 6);
                    let g = tensor(&data, &dims, DType::F32);
                    opt.apply_gradients(&[(Some(&g), &var)]).expect(&what);
                    let before = snapshot(&opt, &vars);
                    data[at] = x;
                    let g = tensor(&data, &dims, DType::F32);
                    let e = opt.apply_gradients(&[(Some(&g), &var)]).expect_err(&what);
                    assert!(e.to_string().contains("`big`"), "{what}: {e}");
                    assert_same(&before, &snapshot(&opt, &vars), &what);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Degenerate shapes and counters.

/// Shapes with a zero dimension (including rank-2 with n = 0 or m = 0, and a leading 0) and
/// scalars: the step neither panics nor fails, an empty variable stays empty, and it does not
/// disturb the others, which move as they would without it. Should a step fail, it must at
/// least change nothing.
fn zero_sized_and_scalar_variables(jit: bool) {
    let shapes: [&[usize]; 10] = [
        &[0],
        &[0, 3],
        &[3, 0],
        &[0, 0],
        &[0, 2, 3],
        &[2, 0, 3],
        &[2, 3, 0],
        &[0, 1, 2, 2],
        &[],
        &[1, 1],
    ];
    for (label, cfg) in configs(jit) {
        for (dims, dtype) in shapes
            .iter()
            .flat_map(|d| [(*d, DType::F32), (*d, DType::BF16)])
        {
            let what = format!("jit_compile={jit}, config {label}, shape {dims:?} {dtype:?}");
            let n: usize = dims.iter().product();
            let odd = var_from(&values(n, 3), dims, dtype);
            let mut with = model(DType::F32);
            with.insert(1, ("odd".into(), odd.clone()));
            let without = model(DType::F32);
            let mut a = Adafactor::new_named(with.clone(), cfg.clone()).expect(&what);
            let mut b = Adafactor::new_named(without.clone(), cfg.clone()).expect(&what);
            for step in 0..4 {
                let g_odd = tensor(&values(n, step), dims, dtype);
                let mut g: Vec<Option<Tensor>> =
                    grads(&without, step).into_iter().map(Some).collect();
                let vb: Vec<Var> = without.iter().map(|(_, v)| v.clone()).collect();
                b.apply_gradients(&pairs(&g, &vb)).expect(&what);
                g.insert(1, Some(g_odd));
                let va: Vec<Var> = with.iter().map(|(_, v)| v.clone()).collect();
                let before = snapshot(&a, &with);
                if let Err(e) = a.apply_gradients(&pairs(&g, &va)) {
                    let after = snapshot(&a, &with);
                    let atomic = if before == after {
                        "nothing changed"
                    } else {
                        "AND THE STATE CHANGED"
                    };
                    panic!("{what}: step {step} failed ({atomic}): {e}");
                }
            }
            assert_eq!(odd.dims(), dims, "{what}");
            if n > 0 {
                let w = to_f32s(odd.as_tensor());
                assert!(w.iter().all(|x| x.is_finite()), "{what}: {w:?}");
                continue; // a non-empty variable legitimately changes the global norm
            }
            // Within the paths' rounding: a step with an empty variable may take the other
            // data path than one without it.
            for ((name, x), (_, y)) in with.iter().filter(|(n, _)| n != "odd").zip(&without) {
                let (x, y) = (to_f32s(x.as_tensor()), to_f32s(y.as_tensor()));
                for (k, (a, b)) in x.iter().zip(&y).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 + 1e-5 * b.abs(),
                        "{what}: {name}[{k}] moved differently next to an empty variable: \
                         {a} vs {b}"
                    );
                }
            }
            // The state of an optimizer with empty variables round-trips.
            let state: Vec<Tensor> = a
                .variables()
                .expect("variables")
                .into_iter()
                .map(|(_, t)| t)
                .collect();
            a.set_weights(&state).expect(&what);
        }
    }
}

#[test]
fn zero_sized_and_scalar_variables_composed() {
    zero_sized_and_scalar_variables(false);
}

#[test]
fn zero_sized_and_scalar_variables_fused() {
    zero_sized_and_scalar_variables(true);
}

/// The minimized inputs `cargo fuzz run step` found (kept as `fuzz/regressions/step/*`): one
/// variable, one zero gradient, on the fused path. A rank-3 variable whose leading dimension is
/// 0 made the update kernel panic (`chunks_mut(0)`); a `[3, 0]` variable made candle refuse the
/// in-place update and the in-place accumulation (zero stride). Each must be a normal step.
fn fuzz_regressions(jit: bool) {
    let cases: [(&str, &[usize], DType, AdafactorConfig); 3] = [
        (
            "leading_zero_dim_panics",
            &[0, 3, 3],
            DType::BF16,
            base(jit),
        ),
        (
            "empty_tensor_update_refused",
            &[3, 0],
            DType::BF16,
            AdafactorConfig {
                learning_rate: LearningRateSchedule::cosine_decay(0.1, 4.0, 0.1, None, 0.0)
                    .expect("schedule")
                    .into(),
                weight_decay: Some(0.1),
                loss_scale_factor: Some(0.5),
                ..base(jit)
            },
        ),
        (
            "empty_tensor_accumulate_refused",
            &[3, 0],
            DType::F32,
            AdafactorConfig {
                gradient_accumulation_steps: Some(3),
                ..base(jit)
            },
        ),
    ];
    for (name, dims, dtype, cfg) in cases {
        let what = format!("jit_compile={jit}, {name}");
        let result = std::panic::catch_unwind(|| {
            let var = var_from(&[], dims, dtype);
            let vars = vec![("w".to_string(), var.clone())];
            let mut opt = Adafactor::new_named(vars.clone(), cfg.clone()).expect("build");
            let g = tensor(&[], dims, dtype);
            let before = snapshot(&opt, &vars);
            let r = opt.apply_gradients(&[(Some(&g), &var)]);
            let unchanged = before == snapshot(&opt, &vars);
            (
                r.map(|_| opt.raw_iterations()).map_err(|e| e.to_string()),
                unchanged,
            )
        });
        match result {
            Err(_) => panic!("{what}: apply_gradients panicked"),
            Ok((Err(e), unchanged)) => panic!("{what}: failed (unchanged: {unchanged}): {e}"),
            Ok((Ok(raw), _)) => assert_eq!(raw, 1, "{what}: raw_iterations"),
        }
    }
}

#[test]
fn fuzz_regressions_composed() {
    fuzz_regressions(false);
}

#[test]
fn fuzz_regressions_fused() {
    fuzz_regressions(true);
}

/// A schedule built by hand without validation (its fields are public) still evaluates without
/// panicking; an optimizer refuses it.
#[test]
fn unvalidated_schedule_never_panics() {
    let bad = LearningRateSchedule::PiecewiseConstantDecay {
        boundaries: vec![1.0, 2.0],
        values: vec![0.5],
        name: "PiecewiseConstant".into(),
    };
    assert_eq!(bad.value(0), 0.5);
    assert_eq!(bad.value(5), 0.5);
    let empty = LearningRateSchedule::PiecewiseConstantDecay {
        boundaries: vec![],
        values: vec![],
        name: "PiecewiseConstant".into(),
    };
    assert!(empty.value(3).is_nan());
    for s in [bad, empty] {
        let e = Adafactor::unbuilt(AdafactorConfig::with_learning_rate(s)).expect_err("invalid");
        assert!(e.to_string().contains("boundaries"), "{e}");
    }
}

/// `set_weights` refuses an iteration count that is negative, fractional, not finite or beyond
/// `i64::MAX` (what `variables()` writes), names `iteration`, and changes nothing; integer
/// tensors are read exactly. At `i64::MAX` the counter cannot move on: `apply_gradients` is
/// refused, changing nothing, so it never overflows; one below, a step works and the state
/// round-trips.
#[test]
fn set_weights_bounds_the_iteration_count() {
    for jit in PATHS {
        let vars = model(DType::F32);
        let mut opt = Adafactor::new_named(vars.clone(), base(jit)).expect("build");
        good_step(&mut opt, &vars, 0);
        let state: Vec<Tensor> = opt
            .variables()
            .expect("variables")
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let before = snapshot(&opt, &vars);
        let bad: [Tensor; 8] = [
            Tensor::new(-1i64, &Device::Cpu).expect("t"),
            Tensor::new(i64::MIN, &Device::Cpu).expect("t"),
            Tensor::new(1.5f64, &Device::Cpu).expect("t"),
            Tensor::new(f64::NAN, &Device::Cpu).expect("t"),
            Tensor::new(f64::INFINITY, &Device::Cpu).expect("t"),
            Tensor::new(1e300f64, &Device::Cpu).expect("t"),
            Tensor::new(9_223_372_036_854_775_808f64, &Device::Cpu).expect("t"),
            Tensor::new(-0.5f32, &Device::Cpu).expect("t"),
        ];
        for it in bad {
            let mut w = state.clone();
            w[0] = it.clone();
            let e = opt.set_weights(&w).expect_err(&format!("iteration {it}"));
            assert!(e.to_string().contains("iteration"), "{e}");
            assert_same(&before, &snapshot(&opt, &vars), &format!("iteration {it}"));
        }
        // Read exactly from an i64 (2^53 + 1 is not a float64), and from whole floats.
        let mut w = state.clone();
        w[0] = Tensor::new((1i64 << 53) + 1, &Device::Cpu).expect("t");
        opt.set_weights(&w).expect("2^53 + 1");
        assert_eq!(opt.raw_iterations(), (1u64 << 53) + 1);
        w[0] = Tensor::new(7f32, &Device::Cpu).expect("t");
        opt.set_weights(&w).expect("7.0");
        assert_eq!(opt.raw_iterations(), 7);
        // At the maximum the counter cannot move on.
        w[0] = Tensor::new(i64::MAX, &Device::Cpu).expect("t");
        opt.set_weights(&w).expect("i64::MAX");
        let at_max = snapshot(&opt, &vars);
        let g: Vec<Option<Tensor>> = grads(&vars, 1).into_iter().map(Some).collect();
        let v: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        let e = opt
            .apply_gradients(&pairs(&g, &v))
            .expect_err("past i64::MAX");
        assert!(e.to_string().contains("iteration"), "{e}");
        assert_same(&at_max, &snapshot(&opt, &vars), "past i64::MAX");
        // One below, a step works, the weights stay finite, and the state round-trips.
        w[0] = Tensor::new(i64::MAX - 1, &Device::Cpu).expect("t");
        opt.set_weights(&w).expect("i64::MAX - 1");
        good_step(&mut opt, &vars, 1);
        assert_eq!(opt.raw_iterations(), i64::MAX as u64);
        for (name, v) in &vars {
            assert!(
                to_f32s(v.as_tensor()).iter().all(|x| x.is_finite()),
                "jit_compile={jit}: {name} not finite at step i64::MAX"
            );
        }
        let again: Vec<Tensor> = opt
            .variables()
            .expect("variables")
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let last = snapshot(&opt, &vars);
        opt.set_weights(&again).expect("round trip at i64::MAX");
        assert_same(&last, &snapshot(&opt, &vars), "round trip");
    }
}

/// Variables of the other float dtypes candle counts as float: float64 and float8 (E4M3) take a
/// real step (the composed path computes in float32); for float6, float4 and float8 E8M0, which
/// candle cannot make from float32 today, a step either works or is an error that changes
/// nothing, and never panics.
#[test]
fn other_float_dtypes_never_panic() {
    let dtypes = [
        (DType::F64, true),
        (DType::F8E4M3, true),
        (DType::F6E2M3, false),
        (DType::F6E3M2, false),
        (DType::F4, false),
        (DType::F8E8M0, false),
    ];
    for jit in PATHS {
        for (dtype, must_step) in dtypes {
            let what = format!("jit_compile={jit}, {dtype:?}");
            let made = Tensor::from_slice(&values(6, 1), (2, 3), &Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
                .and_then(|t| Ok((Var::from_tensor(&t)?, t)));
            let (var, g) = match made {
                Ok(v) => v,
                Err(e) => {
                    assert!(!must_step, "{what}: cannot make the variable: {e}");
                    continue;
                }
            };
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut opt = Adafactor::new_named(vec![("w".into(), var.clone())], base(jit))?;
                let before = to_f32s(var.as_tensor());
                let r = opt.apply_gradients(&[(Some(&g), &var)]);
                let after = to_f32s(var.as_tensor());
                Ok::<_, candle_core::Error>((r.is_ok(), opt.raw_iterations(), before, after))
            }));
            match outcome {
                Err(_) => panic!("{what}: panicked"),
                Ok(Err(e)) => assert!(!must_step, "{what}: refused at build: {e}"),
                Ok(Ok((ok, raw, before, after))) => {
                    assert_eq!(raw, ok as u64, "{what}");
                    if ok {
                        assert!(after.iter().all(|x| x.is_finite()), "{what}: {after:?}");
                        assert_ne!(after, before, "{what}: the step did not move the weights");
                    } else {
                        assert!(!must_step, "{what}: the step failed");
                        assert_eq!(after, before, "{what}: a failed step changed the weights");
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The other public methods: errors change nothing.

/// `set_weights` with the wrong count, a wrong shape, a bad learning rate, or on an unbuilt
/// optimizer; `build` twice; `try_set_learning_rate` with a bad value or on a schedule;
/// `exclude_from_weight_decay` with a bad pattern; `add_variable` with a taken name;
/// `finalize_variable_values` and `moving_average` with an unknown variable: each is an error and
/// changes nothing.
#[test]
fn other_methods_are_atomic() {
    for jit in PATHS {
        for (label, cfg) in configs(jit) {
            let what = |m: &str| format!("jit_compile={jit}, config {label}: {m}");
            let mut t = twins(&cfg, DType::F32);
            good_step(&mut t.a, &t.a_vars, 0);
            good_step(&mut t.b, &t.b_vars, 0);
            t.a.add_variable((2,), DType::F32, "extra").expect("extra");
            t.b.add_variable((2,), DType::F32, "extra").expect("extra");
            let state: Vec<Tensor> =
                t.a.variables()
                    .expect("variables")
                    .into_iter()
                    .map(|(_, t)| t)
                    .collect();
            let before = snapshot(&t.a, &t.a_vars);

            let mut short = state.clone();
            short.pop();
            let e = t.a.set_weights(&short).expect_err(&what("count"));
            assert!(e.to_string().contains("weights"), "{e}");
            assert_same(&before, &snapshot(&t.a, &t.a_vars), &what("count"));

            let last = state.len() - 1;
            let mut shape = state.clone();
            shape[last] = Tensor::zeros((3,), DType::F32, &Device::Cpu).expect("t");
            let e = t.a.set_weights(&shape).expect_err(&what("shape"));
            assert!(e.to_string().contains("extra"), "{e}");
            assert_same(&before, &snapshot(&t.a, &t.a_vars), &what("shape"));

            if matches!(
                cfg.learning_rate,
                candle_adafactor::LearningRate::Constant(_)
            ) {
                for lr in [f32::NAN, -1.0, f32::INFINITY] {
                    let mut w = state.clone();
                    w[1] = Tensor::new(lr, &Device::Cpu).expect("t");
                    let e = t.a.set_weights(&w).expect_err(&what("lr"));
                    assert!(e.to_string().contains("learning_rate"), "{e}");
                    assert_same(&before, &snapshot(&t.a, &t.a_vars), &what("lr"));
                }
                for lr in [f64::NAN, -1.0, f64::INFINITY] {
                    let e = t.a.try_set_learning_rate(lr).expect_err(&what("try_set"));
                    assert!(e.to_string().contains("learning_rate"), "{e}");
                    assert_same(&before, &snapshot(&t.a, &t.a_vars), &what("try_set"));
                    candle_nn::Optimizer::set_learning_rate(&mut t.a, lr);
                    assert_same(&before, &snapshot(&t.a, &t.a_vars), &what("set_lr"));
                }
            } else {
                let e = t.a.try_set_learning_rate(0.5).expect_err(&what("schedule"));
                assert!(e.to_string().contains("not settable"), "{e}");
                assert_same(&before, &snapshot(&t.a, &t.a_vars), &what("schedule"));
            }

            let e = t.a.build(&[]).expect_err(&what("build"));
            assert!(e.to_string().contains("already built"), "{e}");
            assert_same(&before, &snapshot(&t.a, &t.a_vars), &what("build"));

            let e =
                t.a.exclude_from_weight_decay(&[], &["("])
                    .expect_err(&what("regex"));
            assert!(e.to_string().contains("var_names"), "{e}");
            assert_same(&before, &snapshot(&t.a, &t.a_vars), &what("regex"));

            let e =
                t.a.add_variable((2,), DType::F32, "extra")
                    .expect_err(&what("add"));
            assert!(e.to_string().contains("`extra`"), "{e}");
            assert_same(&before, &snapshot(&t.a, &t.a_vars), &what("add"));

            let stranger = var_from(&[1.0], &[1], DType::F32);
            let e =
                t.a.finalize_variable_values(&[&t.a_vars[0].1, &stranger])
                    .expect_err(&what("finalize"));
            assert!(e.to_string().contains("Unknown variable"), "{e}");
            assert_same(&before, &snapshot(&t.a, &t.a_vars), &what("finalize"));
            assert!(t.a.moving_average(&stranger).is_err());

            let e =
                t.a.update_step(
                    &Tensor::zeros((1,), DType::F32, &Device::Cpu).expect("t"),
                    &stranger,
                    0.1,
                )
                .expect_err(&what("update_step"));
            assert!(e.to_string().contains("Unknown variable"), "{e}");
            assert_same(&before, &snapshot(&t.a, &t.a_vars), &what("update_step"));

            // After all these errors, the exclusion and everything else still behave as before.
            t.step_both_and_compare(1, &what("after errors"));
        }
        // set_weights on an unbuilt optimizer.
        let mut opt = Adafactor::unbuilt(base(jit)).expect("unbuilt");
        let e = opt.set_weights(&[]).expect_err("unbuilt");
        assert!(e.to_string().contains("not yet been built"), "{e}");
        assert!(!opt.built());
    }
}

/// `update_step` follows the non-finite policy and validates its learning rate, like
/// `apply_gradients`.
#[test]
fn update_step_checks_its_input() {
    for jit in PATHS {
        let vars = model(DType::F32);
        let mut opt = Adafactor::new_named(vars.clone(), base(jit)).expect("build");
        let before = snapshot(&opt, &vars);
        let bias = &vars[1].1;
        let g = tensor(&[1.0, f32::NAN, 2.0], &[3], DType::F32);
        let e = opt
            .update_step(&g, bias, 0.1)
            .expect_err("a NaN gradient with on_nonfinite = error");
        assert!(e.to_string().contains("`bias`"), "{e}");
        assert_same(&before, &snapshot(&opt, &vars), "update_step NaN");
        let good = tensor(&[1.0, -1.0, 2.0], &[3], DType::F32);
        for lr in [f64::NAN, -0.1, f64::INFINITY] {
            let e = opt.update_step(&good, bias, lr).expect_err("bad lr");
            assert!(e.to_string().contains("learning_rate"), "{e}");
            assert_same(&before, &snapshot(&opt, &vars), "update_step lr");
        }
        let wrong = tensor(&[1.0, 2.0], &[2], DType::F32);
        let e = opt.update_step(&wrong, bias, 0.1).expect_err("shape");
        assert!(e.to_string().contains("`bias` has shape"), "{e}");
        assert_same(&before, &snapshot(&opt, &vars), "update_step shape");
        // And a good call changes the bias only.
        opt.update_step(&good, bias, 0.1).expect("good");
        let after = snapshot(&opt, &vars);
        assert_ne!(after.vars[1], before.vars[1]);
        assert_eq!(after.vars[0], before.vars[0]);
        assert_eq!(after.raw_iterations, 0);
    }
}

/// Variables added with `add_variable` before the first (building) call survive it.
#[test]
fn add_variable_before_build_survives_the_first_call() {
    for jit in PATHS {
        let vars = model(DType::F32);
        let mut opt = Adafactor::unbuilt(base(jit)).expect("unbuilt");
        let extra = opt.add_variable((2,), DType::F32, "extra").expect("extra");
        let renamed: Vec<(String, Var)> = vars
            .iter()
            .enumerate()
            .map(|(i, (_, v))| (format!("var{i}"), v.clone()))
            .collect();
        good_step(&mut opt, &renamed, 0);
        let names: Vec<String> = opt
            .variables()
            .expect("variables")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(
            names.iter().any(|n| n == "extra"),
            "jit_compile={jit}: `extra` was dropped by the first call: {names:?}"
        );
        // And set_weights still reaches it.
        let mut w: Vec<Tensor> = opt
            .variables()
            .expect("variables")
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let last = w.len() - 1;
        w[last] = tensor(&[3.0, 4.0], &[2], DType::F32);
        opt.set_weights(&w).expect("set_weights");
        assert_eq!(
            extra.as_tensor().to_vec1::<f32>().expect("extra"),
            [3.0, 4.0]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Config validation through the public API.

/// `from_config` passes on the core's errors, which name the argument (every case is in the
/// core's `tests/config_validation.rs`), and builds nothing.
#[test]
fn from_config_errors_name_the_argument() {
    use serde_json::json;
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (json!({"learning_rate": "0.1"}), "learning_rate"),
        (json!({"clipnorm": 1.0, "clipvalue": 0.5}), "clipvalue"),
        (json!({"beta_1": 0.9}), "beta_1"),
        (
            json!({"learning_rate": {"class_name": "Nope", "config": {}}}),
            "Nope",
        ),
    ];
    for (config, arg) in cases {
        match Adafactor::from_config(&config) {
            Ok(_) => panic!("{config} was accepted; expected an error naming `{arg}`"),
            Err(e) => assert!(
                e.to_string().contains(arg),
                "{config}: message `{e}` does not name `{arg}`"
            ),
        }
    }
}

/// Every constructor refuses a config the core's `validate` refuses (every case is in the
/// core's `tests/config_validation.rs`), with the argument named.
#[test]
fn constructors_validate() {
    let cases: Vec<(AdafactorConfig, &str)> = vec![
        (
            AdafactorConfig::with_learning_rate(f64::NAN),
            "learning_rate",
        ),
        (
            AdafactorConfig {
                epsilon_2: 1e39,
                ..Default::default()
            },
            "epsilon_2",
        ),
        (
            AdafactorConfig {
                gradient_accumulation_steps: Some(1),
                ..Default::default()
            },
            "gradient_accumulation_steps",
        ),
    ];
    for (cfg, arg) in cases {
        let var = var_from(&[1.0, 2.0], &[2], DType::F32);
        for e in [
            Adafactor::unbuilt(cfg.clone()).expect_err(arg),
            Adafactor::new_named(vec![("w".into(), var.clone())], cfg.clone()).expect_err(arg),
            <Adafactor as candle_nn::Optimizer>::new(vec![var.clone()], cfg.clone())
                .expect_err(arg),
        ] {
            assert!(e.to_string().contains(arg), "{arg}: message `{e}`");
        }
    }
}

/// The pairs are checked in parallel, but the error is the first bad pair's in the caller's
/// order, and pairs in another order than the optimizer's variables train the same bits.
#[test]
fn the_first_bad_pair_names_the_error_and_pair_order_does_not_matter() {
    for jit in PATHS {
        let cfg = base(jit);
        let mut t = twins(&cfg, DType::F32);
        good_step(&mut t.a, &t.a_vars, 0);
        good_step(&mut t.b, &t.b_vars, 0);
        // Pair 1 has a bad shape, pair 3 a bad dtype: the shape error is reported.
        let (mut g, v, expect) = bad_call(Bad::ShapeSameCount, &t.a_vars, 1, 1);
        let (n, var) = (t.a_vars[3].1.elem_count(), &t.a_vars[3].1);
        g[3] = Some(tensor(&values(n, 9), var.dims(), DType::F64));
        let before = snapshot(&t.a, &t.a_vars);
        let e =
            t.a.apply_gradients(&pairs(&g, &v))
                .expect_err("two bad pairs");
        assert!(
            e.to_string().contains(&expect),
            "jit={jit}: `{e}` lacks `{expect}`"
        );
        assert_same(&before, &snapshot(&t.a, &t.a_vars), &format!("jit={jit}"));
        // The same good step on `a` with its pairs reversed, on `b` in order.
        let mut g: Vec<Option<Tensor>> = grads(&t.a_vars, 1).into_iter().map(Some).collect();
        let mut v: Vec<Var> = t.a_vars.iter().map(|(_, v)| v.clone()).collect();
        g.reverse();
        v.reverse();
        t.a.apply_gradients(&pairs(&g, &v)).expect("reversed pairs");
        good_step(&mut t.b, &t.b_vars, 1);
        let what = format!("jit={jit}, reversed pairs");
        let (a, b) = (snapshot(&t.a, &t.a_vars), snapshot(&t.b, &t.b_vars));
        assert_same(&b, &a, &what);
    }
}
