//! Property tests of reading Keras configs: `from_keras_config` on arbitrary JSON never panics,
//! and whatever it accepts round-trips through `to_keras_config` (in memory and as JSON text).
//!
//! The generated documents are mostly plausible configs (known keys, values near the valid
//! ranges, real and broken schedule dicts) so that many are accepted, mixed with arbitrary JSON.

use adafactor::{AdafactorConfig, LearningRate};
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

const KEYS: [&str; 23] = [
    "name",
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "global_clipnorm",
    "clipvalue",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
    "beta_2_decay",
    "epsilon_1",
    "epsilon_2",
    "clip_threshold",
    "relative_step",
    "decay",
    "jit_compile",
    "is_legacy_optimizer",
    "on_nonfinite",
    "weight_rounding",
    "weight_rounding_seed",
    "beta_1",
];

const SCHEDULES: [&str; 7] = [
    "ExponentialDecay",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "InverseTimeDecay",
    "CosineDecay",
    "CosineDecayRestarts",
    "Adam",
];

const SCHEDULE_KEYS: [&str; 18] = [
    "initial_learning_rate",
    "decay_steps",
    "decay_rate",
    "staircase",
    "name",
    "boundaries",
    "values",
    "end_learning_rate",
    "power",
    "cycle",
    "alpha",
    "warmup_target",
    "warmup_steps",
    "first_decay_steps",
    "t_mul",
    "m_mul",
    "decay_steps",
    "bogus",
];

fn float(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// Numbers around every edge the validation has: signs, zero, the unit interval, float32 and
/// float64 extremes, subnormals, integers (which `learning_rate` must refuse).
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (-2.0f64..2.0).prop_map(float),
        2 => (0.0f64..1.0).prop_map(float),
        2 => prop::sample::select(vec![
            0.0, -0.0, 1.0, -1.0, 0.5, 0.99, 1e-3, 1e-30, -0.8, 1e39, -1e39, 3.4e38, 1e300,
            f64::MAX, f64::MIN, f64::MIN_POSITIVE, 5e-324, 9.1e15, 1e16 + 1.0,
        ])
        .prop_map(float),
        1 => any::<f64>().prop_map(float),
        2 => (-3i64..10).prop_map(Value::from),
        1 => prop::sample::select(vec![u64::MAX, 1 << 53, (1 << 53) + 1]).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => number(),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => prop::sample::select(vec!["error", "skip", "propagate", "", "adafactor", "x\u{0}é"])
            .prop_map(Value::from),
        1 => "[a-z_]{0,8}".prop_map(Value::from),
    ]
}

/// Arbitrary JSON, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{0,6}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// With probability 1/16, replaces a well-typed value by an arbitrary one.
fn perturbed(typed: BoxedStrategy<Value>) -> BoxedStrategy<Value> {
    prop_oneof![15 => typed, 1 => any_json()].boxed()
}

fn positive() -> BoxedStrategy<Value> {
    prop_oneof![
        8 => (0.0f64..2.0).prop_map(float),
        2 => (1e-12f64..1e-3).prop_map(float),
        1 => number(),
    ]
    .boxed()
}

fn unit() -> BoxedStrategy<Value> {
    prop_oneof![8 => (0.0f64..=1.0).prop_map(float), 1 => number()].boxed()
}

fn steps() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => (1i64..100).prop_map(Value::from),
        1 => (0.5f64..100.0).prop_map(float),
        1 => number(),
    ]
    .boxed()
}

fn floats(len: std::ops::Range<usize>) -> BoxedStrategy<Value> {
    prop::collection::vec((0.0f64..10.0).prop_map(float), len)
        .prop_map(Value::Array)
        .boxed()
}

fn boolean() -> BoxedStrategy<Value> {
    any::<bool>().prop_map(Value::Bool).boxed()
}

fn name() -> BoxedStrategy<Value> {
    "[a-zA-Z_/]{0,10}".prop_map(Value::from).boxed()
}

/// A typed value for a schedule argument.
fn schedule_value(key: &str) -> BoxedStrategy<Value> {
    let typed = match key {
        "decay_steps" | "first_decay_steps" | "warmup_steps" => steps(),
        "staircase" | "cycle" => boolean(),
        "name" => name(),
        "boundaries" => floats(0..4),
        "values" => floats(1..5),
        "warmup_target" => prop_oneof![Just(Value::Null), positive()].boxed(),
        "t_mul" | "m_mul" | "power" => positive(),
        _ => unit(),
    };
    perturbed(typed)
}

