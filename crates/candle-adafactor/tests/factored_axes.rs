//! Variables factored over other axes than their last two (`factored_axes`): the fused strided
//! kernels against the composed path on random shapes, axis pairs and configs (f32, bf16, f16
//! weights); the config key's round trip; checkpoints that record the axes and refuse a
//! mismatch, naming the variable; errors for bad axes that change nothing.
//!
//! Bounds as in `fused_vs_composed`: `1e-6 + (1e-5 + steps * ulp) |b|` with `|b|` the largest
//! magnitude the weight has had on either path, `ulp` one unit of a 16-bit weight type.

mod common;

use candle_adafactor::{Adafactor, AdafactorConfig, DataPath, FactoredAxes};
use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
struct Case {
    /// Shapes with the axes each is factored over.
    vars: Vec<(Vec<usize>, FactoredAxes)>,
    config: AdafactorConfig,
    scale: f64,
    seed: u64,
    steps: usize,
}

/// A shape of rank 2 to 5 and two different axes of it (the last two included, which is the
/// default and must behave as such).
fn var() -> impl Strategy<Value = (Vec<usize>, FactoredAxes)> {
    prop_oneof![
        (1usize..40, 1usize..40).prop_map(|(a, b)| vec![a, b]),
        (1usize..12, 1usize..12, 1usize..10).prop_map(|(a, b, c)| vec![a, b, c]),
        // Convolution-like: [out, in, kh, kw].
        (1usize..24, 1usize..24, 1usize..4, 1usize..4).prop_map(|(o, i, h, w)| vec![o, i, h, w]),
        (1usize..5, 1usize..6, 1usize..5, 1usize..6, 1usize..4)
            .prop_map(|(a, b, c, d, e)| vec![a, b, c, d, e]),
    ]
    .prop_flat_map(|shape| {
        let rank = shape.len();
        (Just(shape), 0..rank, 1..rank).prop_map(move |(s, row, off)| {
            let col = (row + off) % rank;
            (s, FactoredAxes { row, col })
        })
    })
}

fn config() -> impl Strategy<Value = AdafactorConfig> {
    (
        0u8..4,
        prop::option::of(Just(0.1)),
        any::<bool>(),
        prop::option::of(2u64..4),
        prop::option::of(Just(128.0)),
    )
        .prop_map(|(clip, wd, ema, accumulate, lsf)| AdafactorConfig {
            learning_rate: 0.01.into(),
            clipnorm: (clip == 1).then_some(0.5),
            clipvalue: (clip == 2).then_some(0.01),
            global_clipnorm: (clip == 3).then_some(1.0),
            weight_decay: wd,
            use_ema: ema,
            ema_momentum: 0.9,
            gradient_accumulation_steps: accumulate,
            loss_scale_factor: lsf,
            ..Default::default()
        })
}

fn case(max_scale_exp: i32) -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(var(), 1..4),
        config(),
        -10i32..=max_scale_exp,
        any::<u64>(),
        1usize..4,
    )
        .prop_map(|(vars, config, e, seed, steps)| Case {
            vars,
            config,
            scale: 10f64.powi(e),
            seed,
            steps,
        })
}

