//! The fused backend: the core's slice kernels ([`crate::kernels`]) run in place on a
//! framework's storage, reached through [`SliceStore`].
//!
//! All targets of a stage run in one parallel job (many small tensors make one job, not one
//! thread-pool dispatch each):
//! - measure is kernel pass 1 (read-only): row and column sums, norms, RMS(x), finiteness;
//!   without norm clipping it also folds the row statistics in;
//! - update is the O(n + m) statistics update and, when needed, pass 2 for RMS(u);
//! - write is pass 3, in the reverse order of pass 1 (what pass 1 read last is still in the
//!   last-level cache), the first write of the step.

use super::{Backend, GradScale, Measure, Target, UpdateContext, WriteScalars};
use crate::error::Error;
use crate::kernels::shaped::{self, Fresh, Kernel, Reads, StatArgs, Statistics};
use crate::kernels::{
    after_write, elementwise, factored, prefetch_head, strided, vector, Grad, GradTransform,
    Rounding, RowLoops, Spare, Tail,
};
use crate::plan::{Clip, EmaPlan};
use crate::rounding::RoundingStream;
use crate::state::{Factoring, Stats};
use half::{bf16, f16};
use rayon::prelude::*;
use std::sync::Mutex;

/// A read-only view of a buffer, in its element type.
#[derive(Debug)]
pub enum Slice<'a> {
    /// float32 elements.
    F32(&'a [f32]),
    /// bfloat16 elements.
    Bf16(&'a [bf16]),
    /// float16 elements.
    F16(&'a [f16]),
}

/// A writable view of a buffer, in its element type.
#[derive(Debug)]
pub enum SliceMut<'a> {
    /// float32 elements.
    F32(&'a mut [f32]),
    /// bfloat16 elements.
    Bf16(&'a mut [bf16]),
    /// float16 elements.
    F16(&'a mut [f16]),
}

/// The element types of weights and gradients the fused kernels run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementType {
    /// float32.
    F32,
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
}

/// One buffer of a variable. Averages and accumulators are always float32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    /// The weight (read, and written in place by the write stage and EMA overwrite).
    Weight,
    /// This step's gradient (read only).
    Gradient,
    /// The EMA average (with `use_ema`).
    Average,
    /// The gradient accumulator (with gradient accumulation).
    Accumulator,
}

/// Slice access to a framework's buffers, the whole contract of the fused path.
///
/// Every call hands `f` a view that is valid for the call only (a framework may hold a lock
/// meanwhile). Calls come from several threads at once, each on a different variable's buffers
/// for writes; a write never aliases a read of another buffer (the adapter checks that no
/// gradient shares storage with a weight, average or accumulator before choosing this path).
pub trait SliceStore: Sync {
    /// The adapter's error type.
    type Error: Send;

    /// A core error as the adapter's error.
    fn core_error(e: Error) -> Self::Error;

    /// The element type of variable `var`'s weight (its gradient has the same).
    fn element_type(&self, var: usize) -> ElementType;

    /// Calls `f` with a read-only view of a buffer.
    ///
    /// # Errors
    /// The buffer does not exist or cannot be read.
    fn read<R>(
        &self,
        var: usize,
        buffer: Buffer,
        f: impl FnOnce(Slice<'_>) -> R,
    ) -> Result<R, Self::Error>;

    /// Calls `f` with a writable view of a buffer (never the gradient).
    ///
    /// # Errors
    /// The buffer does not exist or cannot be written.
    fn write<R>(
        &self,
        var: usize,
        buffer: Buffer,
        f: impl FnOnce(SliceMut<'_>) -> R,
    ) -> Result<R, Self::Error>;
}

/// An element type's views out of [`Slice`] and [`SliceMut`].
pub trait Typed: RowLoops {
    /// The view when it holds this type.
    fn of(s: Slice<'_>) -> Option<&[Self]>;
    /// The writable view when it holds this type.
    fn of_mut(s: SliceMut<'_>) -> Option<&mut [Self]>;
}

macro_rules! typed {
    ($t:ty, $v:ident) => {
        impl Typed for $t {
            fn of(s: Slice<'_>) -> Option<&[$t]> {
                match s {
                    Slice::$v(s) => Some(s),
                    _ => None,
                }
            }
            fn of_mut(s: SliceMut<'_>) -> Option<&mut [$t]> {
                match s {
                    SliceMut::$v(s) => Some(s),
                    _ => None,
                }
            }
        }
    };
}
typed!(f32, F32);
typed!(bf16, Bf16);
typed!(f16, F16);

/// Runs `$body` with `$T` bound to the Rust type of an [`ElementType`].
macro_rules! with_type {
    ($ty:expr, $T:ident => $body:expr) => {
        match $ty {
            ElementType::F32 => {
                type $T = f32;
                $body
            }
            ElementType::Bf16 => {
                type $T = bf16;
                $body
            }
            ElementType::F16 => {
                type $T = f16;
                $body
            }
        }
    };
}

fn mismatch(var: usize, buffer: Buffer) -> Error {
    Error::Internal(format!(
        "fused path: buffer {buffer:?} of variable {var} does not hold the expected element type"
    ))
}

/// The fused backend over a [`SliceStore`].
#[derive(Debug)]
pub struct Fused<'s, S> {
    store: &'s S,
    spare: Option<&'s Spare>,
}

impl<'s, S: SliceStore> Fused<'s, S> {
    /// The backend over `store`.
    pub fn new(store: &'s S) -> Self {
        Fused { store, spare: None }
    }

    /// The backend over `store`, writing new statistics to the buffers that `spare` kept from
    /// the previous step and keeping the ones this step replaces (the caller keeps `spare`
    /// from step to step).
    pub fn with_spare(store: &'s S, spare: &'s Spare) -> Self {
        Fused {
            store,
            spare: Some(spare),
        }
    }

    /// A buffer of `len` elements, every one of which the caller writes.
    fn buffer(&self, len: usize) -> Vec<f32> {
        match self.spare {
            Some(s) => s.take(len),
            None => vec![0f32; len],
        }
    }

    /// Buffers for the new statistics of a factored variable.
    fn fresh(&self, f: crate::state::Factoring) -> Fresh {
        Fresh {
            r: self.buffer(f.lead * f.n),
            c: self.buffer(f.lead * f.m),
        }
    }

    /// Reads a buffer as `&[T]`.
    fn read_as<T: Typed, R>(
        &self,
        var: usize,
        buffer: Buffer,
        f: impl FnOnce(&[T]) -> R,
    ) -> Result<R, S::Error> {
        self.store
            .read(var, buffer, |s| T::of(s).map(f))?
            .ok_or_else(|| S::core_error(mismatch(var, buffer)))
    }

    /// Writes a buffer as `&mut [T]`.
    fn write_as<T: Typed, R>(
        &self,
        var: usize,
        buffer: Buffer,
        f: impl FnOnce(&mut [T]) -> R,
    ) -> Result<R, S::Error> {
        self.store
            .write(var, buffer, |s| T::of_mut(s).map(f))?
            .ok_or_else(|| S::core_error(mismatch(var, buffer)))
    }

    /// Calls `f` with variable `var`'s effective gradient: the stored one and, on the update
    /// call of gradient accumulation, the accumulator, under `transform`.
    fn with_grad<T: Typed, R>(
        &self,
        var: usize,
        transform: GradTransform,
        f: impl FnOnce(&Grad<'_, T>) -> R,
    ) -> Result<R, S::Error> {
        self.read_as::<T, _>(var, Buffer::Gradient, |g| {
            match transform.accumulate_steps {
                Some(_) => self.read_as::<f32, _>(var, Buffer::Accumulator, |acc| {
                    f(&Grad {
                        g,
                        acc: Some(acc),
                        transform,
                    })
                }),
                None => Ok(f(&Grad {
                    g,
                    acc: None,
                    transform,
                })),
            }
        })?
    }
}

impl<S: SliceStore> Fused<'_, S> {
    /// Calls `f` with variable `var`'s effective gradient and what follows its write
    /// ([`UpdateContext::after_write`]): the average, writable, for the EMA; on the update call
    /// of gradient accumulation the accumulator, writable, for the write to read and then zero
    /// (the gradient then carries no accumulator, the [`Tail`] does).
    fn with_write_inputs<T: Typed, R>(
        &self,
        var: usize,
        ctx: &UpdateContext,
        f: impl FnOnce(&Grad<'_, T>, Tail<'_>) -> R,
    ) -> Result<R, S::Error> {
        let Some(after) = ctx.after_write else {
            return self.with_grad::<T, _>(var, ctx.transform, |g| f(g, Tail::default()));
        };
        let with_acc = |avg: Option<&mut [f32]>| {
            let ema = after.ema.zip(avg).map(|(e, avg)| after_write::Ema {
                avg,
                momentum: e.momentum,
                overwrite: e
                    .overwrite
                    .then(|| Rounding::for_variable(e.rounding, var, RoundingStream::EmaOverwrite)),
            });
            if !after.zero_accumulators {
                let tail = Tail {
                    ema,
                    zero_acc: None,
                };
                return self.with_grad::<T, _>(var, ctx.transform, |g| f(g, tail));
            }
            self.read_as::<T, _>(var, Buffer::Gradient, |g| {
                let grad = Grad {
                    g,
                    acc: None,
                    transform: ctx.transform,
                };
                self.write_as::<f32, _>(var, Buffer::Accumulator, |acc| {
                    f(
                        &grad,
                        Tail {
                            ema,
                            zero_acc: Some(acc),
                        },
                    )
                })
            })?
        };
        match after.ema {
            Some(_) => self.write_as::<f32, _>(var, Buffer::Average, |avg| with_acc(Some(avg)))?,
            None => with_acc(None),
        }
    }
}

/// What a [`Measured`] record holds, taken out (`None` when pass 1 left it empty).
fn take<T>(m: &Mutex<Option<T>>) -> Option<T> {
    m.lock().map_or(None, |mut s| s.take())
}

/// `sqrt(sum_u2 / len)` as float32: RMS(u) of `len` elements.
fn rms(sum_u2: f64, len: usize) -> f32 {
    (sum_u2 / len.max(1) as f64).sqrt() as f32
}

/// RMS(u) of a factored variable from its `sum(u^2)` and new statistics, NaN wherever the
/// element-wise sum is ([`factored::elementwise_sum_sq_update`]).
fn factored_rms(sum_u2: f64, r: &[f32], c: &[f32], f: Factoring) -> f32 {
    rms(
        factored::elementwise_sum_sq_update(sum_u2, r, c, f),
        f.len(),
    )
}

/// The update stage's result for a target whose pass 1 folded the statistics update in
/// (`None` otherwise): no buffer is read.
fn take_folded(st: &Stats, first: &Measured) -> Option<Result<(f32, Updated), Error>> {
    Some(match (st, first) {
        (Stats::Factored { factoring, .. }, Measured::Prepared(done)) => take(done)
            .map(|(prep, sum_u2)| {
                let rms_u = factored_rms(sum_u2, &prep.r, &prep.c, *factoring);
                (rms_u, Updated::Factored(prep))
            })
            .ok_or_else(kind_mismatch),
        (Stats::Factored { factoring, .. }, Measured::Shaped(st)) => {
            // Not folded under norm clipping: the statistics pass runs here.
            let st = take(st)?;
            let rms_u = factored_rms(st.sum_sq_update, &st.r, &st.c, *factoring);
            Ok((rms_u, Updated::Shaped(st)))
        }
        (Stats::Unfactored { v }, Measured::VectorFolded(done)) => take(done)
            .map(|(v_new, sum_u2)| (rms(sum_u2, v.len()), Updated::Vector(v_new)))
            .ok_or_else(kind_mismatch),
        _ => return None,
    })
}

/// What the measure stage keeps per target (the pass-1 sums).
#[derive(Debug)]
pub enum Measured {
    /// A factored variable.
    Factored(factored::Pass1),
    /// A factored variable whose new statistics and `sum(u^2)` pass 1 already computed (without
    /// norm clipping), taken by the update stage.
    Prepared(Mutex<Option<(factored::Prepared, f64)>>),
    /// A scalar or vector.
    Vector(vector::Pass1),
    /// A factored variable on a [`shaped`] kernel: its new statistics when pass 1 computed them
    /// (without norm clipping), taken by the update stage.
    Shaped(Mutex<Option<Statistics>>),
    /// A scalar or vector whose pass 1 also computed the new velocity and `sum(u^2)` (without
    /// norm clipping), taken by the update stage.
    VectorFolded(Mutex<Option<(Vec<f32>, f64)>>),
}

/// What the update stage keeps per target (the new statistics and pass 3's factors).
#[derive(Debug)]
pub enum Updated {
    /// A factored variable.
    Factored(factored::Prepared),
    /// A scalar or vector: its new velocity.
    Vector(Vec<f32>),
    /// A factored variable on a [`shaped`] kernel.
    Shaped(Statistics),
}

impl Updated {
    /// Where its new statistics are (address and length of each buffer), for asking ahead.
    fn statistics_at(&self) -> [(usize, usize); 2] {
        let at = |v: &[f32]| (v.as_ptr() as usize, v.len());
        match self {
            Updated::Factored(p) => [at(&p.r), at(&p.c)],
            Updated::Shaped(st) => [at(&st.r), at(&st.c)],
            Updated::Vector(v) => [at(v), (0, 0)],
        }
    }
}

fn kind_mismatch() -> Error {
    Error::Internal("statistics kind mismatch".into())
}

impl<S: SliceStore> Backend for Fused<'_, S> {
    type Error = S::Error;
    type Measured = Measured;
    type Updated = Updated;

    fn core_error(e: Error) -> S::Error {
        S::core_error(e)
    }

    fn check_gradients(
        &mut self,
        targets: &[Target],
        transform: GradTransform,
    ) -> Result<Vec<bool>, S::Error> {
        let t = GradTransform {
            accumulate_steps: None,
            ..transform
        };
        targets
            .par_iter()
            .map(|tg| {
                with_type!(self.store.element_type(tg.var), T => {
                    self.with_grad::<T, _>(tg.var, t, elementwise::is_finite)
                })
            })
            .collect()
    }

    fn accumulate(&mut self, targets: &[Target], transform: GradTransform) -> Result<(), S::Error> {
        let t = GradTransform {
            accumulate_steps: None,
            ..transform
        };
        targets.par_iter().try_for_each(|tg| {
            with_type!(self.store.element_type(tg.var), T => {
                self.with_grad::<T, _>(tg.var, t, |g| {
                    self.write_as::<f32, _>(tg.var, Buffer::Accumulator, |acc| {
                        elementwise::accumulate(acc, g)
                    })
                })?
            })
        })
    }

    fn measure(
        &mut self,
        targets: &[Target],
        stats: &[Stats],
        ctx: &UpdateContext,
    ) -> Result<Vec<(Measure, Measured)>, S::Error> {
        let u = &ctx.scalars;
        // Without norm clipping the gradient scale is 1 before pass 1 ends, so the statistics
        // update can be folded into pass 1 and pass 2 skipped.
        let fold = matches!(u.clip, Clip::None | Clip::Value(_));
        targets
            .par_iter()
            .map(|tg| {
                let decay = ctx.decay(tg);
                let st = &stats[tg.var];
                with_type!(self.store.element_type(tg.var), T => {
                    Ok(self.with_grad::<T, _>(tg.var, ctx.transform, |grad| {
                        self.read_as::<T, _>(tg.var, Buffer::Weight, |x| {
                            let len = grad.len().max(1) as f64;
                            let check = ctx.check_finite;
                            let (p, sum_sq_grad, sum_sq_x, finite) = match st {
                                Stats::Factored { factoring: f @ Factoring { strided: Some(s), .. }, r, c } if fold => {
                                    // As for the row loops below: the statistics update and
                                    // RMS(u) come out of pass 1, and pass 2 is skipped.
                                    let low_fold = factored::RowFold {
                                        r_old: if s.rows_low { r } else { c },
                                        beta2: u.beta2_t,
                                        epsilon_1: u.epsilon_1,
                                    };
                                    let (p, w) = strided::pass1_fold(grad, x, decay, *s, check, low_fold);
                                    let m = (p.sum_sq_grad, p.sum_sq_x, p.finite);
                                    let prep = factored::prepare(&p, r, c, *f, u.beta2_t, u.epsilon_1, 1.0);
                                    let sum_u2 = strided::sum_sq_update(&w, &prep, *f);
                                    (Measured::Prepared(Mutex::new(Some((prep, sum_u2)))), m.0, m.1, m.2)
                                }
                                Stats::Factored { factoring: Factoring { strided: Some(s), .. }, .. } => {
                                    let p = strided::pass1(grad, x, decay, *s, check);
                                    let s = (p.sum_sq_grad, p.sum_sq_x, p.finite);
                                    (Measured::Factored(p), s.0, s.1, s.2)
                                }
                                Stats::Factored { factoring, r, c }
                                    if shaped::preferred(*factoring) != Kernel::Rows =>
                                {
                                    // Without norm clipping, pass 1 is the statistics pass.
                                    let args = StatArgs {
                                        r_old: r,
                                        c_old: c,
                                        beta2: u.beta2_t,
                                        epsilon_1: u.epsilon_1,
                                        scale: 1.0,
                                    };
                                    let (st, s) = if fold {
                                        let reads = Reads { x: Some(x), decay, check };
                                        let out = self.fresh(*factoring);
                                        let (st, s) =
                                            shaped::statistics(grad, reads, *factoring, args, out);
                                        (Some(st), (s.sum_sq_grad, s.sum_sq_x, s.probe == 0.0))
                                    } else {
                                        let p = vector::pass1(grad, x, decay, check);
                                        (None, (p.sum_sq_grad, p.sum_sq_x, p.finite))
                                    };
                                    (Measured::Shaped(Mutex::new(st)), s.0, s.1, s.2)
                                }
                                Stats::Factored { factoring, r, c } if fold => {
                                    // Without norm clipping the gradient scale is 1 now, so the
                                    // statistics update runs here, while the sums are in cache
                                    // (with thousands of small tensors, a stage of its own costs
                                    // as much as a pass).
                                    let row_fold = factored::RowFold {
                                        r_old: r,
                                        beta2: u.beta2_t,
                                        epsilon_1: u.epsilon_1,
                                    };
                                    let done = factored::pass1_folded(
                                        grad, x, decay, *factoring, check, row_fold, c,
                                    );
                                    let s = (done.sum_sq_grad, done.sum_sq_x, done.finite);
                                    let prepared = (done.prepared, done.sum_sq_update);
                                    (Measured::Prepared(Mutex::new(Some(prepared))), s.0, s.1, s.2)
                                }
                                Stats::Factored { factoring, .. } => {
                                    let p = factored::pass1(grad, x, decay, *factoring, check, None);
                                    let s = (p.sum_sq_grad, p.sum_sq_x, p.finite);
                                    (Measured::Factored(p), s.0, s.1, s.2)
                                }
                                Stats::Unfactored { v } if fold => {
                                    let mut v_new = self.buffer(v.len());
                                    let (p, u2) = vector::pass1_fold(
                                        grad, x, decay, check, v, &mut v_new, u.beta2_t,
                                        u.epsilon_1,
                                    );
                                    let folded = Measured::VectorFolded(Mutex::new(Some((v_new, u2))));
                                    (folded, p.sum_sq_grad, p.sum_sq_x, p.finite)
                                }
                                Stats::Unfactored { .. } => {
                                    let p = vector::pass1(grad, x, decay, check);
                                    (Measured::Vector(p), p.sum_sq_grad, p.sum_sq_x, p.finite)
                                }
                            };
                            let m = Measure {
                                sum_sq_grad,
                                rms_x: (sum_sq_x / len).sqrt() as f32,
                                finite,
                            };
                            (m, p)
                        })
                    })??)
                })
            })
            .collect()
    }

    fn update(
        &mut self,
        targets: &[Target],
        stats: &[Stats],
        measured: &[(Measure, Measured)],
        scales: &[GradScale],
        ctx: &UpdateContext,
    ) -> Result<Vec<(f32, Updated)>, S::Error> {
        let u = &ctx.scalars;
        targets
            .par_iter()
            .zip(measured)
            .zip(scales)
            .map(|((tg, (_, first)), scale)| {
                // What pass 1 folded in is ready: no buffer is reached again (with thousands of
                // small tensors, reaching each one's buffers costs as much as a pass).
                if let Some(done) = take_folded(&stats[tg.var], first) {
                    return done.map_err(S::core_error);
                }
                let scale = scale.factor();
                with_type!(self.store.element_type(tg.var), T => {
                    self.with_grad::<T, _>(tg.var, ctx.transform, |grad| {
                        match (&stats[tg.var], first) {
                            (Stats::Factored { factoring, r, c }, Measured::Factored(p1)) => {
                                let prep = factored::prepare(
                                    p1, r, c, *factoring, u.beta2_t, u.epsilon_1, scale,
                                );
                                let sum_u2 = match factored::sum_sq_update(p1, &prep, *factoring) {
                                    Some(s) => s,
                                    None => match factoring.strided {
                                        Some(s) => strided::pass2(grad, &prep, s, scale),
                                        None => factored::pass2(grad, &prep, *factoring, scale),
                                    },
                                };
                                let rms_u = factored_rms(sum_u2, &prep.r, &prep.c, *factoring);
                                Ok((rms_u, Updated::Factored(prep)))
                            }
                            (Stats::Factored { factoring, r, c }, Measured::Shaped(st)) => {
                                let folded = st.lock().map_or(None, |mut s| s.take());
                                let st = match folded {
                                    Some(st) => st,
                                    None => {
                                        let args = StatArgs {
                                            r_old: r,
                                            c_old: c,
                                            beta2: u.beta2_t,
                                            epsilon_1: u.epsilon_1,
                                            scale,
                                        };
                                        let reads = Reads { x: None, decay: None, check: false };
                                        let out = self.fresh(*factoring);
                                        shaped::statistics(grad, reads, *factoring, args, out).0
                                    }
                                };
                                let rms_u = factored_rms(st.sum_sq_update, &st.r, &st.c, *factoring);
                                Ok((rms_u, Updated::Shaped(st)))
                            }
                            (Stats::Unfactored { v }, Measured::Vector(_)) => {
                                let mut v_new = self.buffer(v.len());
                                let sum_u2 = vector::pass2(
                                    grad, v, &mut v_new, u.beta2_t, u.epsilon_1, scale,
                                );
                                Ok((rms(sum_u2, v.len()), Updated::Vector(v_new)))
                            }
                            _ => Err(kind_mismatch()),
                        }
                    })?
                    .map_err(S::core_error)
                })
            })
            .collect()
    }

    fn write(
        &mut self,
        targets: &[Target],
        stats: &[Stats],
        updated: Vec<(f32, Updated)>,
        scalars: &[WriteScalars],
        ctx: &UpdateContext,
    ) -> Result<Vec<Stats>, S::Error> {
        // In the reverse order of pass 1, so that the data pass 1 read last, still in the
        // last-level cache, is read first; each target's new statistics come out of the same
        // parallel job (with thousands of small tensors, a job of its own costs as much).
        // While it writes a target, a job asks for the new statistics of the one it writes
        // next (the one before): with thousands of small tensors, each one's factors otherwise
        // wait on statistics that pass 1 wrote thousands of tensors earlier (BENCHMARKS.md,
        // 2026-12-05 12:50 UTC).
        let at: Vec<[(usize, usize); 2]> = updated
            .par_iter()
            .map(|(_, up)| up.statistics_at())
            .collect();
        let mut new: Vec<Stats> = updated
            .into_par_iter()
            .zip(targets)
            .zip(scalars)
            .enumerate()
            .rev()
            .map(|(k, (((_, up), tg), w))| {
                if let Some(next) = k.checked_sub(1).and_then(|j| at.get(j)) {
                    for &(p, len) in next {
                        prefetch_head(p as *const f32, len);
                    }
                }
                let coef = w.alpha / w.divisor;
                let scale = w.scale.factor();
                let decay = ctx.decay(tg);
                let rounding = Rounding::for_variable(ctx.rounding, tg.var, RoundingStream::Update);
                with_type!(self.store.element_type(tg.var), T => {
                    self.with_write_inputs::<T, _>(tg.var, ctx, |grad, tail| {
                        self.write_as::<T, _>(tg.var, Buffer::Weight, |x| {
                            match (&up, &stats[tg.var]) {
                                (Updated::Factored(p), Stats::Factored { factoring, .. }) => {
                                    match factoring.strided {
                                        Some(s) => after_write::write_whole(x, grad, tail, |x, g| {
                                            strided::pass3(x, g, p, s, coef, scale, decay, rounding)
                                        }),
                                        None => factored::pass3_then(
                                            x, grad, p, *factoring, coef, scale, decay, rounding,
                                            tail,
                                        ),
                                    }
                                    Ok(())
                                }
                                (Updated::Shaped(st), Stats::Factored { factoring, .. }) => {
                                    shaped::write_then(
                                        x, grad, st, *factoring, coef, scale, decay, rounding,
                                        tail,
                                    );
                                    Ok(())
                                }
                                (Updated::Vector(v), _) => {
                                    vector::pass3_then(
                                        x, grad, v, coef, scale, decay, rounding, tail,
                                    );
                                    Ok(())
                                }
                                _ => Err(kind_mismatch()),
                            }
                        })
                    })??
                    .map_err(S::core_error)
                })?;
                match (up, &stats[tg.var]) {
                    (Updated::Factored(p), Stats::Factored { factoring, .. }) => {
                        Ok(Stats::Factored {
                            factoring: *factoring,
                            r: p.r,
                            c: p.c,
                        })
                    }
                    (Updated::Shaped(st), Stats::Factored { factoring, .. }) => {
                        Ok(Stats::Factored {
                            factoring: *factoring,
                            r: st.r,
                            c: st.c,
                        })
                    }
                    (Updated::Vector(v), Stats::Unfactored { .. }) => Ok(Stats::Unfactored { v }),
                    _ => Err(S::core_error(kind_mismatch())),
                }
            })
            .collect::<Result<_, S::Error>>()?;
        new.reverse();
        Ok(new)
    }

    fn recycle(&mut self, old: Vec<Stats>) {
        let Some(spare) = self.spare else {
            old.into_par_iter().for_each(drop);
            return;
        };
        // What the step did not take again is not needed any more: at most one step's
        // statistics are kept.
        spare.replace_with(old.into_par_iter().flat_map_iter(|st| {
            let (a, b) = match st {
                Stats::Factored { r, c, .. } => (r, Some(c)),
                Stats::Unfactored { v } => (v, None),
            };
            std::iter::once(a).chain(b)
        }));
    }

    fn folds_after_write(&self) -> bool {
        true
    }

    fn zero_accumulators(&mut self, vars: &[usize]) -> Result<(), S::Error> {
        vars.par_iter()
            .try_for_each(|&v| self.write_as::<f32, _>(v, Buffer::Accumulator, elementwise::zero))
    }

    fn ema(&mut self, vars: &[usize], ema: EmaPlan) -> Result<(), S::Error> {
        vars.par_iter().try_for_each(|&v| {
            with_type!(self.store.element_type(v), T => {
                if ema.overwrite {
                    // One pass, as the write stage's tail runs it: each block of the new
                    // average is rounded into the weight while it is in cache, instead of a
                    // second pass that reads the average again.
                    let rounding =
                        Rounding::for_variable(ema.rounding, v, RoundingStream::EmaOverwrite);
                    self.write_as::<f32, _>(v, Buffer::Average, |avg| {
                        self.write_as::<T, _>(v, Buffer::Weight, |x| {
                            let ema = after_write::Ema {
                                avg,
                                momentum: ema.momentum,
                                overwrite: Some(rounding),
                            };
                            Tail {
                                ema: Some(ema),
                                zero_acc: None,
                            }
                            .finish(x)
                        })
                    })??;
                } else {
                    self.read_as::<T, _>(v, Buffer::Weight, |x| {
                        self.write_as::<f32, _>(v, Buffer::Average, |avg| {
                            elementwise::ema(avg, x, ema.momentum)
                        })
                    })??;
                }
                Ok(())
            })
        })
    }
}
