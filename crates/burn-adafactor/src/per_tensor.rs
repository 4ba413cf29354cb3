//! Keras Adafactor as burn's per-tensor [`burn::optim::Optimizer`], for burn's
//! `ModuleOptimizer` and so for `burn-train`'s `Learner`.
//!
//! Each `step` runs the core's pipeline on one parameter. What needs every parameter at once
//! cannot be done per tensor, and stays with the module-level [`crate::Adafactor`]:
//! - `global_clipnorm` (every gradient must be seen before the first update; refused here);
//! - atomic non-finite handling (`on_nonfinite` skips only the one tensor whose gradient is
//!   not finite, counted by [`KerasAdafactor::nonfinite_tensors`]; the module-level optimizer
//!   refuses or skips the whole step, or reports the parameter as an error);
//! - errors that name the parameter (`step` receives no path and cannot return an error);
//! - EMA `finalize_variable_values` (the averages live in `ModuleOptimizer`'s private states);
//! - checkpoints keyed by parameter path (burn's `ModuleOptimizer` records key by `ParamId`).
//!
//! One global `iterations`: the per-tensor calls share one counter. It is exact when
//! [`KerasAdafactor::clock`] is the learning-rate scheduler (burn-train's `Learner` steps its
//! scheduler once before every optimizer step); without it, a parameter seen a second time at
//! the same iteration starts the next one, which is exact unless a parameter that has no
//! state yet comes first in a step. The `lr` burn passes is ignored: the Keras learning rate
//! (constant or schedule) at the raw iteration is used, as in Keras.

use crate::error::{Result, invalid};
use crate::optimizer::Adafactor;
use crate::params::ParamInfo;
use adafactor::{AdafactorConfig, Stats};
use burn::module::ParamId;
use burn::optim::lr_scheduler::{LrScheduler, LrSchedulerRecord};
use burn::optim::{Optimizer, RecordState, StateSink, StateSource};
use burn::tensor::{Device, Tensor, TensorData};
use burn_pack::Scalar;
use std::sync::{Arc, Mutex};

/// The counters every per-tensor call of one optimizer shares.
#[derive(Debug, Default)]
struct Clock {
    /// Keras `_iterations` of the step in progress.
    raw: u64,
    /// Whether a [`KerasClock`] drives `raw` (exact), or the per-parameter heuristic does.
    driven: bool,
    /// Whether the scheduler has started the first step.
    started: bool,
    /// Tensors whose update was skipped for a non-finite gradient.
    nonfinite: u64,
}

fn lock(c: &Mutex<Clock>) -> std::sync::MutexGuard<'_, Clock> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keras 3 `Adafactor` as burn's per-tensor optimizer: `ModuleOptimizer::from(opt)`.
///
/// ```
/// use burn::optim::ModuleOptimizer;
/// use burn_adafactor::{AdafactorConfig, KerasAdafactor};
/// # fn main() -> Result<(), burn_adafactor::Error> {
/// let opt = KerasAdafactor::new(AdafactorConfig::with_learning_rate(1e-2))?;
/// let _clock = opt.clock(); // give this to the Learner as its learning-rate scheduler
/// let _module_optimizer: ModuleOptimizer = opt.into();
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct KerasAdafactor {
    config: Arc<AdafactorConfig>,
    clock: Arc<Mutex<Clock>>,
}

impl KerasAdafactor {
    /// A per-tensor optimizer with this config.
    ///
    /// # Errors
    /// An invalid config; `global_clipnorm`, which needs every gradient before the first
    /// update, and `factored_axes`, which names parameters by path (use the module-level
    /// [`crate::Adafactor`] for both).
    pub fn new(config: AdafactorConfig) -> Result<Self> {
        config.validate()?;
        crate::error::check_per_tensor(&config)?;
        if config.global_clipnorm.is_some() {
            return Err(invalid(
                "`global_clipnorm` needs every gradient before the first update, which burn's \
                 per-tensor Optimizer cannot see; use burn_adafactor::Adafactor::step on the module",
            ));
        }
        Ok(KerasAdafactor {
            config: Arc::new(config),
            clock: Arc::default(),
        })
    }

    /// The same optimizer without weight decay, sharing this one's `iterations`: for the
    /// parameters Keras's `exclude_from_weight_decay` would exclude, through
    /// `ModuleOptimizer::with_group(ParamGroup::from_any_regexes(..)?, opt.without_weight_decay(), None)`
    /// (burn matches the regexes with a search in the parameter path, as Keras does).
    pub fn without_weight_decay(&self) -> Self {
        KerasAdafactor {
            config: Arc::new(AdafactorConfig {
                weight_decay: None,
                ..(*self.config).clone()
            }),
            clock: Arc::clone(&self.clock),
        }
    }

    /// The learning-rate scheduler that makes `iterations` exact: each `step` starts the next
    /// Keras iteration and returns the Keras learning rate at it.
    pub fn clock(&self) -> KerasClock {
        KerasClock {
            config: Arc::clone(&self.config),
            clock: Arc::clone(&self.clock),
        }
    }

    /// Keras `_iterations`: the raw index of the current (or last) step.
    pub fn raw_iterations(&self) -> u64 {
        lock(&self.clock).raw
    }

    /// Tensors whose update was skipped because their gradient was not finite.
    pub fn nonfinite_tensors(&self) -> u64 {
        lock(&self.clock).nonfinite
    }

