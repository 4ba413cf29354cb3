//! `AdafactorConfig`: every Keras argument with its Keras default, validation, and Keras JSON.

use crate::axes::FactoredAxes;
use crate::error::{Error, Result};
use crate::json::{float, opt_float, reject_unknown};
pub use crate::rounding::WeightRounding;
use crate::schedule::LearningRateSchedule;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The learning rate: a constant or a Keras schedule of the raw step.
#[derive(Debug, Clone, PartialEq)]
pub enum LearningRate {
    /// A constant. Keras keeps it in a float32 variable, so it is used (and serialized) rounded
    /// to `f32`.
    Constant(f64),
    /// A schedule evaluated at the raw call count before each apply.
    Schedule(LearningRateSchedule),
}

impl LearningRate {
    /// The value used at raw step `raw_iteration` (float32, as Keras computes it).
    pub fn value(&self, raw_iteration: u64) -> f32 {
        match self {
            LearningRate::Constant(lr) => *lr as f32,
            LearningRate::Schedule(s) => s.value(raw_iteration),
        }
    }
}

impl From<f64> for LearningRate {
    fn from(lr: f64) -> Self {
        LearningRate::Constant(lr)
    }
}

impl From<LearningRateSchedule> for LearningRate {
    fn from(s: LearningRateSchedule) -> Self {
        LearningRate::Schedule(s)
    }
}

/// What a step does when a gradient holds NaN or infinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnNonFinite {
    /// Refuse the step with an error naming the variable; nothing changes (default).
    #[default]
    Error,
    /// Skip the whole step as if it never happened (no weight, statistic, EMA or counter changes)
    /// and count it in `skipped_steps`. What loss-scaling users need.
    Skip,
    /// Do what Keras does: let the NaN or infinity flow into the weights.
    Propagate,
}

impl OnNonFinite {
    /// The config spelling: `"error"`, `"skip"` or `"propagate"`.
    pub fn as_str(self) -> &'static str {
        match self {
            OnNonFinite::Error => "error",
            OnNonFinite::Skip => "skip",
            OnNonFinite::Propagate => "propagate",
        }
    }

    /// Parses the config spelling.
    ///
    /// # Errors
    /// Any other string.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "error" => Ok(OnNonFinite::Error),
            "skip" => Ok(OnNonFinite::Skip),
            "propagate" => Ok(OnNonFinite::Propagate),
            other => Err(Error::invalid(
                "on_nonfinite",
                format!(
                    "`on_nonfinite` must be \"error\", \"skip\" or \"propagate\". \
                     Received: on_nonfinite={other:?}"
                ),
            )),
        }
    }
}

