//! One variable's optimizer state: statistics (host float32), EMA average and gradient
//! accumulator (float32 tensors on the variable's device).
//!
//! Every tensor a slot keeps between steps is detached from candle's backprop graph when it is
//! stored ([`Slot::store`]): a tensor computed with candle ops from a `Var` carries the graph of
//! its inputs, so an EMA average stored as computed would keep the previous average (and so
//! every earlier one) alive, one copy of the weights per step.

use adafactor::{touched_zeros, AdafactorConfig, Stats};
use candle_core::{DType, Device, Result, Tensor, Var};

/// A variable and everything the optimizer keeps for it.
#[derive(Debug)]
pub(crate) struct Slot {
    pub name: String,
    pub var: Var,
    pub stats: Stats,
    /// False for a variable another rank owns (sharded data parallelism): no statistics, EMA
    /// average or accumulator are kept for it.
    pub full_state: bool,
    ema: Option<Tensor>,
    accumulator: Option<Tensor>,
}

/// Values computed by a step, committed only once the whole step succeeded.
#[derive(Debug, Default)]
pub(crate) struct NewValues {
    pub x: Option<Tensor>,
    pub stats: Option<Stats>,
    pub ema: Option<Tensor>,
    pub accumulator: Option<Tensor>,
}

impl Slot {
    /// A slot with zero state; `full_state` false keeps none (a variable another rank owns in
    /// sharded data parallelism).
    pub fn new(name: String, var: Var, cfg: &AdafactorConfig, full_state: bool) -> Result<Self> {
        // On the CPU, zeros whose pages are mapped now ([`touched_zeros`]): the first step
        // reads the average and the accumulator before it writes them.
        let zeros = || match var.device() {
            Device::Cpu => {
                Tensor::from_vec(touched_zeros(var.elem_count()), var.shape(), &Device::Cpu)
            }
            dev => Tensor::zeros(var.shape(), DType::F32, dev),
        };
        Ok(Slot {
            stats: if full_state {
                Stats::zeros_with(var.dims(), cfg.axes_of(&name))
            } else {
                Stats::Unfactored { v: Vec::new() }
            },
            full_state,
            ema: if cfg.use_ema && full_state {
                Some(zeros()?)
            } else {
                None
            },
            accumulator: if cfg.gradient_accumulation_steps.is_some() && full_state {
                Some(zeros()?)
            } else {
                None
            },
            name,
            var,
        })
    }

    /// The EMA average (float32), when `use_ema`.
    pub fn ema(&self) -> Option<&Tensor> {
        self.ema.as_ref()
    }

    /// The gradient accumulator (float32), with gradient accumulation.
    pub fn accumulator(&self) -> Option<&Tensor> {
        self.accumulator.as_ref()
    }

    /// Replaces the EMA average and the accumulator where the slot has them (a `None` for a
    /// slot that has one keeps it as is), detached from any backprop graph.
    pub fn set_full_state(&mut self, ema: Option<Tensor>, accumulator: Option<Tensor>) {
        if self.ema.is_some() {
            if let Some(e) = ema {
                self.ema = Some(store(e));
            }
        }
        if self.accumulator.is_some() {
            if let Some(a) = accumulator {
                self.accumulator = Some(store(a));
            }
        }
    }

    /// The tensors this slot keeps between steps (EMA average, accumulator), for checks.
    pub fn kept_tensors(&self) -> impl Iterator<Item = &Tensor> {
        self.ema.iter().chain(self.accumulator.iter())
    }

    pub fn state_bytes(&self) -> usize {
        let full = |t: &Option<Tensor>| t.as_ref().map_or(0, |t| t.elem_count() * 4);
        self.stats.bytes() + full(&self.ema) + full(&self.accumulator)
    }

    /// Installs computed values. Tensors are fresh and of the right shape, so this cannot fail
    /// for a contiguous variable (which `Var` always is).
    pub fn commit(&mut self, new: NewValues) -> Result<()> {
        if let Some(x) = new.x {
            self.var.set(&x)?;
        }
        if let Some(s) = new.stats {
            self.stats = s;
        }
        self.set_full_state(new.ema, new.accumulator);
        Ok(())
    }
}

/// A tensor as the optimizer keeps it between steps: detached from candle's backprop graph, so
/// that it holds no reference to the tensors it was computed from (same storage, no copy).
pub(crate) fn store(t: Tensor) -> Tensor {
    t.detach()
}

