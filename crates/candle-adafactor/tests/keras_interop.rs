//! Keras interop: configs and optimizer weights exchanged with the real Keras 3.15.1.
//!
//! The data in `conformance/interop/` comes from `tools/keras_interop.py` (Keras 3.15.1,
//! TensorFlow backend):
//! - `rust_configs.json`: our `get_config()` documents. Written by
//!   `rust_configs_file_is_current` when `ADAFACTOR_WRITE_INTEROP=1`; the script checks that Keras
//!   deserializes and re-serializes each unchanged.
//! - `keras_configs.json`: Keras's `get_config()` and `serialize()` for several configs.
//! - `keras_weights.json`: a Keras Adafactor on variables of rank 0 to 3: its `variables` at build
//!   and after 3 steps of fixed gradients, and the model weights after steps 3 and 4.

mod common;

use candle_adafactor::{Adafactor, AdafactorConfig, LearningRateSchedule};
use candle_core::{DType, Device, Tensor, Var};
use common::close;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance/interop")
}

fn load(name: &str) -> Value {
    let path = interop_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a list of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

fn dims(v: &Value) -> Vec<usize> {
    v.as_array()
        .expect("a shape")
        .iter()
        .map(|d| d.as_u64().expect("a dimension") as usize)
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("values")
}

// ---------------------------------------------------------------------------------------------
// Configs.

/// The configs whose `get_config()` Keras must accept unchanged: every argument, every schedule.
fn rust_configs() -> Vec<(&'static str, AdafactorConfig)> {
    let sched =
        |s: Result<LearningRateSchedule, adafactor::Error>| -> candle_adafactor::LearningRate {
            s.expect("schedule").into()
        };
    vec![
        ("defaults", AdafactorConfig::default()),
        (
            "all_arguments",
            AdafactorConfig {
                learning_rate: 0.02.into(),
                beta_2_decay: -0.7,
                epsilon_1: 1e-29,
                epsilon_2: 2e-3,
                clip_threshold: 0.5,
                relative_step: false,
                weight_decay: Some(0.004),
                clipnorm: Some(1.5),
                use_ema: true,
                ema_momentum: 0.95,
                ema_overwrite_frequency: Some(4),
                loss_scale_factor: Some(128.0),
                gradient_accumulation_steps: Some(3),
                name: "my_adafactor".into(),
                ..Default::default()
            },
        ),
        (
            "clipvalue",
            AdafactorConfig {
                learning_rate: 0.1.into(),
                clipvalue: Some(0.25),
                ..Default::default()
            },
        ),
        (
            "global_clipnorm",
            AdafactorConfig {
                global_clipnorm: Some(2.0),
                ..Default::default()
            },
        ),
        (
            "exponential_decay",
            AdafactorConfig::with_learning_rate(sched(LearningRateSchedule::exponential_decay(
                0.1, 10.0, 0.5, true,
            ))),
        ),
        (
            "piecewise_constant_decay",
            AdafactorConfig::with_learning_rate(sched(LearningRateSchedule::piecewise_constant(
                vec![10.0, 20.0],
                vec![1.0, 0.5, 0.1],
            ))),
        ),
        (
            "polynomial_decay",
            AdafactorConfig::with_learning_rate(sched(LearningRateSchedule::polynomial_decay(
                0.1, 10.0, 0.01, 2.0, true,
            ))),
        ),
        (
            "inverse_time_decay",
            AdafactorConfig {
                weight_decay: Some(0.01),
                ..AdafactorConfig::with_learning_rate(sched(
                    LearningRateSchedule::inverse_time_decay(0.1, 10.0, 0.5, false),
                ))
            },
        ),
        (
            "cosine_decay",
            AdafactorConfig::with_learning_rate(sched(LearningRateSchedule::cosine_decay(
                0.0,
                10.0,
                0.1,
                Some(1.0),
                5.0,
            ))),
        ),
        (
            "cosine_decay_restarts",
            AdafactorConfig {
                use_ema: true,
                ..AdafactorConfig::with_learning_rate(sched(
                    LearningRateSchedule::cosine_decay_restarts(1.0, 10.0, 2.0, 0.5, 0.0),
                ))
            },
        ),
    ]
}

fn rust_configs_document() -> String {
    let configs: Vec<Value> = rust_configs()
        .into_iter()
        .map(|(label, cfg)| json!({"label": label, "config": cfg.to_keras_config()}))
        .collect();
    let doc = json!({
        "generator": "candle-adafactor get_config(); regenerate with ADAFACTOR_WRITE_INTEROP=1 \
                      cargo test --release -p candle-adafactor --test keras_interop",
        "configs": configs,
    });
    serde_json::to_string_pretty(&doc).expect("json") + "\n"
}

/// `rust_configs.json` is what our `get_config()` writes today (so the Keras check of
/// `tools/keras_interop.py` covers the current code). `ADAFACTOR_WRITE_INTEROP=1` rewrites it.
#[test]
fn rust_configs_file_is_current() {
    let path = interop_dir().join("rust_configs.json");
    let want = rust_configs_document();
    if std::env::var_os("ADAFACTOR_WRITE_INTEROP").is_some() {
        std::fs::write(&path, &want).expect("write rust_configs.json");
    }
    let got = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        got == want,
        "{} is stale: rerun with ADAFACTOR_WRITE_INTEROP=1, then tools/keras_interop.py",
        path.display()
    );
}

