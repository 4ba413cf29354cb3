//! The composed data path: the core's stages ([`adafactor::engine`]) with one candle tensor op
//! per Keras op, on any candle device; the readable reference for the fused path.
//!
//! Everything is computed in float32 into fresh tensors, staged, and committed by
//! [`Backend::commit`] only after the whole step succeeded, so an error (or a refused
//! non-finite gradient) changes nothing.
//!
//! With `weight_rounding = "stochastic"` a 16-bit weight is rounded on the host with the core's
//! [`Rounding`] (candle has no 32-bit integer multiply, shift or xor for the generator): the
//! float32 result is copied to the host, rounded and copied back, one more round trip of the
//! tensor per write; the bits are those the fused kernels draw for the same value.

use crate::slot::{NewValues, Slot};
use adafactor::engine::{Backend, GradScale, Measure, Target, UpdateContext, WriteScalars};
use adafactor::kernels::{GradTransform, Rounding};
use adafactor::rounding::RoundingStream;
use adafactor::{EmaPlan, Factoring, Stats, UpdateScalars};
use candle_core::{DType, Result, Tensor, D};
use half::{bf16, f16};

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

/// The float32 tensor `x` as `dtype`, rounded by `rounding` (element `i` of the flattened
/// tensor with index `i`, as the fused kernels index it).
fn round_to(x: &Tensor, dtype: DType, rounding: Rounding) -> Result<Tensor> {
    fn host<T: adafactor::kernels::Element + candle_core::WithDType>(
        x: &Tensor,
        rounding: Rounding,
        zero: T,
    ) -> Result<Tensor> {
        let v = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![zero; v.len()];
        rounding.store_slice(&v, &mut out, 0);
        Tensor::from_vec(out, x.shape(), x.device())
    }
    match (rounding, dtype) {
        (Rounding::Stochastic(_), DType::BF16) => host(x, rounding, bf16::ZERO),
        (Rounding::Stochastic(_), DType::F16) => host(x, rounding, f16::ZERO),
        _ => x.to_dtype(dtype),
    }
}

/// True when every element is finite (`x * 0` is NaN for NaN and infinity).
fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(to_f32(&t.affine(0.0, 0.0)?.sum_all()?)? == 0.0)
}

/// The composed backend over the optimizer's slots and this step's gradients.
pub(crate) struct Composed<'a> {
    slots: &'a mut [Slot],
    grads: &'a [(usize, Tensor)],
    /// Each gradient in float32, unscaled by `loss_scale_factor` (indexed like `grads`).
    unscaled: Vec<Option<Tensor>>,
    staged: Vec<NewValues>,
}

/// The measure stage's tensors of one target: the effective gradient and the decayed weight.
pub(crate) struct Measured {
    g: Tensor,
    x: Tensor,
}

/// The update stage's result of one target.
pub(crate) struct Updated {
    x: Tensor,
    update: Tensor,
    stats: Stats,
}

impl<'a> Composed<'a> {
    /// The backend over `slots` with the gradients of `grads` (`(slot index, gradient)`).
    pub(crate) fn new(slots: &'a mut [Slot], grads: &'a [(usize, Tensor)]) -> Self {
        let staged = slots.iter().map(|_| NewValues::default()).collect();
        Composed {
            slots,
            grads,
            unscaled: vec![None; grads.len()],
            staged,
        }
    }

    /// The `k`-th gradient in float32, unscaled by `loss_scale_factor` (computed once).
    fn unscaled(&mut self, k: usize, transform: GradTransform) -> Result<Tensor> {
        if let Some(g) = &self.unscaled[k] {
            return Ok(g.clone());
        }
        let mut g = self.grads[k].1.to_dtype(DType::F32)?;
        if let Some(f) = transform.loss_scale {
            g = div(&g, f)?;
        }
        self.unscaled[k] = Some(g.clone());
        Ok(g)
    }

    fn accumulator(&self, i: usize) -> Result<&Tensor> {
        self.slots[i]
            .accumulator()
            .ok_or_else(|| crate::optimizer::err("internal: gradient accumulator missing"))
    }

