//! The composed data path: Keras's apply, one candle tensor op per Keras op, in Keras's order.
//!
//! Runs on any candle device and is the readable reference for the fused path. Everything is
//! computed in float32 into fresh tensors and committed only after the whole step succeeded, so
//! an error (or a refused non-finite gradient) changes nothing.

use crate::optimizer::Adafactor;
use crate::slot::NewValues;
use adafactor::{Accumulation, Clip, Factoring, Stats, StepPlan, UpdateScalars};
use candle_core::{DType, Result, Tensor, D};

fn scalar(t: &Tensor, s: f32) -> Result<Tensor> {
    Tensor::new(s, t.device())
}

/// `t * s` with `s` a float32 scalar (no f64 round trip).
fn mul(t: &Tensor, s: f32) -> Result<Tensor> {
    t.broadcast_mul(&scalar(t, s)?)
}

/// `t / s` as a true division.
fn div(t: &Tensor, s: f32) -> Result<Tensor> {
    t.broadcast_div(&scalar(t, s)?)
}

fn add(t: &Tensor, s: f32) -> Result<Tensor> {
    t.broadcast_add(&scalar(t, s)?)
}

fn to_f32(t: &Tensor) -> Result<f32> {
    t.to_dtype(DType::F32)?.to_scalar::<f32>()
}

/// `sum(t^2)` as a float32 scalar.
fn sum_sq(t: &Tensor) -> Result<f32> {
    to_f32(&t.sqr()?.sum_all()?)
}

/// The mean over `dim` (of size `count`), dividing before summing: a row of large finite
/// squares whose float32 sum would overflow still has a finite mean (the fused kernels sum in
/// f64 and agree).
fn mean(t: &Tensor, dim: D, count: usize) -> Result<Tensor> {
    div(t, count as f32)?.sum(dim)
}

/// `sqrt(mean(t^2))` over all elements, as Keras's `_rms`.
fn rms(t: &Tensor) -> Result<f32> {
    to_f32(&t.sqr()?.mean_all()?.sqrt()?)
}

/// True when every element is finite (`x * 0` is NaN for NaN and infinity).
fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(to_f32(&t.affine(0.0, 0.0)?.sum_all()?)? == 0.0)
}

/// Computes one apply. Returns `None` when `check_finite` and a gradient is not finite.
pub(crate) fn compute(
    opt: &Adafactor,
    items: &[(usize, Tensor)],
    plan: &StepPlan,
    check_finite: bool,
) -> Result<Option<Vec<NewValues>>> {
    let slots = &opt.slots;
    let mut new: Vec<NewValues> = slots.iter().map(|_| NewValues::default()).collect();

    // Unscale.
    let mut grads = Vec::with_capacity(items.len());
    for (i, g) in items {
        let mut g = g.to_dtype(DType::F32)?;
        if let Some(f) = plan.loss_scale_factor {
            g = div(&g, f)?;
        }
        if check_finite && !all_finite(&g)? {
            return Ok(None);
        }
        grads.push((*i, g));
    }

    // Accumulate.
    match plan.accumulation {
        Accumulation::Off => {}
        Accumulation::Accumulate => {
            for (i, g) in &grads {
                let acc = accumulator(opt, *i)?;
                new[*i].accumulator = Some((acc + g)?);
            }
        }
        Accumulation::Apply { steps } => {
            for (i, g) in grads.iter_mut() {
                *g = div(&(accumulator(opt, *i)? + &*g)?, steps as f32)?;
            }
            for (slot, n) in slots.iter().zip(new.iter_mut()) {
                if let Some(acc) = slot.accumulator() {
                    n.accumulator = Some(acc.zeros_like()?);
                }
            }
        }
    }

    if let Some(u) = &plan.update {
        clip(&mut grads, u.clip)?;
        for (i, g) in &grads {
            let slot = &slots[*i];
            let mut x = slot.var.to_dtype(DType::F32)?;
            if let Some(wd) = u.weight_decay {
                if !opt.excluded_from_decay(slot) {
                    x = (&x - mul(&mul(&x, wd)?, u.learning_rate)?)?;
                }
            }
            let (x, stats) = update_step(g, &x, &slot.stats, u)?;
            // Rounded to the weight's dtype here: the EMA below reads the stored weight.
            new[*i].x = Some(x.to_dtype(slot.var.dtype())?);
            new[*i].stats = Some(stats);
        }
    }

    if let Some(ema) = plan.ema {
        for (slot, n) in slots.iter().zip(new.iter_mut()) {
            let x = match &n.x {
                Some(x) => x.to_dtype(DType::F32)?,
                None => slot.var.to_dtype(DType::F32)?,
            };
            let avg = slot
                .ema()
                .ok_or_else(|| crate::optimizer::err("internal: EMA average missing"))?;
            let avg = (mul(avg, ema.momentum)? + mul(&x, 1.0 - ema.momentum)?)?;
            if ema.overwrite {
                n.x = Some(avg.to_dtype(slot.var.dtype())?);
            }
            n.ema = Some(avg);
        }
    }

    for (slot, n) in slots.iter().zip(new.iter_mut()) {
        if slot.var.elem_count() == 0 {
            // Nothing to write; and candle returns an empty operand as is, so `x` may share the
            // variable's storage, which `Var::set` would refuse at commit.
            n.x = None;
        } else if let Some(x) = n.x.take() {
            n.x = Some(x.contiguous()?);
        }
    }
    Ok(Some(new))
}