/// Every Keras `get_config()` and `serialize()` document loads with `from_config`, and our
/// `get_config()` of it is Keras's, key for key.
#[test]
fn keras_configs_load_and_round_trip() {
    let doc = load("keras_configs.json");
    let configs = doc["configs"].as_array().expect("configs");
    assert!(configs.len() >= 10, "expected at least 10 configs");
    let mut schedules = std::collections::BTreeSet::new();
    for entry in configs {
        let label = entry["label"].as_str().expect("label");
        let keras = &entry["get_config"];
        for (what, input) in [("get_config", keras), ("serialize", &entry["serialize"])] {
            let opt = Adafactor::from_config(input)
                .unwrap_or_else(|e| panic!("{label}: from_config({what}): {e}"));
            let ours = opt.get_config();
            assert_eq!(
                &ours, keras,
                "{label}: get_config after from_config({what})"
            );
            assert_eq!(
                serde_json::to_string(&ours).expect("json"),
                serde_json::to_string(keras).expect("json"),
                "{label}: key order"
            );
            assert_eq!(
                &opt.config().to_keras_serialized(),
                &entry["serialize"],
                "{label}: serialize"
            );
        }
        if let Some(class) = keras["learning_rate"]["class_name"].as_str() {
            schedules.insert(class.to_string());
        }
    }
    assert_eq!(schedules.len(), 6, "every schedule class: {schedules:?}");
}

// ---------------------------------------------------------------------------------------------
// Weights.

struct Case {
    label: String,
    json: Value,
    vars: Vec<(String, Var)>,
    opt: Adafactor,
}

/// A case's optimizer from its Keras config, built on its variables at their initial values.
fn case(json: &Value, jit_compile: bool) -> Case {
    let label = json["label"].as_str().expect("label").to_string();
    let mut config = json["config"].clone();
    config["config"]["jit_compile"] = Value::Bool(jit_compile);
    let vars: Vec<(String, Var)> = json["variables"]
        .as_array()
        .expect("variables")
        .iter()
        .map(|v| {
            let var =
                Var::from_vec(floats(&v["initial"]), dims(&v["shape"]), &Device::Cpu).expect("var");
            (v["name"].as_str().expect("name").to_string(), var)
        })
        .collect();
    let mut opt = Adafactor::from_config(&config).expect("from_config");
    opt.build_named(vars.clone()).expect("build");
    Case {
        label,
        json: json.clone(),
        vars,
        opt,
    }
}

