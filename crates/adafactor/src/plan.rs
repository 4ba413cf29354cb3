//! The apply-pipeline control: which stages run in one `apply_gradients` call and with which
//! scalars. Pure functions of the config and the raw call count, shared by both data paths.
//!
//! Keras's order inside one apply: drop missing gradients, unscale by `loss_scale_factor`,
//! accumulate (or on an update call, average with the accumulator), clip, decoupled weight decay,
//! `update_step` per variable, EMA, EMA overwrite, `iterations += 1`.

use crate::config::AdafactorConfig;
use crate::rounding::{StepRounding, WeightRounding};

/// Which gradient clipping runs (at most one, as Keras enforces).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Clip {
    /// No clipping.
    None,
    /// Per variable: `g * c / max(||g||, c)`.
    Norm(f32),
    /// All gradients together: `g * gc * min(1/N, 1/gc)` with N the global norm.
    GlobalNorm(f32),
    /// Elementwise clamp to `[-v, v]`.
    Value(f32),
}

impl Clip {
    /// Whether the clip needs the gradients' norms (`clipnorm`, `global_clipnorm`).
    pub fn uses_norms(&self) -> bool {
        matches!(self, Clip::Norm(_) | Clip::GlobalNorm(_))
    }

    /// The clip a config asks for. Values `<= 0` do nothing, as in Keras.
    pub fn from_config(cfg: &AdafactorConfig) -> Clip {
        let on = |v: Option<f64>| v.filter(|v| *v > 0.0).map(|v| v as f32);
        if let Some(c) = on(cfg.clipnorm) {
            Clip::Norm(c)
        } else if let Some(c) = on(cfg.global_clipnorm) {
            Clip::GlobalNorm(c)
        } else if let Some(c) = on(cfg.clipvalue) {
            Clip::Value(c)
        } else {
            Clip::None
        }
    }
}

/// The scalars of one Adafactor update (`update_step`), all in float32 as Keras computes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateScalars {
    /// The raw learning rate (constant, or schedule at the raw step).
    pub learning_rate: f32,
    /// `t = iterations + 1`, with `iterations` the completed-update count.
    pub t: f32,
    /// `beta2_t = 1 - t^beta_2_decay` (0 at t = 1).
    pub beta2_t: f32,
    /// `rho = min(lr, 1/sqrt(t))` (always, whatever `relative_step` says).
    pub rho: f32,
    /// `epsilon_1` as float32.
    pub epsilon_1: f32,
    /// `epsilon_2` as float32.
    pub epsilon_2: f32,
    /// `clip_threshold` as float32.
    pub clip_threshold: f32,
    /// `weight_decay` as float32, when set: `x -= x * wd * lr` before the update.
    pub weight_decay: Option<f32>,
    /// Gradient clipping.
    pub clip: Clip,
}

impl UpdateScalars {
    /// `alpha = max(epsilon_2, RMS(x)) * rho` (x after weight decay): the step relative to the
    /// parameter scale (the relative step size of Shazeer & Stern, 2018, Algorithm 4).
    pub fn alpha(&self, rms_x: f32) -> f32 {
        self.epsilon_2.max(rms_x) * self.rho
    }

    /// The update-clipping divisor `max(1, RMS(u) / clip_threshold)` (the update clipping of
    /// Shazeer & Stern, 2018).
    pub fn update_clip_divisor(&self, rms_u: f32) -> f32 {
        1f32.max(rms_u / self.clip_threshold)
    }
}

/// What happens to the gradient accumulators in this call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accumulation {
    /// No accumulation configured: the gradient is used as is.
    Off,
    /// Not an update call: `acc += g`, nothing else of the update runs.
    Accumulate,
    /// An update call: `g = (g + acc) / k`, then the update, then every accumulator is zeroed.
    Apply {
        /// `gradient_accumulation_steps`.
        steps: u64,
    },
}

/// EMA work in this call (runs on every call when `use_ema`, accumulation calls included).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmaPlan {
    /// `m` in `avg = m * avg + (1 - m) * x`: 0 while `iterations == 0` (the first update copies).
    pub momentum: f32,
    /// Whether the weights are overwritten with the averages after the EMA update.
    pub overwrite: bool,
    /// Stochastic rounding of the overwritten weights (`None`: to nearest).
    pub rounding: Option<StepRounding>,
}

