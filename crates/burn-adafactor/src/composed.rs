//! The composed data path: the core's stages ([`adafactor::engine`]) with burn tensor ops, on
//! any burn backend. Factored statistics are computed on the parameter viewed as
//! `[lead, n, m]` (the row statistic is `[lead, n, 1]`, the column one `[lead, 1, m]`), in
//! float32 whatever the parameter's dtype; new values are staged and committed only after the
//! whole step succeeded.

use crate::error::{Error, invalid};
use crate::slot::{Slot, f32_tensor, host_f32};
use adafactor::engine::{Backend, GradScale, Measure, Target, UpdateContext, WriteScalars};
use adafactor::kernels::{GradTransform, Rounding};
use adafactor::rounding::RoundingStream;
use adafactor::{EmaPlan, Factoring, Stats, UpdateScalars};
use burn::tensor::{DType, Tensor, TensorData};
use half::{bf16, f16};

/// `sum(t^2)` as a host float32.
fn sum_sq(t: &Tensor<1>) -> f32 {
    t.clone().square().sum().into_scalar::<f32>()
}

/// `sqrt(mean(t^2))`, as Keras's `_rms`.
fn rms(t: &Tensor<1>) -> f32 {
    t.clone().square().mean().sqrt().into_scalar::<f32>()
}

/// True when every element is finite.
fn all_finite(t: &Tensor<1>) -> bool {
    t.clone().is_finite().all().into_scalar::<bool>()
}

/// Values computed by a step for one parameter, committed once the whole step succeeded.
#[derive(Default)]
pub(crate) struct NewValues {
    pub x: Option<Tensor<1>>,
    pub ema: Option<Tensor<1>>,
    pub accumulator: Option<Tensor<1>>,
}

/// The composed backend over the slots, their (flat) weights and this step's gradients.
pub(crate) struct Composed<'a> {
    slots: &'a [Slot],
    weights: &'a [Tensor<1>],
    grads: &'a [Option<Tensor<1>>],
    unscaled: Vec<Option<Tensor<1>>>,
    /// What the step computed, per slot; taken by the caller after a successful run.
    pub staged: Vec<NewValues>,
}

/// The measure stage's tensors of one target: the effective gradient and the decayed weight.
pub(crate) struct Measured {
    g: Tensor<1>,
    x: Tensor<1>,
}

/// The update stage's result of one target.
pub(crate) struct Updated {
    x: Tensor<1>,
    update: Tensor<1>,
    stats: Stats,
}

impl<'a> Composed<'a> {
    /// The backend over `slots` with their weights and gradients (indexed by slot).
    pub fn new(
        slots: &'a [Slot],
        weights: &'a [Tensor<1>],
        grads: &'a [Option<Tensor<1>>],
    ) -> Self {
        Composed {
            slots,
            weights,
            grads,
            unscaled: vec![None; slots.len()],
            staged: slots.iter().map(|_| NewValues::default()).collect(),
        }
    }

    /// A target's gradient in float32, unscaled by `loss_scale_factor` (computed once).
    fn unscaled(&mut self, var: usize, t: GradTransform) -> Result<Tensor<1>, Error> {
        if let Some(g) = &self.unscaled[var] {
            return Ok(g.clone());
        }
        let g = self.grads[var]
            .as_ref()
            .ok_or_else(|| invalid("internal: a target without a gradient"))?;
        let mut g = g.clone().cast(DType::F32);
        if let Some(f) = t.loss_scale {
            g = g.div_scalar(f);
        }
        self.unscaled[var] = Some(g.clone());
        Ok(g)
    }

    fn accumulator(&self, var: usize) -> Result<Tensor<1>, Error> {
        self.staged[var]
            .accumulator
            .clone()
            .or_else(|| self.slots[var].accumulator.clone())
            .ok_or_else(|| invalid("internal: gradient accumulator missing"))
    }
}