fn step(c: &mut Case, k: usize) {
    let grads: Vec<Tensor> = c.json["gradients"][k]
        .as_array()
        .expect("gradients")
        .iter()
        .zip(&c.vars)
        .map(|(g, (_, v))| Tensor::from_vec(floats(g), v.dims(), &Device::Cpu).expect("grad"))
        .collect();
    let pairs: Vec<(Option<&Tensor>, &Var)> = grads
        .iter()
        .zip(&c.vars)
        .map(|(g, (_, v))| (Some(g), v))
        .collect();
    c.opt.apply_gradients(&pairs).expect("apply");
}

fn keras_dtype(d: DType) -> &'static str {
    match d {
        DType::I64 => "int64",
        DType::I32 => "int32",
        DType::F32 => "float32",
        _ => "other",
    }
}

/// Compares our `keras_variables()` with a Keras `optimizer.variables` snapshot: same paths,
/// shapes and dtypes, values within the tolerance.
fn compare_keras_variables(ctx: &str, ours: &[(String, Tensor)], keras: &Value) {
    let keras = keras.as_array().expect("snapshot");
    assert_eq!(ours.len(), keras.len(), "{ctx}: variable count");
    for ((name, t), k) in ours.iter().zip(keras) {
        let path = k["path"].as_str().expect("path");
        assert_eq!(name, path, "{ctx}");
        assert_eq!(t.dims(), dims(&k["shape"]), "{ctx}: {path}");
        assert_eq!(keras_dtype(t.dtype()), k["dtype"], "{ctx}: {path}");
        let want = k["values"].as_array().expect("values");
        let got = values(t);
        assert_eq!(got.len(), want.len(), "{ctx}: {path}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let w = w.as_f64().expect("number");
            assert!(close(*g, w), "{ctx}: {path}[{i}]: Keras {w}, ours {g}");
        }
    }
}

fn keras_weights(snapshot: &Value) -> Vec<Tensor> {
    snapshot
        .as_array()
        .expect("snapshot")
        .iter()
        .map(|k| {
            let shape = dims(&k["shape"]);
            let vals: Vec<f64> = k["values"]
                .as_array()
                .expect("values")
                .iter()
                .map(|x| x.as_f64().expect("number"))
                .collect();
            match k["dtype"].as_str().expect("dtype") {
                "int64" => {
                    let v: Vec<i64> = vals.iter().map(|x| *x as i64).collect();
                    Tensor::from_vec(v, shape, &Device::Cpu)
                }
                "int32" => {
                    let v: Vec<i32> = vals.iter().map(|x| *x as i32).collect();
                    Tensor::from_vec(v, shape, &Device::Cpu)
                }
                _ => {
                    let v: Vec<f32> = vals.iter().map(|x| *x as f32).collect();
                    Tensor::from_vec(v, shape, &Device::Cpu)
                }
            }
            .expect("tensor")
        })
        .collect()
}

fn assert_weights(ctx: &str, vars: &[(String, Var)], want: &Value) {
    for ((name, v), w) in vars.iter().zip(want.as_array().expect("weights")) {
        let w = w.as_array().expect("values");
        for (i, (g, w)) in values(v.as_tensor()).iter().zip(w).enumerate() {
            let w = w.as_f64().expect("number");
            assert!(
                close(*g, w),
                "{ctx}: weight {name}[{i}]: Keras {w}, ours {g}"
            );
        }
    }
}

fn set_weights_to(vars: &[(String, Var)], want: &Value) {
    for ((_, v), w) in vars.iter().zip(want.as_array().expect("weights")) {
        let t = Tensor::from_vec(floats(w), v.dims(), &Device::Cpu).expect("tensor");
        v.set(&t).expect("set");
    }
}

