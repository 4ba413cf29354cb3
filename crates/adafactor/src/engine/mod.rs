//! The step pipeline, written once: one `apply_gradients` call as a chain of named stages over
//! a [`Backend`] that a framework adapter implements.
//!
//! # Stages
//! Keras's order inside one apply ([`run`]), with the decisions made here and the arithmetic on
//! tensors left to the backend:
//! 1. **plan** ([`StepPlan`]): accumulate-only or update call, the update scalars, EMA work.
//! 2. **accumulate** (accumulate-only calls): [`Backend::check_gradients`] (finiteness of the
//!    unscaled gradients), then [`Backend::accumulate`] (`acc += g / loss_scale_factor`).
//! 3. **measure** ([`Backend::measure`]): per variable, the effective gradient (unscaled,
//!    averaged with the accumulator, clamped by `clipvalue`, see [`GradTransform`]) and its sum
//!    of squares, RMS of the weight after decoupled weight decay, and finiteness.
//! 4. **combine** ([`Combine`]): the partial sum of squares and the finiteness flag of the
//!    variables this process updates are combined into global ones (the identity in one
//!    process). A non-finite gradient ends the step here: nothing has been written, and the
//!    [`Outcome`] names the variable.
//! 5. **clip** ([`clip_scales`]): per-variable `clipnorm` or `global_clipnorm` scales.
//! 6. **update** ([`Backend::update`]): the new second-moment statistics and RMS of the update,
//!    `u = g / sqrt(v)` (factored: `v_ij = r_i c_j / mean(r)`), Shazeer & Stern (2018),
//!    "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", arXiv:1804.04235,
//!    Algorithm 4 (factored second moments) and its update clipping.
//! 7. **write** ([`Backend::write`]): `x = decay(x) - alpha * u / max(1, RMS(u) / d)` with
//!    `alpha = max(epsilon_2, RMS(x)) * rho` (the paper's relative step size).
//! 8. **zero accumulators**, **EMA** and **overwrite** ([`Backend::zero_accumulators`],
//!    [`Backend::ema`]), then [`Backend::commit`] and the statistics are committed. A backend
//!    that folds them into its write ([`Backend::folds_after_write`], the fused one: each block
//!    of new weights is averaged, overwritten and its accumulator zeroed while in cache) does
//!    them there for the targets ([`UpdateContext::after_write`]), and the separate stages see
//!    the other variables of `scope` only.
//!
//! Nothing is written before stage 7, and a backend's write cannot fail on inputs that passed
//! stages 1 to 6, so a refused step leaves weights and state as they were.
//!
//! # Backends
//! Two implementations exist: [`fused::Fused`], the core's slice kernels over any
//! [`fused::SliceStore`] (a framework gives mutable `f32`/`bf16`/`f16` slices of its CPU
//! storage), and each adapter's composed backend (its own tensor ops, any device). The
//! statistics are host `f32` vectors owned by the caller and passed to [`run`].
//!
//! # How a data-parallel driver or a new framework plugs in
//! - **A new framework** implements [`fused::SliceStore`] (read and in-place write access to
//!   its buffers as slices) for its CPU storage, and [`Backend`] with its tensor ops for other
//!   devices; it keeps [`Stats`] per variable and [`Counters`], calls [`run`] per
//!   step and derives its `variables()` and checkpoints from [`crate::manifest`].
//! - **Replicated data parallelism**: all-reduce (average) the gradient buffers before [`run`];
//!   every rank then runs the ordinary step with [`Local`].
//! - **Sharded data parallelism (ZeRO-1)**: each rank passes only the [`Target`]s and the
//!   `scope` of the variables it owns, and a [`Combine`] whose `sum` all-reduces one scalar
//!   (the global norm's sum of squares) and whose `all` all-reduces the finiteness flag; after
//!   [`run`], owners broadcast their new weights.

#[cfg(test)]
mod after_write_tests;
pub mod fused;

use crate::config::OnNonFinite;
use crate::error::Error;
use crate::kernels::{Decay, GradTransform};
use crate::plan::{Accumulation, Clip, EmaPlan, StepPlan, UpdateScalars};
use crate::state::Stats;
use rayon::prelude::*;

/// A variable that has a gradient in this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The variable's index in the backend (and in the statistics list).
    pub var: usize,
    /// False when the variable is excluded from weight decay.
    pub decays: bool,
}

