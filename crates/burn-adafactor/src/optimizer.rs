//! `Adafactor`: the module-level optimizer with Keras semantics over a whole burn `Module`.

use crate::composed::Composed;
use crate::error::{Error, Result, StepError, invalid};
use crate::params::{self, ParamInfo, Taken, with_rank};
use crate::slot::Slot;
use adafactor::engine::{self, Counters, Local, Step, Target};
use adafactor::{AdafactorConfig, LearningRate, NameExclusions, OnNonFinite, Stats, StepPlan};
use burn::module::{Module, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Tensor, TensorData};
use std::collections::HashMap;

/// The largest raw call count (`i64::MAX`, what Keras stores as `iteration`): a call that would
/// count past it is refused, so the counter never overflows.
pub(crate) const MAX_ITERATION: u64 = i64::MAX as u64;

/// Which data path a step takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// The core's fused kernels in place on the Flex backend's storage (`jit_compile = true`,
    /// every parameter an f32/bf16/f16 tensor on `Device::flex()`).
    Fused,
    /// burn tensor ops (any backend).
    Composed,
}

/// Keras 3 `Adafactor` for a burn `Module`, step-exact with Keras 3.15.1.
///
/// One [`Adafactor::step`] is one Keras `apply_gradients` call over every float parameter of
/// the module: it sees every gradient before it changes anything (global norm, finiteness),
/// counts one global `iterations`, and on error hands the model back unchanged. Parameters are
/// named by their burn module path (`layer1.weight`), which `exclude_from_weight_decay` and
/// checkpoints use.
///
/// ```
/// use burn::module::{Module, Param};
/// use burn::optim::GradientsParams;
/// use burn::tensor::{Device, Tensor};
/// use burn_adafactor::{Adafactor, AdafactorConfig};
///
/// #[derive(Module, Debug)]
/// struct Model {
///     w: Param<Tensor<1>>,
/// }
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let device = Device::flex().autodiff();
/// let model = Model { w: Param::from_tensor(Tensor::from_data([1f32, 2.0, 3.0, 4.0], &device)) };
/// let mut grads = GradientsParams::new();
/// grads.register(model.w.id, Tensor::<1>::from_data([1f32, 6.0, 7.0, 2.0], &device.clone().inner()));
/// let mut opt = Adafactor::new(AdafactorConfig::with_learning_rate(0.5))?;
/// let model = opt.step(model, grads)?;
/// let got = model.w.val().into_data().try_to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
/// assert!((got[0] - -0.36930645).abs() < 1e-6); // Keras's own adafactor test
/// assert_eq!(opt.iterations(), 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Adafactor {
    pub(crate) config: AdafactorConfig,
    pub(crate) slots: Vec<Slot>,
    pub(crate) index: HashMap<ParamId, usize>,
    pub(crate) counters: Counters,
    exclude_names: NameExclusions,
    last_path: Option<DataPath>,
    last_copies: usize,
}

impl Adafactor {
    /// An optimizer with this config; it builds on the module of its first step, as Keras
    /// builds on the variables of its first `apply_gradients`.
    ///
    /// # Errors
    /// An invalid config (see [`AdafactorConfig::validate`]).
    pub fn new(config: AdafactorConfig) -> Result<Self> {
        config.validate()?;
        Ok(Adafactor {
            config,
            slots: Vec::new(),
            index: HashMap::new(),
            counters: Counters::default(),
            exclude_names: NameExclusions::default(),
            last_path: None,
            last_copies: 0,
        })
    }

    /// A one-parameter optimizer at raw iteration `raw` (the per-tensor optimizer's step).
    pub(crate) fn single(info: &ParamInfo, config: AdafactorConfig, raw: u64) -> Adafactor {
        Adafactor {
            slots: vec![Slot::new(info, &config)],
            index: HashMap::from([(info.id, 0)]),
            counters: Counters {
                raw_iterations: raw,
                skipped_steps: 0,
            },
            config,
            exclude_names: NameExclusions::default(),
            last_path: None,
            last_copies: 0,
        }
    }

    /// Keras `from_config`: an optimizer from a Keras config (the `get_config()` dict or the
    /// `keras.optimizers.serialize()` wrapper, nested schedules included).
    ///
    /// # Errors
    /// See [`AdafactorConfig::from_keras_config`].
    pub fn from_config(config: &serde_json::Value) -> Result<Self> {
        Self::new(AdafactorConfig::from_keras_config(config)?)
    }

