//! One variable's optimizer state: statistics (host float32), EMA average and gradient
//! accumulator (float32 tensors on the variable's device).

use adafactor::{AdafactorConfig, Stats};
use candle_core::{DType, Result, Tensor, Var};

/// A variable and everything the optimizer keeps for it.
#[derive(Debug)]
pub(crate) struct Slot {
    pub name: String,
    pub var: Var,
    pub stats: Stats,
    pub ema: Option<Tensor>,
    pub accumulator: Option<Tensor>,
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
    pub fn new(name: String, var: Var, cfg: &AdafactorConfig) -> Result<Self> {
        let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
        Ok(Slot {
            stats: Stats::zeros(var.dims()),
            ema: if cfg.use_ema { Some(zeros()?) } else { None },
            accumulator: if cfg.gradient_accumulation_steps.is_some() {
                Some(zeros()?)
            } else {
                None
            },
            name,
            var,
        })
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
        if let Some(e) = new.ema {
            self.ema = Some(e);
        }
        if let Some(a) = new.accumulator {
            self.accumulator = Some(a);
        }
        Ok(())
    }
}
