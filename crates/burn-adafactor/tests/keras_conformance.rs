//! Replays recorded runs of the real Keras 3.15.1 Adafactor (TensorFlow backend, float32) on a
//! burn module and compares every parameter, EMA average, `iterations` and finalized value after
//! every step, on both data paths. The cases and the suite loop are shared with the candle
//! adapter (`adafactor-conformance`).

mod common;

use adafactor_conformance as conf;
use burn::tensor::{DType, Device};
use burn_adafactor::{Adafactor, DataPath};
use serde_json::Value;

/// Runs one case on one path. `Err` names the case, step, variable, index, expected and got.
fn run_case(case: &Value, jit_compile: bool) -> Result<(), String> {
    let name = conf::name(case);
    let fail = |m: String| format!("case {name} (jit_compile={jit_compile}): {m}");
    let mut opt = Adafactor::from_config(&conf::config(case, jit_compile))
        .map_err(|e| fail(format!("from_config: {e}")))?;
    let device = Device::flex().autodiff();
    let vars = conf::variables(case);
    let init: Vec<(Vec<usize>, Vec<f32>)> = vars
        .iter()
        .map(|v| (v.shape.clone(), v.initial.clone()))
        .collect();
    let (mut model, handles) = common::build(&init, &device, None);
    // Keras excludes by variable name; the same variables are excluded here by module path.
    common::exclude_as_keras(&mut opt, case, &handles).map_err(fail)?;
    let want_path = if jit_compile {
        DataPath::Fused
    } else {
        DataPath::Composed
    };

    for (k, step) in case["steps"].as_array().into_iter().flatten().enumerate() {
        let at = |m: String| fail(format!("step {}: {m}", k + 1));
        let grads = common::grads(&handles, &conf::gradients(step), &device, DType::F32);
        model = opt
            .step(model, grads)
            .map_err(|e| at(format!("step: {e}")))?;
        if opt.data_path() != want_path {
            return Err(at(format!(
                "ran on {:?}, expected {want_path:?}",
                opt.data_path()
            )));
        }
        let want_it = step["iterations"]
            .as_u64()
            .ok_or_else(|| at("no iterations".into()))?;
        if opt.iterations() != want_it {
            return Err(at(format!(
                "iterations: expected {want_it}, got {}",
                opt.iterations()
            )));
        }
        for ((v, h), want) in vars
            .iter()
            .zip(&handles)
            .zip(step["variables"].as_array().into_iter().flatten())
        {
            conf::compare(
                &format!("variable {}", v.name),
                &common::values(&model, h),
                want,
            )
            .map_err(at)?;
        }
        if let Some(emas) = step.get("ema").and_then(Value::as_array) {
            for ((v, h), want) in vars.iter().zip(&handles).zip(emas) {
                let avg = opt
                    .moving_average(&h.path())
                    .map_err(|e| at(e.to_string()))?
                    .ok_or_else(|| at(format!("no EMA average for {}", v.name)))?;
                let avg = avg.try_to_vec::<f32>().map_err(|e| at(format!("{e:?}")))?;
                conf::compare(&format!("EMA of {}", v.name), &avg, want).map_err(at)?;
            }
        }
    }
    if let Some(fin) = case.get("finalized").and_then(Value::as_array) {
        let model = opt
            .finalize_variable_values(model)
            .map_err(|e| fail(e.to_string()))?;
        for ((v, h), want) in vars.iter().zip(&handles).zip(fin) {
            conf::compare(
                &format!("finalized {}", v.name),
                &common::values(&model, h),
                want,
            )
            .map_err(|m| fail(format!("after finalize_variable_values: {m}")))?;
        }
    }
    Ok(())
}

#[test]
fn keras_conformance() {
    let failures = conf::run_suite("burn ", run_case);
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The suite must be able to fail: a recorded value nudged beyond the tolerance is caught, and
/// the message names the case, step, variable, index, expected and got.
#[test]
fn perturbed_case_is_caught() {
    conf::check_perturbed_cases_fail(run_case);
}
