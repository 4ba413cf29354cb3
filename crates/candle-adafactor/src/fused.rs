//! The fused data path (in progress).
use crate::optimizer::Adafactor;
use adafactor::StepPlan;
use candle_core::{Result, Tensor};

pub(crate) fn supports(_t: &Tensor) -> bool {
    false
}

pub(crate) fn apply(
    _opt: &mut Adafactor,
    _items: &[(usize, Tensor)],
    _plan: &StepPlan,
    _check_finite: bool,
) -> Result<bool> {
    Err(crate::optimizer::err("fused path not available"))
}