#[cfg(test)]
mod tests {
    //! Nothing the optimizer keeps between steps may carry candle's backprop graph: such a
    //! tensor keeps the tensors it was computed from alive (issue: the composed path leaked one
    //! copy of the weights per step with `use_ema`).
    use crate::Adafactor;
    use adafactor::{AdafactorConfig, LearningRateSchedule};
    use candle_core::{DType, Device, Tensor, Var};

    /// `use_ema` alone, and every stage that keeps a tensor together (EMA with overwrite,
    /// accumulation, with clipping, decay, a schedule and loss scaling around them).
    fn configs(jit: bool) -> Vec<(&'static str, AdafactorConfig)> {
        let b = AdafactorConfig {
            learning_rate: 0.1.into(),
            jit_compile: jit,
            ..Default::default()
        };
        let everything = AdafactorConfig {
            learning_rate: LearningRateSchedule::exponential_decay(0.1, 5.0, 0.5, false)
                .expect("schedule")
                .into(),
            weight_decay: Some(0.05),
            clipnorm: Some(1.0),
            use_ema: true,
            ema_overwrite_frequency: Some(3),
            gradient_accumulation_steps: Some(2),
            loss_scale_factor: Some(2.0),
            ..b.clone()
        };
        let ema = AdafactorConfig { use_ema: true, ..b };
        vec![("ema", ema), ("everything", everything)]
    }

    fn assert_detached(opt: &Adafactor, what: &str) {
        for s in &opt.slots {
            for t in s.kept_tensors() {
                assert!(
                    !t.track_op(),
                    "{what}: a kept tensor of `{}` carries a backprop graph",
                    s.name
                );
            }
        }
    }

    /// A copy of `t` that carries a backprop graph (it depends on a `Var`), as a user's
    /// tensor computed from model weights does.
    fn tracked(t: &Tensor) -> Tensor {
        let zero = Var::zeros((), t.dtype(), t.device()).expect("var");
        t.broadcast_add(zero.as_tensor()).expect("add")
    }

    #[test]
    fn kept_tensors_never_carry_a_backprop_graph() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for jit in [false, true] {
                for (name, cfg) in configs(jit) {
                    let what = format!("{name} {dtype:?} jit={jit}");
                    let vars: Vec<(String, Var)> = [vec![3usize, 4], vec![4], vec![2, 2, 3]]
                        .iter()
                        .enumerate()
                        .map(|(i, d)| {
                            let n: usize = d.iter().product();
                            let v: Vec<f32> = (0..n).map(|k| (k + i) as f32 * 0.1 - 0.3).collect();
                            let t = Tensor::from_vec(v, d.as_slice(), &dev)
                                .and_then(|t| t.to_dtype(dtype))
                                .expect("tensor");
                            (format!("v{i}"), Var::from_tensor(&t).expect("var"))
                        })
                        .collect();
                    let mut opt = Adafactor::new_named(vars.clone(), cfg).expect("optimizer");
                    for step in 0..7 {
                        // Gradients computed from the weights carry a graph, as a user's may.
                        let grads: Vec<Tensor> = vars
                            .iter()
                            .map(|(_, v)| {
                                tracked(&v.as_tensor().affine(0.5, 0.01 * step as f64).expect("g"))
                            })
                            .collect();
                        let pairs: Vec<_> = grads
                            .iter()
                            .zip(&vars)
                            .map(|(g, (_, v))| (Some(g), v))
                            .collect();
                        opt.apply_gradients(&pairs).expect("step");
                        assert_detached(&opt, &format!("{what}, step {step}"));
                    }
                    let weights: Vec<Tensor> = opt
                        .variables()
                        .expect("variables")
                        .iter()
                        .map(|(_, t)| tracked(t))
                        .collect();
                    opt.set_weights(&weights).expect("set_weights");
                    assert_detached(&opt, &format!("{what}, set_weights"));
                    let keras: Vec<Tensor> = opt
                        .keras_variables()
                        .expect("keras_variables")
                        .iter()
                        .map(|(_, t)| tracked(t))
                        .collect();
                    opt.set_keras_weights(&keras).expect("set_keras_weights");
                    assert_detached(&opt, &format!("{what}, set_keras_weights"));
                    let sd = opt.state_dict().expect("state_dict");
                    opt.load_state_dict(&sd).expect("load_state_dict");
                    assert_detached(&opt, &format!("{what}, load_state_dict"));
                    let refs: Vec<&Var> = vars.iter().map(|(_, v)| v).collect();
                    opt.finalize_variable_values(&refs).expect("finalize");
                    assert_detached(&opt, &format!("{what}, finalize_variable_values"));
                }
            }
        }
    }
}
