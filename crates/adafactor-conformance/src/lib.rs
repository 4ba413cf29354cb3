//! The Keras conformance suite's framework-free half, shared by every adapter's test: where the
//! recorded Keras 3.15.1 runs are, how to read them (`conformance/FORMAT.md`), the tolerance,
//! value comparison with a message that names the place, and the suite loop with its summary
//! line. Each adapter supplies only the replay of one case on its own tensors.
#![deny(missing_docs)]

use serde_json::Value;

/// The README's code samples (candle and burn), compiled and run as doctests of this test-only
/// crate, which has both adapters as dev-dependencies.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
use std::path::{Path, PathBuf};

/// The folder of recorded cases: `$ADAFACTOR_CONFORMANCE_DIR` when set, else the project's copy
/// in `conformance/keras-3.15.1/`.
pub fn case_dir() -> PathBuf {
    match std::env::var_os("ADAFACTOR_CONFORMANCE_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance/keras-3.15.1"),
    }
}

/// Reads one case file.
///
/// # Panics
/// The file cannot be read or is not JSON (a broken test setup, named in the message).
pub fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every case file (`*.json`) in `dir`, in file-name order.
///
/// # Panics
/// The folder or a file cannot be read (a broken test setup, named in the message).
pub fn load_dir(dir: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("conformance folder {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files.iter().map(|f| load(f)).collect()
}

/// The recorded Keras `Conv2D` runs (`conformance/conv/`, kernels in Keras's `[kh, kw, in, out]`).
pub fn conv_cases() -> Vec<Value> {
    let cases = load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance/conv"));
    assert_eq!(cases.len(), 2, "the two recorded Conv2D runs");
    cases
}

/// Reads the case of this name (`defaults` reads `defaults.json`).
pub fn load_case(name: &str) -> Value {
    load(&case_dir().join(format!("{name}.json")))
}

/// A JSON list of numbers.
pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect())
        .unwrap_or_default()
}

/// A JSON list of numbers as float32 (how the cases' inputs are fed).
pub fn floats32(v: &Value) -> Vec<f32> {
    floats(v).iter().map(|x| *x as f32).collect()
}

/// FORMAT.md's tolerance for values recorded from Keras: `|a - b| <= 1e-6 + 1e-5 * |b|`.
pub fn close(got: f32, want: f64) -> bool {
    (got as f64 - want).abs() <= 1e-6 + 1e-5 * want.abs()
}

/// Compares values with recorded ones; the first mismatch is reported with its index.
///
/// # Errors
/// A length or value mismatch, naming `what`, the index, expected and got.
pub fn compare(what: &str, got: &[f32], want: &Value) -> Result<(), String> {
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

/// Checks the optimizer's iteration count after a recorded step against the step's
/// `iterations`.
///
/// # Errors
/// The step records no count, or `got` differs from it.
pub fn check_iterations(step: &Value, got: u64) -> Result<(), String> {
    let want = step["iterations"]
        .as_u64()
        .ok_or_else(|| "no iterations".to_string())?;
    if got != want {
        return Err(format!("iterations: expected {want}, got {got}"));
    }
    Ok(())
}

/// One recorded variable: name, shape and initial values.
#[derive(Debug, Clone)]
pub struct Variable {
    /// Keras's name (`var0`, ...).
    pub name: String,
    /// Its shape (`[]` for a scalar).
    pub shape: Vec<usize>,
    /// Initial values, row-major.
    pub initial: Vec<f32>,
}

/// The case's variables.
pub fn variables(case: &Value) -> Vec<Variable> {
    case["variables"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| Variable {
            name: v["name"].as_str().unwrap_or("?").to_string(),
            shape: v["shape"]
                .as_array()
                .map(|s| s.iter().map(|d| d.as_u64().unwrap_or(0) as usize).collect())
                .unwrap_or_default(),
            initial: floats32(&v["initial"]),
        })
        .collect()
}

/// The case's Keras config with `jit_compile` set (which selects the data path).
pub fn config(case: &Value, jit_compile: bool) -> Value {
    let mut config = case["config"].clone();
    config["config"]["jit_compile"] = Value::Bool(jit_compile);
    config
}

/// The case's `exclude_from_weight_decay(var_names=...)` fragments.
pub fn excluded_names(case: &Value) -> Vec<String> {
    case["exclude_from_weight_decay"]["var_names"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// The case's name.
pub fn name(case: &Value) -> &str {
    case["name"].as_str().unwrap_or("?")
}

/// One step's gradients, per variable (`None` where Keras got a `None` gradient).
pub fn gradients(step: &Value) -> Vec<Option<Vec<f32>>> {
    step["gradients"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| (!g.is_null()).then(|| floats32(g)))
        .collect()
}

/// Runs `replay(case, jit_compile)` on every case, fused (`true`) then composed (`false`),
/// printing one row per case and path and then `{label}keras conformance: P/T cases passed` (a
/// case passes when both paths do). Returns the failure messages.
///
/// # Panics
/// The case folder cannot be read or holds no case.
pub fn run_suite(label: &str, replay: impl Fn(&Value, bool) -> Result<(), String>) -> Vec<String> {
    let dir = case_dir();
    let cases = load_dir(&dir);
    assert!(!cases.is_empty(), "no *.json cases in {}", dir.display());
    let mut failures = Vec::new();
    let mut passed = 0;
    for case in &cases {
        let mut ok = true;
        for (jit, path) in [(true, "fused"), (false, "composed")] {
            match replay(case, jit) {
                Ok(()) => println!("{:<40} {path:<8} ok", name(case)),
                Err(m) => {
                    println!("{:<40} {path:<8} FAILED: {m}", name(case));
                    failures.push(m);
                    ok = false;
                }
            }
        }
        passed += ok as usize;
    }
    println!(
        "{label}keras conformance: {passed}/{} cases passed",
        cases.len()
    );
    failures
}

/// Checks that a replay can fail and says where: a recorded weight of `defaults` nudged beyond
/// the tolerance must fail on both paths with a message naming the case, step, variable, index,
/// expected and got, and a nudged EMA average of `ema_overwrite` must fail naming it.
///
/// # Panics
/// A perturbed case passes, or its message lacks a part (the test's failure).
pub fn check_perturbed_cases_fail(replay: impl Fn(&Value, bool) -> Result<(), String>) {
    let mut case = load_case("defaults");
    let original = case["steps"][2]["variables"][2][5].as_f64().unwrap_or(0.0);
    case["steps"][2]["variables"][2][5] = Value::from(original + 1e-4 + 1e-4 * original.abs());
    for jit in [true, false] {
        let m = replay(&case, jit).expect_err("a perturbed case must fail");
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
    let mut case = load_case("ema_overwrite");
    let v = case["steps"][0]["ema"][1][0].as_f64().unwrap_or(0.0);
    case["steps"][0]["ema"][1][0] = Value::from(v + 0.01);
    for jit in [true, false] {
        let m = replay(&case, jit).expect_err("a perturbed EMA must fail");
        assert!(
            m.contains("case ema_overwrite") && m.contains("EMA of var1") && m.contains("index 0"),
            "{m}"
        );
    }
}
