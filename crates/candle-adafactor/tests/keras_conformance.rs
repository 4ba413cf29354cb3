//! Replays recorded runs of the real Keras 3.15.1 Adafactor (TensorFlow backend, float32) and
//! compares every variable, EMA average, `iterations` and finalized value after every step, on
//! both data paths. Format: `conformance/FORMAT.md`.
//!
//! The cases are read from `$ADAFACTOR_CONFORMANCE_DIR` when set, else from the project's copy in
//! `conformance/keras-3.15.1/`.

mod common;

use adafactor_conformance as conf;
use candle_adafactor::{Adafactor, DataPath};
use candle_core::{Device, Tensor, Var};
use serde_json::Value;

/// Compares a tensor with recorded values; the first mismatch is reported with its location.
fn compare(what: &str, got: &Tensor, want: &Value) -> Result<(), String> {
    let got: Vec<f32> = got
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(|e| format!("{what}: {e}"))?;
    conf::compare(what, &got, want)
}

/// Runs one case on one path. `Err` names the case, step, variable, index, expected and got.
fn run_case(case: &Value, jit_compile: bool) -> Result<(), String> {
    let name = case["name"].as_str().unwrap_or("?");
    let fail = |m: String| format!("case {name} (jit_compile={jit_compile}): {m}");
    let mut opt = Adafactor::from_config(&conf::config(case, jit_compile))
        .map_err(|e| fail(format!("from_config: {e}")))?;

    let vars: Vec<(String, Var)> = conf::variables(case)
        .into_iter()
        .map(|v| {
            let var = Var::from_slice(&v.initial, v.shape, &Device::Cpu)
                .map_err(|e| fail(e.to_string()))?;
            Ok((v.name, var))
        })
        .collect::<Result<_, String>>()?;
    opt.build_named(vars.clone())
        .map_err(|e| fail(e.to_string()))?;
    let names = conf::excluded_names(case);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    opt.exclude_from_weight_decay(&[], &names)
        .map_err(|e| fail(e.to_string()))?;
    let want_path = if jit_compile {
        DataPath::Fused
    } else {
        DataPath::Composed
    };
    if opt.data_path() != want_path {
        return Err(fail(format!(
            "runs on {:?}, expected {want_path:?}",
            opt.data_path()
        )));
    }

    for (k, step) in case["steps"].as_array().into_iter().flatten().enumerate() {
        let at = |m: String| fail(format!("step {}: {m}", k + 1));
        let grads: Vec<Option<Tensor>> = conf::gradients(step)
            .iter()
            .zip(&vars)
            .map(|(g, (_, v))| {
                g.as_ref()
                    .map(|data| Tensor::from_slice(data, v.shape(), &Device::Cpu))
                    .transpose()
                    .map_err(|e| at(e.to_string()))
            })
            .collect::<Result<_, String>>()?;
        let pairs: Vec<(Option<&Tensor>, &Var)> = grads
            .iter()
            .map(Option::as_ref)
            .zip(vars.iter().map(|(_, v)| v))
            .collect();
        opt.apply_gradients(&pairs)
            .map_err(|e| at(format!("apply_gradients: {e}")))?;

        conf::check_iterations(step, opt.iterations()).map_err(at)?;
        for ((vname, var), want) in vars
            .iter()
            .zip(step["variables"].as_array().into_iter().flatten())
        {
            compare(&format!("variable {vname}"), var.as_tensor(), want).map_err(at)?;
        }
        if let Some(emas) = step.get("ema").and_then(Value::as_array) {
            for ((vname, var), want) in vars.iter().zip(emas) {
                let avg = opt
                    .moving_average(var)
                    .map_err(|e| at(e.to_string()))?
                    .ok_or_else(|| at(format!("no EMA average for {vname}")))?;
                compare(&format!("EMA of {vname}"), &avg, want).map_err(at)?;
            }
        }
    }
    if let Some(fin) = case.get("finalized").and_then(Value::as_array) {
        let refs: Vec<&Var> = vars.iter().map(|(_, v)| v).collect();
        opt.finalize_variable_values(&refs)
            .map_err(|e| fail(e.to_string()))?;
        for ((vname, var), want) in vars.iter().zip(fin) {
            compare(&format!("finalized {vname}"), var.as_tensor(), want)
                .map_err(|m| fail(format!("after finalize_variable_values: {m}")))?;
        }
    }
    Ok(())
}

#[test]
fn keras_conformance() {
    let failures = conf::run_suite("", run_case);
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

/// The fused kernels have portable, AVX2 and AVX-512 versions of their row loops; this run used
/// the best one the CPU has. Replay the suite with each lesser one (`ADAFACTOR_SIMD`, read once
/// per process, so in a child process running this same test binary).
#[test]
fn keras_conformance_on_every_instruction_set() {
    if std::env::var_os("ADAFACTOR_SIMD").is_some() {
        return; // a child run
    }
    let exe = std::env::current_exe().expect("the test binary");
    for level in ["portable", "avx2"] {
        let out = std::process::Command::new(&exe)
            .args([
                "--exact",
                "keras_conformance",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("ADAFACTOR_SIMD", level)
            .output()
            .expect("running the test binary");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "ADAFACTOR_SIMD={level}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("keras conformance:"))
            .unwrap_or_else(|| panic!("ADAFACTOR_SIMD={level}: no summary line in\n{text}"));
        let (passed, total) = line
            .trim_start_matches("keras conformance: ")
            .trim_end_matches(" cases passed")
            .split_once('/')
            .expect("`P/T` in the summary");
        assert_eq!(passed, total, "ADAFACTOR_SIMD={level}: {line}");
        println!("ADAFACTOR_SIMD={level}: {line}");
    }
}