    /// The raw iteration of a tensor's step, given the iteration it last stepped at.
    fn iteration(&self, last: Option<u64>) -> u64 {
        let mut c = lock(&self.clock);
        if !c.driven
            && let Some(last) = last.filter(|l| *l >= c.raw)
        {
            c.raw = last + 1;
        }
        c.raw
    }
}

/// One parameter's state: statistics, EMA average, accumulator and the iteration it last
/// stepped at.
#[derive(Debug, Clone)]
pub struct TensorState<const D: usize> {
    last_iteration: u64,
    shape: Vec<usize>,
    stats: Stats,
    ema: Option<Tensor<1>>,
    accumulator: Option<Tensor<1>>,
}

impl<const D: usize> RecordState for TensorState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        out.push_scalar(prefix, "last_iteration", Scalar::from(self.last_iteration));
        let shape: Vec<u64> = self.shape.iter().map(|&d| d as u64).collect();
        let rank = shape.len();
        out.push_tensor(prefix, "shape", TensorData::new(shape, [rank]));
        for (name, dims, values) in self.stats.slots(&self.shape) {
            out.push_tensor(prefix, name, TensorData::new(values.to_vec(), dims));
        }
        if let Some(e) = &self.ema {
            out.push_tensor(prefix, "average", e.to_data());
        }
        if let Some(a) = &self.accumulator {
            out.push_tensor(prefix, "accumulator", a.to_data());
        }
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let last_iteration = u64::try_from(src.take_scalar(prefix, "last_iteration")?).ok()?;
        let shape: Vec<usize> = src
            .take_tensor(prefix, "shape")?
            .try_to_vec::<u64>()
            .ok()?
            .into_iter()
            .map(|d| d as usize)
            .collect();
        let mut stats = Stats::zeros(&shape);
        let mut values = Vec::new();
        for (name, _) in Stats::slot_shapes(&shape) {
            values.push(src.take_tensor(prefix, name)?.try_to_vec::<f32>().ok()?);
        }
        stats.set_from(prefix, &values).ok()?;
        let mut flat = |leaf: &str| {
            src.take_tensor(prefix, leaf)
                .map(|d| Tensor::<1>::from_data(d, device))
        };
        let ema = flat("average");
        let accumulator = flat("accumulator");
        Some(TensorState {
            last_iteration,
            shape,
            stats,
            ema,
            accumulator,
        })
    }
}

impl Optimizer for KerasAdafactor {
    type State<const D: usize> = TensorState<D>;

    fn step<const D: usize>(
        &self,
        _lr: f64,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let it = self.iteration(state.as_ref().map(|s| s.last_iteration));
        let dims = tensor.dims();
        let info = ParamInfo {
            path: "<tensor>".into(),
            id: ParamId::new(),
            shape: dims.to_vec(),
            dtype: tensor.dtype(),
            device: tensor.device(),
        };
        let mut opt = Adafactor::single(&info, (*self.config).clone(), it);
        if let Some(s) = state.clone() {
            let slot = &mut opt.slots[0];
            slot.stats = s.stats;
            slot.ema = s.ema;
            slot.accumulator = s.accumulator;
        }
        let n = dims.iter().product::<usize>();
        let (mut weights, result) = opt.run_flat(
            vec![tensor.reshape([n])],
            vec![(0, grad.reshape([n]))],
            true,
        );
        let Some(w) = weights.pop() else {
            unreachable_tensor()
        };
        let w = w.reshape(dims);
        if result.is_err() || opt.counters.skipped_steps > 0 {
            lock(&self.clock).nonfinite += 1;
            return (w, state);
        }
        let slot = opt.slots.swap_remove(0);
        let state = TensorState {
            last_iteration: it,
            shape: dims.to_vec(),
            stats: slot.stats,
            ema: slot.ema,
            accumulator: slot.accumulator,
        };
        (w, Some(state))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.ema = state.ema.map(|t| t.to_device(device));
        state.accumulator = state.accumulator.map(|t| t.to_device(device));
        state
    }
}

/// `run_flat` returns one weight per slot; a one-slot run returns one.
fn unreachable_tensor() -> ! {
    unreachable!("a one-parameter step returns one weight")
}

/// The learning-rate scheduler of a [`KerasAdafactor`]: each `step` starts the next Keras
/// iteration (the first starts iteration 0) and returns the Keras learning rate there. Its
/// record holds the counter, so a resumed run continues the count.
#[derive(Debug, Clone)]
pub struct KerasClock {
    config: Arc<AdafactorConfig>,
    clock: Arc<Mutex<Clock>>,
}

impl LrScheduler for KerasClock {
    fn step(&mut self) -> f64 {
        let mut c = lock(&self.clock);
        if c.started {
            c.raw += 1;
        }
        c.started = true;
        c.driven = true;
        self.config.learning_rate_at(c.raw) as f64
    }

    fn to_record(&self) -> LrSchedulerRecord {
        let c = lock(&self.clock);
        LrSchedulerRecord::new()
            .with_scalar("iterations", c.raw)
            .with_scalar("started", c.started as u64)
    }

    fn load_record(&mut self, record: LrSchedulerRecord) {
        let mut c = lock(&self.clock);
        if let Some(it) = record.scalar::<u64>("iterations") {
            c.raw = it;
        }
        c.started = record.scalar::<u64>("started").unwrap_or(0) == 1;
        c.driven = true;
    }
}
