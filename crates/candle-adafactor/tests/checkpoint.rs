//! Optimizer checkpoints: exact resume, and loads that must fail without changing anything.
//!
//! The resume tests train a small model on fixed data (the loss at step k is a fixed function of
//! k and the weights), stop after N steps, save the model weights and the optimizer state to
//! files, drop everything, rebuild both from the files and train M more steps. The result must
//! equal an uninterrupted N+M-step run bit for bit, on both data paths (`jit_compile` true and
//! false), with a schedule, EMA with overwrite, weight decay and gradient accumulation stopped
//! mid-cycle, and with a constant learning rate, clipping and a skipped non-finite step.

mod common;

use candle_adafactor::{
    Adafactor, AdafactorConfig, DataPath, LearningRateSchedule, OnNonFinite, StateDict,
    STATE_FORMAT, STATE_FORMAT_VERSION,
};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::PathBuf;

use common::PATHS;

/// The model: rank 2, 1, 0 and 3 variables.
fn initial_vars() -> Vec<(String, Var)> {
    let dev = Device::Cpu;
    let init = |shape: &[usize], k: f32| -> Var {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37 + k).sin()).collect();
        Var::from_vec(data, shape, &dev).expect("var")
    };
    vec![
        ("dense/kernel".to_string(), init(&[4, 3], 0.1)),
        ("dense/bias".to_string(), init(&[3], 0.2)),
        ("scale".to_string(), Var::new(1.0f32, &dev).expect("var")),
        ("conv/kernel".to_string(), init(&[2, 2, 3], 0.3)),
    ]
}

/// Fixed data for step `k`.
fn data(shape: &[usize], k: usize, phase: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f32) * 0.61 + (k as f32) * 0.7 + phase).sin())
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("data")
}

/// The loss at step `k`: a linear layer with a learned scale on fixed data, plus a rank-3 term.
fn loss(vars: &[(String, Var)], k: usize) -> Tensor {
    let v = |i: usize| vars[i].1.as_tensor();
    let x = data(&[5, 4], k, 0.0);
    let y = data(&[5, 3], k, 1.0);
    let z = data(&[2, 2, 3], k, 2.0);
    let pred = x
        .matmul(v(0))
        .and_then(|p| p.broadcast_add(v(1)))
        .and_then(|p| p.broadcast_mul(v(2)))
        .expect("forward");
    let l1 = (pred - y).and_then(|d| d.sqr()).and_then(|d| d.mean_all());
    let l2 = (v(3) * z)
        .and_then(|d| d.affine(1.0, -0.1))
        .and_then(|d| d.sqr())
        .and_then(|d| d.mean_all());
    (l1.expect("l1") + l2.expect("l2")).expect("loss")
}

/// Two configurations: (schedule, EMA with overwrite, weight decay, accumulation k = 3) and
/// (constant learning rate, clipnorm, skip non-finite steps).
fn configs(jit_compile: bool) -> Vec<(&'static str, AdafactorConfig)> {
    vec![
        (
            "schedule_ema_accumulation",
            AdafactorConfig {
                learning_rate: LearningRateSchedule::cosine_decay(0.1, 20.0, 0.1, None, 0.0)
                    .expect("schedule")
                    .into(),
                weight_decay: Some(0.01),
                use_ema: true,
                ema_momentum: 0.9,
                ema_overwrite_frequency: Some(3),
                gradient_accumulation_steps: Some(3),
                jit_compile,
                ..Default::default()
            },
        ),
        (
            "constant_clip_skip",
            AdafactorConfig {
                learning_rate: 0.05.into(),
                clipnorm: Some(0.5),
                on_nonfinite: OnNonFinite::Skip,
                jit_compile,
                ..Default::default()
            },
        ),
    ]
}

