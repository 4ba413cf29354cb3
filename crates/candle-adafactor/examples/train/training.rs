//! Training code of the `train` example, shared with `tests/train_example.rs`: the red wine
//! quality data, the MLP, its seeded initialisation and one training run per optimizer.

use candle_adafactor::{Adafactor, AdafactorConfig};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{linear, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use std::time::Instant;

/// Number of input features of the wine data.
pub const FEATURES: usize = 11;
/// Quality scores 3..=8 become classes 0..=5.
pub const CLASSES: usize = 6;
/// Lowest quality score in the data (class 0).
pub const MIN_QUALITY: usize = 3;
/// Width of both hidden layers.
pub const HIDDEN: usize = 64;
/// Fraction of the samples held out for testing.
pub const TEST_FRACTION: f64 = 0.2;

/// SplitMix64: a tiny seeded generator, so that the split, the initial weights and the batch
/// order depend on the seed only (never on candle's global RNG).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform float in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A uniform integer in [0, n) (n > 0), by rejection so that it is unbiased.
    pub fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return (x % n) as usize;
            }
        }
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// The red wine quality data, split and standardised.
#[derive(Debug)]
pub struct WineData {
    /// Training features, `(n_train, 11)` float32, standardised with the training statistics.
    pub train_x: Tensor,
    /// Training classes, `(n_train,)` u32 in 0..6.
    pub train_y: Tensor,
    /// Test features, standardised with the training statistics.
    pub test_x: Tensor,
    /// Test classes.
    pub test_y: Tensor,
    /// Number of training samples.
    pub n_train: usize,
    /// Number of test samples.
    pub n_test: usize,
    /// The most frequent class of the training set.
    pub majority_class: usize,
    /// Test accuracy of always predicting `majority_class`.
    pub majority_accuracy: f32,
}

fn msg(text: String) -> candle_core::Error {
    candle_core::Error::Msg(text)
}

/// Loads the red wine quality data shipped in `linfa-datasets` (1599 samples, 11 features),
/// splits it 80/20 with a permutation drawn from `seed`, and standardises every feature with
/// the mean and standard deviation of the training part.
///
/// # Errors
/// The data is not 11 features with quality scores 3..=8, or a tensor cannot be made.
pub fn load_wine(seed: u64) -> Result<WineData> {
    let ds = linfa_datasets::winequality();
    let (n, d) = (ds.records.nrows(), ds.records.ncols());
    if d != FEATURES || ds.targets.len() != n || n < 10 {
        return Err(msg(format!(
            "wine data: expected {FEATURES} features and one target per sample, got {n} samples \
             of {d} features and {} targets",
            ds.targets.len()
        )));
    }
    let features: Vec<f64> = ds.records.iter().copied().collect();
    let labels = ds
        .targets
        .iter()
        .map(|&q| {
            if (MIN_QUALITY..MIN_QUALITY + CLASSES).contains(&q) {
                Ok((q - MIN_QUALITY) as u32)
            } else {
                Err(msg(format!(
                    "wine data: quality score {q} is outside {MIN_QUALITY}..={}",
                    MIN_QUALITY + CLASSES - 1
                )))
            }
        })
        .collect::<Result<Vec<u32>>>()?;

    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed).shuffle(&mut order);
    let n_test = (n as f64 * TEST_FRACTION).round() as usize;
    let (test_idx, train_idx) = order.split_at(n_test);

    let mut mean = [0f64; FEATURES];
    let mut var = [0f64; FEATURES];
    for &i in train_idx {
        for (j, m) in mean.iter_mut().enumerate() {
            *m += features[i * FEATURES + j];
        }
    }
    mean.iter_mut().for_each(|m| *m /= train_idx.len() as f64);
    for &i in train_idx {
        for (j, v) in var.iter_mut().enumerate() {
            *v += (features[i * FEATURES + j] - mean[j]).powi(2);
        }
    }
    let std: Vec<f64> = var
        .iter()
        .map(|v| (v / train_idx.len() as f64).sqrt())
        .map(|s| if s > 0.0 { s } else { 1.0 })
        .collect();

    let take = |idx: &[usize]| -> Result<(Tensor, Tensor)> {
        let mut x = Vec::with_capacity(idx.len() * FEATURES);
        for &i in idx {
            for j in 0..FEATURES {
                x.push(((features[i * FEATURES + j] - mean[j]) / std[j]) as f32);
            }
        }
        let y: Vec<u32> = idx.iter().map(|&i| labels[i]).collect();
        Ok((
            Tensor::from_vec(x, (idx.len(), FEATURES), &Device::Cpu)?,
            Tensor::from_vec(y, idx.len(), &Device::Cpu)?,
        ))
    };
    let (train_x, train_y) = take(train_idx)?;
    let (test_x, test_y) = take(test_idx)?;

    let mut counts = [0usize; CLASSES];
    train_idx
        .iter()
        .for_each(|&i| counts[labels[i] as usize] += 1);
    let majority_class = (0..CLASSES).max_by_key(|&c| counts[c]).unwrap_or(0);
    let hits = test_idx
        .iter()
        .filter(|&&i| labels[i] as usize == majority_class)
        .count();
    Ok(WineData {
        train_x,
        train_y,
        test_x,
        test_y,
        n_train: train_idx.len(),
        n_test,
        majority_class,
        majority_accuracy: hits as f32 / n_test as f32,
    })
}

