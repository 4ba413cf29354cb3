//! The six Keras learning-rate schedules, as pure functions of the raw step.
//!
//! Keras evaluates a schedule in float32 at the optimizer's raw call count (before the
//! increment, so the first apply sees step 0). These functions do the same arithmetic in `f32`, in
//! Keras's order, so they agree with Keras to the last few ulps.

use crate::error::{Error, Result};
use crate::json::{bool_or, float, int_or_float, num, num_or, opt_num, reject_unknown, str_or};
use serde_json::{json, Map, Value};

/// A Keras `LearningRateSchedule`.
///
/// Build one with the constructors (which validate like Keras does), evaluate it with
/// [`LearningRateSchedule::value`], and convert it to and from Keras's serialized dict with
/// [`LearningRateSchedule::to_keras`] and [`LearningRateSchedule::from_keras`].
///
/// ```
/// use adafactor::LearningRateSchedule;
/// let s = LearningRateSchedule::exponential_decay(0.1, 10.0, 0.5, false).unwrap();
/// assert_eq!(s.value(0), 0.1);
/// assert!((s.value(10) - 0.05).abs() < 1e-8);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum LearningRateSchedule {
    /// `ExponentialDecay`: `init * decay_rate^(step / decay_steps)` (the exponent floored when
    /// `staircase`).
    ExponentialDecay {
        /// Initial learning rate.
        initial_learning_rate: f64,
        /// Steps per decay period (> 0).
        decay_steps: f64,
        /// Factor per period.
        decay_rate: f64,
        /// Decay in whole periods.
        staircase: bool,
        /// Keras name (default `"ExponentialDecay"`).
        name: String,
    },
    /// `PiecewiseConstantDecay`: `values[i]` between `boundaries[i-1]` (exclusive) and
    /// `boundaries[i]` (inclusive).
    PiecewiseConstantDecay {
        /// Step boundaries, one fewer than `values`.
        boundaries: Vec<f64>,
        /// Learning rate per interval.
        values: Vec<f64>,
        /// Keras name (default `"PiecewiseConstant"`).
        name: String,
    },
    /// `PolynomialDecay` from `initial_learning_rate` to `end_learning_rate`, optionally cycling.
    PolynomialDecay {
        /// Initial learning rate.
        initial_learning_rate: f64,
        /// Steps to reach the end rate (> 0).
        decay_steps: f64,
        /// Final learning rate (Keras default 0.0001).
        end_learning_rate: f64,
        /// Polynomial power (Keras default 1.0).
        power: f64,
        /// Restart after `decay_steps`, stretching the period.
        cycle: bool,
        /// Keras name (default `"PolynomialDecay"`).
        name: String,
    },
    /// `InverseTimeDecay`: `init / (1 + decay_rate * step / decay_steps)`.
    InverseTimeDecay {
        /// Initial learning rate.
        initial_learning_rate: f64,
        /// Steps per decay period (> 0).
        decay_steps: f64,
        /// Decay rate.
        decay_rate: f64,
        /// Decay in whole periods.
        staircase: bool,
        /// Keras name (default `"InverseTimeDecay"`).
        name: String,
    },
    /// `CosineDecay`, with optional linear warm-up to `warmup_target`.
    CosineDecay {
        /// Initial learning rate (the warm-up start when `warmup_target` is set).
        initial_learning_rate: f64,
        /// Steps of the cosine part (> 0).
        decay_steps: f64,
        /// Floor, as a fraction of the peak.
        alpha: f64,
        /// Keras name (default `"CosineDecay"`).
        name: String,
        /// Peak learning rate after warm-up; `None` means no warm-up (and `warmup_steps` is ignored).
        warmup_target: Option<f64>,
        /// Warm-up length in steps.
        warmup_steps: f64,
    },
    /// `CosineDecayRestarts` (SGDR).
    CosineDecayRestarts {
        /// Initial learning rate.
        initial_learning_rate: f64,
        /// Length of the first period (> 0).
        first_decay_steps: f64,
        /// Period growth factor (Keras default 2.0).
        t_mul: f64,
        /// Peak decay factor per restart (Keras default 1.0).
        m_mul: f64,
        /// Floor, as a fraction of the initial rate.
        alpha: f64,
        /// Keras name (default `"SGDRDecay"`).
        name: String,
    },
}