impl Backend for Composed<'_> {
    type Error = Error;
    type Measured = Measured;
    type Updated = Updated;

    fn core_error(e: adafactor::Error) -> Error {
        Error::Core(e)
    }

    fn check_gradients(
        &mut self,
        targets: &[Target],
        t: GradTransform,
    ) -> Result<Vec<bool>, Error> {
        targets
            .iter()
            .map(|tg| Ok(all_finite(&self.unscaled(tg.var, t)?)))
            .collect()
    }

    fn accumulate(&mut self, targets: &[Target], t: GradTransform) -> Result<(), Error> {
        for tg in targets {
            let g = self.unscaled(tg.var, t)?;
            let acc = self.accumulator(tg.var)? + g;
            self.staged[tg.var].accumulator = Some(acc);
        }
        Ok(())
    }

    fn measure(
        &mut self,
        targets: &[Target],
        _stats: &[Stats],
        ctx: &UpdateContext,
    ) -> Result<Vec<(Measure, Measured)>, Error> {
        let t = ctx.transform;
        let mut out = Vec::with_capacity(targets.len());
        for tg in targets {
            let mut g = self.unscaled(tg.var, t)?;
            let finite = !ctx.check_finite || all_finite(&g);
            if let Some(steps) = t.accumulate_steps {
                g = (self.accumulator(tg.var)? + g).div_scalar(steps);
            }
            if let Some(v) = t.clip_value {
                g = g.clamp(-v, v);
            }
            let sum_sq_grad = if ctx.scalars.clip.uses_norms() {
                sum_sq(&g) as f64
            } else {
                0.0
            };
            let mut x = self.weights[tg.var].clone().cast(DType::F32);
            if let Some(d) = ctx.decay(tg) {
                x = x.clone() - x.mul_scalar(d.weight_decay).mul_scalar(d.learning_rate);
            }
            let m = Measure {
                sum_sq_grad,
                rms_x: rms(&x),
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
    ) -> Result<Vec<(f32, Updated)>, Error> {
        let mut out = Vec::with_capacity(targets.len());
        for ((tg, (_, m)), scale) in targets.iter().zip(measured).zip(scales) {
            let g = match *scale {
                GradScale::One => m.g.clone(),
                GradScale::Ratio { num, den } => m.g.clone().mul_scalar(num).div_scalar(den),
                GradScale::Factor(s) => m.g.clone().mul_scalar(s),
            };
            let (update, stats) = direction(g, &stats[tg.var], &ctx.scalars, &self.slots[tg.var])?;
            out.push((
                rms(&update),
                Updated {
                    x: m.x.clone(),
                    update,
                    stats,
                },
            ));
        }
        Ok(out)
    }

    fn write(
        &mut self,
        targets: &[Target],
        _stats: &[Stats],
        updated: Vec<(f32, Updated)>,
        scalars: &[WriteScalars],
        ctx: &UpdateContext,
    ) -> Result<Vec<Stats>, Error> {
        let mut out = Vec::with_capacity(targets.len());
        for ((tg, (_, up)), w) in targets.iter().zip(updated).zip(scalars) {
            let x = up.x - up.update.div_scalar(w.divisor).mul_scalar(w.alpha);
            // Rounded to the weight's dtype here: the EMA reads the stored weight.
            let rounding = Rounding::for_variable(ctx.rounding, tg.var, RoundingStream::Update);
            self.staged[tg.var].x = Some(round_to(x, self.slots[tg.var].dtype, rounding));
            out.push(up.stats);
        }
        Ok(out)
    }

    fn zero_accumulators(&mut self, vars: &[usize]) -> Result<(), Error> {
        for &i in vars {
            if let Some(acc) = &self.slots[i].accumulator {
                self.staged[i].accumulator = Some(acc.zeros_like());
            }
        }
        Ok(())
    }

    fn ema(&mut self, vars: &[usize], ema: EmaPlan) -> Result<(), Error> {
        for &i in vars {
            let slot = &self.slots[i];
            let x = self.staged[i]
                .x
                .clone()
                .unwrap_or_else(|| self.weights[i].clone())
                .cast(DType::F32);
            let avg = slot
                .ema
                .clone()
                .ok_or_else(|| invalid("internal: EMA average missing"))?;
            let avg = avg.mul_scalar(ema.momentum) + x.mul_scalar(1.0 - ema.momentum);
            if ema.overwrite {
                let rounding =
                    Rounding::for_variable(ema.rounding, i, RoundingStream::EmaOverwrite);
                self.staged[i].x = Some(round_to(avg.clone(), slot.dtype, rounding));
            }
            self.staged[i].ema = Some(avg);
        }
        Ok(())
    }
}

/// Keras `Adafactor.update_step`'s direction on float32 tensors: the new statistics and
/// `u = g / sqrt(v)` before update clipping. A parameter factored over other axes than its last
/// two (`factored_axes`) is permuted to `[batch axes..., row, col]`, the storage order of its
/// statistics, updated as Keras updates its last two axes, and its update permuted back.
fn direction(
    g: Tensor<1>,
    stats: &Stats,
    u: &UpdateScalars,
    slot: &Slot,
) -> Result<(Tensor<1>, Stats), Error> {
    let Stats::Factored {
        factoring: Factoring {
            strided: Some(s), ..
        },
        ..
    } = stats
    else {
        return keras_direction(g, stats, u, slot);
    };
    // `[outer, low, mid, high, inner]`, the factored axes `low` and `high` in memory order.
    let dims = [s.outer, s.low, s.mid, s.high, s.inner];
    let (row, col) = if s.rows_low { (1, 3) } else { (3, 1) };
    let to_keras = [0, 2, 4, row, col];
    let mut back = [0; 5];
    for (k, p) in to_keras.iter().enumerate() {
        back[*p] = k;
    }
    let len = s.len();
    if g.dims()[0] != len {
        return Err(invalid(format!(
            "internal: `{}` does not split as {dims:?}",
            slot.path
        )));
    }
    let g = g.reshape(dims).permute(to_keras).reshape([len]);
    let (update, stats) = keras_direction(g, stats, u, slot)?;
    let permuted = to_keras.map(|k| dims[k]);
    Ok((update.reshape(permuted).permute(back).reshape([len]), stats))
}

/// [`direction`] over the last two axes, as Keras factors them.
fn keras_direction(
    g: Tensor<1>,
    stats: &Stats,
    u: &UpdateScalars,
    slot: &Slot,
) -> Result<(Tensor<1>, Stats), Error> {
    let device = g.device();
    let len = g.dims()[0];
    let q = g.clone().square().add_scalar(u.epsilon_1);
    let b = u.beta2_t;
    match stats {
        Stats::Factored { factoring, r, c } => {
            let Factoring { lead, n, m, .. } = *factoring;
            if lead * n * m != len {
                return Err(invalid(format!(
                    "internal: `{}` does not factor as {lead}x{n}x{m}",
                    slot.path
                )));
            }
            let q = q.reshape([lead, n, m]);
            let r_t = f32_tensor(r.clone(), &device).reshape([lead, n, 1]);
            let c_t = f32_tensor(c.clone(), &device).reshape([lead, 1, m]);
            // Means divide before summing: a row of large finite squares whose float32 sum
            // would overflow still has a finite mean.
            let r_new = r_t.mul_scalar(b)
                + q.clone()
                    .div_scalar(m as f32)
                    .sum_dim(2)
                    .mul_scalar(1.0 - b);
            let c_new = c_t.mul_scalar(b) + q.div_scalar(n as f32).sum_dim(1).mul_scalar(1.0 - b);
            // 1/sqrt(v_ij) = sqrt(mean(r)) / sqrt(r_i) * 1/sqrt(c_j): Keras's
            // v = (r / mean(r)) * c, evaluated so that a row of tiny r cannot underflow v to 0.
            let mean_r = r_new.clone().div_scalar(n as f32).sum_dim(1);
            let row = mean_r.sqrt() / r_new.clone().sqrt();
            let col = c_new.clone().sqrt().recip();
            let update = g.reshape([lead, n, m]) * (row * col);
            let stats = Stats::Factored {
                factoring: *factoring,
                r: host_f32(&r_new.reshape([lead * n])),
                c: host_f32(&c_new.reshape([lead * m])),
            };
            Ok((update.reshape([len]), stats))
        }
        Stats::Unfactored { v } => {
            let v_new = f32_tensor(v.clone(), &device).mul_scalar(b) + q.mul_scalar(1.0 - b);
            let update = g / v_new.clone().sqrt();
            Ok((
                update,
                Stats::Unfactored {
                    v: host_f32(&v_new),
                },
            ))
        }
    }
}

/// The float32 flat tensor `x` as `dtype`, rounded by `rounding`. Stochastic rounding of a
/// 16-bit weight runs on the host with the core's [`Rounding`] (element `i` of the flat tensor
/// with index `i`, as the fused kernels index it, so both paths give the same bits): burn's
/// integer ops differ between backends, so the generator is not written in them. One more round
/// trip of the tensor per write.
fn round_to(x: Tensor<1>, dtype: DType, rounding: Rounding) -> Tensor<1> {
    fn host<T: adafactor::kernels::Element + burn::tensor::Element>(
        x: Tensor<1>,
        dtype: DType,
        rounding: Rounding,
        zero: T,
    ) -> Tensor<1> {
        let device = x.device();
        let v = host_f32(&x);
        let mut out = vec![zero; v.len()];
        rounding.store_slice(&v, &mut out, 0);
        let n = out.len();
        Tensor::from_data(TensorData::new(out, [n]), (&device, dtype))
    }
    match (rounding, dtype) {
        (Rounding::Stochastic(_), DType::BF16) => host(x, dtype, rounding, bf16::ZERO),
        (Rounding::Stochastic(_), DType::F16) => host(x, dtype, rounding, f16::ZERO),
        _ => x.cast(dtype),
    }
}
