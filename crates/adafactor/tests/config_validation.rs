//! Validation of the configuration: every invalid argument, read from Keras JSON or set in
//! code, is an error whose message names it. The adapters' constructors call the same
//! validation; their own tests check that they pass these errors on.

use adafactor::AdafactorConfig;

/// Every invalid argument of a Keras config is an error whose message names it.
#[test]
fn from_keras_config_errors_name_the_argument() {
    use serde_json::json;
    let sched = |class: &str, config: serde_json::Value| {
        json!({"module": "keras.optimizers.schedules", "class_name": class, "config": config,
               "registered_name": null})
    };
    let cases: Vec<(serde_json::Value, &str)> = vec![
        // Types.
        (json!({"learning_rate": 1}), "learning_rate"),
        (json!({"learning_rate": "0.1"}), "learning_rate"),
        (json!({"learning_rate": null}), "learning_rate"),
        (json!({"learning_rate": [0.1]}), "learning_rate"),
        (json!({"learning_rate": true}), "learning_rate"),
        (json!({"learning_rate": -0.1}), "learning_rate"),
        (json!({"learning_rate": 1e39}), "learning_rate"),
        (json!({"epsilon_1": "a"}), "epsilon_1"),
        (json!({"epsilon_2": null}), "epsilon_2"),
        (json!({"beta_2_decay": 0.5}), "beta_2_decay"),
        (json!({"clip_threshold": 0.0}), "clip_threshold"),
        (json!({"relative_step": 1}), "relative_step"),
        (json!({"use_ema": "yes"}), "use_ema"),
        (json!({"weight_decay": -0.1}), "weight_decay"),
        (json!({"weight_decay": "0.1"}), "weight_decay"),
        (json!({"clipnorm": -1.0}), "clipnorm"),
        (json!({"clipvalue": {}}), "clipvalue"),
        (json!({"global_clipnorm": -2.0}), "global_clipnorm"),
        (json!({"loss_scale_factor": 0.0}), "loss_scale_factor"),
        (json!({"loss_scale_factor": -4.0}), "loss_scale_factor"),
        (json!({"name": 5}), "name"),
        (json!({"jit_compile": "true"}), "jit_compile"),
        (json!({"on_nonfinite": "ignore"}), "on_nonfinite"),
        (json!({"on_nonfinite": 1}), "on_nonfinite"),
        // Keras's own checks.
        (json!({"clipnorm": 1.0, "clipvalue": 0.5}), "clipvalue"),
        (
            json!({"clipnorm": 1.0, "global_clipnorm": 0.5}),
            "global_clipnorm",
        ),
        (
            json!({"use_ema": true, "ema_momentum": 1.5}),
            "ema_momentum",
        ),
        (
            json!({"use_ema": true, "ema_momentum": -0.1}),
            "ema_momentum",
        ),
        (
            json!({"use_ema": true, "ema_overwrite_frequency": 0}),
            "ema_overwrite_frequency",
        ),
        (
            json!({"ema_overwrite_frequency": -1}),
            "ema_overwrite_frequency",
        ),
        (
            json!({"ema_overwrite_frequency": 2.5}),
            "ema_overwrite_frequency",
        ),
        (
            json!({"gradient_accumulation_steps": 1}),
            "gradient_accumulation_steps",
        ),
        (
            json!({"gradient_accumulation_steps": 0}),
            "gradient_accumulation_steps",
        ),
        (
            json!({"gradient_accumulation_steps": -3}),
            "gradient_accumulation_steps",
        ),
        (
            json!({"gradient_accumulation_steps": 2.0}),
            "gradient_accumulation_steps",
        ),
        // Unknown keys, at the top and in a schedule.
        (json!({"beta_1": 0.9}), "beta_1"),
        (
            json!({"class_name": "Adafactor", "config": {"momentum": 0.9}}),
            "momentum",
        ),
        (json!({"class_name": "Adam", "config": {}}), "class_name"),
        (json!({"class_name": "Adafactor", "config": 3}), "config"),
        (json!([1, 2]), "dict"),
        (json!("adafactor"), "dict"),
        // Malformed schedules.
        (json!({"learning_rate": {"config": {}}}), "class_name"),
        (json!({"learning_rate": sched("Nope", json!({}))}), "Nope"),
        (
            json!({"learning_rate": sched("CosineDecay", json!(5))}),
            "config",
        ),
        (
            json!({"learning_rate": sched("ExponentialDecay", json!({"initial_learning_rate": 0.1, "decay_steps": 0, "decay_rate": 0.5}))}),
            "decay_steps",
        ),
        (
            json!({"learning_rate": sched("InverseTimeDecay", json!({"initial_learning_rate": 0.1, "decay_steps": -2, "decay_rate": 0.5}))}),
            "decay_steps",
        ),
        (
            json!({"learning_rate": sched("PolynomialDecay", json!({"initial_learning_rate": 0.1, "decay_steps": 0}))}),
            "decay_steps",
        ),
        (
            json!({"learning_rate": sched("CosineDecay", json!({"initial_learning_rate": 0.1, "decay_steps": 0}))}),
            "decay_steps",
        ),
        (
            json!({"learning_rate": sched("CosineDecayRestarts", json!({"initial_learning_rate": 0.1, "first_decay_steps": 0}))}),
            "first_decay_steps",
        ),
        (
            json!({"learning_rate": sched("ExponentialDecay", json!({"initial_learning_rate": 0.1, "decay_rate": 0.5}))}),
            "decay_steps",
        ),
        (
            json!({"learning_rate": sched("ExponentialDecay", json!({"initial_learning_rate": "a", "decay_steps": 1, "decay_rate": 0.5}))}),
            "initial_learning_rate",
        ),
        (
            json!({"learning_rate": sched("ExponentialDecay", json!({"initial_learning_rate": -0.1, "decay_steps": 1, "decay_rate": 0.5}))}),
            "initial_learning_rate",
        ),
        (
            json!({"learning_rate": sched("ExponentialDecay", json!({"initial_learning_rate": 0.1, "decay_steps": 1, "decay_rate": 0.5, "staircase": 1}))}),
            "staircase",
        ),
        (
            json!({"learning_rate": sched("ExponentialDecay", json!({"initial_learning_rate": 0.1, "decay_steps": 1, "decay_rate": 0.5, "bogus": 1}))}),
            "bogus",
        ),
        (
            json!({"learning_rate": sched("PiecewiseConstantDecay", json!({"boundaries": [1, 2], "values": [0.1, 0.2]}))}),
            "boundaries",
        ),
        (
            json!({"learning_rate": sched("PiecewiseConstantDecay", json!({"boundaries": 1, "values": [0.1, 0.2]}))}),
            "boundaries",
        ),
        (
            json!({"learning_rate": sched("PiecewiseConstantDecay", json!({"boundaries": [1], "values": [0.1, "x"]}))}),
            "values",
        ),
        (
            json!({"learning_rate": sched("PiecewiseConstantDecay", json!({"boundaries": [1], "values": [0.1, -0.2]}))}),
            "values",
        ),
        (
            json!({"learning_rate": sched("CosineDecay", json!({"initial_learning_rate": 0.1, "decay_steps": 5, "warmup_target": -1.0}))}),
            "warmup_target",
        ),
        (
            json!({"learning_rate": sched("CosineDecay", json!({"initial_learning_rate": 0.1, "decay_steps": 5, "warmup_steps": -1}))}),
            "warmup_steps",
        ),
        (
            json!({"learning_rate": sched("CosineDecayRestarts", json!({"initial_learning_rate": 0.1, "first_decay_steps": 5, "t_mul": -1.0}))}),
            "t_mul",
        ),
        (
            json!({"learning_rate": sched("PolynomialDecay", json!({"initial_learning_rate": 0.1, "decay_steps": 5, "power": -1.0}))}),
            "power",
        ),
        (
            json!({"learning_rate": sched("PolynomialDecay", json!({"initial_learning_rate": 0.1, "decay_steps": 5, "name": 3}))}),
            "name",
        ),
    ];
    for (config, arg) in cases {
        match AdafactorConfig::from_keras_config(&config) {
            Ok(_) => panic!("{config} was accepted; expected an error naming `{arg}`"),
            Err(e) => assert!(
                e.to_string().contains(arg),
                "{config}: message `{e}` does not name `{arg}`"
            ),
        }
    }
}