fn check_decay_steps(arg: &str, steps: f64) -> Result<()> {
    if steps > 0.0 && steps.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(
            arg,
            format!("Argument `{arg}` must be > 0. Received: {arg}={steps}"),
        ))
    }
}

fn check_rate(arg: &str, x: f64) -> Result<()> {
    if x.is_finite() && x >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            arg,
            format!("Argument `{arg}` must be a finite number >= 0. Received: {arg}={x}"),
        ))
    }
}

impl LearningRateSchedule {
    /// Keras `ExponentialDecay(initial_learning_rate, decay_steps, decay_rate, staircase)`.
    ///
    /// # Errors
    /// `decay_steps <= 0` (Keras's message), a negative or non-finite rate.
    pub fn exponential_decay(
        initial_learning_rate: f64,
        decay_steps: f64,
        decay_rate: f64,
        staircase: bool,
    ) -> Result<Self> {
        let s = Self::ExponentialDecay {
            initial_learning_rate,
            decay_steps,
            decay_rate,
            staircase,
            name: "ExponentialDecay".into(),
        };
        s.validate()?;
        Ok(s)
    }

    /// Keras `PiecewiseConstantDecay(boundaries, values)`.
    ///
    /// # Errors
    /// `boundaries.len() != values.len() - 1` (Keras's message), a negative or non-finite value.
    pub fn piecewise_constant(boundaries: Vec<f64>, values: Vec<f64>) -> Result<Self> {
        let s = Self::PiecewiseConstantDecay {
            boundaries,
            values,
            name: "PiecewiseConstant".into(),
        };
        s.validate()?;
        Ok(s)
    }

    /// Keras `PolynomialDecay(initial_learning_rate, decay_steps, end_learning_rate, power, cycle)`.
    ///
    /// # Errors
    /// `decay_steps <= 0`, a negative or non-finite rate.
    pub fn polynomial_decay(
        initial_learning_rate: f64,
        decay_steps: f64,
        end_learning_rate: f64,
        power: f64,
        cycle: bool,
    ) -> Result<Self> {
        let s = Self::PolynomialDecay {
            initial_learning_rate,
            decay_steps,
            end_learning_rate,
            power,
            cycle,
            name: "PolynomialDecay".into(),
        };
        s.validate()?;
        Ok(s)
    }

    /// Keras `InverseTimeDecay(initial_learning_rate, decay_steps, decay_rate, staircase)`.
    ///
    /// # Errors
    /// `decay_steps <= 0`, a negative or non-finite rate.
    pub fn inverse_time_decay(
        initial_learning_rate: f64,
        decay_steps: f64,
        decay_rate: f64,
        staircase: bool,
    ) -> Result<Self> {
        let s = Self::InverseTimeDecay {
            initial_learning_rate,
            decay_steps,
            decay_rate,
            staircase,
            name: "InverseTimeDecay".into(),
        };
        s.validate()?;
        Ok(s)
    }

    /// Keras `CosineDecay(initial_learning_rate, decay_steps, alpha, warmup_target, warmup_steps)`.
    ///
    /// # Errors
    /// `decay_steps <= 0`, a negative or non-finite rate, negative `warmup_steps`.
    pub fn cosine_decay(
        initial_learning_rate: f64,
        decay_steps: f64,
        alpha: f64,
        warmup_target: Option<f64>,
        warmup_steps: f64,
    ) -> Result<Self> {
        let s = Self::CosineDecay {
            initial_learning_rate,
            decay_steps,
            alpha,
            name: "CosineDecay".into(),
            warmup_target,
            warmup_steps,
        };
        s.validate()?;
        Ok(s)
    }

    /// Keras `CosineDecayRestarts(initial_learning_rate, first_decay_steps, t_mul, m_mul, alpha)`.
    ///
    /// # Errors
    /// `first_decay_steps <= 0`, a negative or non-finite rate or factor.
    pub fn cosine_decay_restarts(
        initial_learning_rate: f64,
        first_decay_steps: f64,
        t_mul: f64,
        m_mul: f64,
        alpha: f64,
    ) -> Result<Self> {
        let s = Self::CosineDecayRestarts {
            initial_learning_rate,
            first_decay_steps,
            t_mul,
            m_mul,
            alpha,
            name: "SGDRDecay".into(),
        };
        s.validate()?;
        Ok(s)
    }