    /// Keras `get_config()`.
    pub fn get_config(&self) -> serde_json::Value {
        self.config.to_keras_config()
    }

    /// The configuration.
    pub fn config(&self) -> &AdafactorConfig {
        &self.config
    }

    /// Builds the state for every float parameter of `module` (the first step does this
    /// itself).
    ///
    /// # Errors
    /// Already built.
    pub fn build<M: Module>(&mut self, module: &M) -> Result<()> {
        if self.built() {
            return Err(invalid(format!(
                "optimizer `{}` is already built on {} parameters; build it once",
                self.config.name,
                self.slots.len()
            )));
        }
        let infos = params::list(module);
        let (slots, index) = build_slots(&infos, &self.config)?;
        self.slots = slots;
        self.index = index;
        Ok(())
    }

    /// Whether the optimizer has been built.
    pub fn built(&self) -> bool {
        !self.slots.is_empty()
    }

    /// Keras `iterations`: completed updates (raw calls // k with gradient accumulation).
    pub fn iterations(&self) -> u64 {
        adafactor::plan::completed_updates(&self.config, self.counters.raw_iterations)
    }

    /// Keras `_iterations`: steps that had at least one gradient and were not skipped.
    pub fn raw_iterations(&self) -> u64 {
        self.counters.raw_iterations
    }

    /// Steps skipped because of a non-finite gradient (`on_nonfinite = "skip"`).
    pub fn skipped_steps(&self) -> u64 {
        self.counters.skipped_steps
    }

    /// Keras `learning_rate`: the schedule at the raw step, or the constant (as float32).
    pub fn current_learning_rate(&self) -> f32 {
        self.config.learning_rate_at(self.counters.raw_iterations)
    }

    /// Sets a constant learning rate, as assigning `optimizer.learning_rate = x` in Keras.
    ///
    /// # Errors
    /// The optimizer uses a schedule, or `lr` is negative or not finite (nothing changes).
    pub fn set_learning_rate(&mut self, lr: f64) -> Result<()> {
        if let LearningRate::Schedule(_) = self.config.learning_rate {
            return Err(invalid(
                "This optimizer was created with a `LearningRateSchedule` object as its \
                 `learning_rate` constructor argument, hence its learning rate is not settable.",
            ));
        }
        let cfg = AdafactorConfig {
            learning_rate: LearningRate::Constant(lr),
            ..self.config.clone()
        };
        cfg.validate()?;
        self.config = cfg;
        Ok(())
    }