/// One training step `k`. With `on_nonfinite = "skip"`, step 4 is a non-finite gradient that
/// the optimizer skips (counted in `skipped_steps`). The extra variable counts steps.
fn train_step(opt: &mut Adafactor, vars: &[(String, Var)], extra: &Var, k: usize) {
    if opt.config().on_nonfinite == OnNonFinite::Skip && k == 4 {
        let nan = Tensor::new(f32::NAN, &Device::Cpu).expect("nan");
        let pairs: Vec<(Option<&Tensor>, &Var)> = vars
            .iter()
            .map(|(_, v)| (if v.rank() == 0 { Some(&nan) } else { None }, v))
            .collect();
        opt.apply_gradients(&pairs).expect("skipped step");
        return;
    }
    let refs: Vec<&Var> = vars.iter().map(|(_, v)| v).collect();
    opt.minimize(&loss(vars, k), &refs).expect("step");
    let next = (extra.as_tensor() + 1.0).expect("count");
    extra.set(&next).expect("set extra");
}

/// Every weight and every optimizer variable as raw bits.
fn fingerprint(vars: &[(String, Var)], opt: &Adafactor) -> Vec<(String, Vec<u64>)> {
    let mut out: Vec<(String, Vec<u64>)> = vars
        .iter()
        .map(|(n, v)| (format!("weight {n}"), common::tensor_bits(v.as_tensor())))
        .collect();
    for (n, t) in opt.variables().expect("variables") {
        out.push((format!("optimizer {n}"), common::tensor_bits(&t)));
    }
    out.push(("raw_iterations".into(), vec![opt.raw_iterations()]));
    out.push(("skipped_steps".into(), vec![opt.skipped_steps()]));
    out
}

fn temp_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "candle-adafactor-checkpoint-test-{}-{tag}.safetensors",
        std::process::id()
    ))
}

/// A model's variables, its optimizer and the optimizer's `add_variable` step counter.
type Training = (Vec<(String, Var)>, Adafactor, Var);

/// A fresh model and optimizer (with one `add_variable` counter).
fn fresh(cfg: &AdafactorConfig) -> Training {
    let vars = initial_vars();
    let mut opt = Adafactor::new_named(vars.clone(), cfg.clone()).expect("optimizer");
    let extra = opt
        .add_variable((), DType::F32, "steps_seen")
        .expect("add_variable");
    (vars, opt, extra)
}

/// Rebuilds the model from its weights file and the optimizer from its state file.
fn rebuild(weights: &PathBuf, state: &PathBuf, jit_compile: bool) -> candle_core::Result<Training> {
    let saved = candle_core::safetensors::load(weights, &Device::Cpu)?;
    let vars: Vec<(String, Var)> = initial_vars()
        .into_iter()
        .map(|(name, _)| {
            let t = saved
                .get(&name)
                .ok_or_else(|| candle_core::Error::Msg(format!("no weight {name}")))?;
            Ok((name, Var::from_tensor(t)?))
        })
        .collect::<candle_core::Result<_>>()?;
    let sd = StateDict::load(state)?;
    let mut cfg = sd.config()?;
    cfg.jit_compile = jit_compile;
    let mut opt = Adafactor::new_named(vars.clone(), cfg)?;
    let extra = opt.add_variable((), DType::F32, "steps_seen")?;
    opt.load_state_dict(&sd)?;
    Ok((vars, opt, extra))
}

