//! Helpers shared by the integration tests: a module holding parameters of any rank, built
//! from shapes and values, with gradients registered by position; the replay of a recorded Keras
//! run on it.

#![allow(dead_code)] // each test file uses only some of them

use adafactor::NameExclusions;
use adafactor_conformance as conf;
use burn::module::{Module, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use burn_adafactor::{Adafactor, DataPath};
use serde_json::Value;

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
    case: &Value,
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

/// How a recorded case's values, in Keras's layout, map to the module's parameters.
pub struct Layout {
    /// The module's shape of a variable of Keras shape `shape`.
    pub shape: fn(&[usize]) -> Vec<usize>,
    /// Values of a variable of Keras shape `shape` to the module's layout (`true`) or back.
    pub values: fn(&[f32], &[usize], bool) -> Vec<f32>,
}

fn same_shape(shape: &[usize]) -> Vec<usize> {
    shape.to_vec()
}

fn same_values(values: &[f32], _: &[usize], _: bool) -> Vec<f32> {
    values.to_vec()
}

/// Every parameter as Keras stores it.
pub const KERAS_LAYOUT: Layout = Layout {
    shape: same_shape,
    values: same_values,
};

/// Replays one recorded case on one path (`jit_compile`) on a module of its variables in
/// `layout`, `setup` running on the fresh optimizer first; compares every parameter, EMA
/// average and `iterations` after every step, and the finalized values when recorded. `Err`
/// names the case, step, variable, index, expected and got.
pub fn replay(
    case: &Value,
    jit_compile: bool,
    layout: &Layout,
    setup: impl FnOnce(&mut Adafactor, &Vars, &[Handle]) -> Result<(), String>,
) -> Result<(), String> {
    let name = conf::name(case);
    let fail = |m: String| format!("case {name} (jit_compile={jit_compile}): {m}");
    let mut opt = Adafactor::from_config(&conf::config(case, jit_compile))
        .map_err(|e| fail(format!("from_config: {e}")))?;
    let device = Device::flex().autodiff();
    let vars = conf::variables(case);
    let to_module = |v: &[f32], shape: &[usize]| (layout.values)(v, shape, true);
    let to_keras = |v: &[f32], shape: &[usize]| (layout.values)(v, shape, false);
    let init: Vec<(Vec<usize>, Vec<f32>)> = vars
        .iter()
        .map(|v| ((layout.shape)(&v.shape), to_module(&v.initial, &v.shape)))
        .collect();
    let (mut model, handles) = build(&init, &device, None);
    setup(&mut opt, &model, &handles).map_err(fail)?;
    // Keras excludes by variable name; the same variables are excluded here by module path.
    exclude_as_keras(&mut opt, case, &handles).map_err(fail)?;
    let want_path = if jit_compile {
        DataPath::Fused
    } else {
        DataPath::Composed
    };

    for (k, step) in case["steps"].as_array().into_iter().flatten().enumerate() {
        let at = |m: String| fail(format!("step {}: {m}", k + 1));
        let g: Vec<Option<Vec<f32>>> = conf::gradients(step)
            .into_iter()
            .zip(&vars)
            .map(|(g, v)| g.map(|g| to_module(&g, &v.shape)))
            .collect();
        model = opt
            .step(model, grads(&handles, &g, &device, DType::F32))
            .map_err(|e| at(format!("step: {e}")))?;
        if opt.data_path() != want_path {
            return Err(at(format!(
                "ran on {:?}, expected {want_path:?}",
                opt.data_path()
            )));
        }
        conf::check_iterations(step, opt.iterations()).map_err(at)?;
        let recorded = step["variables"].as_array().into_iter().flatten();
        for ((v, h), want) in vars.iter().zip(&handles).zip(recorded) {
            let got = to_keras(&values(&model, h), &v.shape);
            conf::compare(&format!("variable {}", v.name), &got, want).map_err(at)?;
        }
        if let Some(emas) = step.get("ema").and_then(Value::as_array) {
            for ((v, h), want) in vars.iter().zip(&handles).zip(emas) {
                let avg = opt
                    .moving_average(&h.path())
                    .map_err(|e| at(e.to_string()))?
                    .ok_or_else(|| at(format!("no EMA average for {}", v.name)))?;
                let avg = avg.try_to_vec::<f32>().map_err(|e| at(format!("{e:?}")))?;
                let got = to_keras(&avg, &v.shape);
                conf::compare(&format!("EMA of {}", v.name), &got, want).map_err(at)?;
            }
        }
    }
    if let Some(fin) = case.get("finalized").and_then(Value::as_array) {
        let model = opt
            .finalize_variable_values(model)
            .map_err(|e| fail(e.to_string()))?;
        for ((v, h), want) in vars.iter().zip(&handles).zip(fin) {
            let got = to_keras(&values(&model, h), &v.shape);
            conf::compare(&format!("finalized {}", v.name), &got, want)
                .map_err(|m| fail(format!("after finalize_variable_values: {m}")))?;
        }
    }
    Ok(())
}
