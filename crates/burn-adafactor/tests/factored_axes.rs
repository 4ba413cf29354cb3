//! `factored_axes` and `factor_convolutions` in the burn adapter: the recorded Keras 3.15.1
//! `Conv2D` runs (`conformance/conv/`, Keras's layout `[kh, kw, in, out]`) replayed on the same
//! kernels in burn's layout `[out, in, kh, kw]` on both data paths; the state's size; the config
//! key in and out; checkpoints that record the axes; and every refusal, each naming the
//! parameter and changing nothing.

mod common;

use adafactor_conformance as conf;
use burn::tensor::{DType, Device};
use burn_adafactor::{Adafactor, AdafactorConfig, FactoredAxes, KerasAdafactor};
use common::{Handle, Vars};
use serde_json::Value;

/// The recorded cases' convolution kernels (the other variables are biases).
const KERNELS: [&str; 3] = ["conv3x3/kernel", "conv1x1/kernel", "conv5x3/kernel"];

/// A kernel's values between Keras's `[kh, kw, in, out]` (`keras_shape`) and burn's
/// `[out, in, kh, kw]`: to burn's layout when `to_burn`, else back (other ranks as they are).
fn relayout(values: &[f32], keras_shape: &[usize], to_burn: bool) -> Vec<f32> {
    let &[kh, kw, cin, cout] = keras_shape else {
        return values.to_vec();
    };
    let mut out = vec![0f32; values.len()];
    for y in 0..kh {
        for x in 0..kw {
            for i in 0..cin {
                for o in 0..cout {
                    let keras = ((y * kw + x) * cin + i) * cout + o;
                    let burn = ((o * cin + i) * kh + y) * kw + x;
                    if to_burn {
                        out[burn] = values[keras];
                    } else {
                        out[keras] = values[burn];
                    }
                }
            }
        }
    }
    out
}

/// burn's shape of a variable of Keras shape `shape`.
fn burn_shape(shape: &[usize]) -> Vec<usize> {
    match *shape {
        [kh, kw, cin, cout] => vec![cout, cin, kh, kw],
        _ => shape.to_vec(),
    }
}

fn cases() -> Vec<Value> {
    conf::conv_cases()
}

/// A case's variables as a burn module in burn's layout.
fn model_of(case: &Value, device: &Device) -> (Vars, Vec<Handle>) {
    let init: Vec<(Vec<usize>, Vec<f32>)> = conf::variables(case)
        .iter()
        .map(|v| (burn_shape(&v.shape), relayout(&v.initial, &v.shape, true)))
        .collect();
    common::build(&init, device, None)
}

/// Kernels in burn's layout `[out, in, kh, kw]`.
const BURN_LAYOUT: common::Layout = common::Layout {
    shape: burn_shape,
    values: relayout,
};

/// Replays one case. `helper`: factor the kernels as Keras does (else burn's last two axes).
fn run_case(case: &Value, jit_compile: bool, helper: bool) -> Result<(), String> {
    common::replay(case, jit_compile, &BURN_LAYOUT, |opt, model, handles| {
        if helper {
            let set = opt.factor_convolutions(model).map_err(|e| e.to_string())?;
            let kernels: Vec<String> = conf::variables(case)
                .iter()
                .zip(handles)
                .filter(|(v, _)| KERNELS.contains(&v.name.as_str()))
                .map(|(_, h)| h.path())
                .collect();
            assert_eq!(set, kernels, "the kernels, none of the biases");
        }
        Ok(())
    })
}

