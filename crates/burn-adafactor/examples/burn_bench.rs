//! Times one optimizer step on a model's parameter shapes with synthetic gradients, and burn's
//! own Adafactor (`burn::optim::AdafactorConfig`, defaults) on the same parameters in the same
//! run.
//!
//! cargo run --release -p burn-adafactor --example burn_bench -- --set <t5-small|resnet50|tiny>
//!     [--path fused|composed] [--dtype f32|bf16|f16] [--steps N] [--warmup N]
//!     [--factor-convolutions on|off]
//!
//! `--factor-convolutions on` calls `Adafactor::factor_convolutions` (Keras's factoring of the
//! convolution kernels, see the README); burn's own Adafactor factors the last two axes.
//!
//! The last line: `bench framework=burn set=.. path=.. dtype=.. params=.. median_ms=..
//! burn_adafactor_ms=..` (medians over the timed steps).

use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_adafactor::{Adafactor, AdafactorConfig, DataPath};
use std::time::Instant;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// A model's parameters: convolution kernels, matrices and vectors.
#[derive(Module, Debug)]
struct Params {
    kernels: Vec<Param<Tensor<4>>>,
    matrices: Vec<Param<Tensor<2>>>,
    vectors: Vec<Param<Tensor<1>>>,
}

struct Args {
    set: String,
    path: String,
    dtype: DType,
    steps: usize,
    warmup: usize,
    factor_convolutions: bool,
}

fn parse_args() -> BoxResult<Args> {
    let mut a = Args {
        set: "t5-small".into(),
        path: "fused".into(),
        dtype: DType::F32,
        steps: 10,
        warmup: 1,
        factor_convolutions: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--set" => a.set = value()?,
            "--path" => a.path = value()?,
            "--dtype" => {
                a.dtype = match value()?.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    d => return Err(format!("--dtype `{d}`: expected f32, bf16 or f16").into()),
                }
            }
            "--steps" => a.steps = value()?.parse()?,
            "--warmup" => a.warmup = value()?.parse()?,
            "--factor-convolutions" => {
                a.factor_convolutions = match value()?.as_str() {
                    "on" => true,
                    "off" => false,
                    v => {
                        return Err(
                            format!("--factor-convolutions `{v}`: expected on or off").into()
                        );
                    }
                }
            }
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    if a.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    Ok(a)
}

/// The parameter shapes of a set (the candle bench's sets of the same names).
fn shapes(set: &str) -> BoxResult<Vec<Vec<usize>>> {
    let blocks = |s: &mut Vec<Vec<usize>>, n: usize, d: usize, ff: usize| {
        for _ in 0..n {
            s.extend(std::iter::repeat_n(vec![d, d], 4));
            s.push(vec![d, ff]);
            s.push(vec![ff, d]);
            s.push(vec![d]);
            s.push(vec![d]);
        }
    };
    match set {
        "t5-small" => {
            let mut s = vec![vec![32128, 512]];
            blocks(&mut s, 6, 512, 2048);
            Ok(s)
        }
        "resnet50" => Ok(resnet50()),
        "tiny" => Ok(vec![
            vec![256, 256],
            vec![256],
            vec![256, 1024],
            vec![1024, 256],
        ]),
        other => Err(format!("--set `{other}`: expected t5-small, resnet50 or tiny").into()),
    }
}

/// ResNet-50's 161 parameter tensors in burn's layout (`[out, in, kh, kw]` convolution kernels,
/// then batch-norm scale and shift vectors), as the candle bench's set of that name.
fn resnet50() -> Vec<Vec<usize>> {
    let mut s = vec![vec![64, 3, 7, 7], vec![64], vec![64]];
    let mut cin = 64;
    for (mid, out, n) in [(64, 256, 3), (128, 512, 4), (256, 1024, 6), (512, 2048, 3)] {
        for b in 0..n {
            for conv in [
                vec![mid, cin, 1, 1],
                vec![mid, mid, 3, 3],
                vec![out, mid, 1, 1],
            ] {
                let c = conv[0];
                s.extend([conv, vec![c], vec![c]]);
            }
            if b == 0 {
                s.extend([vec![out, cin, 1, 1], vec![out], vec![out]]);
            }
            cin = out;
        }
    }
    s.extend([vec![1000, 2048], vec![1000]]);
    s
}

/// Deterministic values in [-0.5, 0.5) (xorshift).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

fn tensor<const D: usize>(
    seed: u64,
    shape: &[usize],
    scale: f32,
    dtype: DType,
    dev: &Device,
) -> Tensor<D> {
    let n = shape.iter().product();
    let t = Tensor::<D>::from_data(TensorData::new(values(seed, n, scale), shape.to_vec()), dev);
    if dtype == DType::F32 {
        t
    } else {
        t.cast(dtype)
    }
}