/// The Adafactor configuration: Keras 3 `keras.optimizers.Adafactor` arguments, Keras defaults.
///
/// Build it with struct-update syntax from [`Default`] and call [`AdafactorConfig::validate`]
/// (the optimizer constructors validate too):
///
/// ```
/// use adafactor::AdafactorConfig;
/// let cfg = AdafactorConfig { learning_rate: 1e-2.into(), weight_decay: Some(1e-4), ..Default::default() };
/// cfg.validate().unwrap();
/// assert_eq!(cfg.to_keras_config()["learning_rate"], 0.009999999776482582);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AdafactorConfig {
    /// `learning_rate`, default 0.001. The step size is `rho = min(lr, 1/sqrt(t))`.
    pub learning_rate: LearningRate,
    /// `beta_2_decay`, default -0.8: `beta2_t = 1 - t^beta_2_decay`.
    pub beta_2_decay: f64,
    /// `epsilon_1`, default 1e-30, added to the squared gradient.
    pub epsilon_1: f64,
    /// `epsilon_2`, default 1e-3, the floor of the parameter scale RMS(x).
    pub epsilon_2: f64,
    /// `clip_threshold`, default 1.0, the update-clipping threshold d.
    pub clip_threshold: f64,
    /// `relative_step`, default true. As in Keras 3.15.1 it has **no effect**: `min(lr, 1/sqrt(t))`
    /// applies either way. Kept so configs round-trip.
    pub relative_step: bool,
    /// `weight_decay`, default None: decoupled `x -= x * wd * lr` with the raw learning rate,
    /// before the update.
    pub weight_decay: Option<f64>,
    /// `clipnorm`, default None: clip each gradient to this L2 norm (0 means off, as in Keras).
    pub clipnorm: Option<f64>,
    /// `clipvalue`, default None: clamp each gradient element to `[-v, v]` (0 means off).
    pub clipvalue: Option<f64>,
    /// `global_clipnorm`, default None: clip all gradients together to this norm (0 means off).
    pub global_clipnorm: Option<f64>,
    /// `use_ema`, default false: keep an exponential moving average of the weights.
    pub use_ema: bool,
    /// `ema_momentum`, default 0.99, in [0, 1].
    pub ema_momentum: f64,
    /// `ema_overwrite_frequency`, default None: every this many updates, copy the averages into
    /// the weights.
    pub ema_overwrite_frequency: Option<u64>,
    /// `loss_scale_factor`, default None: gradients are divided by it first.
    pub loss_scale_factor: Option<f64>,
    /// `gradient_accumulation_steps`, default None: update every k calls with the mean gradient.
    pub gradient_accumulation_steps: Option<u64>,
    /// `jit_compile`, default true: use the fused in-place kernels where they apply (contiguous
    /// CPU tensors), else composed tensor ops. Not part of Keras 3's `get_config`.
    pub jit_compile: bool,
    /// `name`, default `"adafactor"`.
    pub name: String,
    /// Ours, not Keras's: what to do with a NaN or infinite gradient. Default
    /// [`OnNonFinite::Error`]. Written to `get_config` only when not the default.
    pub on_nonfinite: OnNonFinite,
    /// Ours, not Keras's: per variable name, the two axes to factor instead of the last two
    /// (see [`crate::axes`]); variables not listed use Keras's last two axes. Written to
    /// `get_config` as `"factored_axes": {"name": [row, col], ...}` only when not empty.
    pub factored_axes: BTreeMap<String, FactoredAxes>,
    /// Ours, not Keras's: how updates are rounded into bf16 and f16 weights. Default
    /// [`WeightRounding::Nearest`] (Keras's behaviour). Written to `get_config` only when not
    /// the default.
    pub weight_rounding: WeightRounding,
    /// Ours: the seed of [`WeightRounding::Stochastic`]'s random bits (default 0; any other
    /// value needs stochastic rounding). Written to `get_config` only when not 0.
    pub weight_rounding_seed: u64,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        AdafactorConfig {
            learning_rate: LearningRate::Constant(0.001),
            beta_2_decay: -0.8,
            epsilon_1: 1e-30,
            epsilon_2: 1e-3,
            clip_threshold: 1.0,
            relative_step: true,
            weight_decay: None,
            clipnorm: None,
            clipvalue: None,
            global_clipnorm: None,
            use_ema: false,
            ema_momentum: 0.99,
            ema_overwrite_frequency: None,
            loss_scale_factor: None,
            gradient_accumulation_steps: None,
            jit_compile: true,
            name: "adafactor".to_string(),
            on_nonfinite: OnNonFinite::Error,
            factored_axes: BTreeMap::new(),
            weight_rounding: WeightRounding::Nearest,
            weight_rounding_seed: 0,
        }
    }
}

/// Keys of Keras 3's `Adafactor.get_config()`, in Keras's order.
const KERAS_KEYS: [&str; 16] = [
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
];

/// Keys accepted on input besides [`KERAS_KEYS`]: legacy Keras and tf-keras keys, and ours.
const EXTRA_KEYS: [&str; 7] = [
    "decay",
    "jit_compile",
    "is_legacy_optimizer",
    "on_nonfinite",
    "factored_axes",
    "weight_rounding",
    "weight_rounding_seed",
];

