//! Save, stop, resume: a small candle training loop checkpointed halfway.
//!
//! `cargo run --release --example checkpoint [-- DIR]` (files go to DIR, default the system temp
//! folder). `-- --t5small [DIR]` instead measures the checkpoint of a T5-small-sized parameter set
//! (35,330,048 float32 parameters in 49 tensors): its size and save and load times. A 2-layer network is fitted to a fixed synthetic regression task with Adafactor
//! (a cosine schedule, EMA and gradient accumulation over 3 batches). After 20 steps the model
//! weights (`VarMap::save`) and the optimizer state (`Adafactor::save_state`) are written and
//! everything is dropped; a new process-like phase rebuilds the model, loads both files and
//! trains 20 more steps. The final weights are compared, bit for bit, with an uninterrupted
//! 40-step run.

use candle_adafactor::{Adafactor, AdafactorConfig, LearningRateSchedule, StateDict};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder, VarMap};
use std::path::{Path, PathBuf};

const STEPS: usize = 40;
const STOP_AT: usize = 20; // not a multiple of 3: the gradient accumulators are mid-cycle.

struct Model {
    l1: Linear,
    l2: Linear,
}

impl Model {
    /// Builds the layers in `varmap` (fixed initial values: every run starts the same).
    fn new(varmap: &VarMap) -> Result<Model> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        let model = Model {
            l1: linear(4, 16, vb.pp("l1"))?,
            l2: linear(16, 1, vb.pp("l2"))?,
        };
        let mut vars: Vec<_> = varmap
            .data()
            .lock()
            .map_err(|_| lock_err())?
            .clone()
            .into_iter()
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (k, (_, var)) in vars.iter().enumerate() {
            let n = var.elem_count();
            let init: Vec<f32> = (0..n)
                .map(|i| ((i * 7 + k * 3) as f32 * 0.37).sin() * 0.5)
                .collect();
            var.set(&Tensor::from_vec(init, var.shape(), &Device::Cpu)?)?;
        }
        Ok(model)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.l2.forward(&self.l1.forward(x)?.tanh()?)
    }
}

fn lock_err() -> candle_core::Error {
    candle_core::Error::Msg("the VarMap's lock is poisoned".into())
}

/// Batch `k` of the task `y = sin(x0) + x1 * x2 - 0.5 * x3`.
fn batch(k: usize) -> Result<(Tensor, Tensor)> {
    let x: Vec<f32> = (0..32 * 4)
        .map(|i| (((i + 131 * k) as f32) * 0.618).sin())
        .collect();
    let y: Vec<f32> = x
        .chunks(4)
        .map(|r| r[0].sin() + r[1] * r[2] - 0.5 * r[3])
        .collect();
    Ok((
        Tensor::from_vec(x, (32, 4), &Device::Cpu)?,
        Tensor::from_vec(y, (32, 1), &Device::Cpu)?,
    ))
}

fn config() -> Result<AdafactorConfig> {
    let schedule = LearningRateSchedule::cosine_decay(0.05, STEPS as f64, 0.1, None, 0.0)
        .map_err(candle_core::Error::wrap)?;
    Ok(AdafactorConfig {
        learning_rate: schedule.into(),
        use_ema: true,
        ema_momentum: 0.9,
        gradient_accumulation_steps: Some(3),
        ..Default::default()
    })
}

/// Trains steps `from..to`, printing the loss every 5 steps.
fn train(
    model: &Model,
    opt: &mut Adafactor,
    varmap: &VarMap,
    from: usize,
    to: usize,
) -> Result<()> {
    let vars = varmap.all_vars();
    let refs: Vec<&candle_core::Var> = vars.iter().collect();
    for k in from..to {
        let (x, y) = batch(k)?;
        let loss = (model.forward(&x)? - y)?.sqr()?.mean_all()?;
        opt.minimize(&loss, &refs)?;
        if (k + 1) % 5 == 0 {
            println!("  step {:>2}  loss {:.5}", k + 1, loss.to_scalar::<f32>()?);
        }
    }
    Ok(())
}

/// Every weight as raw bits, in name order.
fn weight_bits(varmap: &VarMap) -> Result<Vec<(String, Vec<u32>)>> {
    let data = varmap.data().lock().map_err(|_| lock_err())?;
    let mut out = data
        .iter()
        .map(|(n, v)| {
            let bits = v
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits())
                .collect();
            Ok((n.clone(), bits))
        })
        .collect::<Result<Vec<_>>>()?;
    out.sort();
    Ok(out)
}