/// The plan for one `apply_gradients` call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepPlan {
    /// The raw call count before this call (Keras `_iterations`).
    pub raw_iteration: u64,
    /// Completed updates before this call (Keras `iterations`).
    pub iterations: u64,
    /// `1 / loss_scale_factor` is applied first when set.
    pub loss_scale_factor: Option<f32>,
    /// Accumulator handling.
    pub accumulation: Accumulation,
    /// The update scalars, or `None` on an accumulate-only call.
    pub update: Option<UpdateScalars>,
    /// EMA work, when `use_ema`.
    pub ema: Option<EmaPlan>,
    /// Stochastic rounding of the weights written in this call (`None`: to nearest, Keras's
    /// behaviour).
    pub rounding: Option<StepRounding>,
}

/// Completed updates after `raw` calls (Keras's `iterations` property).
pub fn completed_updates(cfg: &AdafactorConfig, raw: u64) -> u64 {
    match cfg.gradient_accumulation_steps {
        Some(k) if k >= 2 => raw / k,
        _ => raw,
    }
}

/// `rho_t = min(lr, 1/sqrt(t))`, the step size (a true division, as Keras): the relative step
/// size of Shazeer & Stern (2018), arXiv:1804.04235, Algorithm 4.
///
/// ```
/// assert_eq!(adafactor::plan::rho(1e-2, 1.0), 1e-2);
/// assert_eq!(adafactor::plan::rho(1e-2, 1e6), 1e-3);
/// ```
pub fn rho(learning_rate: f32, t: f32) -> f32 {
    learning_rate.min(1.0 / t.sqrt())
}

/// `beta2_t = 1 - t^beta_2_decay`: 0 at the first update, so it needs no bias correction
/// (the increasing decay parameter of Shazeer & Stern, 2018).
///
/// ```
/// assert_eq!(adafactor::plan::beta2(1.0, -0.8), 0.0);
/// // At t = 10^4 the decay is 10^-3.2.
/// assert!((adafactor::plan::beta2(1e4, -0.8) - (1.0 - 10f32.powf(-3.2))).abs() < 1e-6);
/// ```
pub fn beta2(t: f32, beta_2_decay: f32) -> f32 {
    1.0 - t.powf(beta_2_decay)
}

impl StepPlan {
    /// Plans the call made when `raw_iteration` calls have already happened.
    pub fn new(cfg: &AdafactorConfig, raw_iteration: u64) -> StepPlan {
        let iterations = completed_updates(cfg, raw_iteration);
        let accumulation = match cfg.gradient_accumulation_steps {
            Some(k) if k >= 2 => {
                if raw_iteration.saturating_add(1).is_multiple_of(k) {
                    Accumulation::Apply { steps: k }
                } else {
                    Accumulation::Accumulate
                }
            }
            _ => Accumulation::Off,
        };
        let update = (accumulation != Accumulation::Accumulate).then(|| {
            let learning_rate = cfg.learning_rate_at(raw_iteration);
            let t = iterations.saturating_add(1) as f32;
            UpdateScalars {
                learning_rate,
                t,
                beta2_t: beta2(t, cfg.beta_2_decay as f32),
                rho: rho(learning_rate, t),
                epsilon_1: cfg.epsilon_1 as f32,
                epsilon_2: cfg.epsilon_2 as f32,
                clip_threshold: cfg.clip_threshold as f32,
                weight_decay: cfg.weight_decay.map(|w| w as f32),
                clip: Clip::from_config(cfg),
            }
        });
        let rounding =
            (cfg.weight_rounding == WeightRounding::Stochastic).then_some(StepRounding {
                seed: cfg.weight_rounding_seed,
                iteration: raw_iteration,
            });
        let ema = cfg.use_ema.then(|| EmaPlan {
            momentum: if iterations != 0 {
                cfg.ema_momentum as f32
            } else {
                0.0
            },
            overwrite: cfg
                .ema_overwrite_frequency
                .is_some_and(|f| f > 0 && iterations.saturating_add(1).is_multiple_of(f)),
            rounding,
        });
        StepPlan {
            raw_iteration,
            iterations,
            loss_scale_factor: cfg.loss_scale_factor.map(|f| f as f32),
            accumulation,
            update,
            ema,
            rounding,
        }
    }
}

