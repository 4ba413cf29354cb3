//! `weight_rounding = "stochastic"` for bf16 and f16 parameters in the burn adapter: the fused
//! (Flex) and composed paths give the same bits after every step, for the update's write and
//! the EMA overwrite, on a matrix, a vector and two convolution kernels factored over other
//! axes; and the bits are not those of nearest rounding.

mod common;

use burn::tensor::{DType, Device, FloatDType};
use burn_adafactor::{Adafactor, AdafactorConfig, DataPath, WeightRounding};
use common::{Handle, Vars};

fn setup(dtype: FloatDType) -> (Vars, Vec<Handle>, Device) {
    let device = Device::flex().autodiff();
    let values = |n: usize, a: f32| (0..n).map(|k| (k as f32 * a).cos() * 0.7).collect();
    let vars = vec![
        (vec![6, 5], values(30, 0.31)),
        (vec![7], values(7, 0.53)),
        (vec![3, 2, 4], values(24, 0.17)),
        (vec![4, 3, 3, 3], values(108, 0.23)),
    ];
    let (m, h) = common::build(&vars, &device, Some(dtype));
    (m, h, device)
}

/// The bits of every parameter after each of six steps.
fn run(dtype: FloatDType, jit: bool, rounding: WeightRounding) -> Vec<Vec<Vec<u32>>> {
    let (mut model, handles, device) = setup(dtype);
    let config = AdafactorConfig {
        learning_rate: 0.05.into(),
        jit_compile: jit,
        use_ema: true,
        ema_momentum: 0.9,
        ema_overwrite_frequency: Some(3),
        weight_rounding: rounding,
        weight_rounding_seed: if rounding == WeightRounding::Stochastic {
            11
        } else {
            0
        },
        ..Default::default()
    };
    let mut opt = Adafactor::new(config).expect("optimizer");
    // The rank-3 and rank-4 parameters as convolution kernels: factored over axes (1, 0).
    assert_eq!(
        opt.factor_convolutions(&model).expect("helper"),
        [handles[2].path(), handles[3].path()]
    );
    let want = if jit {
        DataPath::Fused
    } else {
        DataPath::Composed
    };
    let mut out = Vec::new();
    for step in 0..6 {
        let g: Vec<Option<Vec<f32>>> = handles
            .iter()
            .map(|h| {
                let n = h.shape.iter().product::<usize>();
                Some(
                    (0..n)
                        .map(|k| ((k * 13 + step * 7) as f32 * 0.29).sin())
                        .collect(),
                )
            })
            .collect();
        let grads = common::grads(&handles, &g, &device, DType::from(dtype));
        model = opt.step(model, grads).expect("a step");
        assert_eq!(opt.data_path(), want, "{dtype:?}, step {step}");
        out.push(handles.iter().map(|h| common::bits(&model, h)).collect());
    }
    out
}

#[test]
fn both_paths_give_the_same_bits() {
    for dtype in [FloatDType::BF16, FloatDType::F16] {
        let fused = run(dtype, true, WeightRounding::Stochastic);
        let composed = run(dtype, false, WeightRounding::Stochastic);
        for (step, (f, c)) in fused.iter().zip(&composed).enumerate() {
            assert_eq!(f, c, "{dtype:?}: step {}", step + 1);
        }
        // Not nearest rounding in disguise: on either path, some value rounds the other way.
        for jit in [true, false] {
            let nearest = run(dtype, jit, WeightRounding::Nearest);
            assert_ne!(nearest.last(), fused.last(), "{dtype:?}, jit_compile {jit}");
        }
    }
}
