//! `Adafactor`: the optimizer object, its Keras methods and the candle `Optimizer` trait.

use crate::composed::Composed;
use crate::fused;
use crate::slot::Slot;
use adafactor::collective::Collective;
use adafactor::data_parallel::{run_sharded, Sharding};
use adafactor::engine::{self, Counters, Local, Outcome, Step, Target};
use adafactor::kernels::Spare;
use adafactor::{AdafactorConfig, LearningRate, NameExclusions, OnNonFinite, Stats, StepPlan};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};

/// Converts a core error into a candle error, keeping its message.
pub(crate) fn core_err(e: adafactor::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// Shorthand for an error with a message.
pub(crate) fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

/// Keras 3 `Adafactor` for candle `Var`s, step-exact with Keras 3.15.1.
///
/// Differences from Keras are all on the side of the user: a factored variable keeps only its
/// row and column statistics (no full-size velocity), statistics are float32 whatever the weight
/// dtype, every error leaves weights and optimizer state untouched, and `jit_compile = true`
/// (the default) runs fused in-place kernels on contiguous CPU tensors.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_adafactor::{Adafactor, AdafactorConfig};
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu)?;
/// let mut opt = Adafactor::new_named(vec![("w".into(), w.clone())], AdafactorConfig::with_learning_rate(0.5))?;
/// let g = Tensor::new(&[1f32, 6.0, 7.0, 2.0], &Device::Cpu)?;
/// opt.apply_gradients(&[(Some(&g), &w)])?;
/// let got = w.to_vec1::<f32>()?;
/// assert!((got[0] - -0.36930645).abs() < 1e-6); // Keras's own adafactor test
/// assert_eq!(opt.iterations(), 1);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Adafactor {
    pub(crate) config: AdafactorConfig,
    pub(crate) slots: Vec<Slot>,
    pub(crate) index: HashMap<TensorId, usize>,
    /// Keras `_iterations` (calls that had at least one gradient and were not skipped) and
    /// the skipped-step count.
    pub(crate) counters: Counters,
    pub(crate) built: bool,
    /// The path the last step took (`None` before the first).
    last_path: Option<DataPath>,
    exclude_ids: HashSet<TensorId>,
    exclude_names: NameExclusions,
    pub(crate) extra: Vec<(String, Var)>,
    /// The statistics buffers the last fused step replaced, reused by the next one.
    spare: Spare,
}

/// The largest raw call count (`i64::MAX`, what [`Adafactor::variables`] writes as
/// `iteration`): a call that would count past it is refused, so the counter never overflows.
pub(crate) const MAX_ITERATION: u64 = i64::MAX as u64;

/// Which data path an apply takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// Fused in-place CPU kernels (`jit_compile = true` and every tensor contiguous on CPU).
    Fused,
    /// Composed candle tensor ops (any device).
    Composed,
}

impl Adafactor {
    /// An unbuilt optimizer: it builds on the variables of its first `apply_gradients` call, as
    /// Keras does. The config is validated.
    ///
    /// # Errors
    /// An invalid config (see [`AdafactorConfig::validate`]).
    pub fn unbuilt(config: AdafactorConfig) -> Result<Self> {
        config.validate().map_err(core_err)?;
        Ok(Adafactor {
            config,
            slots: Vec::new(),
            index: HashMap::new(),
            counters: Counters::default(),
            built: false,
            last_path: None,
            exclude_ids: HashSet::new(),
            exclude_names: NameExclusions::default(),
            extra: Vec::new(),
            spare: Spare::new(),
        })
    }

    /// An optimizer built on named variables (names are used by `exclude_from_weight_decay`,
    /// `variables()` and checkpoints). Non-float variables are dropped, as candle-nn does.
    ///
    /// # Errors
    /// An invalid config; two variables with the same name or the same identity.
    pub fn new_named(vars: Vec<(String, Var)>, config: AdafactorConfig) -> Result<Self> {
        let mut opt = Self::unbuilt(config)?;
        opt.build_named(vars)?;
        Ok(opt)
    }