/// Deterministic values in [-1, 1).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn named_vars(c: &Case, dtype: DType) -> Vec<(String, Var)> {
    c.vars
        .iter()
        .enumerate()
        .map(|(i, (s, _))| {
            let n = s.iter().product();
            let t = Tensor::from_vec(values(c.seed + i as u64, n), s.clone(), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            (format!("w{i}"), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

fn axes_of(c: &Case) -> BTreeMap<String, FactoredAxes> {
    c.vars
        .iter()
        .enumerate()
        .map(|(i, (_, a))| (format!("w{i}"), *a))
        .collect()
}

/// The initial weights, then every weight after every step, on one path.
fn run(c: &Case, dtype: DType, jit_compile: bool) -> Vec<Vec<f32>> {
    let vars = named_vars(c, dtype);
    let config = AdafactorConfig {
        jit_compile,
        factored_axes: axes_of(c),
        ..c.config.clone()
    };
    let mut opt = Adafactor::new_named(vars.clone(), config).unwrap();
    let flat = |v: &Var| -> Vec<f32> {
        v.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut out: Vec<Vec<f32>> = vars.iter().map(|(_, v)| flat(v)).collect();
    for step in 0..c.steps {
        let grads: Vec<Tensor> = vars
            .iter()
            .enumerate()
            .map(|(i, (_, v))| {
                let g: Vec<f32> = values(c.seed * 31 + (step * 7 + i) as u64, v.elem_count())
                    .into_iter()
                    .map(|x| (x as f64 * c.scale) as f32)
                    .collect();
                Tensor::from_vec(g, v.shape(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            })
            .collect();
        let pairs: Vec<(Option<&Tensor>, &Var)> = grads
            .iter()
            .map(Some)
            .zip(vars.iter().map(|(_, v)| v))
            .collect();
        opt.apply_gradients(&pairs).unwrap();
        common::assert_path(&opt, jit_compile, "factored axes");
        out.extend(vars.iter().map(|(_, v)| flat(v)));
    }
    out
}

fn check(c: &Case, dtype: DType, ulp: f64) -> Result<(), TestCaseError> {
    let nvars = c.vars.len();
    let fused = run(c, dtype, true);
    let composed = run(c, dtype, false);
    let (initial, fused) = fused.split_at(nvars);
    let mut largest: Vec<Vec<f64>> = initial
        .iter()
        .map(|v| v.iter().map(|x| (*x as f64).abs()).collect())
        .collect();
    for (k, (a, b)) in fused.iter().zip(&composed[nvars..]).enumerate() {
        let past = &mut largest[k % nvars];
        let steps = (k / nvars + 1) as f64;
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let (x, y) = (*x as f64, *y as f64);
            let same = (x.is_nan() && y.is_nan()) || x == y;
            let scale = x.abs().max(y.abs()).max(past[i]);
            past[i] = scale;
            let bound = 1e-6 + (1e-5 + steps * ulp) * scale;
            prop_assert!(
                same || (x - y).abs() <= bound,
                "{dtype:?} weight {} {:?} after step {}, index {i}: fused {x}, composed {y}",
                k % nvars,
                c.vars[k % nvars],
                k / nvars + 1
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    #[test]
    fn strided_fused_matches_composed_f32(c in case(10)) {
        check(&c, DType::F32, 0.0)?;
    }

    #[test]
    fn strided_fused_matches_composed_bf16(c in case(10)) {
        check(&c, DType::BF16, 2f64.powi(-7))?;
    }

    #[test]
    fn strided_fused_matches_composed_f16(c in case(3)) {
        check(&c, DType::F16, 2f64.powi(-10))?;
    }
}

/// A large convolution kernel, so that the fused kernels split it across threads.
#[test]
fn large_convolution_both_paths_agree() {
    let c = Case {
        vars: vec![(vec![256, 128, 3, 3], FactoredAxes::CONVOLUTION)],
        config: AdafactorConfig {
            learning_rate: 0.01.into(),
            global_clipnorm: Some(1.0),
            ..Default::default()
        },
        scale: 1.0,
        seed: 5,
        steps: 2,
    };
    check(&c, DType::F32, 0.0).expect("fused and composed agree");
}

fn conv_opt(config: AdafactorConfig) -> (Adafactor, Var, Var) {
    let dev = Device::Cpu;
    let k = Var::from_tensor(&Tensor::from_vec(values(1, 6 * 4 * 9), (6, 4, 3, 3), &dev).unwrap())
        .unwrap();
    let b = Var::from_tensor(&Tensor::from_vec(values(2, 6), 6, &dev).unwrap()).unwrap();
    let opt = Adafactor::new_named(
        vec![("k".into(), k.clone()), ("b".into(), b.clone())],
        config,
    )
    .unwrap();
    (opt, k, b)
}

fn step(opt: &mut Adafactor, k: &Var, b: &Var, seed: u64) {
    let gk = Tensor::from_vec(values(seed, k.elem_count()), k.shape(), &Device::Cpu).unwrap();
    let gb = Tensor::from_vec(values(seed + 1, 6), 6, &Device::Cpu).unwrap();
    opt.apply_gradients(&[(Some(&gk), k), (Some(&gb), b)])
        .unwrap();
}

#[test]
fn config_key_round_trips_and_is_written_only_when_set() {
    let (mut opt, _, _) = conv_opt(AdafactorConfig::default());
    assert!(opt.get_config().get("factored_axes").is_none());
    assert_eq!(opt.factor_convolutions().unwrap(), ["k"]);
    let cfg = opt.get_config();
    assert_eq!(cfg["factored_axes"], serde_json::json!({"k": [1, 0]}));
    let back = Adafactor::from_config(&cfg).unwrap();
    assert_eq!(back.config().factored_axes, opt.config().factored_axes);
    assert_eq!(back.get_config(), cfg);
    // Malformed values are refused with the key's name.
    for bad in [
        serde_json::json!({"factored_axes": {"k": [1]}}),
        serde_json::json!({"factored_axes": {"k": [1, -1]}}),
        serde_json::json!({"factored_axes": [1, 0]}),
        serde_json::json!({"factored_axes": {"k": [2, 2]}}),
    ] {
        let e = Adafactor::from_config(&bad).unwrap_err().to_string();
        assert!(e.contains("factored_axes"), "{e}");
    }
}

#[test]
fn bad_axes_are_refused_naming_variable_and_value() {
    let dev = Device::Cpu;
    let k = Var::zeros((6, 4, 3, 3), DType::F32, &dev).unwrap();
    let with = |axes: &[(&str, usize, usize)]| AdafactorConfig {
        factored_axes: axes
            .iter()
            .map(|(n, row, col)| {
                (
                    n.to_string(),
                    FactoredAxes {
                        row: *row,
                        col: *col,
                    },
                )
            })
            .collect(),
        ..Default::default()
    };
    let build = |cfg| {
        Adafactor::new_named(vec![("k".into(), k.clone())], cfg)
            .unwrap_err()
            .to_string()
    };
    let e = build(with(&[("q", 1, 0)]));
    assert!(e.contains("`q`") && e.contains("no variable"), "{e}");
    let e = build(with(&[("k", 1, 4)]));
    assert!(
        e.contains("`k`") && e.contains("[1, 4]") && e.contains("rank 4"),
        "{e}"
    );
    let e = build(with(&[("k", 3, 3)]));
    assert!(e.contains("`k`") && e.contains("[3, 3]"), "{e}");
    // On a built optimizer: refused, and nothing changes.
    let (mut opt, kv, bv) = conv_opt(AdafactorConfig::default());
    let before = (
        opt.get_config(),
        opt.variables().unwrap().len(),
        opt.state_bytes(),
    );
    let e = opt
        .set_factored_axes("k", Some(FactoredAxes { row: 0, col: 7 }))
        .unwrap_err();
    assert!(e.to_string().contains("`k`"), "{e}");
    let e = opt
        .set_factored_axes("b", Some(FactoredAxes::CONVOLUTION))
        .unwrap_err();
    assert!(e.to_string().contains("`b`"), "{e}");
    let e = opt
        .set_factored_axes("nope", Some(FactoredAxes::CONVOLUTION))
        .unwrap_err();
    assert!(e.to_string().contains("`nope`"), "{e}");
    let after = (
        opt.get_config(),
        opt.variables().unwrap().len(),
        opt.state_bytes(),
    );
    assert_eq!(before, after);
    // After a step the axes can no longer change (the statistics would be lost).
    step(&mut opt, &kv, &bv, 3);
    let state: Vec<Vec<f32>> = opt
        .variables()
        .unwrap()
        .iter()
        .map(|(_, t)| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    assert!(opt.factor_convolutions().is_err());
    let again: Vec<Vec<f32>> = opt
        .variables()
        .unwrap()
        .iter()
        .map(|(_, t)| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    assert_eq!(state, again);
    assert!(opt.get_config().get("factored_axes").is_none());
}

#[test]
fn checkpoints_record_axes_and_refuse_a_mismatch() {
    let (mut saved, k, b) = conv_opt(AdafactorConfig::default());
    saved.factor_convolutions().unwrap();
    step(&mut saved, &k, &b, 7);
    let bytes = saved.state_dict().unwrap().to_safetensors_bytes().unwrap();

    // Same axes: loads, and the next step matches the original's.
    let (mut same, k2, b2) = conv_opt(AdafactorConfig::default());
    same.factor_convolutions().unwrap();
    k2.set(k.as_tensor()).unwrap();
    b2.set(b.as_tensor()).unwrap();
    same.load_safetensors_bytes(&bytes).unwrap();
    step(&mut saved, &k, &b, 9);
    step(&mut same, &k2, &b2, 9);
    assert_eq!(
        common::tensor_bits(k.as_tensor()),
        common::tensor_bits(k2.as_tensor())
    );

    // Default axes: refused naming the variable; nothing changes.
    let (mut other, _, _) = conv_opt(AdafactorConfig::default());
    let before = other.state_bytes();
    let e = other
        .load_safetensors_bytes(&bytes)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`k`") && e.contains("[1, 0]"), "{e}");
    assert_eq!(other.state_bytes(), before);
    assert!(other.get_config().get("factored_axes").is_none());

    // A checkpoint without the key (written before it existed, or with the default axes)
    // loads as the default and is refused by an optimizer with other axes.
    let (plain, _, _) = conv_opt(AdafactorConfig::default());
    let old = plain.state_dict().unwrap().to_safetensors_bytes().unwrap();
    let (mut fresh, _, _) = conv_opt(AdafactorConfig::default());
    fresh.load_safetensors_bytes(&old).unwrap();
    fresh.factor_convolutions().unwrap();
    let e = fresh.load_safetensors_bytes(&old).unwrap_err().to_string();
    assert!(e.contains("`k`") && e.contains("default"), "{e}");
}

#[test]
fn helper_shrinks_state_and_runs_fused() {
    let (mut opt, k, b) = conv_opt(AdafactorConfig::default());
    let before = opt.state_bytes();
    opt.factor_convolutions().unwrap();
    // r [3, 3, 4] and c [3, 3, 6] instead of r [6, 4, 3] and c [6, 4, 3]; v of the bias.
    assert_eq!(opt.state_bytes(), 4 * (9 * (4 + 6) + 6));
    assert_eq!(before, 4 * (2 * 72 + 6));
    step(&mut opt, &k, &b, 11);
    assert_eq!(opt.data_path(), DataPath::Fused);
}

/// Keras's own layout of a factored convolution: `r` `[kh, kw, in]`, `c` `[kh, kw, out]` and the
/// velocity `[kh, kw, in, out]`; exported and imported back, the state is the same.
#[test]
fn keras_weights_of_a_factored_convolution_round_trip() {
    let (mut opt, k, b) = conv_opt(AdafactorConfig::default());
    opt.factor_convolutions().unwrap();
    step(&mut opt, &k, &b, 13);
    let exported = opt.keras_variables().unwrap();
    let shapes: Vec<(&str, Vec<usize>)> = exported
        .iter()
        .map(|(n, t)| (n.as_str(), t.dims().to_vec()))
        .collect();
    assert_eq!(shapes[2], ("adafactor/k", vec![3, 3, 4]));
    assert_eq!(shapes[3], ("adafactor/k", vec![3, 3, 6]));
    assert_eq!(shapes[4], ("adafactor/k_velocity", vec![3, 3, 4, 6]));
    let (mut back, _, _) = conv_opt(AdafactorConfig::default());
    back.factor_convolutions().unwrap();
    let tensors: Vec<Tensor> = exported.iter().map(|(_, t)| t.clone()).collect();
    back.set_keras_weights(&tensors).unwrap();
    let bits = |o: &Adafactor| -> Vec<Vec<u64>> {
        o.variables()
            .unwrap()
            .iter()
            .map(|(_, t)| common::tensor_bits(t))
            .collect()
    };
    assert_eq!(bits(&back), bits(&opt));
    // A velocity that is not r_i c_j / mean(r) of its matrix is refused, naming the variable.
    let mut bad = tensors.clone();
    bad[4] = (bad[4].clone() * 2.0).unwrap();
    let e = back.set_keras_weights(&bad).unwrap_err().to_string();
    assert!(e.contains("`k`"), "{e}");
}