/// What the measure stage learns about one variable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measure {
    /// Sum of squares of the effective gradient (for `clipnorm` and `global_clipnorm`; the
    /// backend may leave it 0 when [`Clip`] is neither).
    pub sum_sq_grad: f64,
    /// RMS of the weight after weight decay.
    pub rms_x: f32,
    /// False when the unscaled gradient holds NaN or infinity (only checked when asked).
    pub finite: bool,
}

/// How the gradient of one variable is scaled by norm clipping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GradScale {
    /// Unchanged.
    One,
    /// `g * num / den` (`clipnorm`, as `tf.clip_by_norm` computes it).
    Ratio {
        /// The clip norm.
        num: f32,
        /// `max(||g||, clipnorm)`.
        den: f32,
    },
    /// `g * s` (`global_clipnorm`).
    Factor(f32),
}

impl GradScale {
    /// The scale as one factor (what the fused kernels multiply by).
    pub fn factor(self) -> f32 {
        match self {
            GradScale::One => 1.0,
            GradScale::Ratio { num, den } => num / den,
            GradScale::Factor(s) => s,
        }
    }
}

/// Everything an update stage needs besides the per-variable data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateContext {
    /// The gradient element transform (unscale, accumulator average, `clipvalue`).
    pub transform: GradTransform,
    /// The update scalars.
    pub scalars: UpdateScalars,
    /// Whether finiteness is checked (`on_nonfinite` is not `"propagate"`).
    pub check_finite: bool,
    /// Stochastic rounding of the new weights (`None`: to nearest). Each variable's bits are
    /// keyed by its index ([`crate::kernels::Rounding::for_variable`]).
    pub rounding: Option<crate::rounding::StepRounding>,
    /// What the write stage also does to every target, when the backend folds it in
    /// ([`Backend::folds_after_write`]); `None`: the separate stages do it.
    pub after_write: Option<AfterWrite>,
}

/// The stages after the write that a backend folds into its write of each target, while the
/// target's new weights are in cache ([`Backend::folds_after_write`]): the same results as
/// [`Backend::zero_accumulators`] and [`Backend::ema`] on the targets, which [`run`] then
/// leaves out of those stages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AfterWrite {
    /// The EMA (and overwrite) of every target.
    pub ema: Option<EmaPlan>,
    /// Set every target's accumulator to zero once the write has read it (the update call of
    /// gradient accumulation).
    pub zero_accumulators: bool,
}

impl UpdateContext {
    /// The decoupled weight decay of a target, when it has one.
    pub fn decay(&self, target: &Target) -> Option<Decay> {
        let u = &self.scalars;
        u.weight_decay.filter(|_| target.decays).map(|wd| Decay {
            weight_decay: wd,
            learning_rate: u.learning_rate,
        })
    }
}

/// The scalars of the write stage of one variable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriteScalars {
    /// `alpha = max(epsilon_2, RMS(x)) * rho`.
    pub alpha: f32,
    /// The update-clipping divisor `max(1, RMS(u) / clip_threshold)`.
    pub divisor: f32,
    /// The norm-clipping scale of the gradient.
    pub scale: GradScale,
}

/// The primitive operations of one step on one framework's tensors.
///
/// The stages are called in the order of the module docs, each once per step at most, with
/// all the step's targets at once (so that a backend can run them in parallel). Per-variable
/// results of one stage that a later stage needs travel in [`Backend::Measured`] and
/// [`Backend::Updated`].
pub trait Backend {
    /// The adapter's error type.
    type Error;
    /// What the measure stage keeps per target for the update and write stages.
    type Measured: Send;
    /// What the update stage keeps per target for the write stage.
    type Updated: Send;

    /// A core error as the adapter's error.
    fn core_error(e: Error) -> Self::Error;

    /// Accumulate-only call: whether each target's gradient, unscaled by `transform`, is
    /// finite (asked only when finiteness is checked).
    fn check_gradients(
        &mut self,
        targets: &[Target],
        transform: GradTransform,
    ) -> Result<Vec<bool>, Self::Error>;

    /// Accumulate-only call: `acc += g` with `g` unscaled by `transform`.
    fn accumulate(
        &mut self,
        targets: &[Target],
        transform: GradTransform,
    ) -> Result<(), Self::Error>;

    /// Measure stage (read-only).
    fn measure(
        &mut self,
        targets: &[Target],
        stats: &[Stats],
        ctx: &UpdateContext,
    ) -> Result<Vec<(Measure, Self::Measured)>, Self::Error>;

    /// Update stage (read-only): per target, RMS of the update `u` (before update clipping)
    /// and what the write stage needs (the new statistics among it).
    fn update(
        &mut self,
        targets: &[Target],
        stats: &[Stats],
        measured: &[(Measure, Self::Measured)],
        scales: &[GradScale],
        ctx: &UpdateContext,
    ) -> Result<Vec<(f32, Self::Updated)>, Self::Error>;