/// Our `keras_variables()` is Keras's `optimizer.variables`, at build and after 3 steps.
#[test]
fn keras_variables_match_keras() {
    let doc = load("keras_weights.json");
    for jit in [true, false] {
        for json in doc["cases"].as_array().expect("cases") {
            let mut c = case(json, jit);
            let ctx = format!("{} (jit_compile={jit})", c.label);
            let at_build = c.opt.keras_variables().expect("keras_variables");
            compare_keras_variables(
                &format!("{ctx} at build"),
                &at_build,
                &c.json["optimizer_variables_at_build"],
            );
            for k in 0..3 {
                step(&mut c, k);
            }
            assert_weights(&ctx, &c.vars, &c.json["weights_after_3"]);
            let after = c.opt.keras_variables().expect("keras_variables");
            compare_keras_variables(
                &format!("{ctx} after 3 steps"),
                &after,
                &c.json["optimizer_variables_after_3"],
            );
        }
    }
}

/// Keras's weights after 3 steps, imported with `set_keras_weights` into an optimizer on Keras's
/// model weights, give our own state after the same 3 steps, and the 4th step lands on Keras's.
/// Keras's weights at build import as a fresh state (velocity zero while r and c are zero).
#[test]
fn keras_weights_import_reproduces_our_state() {
    let doc = load("keras_weights.json");
    for jit in [true, false] {
        for json in doc["cases"].as_array().expect("cases") {
            let mut ours = case(json, jit);
            let ctx = format!("{} (jit_compile={jit})", ours.label);
            for k in 0..3 {
                step(&mut ours, k);
            }

            let mut imported = case(json, jit);
            let fresh = imported.opt.variables().expect("variables");
            imported
                .opt
                .set_keras_weights(&keras_weights(&json["optimizer_variables_at_build"]))
                .expect("import at build");
            let after_build_import = imported.opt.variables().expect("variables");
            assert_eq!(fresh.len(), after_build_import.len());
            for ((n, a), (_, b)) in fresh.iter().zip(&after_build_import) {
                assert_eq!(
                    values(a),
                    values(b),
                    "{ctx}: {n} after importing the build state"
                );
            }

            set_weights_to(&imported.vars, &json["weights_after_3"]);
            imported
                .opt
                .set_keras_weights(&keras_weights(&json["optimizer_variables_after_3"]))
                .expect("import after 3 steps");
            assert_eq!(imported.opt.raw_iterations(), 3, "{ctx}");
            let want = ours.opt.variables().expect("variables");
            let got = imported.opt.variables().expect("variables");
            assert_eq!(want.len(), got.len(), "{ctx}");
            for ((name, w), (gname, g)) in want.iter().zip(&got) {
                assert_eq!(name, gname, "{ctx}");
                for (i, (g, w)) in values(g).iter().zip(values(w)).enumerate() {
                    assert!(
                        close(*g, w as f64),
                        "{ctx}: {name}[{i}]: ours {w}, imported {g}"
                    );
                }
            }

            step(&mut imported, 3);
            step(&mut ours, 3);
            assert_weights(
                &format!("{ctx} imported, step 4"),
                &imported.vars,
                &json["weights_after_4"],
            );
            assert_weights(
                &format!("{ctx} ours, step 4"),
                &ours.vars,
                &json["weights_after_4"],
            );
        }
    }
}

/// Export then import is exact (r and c are carried as they are; the velocity is rebuilt and
/// checked), and Keras's own velocity passes the consistency check.
#[test]
fn keras_round_trip_is_exact() {
    let doc = load("keras_weights.json");
    for json in doc["cases"].as_array().expect("cases") {
        let mut a = case(json, false);
        for k in 0..3 {
            step(&mut a, k);
        }
        let mut b = case(json, false);
        let exported: Vec<Tensor> = a
            .opt
            .keras_variables()
            .expect("export")
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        b.opt.set_keras_weights(&exported).expect("import");
        let bits = |o: &Adafactor| -> Vec<Vec<u32>> {
            o.variables()
                .expect("variables")
                .iter()
                .map(|(_, t)| values(t).iter().map(|x| x.to_bits()).collect())
                .collect()
        };
        assert_eq!(bits(&a.opt), bits(&b.opt), "{}", a.label);
    }
}