    /// The module paths of the parameters the optimizer was built on, in build order.
    pub fn paths(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.path.as_str()).collect()
    }

    /// Bytes of optimizer state: statistics, EMA averages and accumulators (all float32).
    pub fn state_bytes(&self) -> usize {
        self.slots.iter().map(Slot::state_bytes).sum()
    }

    /// Keras `exclude_from_weight_decay(var_names=...)`: parameters whose module path contains
    /// a match of one of these regex fragments get no weight decay (replaces earlier ones).
    ///
    /// # Errors
    /// The fragments do not form a valid regex (nothing changes).
    pub fn exclude_from_weight_decay(&mut self, var_names: &[&str]) -> Result<()> {
        self.exclude_names = NameExclusions::new(var_names)?;
        Ok(())
    }

    /// The data path the last step took; before the first step, the path `jit_compile` asks
    /// for.
    pub fn data_path(&self) -> DataPath {
        self.last_path
            .unwrap_or(if self.config.jit_compile && cfg!(feature = "flex") {
                DataPath::Fused
            } else {
                DataPath::Composed
            })
    }

    /// How many parameter buffers the last fused step had to copy because something else
    /// held them (a clone of the model, a kept `val()`); 0 means the step wrote in place.
    pub fn last_step_copies(&self) -> usize {
        self.last_copies
    }

    /// The EMA average of a parameter (float32, in the parameter's shape), when `use_ema`.
    ///
    /// # Errors
    /// No parameter has this path.
    pub fn moving_average(&self, path: &str) -> Result<Option<TensorData>> {
        let slot = self.slot_by_path(path)?;
        Ok(slot.ema.as_ref().map(|e| {
            let data = e.clone().into_data();
            TensorData::new(
                data.try_to_vec::<f32>().unwrap_or_default(),
                slot.shape.clone(),
            )
        }))
    }

    pub(crate) fn slot_by_path(&self, path: &str) -> Result<&Slot> {
        self.slots
            .iter()
            .find(|s| s.path == path)
            .ok_or_else(|| invalid(format!("the optimizer has no parameter `{path}`")))
    }

    /// Keras `finalize_variable_values`: with `use_ema`, every parameter takes its moving
    /// average; without, the model is returned as is.
    ///
    /// # Errors
    /// A parameter the optimizer was built on is missing from `model` (the model comes back
    /// unchanged).
    pub fn finalize_variable_values<M: Module>(
        &self,
        model: M,
    ) -> std::result::Result<M, StepError<M>> {
        if !self.config.use_ema {
            return Ok(model);
        }
        if let Err(error) = self.check_module(&params::list(&model)) {
            return Err(StepError { model, error });
        }
        let ids: Vec<ParamId> = self.slots.iter().map(|s| s.id).collect();
        let (model, mut taken) = Taken::take(model, &ids);
        for s in &self.slots {
            if let Some(avg) = &s.ema {
                taken.set(s.id, avg.clone().cast(s.dtype));
            }
        }
        Ok(taken.put_back(model))
    }

    /// Keras `apply_gradients` over a whole module: one step of every parameter that has a
    /// gradient in `grads` (the others are left out, as Keras leaves out `None` gradients;
    /// the EMA still covers them). The first step builds the optimizer on `model`.
    ///
    /// # Errors
    /// No gradient for any parameter; a parameter the optimizer was not built with, or one
    /// that changed shape or dtype; a gradient whose shape, dtype or device differs from its
    /// parameter's; a non-finite gradient with `on_nonfinite = "error"`; the counter at
    /// `i64::MAX`. The error names the parameter path and carries the model, unchanged.
    pub fn step<M: Module>(
        &mut self,
        model: M,
        grads: GradientsParams,
    ) -> std::result::Result<M, StepError<M>> {
        let prepared = match self.prepare(&model, grads) {
            Ok(p) => p,
            Err(error) => return Err(StepError { model, error }),
        };
        let Prepared { trial, items } = prepared;
        match trial {
            // The first step builds on a copy, so that a failed first step leaves this
            // optimizer unbuilt.
            Some(mut trial) => {
                let (model, result) = trial.apply(model, items, true);
                match result {
                    Ok(()) => {
                        *self = trial;
                        Ok(model)
                    }
                    Err(error) => {
                        self.counters = trial.counters;
                        Err(StepError { model, error })
                    }
                }
            }
            // A failed step wrote nothing (the engine fails only before its first write).
            None => match self.apply(model, items, true) {
                (model, Ok(())) => Ok(model),
                (model, Err(error)) => Err(StepError { model, error }),
            },
        }
    }

    /// Checks the model and gradients against the built state before anything changes.
    fn prepare<M: Module>(&self, model: &M, mut grads: GradientsParams) -> Result<Prepared> {
        if self.counters.raw_iterations >= MAX_ITERATION {
            return Err(invalid(format!(
                "the `iteration` counter of optimizer `{}` is at its maximum ({MAX_ITERATION})",
                self.config.name
            )));
        }
        let infos = params::list(model);
        let trial = if self.built() {
            None
        } else {
            let mut t = Adafactor::new(self.config.clone())?;
            let (slots, index) = build_slots(&infos, &self.config)?;
            t.slots = slots;
            t.index = index;
            t.exclude_names = self.exclude_names.clone();
            Some(t)
        };
        let opt = trial.as_ref().unwrap_or(self);
        opt.check_module(&infos)?;
        for info in &infos {
            if !opt.index.contains_key(&info.id) && has_grad(&grads, info) {
                return Err(invalid(format!(
                    "Unknown variable: parameter `{}` with shape {:?}. This optimizer can only be \
                     called for the variables it was originally built with.",
                    info.path, info.shape
                )));
            }
        }
        let mut items = Vec::new();
        for (i, slot) in opt.slots.iter().enumerate() {
            let rank = slot.shape.len();
            let g: Option<(Vec<usize>, DType, burn::tensor::Device, Tensor<1>)> = with_rank!(rank, D => {
                grads.remove::<D>(slot.id).map(|g: Tensor<D>| {
                    let dims = g.dims().to_vec();
                    let (dtype, device) = (g.dtype(), g.device());
                    let n = dims.iter().product::<usize>();
                    (dims, dtype, device, g.inner().reshape([n]))
                })
            }, return Err(invalid(format!("parameter `{}` has rank {rank}; ranks 1 to 8 are supported", slot.path))));
            let Some((dims, dtype, device, g)) = g else {
                continue;
            };
            if dims != slot.shape {
                return Err(invalid(format!(
                    "gradient for parameter `{}` has shape {dims:?}, but the parameter has shape {:?}",
                    slot.path, slot.shape
                )));
            }
            if dtype != slot.dtype {
                return Err(invalid(format!(
                    "gradient for parameter `{}` has dtype {dtype:?}, but the parameter has dtype {:?}",
                    slot.path, slot.dtype
                )));
            }
            if device.clone().without_autodiff() != slot.device {
                return Err(invalid(format!(
                    "gradient for parameter `{}` is on {device:?}, but the parameter is on {:?}",
                    slot.path, slot.device
                )));
            }
            items.push((i, g));
        }
        if items.is_empty() {
            return Err(invalid("No gradients provided for any variable."));
        }
        Ok(Prepared { trial, items })
    }

    /// Every built parameter is in the module, with its shape and dtype.
    pub(crate) fn check_module(&self, infos: &[ParamInfo]) -> Result<()> {
        let by_id: HashMap<ParamId, &ParamInfo> = infos.iter().map(|i| (i.id, i)).collect();
        for s in &self.slots {
            let Some(info) = by_id.get(&s.id) else {
                return Err(invalid(format!(
                    "parameter `{}` the optimizer was built with is not in the model",
                    s.path
                )));
            };
            if info.shape != s.shape || info.dtype != s.dtype {
                return Err(invalid(format!(
                    "parameter `{}` is now {:?} {:?}; the optimizer was built on {:?} {:?}",
                    s.path, info.dtype, info.shape, s.dtype, s.shape
                )));
            }
        }
        Ok(())
    }

    /// The path a step with these gradients takes.
    fn choose_path(&self, items: &[(usize, Tensor<1>)]) -> DataPath {
        #[cfg(feature = "flex")]
        if self.config.jit_compile
            && self
                .slots
                .iter()
                .all(|s| crate::fused::supports(&s.device, s.dtype, s.len()))
            && items
                .iter()
                .all(|(_, g)| g.device() == burn::tensor::Device::flex())
        {
            return DataPath::Fused;
        }
        let _ = items;
        DataPath::Composed
    }

    /// Runs one checked step: takes the parameters out of `model`, runs the core's pipeline,
    /// puts them back. `counts`: an `apply_gradients` call, which advances `iterations`.
    fn apply<M: Module>(
        &mut self,
        model: M,
        items: Vec<(usize, Tensor<1>)>,
        counts: bool,
    ) -> (M, Result<()>) {
        let ids: Vec<ParamId> = self.slots.iter().map(|s| s.id).collect();
        let (model, mut taken) = Taken::take(model, &ids);
        let mut weights = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            match taken.remove(s.id) {
                Some(w) => weights.push(w),
                None => {
                    let e = invalid(format!(
                        "internal: parameter `{}` could not be taken",
                        s.path
                    ));
                    return (taken.put_back(model), Err(e));
                }
            }
        }
        let (weights, result) = self.run_flat(weights, items, counts);
        for (s, w) in self.slots.iter().zip(weights) {
            taken.set(s.id, w);
        }
        (taken.put_back(model), result)
    }

    /// Runs the core's pipeline on flat weights (one per slot) and `(slot, flat gradient)`
    /// items, on the path they allow; returns the weights (updated, or as they were on error).
    pub(crate) fn run_flat(
        &mut self,
        weights: Vec<Tensor<1>>,
        items: Vec<(usize, Tensor<1>)>,
        counts: bool,
    ) -> (Vec<Tensor<1>>, Result<()>) {
        let plan = StepPlan::new(&self.config, self.counters.raw_iterations);
        let path = self.choose_path(&items);
        let mut grads: Vec<Option<Tensor<1>>> = vec![None; self.slots.len()];
        let targets: Vec<Target> = items
            .iter()
            .map(|(i, _)| Target {
                var: *i,
                decays: !self.exclude_names.excludes(&self.slots[*i].path),
            })
            .collect();
        for (i, g) in items {
            grads[i] = Some(g);
        }
        let scope: Vec<usize> = (0..self.slots.len()).collect();
        let step = Step {
            plan: &plan,
            targets: &targets,
            scope: &scope,
            check_finite: self.config.on_nonfinite != OnNonFinite::Propagate,
        };
        let mut stats: Vec<Stats> = self
            .slots
            .iter_mut()
            .map(|s| std::mem::replace(&mut s.stats, Stats::Unfactored { v: Vec::new() }))
            .collect();
        let (weights, outcome) = match path {
            #[cfg(feature = "flex")]
            DataPath::Fused => self.run_fused(weights, grads, &mut stats, step),
            #[cfg(not(feature = "flex"))]
            DataPath::Fused => (
                weights,
                Err(invalid("internal: the fused path needs the `flex` feature")),
            ),
            DataPath::Composed => {
                let mut backend = Composed::new(&self.slots, &weights, &grads);
                let outcome = engine::run(&mut backend, &mut stats, step, &Local);
                let staged = std::mem::take(&mut backend.staged);
                let mut weights = weights;
                if matches!(outcome, Ok(engine::Outcome::Applied)) {
                    for ((w, s), n) in weights.iter_mut().zip(self.slots.iter_mut()).zip(staged) {
                        if let Some(x) = n.x {
                            *w = x;
                        }
                        if n.ema.is_some() {
                            s.ema = n.ema;
                        }
                        if n.accumulator.is_some() {
                            s.accumulator = n.accumulator;
                        }
                    }
                }
                self.last_copies = 0;
                (weights, outcome)
            }
        };
        for (s, st) in self.slots.iter_mut().zip(stats) {
            s.stats = st;
        }
        let result = outcome.and_then(|outcome| {
            self.last_path = Some(path);
            let slots = &self.slots;
            self.counters
                .record(outcome, self.config.on_nonfinite, counts, |var| {
                    var.map_or_else(|| "<unknown>".into(), |i| slots[i].path.clone())
                })
                .map_err(Error::from)
        });
        (weights, result)
    }

    #[cfg(feature = "flex")]
    fn run_fused(
        &mut self,
        weights: Vec<Tensor<1>>,
        grads: Vec<Option<Tensor<1>>>,
        stats: &mut [Stats],
        step: Step<'_>,
    ) -> (Vec<Tensor<1>>, Result<engine::Outcome>) {
        let averages = self.slots.iter_mut().map(|s| s.ema.take()).collect();
        let accumulators = self
            .slots
            .iter_mut()
            .map(|s| s.accumulator.take())
            .collect();
        // Every tensor is on Flex (checked by `choose_path`), so this cannot fail.
        let buffers = match crate::fused::Buffers::new(weights, grads, averages, accumulators) {
            Ok(b) => b,
            Err(e) => return (Vec::new(), Err(e)),
        };
        let outcome = engine::run(
            &mut engine::fused::Fused::new(&buffers),
            stats,
            step,
            &Local,
        );
        let (weights, averages, accumulators, copies) = buffers.finish();
        for ((s, a), c) in self.slots.iter_mut().zip(averages).zip(accumulators) {
            s.ema = a;
            s.accumulator = c;
        }
        self.last_copies = copies;
        (weights, outcome)
    }
}