/// The classifier: 11 -> 64 -> 64 -> 6 with ReLU, built from candle-nn `Linear` layers.
#[derive(Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.fc1.forward(x)?.relu()?;
        let x = self.fc2.forward(&x)?.relu()?;
        self.fc3.forward(&x)
    }
}

/// Builds the MLP in a fresh `VarMap` and sets its weights from `seed`: Glorot-uniform weights
/// and zero biases (Keras's `Dense` defaults), drawn in variable-name order, so that every run
/// with the same seed starts from the same weights.
///
/// # Errors
/// A tensor cannot be made or set.
pub fn build_model(seed: u64) -> Result<(VarMap, Mlp)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = Mlp {
        fc1: linear(FEATURES, HIDDEN, vb.pp("fc1"))?,
        fc2: linear(HIDDEN, HIDDEN, vb.pp("fc2"))?,
        fc3: linear(HIDDEN, CLASSES, vb.pp("fc3"))?,
    };
    let mut vars: Vec<(String, candle_core::Var)> = {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| msg("the VarMap's lock is poisoned".into()))?;
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rng = SplitMix64::new(seed ^ 0x1D_1A11_5EED);
    for (_, var) in vars {
        let value = match *var.dims() {
            [fan_out, fan_in] => {
                let limit = (6.0 / (fan_in + fan_out) as f64).sqrt();
                let w: Vec<f32> = (0..fan_out * fan_in)
                    .map(|_| ((2.0 * rng.next_f64() - 1.0) * limit) as f32)
                    .collect();
                Tensor::from_vec(w, (fan_out, fan_in), &Device::Cpu)?
            }
            _ => var.zeros_like()?,
        };
        var.set(&value)?;
    }
    Ok((varmap, model))
}

/// Number of trainable parameters in a `VarMap`.
pub fn parameter_count(varmap: &VarMap) -> usize {
    varmap.all_vars().iter().map(|v| v.elem_count()).sum()
}

/// Which optimizer a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// `candle_adafactor::Adafactor` with Keras defaults and the run's learning rate.
    Adafactor,
    /// `candle_nn::AdamW` with candle's defaults (weight decay 0.01) and the run's learning rate.
    AdamW,
}

/// One run: a name (for the table, the chart and the `result` lines), an optimizer and its
/// learning rate.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    /// Name shown in the output.
    pub name: String,
    /// The optimizer.
    pub kind: OptimizerKind,
    /// Its learning rate.
    pub learning_rate: f64,
}