    /// Write stage: writes (or stages) the new weights; returns each target's new statistics.
    fn write(
        &mut self,
        targets: &[Target],
        stats: &[Stats],
        updated: Vec<(f32, Self::Updated)>,
        scalars: &[WriteScalars],
        ctx: &UpdateContext,
    ) -> Result<Vec<Stats>, Self::Error>;

    /// Whether [`Backend::write`] does what [`UpdateContext::after_write`] asks (the EMA and
    /// accumulator zeroing of the targets) when it is set. By default it does not, and [`run`]
    /// leaves the field `None` and runs the separate stages on every variable.
    fn folds_after_write(&self) -> bool {
        false
    }

    /// Sets the accumulators of these variables to zero (after an update that used them).
    fn zero_accumulators(&mut self, vars: &[usize]) -> Result<(), Self::Error>;

    /// `avg = m * avg + (1 - m) * x` for these variables, then `x = avg` when `overwrite`.
    fn ema(&mut self, vars: &[usize], ema: EmaPlan) -> Result<(), Self::Error>;

    /// Makes staged values visible (a backend that writes in place has nothing to do).
    fn commit(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Takes the statistics a committed step replaced, to reuse their buffers; by default they
    /// are freed (in parallel: with thousands of small tensors, one by one takes as long as a
    /// pass).
    fn recycle(&mut self, old: Vec<Stats>) {
        old.into_par_iter().for_each(drop);
    }
}

/// Where per-process partial results become global ones: the identity in one process; an
/// all-reduce across ranks when each rank updates only the variables it owns.
pub trait Combine {
    /// The sum over processes of a partial sum (of squares of gradients).
    ///
    /// # Errors
    /// The exchange failed.
    fn sum(&self, local: f64) -> Result<f64, Error>;

    /// True when every process says true (every gradient finite).
    ///
    /// # Errors
    /// The exchange failed.
    fn all(&self, local: bool) -> Result<bool, Error>;
}

/// The single-process [`Combine`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

impl Combine for Local {
    fn sum(&self, local: f64) -> Result<f64, Error> {
        Ok(local)
    }
    fn all(&self, local: bool) -> Result<bool, Error> {
        Ok(local)
    }
}

/// One step to run.
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// The plan of this call.
    pub plan: &'a StepPlan,
    /// The variables with a gradient, in call order.
    pub targets: &'a [Target],
    /// The variables whose accumulator and EMA this process keeps (all, in one process).
    pub scope: &'a [usize],
    /// Whether finiteness is checked (`on_nonfinite` is not `"propagate"`).
    pub check_finite: bool,
}

/// How a step ended (errors aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The step ran.
    Applied,
    /// A gradient holds NaN or infinity and finiteness is checked: nothing was written.
    NonFinite {
        /// The first such variable of this process (`None` when only another process saw one).
        var: Option<usize>,
    },
}

/// The step counters every adapter keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Keras `_iterations`: calls that had at least one gradient and were not skipped.
    pub raw_iterations: u64,
    /// Steps skipped for a non-finite gradient (`on_nonfinite = "skip"`).
    pub skipped_steps: u64,
}

impl Counters {
    /// Counts a step's outcome under the `on_nonfinite` policy: an applied step counts one
    /// call when `counts` (an `apply_gradients` call, not Keras's bare `update_step`); a refused
    /// one counts a skipped step (`"skip"`) or is an error naming the variable (`"error"`).
    /// `"propagate"` never refuses.
    ///
    /// # Errors
    /// [`Error::NonFinite`] with `on_nonfinite = "error"`, naming `name_of(var)`.
    pub fn record(
        &mut self,
        outcome: Outcome,
        policy: OnNonFinite,
        counts: bool,
        name_of: impl FnOnce(Option<usize>) -> String,
    ) -> Result<(), Error> {
        match outcome {
            Outcome::Applied => {
                if counts {
                    self.raw_iterations += 1;
                }
                Ok(())
            }
            Outcome::NonFinite { .. } if policy == OnNonFinite::Skip => {
                self.skipped_steps += 1;
                Ok(())
            }
            Outcome::NonFinite { var } => Err(Error::NonFinite {
                variable: name_of(var),
            }),
        }
    }
}

