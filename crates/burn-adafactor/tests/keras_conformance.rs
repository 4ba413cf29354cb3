//! Replays recorded runs of the real Keras 3.15.1 Adafactor (TensorFlow backend, float32) on a
//! burn module and compares every parameter, EMA average, `iterations` and finalized value after
//! every step, on both data paths. The cases and the suite loop are shared with the candle
//! adapter (`adafactor-conformance`).

mod common;

use adafactor_conformance as conf;
use serde_json::Value;

/// Runs one case on one path. `Err` names the case, step, variable, index, expected and got.
fn run_case(case: &Value, jit_compile: bool) -> Result<(), String> {
    common::replay(case, jit_compile, &common::KERAS_LAYOUT, |_, _, _| Ok(()))
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