/// Train N, save, drop, rebuild from files, train M: bit-identical to N+M uninterrupted, on both
/// paths. A resume that skips loading the optimizer state is shown to differ, so the comparison
/// can fail.
#[test]
fn resume_is_bit_exact() {
    const N: usize = 7; // not a multiple of k = 3: the accumulators are mid-cycle.
    const M: usize = 8;
    for jit in PATHS {
        for (label, cfg) in configs(jit) {
            let ctx = format!("{label}, jit_compile={jit}");

            let (vars, mut opt, extra) = fresh(&cfg);
            for k in 0..N + M {
                train_step(&mut opt, &vars, &extra, k);
            }
            let want = fingerprint(&vars, &opt);
            let path = opt.data_path();

            let weights = temp_path(&format!("{label}-{jit}-weights"));
            let state = temp_path(&format!("{label}-{jit}-state"));
            {
                let (vars, mut opt, extra) = fresh(&cfg);
                for k in 0..N {
                    train_step(&mut opt, &vars, &extra, k);
                }
                let map: HashMap<String, Tensor> = vars
                    .iter()
                    .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                    .collect();
                candle_core::safetensors::save(&map, &weights).expect("save weights");
                opt.save_state(&state).expect("save state");
                if label == "schedule_ema_accumulation" {
                    assert_eq!(opt.raw_iterations() % 3, 1, "{ctx}: not mid-cycle");
                } else {
                    assert_eq!(opt.skipped_steps(), 1, "{ctx}: no skipped step");
                }
            } // everything dropped

            let (vars, mut opt, extra) = rebuild(&weights, &state, jit).expect("rebuild");
            let want_path = if jit {
                DataPath::Fused
            } else {
                DataPath::Composed
            };
            assert_eq!(path, want_path, "{ctx}: data path");
            assert_eq!(opt.data_path(), path, "{ctx}: data path after resume");
            let saved_raw = StateDict::load(&state).expect("state").raw_iterations();
            assert_eq!(opt.raw_iterations(), saved_raw, "{ctx}");
            for k in N..N + M {
                train_step(&mut opt, &vars, &extra, k);
            }
            let got = fingerprint(&vars, &opt);
            assert_eq!(got.len(), want.len(), "{ctx}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g, w, "{ctx}: `{}` differs after resume", w.0);
            }

            // Control: the same weights with a fresh optimizer state do not give the same run.
            let saved = candle_core::safetensors::load(&weights, &Device::Cpu).expect("load");
            let vars: Vec<(String, Var)> = initial_vars()
                .into_iter()
                .map(|(n, _)| {
                    let v = Var::from_tensor(&saved[&n]).expect("var");
                    (n, v)
                })
                .collect();
            let mut opt = Adafactor::new_named(vars.clone(), cfg.clone()).expect("optimizer");
            let extra = opt
                .add_variable((), DType::F32, "steps_seen")
                .expect("add_variable");
            for k in N..N + M {
                train_step(&mut opt, &vars, &extra, k);
            }
            let control = fingerprint(&vars, &opt);
            let weights_differ = control
                .iter()
                .zip(&want)
                .any(|(c, w)| c.0.starts_with("weight") && c != w);
            assert!(weights_differ, "{ctx}: a resume without the state matched");

            std::fs::remove_file(&weights).ok();
            std::fs::remove_file(&state).ok();
        }
    }
}

/// The state survives bytes and files unchanged, and the dict shows what it holds.
#[test]
fn state_dict_round_trips() {
    let (_, cfg) = configs(false).remove(0);
    let (vars, mut opt, extra) = fresh(&cfg);
    for k in 0..5 {
        train_step(&mut opt, &vars, &extra, k);
    }
    let sd = opt.state_dict().expect("state_dict");
    assert_eq!(sd.format_version(), STATE_FORMAT_VERSION);
    assert_eq!(sd.raw_iterations(), 5);
    assert_eq!(sd.skipped_steps(), 0);
    assert_eq!(sd.keras_config().to_string(), opt.get_config().to_string());
    assert_eq!(sd.extra_variables(), ["steps_seen"]);
    assert_eq!(
        sd.variables()[3],
        ("conv/kernel".to_string(), vec![2, 2, 3])
    );
    let mut want_names: Vec<String> = opt
        .variables()
        .expect("variables")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    want_names.push("skipped_steps".into());
    assert_eq!(sd.names(), want_names);
    for (name, t) in opt.variables().expect("variables") {
        let stored = sd.tensor(&name).expect("tensor");
        assert_eq!(stored.dtype(), t.dtype(), "{name}");
        assert_eq!(stored.dims(), t.dims(), "{name}");
        let diff = stored
            .to_dtype(DType::F64)
            .and_then(|s| s.sub(&t.to_dtype(DType::F64)?))
            .and_then(|d| d.abs()?.flatten_all()?.max(0))
            .and_then(|m| m.to_scalar::<f64>())
            .unwrap_or(f64::NAN);
        assert_eq!(diff, 0.0, "{name}");
    }
    let bytes = sd.to_safetensors_bytes().expect("bytes");
    assert_eq!(StateDict::from_safetensors_bytes(&bytes).expect("read"), sd);
    let path = temp_path("round-trip");
    sd.save(&path).expect("save");
    assert_eq!(StateDict::load(&path).expect("load"), sd);
    std::fs::remove_file(&path).ok();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains(STATE_FORMAT), "format tag in the header");
}

