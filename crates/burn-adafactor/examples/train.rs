//! Trains a small MLP on real data with Keras-exact Adafactor, burn's own Adafactor and burn's
//! AdamW, and compares them: the same task as the candle adapter's main example, with burn's own
//! layers.
//!
//! `cargo run --release -p burn-adafactor --example train [-- --epochs N --batch B --seed S]`.
//! The red wine quality data (1599 wines, 11 features, quality 3 to 8) ships inside the
//! `linfa-datasets` crate, so nothing is downloaded. Quality is predicted as a 6-class label by an
//! 11-64-64-6 ReLU network on `Device::flex().autodiff()`. Every run starts from the same seeded
//! weights and sees the same batches; only the optimizer differs. The output is a table and one
//! machine-readable `result ...` line per run.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdafactorConfig as BurnAdafactorConfig, AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_adafactor::{Adafactor, AdafactorConfig};
use std::error::Error;
use std::time::Instant;

const FEATURES: usize = 11;
const CLASSES: usize = 6;
const MIN_QUALITY: usize = 3;
const HIDDEN: usize = 64;

#[derive(Module, Debug)]
struct Mlp {
    layer1: Linear,
    layer2: Linear,
    layer3: Linear,
    relu: Relu,
}

impl Mlp {
    fn new(device: &Device, seed: u64) -> Mlp {
        device.seed(seed);
        Mlp {
            layer1: LinearConfig::new(FEATURES, HIDDEN).init(device),
            layer2: LinearConfig::new(HIDDEN, HIDDEN).init(device),
            layer3: LinearConfig::new(HIDDEN, CLASSES).init(device),
            relu: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = self.relu.forward(self.layer1.forward(x));
        let h = self.relu.forward(self.layer2.forward(h));
        self.layer3.forward(h)
    }
}

/// The standardised split: train and test features and labels.
struct Data {
    train: (Vec<f32>, Vec<i64>),
    test: (Vec<f32>, Vec<i64>),
}

/// A seeded shuffle (SplitMix64 + Fisher-Yates).
fn shuffle<T>(items: &mut [T], seed: &mut u64) {
    for i in (1..items.len()).rev() {
        *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        items.swap(i, (z % (i as u64 + 1)) as usize);
    }
}

fn load_wine(seed: u64) -> Result<Data, Box<dyn Error>> {
    let ds = linfa_datasets::winequality();
    let n = ds.targets.len();
    let features: Vec<f64> = ds.records.iter().copied().collect();
    if features.len() != n * FEATURES {
        return Err(format!("wine data: expected {FEATURES} features per sample").into());
    }
    let labels: Vec<i64> = ds
        .targets
        .iter()
        .map(|&q| q as i64 - MIN_QUALITY as i64)
        .collect();
    if labels.iter().any(|&l| l < 0 || l >= CLASSES as i64) {
        return Err("wine data: a quality score outside 3..=8".into());
    }
    let mut order: Vec<usize> = (0..n).collect();
    let mut s = seed;
    shuffle(&mut order, &mut s);
    let n_test = (n as f64 * 0.2).round() as usize;
    let (test_idx, train_idx) = order.split_at(n_test);
    let mut mean = [0f64; FEATURES];
    let mut var = [0f64; FEATURES];
    for &i in train_idx {
        for j in 0..FEATURES {
            mean[j] += features[i * FEATURES + j] / train_idx.len() as f64;
        }
    }
    for &i in train_idx {
        for j in 0..FEATURES {
            var[j] += (features[i * FEATURES + j] - mean[j]).powi(2) / train_idx.len() as f64;
        }
    }
    let take = |idx: &[usize]| {
        let x = idx
            .iter()
            .flat_map(|&i| (0..FEATURES).map(move |j| (i, j)))
            .map(|(i, j)| {
                ((features[i * FEATURES + j] - mean[j]) / var[j].sqrt().max(1e-12)) as f32
            })
            .collect();
        (x, idx.iter().map(|&i| labels[i]).collect())
    };
    Ok(Data {
        train: take(train_idx),
        test: take(test_idx),
    })
}

fn batch(x: &[f32], y: &[i64], idx: &[usize], device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let xs: Vec<f32> = idx
        .iter()
        .flat_map(|&i| x[i * FEATURES..(i + 1) * FEATURES].iter().copied())
        .collect();
    let ys: Vec<i64> = idx.iter().map(|&i| y[i]).collect();
    (
        Tensor::from_data(TensorData::new(xs, [idx.len(), FEATURES]), device),
        Tensor::from_data(TensorData::new(ys, [idx.len()]), device),
    )
}

/// Loss and accuracy of `model` on a whole split.
fn evaluate(model: &Mlp, x: &[f32], y: &[i64], device: &Device) -> (f32, f32) {
    let idx: Vec<usize> = (0..y.len()).collect();
    let (xs, ys) = batch(x, y, &idx, device);
    let logits = model.forward(xs);
    let loss = CrossEntropyLossConfig::new()
        .init(device)
        .forward(logits.clone(), ys.clone());
    let correct = logits
        .argmax(1)
        .reshape([y.len()])
        .equal(ys)
        .int()
        .sum()
        .into_scalar::<i64>();
    (loss.into_scalar::<f32>(), correct as f32 / y.len() as f32)
}

/// One optimizer of the comparison.
enum Opt {
    Keras(Box<Adafactor>),
    Burn(burn::optim::ModuleOptimizer, f64),
}

impl Opt {
    fn step(&mut self, model: Mlp, grads: GradientsParams) -> Result<Mlp, Box<dyn Error>> {
        match self {
            Opt::Keras(o) => o.step(model, grads).map_err(|e| e.error.into()),
            Opt::Burn(o, lr) => Ok(o.step(*lr, model, grads)),
        }
    }
}

struct Run {
    name: &'static str,
    lr: f64,
    loss: f32,
    accuracy: f32,
    seconds: f64,
    state_bytes: Option<usize>,
}

fn train(
    name: &'static str,
    lr: f64,
    mut opt: Opt,
    data: &Data,
    epochs: usize,
    batch_size: usize,
    seed: u64,
) -> Result<Run, Box<dyn Error>> {
    let device = Device::flex().autodiff();
    let mut model = Mlp::new(&device, seed);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let (x, y) = &data.train;
    let mut order: Vec<usize> = (0..y.len()).collect();
    let mut s = seed ^ 0x5EED;
    let start = Instant::now();
    for epoch in 1..=epochs {
        shuffle(&mut order, &mut s);
        for idx in order.chunks(batch_size) {
            let (xs, ys) = batch(x, y, idx, &device);
            let loss = loss_fn.forward(model.forward(xs), ys);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = opt.step(model, grads)?;
        }
        if epoch % (epochs / 5).max(1) == 0 || epoch == epochs {
            let (l, a) = evaluate(&model, &data.test.0, &data.test.1, &device.clone().inner());
            println!("{name:<22} epoch {epoch:>3}/{epochs}  test loss {l:.4}  test acc {a:.4}");
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let (loss, accuracy) = evaluate(
        &model.valid(),
        &data.test.0,
        &data.test.1,
        &device.clone().inner(),
    );
    let state_bytes = match &opt {
        Opt::Keras(o) => Some(o.state_bytes()),
        Opt::Burn(..) => None,
    };
    Ok(Run {
        name,
        lr,
        loss,
        accuracy,
        seconds,
        state_bytes,
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let (mut epochs, mut batch_size, mut seed) = (30usize, 64usize, 42u64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--epochs" => epochs = value.parse()?,
            "--batch" => batch_size = value.parse()?,
            "--seed" => seed = value.parse()?,
            other => {
                return Err(
                    format!("unknown argument `{other}` (use --epochs, --batch, --seed)").into(),
                );
            }
        }
    }
    if epochs == 0 || batch_size == 0 {
        return Err("--epochs and --batch must be at least 1".into());
    }
    let data = load_wine(seed)?;
    println!(
        "red wine quality: {} train / {} test samples; {FEATURES}-{HIDDEN}-{HIDDEN}-{CLASSES} ReLU MLP (burn Linear), \
         {epochs} epochs of batch {batch_size}, seed {seed}",
        data.train.1.len(),
        data.test.1.len()
    );
    let keras = |lr: f64| -> Result<Opt, Box<dyn Error>> {
        Ok(Opt::Keras(Box::new(Adafactor::new(
            AdafactorConfig::with_learning_rate(lr),
        )?)))
    };
    let runs = vec![
        train(
            "keras-adafactor",
            1e-3,
            keras(1e-3)?,
            &data,
            epochs,
            batch_size,
            seed,
        )?,
        train(
            "keras-adafactor-paper",
            1e-2,
            keras(1e-2)?,
            &data,
            epochs,
            batch_size,
            seed,
        )?,
        train(
            "burn-adafactor",
            1e-2,
            Opt::Burn(BurnAdafactorConfig::new().init(), 1e-2),
            &data,
            epochs,
            batch_size,
            seed,
        )?,
        train(
            "burn-adamw",
            1e-3,
            Opt::Burn(AdamWConfig::new().init(), 1e-3),
            &data,
            epochs,
            batch_size,
            seed,
        )?,
    ];
    println!(
        "\n{:<22}  {:>6}  {:>9}  {:>8}  {:>11}  {:>7}",
        "optimizer", "lr", "test loss", "test acc", "state bytes", "seconds"
    );
    for r in &runs {
        let state = r.state_bytes.map_or("-".to_string(), |b| b.to_string());
        println!(
            "{:<22}  {:>6}  {:>9.4}  {:>8.4}  {:>11}  {:>7.2}",
            r.name,
            format!("{:e}", r.lr),
            r.loss,
            r.accuracy,
            state,
            r.seconds
        );
    }
    println!();
    for r in &runs {
        println!(
            "result optimizer={} test_accuracy={:.4} test_loss={:.4} seconds={:.2}",
            r.name, r.accuracy, r.loss, r.seconds
        );
    }
    Ok(())
}
