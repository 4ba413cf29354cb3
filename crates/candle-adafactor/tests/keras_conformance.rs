//! Replays recorded runs of the real Keras 3.15.1 Adafactor (TensorFlow backend, float32) and
//! compares every variable, EMA average, `iterations` and finalized value after every step, on
//! both data paths. Format: `conformance/FORMAT.md`.
//!
//! The cases are read from `$ADAFACTOR_CONFORMANCE_DIR` when set, else from the project's copy in
//! `conformance/keras-3.15.1/`.

mod common;

use candle_adafactor::{Adafactor, DataPath};
use candle_core::{Device, Tensor, Var};
use common::close;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("a list of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

fn case_dir() -> PathBuf {
    match std::env::var_os("ADAFACTOR_CONFORMANCE_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance/keras-3.15.1"),
    }
}

/// Compares a tensor with recorded values; the first mismatch is reported with its location.
fn compare(what: &str, got: &Tensor, want: &Value) -> Result<(), String> {
    let got: Vec<f32> = got
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(|e| format!("{what}: {e}"))?;
    let want = floats(want);
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        if !close(*g, *w) {
            return Err(format!("{what}, index {k}: expected {w}, got {g}"));
        }
    }
    Ok(())
}

/// Runs one case on one path. `Err` names the case, step, variable, index, expected and got.
fn run_case(case: &Value, jit_compile: bool) -> Result<(), String> {
    let name = case["name"].as_str().unwrap_or("?");
    let fail = |m: String| format!("case {name} (jit_compile={jit_compile}): {m}");
    let mut config = case["config"].clone();
    config["config"]["jit_compile"] = Value::Bool(jit_compile);
    let mut opt = Adafactor::from_config(&config).map_err(|e| fail(format!("from_config: {e}")))?;

    let vars: Vec<(String, Var)> = case["variables"]
        .as_array()
        .ok_or_else(|| fail("no variables".into()))?
        .iter()
        .map(|v| {
            let shape: Vec<usize> = v["shape"]
                .as_array()
                .map(|s| s.iter().map(|d| d.as_u64().unwrap_or(0) as usize).collect())
                .unwrap_or_default();
            let init: Vec<f32> = floats(&v["initial"]).iter().map(|x| *x as f32).collect();
            let var =
                Var::from_slice(&init, shape, &Device::Cpu).map_err(|e| fail(e.to_string()))?;
            Ok((v["name"].as_str().unwrap_or("?").to_string(), var))
        })
        .collect::<Result<_, String>>()?;
    opt.build_named(vars.clone())
        .map_err(|e| fail(e.to_string()))?;
    let names: Vec<&str> = case["exclude_from_weight_decay"]["var_names"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
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
        let grads: Vec<Option<Tensor>> = step["gradients"]
            .as_array()
            .ok_or_else(|| at("no gradients".into()))?
            .iter()
            .zip(&vars)
            .map(|(g, (_, v))| {
                if g.is_null() {
                    return Ok(None);
                }
                let data: Vec<f32> = floats(g).iter().map(|x| *x as f32).collect();
                Tensor::from_slice(&data, v.shape(), &Device::Cpu)
                    .map(Some)
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

        let want_it = step["iterations"]
            .as_u64()
            .ok_or_else(|| at("no iterations".into()))?;
        if opt.iterations() != want_it {
            return Err(at(format!(
                "iterations: expected {want_it}, got {}",
                opt.iterations()
            )));
        }
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

fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn keras_conformance() {
    let dir = case_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("conformance folder {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.json cases in {}", dir.display());
    let mut failures = Vec::new();
    let mut passed = 0;
    for file in &files {
        let case = load(file);
        let mut ok = true;
        for (jit, label) in [(true, "fused"), (false, "composed")] {
            match run_case(&case, jit) {
                Ok(()) => println!("{:<40} {label:<8} ok", case["name"].as_str().unwrap_or("?")),
                Err(m) => {
                    println!(
                        "{:<40} {label:<8} FAILED: {m}",
                        case["name"].as_str().unwrap_or("?")
                    );
                    failures.push(m);
                    ok = false;
                }
            }
        }
        passed += ok as usize;
    }
    println!("keras conformance: {passed}/{} cases passed", files.len());
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
    let mut case = load(&case_dir().join("defaults.json"));
    let original = case["steps"][2]["variables"][2][5]
        .as_f64()
        .expect("a recorded value");
    case["steps"][2]["variables"][2][5] = Value::from(original + 1e-4 + 1e-4 * original.abs());
    for jit in [true, false] {
        let m = run_case(&case, jit).expect_err("a perturbed case must fail");
        for part in [
            "case defaults",
            "step 3",
            "variable var2",
            "index 5",
            "expected",
            "got",
        ] {
            assert!(m.contains(part), "message `{m}` lacks `{part}`");
        }
    }
    // And a perturbed EMA value in an EMA case.
    let mut case = load(&case_dir().join("ema_overwrite.json"));
    let v = case["steps"][0]["ema"][1][0]
        .as_f64()
        .expect("an EMA value");
    case["steps"][0]["ema"][1][0] = Value::from(v + 0.01);
    let m = run_case(&case, false).expect_err("a perturbed EMA must fail");
    assert!(m.contains("EMA of var1") && m.contains("index 0"), "{m}");
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
