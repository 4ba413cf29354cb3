//! The fused data path (`jit_compile = true`): the core's three-pass kernels run in place on
//! candle's CPU storage through `InplaceOp1`, with no `Var::set` copy and no allocation
//! proportional to the parameter count.
//!
//! Order of one update call, all tensors at once (so that many small tensors make one parallel
//! job, not one thread-pool dispatch each):
//! 1. pass 1 over every gradient (read-only): row/column sums, norms, RMS(x), finiteness;
//! 2. clipping scales from the pass-1 norms; the O(n + m) statistics update; pass 2 for RMS(u);
//! 3. pass 3 writes each weight in place, in the reverse order of pass 1 (what pass 1 read last
//!    is still in the last-level cache); statistics are committed; EMA and overwrite follow.
//!
//! Nothing is written before pass 3, and pass 3 cannot fail on inputs that passed the checks, so
//! an error or a refused non-finite gradient leaves everything unchanged.

use crate::optimizer::{err, Adafactor};
use crate::slot::Slot;
use adafactor::kernels::{elementwise, factored, vector, Decay, Element, Grad, GradTransform};
use adafactor::{Accumulation, Clip, Stats, StepPlan};
use candle_core::{
    CpuStorage, DType, InplaceOp1, Layout, Result, Storage, StorageRef, Tensor, WithDType,
};
use half::{bf16, f16};
use rayon::prelude::*;

/// Whether a tensor can take the fused path: contiguous, on the CPU, f32/bf16/f16.
pub(crate) fn supports(t: &Tensor) -> bool {
    t.device().is_cpu()
        && t.is_contiguous()
        && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// The identity of a tensor's storage allocation.
fn storage_addr(t: &Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    &*s as *const Storage as usize
}

/// The fused path applies when every slot and gradient is supported and no gradient shares
/// storage with a weight or optimizer tensor (it would be read while written).
pub(crate) fn eligible(opt: &Adafactor, items: &[(usize, Tensor)]) -> bool {
    // Empty variables have nothing to fuse (and candle refuses in-place writes to them).
    if !opt
        .slots
        .iter()
        .all(|s| supports(&s.var) && s.var.elem_count() > 0)
        || !items.iter().all(|(_, g)| supports(g))
    {
        return false;
    }
    // A sorted list, not a hash set: one allocation for thousands of tensors.
    let mut owned = Vec::with_capacity(opt.slots.len());
    for s in &opt.slots {
        owned.push(storage_addr(&s.var));
        for t in s.kept_tensors() {
            owned.push(storage_addr(t));
        }
    }
    owned.sort_unstable();
    items
        .iter()
        .all(|(_, g)| owned.binary_search(&storage_addr(g)).is_err())
}

/// A read lock on a contiguous CPU tensor, with its element range.
struct Read<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> Read<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| err("fused path: tensor is not contiguous"))?;
        Ok(Read {
            guard,
            start,
            len: end - start,
        })
    }

    fn cpu(&self) -> Result<&CpuStorage> {
        match &*self.guard {
            Storage::Cpu(c) => Ok(c),
            _ => Err(err("fused path: tensor is not on the CPU")),
        }
    }

    fn slice<T: WithDType>(&self) -> Result<&[T]> {
        Ok(&self.cpu()?.as_slice::<T>()?[self.start..self.start + self.len])
    }
}

/// Element types the fused path writes: borrows the matching `CpuStorage` variant mutably.
trait Mutable: Sized {
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

impl Mutable for f32 {
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [f32]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Mutable for bf16 {
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [bf16]> {
        match s {
            CpuStorage::BF16(v) => Some(v),
            _ => None,
        }
    }
}

impl Mutable for f16 {
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [f16]> {
        match s {
            CpuStorage::F16(v) => Some(v),
            _ => None,
        }
    }
}

/// The destination slice of an in-place op.
fn dst_slice<'s, T: WithDType + Mutable>(s: &'s mut CpuStorage, l: &Layout) -> Result<&'s mut [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| err("fused path: destination is not contiguous"))?;
    let dtype = candle_core::backend::BackendStorage::dtype(s);
    let data = T::slice_mut(s).ok_or_else(|| {
        err(format!(
            "fused path: destination holds {dtype:?}, expected {:?}",
            T::DTYPE
        ))
    })?;
    Ok(&mut data[start..end])
}