fn py(x: Option<f64>) -> String {
    x.map_or("None".to_string(), |v| v.to_string())
}

/// Checks a value the update uses as a float32 (as Keras does) both as given and rounded to
/// float32: `1e-50 > 0` but is 0 as a float32, and `1e39` is finite but not as a float32.
fn finite_at_least(arg: &str, x: f64, min: f64, strict: bool) -> Result<()> {
    let in_range = |v: f64| v.is_finite() && if strict { v > min } else { v >= min };
    if in_range(x) && in_range((x as f32) as f64) {
        Ok(())
    } else {
        let rel = if strict { ">" } else { ">=" };
        Err(Error::invalid(
            arg,
            format!(
                "Argument `{arg}` must be a finite number {rel} {min}, also as a float32. \
                 Received: {arg}={x}"
            ),
        ))
    }
}

impl AdafactorConfig {
    /// A config with Keras defaults and the given learning rate.
    pub fn with_learning_rate(lr: impl Into<LearningRate>) -> Self {
        AdafactorConfig {
            learning_rate: lr.into(),
            ..Default::default()
        }
    }

    /// Checks every argument.
    ///
    /// # Errors
    /// With Keras's message: two clip options at once; `gradient_accumulation_steps < 2`;
    /// `ema_momentum` outside [0, 1]; `ema_overwrite_frequency` 0. Ours: a negative or non-finite
    /// learning rate (or a constant one beyond float32's range), epsilon, weight decay or clip
    /// value; `clip_threshold <= 0`; `loss_scale_factor <= 0`; `beta_2_decay > 0` or non-finite;
    /// any of these values out of range once rounded to float32 (as the update uses them); an
    /// invalid schedule; a `weight_rounding_seed` without stochastic rounding.
    pub fn validate(&self) -> Result<()> {
        match &self.learning_rate {
            LearningRate::Constant(lr) => {
                // Keras keeps a constant in a float32 variable (and `get_config` writes it
                // rounded), so it must also be finite as a float32.
                if !(lr.is_finite() && *lr >= 0.0 && (*lr as f32).is_finite()) {
                    return Err(Error::invalid(
                        "learning_rate",
                        format!(
                            "Argument `learning_rate` must be a finite float >= 0 (and at most \
                             float32's maximum). Received: learning_rate={lr}"
                        ),
                    ));
                }
            }
            LearningRate::Schedule(s) => s.validate()?,
        }
        let set = [self.clipnorm, self.clipvalue, self.global_clipnorm]
            .iter()
            .filter(|c| c.is_some())
            .count();
        if set > 1 {
            return Err(Error::invalid(
                "clipnorm",
                format!(
                    "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. \
                     Received: clipnorm={}, clipvalue={}, global_clipnorm={}",
                    py(self.clipnorm),
                    py(self.clipvalue),
                    py(self.global_clipnorm)
                ),
            ));
        }
        for (arg, v) in [
            ("clipnorm", self.clipnorm),
            ("clipvalue", self.clipvalue),
            ("global_clipnorm", self.global_clipnorm),
            ("weight_decay", self.weight_decay),
        ] {
            if let Some(v) = v {
                finite_at_least(arg, v, 0.0, false)?;
            }
        }
        if let Some(k) = self.gradient_accumulation_steps {
            if k < 2 {
                return Err(Error::invalid(
                    "gradient_accumulation_steps",
                    format!(
                        "`gradient_accumulation_steps` must be an integer >= 2. \
                         Received: gradient_accumulation_steps={k}"
                    ),
                ));
            }
        }
        if !(self.ema_momentum.is_finite() && (0.0..=1.0).contains(&self.ema_momentum)) {
            return Err(Error::invalid(
                "ema_momentum",
                format!(
                    "`ema_momentum` must be in the range [0, 1]. Received: ema_momentum={}",
                    self.ema_momentum
                ),
            ));
        }
        if self.ema_overwrite_frequency == Some(0) {
            return Err(Error::invalid(
                "ema_overwrite_frequency",
                "`ema_overwrite_frequency` must be an integer >= 1 or None. \
                 Received: ema_overwrite_frequency=0",
            ));
        }
        if let Some(f) = self.loss_scale_factor {
            finite_at_least("loss_scale_factor", f, 0.0, true)?;
        }
        finite_at_least("epsilon_1", self.epsilon_1, 0.0, false)?;
        finite_at_least("epsilon_2", self.epsilon_2, 0.0, false)?;
        finite_at_least("clip_threshold", self.clip_threshold, 0.0, true)?;
        if !(self.beta_2_decay.is_finite()
            && (self.beta_2_decay as f32).is_finite()
            && self.beta_2_decay <= 0.0)
        {
            return Err(Error::invalid(
                "beta_2_decay",
                format!(
                    "Argument `beta_2_decay` must be a finite number <= 0. \
                     Received: beta_2_decay={}",
                    self.beta_2_decay
                ),
            ));
        }
        self.validate_factored_axes()?;
        crate::rounding::validate(self.weight_rounding, self.weight_rounding_seed)
    }