#[test]
fn keras_conv2d_runs_replay_in_burn_layout_on_both_paths() {
    let mut failures = Vec::new();
    for case in cases() {
        for jit in [true, false] {
            match run_case(&case, jit, true) {
                Ok(()) => println!("{} jit={jit}: ok", conf::name(&case)),
                Err(m) => failures.push(m),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Without the helper the same kernels are factored over burn's last two axes (`kh x kw`
/// matrices), a different optimizer: the replay fails, so the test above can tell.
#[test]
fn without_the_helper_the_runs_differ() {
    for case in cases() {
        for jit in [true, false] {
            let e = run_case(&case, jit, false).expect_err("a different optimizer");
            assert!(e.contains("variable conv") && e.contains("expected"), "{e}");
        }
    }
}

/// The state of a factored kernel is Keras's: `r` `[kh, kw, in]` and `c` `[kh, kw, out]`.
#[test]
fn the_helper_gives_keras_state_sizes_and_the_config_key() {
    let case = &cases()[0];
    let (model, handles) = model_of(case, &Device::flex().autodiff());
    let mut opt = Adafactor::new(AdafactorConfig::default()).unwrap();
    opt.build(&model).unwrap();
    let before = opt.state_bytes();
    let set = opt.factor_convolutions(&model).unwrap();
    // 3x3 4 -> 6, 1x1 6 -> 5, 5x3 5 -> 3, and the biases (6 and 5).
    let want = 4 * (9 * (4 + 6) + (6 + 5) + 15 * (5 + 3) + 6 + 5);
    assert_eq!(opt.state_bytes(), want);
    assert!(before > want, "{before} bytes over the last two axes");
    let json = opt.get_config();
    for p in &set {
        assert_eq!(json["factored_axes"][p.as_str()], serde_json::json!([1, 0]));
    }
    // The key goes round: an optimizer from this config builds the same state.
    let mut again = Adafactor::from_config(&json).unwrap();
    again.build(&model).unwrap();
    assert_eq!(again.state_bytes(), want);
    assert_eq!(again.get_config(), json);
    // Back to Keras's last two axes for one kernel.
    let first = handles[0].path();
    opt.set_factored_axes(&first, None).unwrap();
    assert!(opt.get_config()["factored_axes"].get(&first).is_none());
    assert_eq!(
        opt.state_bytes(),
        want - 4 * 9 * (4 + 6) + 4 * 6 * 4 * (3 + 3)
    );
}

/// Every refusal names the parameter or the key and leaves the optimizer as it was.
#[test]
fn bad_axes_are_refused_and_change_nothing() {
    let case = &cases()[1];
    let device = Device::flex().autodiff();
    let (model, handles) = model_of(case, &device);
    let kernel = handles[0].path();

    // Not built: `set_factored_axes` asks for a build.
    let mut opt = Adafactor::new(AdafactorConfig::default()).unwrap();
    let e = opt
        .set_factored_axes(&kernel, Some(FactoredAxes::CONVOLUTION))
        .unwrap_err();
    assert!(e.to_string().contains("not built"), "{e}");
    assert!(!opt.built());

    opt.build(&model).unwrap();
    let config = opt.get_config();
    let bytes = opt.state_bytes();
    for (path, axes, needle) in [
        ("nope.weight", FactoredAxes::CONVOLUTION, "nope.weight"),
        (kernel.as_str(), FactoredAxes { row: 1, col: 1 }, "[1, 1]"),
        (kernel.as_str(), FactoredAxes { row: 0, col: 4 }, "[0, 4]"),
    ] {
        let e = opt.set_factored_axes(path, Some(axes)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(needle) && msg.contains(&format!("`{path}`")),
            "{msg}"
        );
        assert_eq!(opt.get_config(), config);
        assert_eq!(opt.state_bytes(), bytes);
    }

    // After a step the statistics would be lost: refused, for both calls.
    let grads: Vec<Option<Vec<f32>>> = conf::variables(case)
        .iter()
        .map(|v| Some(vec![0.5; v.shape.iter().product()]))
        .collect();
    let grads = common::grads(&handles, &grads, &device, DType::F32);
    let model = opt.step(model, grads).unwrap();
    for e in [
        opt.factor_convolutions(&model).unwrap_err(),
        opt.set_factored_axes(&kernel, Some(FactoredAxes::CONVOLUTION))
            .unwrap_err(),
    ] {
        assert!(e.to_string().contains("already applied gradients"), "{e}");
    }
    assert_eq!(opt.get_config(), config);

    // A config naming a parameter the module lacks: the first step refuses it, naming it, and
    // the optimizer stays unbuilt.
    let json = serde_json::json!({"factored_axes": {"conv.weight": [1, 0]}});
    let mut opt = Adafactor::from_config(&json).unwrap();
    let grads = common::grads(
        &handles,
        &conf::variables(case)
            .iter()
            .map(|v| Some(vec![0.5; v.shape.iter().product()]))
            .collect::<Vec<_>>(),
        &device,
        DType::F32,
    );
    let e = opt.step(model, grads).unwrap_err();
    assert!(e.error.to_string().contains("`conv.weight`"), "{}", e.error);
    assert!(!opt.built());

    // The per-tensor optimizer does not see paths: it refuses the key.
    let config = AdafactorConfig::from_keras_config(&json).unwrap();
    let e = KerasAdafactor::new(config).unwrap_err();
    assert!(
        e.to_string().contains("`factored_axes`") && e.to_string().contains("conv.weight"),
        "{e}"
    );
}

/// A checkpoint records the axes: it resumes into an optimizer with the same axes, bit for bit,
/// and an optimizer with other axes refuses it, naming the parameter.
#[test]
fn checkpoints_record_the_axes() {
    let case = &cases()[1];
    let device = Device::flex().autodiff();
    let (model, handles) = model_of(case, &device);
    let grads_at = |k: usize| {
        let g: Vec<Option<Vec<f32>>> = conf::variables(case)
            .iter()
            .map(|v| {
                let n = v.shape.iter().product::<usize>();
                Some(
                    (0..n)
                        .map(|i| ((i * 7 + k * 3) % 11) as f32 * 0.1 - 0.5)
                        .collect(),
                )
            })
            .collect();
        common::grads(&handles, &g, &device, DType::F32)
    };
    let mut opt = Adafactor::new(AdafactorConfig::default()).unwrap();
    opt.factor_convolutions(&model).unwrap();
    let model = opt.step(model, grads_at(0)).unwrap();
    let bytes = opt.to_safetensors_bytes().unwrap();

    // Resumed into a fresh optimizer with the helper: the next steps are the same bits.
    let mut resumed = Adafactor::new(AdafactorConfig::default()).unwrap();
    resumed.factor_convolutions(&model).unwrap();
    resumed.load_safetensors_bytes(&model, &bytes).unwrap();
    let a = opt.step(model.clone(), grads_at(1)).unwrap();
    let b = resumed.step(model.clone(), grads_at(1)).unwrap();
    for h in &handles {
        assert_eq!(common::bits(&a, h), common::bits(&b, h), "{}", h.path());
    }

    // Without the helper: refused, naming the parameter and both choices.
    let mut plain = Adafactor::new(AdafactorConfig::default()).unwrap();
    let e = plain.load_safetensors_bytes(&model, &bytes).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("`{}`", handles[0].path())) && msg.contains("[1, 0]"),
        "{msg}"
    );
    assert!(!plain.built(), "nothing changes on error");
}
