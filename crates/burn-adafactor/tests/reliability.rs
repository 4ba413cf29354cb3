//! Errors name the parameter and change nothing; flags are put back; the fused path writes in
//! place (and copies only a buffer something else holds); bf16 and f16 parameters work on both
//! paths.

mod common;

use burn::tensor::{DType, Device, FloatDType};
use burn_adafactor::{Adafactor, AdafactorConfig, DataPath};
use common::{Handle, Vars};

fn setup(dtype: Option<FloatDType>) -> (Vars, Vec<Handle>, Device) {
    let device = Device::flex().autodiff();
    let vars = vec![
        (vec![3, 4], (0..12).map(|k| k as f32 * 0.1 - 0.5).collect()),
        (vec![4], vec![0.5, -1.0, 2.0, 0.25]),
        (
            vec![2, 2, 3],
            (0..12).map(|k| 1.0 - k as f32 * 0.07).collect(),
        ),
    ];
    let (m, h) = common::build(&vars, &device, dtype);
    (m, h, device)
}

fn grad_values(h: &[Handle], scale: f32) -> Vec<Option<Vec<f32>>> {
    h.iter()
        .map(|h| {
            Some(
                (0..h.shape.iter().product::<usize>())
                    .map(|k| (k as f32 * 0.37).sin() * scale)
                    .collect(),
            )
        })
        .collect()
}

fn cfg(jit: bool) -> AdafactorConfig {
    AdafactorConfig {
        learning_rate: 0.1.into(),
        jit_compile: jit,
        ..Default::default()
    }
}

fn snapshot(m: &Vars, h: &[Handle]) -> Vec<Vec<u32>> {
    h.iter().map(|h| common::bits(m, h)).collect()
}

#[test]
fn errors_name_the_parameter_and_change_nothing() {
    for jit in [true, false] {
        let (mut m, h, dev) = setup(None);
        let mut opt = Adafactor::new(cfg(jit)).expect("optimizer");
        m = opt
            .step(
                m,
                common::grads(&h, &grad_values(&h, 1.0), &dev, DType::F32),
            )
            .expect("first step");
        let before = snapshot(&m, &h);
        let state = opt.to_safetensors_bytes().expect("state");

        // A gradient of the wrong dtype.
        let g = common::grads(&h, &grad_values(&h, 1.0), &dev, DType::F16);
        let e = opt.step(m, g).expect_err("dtype mismatch");
        assert!(
            e.to_string().contains("`r1.0`") && e.to_string().contains("dtype"),
            "{e}"
        );
        m = e.into_model();
        // A NaN gradient with on_nonfinite = "error" (the default).
        let mut bad = grad_values(&h, 1.0);
        if let Some(v) = bad[2].as_mut() {
            v[3] = f32::NAN;
        }
        let e = opt
            .step(m, common::grads(&h, &bad, &dev, DType::F32))
            .expect_err("non-finite");
        assert!(e.to_string().contains("`r3.0`"), "{e}");
        m = e.into_model();
        // No gradient at all.
        let e = opt
            .step(m, common::grads(&h, &[None, None, None], &dev, DType::F32))
            .expect_err("no gradients");
        assert!(e.to_string().contains("No gradients"), "{e}");
        m = e.into_model();

        assert_eq!(
            snapshot(&m, &h),
            before,
            "jit={jit}: weights changed by a refused step"
        );
        assert_eq!(
            opt.to_safetensors_bytes().expect("state"),
            state,
            "jit={jit}: state changed"
        );
        assert_eq!(opt.iterations(), 1);
        for hh in &h {
            assert!(
                common::requires_grad(&m, hh),
                "jit={jit}: `{}` lost require_grad",
                hh.path()
            );
        }
    }
}

#[test]
fn fused_path_writes_in_place_and_copies_only_shared_buffers() {
    let (mut m, h, dev) = setup(None);
    let mut opt = Adafactor::new(cfg(true)).expect("optimizer");
    for _ in 0..2 {
        m = opt
            .step(
                m,
                common::grads(&h, &grad_values(&h, 1.0), &dev, DType::F32),
            )
            .expect("step");
        assert_eq!(opt.data_path(), DataPath::Fused);
        assert_eq!(
            opt.last_step_copies(),
            0,
            "a uniquely owned parameter was copied"
        );
    }
    let kept = m.clone();
    let kept_bits = snapshot(&kept, &h);
    m = opt
        .step(
            m,
            common::grads(&h, &grad_values(&h, 1.0), &dev, DType::F32),
        )
        .expect("step");
    assert_eq!(
        opt.last_step_copies(),
        h.len(),
        "each shared buffer is copied once"
    );
    assert_eq!(snapshot(&kept, &h), kept_bits, "the clone kept its values");
    assert_ne!(snapshot(&m, &h), kept_bits, "the model was updated");
}

#[test]
fn half_precision_parameters_agree_across_paths() {
    for dtype in [FloatDType::BF16, FloatDType::F16] {
        let mut results = Vec::new();
        for jit in [true, false] {
            let (mut m, h, dev) = setup(Some(dtype));
            let mut opt = Adafactor::new(AdafactorConfig {
                weight_decay: Some(0.1),
                ..cfg(jit)
            })
            .expect("optimizer");
            for k in 0..4 {
                let g = common::grads(
                    &h,
                    &grad_values(&h, 1.0 + k as f32),
                    &dev,
                    DType::from(dtype),
                );
                m = opt.step(m, g).expect("step");
            }
            let want = if jit {
                DataPath::Fused
            } else {
                DataPath::Composed
            };
            assert_eq!(opt.data_path(), want);
            results.push(
                h.iter()
                    .map(|hh| common::values(&m, hh))
                    .collect::<Vec<_>>(),
            );
        }
        // One rounding to the half type apart at most.
        for (a, b) in results[0].iter().flatten().zip(results[1].iter().flatten()) {
            assert!(
                (a - b).abs() <= 1e-2 * a.abs().max(1e-2),
                "{dtype:?}: fused {a} vs composed {b}"
            );
        }
    }
}

#[test]
fn config_round_trips_through_keras_json() {
    let opt = Adafactor::new(AdafactorConfig {
        weight_decay: Some(0.01),
        use_ema: true,
        ..cfg(true)
    })
    .expect("optimizer");
    let again = Adafactor::from_config(&opt.get_config()).expect("from_config");
    assert_eq!(again.get_config(), opt.get_config());
    let mut bad = opt.get_config();
    bad["ema_momentum"] = serde_json::Value::from(1.5);
    let e = Adafactor::from_config(&bad).expect_err("invalid momentum");
    assert!(e.to_string().contains("ema_momentum"), "{e}");
}