/// Runs `$body` with `$T` bound to the Rust type of a float dtype.
macro_rules! with_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
            d => Err(err(format!("fused path: unsupported dtype {d:?}"))),
        }
    };
}

/// An in-place op on one tensor, defined by a closure over its (typed) slice.
struct InPlace<F> {
    name: &'static str,
    f: F,
}

impl<F: Fn(&mut CpuStorage, &Layout) -> Result<()>> InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        (self.f)(s, l)
    }
}

fn in_place(
    t: &Tensor,
    name: &'static str,
    f: impl Fn(&mut CpuStorage, &Layout) -> Result<()>,
) -> Result<()> {
    t.inplace_op1(&InPlace { name, f })
}

/// A read lock on the slot's accumulator when this call averages with it.
fn accumulator_read(slot: &Slot, transform: GradTransform) -> Result<Option<Read<'_>>> {
    match transform.accumulate_steps {
        Some(_) => {
            let acc = slot
                .accumulator()
                .ok_or_else(|| err("internal: accumulator"))?;
            Ok(Some(Read::new(acc)?))
        }
        None => Ok(None),
    }
}

/// Pass-1 result of one item.
enum First {
    Factored(factored::Pass1),
    Vector(vector::Pass1),
}

impl First {
    fn sum_sq_grad(&self) -> f64 {
        match self {
            First::Factored(p) => p.sum_sq_grad,
            First::Vector(p) => p.sum_sq_grad,
        }
    }
    fn sum_sq_x(&self) -> f64 {
        match self {
            First::Factored(p) => p.sum_sq_x,
            First::Vector(p) => p.sum_sq_x,
        }
    }
    fn finite(&self) -> bool {
        match self {
            First::Factored(p) => p.finite,
            First::Vector(p) => p.finite,
        }
    }
}

/// Pass-2 result of one item: the new statistics and what pass 3 needs.
enum Second {
    Factored(factored::Prepared),
    Vector(Vec<f32>),
}

/// Per-item context shared by the passes.
struct Item<'a> {
    slot: usize,
    grad: &'a Tensor,
    decay: Option<Decay>,
}

fn grad_view<'a, T: WithDType + Element>(
    g: &'a Read<'a>,
    acc: Option<&'a Read<'a>>,
    transform: GradTransform,
) -> Result<Grad<'a, T>> {
    Ok(Grad {
        g: g.slice::<T>()?,
        acc: acc.map(|a| a.slice::<f32>()).transpose()?,
        transform,
    })
}