    /// The position of a target's gradient in `grads`.
    fn position(&self, target: &Target) -> Result<usize> {
        self.grads
            .iter()
            .position(|(i, _)| *i == target.var)
            .ok_or_else(|| crate::optimizer::err("internal: a target without a gradient"))
    }
}

impl Backend for Composed<'_> {
    type Error = candle_core::Error;
    type Measured = Measured;
    type Updated = Updated;

    fn core_error(e: adafactor::Error) -> candle_core::Error {
        crate::optimizer::core_err(e)
    }

    fn check_gradients(&mut self, targets: &[Target], t: GradTransform) -> Result<Vec<bool>> {
        let mut flags = Vec::with_capacity(targets.len());
        for target in targets {
            let k = self.position(target)?;
            flags.push(all_finite(&self.unscaled(k, t)?)?);
        }
        Ok(flags)
    }

    fn accumulate(&mut self, targets: &[Target], t: GradTransform) -> Result<()> {
        for target in targets {
            let k = self.position(target)?;
            let g = self.unscaled(k, t)?;
            let acc = (self.accumulator(target.var)? + g)?;
            self.staged[target.var].accumulator = Some(acc);
        }
        Ok(())
    }

    fn measure(
        &mut self,
        targets: &[Target],
        _stats: &[Stats],
        ctx: &UpdateContext,
    ) -> Result<Vec<(Measure, Measured)>> {
        let t = ctx.transform;
        let mut out = Vec::with_capacity(targets.len());
        for target in targets {
            let k = self.position(target)?;
            let mut g = self.unscaled(k, t)?;
            let finite = !ctx.check_finite || all_finite(&g)?;
            if let Some(steps) = t.accumulate_steps {
                g = div(&(self.accumulator(target.var)? + &g)?, steps)?;
            }
            if let Some(v) = t.clip_value {
                g = g.clamp(-v, v)?;
            }
            let sum_sq_grad = if ctx.scalars.clip.uses_norms() {
                sum_sq(&g)? as f64
            } else {
                0.0
            };
            let slot = &self.slots[target.var];
            let mut x = slot.var.to_dtype(DType::F32)?;
            if let Some(d) = ctx.decay(target) {
                x = (&x - mul(&mul(&x, d.weight_decay)?, d.learning_rate)?)?;
            }
            let m = Measure {
                sum_sq_grad,
                rms_x: rms(&x)?,
                finite,
            };
            out.push((m, Measured { g, x }));
        }
        Ok(out)
    }

    fn update(
        &mut self,
        targets: &[Target],
        stats: &[Stats],
        measured: &[(Measure, Measured)],
        scales: &[GradScale],
        ctx: &UpdateContext,
    ) -> Result<Vec<(f32, Updated)>> {
        targets
            .iter()
            .zip(measured)
            .zip(scales)
            .map(|((target, (_, m)), scale)| {
                // Keras `_clip_gradients`: `tf.clip_by_norm` or the global-norm scale.
                let g = match *scale {
                    GradScale::One => m.g.clone(),
                    GradScale::Ratio { num, den } => div(&mul(&m.g, num)?, den)?,
                    GradScale::Factor(s) => mul(&m.g, s)?,
                };
                let (update, stats) = update_direction(&g, &stats[target.var], &ctx.scalars)?;
                let rms_u = rms(&update)?;
                Ok((
                    rms_u,
                    Updated {
                        x: m.x.clone(),
                        update,
                        stats,
                    },
                ))
            })
            .collect()
    }

    fn write(
        &mut self,
        targets: &[Target],
        _stats: &[Stats],
        updated: Vec<(f32, Updated)>,
        scalars: &[WriteScalars],
        ctx: &UpdateContext,
    ) -> Result<Vec<Stats>> {
        let mut out = Vec::with_capacity(targets.len());
        for ((target, (_, up)), w) in targets.iter().zip(updated).zip(scalars) {
            let update = div(&up.update, w.divisor)?;
            let x = (up.x - mul(&update, w.alpha)?)?;
            // Rounded to the weight's dtype here: the EMA reads the stored weight.
            let dtype = self.slots[target.var].var.dtype();
            let rounding = Rounding::for_variable(ctx.rounding, target.var, RoundingStream::Update);
            self.staged[target.var].x = Some(round_to(&x, dtype, rounding)?);
            out.push(up.stats);
        }
        Ok(out)
    }

    fn zero_accumulators(&mut self, vars: &[usize]) -> Result<()> {
        for &i in vars {
            if let Some(acc) = self.slots[i].accumulator() {
                self.staged[i].accumulator = Some(acc.zeros_like()?);
            }
        }
        Ok(())
    }

    fn ema(&mut self, vars: &[usize], ema: EmaPlan) -> Result<()> {
        for &i in vars {
            let slot = &self.slots[i];
            let n = &mut self.staged[i];
            let x = match &n.x {
                Some(x) => x.to_dtype(DType::F32)?,
                None => slot.var.to_dtype(DType::F32)?,
            };
            let avg = slot
                .ema()
                .ok_or_else(|| crate::optimizer::err("internal: EMA average missing"))?;
            let avg = (mul(avg, ema.momentum)? + mul(&x, 1.0 - ema.momentum)?)?;
            if ema.overwrite {
                let rounding =
                    Rounding::for_variable(ema.rounding, i, RoundingStream::EmaOverwrite);
                n.x = Some(round_to(&avg, slot.var.dtype(), rounding)?);
            }
            n.ema = Some(avg);
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        for (slot, n) in self.slots.iter().zip(self.staged.iter_mut()) {
            if slot.var.elem_count() == 0 {
                // Nothing to write; and candle returns an empty operand as is, so `x` may share
                // the variable's storage, which `Var::set` would refuse.
                n.x = None;
            } else if let Some(x) = n.x.take() {
                n.x = Some(x.contiguous()?);
            }
        }
        // `Var::set` of fresh tensors of checked shapes into contiguous variables cannot fail.
        for (slot, n) in self.slots.iter_mut().zip(std::mem::take(&mut self.staged)) {
            slot.commit(n)?;
        }
        Ok(())
    }
}