impl StepPlan {
    /// The plan of Keras's `update_step(gradient, variable, learning_rate)`: the bare Adafactor
    /// rule at `cfg`'s completed-update count after `raw_iteration` calls, with this learning
    /// rate; no unscaling, accumulation, clipping, weight decay or EMA.
    ///
    /// # Errors
    /// A negative or non-finite `learning_rate`.
    pub fn bare_update(
        cfg: &AdafactorConfig,
        raw_iteration: u64,
        learning_rate: f64,
    ) -> crate::Result<StepPlan> {
        let step_config = AdafactorConfig {
            learning_rate: crate::LearningRate::Constant(learning_rate),
            gradient_accumulation_steps: None,
            ..cfg.clone()
        };
        step_config.validate()?;
        let mut plan = StepPlan::new(cfg, raw_iteration);
        let mut scalars = StepPlan::new(&step_config, completed_updates(cfg, raw_iteration))
            .update
            .ok_or_else(|| crate::Error::Internal("no update scalars".into()))?;
        scalars.weight_decay = None;
        scalars.clip = Clip::None;
        plan.update = Some(scalars);
        plan.accumulation = Accumulation::Off;
        plan.ema = None;
        plan.loss_scale_factor = None;
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_step_has_no_effect() {
        let on = AdafactorConfig::with_learning_rate(2.0);
        let off = AdafactorConfig {
            relative_step: false,
            ..on.clone()
        };
        for raw in 0..20 {
            assert_eq!(StepPlan::new(&on, raw), StepPlan::new(&off, raw));
        }
        // rho = min(2, 1/sqrt(t)) caps even with relative_step off.
        let p = StepPlan::new(&off, 3).update.unwrap();
        assert_eq!(p.rho, 0.5);
    }

    #[test]
    fn accumulation_schedule_follows_keras() {
        // SGD(gradient_accumulation_steps=3) in Keras's optimizer_test: (raw, iterations) after
        // applies 1..4 are (1,0), (2,0), (3,1), (4,1); only apply 3 updates.
        let cfg = AdafactorConfig {
            gradient_accumulation_steps: Some(3),
            ..Default::default()
        };
        let kinds: Vec<_> = (0..4)
            .map(|raw| StepPlan::new(&cfg, raw).accumulation)
            .collect();
        assert_eq!(
            kinds,
            vec![
                Accumulation::Accumulate,
                Accumulation::Accumulate,
                Accumulation::Apply { steps: 3 },
                Accumulation::Accumulate
            ]
        );
        assert_eq!(completed_updates(&cfg, 3), 1);
        assert_eq!(completed_updates(&cfg, 4), 1);
        // The first real update has t = 1.
        assert_eq!(StepPlan::new(&cfg, 2).update.unwrap().t, 1.0);
        assert!(StepPlan::new(&cfg, 0).update.is_none());
    }

    #[test]
    fn ema_copies_on_first_update_and_overwrites_on_schedule() {
        let cfg = AdafactorConfig {
            use_ema: true,
            ema_momentum: 0.9,
            ema_overwrite_frequency: Some(2),
            ..Default::default()
        };
        let e: Vec<_> = (0..4)
            .map(|raw| StepPlan::new(&cfg, raw).ema.unwrap())
            .collect();
        assert_eq!(e[0].momentum, 0.0);
        assert_eq!(e[1].momentum, 0.9);
        assert_eq!(
            e.iter().map(|p| p.overwrite).collect::<Vec<_>>(),
            vec![false, true, false, true]
        );
        // With accumulation the first k raw calls all copy.
        let acc = AdafactorConfig {
            gradient_accumulation_steps: Some(2),
            ..cfg
        };
        assert_eq!(StepPlan::new(&acc, 1).ema.unwrap().momentum, 0.0);
        assert_eq!(StepPlan::new(&acc, 2).ema.unwrap().momentum, 0.9);
    }

    #[test]
    fn schedule_sees_raw_step_and_t_sees_updates() {
        let cfg = AdafactorConfig {
            learning_rate: crate::LearningRateSchedule::piecewise_constant(
                vec![0.0],
                vec![0.5, 0.25],
            )
            .unwrap()
            .into(),
            gradient_accumulation_steps: Some(2),
            ..Default::default()
        };
        let p = StepPlan::new(&cfg, 1).update.unwrap();
        assert_eq!(p.learning_rate, 0.25); // raw step 1 > boundary 0
        assert_eq!(p.t, 1.0);
    }

    #[test]
    fn clip_zero_is_off() {
        let cfg = AdafactorConfig {
            clipnorm: Some(0.0),
            ..Default::default()
        };
        assert_eq!(Clip::from_config(&cfg), Clip::None);
    }
}