/// Norm-clipping scales, one per target, from the targets' partial sums of squares and the
/// global sum (Keras `_clip_gradients`, in float32).
pub fn clip_scales(clip: Clip, sums: &[f64], global_sum: f64) -> Vec<GradScale> {
    match clip {
        Clip::Norm(c) => sums
            .iter()
            .map(|s| {
                let l2sum = *s as f32;
                if l2sum > 0.0 {
                    GradScale::Ratio {
                        num: c,
                        den: l2sum.sqrt().max(c),
                    }
                } else {
                    GradScale::One
                }
            })
            .collect(),
        Clip::GlobalNorm(gc) => {
            let norm = (global_sum as f32).sqrt();
            // `norm - norm` is Keras's way to turn a non-finite norm into NaN.
            #[allow(clippy::eq_op)]
            let scale = gc * (1.0 / norm).min(1.0 / gc) + (norm - norm);
            vec![GradScale::Factor(scale); sums.len()]
        }
        Clip::None | Clip::Value(_) => vec![GradScale::One; sums.len()],
    }
}

/// The gradient transform of a planned call.
pub fn transform(plan: &StepPlan) -> GradTransform {
    GradTransform {
        loss_scale: plan.loss_scale_factor,
        accumulate_steps: match plan.accumulation {
            Accumulation::Apply { steps } => Some(steps as f32),
            _ => None,
        },
        clip_value: match plan.update.map(|u| u.clip) {
            Some(Clip::Value(v)) => Some(v),
            _ => None,
        },
    }
}

/// Runs one planned step: the stages of the module docs, in order. `stats` holds every
/// variable's statistics (indexed by [`Target::var`]) and is updated when the step applies.
///
/// # Errors
/// A backend or [`Combine`] error; an update call without update scalars. Nothing the backend
/// reported as written is undone, so backends only fail before their first write.
pub fn run<B: Backend, C: Combine>(
    backend: &mut B,
    stats: &mut [Stats],
    step: Step<'_>,
    combine: &C,
) -> Result<Outcome, B::Error> {
    let Step {
        plan,
        targets,
        scope,
        check_finite,
    } = step;
    let transform = transform(plan);
    let mut new_stats = None;
    // The variables the separate zeroing and EMA stages still see: the scope, less the targets
    // whose write folded them in.
    let mut rest = std::borrow::Cow::Borrowed(scope);
    match (plan.accumulation, plan.update) {
        (Accumulation::Accumulate, _) => {
            if check_finite {
                let flags = backend.check_gradients(targets, transform)?;
                if let Some(outcome) = refuse(targets, &flags, combine).map_err(B::core_error)? {
                    return Ok(outcome);
                }
            }
            backend.accumulate(targets, transform)?;
        }
        (acc, Some(scalars)) => {
            let zero_accumulators = matches!(acc, Accumulation::Apply { .. });
            let fold = (zero_accumulators || plan.ema.is_some()) && backend.folds_after_write();
            let after_write = match fold.then(|| unfolded(scope, targets)).flatten() {
                Some(others) => {
                    rest = std::borrow::Cow::Owned(others);
                    Some(AfterWrite {
                        ema: plan.ema,
                        zero_accumulators,
                    })
                }
                None => None,
            };
            let ctx = UpdateContext {
                transform,
                scalars,
                check_finite,
                rounding: plan.rounding,
                after_write,
            };
            // Kept as pairs, not unzipped: with thousands of small tensors every list of the
            // step is a large allocation of its own.
            let measured = backend.measure(targets, stats, &ctx)?;
            if check_finite {
                let flags: Vec<bool> = measured.iter().map(|(m, _)| m.finite).collect();
                if let Some(outcome) = refuse(targets, &flags, combine).map_err(B::core_error)? {
                    return Ok(outcome);
                }
            }
            let sums: Vec<f64> = measured.iter().map(|(m, _)| m.sum_sq_grad).collect();
            let global = match scalars.clip {
                Clip::GlobalNorm(_) => combine.sum(sums.iter().sum()).map_err(B::core_error)?,
                _ => 0.0,
            };
            let scales = clip_scales(scalars.clip, &sums, global);
            let updated = backend.update(targets, stats, &measured, &scales, &ctx)?;
            let write: Vec<WriteScalars> = measured
                .iter()
                .zip(&updated)
                .zip(&scales)
                .map(|(((m, _), (rms_u, _)), s)| WriteScalars {
                    alpha: scalars.alpha(m.rms_x),
                    divisor: scalars.update_clip_divisor(*rms_u),
                    scale: *s,
                })
                .collect();
            new_stats = Some(backend.write(targets, stats, updated, &write, &ctx)?);
            // Freed in parallel: with thousands of small tensors, freeing one by one would take
            // as long as a pass.
            measured.into_par_iter().for_each(drop);
            if zero_accumulators && !rest.is_empty() {
                backend.zero_accumulators(&rest)?;
            }
        }
        (_, None) => {
            let e = Error::Internal("an update call without update scalars".into());
            return Err(B::core_error(e));
        }
    }
    if let Some(ema) = plan.ema.filter(|_| !rest.is_empty()) {
        backend.ema(&rest, ema)?;
    }
    backend.commit()?;
    if let Some(new) = new_stats {
        backend.recycle(commit_stats(stats, targets, new));
    }
    Ok(Outcome::Applied)
}