    /// Checks `factored_axes` on its own (each pair names two different axes); the axes are
    /// checked against the variables' shapes when the optimizer is built
    /// ([`AdafactorConfig::check_factored_axes`]).
    ///
    /// # Errors
    /// Equal axes, naming the variable and the value.
    pub fn validate_factored_axes(&self) -> Result<()> {
        for (name, axes) in &self.factored_axes {
            axes.check_pair(name)?;
        }
        Ok(())
    }

    /// The `factored_axes` of a Keras config (the `get_config()` dict or the serialized wrapper),
    /// without reading anything else: empty when absent.
    ///
    /// # Errors
    /// A malformed `factored_axes`.
    pub fn factored_axes_from_keras(value: &Value) -> Result<BTreeMap<String, FactoredAxes>> {
        let cfg = match value.get("config") {
            Some(inner) if value.get("class_name").is_some() => inner,
            _ => value,
        };
        factored_axes_from_json(cfg.get("factored_axes"))
    }

    /// The factored axes of the variable called `name` (`None`: Keras's last two axes).
    pub fn axes_of(&self, name: &str) -> Option<FactoredAxes> {
        self.factored_axes.get(name).copied()
    }

    /// Checks `factored_axes` against the variables an optimizer is built on (`(name, shape)`).
    ///
    /// # Errors
    /// A name that is not one of the variables; axes out of range for the variable's rank or
    /// equal; each naming the variable and the value.
    pub fn check_factored_axes<'a>(
        &self,
        vars: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ) -> Result<()> {
        let shapes: BTreeMap<&str, &[usize]> = vars.into_iter().collect();
        for (name, axes) in &self.factored_axes {
            match shapes.get(name.as_str()) {
                Some(shape) => axes.check(name, shape)?,
                None => {
                    return Err(Error::invalid(
                        "factored_axes",
                        format!(
                            "`factored_axes` names variable `{name}` ([{}, {}]), but the \
                             optimizer has no variable of that name",
                            axes.row, axes.col
                        ),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Keras 3's `get_config()`: the same keys in the same order, `learning_rate` rounded to
    /// float32 or a nested schedule dict. `on_nonfinite`, `factored_axes`, `weight_rounding` and
    /// `weight_rounding_seed` are added only when not the default.
    pub fn to_keras_config(&self) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), Value::from(self.name.clone()));
        let lr = match &self.learning_rate {
            LearningRate::Constant(lr) => float((*lr as f32) as f64),
            LearningRate::Schedule(s) => s.to_keras(),
        };
        m.insert("learning_rate".into(), lr);
        m.insert("weight_decay".into(), opt_float(self.weight_decay));
        m.insert("clipnorm".into(), opt_float(self.clipnorm));
        m.insert("global_clipnorm".into(), opt_float(self.global_clipnorm));
        m.insert("clipvalue".into(), opt_float(self.clipvalue));
        m.insert("use_ema".into(), Value::from(self.use_ema));
        m.insert("ema_momentum".into(), float(self.ema_momentum));
        m.insert(
            "ema_overwrite_frequency".into(),
            self.ema_overwrite_frequency
                .map_or(Value::Null, Value::from),
        );
        m.insert(
            "loss_scale_factor".into(),
            opt_float(self.loss_scale_factor),
        );
        m.insert(
            "gradient_accumulation_steps".into(),
            self.gradient_accumulation_steps
                .map_or(Value::Null, Value::from),
        );
        m.insert("beta_2_decay".into(), float(self.beta_2_decay));
        m.insert("epsilon_1".into(), float(self.epsilon_1));
        m.insert("epsilon_2".into(), float(self.epsilon_2));
        m.insert("clip_threshold".into(), float(self.clip_threshold));
        m.insert("relative_step".into(), Value::from(self.relative_step));
        if self.on_nonfinite != OnNonFinite::Error {
            m.insert(
                "on_nonfinite".into(),
                Value::from(self.on_nonfinite.as_str()),
            );
        }
        if !self.factored_axes.is_empty() {
            m.insert(
                "factored_axes".into(),
                factored_axes_json(&self.factored_axes),
            );
        }
        crate::rounding::write_keys(self.weight_rounding, self.weight_rounding_seed, &mut m);
        Value::Object(m)
    }

    /// `keras.optimizers.serialize(optimizer)`: the config wrapped with module and class name.
    pub fn to_keras_serialized(&self) -> Value {
        serde_json::json!({
            "module": "keras.optimizers",
            "class_name": "Adafactor",
            "config": self.to_keras_config(),
            "registered_name": null,
        })
    }

    /// Reads a Keras config: the `get_config()` dict or the `keras.optimizers.serialize()` wrapper.
    /// Absent keys take Keras defaults; `decay`, `is_legacy_optimizer` are accepted and ignored
    /// as Keras does; `jit_compile`, `on_nonfinite`, `factored_axes`, `weight_rounding` and
    /// `weight_rounding_seed` are read. The result is validated.
    ///
    /// # Errors
    /// A wrapper whose `class_name` is not `Adafactor`; unknown keys (Keras's "Argument(s) not
    /// recognized"); a `learning_rate` that is an integer or not a number or schedule dict
    /// (Keras's message); mistyped values; anything [`AdafactorConfig::validate`] rejects.
    pub fn from_keras_config(value: &Value) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| {
            Error::MalformedConfig(format!("an optimizer config must be a dict, got {value}"))
        })?;
        let cfg = if obj.contains_key("class_name") && obj.contains_key("config") {
            let class = obj.get("class_name").and_then(Value::as_str).unwrap_or("");
            if class != "Adafactor" {
                return Err(Error::MalformedConfig(format!(
                    "expected class_name \"Adafactor\", got {:?}",
                    obj.get("class_name").cloned().unwrap_or(Value::Null)
                )));
            }
            obj.get("config")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    Error::MalformedConfig(
                        "`config` of a serialized optimizer must be a dict".into(),
                    )
                })?
        } else {
            obj
        };
        let mut allowed: Vec<&str> = KERAS_KEYS.to_vec();
        allowed.extend(EXTRA_KEYS);
        reject_unknown(cfg, &allowed, "Adafactor")?;

        let ctx = "Adafactor";
        let d = AdafactorConfig::default();
        let f = |key: &str, default: f64| crate::json::num_or(cfg, key, default, ctx);
        let of = |key: &str| crate::json::opt_num(cfg, key, ctx);
        let b = |key: &str, default: bool| crate::json::bool_or(cfg, key, default, ctx);
        let oi = |key: &str| -> Result<Option<u64>> {
            match cfg.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    Error::invalid(
                        key,
                        format!("`{key}` must be an integer >= 2 or None. Received: {key}={v}"),
                    )
                }),
            }
        };
        let learning_rate = match cfg.get("learning_rate") {
            None => d.learning_rate.clone(),
            Some(Value::Number(n)) if n.is_f64() => {
                LearningRate::Constant(n.as_f64().unwrap_or(0.0))
            }
            Some(v @ Value::Object(_)) => {
                LearningRate::Schedule(LearningRateSchedule::from_keras(v)?)
            }
            Some(v) => {
                return Err(Error::invalid(
                    "learning_rate",
                    format!(
                        "Argument `learning_rate` should be float, or an instance of \
                         LearningRateSchedule, or a callable (that takes in the current \
                         iteration value and returns the corresponding learning rate value). \
                         Received instead: learning_rate={v}"
                    ),
                ))
            }
        };
        let ema_overwrite_frequency = match cfg.get("ema_overwrite_frequency") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                Error::invalid(
                    "ema_overwrite_frequency",
                    format!(
                        "`ema_overwrite_frequency` must be an integer >= 1 or None. \
                         Received: ema_overwrite_frequency={v}"
                    ),
                )
            })?),
        };
        let on_nonfinite = match cfg.get("on_nonfinite") {
            None | Some(Value::Null) => OnNonFinite::Error,
            Some(Value::String(s)) => OnNonFinite::parse(s)?,
            Some(v) => OnNonFinite::parse(&v.to_string())?,
        };
        let (weight_rounding, weight_rounding_seed) = crate::rounding::read_keys(cfg)?;
        let config = AdafactorConfig {
            learning_rate,
            beta_2_decay: f("beta_2_decay", d.beta_2_decay)?,
            epsilon_1: f("epsilon_1", d.epsilon_1)?,
            epsilon_2: f("epsilon_2", d.epsilon_2)?,
            clip_threshold: f("clip_threshold", d.clip_threshold)?,
            relative_step: b("relative_step", d.relative_step)?,
            weight_decay: of("weight_decay")?,
            clipnorm: of("clipnorm")?,
            clipvalue: of("clipvalue")?,
            global_clipnorm: of("global_clipnorm")?,
            use_ema: b("use_ema", d.use_ema)?,
            ema_momentum: f("ema_momentum", d.ema_momentum)?,
            ema_overwrite_frequency,
            loss_scale_factor: of("loss_scale_factor")?,
            gradient_accumulation_steps: oi("gradient_accumulation_steps")?,
            jit_compile: b("jit_compile", d.jit_compile)?,
            name: crate::json::str_or(cfg, "name", &d.name, ctx)?,
            on_nonfinite,
            factored_axes: factored_axes_from_json(cfg.get("factored_axes"))?,
            weight_rounding,
            weight_rounding_seed,
        };
        config.validate()?;
        Ok(config)
    }

    /// The learning rate Keras's `learning_rate` property reports at raw step `raw_iteration`.
    pub fn learning_rate_at(&self, raw_iteration: u64) -> f32 {
        self.learning_rate.value(raw_iteration)
    }
}