/// The required and the optional keys of each schedule class (`Adam` is not a schedule).
fn schedule_keys(class: &str) -> (Vec<&'static str>, Vec<&'static str>) {
    match class {
        "ExponentialDecay" | "InverseTimeDecay" => (
            vec!["initial_learning_rate", "decay_steps", "decay_rate"],
            vec!["staircase", "name"],
        ),
        "PiecewiseConstantDecay" => (vec!["boundaries", "values"], vec!["name"]),
        "PolynomialDecay" => (
            vec!["initial_learning_rate", "decay_steps"],
            vec!["end_learning_rate", "power", "cycle", "name"],
        ),
        "CosineDecay" => (
            vec!["initial_learning_rate", "decay_steps"],
            vec!["alpha", "name", "warmup_target", "warmup_steps"],
        ),
        "CosineDecayRestarts" => (
            vec!["initial_learning_rate", "first_decay_steps"],
            vec!["t_mul", "m_mul", "alpha", "name"],
        ),
        _ => (vec![], SCHEDULE_KEYS.to_vec()),
    }
}

/// A schedule dict: a class with its required keys (one occasionally dropped), some optional
/// ones, values usually well typed (piecewise lists usually of matching lengths), and now and
/// then an unknown class, a stray key or a config that is not a dict.
fn schedule() -> BoxedStrategy<Value> {
    (
        prop::sample::select(SCHEDULES.to_vec()),
        any::<bool>(),
        prop::option::weighted(0.03, any_json()),
        prop::option::weighted(0.03, prop::sample::select(SCHEDULE_KEYS.to_vec())),
        prop::option::weighted(0.05, 0usize..3),
    )
        .prop_flat_map(|(class, modern, config_override, stray, drop)| {
            let (required, optional) = schedule_keys(class);
            let n = optional.len();
            (
                Just((class, modern, config_override, stray, drop, required)),
                prop::sample::subsequence(optional, 0..=n),
                (0usize..4, prop::option::weighted(0.05, 0usize..5)),
            )
                .prop_flat_map(
                    |((class, modern, config_override, stray, drop, mut keys), optional, lens)| {
                        if let Some(i) = drop {
                            if i < keys.len() {
                                keys.remove(i);
                            }
                        }
                        keys.extend(optional);
                        keys.extend(stray);
                        let (n_boundaries, wrong) = lens;
                        let values: Vec<BoxedStrategy<(String, Value)>> = keys
                            .iter()
                            .map(|k| {
                                let k = k.to_string();
                                let typed = match k.as_str() {
                                    "boundaries" => floats(n_boundaries..n_boundaries + 1),
                                    "values" => {
                                        let len = wrong.unwrap_or(n_boundaries + 1);
                                        floats(len..len + 1)
                                    }
                                    _ => schedule_value(&k),
                                };
                                typed.prop_map(move |v| (k.clone(), v)).boxed()
                            })
                            .collect();
                        (Just((class, modern, config_override)), values)
                    },
                )
        })
        .prop_map(|((class, modern, config_override), kv)| {
            let mut m = Map::new();
            if modern {
                m.insert("module".into(), "keras.optimizers.schedules".into());
                m.insert("registered_name".into(), Value::Null);
            }
            m.insert("class_name".into(), class.into());
            m.insert(
                "config".into(),
                config_override.unwrap_or(Value::Object(kv.into_iter().collect())),
            );
            Value::Object(m)
        })
        .boxed()
}

/// A typed value for an optimizer argument.
fn config_value(key: &str) -> BoxedStrategy<Value> {
    let optional = |s: BoxedStrategy<Value>| prop_oneof![1 => Just(Value::Null), 2 => s].boxed();
    let typed = match key {
        "name" => name(),
        "learning_rate" => prop_oneof![1 => positive(), 1 => schedule()].boxed(),
        "weight_decay" | "clipnorm" | "global_clipnorm" | "clipvalue" | "loss_scale_factor" => {
            optional(positive())
        }
        "use_ema" | "relative_step" | "jit_compile" | "is_legacy_optimizer" => boolean(),
        "ema_momentum" => unit(),
        "ema_overwrite_frequency" | "gradient_accumulation_steps" => {
            optional((0i64..6).prop_map(Value::from).boxed())
        }
        "beta_2_decay" => prop_oneof![3 => (-2.0f64..=0.0).prop_map(float), 1 => number()].boxed(),
        "epsilon_1" | "epsilon_2" | "clip_threshold" | "decay" => positive(),
        "on_nonfinite" => prop::sample::select(vec!["error", "skip", "propagate", "raise"])
            .prop_map(Value::from)
            .boxed(),
        "weight_rounding" => prop::sample::select(vec!["nearest", "stochastic", "up"])
            .prop_map(Value::from)
            .boxed(),
        "weight_rounding_seed" => prop_oneof![
            Just(Value::from(0u64)),
            any::<u64>().prop_map(Value::from),
            (-3i64..0).prop_map(Value::from),
        ]
        .boxed(),
        _ => leaf().boxed(),
    };
    perturbed(typed)
}