/// Runs one planned apply on the fused path. Returns `Ok(false)` when `check_finite` and a
/// gradient is not finite (nothing changed).
pub(crate) fn apply(
    opt: &mut Adafactor,
    items: &[(usize, Tensor)],
    plan: &StepPlan,
    check_finite: bool,
) -> Result<bool> {
    let mut transform = GradTransform {
        loss_scale: plan.loss_scale_factor,
        ..Default::default()
    };
    match (plan.accumulation, &plan.update) {
        (Accumulation::Accumulate, _) => {
            if check_finite && !accumulate_all_finite(opt, items, transform)? {
                return Ok(false);
            }
            items.par_iter().try_for_each(|(i, g)| {
                let slot = &opt.slots[*i];
                let acc = slot
                    .accumulator()
                    .ok_or_else(|| err("internal: accumulator"))?;
                let gr = Read::new(g)?;
                with_dtype!(g.dtype(), T => {
                    let grad = grad_view::<T>(&gr, None, transform)?;
                    in_place(acc, "adafactor-accumulate", |s, l| {
                        elementwise::accumulate(dst_slice::<f32>(s, l)?, &grad);
                        Ok(())
                    })
                })
            })?;
        }
        (acc, Some(u)) => {
            if let Accumulation::Apply { steps } = acc {
                transform.accumulate_steps = Some(steps as f32);
            }
            if let Clip::Value(v) = u.clip {
                transform.clip_value = Some(v);
            }
            let list: Vec<Item> = items
                .iter()
                .map(|(i, g)| Item {
                    slot: *i,
                    grad: g,
                    decay: u.weight_decay.and_then(|wd| {
                        (!opt.excluded_from_decay(&opt.slots[*i])).then_some(Decay {
                            weight_decay: wd,
                            learning_rate: u.learning_rate,
                        })
                    }),
                })
                .collect();
            let first: Vec<First> = list
                .par_iter()
                .map(|it| first_pass(opt, it, transform, check_finite, u))
                .collect::<Result<_>>()?;
            if check_finite && first.iter().any(|f| !f.finite()) {
                return Ok(false);
            }
            let scales = clip_scales(u.clip, &first);
            let second: Vec<(Second, f32)> = list
                .par_iter()
                .zip(&first)
                .zip(&scales)
                .map(|((it, f), s)| second_pass(opt, it, f, transform, *s, u))
                .collect::<Result<_>>()?;
            // Pass 3: the first write.
            // In the reverse order of pass 1, so that the data pass 1 read last, still in the
            // last-level cache, is read first.
            list.par_iter()
                .zip(&second)
                .zip(&scales)
                .rev()
                .try_for_each(|((it, (sec, coef)), s)| {
                    third_pass(opt, it, sec, *coef, *s, transform)
                })?;
            // Commit the statistics, in parallel: with thousands of small tensors, moving and
            // freeing the vectors one by one would take as long as a pass.
            let mut by_slot: Vec<Option<Second>> = (0..opt.slots.len()).map(|_| None).collect();
            for (it, (sec, _)) in list.iter().zip(second) {
                by_slot[it.slot] = Some(sec);
            }
            opt.slots
                .par_iter_mut()
                .zip(by_slot)
                .try_for_each(|(slot, sec)| {
                    match (&mut slot.stats, sec) {
                        (_, None) => {}
                        (Stats::Factored { r, c, .. }, Some(Second::Factored(p))) => {
                            *r = p.r;
                            *c = p.c;
                        }
                        (Stats::Unfactored { v }, Some(Second::Vector(nv))) => *v = nv,
                        _ => return Err(err("internal: statistics kind changed")),
                    }
                    Ok(())
                })?;
            first.into_par_iter().for_each(drop);
            if matches!(acc, Accumulation::Apply { .. }) {
                opt.slots
                    .par_iter()
                    .try_for_each(|s| match s.accumulator() {
                        Some(a) => in_place(a, "adafactor-zero", |st, l| {
                            elementwise::zero(dst_slice::<f32>(st, l)?);
                            Ok(())
                        }),
                        None => Ok(()),
                    })?;
            }
        }
        (_, None) => return Err(err("internal: an update call without update scalars")),
    }
    if let Some(ema) = plan.ema {
        opt.slots.par_iter().try_for_each(|s| -> Result<()> {
            let avg = s.ema().ok_or_else(|| err("internal: EMA average"))?;
            {
                let x = Read::new(s.var.as_tensor())?;
                with_dtype!(s.var.dtype(), T => {
                    let xs = x.slice::<T>()?;
                    in_place(avg, "adafactor-ema", |st, l| {
                        elementwise::ema(dst_slice::<f32>(st, l)?, xs, ema.momentum);
                        Ok(())
                    })
                })?;
            }
            if ema.overwrite {
                let a = Read::new(avg)?;
                let src = a.slice::<f32>()?;
                with_dtype!(s.var.dtype(), T => in_place(s.var.as_tensor(), "adafactor-overwrite", |st, l| {
                    elementwise::assign(dst_slice::<T>(st, l)?, src);
                    Ok(())
                }))?;
            }
            Ok(())
        })?;
    }
    Ok(true)
}

fn accumulate_all_finite(
    opt: &Adafactor,
    items: &[(usize, Tensor)],
    transform: GradTransform,
) -> Result<bool> {
    let _ = opt;
    let flags: Vec<bool> = items
        .par_iter()
        .map(|(_, g)| {
            let gr = Read::new(g)?;
            with_dtype!(g.dtype(), T => Ok(elementwise::is_finite(&grad_view::<T>(&gr, None, transform)?)))
        })
        .collect::<Result<_>>()?;
    Ok(flags.into_iter().all(|f| f))
}

fn first_pass(
    opt: &Adafactor,
    it: &Item,
    transform: GradTransform,
    check: bool,
    u: &adafactor::UpdateScalars,
) -> Result<First> {
    // Without norm clipping the gradient scale is 1 before pass 1 ends, so the statistics update
    // can be folded into pass 1 and pass 2 skipped.
    let fold = matches!(u.clip, Clip::None | Clip::Value(_));
    let slot = &opt.slots[it.slot];
    let gr = Read::new(it.grad)?;
    let acc = accumulator_read(slot, transform)?;
    let xr = Read::new(slot.var.as_tensor())?;
    with_dtype!(slot.var.dtype(), T => {
        let grad = grad_view::<T>(&gr, acc.as_ref(), transform)?;
        let x = xr.slice::<T>()?;
        Ok(match &slot.stats {
            Stats::Factored { factoring, r, .. } => {
                let fold = fold.then_some(factored::RowFold {
                    r_old: r,
                    beta2: u.beta2_t,
                    epsilon_1: u.epsilon_1,
                });
                First::Factored(factored::pass1(&grad, x, it.decay, *factoring, check, fold))
            }
            Stats::Unfactored { .. } => First::Vector(vector::pass1(&grad, x, it.decay, check)),
        })
    })
}