/// The bytes of a state file with `from` replaced by `to` in its header (same length, so the
/// offsets stay valid).
fn edit_header(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).expect("utf-8 header");
    assert!(header.contains(from), "`{from}` not in header {header}");
    let mut out = bytes[..8].to_vec();
    out.extend(header.replacen(from, to, 1).as_bytes());
    out.extend(&bytes[8 + n..]);
    out
}

/// Every rejected load names the problem and leaves the optimizer exactly as it was.
#[test]
fn failed_loads_change_nothing() {
    for jit in PATHS {
        let (_, cfg) = configs(jit).remove(0);
        let (vars, mut source, extra) = fresh(&cfg);
        for k in 0..4 {
            train_step(&mut source, &vars, &extra, k);
        }
        let good = source.to_safetensors_bytes().expect("bytes");

        // The target: same variables and config, different state.
        let (tvars, mut target, textra) = fresh(&cfg);
        for k in 10..12 {
            train_step(&mut target, &tvars, &textra, k);
        }
        let before = fingerprint(&tvars, &target);
        let mut expect_refusal = |what: &str, bytes: &[u8], needles: &[&str]| {
            let e = target
                .load_safetensors_bytes(bytes)
                .expect_err(what)
                .to_string();
            for n in needles {
                assert!(e.contains(n), "{what}: `{e}` lacks `{n}`");
            }
            assert_eq!(
                fingerprint(&tvars, &target),
                before,
                "{what}: the optimizer changed"
            );
        };

        expect_refusal(
            "truncated",
            &good[..good.len() - 9],
            &["truncated or corrupt"],
        );
        expect_refusal("empty", &[], &["truncated or corrupt"]);
        let mut flipped = good.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x40;
        expect_refusal("a flipped data bit", &flipped, &["checksum mismatch"]);
        let mut garbled = good.clone();
        garbled[12] = b'#';
        expect_refusal("a garbled header", &garbled, &["truncated or corrupt"]);
        expect_refusal(
            "a future format version",
            &edit_header(
                &good,
                &format!("\"format_version\":\"{STATE_FORMAT_VERSION}\""),
                "\"format_version\":\"7\"",
            ),
            &["format version 7", "newer"],
        );
        expect_refusal(
            "another format",
            &edit_header(&good, STATE_FORMAT, &"x".repeat(STATE_FORMAT.len())),
            &["not a candle-adafactor optimizer checkpoint"],
        );
        expect_refusal(
            "a renamed tensor",
            &edit_header(&good, "\"scale/v\"", "\"scale/w\""),
            &["`scale/v` is missing"],
        );

        // A model weights file is not an optimizer checkpoint.
        let map: HashMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let wpath = temp_path(&format!("weights-not-state-{jit}"));
        candle_core::safetensors::save(&map, &wpath).expect("save");
        let e = target
            .load_state(&wpath)
            .expect_err("weights file")
            .to_string();
        assert!(
            e.contains("not a candle-adafactor optimizer checkpoint"),
            "{e}"
        );
        assert!(e.contains(&wpath.display().to_string()), "{e}");
        std::fs::remove_file(&wpath).ok();
        let e = target
            .load_state(temp_path("does-not-exist"))
            .expect_err("no file")
            .to_string();
        assert!(e.contains("cannot read the optimizer checkpoint"), "{e}");
        assert_eq!(fingerprint(&tvars, &target), before);

        // A different config: every differing key is named; `name` and jit_compile are not
        // compared.
        let other = |f: &dyn Fn(&mut AdafactorConfig)| -> Vec<u8> {
            let mut c = cfg.clone();
            f(&mut c);
            let (v, mut o, x) = fresh(&c);
            train_step(&mut o, &v, &x, 0);
            o.to_safetensors_bytes().expect("bytes")
        };
        let mut expect_refusal = |what: &str, bytes: &[u8], needles: &[&str]| {
            let e = target
                .load_safetensors_bytes(bytes)
                .expect_err(what)
                .to_string();
            for n in needles {
                assert!(e.contains(n), "{what}: `{e}` lacks `{n}`");
            }
            assert_eq!(fingerprint(&tvars, &target), before, "{what}");
        };
        expect_refusal(
            "another config",
            &other(&|c| {
                c.ema_momentum = 0.8;
                c.weight_decay = None;
            }),
            &[
                "config differs",
                "`ema_momentum` is 0.8",
                "`weight_decay` is null",
            ],
        );

        // Different variables.
        let with_vars = |vs: Vec<(String, Var)>| -> Vec<u8> {
            let mut o = Adafactor::new_named(vs, cfg.clone()).expect("optimizer");
            o.add_variable((), DType::F32, "steps_seen").expect("extra");
            o.to_safetensors_bytes().expect("bytes")
        };
        let mut fewer = initial_vars();
        fewer.remove(1);
        fewer.push((
            "head".into(),
            Var::zeros(3, DType::F32, &Device::Cpu).expect("v"),
        ));
        expect_refusal(
            "missing and unknown variables",
            &with_vars(fewer),
            &[
                "missing from the checkpoint: [\"dense/bias\"]",
                "not built with: [\"head\"]",
            ],
        );
        let mut reshaped = initial_vars();
        reshaped[0].1 = Var::zeros((3, 4), DType::F32, &Device::Cpu).expect("v");
        expect_refusal(
            "a reshaped variable",
            &with_vars(reshaped),
            &["`dense/kernel` has shape [3, 4] in the checkpoint but [4, 3]"],
        );
        let mut o = Adafactor::new_named(initial_vars(), cfg.clone()).expect("optimizer");
        o.add_variable(2, DType::F32, "steps_seen").expect("extra");
        expect_refusal(
            "a reshaped extra variable",
            &o.to_safetensors_bytes().expect("bytes"),
            &["`steps_seen`", "[2]"],
        );
        let o = Adafactor::new_named(initial_vars(), cfg.clone()).expect("optimizer");
        expect_refusal(
            "a missing extra variable",
            &o.to_safetensors_bytes().expect("bytes"),
            &["add_variable variables [], the optimizer [\"steps_seen\"]"],
        );

        // The control: the good bytes load, and jit_compile and name may differ.
        let mut c = cfg.clone();
        c.jit_compile = !jit;
        c.name = "renamed".into();
        let (v2, mut o2, x2) = fresh(&c);
        train_step(&mut o2, &v2, &x2, 0);
        target
            .load_safetensors_bytes(&o2.to_safetensors_bytes().expect("bytes"))
            .expect("jit_compile and name may differ");
        target.load_safetensors_bytes(&good).expect("good bytes");
        assert_eq!(target.raw_iterations(), 4);
        assert_ne!(fingerprint(&tvars, &target), before);
    }
}