/// A plausible optimizer config (sometimes wrapped as `keras.optimizers.serialize` does): a
/// few known keys (rarely an unknown one) with mostly well-typed values.
fn config_doc() -> impl Strategy<Value = Value> {
    (
        prop::sample::subsequence(KEYS.to_vec(), 0..=6),
        any::<bool>(),
        any::<bool>(),
        prop::option::weighted(0.03, "[a-z]{1,6}"),
    )
        .prop_flat_map(|(mut keys, with_lr, wrap, unknown)| {
            if with_lr && !keys.contains(&"learning_rate") {
                keys.push("learning_rate");
            }
            if unknown.is_some() {
                keys.push("beta_1");
            }
            let values: Vec<BoxedStrategy<(String, Value)>> = keys
                .iter()
                .map(|k| {
                    let k = k.to_string();
                    config_value(&k).prop_map(move |v| (k.clone(), v)).boxed()
                })
                .collect();
            (values, Just(wrap))
        })
        .prop_map(|(kv, wrap)| {
            let config = Value::Object(kv.into_iter().collect());
            if wrap {
                serde_json::json!({"module": "keras.optimizers", "class_name": "Adafactor",
                                   "config": config, "registered_name": null})
            } else {
                config
            }
        })
}

/// What a config becomes after one trip through `get_config`: the constant learning rate is
/// float32-rounded (Keras's float32 variable) and `jit_compile`, which Keras 3 does not write,
/// returns to its default.
fn after_round_trip(c: &AdafactorConfig) -> AdafactorConfig {
    AdafactorConfig {
        learning_rate: match &c.learning_rate {
            LearningRate::Constant(lr) => LearningRate::Constant((*lr as f32) as f64),
            s => s.clone(),
        },
        jit_compile: AdafactorConfig::default().jit_compile,
        ..c.clone()
    }
}

fn check(doc: &Value) -> Result<(), TestCaseError> {
    let Ok(c) = AdafactorConfig::from_keras_config(doc) else {
        return Ok(()); // refusing is fine; panicking is not (the runner reports panics)
    };
    prop_assert!(c.validate().is_ok(), "accepted but invalid: {c:?}");
    let want = after_round_trip(&c);
    let j1 = c.to_keras_config();
    let back = AdafactorConfig::from_keras_config(&j1);
    prop_assert!(
        back.is_ok(),
        "get_config of {doc} does not load: {j1}: {back:?}"
    );
    let back = back.unwrap_or_default();
    prop_assert_eq!(&back, &want, "in-memory round trip of {}", doc);
    prop_assert_eq!(back.to_keras_config(), j1.clone());
    // The serialized wrapper, and the JSON text of both.
    let wrapped = AdafactorConfig::from_keras_config(&c.to_keras_serialized());
    prop_assert_eq!(wrapped.as_ref().ok(), Some(&want));
    for v in [j1, c.to_keras_serialized()] {
        let text = serde_json::to_string(&v).unwrap_or_default();
        let parsed: Value =
            serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
        let from_text = AdafactorConfig::from_keras_config(&parsed);
        prop_assert_eq!(
            from_text.as_ref().ok(),
            Some(&want),
            "text round trip of {}",
            text
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn plausible_configs_never_panic_and_round_trip(doc in config_doc()) {
        check(&doc)?;
    }

    #[test]
    fn arbitrary_json_never_panics(doc in any_json()) {
        check(&doc)?;
    }
}

/// The property must be able to fail: a config whose learning rate overflows float32 was once
/// accepted although its `get_config` (`null`) could not be read back.
#[test]
fn learning_rate_beyond_float32_is_refused() {
    let doc = serde_json::json!({"learning_rate": 1e39});
    let e = AdafactorConfig::from_keras_config(&doc).expect_err("1e39 does not fit float32");
    assert!(e.to_string().contains("learning_rate"), "{e}");
    assert!(check(&doc).is_ok());
    // The largest float32 is fine and round-trips.
    let doc = serde_json::json!({"learning_rate": f32::MAX as f64});
    assert!(AdafactorConfig::from_keras_config(&doc).is_ok());
    assert!(check(&doc).is_ok());
}