    /// An optimizer built on every variable of a `VarMap`, in name order.
    ///
    /// # Errors
    /// As [`Adafactor::new_named`].
    pub fn from_varmap(varmap: &candle_nn::VarMap, config: AdafactorConfig) -> Result<Self> {
        let mut vars: Vec<(String, Var)> = {
            let data = varmap
                .data()
                .lock()
                .map_err(|_| err("the VarMap's lock is poisoned"))?;
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Self::new_named(vars, config)
    }

    /// Keras `from_config`: an unbuilt optimizer from a Keras config (the `get_config()` dict or
    /// the `keras.optimizers.serialize()` wrapper, nested schedules included).
    ///
    /// # Errors
    /// See [`AdafactorConfig::from_keras_config`].
    pub fn from_config(config: &serde_json::Value) -> Result<Self> {
        Self::unbuilt(AdafactorConfig::from_keras_config(config).map_err(core_err)?)
    }

    /// Keras `get_config()`.
    pub fn get_config(&self) -> serde_json::Value {
        self.config.to_keras_config()
    }

    /// The configuration.
    pub fn config(&self) -> &AdafactorConfig {
        &self.config
    }

    /// Keras `build(var_list)`: creates the statistics (and EMA averages and accumulators when
    /// configured) for these variables, named `var0`, `var1`, ... in order.
    ///
    /// # Errors
    /// Already built; the same variable twice.
    pub fn build(&mut self, vars: &[Var]) -> Result<()> {
        let named = vars
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("var{i}"), v.clone()))
            .collect();
        self.build_named(named)
    }

    /// [`Adafactor::build`] with explicit names.
    ///
    /// # Errors
    /// Already built; a duplicate name or variable; `factored_axes` naming a variable not in
    /// the list, or axes out of range for its rank.
    pub fn build_named(&mut self, vars: Vec<(String, Var)>) -> Result<()> {
        self.build_named_keeping(vars, &|_| true)
    }

    /// [`Adafactor::build_named`] where only the (float) variables `i` with `keeps(i)` get an
    /// EMA average and an accumulator (the variables a rank owns in sharded data parallelism).
    pub(crate) fn build_named_keeping(
        &mut self,
        vars: Vec<(String, Var)>,
        keeps: &dyn Fn(usize) -> bool,
    ) -> Result<()> {
        if self.built {
            return Err(err(format!(
                "optimizer `{}` is already built on {} variables; build it once",
                self.config.name,
                self.slots.len()
            )));
        }
        let floats = vars.iter().filter(|(_, v)| v.dtype().is_float());
        self.config
            .check_factored_axes(floats.map(|(n, v)| (n.as_str(), v.dims())))
            .map_err(core_err)?;
        let mut slots = Vec::with_capacity(vars.len());
        let mut index = HashMap::new();
        let mut names = HashSet::new();
        for (name, var) in vars.into_iter().filter(|(_, v)| v.dtype().is_float()) {
            if !names.insert(name.clone()) {
                return Err(err(format!("two variables are named `{name}`")));
            }
            if index.insert(var.id(), slots.len()).is_some() {
                return Err(err(format!("variable `{name}` is listed twice")));
            }
            let keep = keeps(slots.len());
            slots.push(Slot::new(name, var, &self.config, keep)?);
        }
        self.slots = slots;
        self.index = index;
        self.built = true;
        Ok(())
    }

    /// Whether the optimizer has been built.
    pub fn built(&self) -> bool {
        self.built
    }

    /// Keras `iterations`: completed updates (raw calls // k with gradient accumulation).
    pub fn iterations(&self) -> u64 {
        adafactor::plan::completed_updates(&self.config, self.counters.raw_iterations)
    }

    /// Keras `_iterations`: `apply_gradients` calls that had at least one gradient.
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
    /// The optimizer uses a schedule (Keras's TypeError message), or `lr` is negative or not
    /// finite.
    pub fn try_set_learning_rate(&mut self, lr: f64) -> Result<()> {
        if let LearningRate::Schedule(_) = self.config.learning_rate {
            return Err(err(
                "This optimizer was created with a `LearningRateSchedule` object as its \
                 `learning_rate` constructor argument, hence its learning rate is not settable. \
                 If you need the learning rate to be settable, you should instantiate the \
                 optimizer with a float `learning_rate` argument.",
            ));
        }
        let cfg = AdafactorConfig {
            learning_rate: LearningRate::Constant(lr),
            ..self.config.clone()
        };
        cfg.validate().map_err(core_err)?;
        self.config = cfg;
        Ok(())
    }

    /// The variables the optimizer was built on, with their names, in build order.
    pub fn trainable_variables(&self) -> Vec<(&str, &Var)> {
        self.slots
            .iter()
            .map(|s| (s.name.as_str(), &s.var))
            .collect()
    }

    /// Bytes of optimizer state: statistics, EMA averages and accumulators (all float32).
    pub fn state_bytes(&self) -> usize {
        self.slots.iter().map(Slot::state_bytes).sum()
    }

    /// Keras `exclude_from_weight_decay(var_list, var_names)`: replaces both the excluded
    /// variables and the name fragments (joined into one regex, searched in each name). As in
    /// Keras 3 it may be called at any time.
    ///
    /// # Errors
    /// The fragments do not form a valid regex (nothing changes).
    pub fn exclude_from_weight_decay(
        &mut self,
        var_list: &[&Var],
        var_names: &[&str],
    ) -> Result<()> {
        let names = NameExclusions::new(var_names).map_err(core_err)?;
        self.exclude_ids = var_list.iter().map(|v| v.id()).collect();
        self.exclude_names = names;
        Ok(())
    }

    /// Whether weight decay skips this slot.
    pub(crate) fn excluded_from_decay(&self, slot: &Slot) -> bool {
        self.exclude_ids.contains(&slot.var.id()) || self.exclude_names.excludes(&slot.name)
    }

    /// Keras `finalize_variable_values(var_list)`: with `use_ema`, copies each variable's moving
    /// average into it; without, does nothing.
    ///
    /// # Errors
    /// A variable the optimizer was not built with (nothing changes).
    pub fn finalize_variable_values(&self, vars: &[&Var]) -> Result<()> {
        let idx = vars
            .iter()
            .map(|v| self.slot_index(v))
            .collect::<Result<Vec<_>>>()?;
        if !self.config.use_ema {
            return Ok(());
        }
        let updates = idx
            .iter()
            .map(|&i| {
                let s = &self.slots[i];
                let avg = s.ema().ok_or_else(|| err("EMA average missing"))?;
                Ok((i, avg.to_dtype(s.var.dtype())?))
            })
            .collect::<Result<Vec<_>>>()?;
        for (i, value) in updates {
            self.slots[i].var.set(&value)?;
        }
        Ok(())
    }

    pub(crate) fn slot_index(&self, var: &Var) -> Result<usize> {
        self.index.get(&var.id()).copied().ok_or_else(|| {
            err(format!(
                "Unknown variable: {:?} with shape {:?}. This optimizer can only be called for \
                 the variables it was originally built with. When working with a new set of \
                 variables, you should recreate a new optimizer instance.",
                var.id(),
                var.dims()
            ))
        })
    }

    /// The data path the last step took; before the first step, the path the variables allow
    /// (a step can still run composed when one of its gradients is not a contiguous CPU tensor
    /// or shares storage with optimizer state, and Keras's bare `update_step` always does).
    pub fn data_path(&self) -> DataPath {
        if let Some(path) = self.last_path {
            return path;
        }
        if self.config.jit_compile && self.slots.iter().all(|s| fused::supports(&s.var)) {
            DataPath::Fused
        } else {
            DataPath::Composed
        }
    }

    /// Keras `compute_gradients(loss, var_list)`: backpropagates `loss` and returns each
    /// variable's gradient (`None` where the loss does not depend on it), scaled by
    /// `loss_scale_factor` when set, as Keras scales the loss.
    ///
    /// # Errors
    /// Backpropagation fails.
    pub fn compute_gradients(&self, loss: &Tensor, vars: &[&Var]) -> Result<Vec<Option<Tensor>>> {
        let loss = self.scale_loss(loss)?;
        let grads = loss.backward()?;
        Ok(vars.iter().map(|v| grads.get(v).cloned()).collect())
    }

    /// Keras `scale_loss(loss)`: `loss * loss_scale_factor` when set.
    ///
    /// # Errors
    /// The multiplication fails.
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        match self.config.loss_scale_factor {
            Some(f) => loss.affine(f, 0.0),
            None => Ok(loss.clone()),
        }
    }

    /// Keras `minimize(loss, var_list)`: `compute_gradients` then `apply_gradients`.
    ///
    /// # Errors
    /// As [`Adafactor::apply_gradients`].
    pub fn minimize(&mut self, loss: &Tensor, vars: &[&Var]) -> Result<u64> {
        let grads = self.compute_gradients(loss, vars)?;
        let pairs: Vec<(Option<&Tensor>, &Var)> = grads
            .iter()
            .map(Option::as_ref)
            .zip(vars.iter().copied())
            .collect();
        self.apply_gradients(&pairs)
    }

    /// Keras `apply_gradients(grads_and_vars)`; returns `iterations`.
    ///
    /// A `None` gradient leaves its variable out of this step (no decay, no update) as Keras does;
    /// the EMA still covers it. The first call builds an unbuilt optimizer on these variables.
    ///
    /// # Errors
    /// Every gradient `None` (Keras's "No gradients provided for any variable."); a variable the
    /// optimizer was not built with; a gradient whose shape, dtype or device differs from its
    /// variable's; a non-finite gradient with `on_nonfinite = "error"`; an iteration counter
    /// already at `i64::MAX` (only reachable through `set_weights`). On error nothing changes.
    pub fn apply_gradients(&mut self, pairs: &[(Option<&Tensor>, &Var)]) -> Result<u64> {
        if pairs.is_empty() {
            return Ok(self.iterations());
        }
        if self.counters.raw_iterations >= MAX_ITERATION {
            return Err(err(format!(
                "the `iteration` counter of optimizer `{}` is at its maximum ({MAX_ITERATION})",
                self.config.name
            )));
        }
        if !self.built {
            let named = pairs
                .iter()
                .enumerate()
                .map(|(i, (_, v))| (format!("var{i}"), (*v).clone()))
                .collect();
            // Build on a copy so that a failed first apply leaves this optimizer unbuilt.
            let mut trial = Adafactor::unbuilt(self.config.clone())?;
            trial.build_named(named)?;
            let items = trial.check_pairs(pairs)?;
            trial.exclude_ids = self.exclude_ids.clone();
            trial.exclude_names = self.exclude_names.clone();
            trial.extra = self.extra.clone();
            trial.apply_checked(items)?;
            *self = trial;
            return Ok(self.iterations());
        }
        let items = self.check_pairs(pairs)?;
        self.apply_checked(items)?;
        Ok(self.iterations())
    }

    /// Keras `update_step(gradient, variable, learning_rate)`: the bare Adafactor rule on one
    /// variable at the current `iterations`, with this learning rate; no clipping, decay, EMA or
    /// counter change. A non-finite gradient follows `on_nonfinite` (with `"skip"` nothing
    /// changes but `skipped_steps`).
    ///
    /// # Errors
    /// As [`Adafactor::apply_gradients`] for one pair; a negative or non-finite `learning_rate`.
    pub fn update_step(
        &mut self,
        gradient: &Tensor,
        variable: &Var,
        learning_rate: f64,
    ) -> Result<()> {
        let items = self.check_pairs(&[(Some(gradient), variable)])?;
        let plan = StepPlan::bare_update(&self.config, self.counters.raw_iterations, learning_rate)
            .map_err(core_err)?;
        self.run(&items, &plan, DataPath::Composed, false)
    }

    /// Checks every pair before anything changes; returns `(slot index, gradient)` for the
    /// gradients that are present. The error is the first pair's, in order, as a check of one
    /// pair after another would report it.
    pub(crate) fn check_pairs(
        &self,
        pairs: &[(Option<&Tensor>, &Var)],
    ) -> Result<Vec<(usize, Tensor)>> {
        // Each pair's own checks run in parallel: with thousands of tensors, every check waits
        // on memory for the tensors' metadata, one after another on a single thread (a tenth
        // of a step of 10,000 tensors of 64 x 64).
        let checked: Vec<(Result<usize>, Result<()>)> = pairs
            .par_iter()
            .enumerate()
            .map(|(k, (g, v))| match self.slot_at(k, v) {
                Ok(i) => (Ok(i), g.map_or(Ok(()), |g| self.check_gradient(i, g))),
                Err(e) => (Err(e), Ok(())),
            })
            .collect();
        let mut seen = vec![false; self.slots.len()];
        let mut items = Vec::with_capacity(pairs.len());
        for ((g, _), (i, fits)) in pairs.iter().zip(checked) {
            let i = i?;
            if std::mem::replace(&mut seen[i], true) {
                return Err(err(format!(
                    "variable `{}` appears twice in one apply_gradients call",
                    self.slots[i].name
                )));
            }
            fits?;
            if let Some(g) = g {
                items.push((i, (*g).clone()));
            }
        }
        if items.is_empty() {
            return Err(err("No gradients provided for any variable."));
        }
        Ok(items)
    }

    /// [`Adafactor::slot_index`], without the hash lookup when the `k`-th pair is the `k`-th
    /// slot's variable (the usual order: the list the optimizer was built with).
    fn slot_at(&self, k: usize, var: &Var) -> Result<usize> {
        match self.slots.get(k) {
            Some(s) if s.var.id() == var.id() => Ok(k),
            _ => self.slot_index(var),
        }
    }

    /// A gradient's shape, dtype and device against slot `i`'s variable.
    fn check_gradient(&self, i: usize, g: &Tensor) -> Result<()> {
        let slot = &self.slots[i];
        if g.dims() != slot.var.dims() {
            return Err(err(format!(
                "gradient for variable `{}` has shape {:?}, but the variable has shape {:?}",
                slot.name,
                g.dims(),
                slot.var.dims()
            )));
        }
        if g.dtype() != slot.var.dtype() {
            return Err(err(format!(
                "gradient for variable `{}` has dtype {:?}, but the variable has dtype {:?}",
                slot.name,
                g.dtype(),
                slot.var.dtype()
            )));
        }
        if !g.device().same_device(slot.var.device()) {
            return Err(err(format!(
                "gradient for variable `{}` is on {:?}, but the variable is on {:?}",
                slot.name,
                g.device().location(),
                slot.var.device().location()
            )));
        }
        Ok(())
    }

    /// Runs one planned apply on checked items, on the fused or the composed path.
    fn apply_checked(&mut self, items: Vec<(usize, Tensor)>) -> Result<()> {
        let plan = StepPlan::new(&self.config, self.counters.raw_iterations);
        let path = self.path_for(&items);
        self.run(&items, &plan, path, true)
    }

    /// The data path an apply of these checked items takes.
    pub(crate) fn path_for(&self, items: &[(usize, Tensor)]) -> DataPath {
        if self.config.jit_compile && fused::eligible(self, items) {
            DataPath::Fused
        } else {
            DataPath::Composed
        }
    }

    /// One sharded apply of checked items (every rank's gradients, already averaged): this
    /// rank updates the variables it owns; the caller records the outcome
    /// ([`Adafactor::record`]) and shares the new weights.
    pub(crate) fn apply_sharded(
        &mut self,
        items: &[(usize, Tensor)],
        comm: &mut dyn Collective,
        sharding: &Sharding,
    ) -> Result<Outcome> {
        let plan = StepPlan::new(&self.config, self.counters.raw_iterations);
        let order: Vec<usize> = items.iter().map(|(i, _)| *i).collect();
        let owned: Vec<(usize, Tensor)> = items
            .iter()
            .filter(|(i, _)| sharding.owns(*i))
            .cloned()
            .collect();
        let path = self.path_for(items);
        let shard = Shard {
            comm,
            order: &order,
            scope: sharding.owned(),
        };
        self.run_on(&owned, &plan, path, Some(shard))
    }

    /// Runs the core's pipeline on one path and counts the outcome (`counts`: an
    /// `apply_gradients` call, which advances `iterations`).
    fn run(
        &mut self,
        items: &[(usize, Tensor)],
        plan: &StepPlan,
        path: DataPath,
        counts: bool,
    ) -> Result<()> {
        let outcome = self.run_on(items, plan, path, None)?;
        self.record(outcome, counts)
    }

    /// [`Adafactor::run`] on one rank of a sharded group when `shard` is given (`items` are
    /// then this rank's owned variables).
    fn run_on(
        &mut self,
        items: &[(usize, Tensor)],
        plan: &StepPlan,
        path: DataPath,
        shard: Option<Shard<'_>>,
    ) -> Result<Outcome> {
        let targets: Vec<Target> = items
            .iter()
            .map(|(i, _)| Target {
                var: *i,
                decays: self.config.weight_decay.is_none()
                    || !self.excluded_from_decay(&self.slots[*i]),
            })
            .collect();
        let scope: Vec<usize> = match &shard {
            Some(sh) => sh.scope.clone(),
            None => (0..self.slots.len()).collect(),
        };
        let step = Step {
            plan,
            targets: &targets,
            scope: &scope,
            check_finite: self.config.on_nonfinite != OnNonFinite::Propagate,
        };
        // The statistics travel to the pipeline and back (moved, not copied).
        let mut stats: Vec<Stats> = self
            .slots
            .iter_mut()
            .map(|s| std::mem::replace(&mut s.stats, Stats::Unfactored { v: Vec::new() }))
            .collect();
        let n = self.slots.len();
        let outcome = match (path, shard) {
            (DataPath::Fused, shard) => {
                let buffers = fused::Buffers::new(&self.slots, items);
                let mut backend = engine::fused::Fused::with_spare(&buffers, &self.spare);
                match shard {
                    None => engine::run(&mut backend, &mut stats, step, &Local),
                    Some(sh) => run_sharded(&mut backend, &mut stats, step, sh.comm, sh.order, n),
                }
            }
            (DataPath::Composed, None) => engine::run(
                &mut Composed::new(&mut self.slots, items),
                &mut stats,
                step,
                &Local,
            ),
            (DataPath::Composed, Some(sh)) => run_sharded(
                &mut Composed::new(&mut self.slots, items),
                &mut stats,
                step,
                sh.comm,
                sh.order,
                n,
            ),
        };
        for (slot, st) in self.slots.iter_mut().zip(stats) {
            slot.stats = st;
        }
        let outcome = outcome?;
        self.last_path = Some(path);
        Ok(outcome)
    }

    /// Counts a step's outcome (see [`Counters::record`]).
    pub(crate) fn record(&mut self, outcome: Outcome, counts: bool) -> Result<()> {
        let slots = &self.slots;
        self.counters
            .record(outcome, self.config.on_nonfinite, counts, |var| {
                var.map_or_else(
                    || "<a variable updated by another rank>".into(),
                    |i| slots[i].name.clone(),
                )
            })
            .map_err(core_err)
    }
}