/// Norm-clipping scales, one per item, from the pass-1 sums (Keras's formulas in float32).
fn clip_scales(clip: Clip, first: &[First]) -> Vec<f32> {
    match clip {
        Clip::Norm(c) => first
            .iter()
            .map(|f| {
                let l2sum = f.sum_sq_grad() as f32;
                if l2sum > 0.0 {
                    c / l2sum.sqrt().max(c)
                } else {
                    1.0
                }
            })
            .collect(),
        Clip::GlobalNorm(gc) => {
            let norm = (first.iter().map(First::sum_sq_grad).sum::<f64>() as f32).sqrt();
            // `norm - norm` is Keras's way to turn a non-finite norm into NaN.
            #[allow(clippy::eq_op)]
            let scale = gc * (1.0 / norm).min(1.0 / gc) + (norm - norm);
            vec![scale; first.len()]
        }
        Clip::None | Clip::Value(_) => vec![1.0; first.len()],
    }
}

/// Statistics update and pass 2; returns the new statistics and pass 3's coefficient.
fn second_pass(
    opt: &Adafactor,
    it: &Item,
    first: &First,
    transform: GradTransform,
    scale: f32,
    u: &adafactor::UpdateScalars,
) -> Result<(Second, f32)> {
    let slot = &opt.slots[it.slot];
    let len = it.grad.elem_count().max(1) as f64;
    let rms_x = (first.sum_sq_x() / len).sqrt() as f32;
    let alpha = u.alpha(rms_x);
    let gr = Read::new(it.grad)?;
    let acc = accumulator_read(slot, transform)?;
    with_dtype!(slot.var.dtype(), T => {
        let grad = grad_view::<T>(&gr, acc.as_ref(), transform)?;
        Ok(match (&slot.stats, first) {
            (Stats::Factored { factoring, r, c }, First::Factored(p1)) => {
                let prep = factored::prepare(p1, r, c, *factoring, u.beta2_t, u.epsilon_1, scale);
                let sum_u2 = match factored::sum_sq_update(p1, &prep, *factoring) {
                    Some(s) => s,
                    None => factored::pass2(&grad, &prep, *factoring, scale),
                };
                let den = u.update_clip_divisor((sum_u2 / len).sqrt() as f32);
                (Second::Factored(prep), alpha / den)
            }
            (Stats::Unfactored { v }, First::Vector(_)) => {
                let mut v_new = vec![0f32; v.len()];
                let sum_u2 = vector::pass2(&grad, v, &mut v_new, u.beta2_t, u.epsilon_1, scale);
                let den = u.update_clip_divisor((sum_u2 / len).sqrt() as f32);
                (Second::Vector(v_new), alpha / den)
            }
            _ => return Err(err("internal: statistics kind mismatch")),
        })
    })
}

fn third_pass(
    opt: &Adafactor,
    it: &Item,
    second: &Second,
    coef: f32,
    scale: f32,
    transform: GradTransform,
) -> Result<()> {
    let slot = &opt.slots[it.slot];
    let gr = Read::new(it.grad)?;
    let acc = accumulator_read(slot, transform)?;
    with_dtype!(slot.var.dtype(), T => {
        let grad = grad_view::<T>(&gr, acc.as_ref(), transform)?;
        in_place(slot.var.as_tensor(), "adafactor-update", |s, l| {
            let x = dst_slice::<T>(s, l)?;
            match (second, &slot.stats) {
                (Second::Factored(p), Stats::Factored { factoring, .. }) => {
                    factored::pass3(x, &grad, p, *factoring, coef, scale, it.decay)
                }
                (Second::Vector(v), _) => vector::pass3(x, &grad, v, coef, scale, it.decay),
                _ => return Err(err("internal: statistics kind mismatch")),
            }
            Ok(())
        })
    })
}