/// The named runs: `(name, optimizer, default learning rate)`.
pub const PRESETS: [(&str, OptimizerKind, f64); 3] = [
    // Keras's default Adafactor(learning_rate=0.001).
    ("adafactor", OptimizerKind::Adafactor, 1e-3),
    // The paper's relative step: min(1e-2, 1/sqrt(t)).
    ("adafactor-paper", OptimizerKind::Adafactor, 1e-2),
    ("adamw", OptimizerKind::AdamW, 1e-3),
];

impl RunSpec {
    /// Parses `NAME` or `NAME@LR`, where NAME is `adafactor` (lr 1e-3), `adafactor-paper`
    /// (lr 1e-2) or `adamw` (lr 1e-3); `@LR` sets another learning rate, and the run is then
    /// named as written.
    ///
    /// # Errors
    /// An unknown name, or a learning rate that is not a positive finite number.
    pub fn parse(text: &str) -> std::result::Result<RunSpec, String> {
        let (base, lr) = match text.split_once('@') {
            Some((base, lr)) => (base, Some(lr)),
            None => (text, None),
        };
        let (_, kind, default_lr) = PRESETS
            .iter()
            .find(|(name, _, _)| *name == base)
            .ok_or_else(|| {
                format!(
                    "unknown optimizer `{base}` in `{text}`; expected one of {}",
                    PRESETS.map(|p| p.0).join(", ")
                )
            })?;
        let learning_rate = match lr {
            Some(lr) => parse_learning_rate(lr).map_err(|e| format!("in `{text}`: {e}"))?,
            None => *default_lr,
        };
        Ok(RunSpec {
            name: text.to_string(),
            kind: *kind,
            learning_rate,
        })
    }
}

/// Parses a learning rate: a positive finite number.
///
/// # Errors
/// Not a number, not finite, or not positive.
pub fn parse_learning_rate(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(lr) if lr.is_finite() && lr > 0.0 => Ok(lr),
        _ => Err(format!(
            "learning rate `{text}` is not a positive finite number"
        )),
    }
}

/// The three runs of the example: Adafactor with Keras defaults, Adafactor with the paper's
/// step, AdamW.
pub fn default_runs() -> Vec<RunSpec> {
    PRESETS
        .iter()
        .map(|&(name, kind, learning_rate)| RunSpec {
            name: name.to_string(),
            kind,
            learning_rate,
        })
        .collect()
}

/// Training length, batch size and seed (the same for every run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainConfig {
    /// Passes over the training set.
    pub epochs: usize,
    /// Samples per mini-batch (the last batch of an epoch may be smaller).
    pub batch_size: usize,
    /// Seed of the split, the initial weights and the batch order.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 60,
            batch_size: 32,
            seed: 42,
        }
    }
}

/// The model's state after an epoch (epoch 0: before training).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Completed epochs.
    pub epoch: usize,
    /// Completed optimizer steps.
    pub step: usize,
    /// Mean cross-entropy over the whole training set.
    pub train_loss: f32,
    /// Accuracy on the test set.
    pub test_accuracy: f32,
}

/// The outcome of one run.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The run.
    pub spec: RunSpec,
    /// One point per epoch, starting with epoch 0.
    pub history: Vec<Point>,
    /// Optimizer state in bytes.
    pub state_bytes: usize,
    /// Wall time of the run (training and per-epoch evaluation).
    pub seconds: f64,
}

impl RunResult {
    /// The point after the last epoch.
    pub fn last(&self) -> Point {
        self.history.last().copied().unwrap_or(Point {
            epoch: 0,
            step: 0,
            train_loss: f32::NAN,
            test_accuracy: f32::NAN,
        })
    }
}

/// Either optimizer behind one interface (Adafactor boxed: it is the larger).
enum AnyOptimizer {
    Adafactor(Box<Adafactor>),
    AdamW(candle_nn::AdamW),
}