/// A checked step: the optimizer to build (first step) and `(slot index, flat gradient)`.
struct Prepared {
    trial: Option<Adafactor>,
    items: Vec<(usize, Tensor<1>)>,
}

fn has_grad(grads: &GradientsParams, info: &ParamInfo) -> bool {
    with_rank!(info.shape.len(), D => grads.get::<D>(info.id).is_some(), false)
}

/// Slots for every float parameter (paths must be unique; `factored_axes` must name parameters
/// of the module, with axes in range).
fn build_slots(
    infos: &[ParamInfo],
    cfg: &AdafactorConfig,
) -> Result<(Vec<Slot>, HashMap<ParamId, usize>)> {
    cfg.check_factored_axes(infos.iter().map(|i| (i.path.as_str(), i.shape.as_slice())))?;
    let mut slots = Vec::with_capacity(infos.len());
    let mut index = HashMap::new();
    for info in infos {
        if info.shape.is_empty() || info.shape.len() > 8 {
            return Err(invalid(format!(
                "parameter `{}` has rank {}; ranks 1 to 8 are supported",
                info.path,
                info.shape.len()
            )));
        }
        if index.insert(info.id, slots.len()).is_some() {
            return Err(invalid(format!(
                "parameter `{}` appears twice in the module",
                info.path
            )));
        }
        slots.push(Slot::new(info, cfg));
    }
    if slots.is_empty() {
        return Err(invalid("the module has no float parameters"));
    }
    Ok((slots, index))
}
