//! Arbitrary bytes -> JSON -> `Adafactor::from_config` -> `get_config` round trip.
//!
//! Must hold for every input: no panic; a config that loads round-trips through `get_config`,
//! both as a value and as JSON text, to the same config (with the constant learning rate rounded
//! to float32 and `jit_compile`, which Keras 3 does not write, back at its default).
#![no_main]

use candle_adafactor::{Adafactor, AdafactorConfig, LearningRate};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

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

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Ok(opt) = Adafactor::from_config(&doc) else {
        return;
    };
    let want = after_round_trip(opt.config());
    let config = opt.get_config();
    let back = Adafactor::from_config(&config)
        .unwrap_or_else(|e| panic!("get_config of {doc} does not load: {config}: {e}"));
    assert_eq!(back.config(), &want, "value round trip of {doc}");
    assert_eq!(back.get_config(), config);
    let text = serde_json::to_string(&config).expect("serialize");
    let parsed: Value = serde_json::from_str(&text).expect("parse our own output");
    let from_text = Adafactor::from_config(&parsed)
        .unwrap_or_else(|e| panic!("text of get_config does not load: {text}: {e}"));
    assert_eq!(from_text.config(), &want, "text round trip of {text}");
    let serialized = opt.config().to_keras_serialized();
    let wrapped = Adafactor::from_config(&serialized)
        .unwrap_or_else(|e| panic!("serialized form does not load: {serialized}: {e}"));
    assert_eq!(wrapped.config(), &want);
});
