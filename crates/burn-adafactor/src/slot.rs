//! One parameter's optimizer state: statistics (host float32, the core's [`Stats`]), EMA
//! average and gradient accumulator (flat float32 burn tensors on the parameter's device).

use crate::params::ParamInfo;
use adafactor::{AdafactorConfig, Stats};
use burn::module::ParamId;
use burn::tensor::{DType, Device, Tensor, TensorData};

/// A parameter and everything the optimizer keeps for it.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub path: String,
    pub id: ParamId,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub device: Device,
    pub stats: Stats,
    pub ema: Option<Tensor<1>>,
    pub accumulator: Option<Tensor<1>>,
}

/// A flat float32 tensor of these values.
pub(crate) fn f32_tensor(values: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), (device, DType::F32))
}

/// A flat tensor's values as float32.
pub(crate) fn host_f32(t: &Tensor<1>) -> Vec<f32> {
    t.clone()
        .cast(DType::F32)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap_or_default()
}

impl Slot {
    /// Fresh state for a parameter: zero statistics (factored over the config's
    /// `factored_axes` for its path, else Keras's last two axes), the EMA average starting at
    /// zero (as in Keras) and a zero accumulator, as configured.
    pub fn new(info: &ParamInfo, cfg: &AdafactorConfig) -> Self {
        let n = info.shape.iter().product::<usize>();
        let zeros = || f32_tensor(adafactor::touched_zeros(n), &info.device);
        Slot {
            path: info.path.clone(),
            id: info.id,
            shape: info.shape.clone(),
            dtype: info.dtype,
            device: info.device.clone(),
            stats: Stats::zeros_with(&info.shape, cfg.axes_of(&info.path)),
            ema: cfg.use_ema.then(zeros),
            accumulator: cfg.gradient_accumulation_steps.map(|_| zeros()),
        }
    }

    /// Number of elements of the parameter.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of optimizer state (all float32).
    pub fn state_bytes(&self) -> usize {
        let full = |t: &Option<Tensor<1>>| t.as_ref().map_or(0, |_| self.len() * 4);
        self.stats.bytes() + full(&self.ema) + full(&self.accumulator)
    }
}