fn accumulator(opt: &Adafactor, i: usize) -> Result<&Tensor> {
    opt.slots[i]
        .accumulator()
        .ok_or_else(|| crate::optimizer::err("internal: gradient accumulator missing"))
}

/// Keras `_clip_gradients`.
fn clip(grads: &mut [(usize, Tensor)], clip: Clip) -> Result<()> {
    match clip {
        Clip::None => {}
        Clip::Norm(c) => {
            // tf.clip_by_norm: g * c / max(||g||, c), unchanged when ||g|| = 0.
            for (_, g) in grads.iter_mut() {
                let l2sum = sum_sq(g)?;
                if l2sum > 0.0 {
                    *g = div(&mul(g, c)?, l2sum.sqrt().max(c))?;
                }
            }
        }
        Clip::GlobalNorm(gc) => {
            let mut total = 0f32;
            for (_, g) in grads.iter() {
                total += sum_sq(g)?;
            }
            let norm = total.sqrt();
            // `norm - norm` is Keras's way to turn a non-finite norm into NaN.
            #[allow(clippy::eq_op)]
            let scale = gc * (1.0 / norm).min(1.0 / gc) + (norm - norm);
            for (_, g) in grads.iter_mut() {
                *g = mul(g, scale)?;
            }
        }
        Clip::Value(v) => {
            for (_, g) in grads.iter_mut() {
                *g = g.clamp(-v, v)?;
            }
        }
    }
    Ok(())
}

/// Keras `Adafactor.update_step` on float32 tensors: returns the new weight and statistics.
pub(crate) fn update_step(
    g: &Tensor,
    x: &Tensor,
    stats: &Stats,
    u: &UpdateScalars,
) -> Result<(Tensor, Stats)> {
    let dev = g.device();
    let alpha = u.alpha(rms(x)?);
    let q = add(&g.sqr()?, u.epsilon_1)?;
    let b = u.beta2_t;
    let (update, stats) = match stats {
        Stats::Factored { factoring, r, c } => {
            let Factoring { lead, n, m } = *factoring;
            let dims = g.dims();
            let rank = dims.len();
            let r_shape = dims[..rank - 1].to_vec();
            let mut c_shape = dims[..rank - 2].to_vec();
            c_shape.push(dims[rank - 1]);
            let r_t = Tensor::from_slice(r, r_shape, dev)?;
            let c_t = Tensor::from_slice(c, c_shape, dev)?;
            let r_new = (mul(&r_t, b)? + mul(&mean(&q, D::Minus1, m)?, 1.0 - b)?)?;
            let c_new = (mul(&c_t, b)? + mul(&mean(&q, D::Minus2, n)?, 1.0 - b)?)?;
            // 1/sqrt(v_ij) = sqrt(mean(r)) / sqrt(r_i) * 1/sqrt(c_j): Keras's
            // v = (r / mean(r)) * c, evaluated so that a row of tiny r (a zero gradient row next
            // to huge ones) cannot underflow v to 0 and turn 0/0 into NaN.
            let mean_r = div(&r_new, n as f32)?.sum_keepdim(D::Minus1)?;
            let row = mean_r
                .sqrt()?
                .broadcast_div(&r_new.sqrt()?)?
                .unsqueeze(D::Minus1)?;
            let col = c_new.sqrt()?.recip()?.unsqueeze(rank - 2)?;
            let inv_sqrt_v = row.broadcast_mul(&col)?;
            let stats = Stats::Factored {
                factoring: Factoring { lead, n, m },
                r: r_new.flatten_all()?.to_vec1()?,
                c: c_new.flatten_all()?.to_vec1()?,
            };
            (g.broadcast_mul(&inv_sqrt_v)?, stats)
        }
        Stats::Unfactored { v } => {
            let v_t = Tensor::from_slice(v, g.shape(), dev)?;
            let v_new = (mul(&v_t, b)? + mul(&q, 1.0 - b)?)?;
            let stats = Stats::Unfactored {
                v: v_new.flatten_all()?.to_vec1()?,
            };
            (g.broadcast_div(&v_new.sqrt()?)?, stats)
        }
    };
    let update = div(&update, u.update_clip_divisor(rms(&update)?))?;
    let x = (x - mul(&update, alpha)?)?;
    Ok((x, stats))
}