/// An unbuilt optimizer has no state to save or load into; the error says to build it.
#[test]
fn unbuilt_optimizer_is_refused() {
    let (_, cfg) = configs(true).remove(1);
    let (vars, mut opt, extra) = fresh(&cfg);
    train_step(&mut opt, &vars, &extra, 0);
    let bytes = opt.to_safetensors_bytes().expect("bytes");

    let mut unbuilt = Adafactor::unbuilt(cfg.clone()).expect("unbuilt");
    let e = unbuilt.state_dict().expect_err("save unbuilt").to_string();
    assert!(e.contains("not built"), "{e}");
    let e = unbuilt
        .load_safetensors_bytes(&bytes)
        .expect_err("load into unbuilt")
        .to_string();
    assert!(e.contains("not built") && e.contains("new_named"), "{e}");
    assert!(!unbuilt.built());
    assert_eq!(unbuilt.raw_iterations(), 0);
}

/// A load makes its own copy: training after it changes neither the dict nor a second optimizer
/// loaded from the same dict.
#[test]
fn loaded_state_is_not_shared() {
    let (_, cfg) = configs(false).remove(0);
    let (vars, mut opt, extra) = fresh(&cfg);
    for k in 0..4 {
        train_step(&mut opt, &vars, &extra, k);
    }
    let sd = opt.state_dict().expect("state");
    let copy = sd.clone();
    let (v1, mut o1, x1) = fresh(&cfg);
    o1.load_state_dict(&sd).expect("load");
    let (v2, mut o2, _) = fresh(&cfg);
    o2.load_state_dict(&sd).expect("load");
    let o2_before = fingerprint(&v2, &o2);
    for k in 4..8 {
        train_step(&mut o1, &v1, &x1, k);
    }
    assert_eq!(sd, copy);
    assert_eq!(fingerprint(&v2, &o2), o2_before);
}

