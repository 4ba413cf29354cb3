//! Property tests: the fused kernels agree with the composed candle ops (the readable reference)
//! on random shapes of every family the fused path has a kernel for (rank 0 to 4, 1xN and Nx1,
//! batches of tiny matrices as in convolution kernels `[out, in, kh, kw]`, short rows `n x 4`,
//! few rows `4 x n`), random configs and gradient scales from 1e-20 to 1e20, for f32, bf16 and
//! f16 weights; and each family at sizes that split across threads, under every configuration
//! of `common::configs`.
//!
//! Bounds: the Keras conformance tolerance `1e-6 + 1e-5 |b|`, with `|b|` the largest magnitude
//! the weight has had so far on either path: a step that moves a weight from 0.05 to 0.005 keeps
//! the absolute rounding difference the two paths' sums had at 0.05. For 16-bit weights both
//! paths compute in f32 and round once, so they may also differ by the rounding of nearly equal
//! f32 values: one unit in the last place of the 16-bit type per step taken, at that same
//! magnitude: `2^-7` (bf16) or `2^-10` (f16) relative.

mod common;

use candle_adafactor::{Adafactor, AdafactorConfig, DataPath, LearningRateSchedule};
use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    shapes: Vec<Vec<usize>>,
    config: AdafactorConfig,
    scale: f64,
    seed: u64,
    steps: usize,
}

fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(vec![]),
        (1usize..3000).prop_map(|n| vec![n]),
        (1usize..60, 1usize..60).prop_map(|(n, m)| vec![n, m]),
        (1usize..2000).prop_map(|m| vec![1, m]),
        (1usize..2000).prop_map(|n| vec![n, 1]),
        (1usize..5, 1usize..12, 1usize..12).prop_map(|(a, n, m)| vec![a, n, m]),
        (1usize..3, 1usize..4, 1usize..8, 1usize..8).prop_map(|(a, b, n, m)| vec![a, b, n, m]),
        // Batches of tiny matrices: convolution kernels `[out, in, k, k]` and others.
        (
            1usize..24,
            1usize..24,
            prop_oneof![Just(1usize), Just(3), Just(5)]
        )
            .prop_map(|(o, i, k)| vec![o, i, k, k]),
        (1usize..300, 1usize..9, 1usize..9).prop_map(|(l, n, m)| vec![l, n, m]),
        // Short rows and few rows.
        (65usize..2000, 1usize..17).prop_map(|(n, m)| vec![n, m]),
        (1usize..65, 17usize..1500).prop_map(|(n, m)| vec![n, m]),
        (1usize..4, 5usize..40, 17usize..200).prop_map(|(l, n, m)| vec![l, n, m]),
    ]
}

fn config() -> impl Strategy<Value = AdafactorConfig> {
    (
        prop_oneof![Just(1e-3), Just(1e-2), Just(0.1)],
        any::<bool>(),
        0u8..4,
        prop::option::of(prop_oneof![Just(1e-3), Just(0.1)]),
        any::<bool>(),
        prop::option::of(2u64..4),
        prop::option::of(prop_oneof![Just(0.5), Just(128.0)]),
    )
        .prop_map(|(lr, schedule, clip, wd, ema, accumulate, lsf)| {
            let learning_rate = if schedule {
                LearningRateSchedule::cosine_decay(lr, 5.0, 0.1, None, 0.0)
                    .expect("a valid schedule")
                    .into()
            } else {
                lr.into()
            };
            AdafactorConfig {
                learning_rate,
                clipnorm: (clip == 1).then_some(0.5),
                clipvalue: (clip == 2).then_some(0.01),
                global_clipnorm: (clip == 3).then_some(1.0),
                weight_decay: wd,
                use_ema: ema,
                ema_momentum: 0.9,
                ema_overwrite_frequency: ema.then_some(2),
                gradient_accumulation_steps: accumulate,
                loss_scale_factor: lsf,
                ..Default::default()
            }
        })
}

fn case(max_scale_exp: i32) -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(shape(), 1..4),
        config(),
        -20i32..=max_scale_exp,
        any::<u64>(),
        1usize..4,
    )
        .prop_map(move |(shapes, config, e, seed, steps)| Case {
            shapes,
            config,
            scale: 10f64.powi(e.min(max_scale_exp)),
            seed,
            steps,
        })
}

/// A small deterministic generator of values in [-1, 1).
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

