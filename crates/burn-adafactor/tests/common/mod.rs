//! Helpers shared by the integration tests: a module holding parameters of any rank, built
//! from shapes and values, with gradients registered by position.

#![allow(dead_code)] // each test file uses only some of them

use adafactor::NameExclusions;
use adafactor_conformance as conf;
use burn::module::{Module, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};

/// Parameters of ranks 1 to 4, in lists by rank (paths `r1.0`, `r2.0`, ...).
#[derive(Module, Debug)]
pub struct Vars {
    pub r1: Vec<Param<Tensor<1>>>,
    pub r2: Vec<Param<Tensor<2>>>,
    pub r3: Vec<Param<Tensor<3>>>,
    pub r4: Vec<Param<Tensor<4>>>,
}

/// Where one variable lives in [`Vars`].
#[derive(Debug, Clone)]
pub struct Handle {
    pub rank: usize,
    pub pos: usize,
    pub shape: Vec<usize>,
    pub id: ParamId,
}

impl Handle {
    /// The parameter's module path.
    pub fn path(&self) -> String {
        format!("r{}.{}", self.rank, self.pos)
    }
}

fn param<const D: usize>(
    values: &[f32],
    shape: &[usize],
    device: &Device,
    dtype: Option<FloatDType>,
) -> Param<Tensor<D>> {
    let t = Tensor::<D>::from_data(
        TensorData::new(values.to_vec(), shape.to_vec()),
        &device.clone().inner(),
    );
    let t = match dtype {
        Some(d) => t.cast(d),
        None => t,
    };
    Param::from_tensor(t.autodiff())
}

/// A module with one parameter per `(shape, values)`; a scalar (`[]`) becomes shape `[1]`.
/// `dtype`: cast the parameters (bf16, f16).
pub fn build(
    vars: &[(Vec<usize>, Vec<f32>)],
    device: &Device,
    dtype: Option<FloatDType>,
) -> (Vars, Vec<Handle>) {
    let mut m = Vars {
        r1: vec![],
        r2: vec![],
        r3: vec![],
        r4: vec![],
    };
    let mut handles = Vec::new();
    for (shape, values) in vars {
        let shape = if shape.is_empty() {
            vec![1]
        } else {
            shape.clone()
        };
        let (pos, id) = match shape.len() {
            1 => {
                m.r1.push(param(values, &shape, device, dtype));
                (m.r1.len() - 1, m.r1.last().map(|p| p.id))
            }
            2 => {
                m.r2.push(param(values, &shape, device, dtype));
                (m.r2.len() - 1, m.r2.last().map(|p| p.id))
            }
            3 => {
                m.r3.push(param(values, &shape, device, dtype));
                (m.r3.len() - 1, m.r3.last().map(|p| p.id))
            }
            4 => {
                m.r4.push(param(values, &shape, device, dtype));
                (m.r4.len() - 1, m.r4.last().map(|p| p.id))
            }
            r => panic!("rank {r} is not in the test module"),
        };
        handles.push(Handle {
            rank: shape.len(),
            pos,
            shape,
            id: id.expect("just pushed"),
        });
    }
    (m, handles)
}

/// Gradients for some parameters (`None`: no gradient), in the parameters' dtype.
pub fn grads(
    handles: &[Handle],
    values: &[Option<Vec<f32>>],
    device: &Device,
    dtype: DType,
) -> GradientsParams {
    let mut g = GradientsParams::new();
    let dev = device.clone().inner();
    for (h, v) in handles.iter().zip(values) {
        let Some(v) = v else { continue };
        let data = TensorData::new(v.clone(), h.shape.clone());
        match h.rank {
            1 => g.register::<1>(h.id, Tensor::<1>::from_data(data, &dev).cast(dtype)),
            2 => g.register::<2>(h.id, Tensor::<2>::from_data(data, &dev).cast(dtype)),
            3 => g.register::<3>(h.id, Tensor::<3>::from_data(data, &dev).cast(dtype)),
            4 => g.register::<4>(h.id, Tensor::<4>::from_data(data, &dev).cast(dtype)),
            r => panic!("rank {r}"),
        }
    }
    g
}

/// A parameter's values as float32.
pub fn values(m: &Vars, h: &Handle) -> Vec<f32> {
    let data = match h.rank {
        1 => m.r1[h.pos].val().into_data(),
        2 => m.r2[h.pos].val().into_data(),
        3 => m.r3[h.pos].val().into_data(),
        4 => m.r4[h.pos].val().into_data(),
        r => panic!("rank {r}"),
    };
    data.convert::<f32>()
        .try_to_vec::<f32>()
        .expect("float values")
}

/// A parameter's values as raw bits (for bit-exact comparisons).
pub fn bits(m: &Vars, h: &Handle) -> Vec<u32> {
    values(m, h).iter().map(|x| x.to_bits()).collect()
}

/// Whether a parameter still requires a gradient (flags put back after a step).
pub fn requires_grad(m: &Vars, h: &Handle) -> bool {
    match h.rank {
        1 => m.r1[h.pos].val().is_require_grad(),
        2 => m.r2[h.pos].val().is_require_grad(),
        3 => m.r3[h.pos].val().is_require_grad(),
        4 => m.r4[h.pos].val().is_require_grad(),
        r => panic!("rank {r}"),
    }
}

/// Excludes from weight decay the parameters whose recorded Keras variables the case excludes:
/// Keras matches variable names, burn parameter paths, so each excluded variable's path is
/// matched exactly.
pub fn exclude_as_keras(
    opt: &mut burn_adafactor::Adafactor,
    case: &serde_json::Value,
    handles: &[Handle],
) -> Result<(), String> {
    let keras = NameExclusions::new(&conf::excluded_names(case)).map_err(|e| e.to_string())?;
    let paths: Vec<String> = conf::variables(case)
        .iter()
        .zip(handles)
        .filter(|(v, _)| keras.excludes(&v.name))
        .map(|(_, h)| format!("^{}$", h.path().replace('.', "\\.")))
        .collect();
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    opt.exclude_from_weight_decay(&refs)
        .map_err(|e| e.to_string())
}