/// The checkpoint files in `tests/fixtures`, written by format version 1 as first released
/// (metadata in hash-map order, FNV-1a checksum): each holds the state after five fused steps of
/// [`fresh`] and [`train_step`] with one of [`configs`].
fn v1_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("state-v1-fnv-{name}.safetensors"))
}

/// Checkpoints written by the first version-1 writer still load, into exactly the state that
/// five steps make today (and a changed byte in one of them is still caught by its checksum).
#[test]
fn first_version_1_checkpoints_still_load() {
    for (name, cfg) in configs(true) {
        let (vars, mut trained, extra) = fresh(&cfg);
        for k in 0..5 {
            train_step(&mut trained, &vars, &extra, k);
        }
        let (_, mut loaded, _) = fresh(&cfg);
        let path = v1_fixture(name);
        loaded
            .load_state(&path)
            .expect("a version-1 checkpoint loads");
        let state = |opt: &Adafactor| fingerprint(&[], opt);
        assert_eq!(state(&loaded), state(&trained), "{name}");
        assert_ne!(
            state(&loaded),
            state(&fresh(&cfg).1),
            "{name}: the state is not empty"
        );

        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let e = StateDict::from_safetensors_bytes(&bytes).expect_err("damaged");
        assert!(e.to_string().contains("checksum"), "{name}: {e}");
    }
}

/// One state saved twice (by two optimizers in the same state) gives the same bytes, and a
/// different state different bytes: checkpoints can be hashed and compared as files.
#[test]
fn saving_one_state_twice_gives_the_same_bytes() {
    for (name, cfg) in configs(true) {
        let run = || {
            let (vars, mut opt, extra) = fresh(&cfg);
            for k in 0..4 {
                train_step(&mut opt, &vars, &extra, k);
            }
            opt
        };
        let (a, b) = (run(), run());
        let bytes = a.to_safetensors_bytes().expect("bytes");
        assert_eq!(bytes, a.to_safetensors_bytes().expect("again"), "{name}");
        assert_eq!(bytes, b.to_safetensors_bytes().expect("twin"), "{name}");
        assert_ne!(
            bytes,
            fresh(&cfg).1.to_safetensors_bytes().expect("fresh"),
            "{name}"
        );
        let sd = StateDict::from_safetensors_bytes(&bytes).expect("loads");
        assert_eq!(
            sd.to_safetensors_bytes().expect("round trip"),
            bytes,
            "{name}"
        );
    }
}