/// `factored_axes` as JSON: `{"name": [row, col], ...}`, names in order.
fn factored_axes_json(axes: &BTreeMap<String, FactoredAxes>) -> Value {
    Value::Object(
        axes.iter()
            .map(|(k, a)| (k.clone(), serde_json::json!([a.row, a.col])))
            .collect(),
    )
}

/// Reads `factored_axes` (absent or `null`: none).
fn factored_axes_from_json(v: Option<&Value>) -> Result<BTreeMap<String, FactoredAxes>> {
    let bad = |what: String| {
        Error::invalid(
            "factored_axes",
            format!(
                "`factored_axes` must map variable names to [row_axis, col_axis], two integers \
                 >= 0. Received: {what}"
            ),
        )
    };
    let obj = match v {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(o)) => o,
        Some(other) => return Err(bad(format!("factored_axes={other}"))),
    };
    obj.iter()
        .map(|(name, pair)| {
            let axes = pair
                .as_array()
                .filter(|a| a.len() == 2)
                .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
                .and_then(|(r, c)| Some((usize::try_from(r).ok()?, usize::try_from(c).ok()?)));
            match axes {
                Some((row, col)) => Ok((name.clone(), FactoredAxes { row, col })),
                None => Err(bad(format!("{name:?}: {pair}"))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn default_get_config_is_keras_text() {
        let got = AdafactorConfig::default().to_keras_config().to_string();
        let want = r#"{"name":"adafactor","learning_rate":0.0010000000474974513,"weight_decay":null,"clipnorm":null,"global_clipnorm":null,"clipvalue":null,"use_ema":false,"ema_momentum":0.99,"ema_overwrite_frequency":null,"loss_scale_factor":null,"gradient_accumulation_steps":null,"beta_2_decay":-0.8,"epsilon_1":1e-30,"epsilon_2":0.001,"clip_threshold":1.0,"relative_step":true}"#;
        assert_eq!(got, want);
    }

    #[test]
    fn round_trip_with_schedule_and_options() {
        let cfg = AdafactorConfig {
            learning_rate: LearningRateSchedule::cosine_decay(0.05, 9.0, 0.2, None, 0.0)
                .unwrap()
                .into(),
            weight_decay: Some(0.05),
            global_clipnorm: Some(2.0),
            use_ema: true,
            ema_momentum: 0.85,
            ema_overwrite_frequency: Some(5),
            gradient_accumulation_steps: Some(3),
            on_nonfinite: OnNonFinite::Skip,
            weight_rounding: WeightRounding::Stochastic,
            weight_rounding_seed: u64::MAX,
            ..Default::default()
        };
        let back = AdafactorConfig::from_keras_config(&cfg.to_keras_serialized()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn weight_rounding_keys_are_written_only_when_set_and_checked() {
        let stochastic = AdafactorConfig {
            weight_rounding: WeightRounding::Stochastic,
            ..Default::default()
        };
        let c = stochastic.to_keras_config();
        assert_eq!(c["weight_rounding"], "stochastic");
        assert!(c.get("weight_rounding_seed").is_none());
        let seeded = AdafactorConfig {
            weight_rounding_seed: 42,
            ..stochastic.clone()
        };
        assert_eq!(seeded.to_keras_config()["weight_rounding_seed"], 42);
        let back = AdafactorConfig::from_keras_config(&seeded.to_keras_config()).unwrap();
        assert_eq!(
            (back.weight_rounding, back.weight_rounding_seed),
            (WeightRounding::Stochastic, 42)
        );
        let bad = [
            (json!({"weight_rounding": "up"}), "weight_rounding"),
            (json!({"weight_rounding": 1}), "weight_rounding"),
            (
                json!({"weight_rounding": "stochastic", "weight_rounding_seed": -1}),
                "weight_rounding_seed",
            ),
            (
                json!({"weight_rounding": "stochastic", "weight_rounding_seed": 1.5}),
                "weight_rounding_seed",
            ),
            (json!({"weight_rounding_seed": 3}), "weight_rounding_seed"),
        ];
        for (cfg, arg) in bad {
            match AdafactorConfig::from_keras_config(&cfg) {
                Err(Error::InvalidArgument { argument, message }) => {
                    assert_eq!(argument, arg, "{cfg}: {message}");
                    assert!(message.contains("Received"), "{message}");
                }
                other => panic!("{cfg}: expected an error, got {other:?}"),
            }
        }
        let e = AdafactorConfig {
            weight_rounding_seed: 3,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("stochastic"), "{e}");
    }

    #[test]
    fn two_clip_options_is_keras_error() {
        let cfg = AdafactorConfig {
            clipnorm: Some(1.0),
            clipvalue: Some(0.5),
            ..Default::default()
        };
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. \
             Received: clipnorm=1, clipvalue=0.5, global_clipnorm=None"
        );
    }

    #[test]
    fn every_argument_is_validated() {
        let bad: Vec<(&str, AdafactorConfig)> = vec![
            ("learning_rate", AdafactorConfig::with_learning_rate(-1.0)),
            (
                "learning_rate",
                AdafactorConfig::with_learning_rate(f64::NAN),
            ),
            (
                "gradient_accumulation_steps",
                AdafactorConfig {
                    gradient_accumulation_steps: Some(1),
                    ..Default::default()
                },
            ),
            (
                "ema_momentum",
                AdafactorConfig {
                    use_ema: true,
                    ema_momentum: 1.5,
                    ..Default::default()
                },
            ),
            (
                "ema_overwrite_frequency",
                AdafactorConfig {
                    use_ema: true,
                    ema_overwrite_frequency: Some(0),
                    ..Default::default()
                },
            ),
            (
                "loss_scale_factor",
                AdafactorConfig {
                    loss_scale_factor: Some(0.0),
                    ..Default::default()
                },
            ),
            (
                "weight_decay",
                AdafactorConfig {
                    weight_decay: Some(f64::INFINITY),
                    ..Default::default()
                },
            ),
            (
                "clipnorm",
                AdafactorConfig {
                    clipnorm: Some(-1.0),
                    ..Default::default()
                },
            ),
            (
                "clip_threshold",
                AdafactorConfig {
                    clip_threshold: 0.0,
                    ..Default::default()
                },
            ),
            (
                "epsilon_1",
                AdafactorConfig {
                    epsilon_1: -1e-30,
                    ..Default::default()
                },
            ),
            (
                "beta_2_decay",
                AdafactorConfig {
                    beta_2_decay: 0.5,
                    ..Default::default()
                },
            ),
        ];
        for (arg, cfg) in bad {
            match cfg.validate() {
                Err(Error::InvalidArgument { argument, message }) => {
                    assert_eq!(argument, arg, "{message}");
                    assert!(message.contains(arg), "{message}");
                }
                other => panic!("{arg}: expected an error, got {other:?}"),
            }
        }
    }

    #[test]
    fn from_config_rejects_like_keras() {
        let e = AdafactorConfig::from_keras_config(&json!({"learning_rate": 1})).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Argument `learning_rate` should be float"),
            "{e}"
        );
        let e = AdafactorConfig::from_keras_config(&json!({"foo": 1})).unwrap_err();
        assert!(e.to_string().contains("Argument(s) not recognized"), "{e}");
        let e = AdafactorConfig::from_keras_config(&json!({"gradient_accumulation_steps": 1}))
            .unwrap_err();
        assert!(e.to_string().contains(">= 2"), "{e}");
        let e = AdafactorConfig::from_keras_config(&json!({"learning_rate": {"class_name": "ExponentialDecay", "config": {"initial_learning_rate": 0.1, "decay_steps": 0, "decay_rate": 0.5}}})).unwrap_err();
        assert!(e.to_string().contains("decay_steps"), "{e}");
        let e = AdafactorConfig::from_keras_config(&json!({"class_name": "Adam", "config": {}}))
            .unwrap_err();
        assert!(e.to_string().contains("Adafactor"), "{e}");
        // Keras accepts and ignores `decay`; tf-keras writes `jit_compile` and `is_legacy_optimizer`.
        let c = AdafactorConfig::from_keras_config(
            &json!({"decay": 0.0, "jit_compile": false, "is_legacy_optimizer": false}),
        )
        .unwrap();
        assert!(!c.jit_compile);
    }
}