    /// The Keras class name of this schedule.
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::ExponentialDecay { .. } => "ExponentialDecay",
            Self::PiecewiseConstantDecay { .. } => "PiecewiseConstantDecay",
            Self::PolynomialDecay { .. } => "PolynomialDecay",
            Self::InverseTimeDecay { .. } => "InverseTimeDecay",
            Self::CosineDecay { .. } => "CosineDecay",
            Self::CosineDecayRestarts { .. } => "CosineDecayRestarts",
        }
    }

    /// Checks every argument; the constructors and [`LearningRateSchedule::from_keras`] call it.
    ///
    /// # Errors
    /// Keras's errors (`decay_steps <= 0`, piecewise lengths) and ours: negative or non-finite
    /// learning rates, factors or step counts.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::ExponentialDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                ..
            }
            | Self::InverseTimeDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                ..
            } => {
                check_decay_steps("decay_steps", *decay_steps)?;
                check_rate("initial_learning_rate", *initial_learning_rate)?;
                check_rate("decay_rate", *decay_rate)
            }
            Self::PiecewiseConstantDecay {
                boundaries, values, ..
            } => {
                if boundaries.len() + 1 != values.len() {
                    return Err(Error::invalid(
                        "boundaries",
                        format!(
                            "The length of boundaries should be 1 less than the length of \
                             values. Received: boundaries={boundaries:?} of length {} and \
                             values={values:?} of length {}.",
                            boundaries.len(),
                            values.len()
                        ),
                    ));
                }
                if let Some(b) = boundaries.iter().find(|b| !b.is_finite()) {
                    return Err(Error::invalid(
                        "boundaries",
                        format!("Argument `boundaries` must be finite. Received: {b}"),
                    ));
                }
                values.iter().try_for_each(|v| check_rate("values", *v))
            }
            Self::PolynomialDecay {
                initial_learning_rate,
                decay_steps,
                end_learning_rate,
                power,
                ..
            } => {
                check_decay_steps("decay_steps", *decay_steps)?;
                check_rate("initial_learning_rate", *initial_learning_rate)?;
                check_rate("end_learning_rate", *end_learning_rate)?;
                check_rate("power", *power)
            }
            Self::CosineDecay {
                initial_learning_rate,
                decay_steps,
                alpha,
                warmup_target,
                warmup_steps,
                ..
            } => {
                check_decay_steps("decay_steps", *decay_steps)?;
                check_rate("initial_learning_rate", *initial_learning_rate)?;
                check_rate("alpha", *alpha)?;
                if let Some(w) = warmup_target {
                    check_rate("warmup_target", *w)?;
                }
                check_rate("warmup_steps", *warmup_steps)
            }
            Self::CosineDecayRestarts {
                initial_learning_rate,
                first_decay_steps,
                t_mul,
                m_mul,
                alpha,
                ..
            } => {
                check_decay_steps("first_decay_steps", *first_decay_steps)?;
                check_rate("initial_learning_rate", *initial_learning_rate)?;
                check_rate("t_mul", *t_mul)?;
                check_rate("m_mul", *m_mul)?;
                check_rate("alpha", *alpha)
            }
        }
    }

    /// The learning rate at raw step `step`, computed in float32 as Keras does. Never panics;
    /// a schedule that fails [`LearningRateSchedule::validate`] may give NaN.
    pub fn value(&self, step: u64) -> f32 {
        let s = step as f32;
        match self {
            Self::ExponentialDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                staircase,
                ..
            } => {
                let mut p = s / *decay_steps as f32;
                if *staircase {
                    p = p.floor();
                }
                *initial_learning_rate as f32 * (*decay_rate as f32).powf(p)
            }
            Self::PiecewiseConstantDecay {
                boundaries, values, ..
            } => {
                let idx = boundaries
                    .iter()
                    .position(|b| s <= *b as f32)
                    .unwrap_or(boundaries.len());
                // A validated schedule has one more value than boundaries; one built by hand
                // with fewer values takes its last value (or NaN with none) instead of panicking.
                values
                    .get(idx)
                    .or(values.last())
                    .map_or(f32::NAN, |v| *v as f32)
            }
            Self::PolynomialDecay {
                initial_learning_rate,
                decay_steps,
                end_learning_rate,
                power,
                cycle,
                ..
            } => {
                let d = *decay_steps as f32;
                let (s, ds) = if *cycle {
                    let mult = if s == 0.0 { 1.0 } else { (s / d).ceil() };
                    (s, d * mult)
                } else {
                    (s.min(d), d)
                };
                let init = *initial_learning_rate as f32;
                let end = *end_learning_rate as f32;
                (init - end) * (1.0 - s / ds).powf(*power as f32) + end
            }
            Self::InverseTimeDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                staircase,
                ..
            } => {
                let mut p = s / *decay_steps as f32;
                if *staircase {
                    p = p.floor();
                }
                *initial_learning_rate as f32 / (1.0 + *decay_rate as f32 * p)
            }
            Self::CosineDecay {
                initial_learning_rate,
                decay_steps,
                alpha,
                warmup_target,
                warmup_steps,
                ..
            } => {
                let d = *decay_steps as f32;
                let a = *alpha as f32;
                let init = *initial_learning_rate as f32;
                let decayed = |s: f32, base: f32| {
                    let frac = s / d;
                    let cosine = 0.5 * (1.0 + (std::f32::consts::PI * frac).cos());
                    base * ((1.0 - a) * cosine + a)
                };
                match warmup_target {
                    None => decayed(s.min(d), init),
                    Some(target) => {
                        let w = *warmup_steps as f32;
                        let target = *target as f32;
                        let s = s.min(d + w);
                        if s < w {
                            (target - init) * (s / w) + init
                        } else {
                            decayed(s - w, target)
                        }
                    }
                }
            }
            Self::CosineDecayRestarts {
                initial_learning_rate,
                first_decay_steps,
                t_mul,
                m_mul,
                alpha,
                ..
            } => {
                let f = s / *first_decay_steps as f32;
                let t_mul = *t_mul as f32;
                let (i, frac) = if t_mul == 1.0 {
                    let i = f.floor();
                    (i, f - i)
                } else {
                    let i = ((1.0 - f * (1.0 - t_mul)).ln() / t_mul.ln()).floor();
                    let sum_r = (1.0 - t_mul.powf(i)) / (1.0 - t_mul);
                    (i, (f - sum_r) / t_mul.powf(i))
                };
                let m_fac = (*m_mul as f32).powf(i);
                let a = *alpha as f32;
                let cosine = 0.5 * m_fac * (1.0 + (std::f32::consts::PI * frac).cos());
                *initial_learning_rate as f32 * ((1.0 - a) * cosine + a)
            }
        }
    }

    /// Keras's serialized form: `{"module", "class_name", "config", "registered_name"}`.
    pub fn to_keras(&self) -> Value {
        let config = match self {
            Self::ExponentialDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                staircase,
                name,
            }
            | Self::InverseTimeDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                staircase,
                name,
            } => json!({
                "initial_learning_rate": float(*initial_learning_rate),
                "decay_steps": int_or_float(*decay_steps),
                "decay_rate": float(*decay_rate),
                "staircase": staircase,
                "name": name,
            }),
            Self::PiecewiseConstantDecay {
                boundaries,
                values,
                name,
            } => json!({
                "boundaries": boundaries.iter().map(|b| int_or_float(*b)).collect::<Vec<_>>(),
                "values": values.iter().map(|v| float(*v)).collect::<Vec<_>>(),
                "name": name,
            }),
            Self::PolynomialDecay {
                initial_learning_rate,
                decay_steps,
                end_learning_rate,
                power,
                cycle,
                name,
            } => json!({
                "initial_learning_rate": float(*initial_learning_rate),
                "decay_steps": int_or_float(*decay_steps),
                "end_learning_rate": float(*end_learning_rate),
                "power": float(*power),
                "cycle": cycle,
                "name": name,
            }),
            Self::CosineDecay {
                initial_learning_rate,
                decay_steps,
                alpha,
                name,
                warmup_target,
                warmup_steps,
            } => json!({
                "initial_learning_rate": float(*initial_learning_rate),
                "decay_steps": int_or_float(*decay_steps),
                "alpha": float(*alpha),
                "name": name,
                "warmup_target": warmup_target.map(float),
                "warmup_steps": int_or_float(*warmup_steps),
            }),
            Self::CosineDecayRestarts {
                initial_learning_rate,
                first_decay_steps,
                t_mul,
                m_mul,
                alpha,
                name,
            } => json!({
                "initial_learning_rate": float(*initial_learning_rate),
                "first_decay_steps": int_or_float(*first_decay_steps),
                "t_mul": float(*t_mul),
                "m_mul": float(*m_mul),
                "alpha": float(*alpha),
                "name": name,
            }),
        };
        json!({
            "module": "keras.optimizers.schedules",
            "class_name": self.class_name(),
            "config": config,
            "registered_name": null,
        })
    }

    /// Reads Keras's serialized schedule: the current `{"module", "class_name", "config", ...}`
    /// form and the legacy `{"class_name", "config"}` form.
    ///
    /// # Errors
    /// Not an object, an unknown class, a missing or mistyped key, an unknown key (Keras's
    /// "Argument(s) not recognized"), or an invalid value (see [`LearningRateSchedule::validate`]).
    pub fn from_keras(value: &Value) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| {
            Error::MalformedConfig(format!(
                "a learning-rate schedule must be a dict, got {value}"
            ))
        })?;
        let class = obj
            .get("class_name")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::MalformedConfig("a serialized schedule needs a string `class_name`".into())
            })?;
        let empty = Map::new();
        let cfg = match obj.get("config") {
            Some(Value::Object(m)) => m,
            None => &empty,
            Some(v) => {
                return Err(Error::MalformedConfig(format!(
                    "{class}: `config` must be a dict, got {v}"
                )))
            }
        };
        let ctx = class;
        let s = match class {
            "ExponentialDecay" | "InverseTimeDecay" => {
                reject_unknown(
                    cfg,
                    &[
                        "initial_learning_rate",
                        "decay_steps",
                        "decay_rate",
                        "staircase",
                        "name",
                    ],
                    ctx,
                )?;
                let initial_learning_rate = num(cfg, "initial_learning_rate", ctx)?;
                let decay_steps = num(cfg, "decay_steps", ctx)?;
                let decay_rate = num(cfg, "decay_rate", ctx)?;
                let staircase = bool_or(cfg, "staircase", false, ctx)?;
                let name = str_or(cfg, "name", class, ctx)?;
                if class == "ExponentialDecay" {
                    Self::ExponentialDecay {
                        initial_learning_rate,
                        decay_steps,
                        decay_rate,
                        staircase,
                        name,
                    }
                } else {
                    Self::InverseTimeDecay {
                        initial_learning_rate,
                        decay_steps,
                        decay_rate,
                        staircase,
                        name,
                    }
                }
            }
            "PiecewiseConstantDecay" => {
                reject_unknown(cfg, &["boundaries", "values", "name"], ctx)?;
                let list = |key: &str| -> Result<Vec<f64>> {
                    cfg.get(key)
                        .and_then(Value::as_array)
                        .ok_or_else(|| {
                            Error::MalformedConfig(format!("{ctx}: `{key}` must be a list"))
                        })?
                        .iter()
                        .map(|v| crate::json::as_num(v, key, ctx))
                        .collect()
                };
                Self::PiecewiseConstantDecay {
                    boundaries: list("boundaries")?,
                    values: list("values")?,
                    name: str_or(cfg, "name", "PiecewiseConstant", ctx)?,
                }
            }
            "PolynomialDecay" => {
                reject_unknown(
                    cfg,
                    &[
                        "initial_learning_rate",
                        "decay_steps",
                        "end_learning_rate",
                        "power",
                        "cycle",
                        "name",
                    ],
                    ctx,
                )?;
                Self::PolynomialDecay {
                    initial_learning_rate: num(cfg, "initial_learning_rate", ctx)?,
                    decay_steps: num(cfg, "decay_steps", ctx)?,
                    end_learning_rate: num_or(cfg, "end_learning_rate", 0.0001, ctx)?,
                    power: num_or(cfg, "power", 1.0, ctx)?,
                    cycle: bool_or(cfg, "cycle", false, ctx)?,
                    name: str_or(cfg, "name", "PolynomialDecay", ctx)?,
                }
            }
            "CosineDecay" => {
                reject_unknown(
                    cfg,
                    &[
                        "initial_learning_rate",
                        "decay_steps",
                        "alpha",
                        "name",
                        "warmup_target",
                        "warmup_steps",
                    ],
                    ctx,
                )?;
                Self::CosineDecay {
                    initial_learning_rate: num(cfg, "initial_learning_rate", ctx)?,
                    decay_steps: num(cfg, "decay_steps", ctx)?,
                    alpha: num_or(cfg, "alpha", 0.0, ctx)?,
                    name: str_or(cfg, "name", "CosineDecay", ctx)?,
                    warmup_target: opt_num(cfg, "warmup_target", ctx)?,
                    warmup_steps: num_or(cfg, "warmup_steps", 0.0, ctx)?,
                }
            }
            "CosineDecayRestarts" => {
                reject_unknown(
                    cfg,
                    &[
                        "initial_learning_rate",
                        "first_decay_steps",
                        "t_mul",
                        "m_mul",
                        "alpha",
                        "name",
                    ],
                    ctx,
                )?;
                Self::CosineDecayRestarts {
                    initial_learning_rate: num(cfg, "initial_learning_rate", ctx)?,
                    first_decay_steps: num(cfg, "first_decay_steps", ctx)?,
                    t_mul: num_or(cfg, "t_mul", 2.0, ctx)?,
                    m_mul: num_or(cfg, "m_mul", 1.0, ctx)?,
                    alpha: num_or(cfg, "alpha", 0.0, ctx)?,
                    name: str_or(cfg, "name", "SGDRDecay", ctx)?,
                }
            }
            other => {
                return Err(Error::MalformedConfig(format!(
                    "unknown learning-rate schedule class `{other}`; expected one of \
                     ExponentialDecay, PiecewiseConstantDecay, PolynomialDecay, \
                     InverseTimeDecay, CosineDecay, CosineDecayRestarts"
                )))
            }
        };
        s.validate()?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEPS: [u64; 10] = [0, 1, 5, 10, 11, 15, 20, 25, 30, 35];

    /// Compares a schedule with the float32 values Keras 3.15.1 printed (spec, section 3).
    fn check_sequence(s: &LearningRateSchedule, expected: &[f64]) {
        for (step, want) in STEPS.iter().zip(expected) {
            let got = s.value(*step) as f64;
            assert!(
                (got - want).abs() <= 1e-6 + 1e-5 * want.abs(),
                "{} at step {step}: got {got}, want {want}",
                s.class_name()
            );
        }
    }

    #[test]
    fn exponential_decay_matches_keras() {
        let s = LearningRateSchedule::exponential_decay(0.1, 10.0, 0.5, false).unwrap();
        check_sequence(
            &s,
            &[
                0.1,
                0.0933033,
                0.0707107,
                0.05,
                0.04665165,
                0.03535534,
                0.025,
                0.01767767,
                0.0125,
                0.008838835,
            ],
        );
    }

    #[test]
    fn piecewise_constant_matches_keras() {
        let s = LearningRateSchedule::piecewise_constant(vec![10.0, 20.0], vec![1.0, 0.5, 0.1])
            .unwrap();
        check_sequence(&s, &[1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1]);
    }

    #[test]
    fn polynomial_decay_cycle_matches_keras() {
        let s = LearningRateSchedule::polynomial_decay(0.1, 10.0, 0.01, 2.0, true).unwrap();
        check_sequence(
            &s,
            &[
                0.1, 0.0829, 0.0325, 0.01, 0.028225, 0.015625, 0.01, 0.0125, 0.01, 0.01140625,
            ],
        );
    }

    #[test]
    fn inverse_time_decay_matches_keras() {
        let s = LearningRateSchedule::inverse_time_decay(0.1, 10.0, 0.5, false).unwrap();
        check_sequence(
            &s,
            &[
                0.1, 0.0952381, 0.08, 0.0666667, 0.0645161, 0.0571429, 0.05, 0.0444444, 0.04,
                0.0363636,
            ],
        );
    }

    #[test]
    fn cosine_decay_with_warmup_matches_keras() {
        let s = LearningRateSchedule::cosine_decay(0.0, 10.0, 0.1, Some(1.0), 5.0).unwrap();
        check_sequence(
            &s,
            &[0.0, 0.2, 1.0, 0.55, 0.41094226, 0.1, 0.1, 0.1, 0.1, 0.1],
        );
    }

    #[test]
    fn cosine_decay_without_warmup_ignores_warmup_steps() {
        let a = LearningRateSchedule::cosine_decay(0.5, 10.0, 0.0, None, 7.0).unwrap();
        let b = LearningRateSchedule::cosine_decay(0.5, 10.0, 0.0, None, 0.0).unwrap();
        for step in STEPS {
            assert_eq!(a.value(step), b.value(step));
        }
        assert_eq!(a.value(0), 0.5);
        assert!(a.value(10).abs() < 1e-7);
    }

    #[test]
    fn cosine_decay_restarts_matches_keras() {
        let s = LearningRateSchedule::cosine_decay_restarts(1.0, 10.0, 2.0, 0.5, 0.0).unwrap();
        check_sequence(
            &s,
            &[
                1.0, 0.97552824, 0.5, 0.5, 0.49692208, 0.4267767, 0.25, 0.07322331, 0.25,
                0.24048494,
            ],
        );
    }

    #[test]
    fn cosine_decay_restarts_with_unit_t_mul_repeats() {
        let s = LearningRateSchedule::cosine_decay_restarts(1.0, 4.0, 1.0, 1.0, 0.0).unwrap();
        assert_eq!(s.value(0), s.value(4));
        assert_eq!(s.value(1), s.value(9));
    }

    #[test]
    fn non_positive_decay_steps_is_keras_error() {
        let e = LearningRateSchedule::exponential_decay(0.1, 0.0, 0.5, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Argument `decay_steps` must be > 0. Received: decay_steps=0"
        );
        let e = LearningRateSchedule::cosine_decay_restarts(0.1, -2.0, 2.0, 1.0, 0.0).unwrap_err();
        assert!(e.to_string().contains("first_decay_steps"), "{e}");
    }

    #[test]
    fn piecewise_lengths_are_checked() {
        let e =
            LearningRateSchedule::piecewise_constant(vec![1.0, 2.0], vec![0.1, 0.2]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("The length of boundaries should be 1 less"),
            "{e}"
        );
    }

    #[test]
    fn keras_round_trip_every_class() {
        let all = [
            LearningRateSchedule::exponential_decay(0.05, 3.0, 0.5, true).unwrap(),
            LearningRateSchedule::piecewise_constant(vec![3.0, 6.0], vec![0.1, 0.03, 0.01])
                .unwrap(),
            LearningRateSchedule::polynomial_decay(0.05, 4.0, 0.001, 2.0, true).unwrap(),
            LearningRateSchedule::inverse_time_decay(0.05, 2.0, 0.5, false).unwrap(),
            LearningRateSchedule::cosine_decay(0.0, 6.0, 0.1, Some(0.05), 4.0).unwrap(),
            LearningRateSchedule::cosine_decay_restarts(0.05, 3.0, 2.0, 0.8, 0.01).unwrap(),
        ];
        for s in all {
            let j = s.to_keras();
            assert_eq!(LearningRateSchedule::from_keras(&j).unwrap(), s);
        }
    }

    #[test]
    fn keras_dict_exact_text() {
        let s = LearningRateSchedule::cosine_decay(0.05, 7.0, 0.05, None, 0.0).unwrap();
        assert_eq!(
            s.to_keras().to_string(),
            r#"{"module":"keras.optimizers.schedules","class_name":"CosineDecay","config":{"initial_learning_rate":0.05,"decay_steps":7,"alpha":0.05,"name":"CosineDecay","warmup_target":null,"warmup_steps":0},"registered_name":null}"#
        );
    }

    #[test]
    fn legacy_form_and_bad_input() {
        let legacy = json!({"class_name": "ExponentialDecay", "config": {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5}});
        let s = LearningRateSchedule::from_keras(&legacy).unwrap();
        assert_eq!(s.value(10), 0.05);
        let unknown = json!({"class_name": "Foo", "config": {}});
        assert!(LearningRateSchedule::from_keras(&unknown).is_err());
        let extra = json!({"class_name": "ExponentialDecay", "config": {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5, "bogus": 1}});
        let e = LearningRateSchedule::from_keras(&extra).unwrap_err();
        assert!(e.to_string().contains("Argument(s) not recognized"), "{e}");
        let missing = json!({"class_name": "ExponentialDecay", "config": {"decay_steps": 10}});
        assert!(LearningRateSchedule::from_keras(&missing).is_err());
    }
}