/// Runs the case on one path; returns the initial weights, then every weight after every step.
fn run(c: &Case, dtype: DType, jit_compile: bool) -> candle_core::Result<Vec<Vec<f32>>> {
    let dev = Device::Cpu;
    let vars: Vec<(String, Var)> = c
        .shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = s.iter().product();
            let t =
                Tensor::from_vec(values(c.seed + i as u64, n), s.clone(), &dev)?.to_dtype(dtype)?;
            Ok((format!("w{i}"), Var::from_tensor(&t)?))
        })
        .collect::<candle_core::Result<_>>()?;
    let config = AdafactorConfig {
        jit_compile,
        ..c.config.clone()
    };
    let mut opt = Adafactor::new_named(vars.clone(), config)?;
    let want = if jit_compile {
        DataPath::Fused
    } else {
        DataPath::Composed
    };
    assert_eq!(opt.data_path(), want);
    let mut out = Vec::new();
    for (_, v) in &vars {
        out.push(v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    for step in 0..c.steps {
        let grads: Vec<Tensor> = vars
            .iter()
            .enumerate()
            .map(|(i, (_, v))| {
                let g: Vec<f32> = values(c.seed * 31 + (step * 7 + i) as u64, v.elem_count())
                    .into_iter()
                    .map(|x| (x as f64 * c.scale) as f32)
                    .collect();
                Tensor::from_vec(g, v.shape(), &dev)?.to_dtype(dtype)
            })
            .collect::<candle_core::Result<_>>()?;
        let pairs: Vec<(Option<&Tensor>, &Var)> = grads
            .iter()
            .map(Some)
            .zip(vars.iter().map(|(_, v)| v))
            .collect();
        opt.apply_gradients(&pairs)?;
        for (_, v) in &vars {
            out.push(v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    Ok(out)
}

fn check(c: &Case, dtype: DType, ulp: f64) -> Result<(), TestCaseError> {
    let fused = run(c, dtype, true).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let composed = run(c, dtype, false).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let nvars = c.shapes.len();
    let (initial, fused) = fused.split_at(nvars);
    let composed = &composed[nvars..];
    // The largest magnitude each weight has had so far, on either path.
    let mut largest: Vec<Vec<f64>> = initial
        .iter()
        .map(|v| v.iter().map(|x| (*x as f64).abs()).collect())
        .collect();
    for (k, (a, b)) in fused.iter().zip(composed).enumerate() {
        let past = &mut largest[k % nvars];
        let steps = (k / nvars + 1) as f64;
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let (x, y) = (*x as f64, *y as f64);
            let same = (x.is_nan() && y.is_nan()) || x == y;
            let scale = x.abs().max(y.abs()).max(past[i]);
            // NaN-safe running maximum (`f64::max` ignores a NaN operand).
            past[i] = scale;
            let bound = 1e-6 + (1e-5 + steps * ulp) * scale;
            prop_assert!(
                same || (x - y).abs() <= bound,
                "{dtype:?} weight {} after step {}, index {i}: fused {x}, composed {y}",
                k % nvars,
                k / nvars + 1
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn fused_matches_composed_f32(c in case(20)) {
        check(&c, DType::F32, 0.0)?;
    }

    #[test]
    fn fused_matches_composed_bf16(c in case(20)) {
        check(&c, DType::BF16, 2f64.powi(-7))?;
    }

    #[test]
    fn fused_matches_composed_f16(c in case(3)) {
        check(&c, DType::F16, 2f64.powi(-10))?;
    }
}

/// A case the property test found: an f16 weight that one step moves from about 0.05 to 0.0035
/// keeps the one-unit rounding difference it got at 0.05.
#[test]
fn f16_column_with_clipvalue() {
    let c = Case {
        shapes: vec![vec![], vec![1124, 1]],
        config: AdafactorConfig {
            learning_rate: 0.1.into(),
            clipvalue: Some(0.01),
            ..Default::default()
        },
        scale: 1.0,
        seed: 17142993718006289523,
        steps: 2,
    };
    check(&c, DType::F16, 2f64.powi(-10)).expect("fused and composed agree");
}

/// A case the property test found: gradients near 2e19 (after unscaling by
/// `loss_scale_factor` 0.5) square past float32's range, so a row statistic becomes `inf`.
/// Element by element RMS(u) is then NaN (that row's `sqrt(mean(r) / r_i)` is `inf / inf`),
/// which the update clipping's `max(1, RMS(u))` ignores; the fused kernels' folded `sum(u^2)`
/// was `inf` instead, clipping every update of the matrix to NaN or zero.
#[test]
fn overflowed_statistics_clip_as_composed() {
    let c = Case {
        shapes: vec![vec![], vec![1, 1, 2, 4]],
        config: AdafactorConfig {
            learning_rate: 0.001.into(),
            loss_scale_factor: Some(0.5),
            ..Default::default()
        },
        scale: 1e19,
        seed: 11011535601897498325,
        steps: 3,
    };
    check(&c, DType::F32, 0.0).expect("fused and composed agree");
    check(&c, DType::BF16, 2f64.powi(-7)).expect("fused and composed agree");
}

/// Every shape family at sizes the fused kernels split across threads, under every
/// configuration that keeps state (`common::configs`), for float32 and bfloat16 weights.
///
/// Gradients are in [-0.1, 0.1): the composed path sums `mean(r)` over up to 70,000 rows in
/// float32 (the fused kernels in f64), and where most squares are the same value (gradients
/// clamped by `clipvalue`) its rounding adds up past the conformance tolerance.
#[test]
fn every_shape_family_at_parallel_sizes() {
    let shapes: Vec<Vec<usize>> = vec![
        vec![70_000],
        vec![70_000, 1],
        vec![1, 70_000],
        vec![17_000, 4],
        vec![4, 17_000],
        vec![48, 1500],
        vec![8_000, 3, 3],
        vec![70_000, 1, 1],
        vec![60, 80, 3, 3],
        vec![3, 40, 600],
    ];
    for (name, config) in common::configs(true) {
        for shape in &shapes {
            let c = Case {
                shapes: vec![shape.clone()],
                config: config.clone(),
                scale: 0.1,
                seed: shape.iter().product::<usize>() as u64,
                steps: 3,
            };
            for (dtype, ulp) in [(DType::F32, 0.0), (DType::BF16, 2f64.powi(-7))] {
                check(&c, dtype, ulp)
                    .unwrap_or_else(|e| panic!("{name}, {shape:?}, {dtype:?}: {e}"));
            }
        }
    }
}