/// One gradient per parameter (plain tensors), in the model's lists.
struct Grads {
    kernels: Vec<Tensor<4>>,
    matrices: Vec<Tensor<2>>,
    vectors: Vec<Tensor<1>>,
}

/// The model (on the autodiff device) and one gradient per parameter.
fn build(shapes: &[Vec<usize>], dtype: DType) -> (Params, Grads) {
    let dev = Device::flex();
    let mut m = Params {
        kernels: vec![],
        matrices: vec![],
        vectors: vec![],
    };
    let mut g = Grads {
        kernels: vec![],
        matrices: vec![],
        vectors: vec![],
    };
    for (i, s) in shapes.iter().enumerate() {
        let seed = i as u64 + 1;
        match s.len() {
            4 => {
                m.kernels.push(Param::from_tensor(
                    tensor::<4>(seed, s, 0.2, dtype, &dev).autodiff(),
                ));
                g.kernels
                    .push(tensor::<4>(seed + 1000, s, 0.01, dtype, &dev));
            }
            2 => {
                m.matrices.push(Param::from_tensor(
                    tensor::<2>(seed, s, 0.2, dtype, &dev).autodiff(),
                ));
                g.matrices
                    .push(tensor::<2>(seed + 1000, s, 0.01, dtype, &dev));
            }
            _ => {
                m.vectors.push(Param::from_tensor(
                    tensor::<1>(seed, s, 0.2, dtype, &dev).autodiff(),
                ));
                g.vectors
                    .push(tensor::<1>(seed + 1000, s, 0.01, dtype, &dev));
            }
        }
    }
    (m, g)
}

/// This step's gradients (handles to the same buffers every step, as backward would give).
fn grads(m: &Params, g: &Grads) -> GradientsParams {
    let mut out = GradientsParams::new();
    for (p, t) in m.kernels.iter().zip(&g.kernels) {
        out.register(p.id, t.clone());
    }
    for (p, t) in m.matrices.iter().zip(&g.matrices) {
        out.register(p.id, t.clone());
    }
    for (p, t) in m.vectors.iter().zip(&g.vectors) {
        out.register(p.id, t.clone());
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Times `steps` steps after `warmup` untimed ones; returns the step times in ms.
fn time<S: FnMut(Params) -> BoxResult<Params>>(
    mut model: Params,
    warmup: usize,
    steps: usize,
    mut step: S,
) -> BoxResult<Vec<f64>> {
    for _ in 0..warmup {
        model = step(model)?;
    }
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        model = step(model)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench: {e}");
        std::process::exit(2);
    }
}

fn run() -> BoxResult<()> {
    let args = parse_args()?;
    let shapes = shapes(&args.set)?;
    let params: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let dtype = match args.dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    };
    println!(
        "threads={} set={} tensors={} params={params}",
        rayon::current_num_threads(),
        args.set,
        shapes.len()
    );

    let (model, g) = build(&shapes, args.dtype);
    let config = AdafactorConfig {
        jit_compile: args.path == "fused",
        ..Default::default()
    };
    let mut opt = Adafactor::new(config)?;
    if args.factor_convolutions {
        let set = opt.factor_convolutions(&model)?;
        println!("factor_convolutions: {} kernels", set.len());
    }
    let mut copies = 0;
    let ours = time(model, args.warmup, args.steps, |m| {
        let step_grads = grads(&m, &g);
        let m = opt.step(m, step_grads)?;
        copies += opt.last_step_copies();
        Ok(m)
    })?;
    let path = match opt.data_path() {
        DataPath::Fused => "fused",
        DataPath::Composed => "composed",
    };
    println!(
        "keras-adafactor path={path} step_ms {}",
        ours.iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "keras-adafactor state_bytes={} buffers_copied={copies}",
        opt.state_bytes()
    );
    drop(opt);

    let (model, g) = build(&shapes, args.dtype);
    let mut burn_opt = burn::optim::AdafactorConfig::new().init();
    let theirs = time(model, args.warmup, args.steps, |m| {
        let step_grads = grads(&m, &g);
        Ok(burn_opt.step(1e-3, m, step_grads))
    })?;
    println!(
        "burn-adafactor step_ms {}",
        theirs
            .iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    );

    let (median_ms, burn_ms) = (median(ours), median(theirs));
    println!(
        "bench framework=burn set={} path={path} dtype={dtype} params={params} median_ms={median_ms:.2} \
         burn_adafactor_ms={burn_ms:.2} speedup={:.1} factor_convolutions={}",
        args.set,
        burn_ms / median_ms,
        if args.factor_convolutions {
            "on"
        } else {
            "off"
        }
    );
    Ok(())
}