/// The variables of `scope` that are not targets, when every target is in `scope` (so that the
/// write stage can do the zeroing and EMA of the targets); `None` otherwise.
fn unfolded(scope: &[usize], targets: &[Target]) -> Option<Vec<usize>> {
    let len = scope
        .iter()
        .chain(targets.iter().map(|t| &t.var))
        .max()
        .map_or(0, |v| v + 1);
    let mut in_scope = vec![false; len];
    for &v in scope {
        in_scope[v] = true;
    }
    for t in targets {
        if !std::mem::replace(&mut in_scope[t.var], false) {
            // Not in scope, or a target twice.
            return None;
        }
    }
    Some(scope.iter().copied().filter(|&v| in_scope[v]).collect())
}

/// The outcome of a refused step, when a finiteness flag (here or in another process) is false.
fn refuse<C: Combine>(
    targets: &[Target],
    flags: &[bool],
    combine: &C,
) -> Result<Option<Outcome>, Error> {
    let first = targets.iter().zip(flags).find(|(_, f)| !**f);
    if combine.all(first.is_none())? {
        return Ok(None);
    }
    Ok(Some(Outcome::NonFinite {
        var: first.map(|(t, _)| t.var),
    }))
}

/// Installs new statistics, in parallel (moving thousands of vectors one by one takes as long
/// as a pass); returns the replaced ones.
fn commit_stats(stats: &mut [Stats], targets: &[Target], mut new: Vec<Stats>) -> Vec<Stats> {
    // The usual step, every variable's gradient in the variables' order: swapped in place, the
    // replaced statistics taking the new ones' places (no list of the step built for it).
    let in_order = targets.len() == new.len()
        && targets.len() <= stats.len()
        && targets.par_iter().enumerate().all(|(k, t)| t.var == k);
    if in_order {
        stats[..new.len()]
            .par_iter_mut()
            .zip(new.par_iter_mut())
            .for_each(|(old, fresh)| std::mem::swap(old, fresh));
        return new;
    }
    let mut by_var: Vec<Option<Stats>> = (0..stats.len()).map(|_| None).collect();
    for (t, s) in targets.iter().zip(new) {
        by_var[t.var] = Some(s);
    }
    stats
        .par_iter_mut()
        .zip(by_var)
        .filter_map(|(slot, s)| s.map(|s| std::mem::replace(slot, s)))
        .collect()
}

#[cfg(test)]
mod commit_tests {
    use super::*;

    fn v(x: f32) -> Stats {
        Stats::Unfactored { v: vec![x] }
    }

    fn target(var: usize) -> Target {
        Target { var, decays: true }
    }

    #[test]
    fn new_statistics_land_on_their_variables_in_any_target_order() {
        // In order (swapped in place), a prefix in order, out of order and with gaps (the
        // general path): each variable gets its own new statistics, the others keep theirs,
        // and the replaced ones come back in the variables' order.
        let cases: [&[usize]; 4] = [&[0, 1, 2, 3], &[0, 1], &[3, 1, 0], &[2, 0]];
        for vars in cases {
            let mut stats: Vec<Stats> = (0..4).map(|i| v(i as f32)).collect();
            let targets: Vec<Target> = vars.iter().map(|&i| target(i)).collect();
            let new: Vec<Stats> = vars.iter().map(|&i| v(10.0 + i as f32)).collect();
            let old = commit_stats(&mut stats, &targets, new);
            for (i, st) in stats.iter().enumerate() {
                let want = if vars.contains(&i) {
                    10.0 + i as f32
                } else {
                    i as f32
                };
                assert_eq!(*st, v(want), "variable {i}, targets {vars:?}");
            }
            let mut sorted = vars.to_vec();
            sorted.sort_unstable();
            let want_old: Vec<Stats> = sorted.iter().map(|&i| v(i as f32)).collect();
            assert_eq!(old, want_old, "replaced statistics, targets {vars:?}");
        }
    }
}
