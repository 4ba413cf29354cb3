//! Checkpoints: a run saved (optimizer state + burn record of the model) and resumed into a
//! fresh model and optimizer continues bit-exactly, on both paths and with every stateful stage.

mod common;

use burn::module::Module;
use burn::tensor::{DType, Device};
use burn_adafactor::{Adafactor, AdafactorConfig, LearningRateSchedule};
use common::{Handle, Vars};

fn model(device: &Device) -> (Vars, Vec<Handle>) {
    let vars = vec![
        (vec![3, 4], (0..12).map(|k| k as f32 * 0.1 - 0.5).collect()),
        (vec![4], vec![0.5, -1.0, 2.0, 0.25]),
        (
            vec![2, 2, 3],
            (0..12).map(|k| 1.0 - k as f32 * 0.07).collect(),
        ),
    ];
    common::build(&vars, device, None)
}

fn grads(h: &[Handle], step: usize, dev: &Device) -> burn::optim::GradientsParams {
    let v: Vec<Option<Vec<f32>>> = h
        .iter()
        .map(|h| {
            Some(
                (0..h.shape.iter().product::<usize>())
                    .map(|k| ((k + 3 * step) as f32 * 0.37).sin())
                    .collect(),
            )
        })
        .collect();
    common::grads(h, &v, dev, DType::F32)
}

fn everything(jit: bool) -> AdafactorConfig {
    AdafactorConfig {
        learning_rate: LearningRateSchedule::cosine_decay(0.1, 10.0, 0.1, None, 0.0)
            .expect("schedule")
            .into(),
        weight_decay: Some(0.05),
        global_clipnorm: Some(1.0),
        use_ema: true,
        ema_momentum: 0.8,
        ema_overwrite_frequency: Some(3),
        gradient_accumulation_steps: Some(2),
        loss_scale_factor: Some(2.0),
        jit_compile: jit,
        ..Default::default()
    }
}

#[test]
fn resume_is_bit_exact() {
    let dir = std::env::temp_dir().join(format!("burn-adafactor-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for jit in [true, false] {
        let dev = Device::flex().autodiff();
        let (mut m, h) = model(&dev);
        let mut opt = Adafactor::new(everything(jit)).expect("optimizer");
        for s in 0..5 {
            m = opt.step(m, grads(&h, s, &dev)).expect("step");
        }
        opt.save_state(dir.join("opt.safetensors"))
            .expect("save state");
        m.clone()
            .save_file(dir.join("model.bpk"))
            .expect("save model");
        assert_eq!(
            opt.to_safetensors_bytes().expect("bytes"),
            opt.to_safetensors_bytes().expect("bytes")
        );
        // The uninterrupted run.
        for s in 5..9 {
            m = opt.step(m, grads(&h, s, &dev)).expect("step");
        }
        // A fresh model (new parameter ids) and optimizer, resumed from the files.
        let (fresh, _) = model(&dev);
        let fresh = fresh.load_file(dir.join("model.bpk"));
        let mut resumed = Adafactor::new(everything(jit)).expect("optimizer");
        resumed
            .load_state(&fresh, dir.join("opt.safetensors"))
            .expect("load state");
        let mut r = fresh;
        for s in 5..9 {
            r = resumed.step(r, grads(&h, s, &dev)).expect("resumed step");
        }
        for hh in &h {
            assert_eq!(
                common::bits(&r, hh),
                common::bits(&m, hh),
                "jit={jit}: `{}` differs after resume",
                hh.path()
            );
        }
        assert_eq!(
            resumed.to_safetensors_bytes().expect("b"),
            opt.to_safetensors_bytes().expect("b"),
            "jit={jit}: state differs"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_damaged_or_mismatched_checkpoint_is_refused_and_changes_nothing() {
    let dev = Device::flex().autodiff();
    let (mut m, h) = model(&dev);
    let mut opt = Adafactor::new(everything(true)).expect("optimizer");
    m = opt.step(m, grads(&h, 0, &dev)).expect("step");
    let bytes = opt.to_safetensors_bytes().expect("bytes");
    let mut target = Adafactor::new(everything(true)).expect("optimizer");
    target.build(&m).expect("build");
    let before = target.to_safetensors_bytes().expect("bytes");
    let mut damaged = bytes.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    let e = target
        .load_safetensors_bytes(&m, &damaged)
        .expect_err("damaged");
    assert!(e.to_string().contains("checksum"), "{e}");
    let mut other = Adafactor::new(AdafactorConfig {
        weight_decay: Some(0.5),
        ..everything(true)
    })
    .expect("optimizer");
    let e = other
        .load_safetensors_bytes(&m, &bytes)
        .expect_err("other config");
    assert!(e.to_string().contains("weight_decay"), "{e}");
    assert_eq!(target.to_safetensors_bytes().expect("bytes"), before);
    target
        .load_safetensors_bytes(&m, &bytes)
        .expect("the intact bytes load");
    assert_eq!(target.raw_iterations(), 1);
}