/// Invalid values that JSON cannot hold (NaN, infinity), and values that leave their range once
/// rounded to the float32 the update uses, are refused by `validate`, with the argument named
/// (every adapter's constructors call it).
#[test]
fn validate_names_the_argument() {
    let nan_cases: Vec<(AdafactorConfig, &str)> = vec![
        (
            AdafactorConfig::with_learning_rate(f64::NAN),
            "learning_rate",
        ),
        (
            AdafactorConfig::with_learning_rate(f64::INFINITY),
            "learning_rate",
        ),
        (AdafactorConfig::with_learning_rate(-1e-3), "learning_rate"),
        (
            AdafactorConfig {
                epsilon_1: f64::NAN,
                ..Default::default()
            },
            "epsilon_1",
        ),
        (
            AdafactorConfig {
                epsilon_2: f64::INFINITY,
                ..Default::default()
            },
            "epsilon_2",
        ),
        (
            AdafactorConfig {
                clip_threshold: f64::NAN,
                ..Default::default()
            },
            "clip_threshold",
        ),
        (
            AdafactorConfig {
                beta_2_decay: f64::NEG_INFINITY,
                ..Default::default()
            },
            "beta_2_decay",
        ),
        (
            AdafactorConfig {
                ema_momentum: f64::NAN,
                ..Default::default()
            },
            "ema_momentum",
        ),
        (
            AdafactorConfig {
                weight_decay: Some(f64::NAN),
                ..Default::default()
            },
            "weight_decay",
        ),
        (
            AdafactorConfig {
                global_clipnorm: Some(f64::INFINITY),
                ..Default::default()
            },
            "global_clipnorm",
        ),
        (
            AdafactorConfig {
                loss_scale_factor: Some(f64::NAN),
                ..Default::default()
            },
            "loss_scale_factor",
        ),
        (
            AdafactorConfig {
                gradient_accumulation_steps: Some(1),
                ..Default::default()
            },
            "gradient_accumulation_steps",
        ),
        // Values that are fine as float64 but not as the float32 the update uses.
        (AdafactorConfig::with_learning_rate(1e39), "learning_rate"),
        (
            AdafactorConfig {
                loss_scale_factor: Some(1e-50),
                ..Default::default()
            },
            "loss_scale_factor",
        ),
        (
            AdafactorConfig {
                clip_threshold: 1e-46,
                ..Default::default()
            },
            "clip_threshold",
        ),
        (
            AdafactorConfig {
                epsilon_2: 1e39,
                ..Default::default()
            },
            "epsilon_2",
        ),
        (
            AdafactorConfig {
                weight_decay: Some(1e39),
                ..Default::default()
            },
            "weight_decay",
        ),
        (
            AdafactorConfig {
                beta_2_decay: -1e39,
                ..Default::default()
            },
            "beta_2_decay",
        ),
        (
            AdafactorConfig {
                use_ema: true,
                ema_overwrite_frequency: Some(0),
                ..Default::default()
            },
            "ema_overwrite_frequency",
        ),
    ];
    for (cfg, arg) in nan_cases {
        let e = cfg.validate().expect_err(arg);
        assert!(e.to_string().contains(arg), "{arg}: message `{e}`");
    }
}
