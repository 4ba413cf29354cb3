//! Small helpers to read and write the Keras JSON config format.

use crate::error::{Error, Result};
use serde_json::{Map, Value};

/// Reads a required number.
pub(crate) fn num(map: &Map<String, Value>, key: &str, ctx: &str) -> Result<f64> {
    match map.get(key) {
        Some(v) => as_num(v, key, ctx),
        None => Err(Error::MalformedConfig(format!(
            "{ctx}: missing key `{key}`"
        ))),
    }
}

/// Reads a number, or the default when the key is absent.
pub(crate) fn num_or(map: &Map<String, Value>, key: &str, default: f64, ctx: &str) -> Result<f64> {
    match map.get(key) {
        None => Ok(default),
        Some(v) => as_num(v, key, ctx),
    }
}

/// Reads an optional number (`null` or absent is `None`).
pub(crate) fn opt_num(map: &Map<String, Value>, key: &str, ctx: &str) -> Result<Option<f64>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => as_num(v, key, ctx).map(Some),
    }
}

/// Converts a JSON value to a number, naming the key when it is not one.
pub(crate) fn as_num(v: &Value, key: &str, ctx: &str) -> Result<f64> {
    v.as_f64()
        .ok_or_else(|| Error::MalformedConfig(format!("{ctx}: `{key}` must be a number, got {v}")))
}

/// Reads a boolean, or the default when the key is absent.
pub(crate) fn bool_or(
    map: &Map<String, Value>,
    key: &str,
    default: bool,
    ctx: &str,
) -> Result<bool> {
    match map.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(Error::MalformedConfig(format!(
            "{ctx}: `{key}` must be true or false, got {v}"
        ))),
    }
}

/// Reads a string, or the default when the key is absent or null.
pub(crate) fn str_or(
    map: &Map<String, Value>,
    key: &str,
    default: &str,
    ctx: &str,
) -> Result<String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(default.to_string()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(Error::MalformedConfig(format!(
            "{ctx}: `{key}` must be a string, got {v}"
        ))),
    }
}

/// Writes a number the way Python would print the value Keras holds: integral step counts as
/// integers, everything else as a float.
pub(crate) fn int_or_float(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        float(x)
    }
}

/// Writes a float (non-finite values, which JSON cannot hold, become `null`).
pub(crate) fn float(x: f64) -> Value {
    serde_json::Number::from_f64(x)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// Writes an optional float.
pub(crate) fn opt_float(x: Option<f64>) -> Value {
    x.map(float).unwrap_or(Value::Null)
}

/// Rejects keys outside `allowed`, with Keras's message.
pub(crate) fn reject_unknown(map: &Map<String, Value>, allowed: &[&str], ctx: &str) -> Result<()> {
    let unknown: Vec<&str> = map
        .keys()
        .map(String::as_str)
        .filter(|k| !allowed.contains(k))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(Error::invalid(
            unknown.join(", "),
            format!("{ctx}: Argument(s) not recognized: {unknown:?}"),
        ))
    }
}