/// Keras `Adafactor.update_step`'s direction on float32 tensors: the new statistics and
/// `u = g / sqrt(v)` before update clipping. A variable factored over other axes than its last
/// two is permuted to `[batch axes..., row, col]` (the storage order of its statistics), updated
/// as Keras updates its last two axes, and its update permuted back.
fn update_direction(g: &Tensor, stats: &Stats, u: &UpdateScalars) -> Result<(Tensor, Stats)> {
    let strided = match stats {
        Stats::Factored {
            factoring: Factoring {
                strided: Some(s), ..
            },
            ..
        } => *s,
        _ => return keras_direction(g, stats, u),
    };
    let rank = g.rank();
    let (row, col) = (strided.axes.row, strided.axes.col);
    let mut perm: Vec<usize> = (0..rank).filter(|k| *k != row && *k != col).collect();
    perm.extend([row, col]);
    let mut inverse = vec![0; rank];
    for (k, p) in perm.iter().enumerate() {
        inverse[*p] = k;
    }
    let (update, stats) = keras_direction(&g.permute(perm)?.contiguous()?, stats, u)?;
    Ok((update.permute(inverse)?, stats))
}

/// [`update_direction`] over the last two axes, as Keras factors them.
fn keras_direction(g: &Tensor, stats: &Stats, u: &UpdateScalars) -> Result<(Tensor, Stats)> {
    let dev = g.device();
    let q = add(&g.sqr()?, u.epsilon_1)?;
    let b = u.beta2_t;
    let (update, stats) = match stats {
        Stats::Factored { factoring, r, c } => {
            let Factoring { n, m, .. } = *factoring;
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
                factoring: *factoring,
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
    Ok((update, stats))
}