impl AnyOptimizer {
    fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        match self {
            AnyOptimizer::Adafactor(o) => o.backward_step(loss),
            AnyOptimizer::AdamW(o) => o.backward_step(loss),
        }
    }
}

/// Mean cross-entropy and accuracy of the model on `(x, y)`.
pub fn evaluate(model: &Mlp, x: &Tensor, y: &Tensor) -> Result<(f32, f32)> {
    let logits = model.forward(x)?.detach();
    let loss = candle_nn::loss::cross_entropy(&logits, y)?.to_scalar::<f32>()?;
    let hits = logits
        .argmax(D::Minus1)?
        .eq(y)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok((loss, hits / y.dim(0)? as f32))
}

/// The training loss and test accuracy of the model after `epoch` epochs (`step` steps).
///
/// # Errors
/// A failed tensor operation.
pub fn measure_point(model: &Mlp, data: &WineData, epoch: usize, step: usize) -> Result<Point> {
    let (train_loss, _) = evaluate(model, &data.train_x, &data.train_y)?;
    let (_, test_accuracy) = evaluate(model, &data.test_x, &data.test_y)?;
    Ok(Point {
        epoch,
        step,
        train_loss,
        test_accuracy,
    })
}

/// Trains a freshly initialised model (same weights for every run with `cfg.seed`) with one
/// optimizer, in mini-batches whose order depends on `cfg.seed` and the epoch only. After each
/// epoch (and once before training) it evaluates the training loss and the test accuracy and
/// calls `on_point`.
///
/// # Errors
/// A zero batch size or epoch count, an optimizer that rejects its configuration, or a failed
/// tensor operation.
pub fn train_run(
    data: &WineData,
    spec: &RunSpec,
    cfg: &TrainConfig,
    on_point: &mut dyn FnMut(&Point),
) -> Result<RunResult> {
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(msg(format!(
            "batch size ({}) and epochs ({}) must be at least 1",
            cfg.batch_size, cfg.epochs
        )));
    }
    let start = Instant::now();
    let (varmap, model) = build_model(cfg.seed)?;
    let (mut opt, state_bytes) = match spec.kind {
        OptimizerKind::Adafactor => {
            let opt = Adafactor::from_varmap(
                &varmap,
                AdafactorConfig::with_learning_rate(spec.learning_rate),
            )?;
            let bytes = opt.state_bytes();
            (AnyOptimizer::Adafactor(Box::new(opt)), bytes)
        }
        OptimizerKind::AdamW => {
            let params = ParamsAdamW {
                lr: spec.learning_rate,
                ..ParamsAdamW::default()
            };
            let opt = candle_nn::AdamW::new(varmap.all_vars(), params)?;
            // First and second moments: two float32 buffers per parameter.
            (AnyOptimizer::AdamW(opt), 2 * 4 * parameter_count(&varmap))
        }
    };

    let mut history = Vec::with_capacity(cfg.epochs + 1);
    let mut record = |epoch: usize, step: usize, history: &mut Vec<Point>| -> Result<()> {
        let point = measure_point(&model, data, epoch, step)?;
        on_point(&point);
        history.push(point);
        Ok(())
    };
    record(0, 0, &mut history)?;

    let mut order: Vec<u32> = (0..data.n_train as u32).collect();
    let mut step = 0;
    for epoch in 1..=cfg.epochs {
        SplitMix64::new(cfg.seed ^ (0xBA7C_4000 + epoch as u64)).shuffle(&mut order);
        for batch in order.chunks(cfg.batch_size) {
            let idx = Tensor::from_slice(batch, batch.len(), &Device::Cpu)?;
            let x = data.train_x.index_select(&idx, 0)?;
            let y = data.train_y.index_select(&idx, 0)?;
            let loss = candle_nn::loss::cross_entropy(&model.forward(&x)?, &y)?;
            opt.backward_step(&loss)?;
            step += 1;
        }
        record(epoch, step, &mut history)?;
    }
    Ok(RunResult {
        spec: spec.clone(),
        history,
        state_bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}