fn run(dir: &Path) -> Result<()> {
    let weights_path = dir.join("checkpoint-example-model.safetensors");
    let state_path = dir.join("checkpoint-example-optimizer.safetensors");

    println!("uninterrupted run, {STEPS} steps:");
    let varmap = VarMap::new();
    let model = Model::new(&varmap)?;
    let mut opt = Adafactor::from_varmap(&varmap, config()?)?;
    train(&model, &mut opt, &varmap, 0, STEPS)?;
    let want = weight_bits(&varmap)?;

    println!("interrupted run: steps 1-{STOP_AT}, then save and stop");
    {
        let varmap = VarMap::new();
        let model = Model::new(&varmap)?;
        let mut opt = Adafactor::from_varmap(&varmap, config()?)?;
        train(&model, &mut opt, &varmap, 0, STOP_AT)?;
        varmap.save(&weights_path)?;
        opt.save_state(&state_path)?;
        println!(
            "  saved {} and {} ({} bytes of optimizer state)",
            weights_path.display(),
            state_path.display(),
            std::fs::metadata(&state_path)?.len()
        );
    } // model, variables and optimizer dropped

    println!("resumed: load both files, steps {}-{STEPS}", STOP_AT + 1);
    let mut varmap = VarMap::new();
    let model = Model::new(&varmap)?;
    varmap.load(&weights_path)?;
    let state = StateDict::load(&state_path)?;
    let mut opt = Adafactor::from_varmap(&varmap, state.config()?)?;
    opt.load_state_dict(&state)?;
    train(&model, &mut opt, &varmap, STOP_AT, STEPS)?;
    let got = weight_bits(&varmap)?;

    std::fs::remove_file(&weights_path).ok();
    std::fs::remove_file(&state_path).ok();
    if got == want {
        println!("resumed weights equal the uninterrupted run's, bit for bit");
        Ok(())
    } else {
        Err(candle_core::Error::Msg(
            "the resumed weights differ from the uninterrupted run's".into(),
        ))
    }
}

/// T5-small-like shapes: embedding 32128x512, then 6 blocks of four 512x512, one 512x2048, one
/// 2048x512 and two 512-vectors (the peer benchmark's `t5small` set).
fn t5small_shapes() -> Vec<Vec<usize>> {
    let mut shapes = vec![vec![32128, 512]];
    for _ in 0..6 {
        shapes.extend(std::iter::repeat_n(vec![512, 512], 4));
        shapes.extend([vec![512, 2048], vec![2048, 512], vec![512], vec![512]]);
    }
    shapes
}

/// Median of `runs` timings of `f`, in milliseconds.
fn median_ms(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = std::time::Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[runs / 2])
}

fn measure_t5small(dir: &Path) -> Result<()> {
    let path = dir.join("checkpoint-example-t5small-optimizer.safetensors");
    let vars: Vec<(String, candle_core::Var)> = t5small_shapes()
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            Ok((
                format!("p{i:02}"),
                candle_core::Var::ones(s, DType::F32, &Device::Cpu)?,
            ))
        })
        .collect::<Result<_>>()?;
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = Adafactor::new_named(vars.clone(), AdafactorConfig::default())?;
    let grads: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().affine(0.01, 0.0))
        .collect::<Result<_>>()?;
    let pairs: Vec<(Option<&Tensor>, &candle_core::Var)> = grads
        .iter()
        .zip(&vars)
        .map(|(g, (_, v))| (Some(g), v))
        .collect();
    opt.apply_gradients(&pairs)?;
    let save = median_ms(5, || opt.save_state(&path))?;
    let size = std::fs::metadata(&path)?.len();
    let load = median_ms(5, || opt.load_state(&path))?;
    std::fs::remove_file(&path).ok();
    println!("t5small: {params} parameters in {} tensors", vars.len());
    println!(
        "optimizer state {} bytes, checkpoint file {size} bytes; weights alone are {} bytes",
        opt.state_bytes(),
        params * 4
    );
    println!("save_state {save:.2} ms, load_state {load:.2} ms (medians of 5)");
    Ok(())
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let t5small = args.first().is_some_and(|a| a == "--t5small");
    if t5small {
        args.remove(0);
    }
    let dir = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let result = if t5small {
        measure_t5small(&dir)
    } else {
        run(&dir)
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