/// Wrong imports name the problem and change nothing: an inconsistent velocity (naming the
/// variable), a wrong count, a wrong shape, a negative iteration, an unbuilt optimizer.
#[test]
fn bad_keras_weights_are_refused() {
    let doc = load("keras_weights.json");
    let json = &doc["cases"][0];
    let snapshot = &json["optimizer_variables_after_3"];
    let mut c = case(json, true);
    step(&mut c, 0);
    let before: Vec<Vec<f32>> = c
        .opt
        .variables()
        .expect("variables")
        .iter()
        .map(|(_, t)| values(t))
        .collect();
    let weights = keras_weights(snapshot);
    let index_of = |path_suffix: &str| {
        snapshot
            .as_array()
            .expect("snapshot")
            .iter()
            .position(|k| k["path"].as_str().expect("path").ends_with(path_suffix))
            .expect("path")
    };
    let mut refuse = |what: &str, w: &[Tensor], needles: &[&str]| {
        let e = c.opt.set_keras_weights(w).expect_err(what).to_string();
        for n in needles {
            assert!(e.contains(n), "{what}: `{e}` lacks `{n}`");
        }
        let now: Vec<Vec<f32>> = c
            .opt
            .variables()
            .expect("variables")
            .iter()
            .map(|(_, t)| values(t))
            .collect();
        assert_eq!(now, before, "{what}: state changed");
        assert_eq!(c.opt.raw_iterations(), 1, "{what}");
    };

    let mut w = weights.clone();
    let i = index_of("w3_velocity");
    let mut v = values(&w[i]);
    v[7] *= 1.01;
    w[i] = Tensor::from_vec(v, w[i].dims(), &Device::Cpu).expect("tensor");
    refuse(
        "an inconsistent velocity",
        &w,
        &["velocity of variable `w3`", "flat index 7"],
    );
    let mut w = weights.clone();
    let i = index_of("w2_velocity");
    w[i] = w[i].zeros_like().expect("zeros");
    refuse(
        "a zero velocity with nonzero r and c",
        &w,
        &["`w2`", "flat index 0"],
    );

    refuse(
        "one weight short",
        &weights[1..],
        &["has 14 variables, got 13 weights"],
    );
    let mut w = weights.clone();
    let i = index_of("w1_velocity");
    w[i] = Tensor::zeros(4, DType::F32, &Device::Cpu).expect("zeros");
    refuse(
        "a wrong shape",
        &w,
        &["Optimizer variable adafactor/w1_velocity has shape [3] not compatible with provided weight shape [4]"],
    );
    let mut w = weights.clone();
    w[0] = Tensor::new(-2i64, &Device::Cpu).expect("tensor");
    refuse(
        "a negative iteration",
        &w,
        &["adafactor/iteration must be a whole number in [0, 9223372036854775807], got -2"],
    );
    let mut w = weights.clone();
    w[0] = Tensor::new(2.5f64, &Device::Cpu).expect("tensor");
    refuse("a fractional iteration", &w, &["got 2.5"]);
    let mut w = weights.clone();
    w[1] = Tensor::new(f32::NAN, &Device::Cpu).expect("tensor");
    refuse("a NaN learning rate", &w, &["learning_rate"]);

    let mut unbuilt = Adafactor::unbuilt(AdafactorConfig::default()).expect("unbuilt");
    let e = unbuilt
        .set_keras_weights(&weights)
        .expect_err("unbuilt")
        .to_string();
    assert!(e.contains("has not yet been built"), "{e}");
}