/// One rank's part of a sharded step.
struct Shard<'a> {
    comm: &'a mut dyn Collective,
    /// Every variable with a gradient (on every rank), in call order.
    order: &'a [usize],
    /// The variables this rank owns.
    scope: Vec<usize>,
}

impl candle_nn::Optimizer for Adafactor {
    type Config = AdafactorConfig;

    /// Builds on the variables, named `var0`, `var1`, ...; non-float variables are dropped.
    fn new(vars: Vec<Var>, config: AdafactorConfig) -> Result<Self> {
        let mut opt = Self::unbuilt(config)?;
        opt.build(&vars)?;
        Ok(opt)
    }

    /// `apply_gradients` with each built variable's gradient from the store (missing ones are
    /// skipped, as Keras skips `None`).
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let vars: Vec<Var> = self.slots.iter().map(|s| s.var.clone()).collect();
        let pairs: Vec<(Option<&Tensor>, &Var)> = vars.iter().map(|v| (grads.get(v), v)).collect();
        self.apply_gradients(&pairs).map(|_| ())
    }

    /// The learning rate the next step uses (a schedule's value at the raw step). The step size
    /// itself is `min(lr, 1/sqrt(t))`, whatever `relative_step` says (as in Keras).
    fn learning_rate(&self) -> f64 {
        self.current_learning_rate() as f64
    }

    /// Sets a constant learning rate. On a schedule-based optimizer this replaces the schedule
    /// (the trait cannot report an error); use [`Adafactor::try_set_learning_rate`] for Keras's
    /// refusal. Invalid values (negative, non-finite) are ignored.
    fn set_learning_rate(&mut self, lr: f64) {
        let cfg = AdafactorConfig {
            learning_rate: LearningRate::Constant(lr),
            ..self.config.clone()
        };
        if cfg.validate().is_ok() {
            self.config = cfg;
        }
    }

    /// Keras `minimize`: backpropagates `loss` (scaled by `loss_scale_factor`) and steps.
    fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = self.scale_loss(loss)?.backward()?;
        candle_nn::Optimizer::step(self, &grads)
    }
}
