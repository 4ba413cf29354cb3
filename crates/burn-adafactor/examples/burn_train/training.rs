//! The `train` example's training loop, shared with `tests/train_example.rs`: the three runs
//! (Keras-exact Adafactor from this crate, burn's own Adafactor, burn's AdamW), one training
//! run of the GPT, and its evaluation.

use crate::corpus::{Corpus, consecutive_starts, random_starts, windows};
use crate::model::{Gpt, GptConfig, int_tensor};
use crate::rng::SplitMix64;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{
    AdafactorConfig as BurnAdafactorConfig, AdamWConfig, GradientsParams, ModuleOptimizer,
};
use burn::tensor::{Device, Tensor};
use burn_adafactor::{Adafactor, AdafactorConfig, LearningRateSchedule};
use std::error::Error;
use std::time::Instant;

/// Errors of this example.
pub type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Which optimizer a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// This crate's module-level `Adafactor` as the candle example's `adafactor` run: the peak
    /// learning rate of a Keras `CosineDecay` with warm-up, `global_clipnorm` 1.0.
    KerasAdafactor,
    /// burn's own `AdafactorConfig::new()` (its defaults: relative step `min(lr, 1/sqrt(t))`
    /// times RMS(w), no clipping), given the same schedule's value as `lr` at every step.
    BurnAdafactor,
    /// burn's `AdamW` as nanoGPT sets it up: betas (0.9, 0.99), epsilon 1e-8, weight decay 0.1
    /// on matrices only, the same schedule, gradients clipped to global norm 1.0 here (burn
    /// clips per tensor only).
    BurnAdamW,
}

/// The runs: `(name, kind, peak learning rate)`.
pub const RUNS: [(&str, RunKind, f64); 3] = [
    ("keras-adafactor", RunKind::KerasAdafactor, 1e-2),
    ("burn-adafactor", RunKind::BurnAdafactor, 1e-2),
    ("burn-adamw", RunKind::BurnAdamW, 1e-3),
];

/// The run named `name`.
///
/// # Errors
/// An unknown name.
pub fn run_named(name: &str) -> Result<(&'static str, RunKind, f64)> {
    RUNS.iter().copied().find(|r| r.0 == name).ok_or_else(|| {
        let names: Vec<&str> = RUNS.iter().map(|r| r.0).collect();
        format!("unknown run `{name}` (runs: {})", names.join(", ")).into()
    })
}

/// Everything about a run but the optimizer (the same for every run).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainConfig {
    /// The model's shape.
    pub model: GptConfig,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Optimizer steps.
    pub iterations: usize,
    /// Linear warm-up steps of the schedule.
    pub warmup: usize,
    /// The schedule's floor as a fraction of its peak.
    pub min_lr_fraction: f64,
    /// Validation loss (on `eval_batches` random batches) every this many steps.
    pub eval_interval: usize,
    /// Random validation batches per intermediate evaluation (the final evaluation reads the
    /// whole validation split).
    pub eval_batches: usize,
    /// Seed of the initial weights and the batches.
    pub seed: u64,
}

impl TrainConfig {
    /// nanoGPT's published CPU setup (4 layers, 4 heads, 128 wide, context 64, batch 12, 2000
    /// steps, 100 warm-up steps, cosine decay to a tenth), as in the candle example.
    pub fn reference(vocab_size: usize) -> Self {
        TrainConfig {
            model: GptConfig::reference(vocab_size),
            batch_size: 12,
            iterations: 2000,
            warmup: 100,
            min_lr_fraction: 0.1,
            eval_interval: 100,
            eval_batches: 20,
            seed: 1337,
        }
    }

    /// The default quick run: the reference model and schedule shape, fewer steps.
    pub fn quick(vocab_size: usize) -> Self {
        TrainConfig {
            iterations: QUICK_ITERATIONS,
            ..Self::reference(vocab_size)
        }
    }

    /// A model and run small enough for tests: 1 layer, 2 heads, width 32, context 16, batch 8,
    /// 5 warm-up steps.
    #[allow(dead_code)] // the example's test uses it
    pub fn tiny(vocab_size: usize, iterations: usize) -> Self {
        TrainConfig {
            model: GptConfig {
                vocab_size,
                context: 16,
                layers: 1,
                heads: 2,
                width: 32,
            },
            batch_size: 8,
            iterations,
            warmup: 5,
            min_lr_fraction: 0.1,
            eval_interval: 10,
            eval_batches: 2,
            seed: 7,
        }
    }

    /// Warm-up from 0 to `peak` over `warmup` steps, then cosine decay to
    /// `min_lr_fraction * peak` at the last step (Keras `CosineDecay` with `warmup_target`).
    ///
    /// # Errors
    /// No steps after the warm-up, or a schedule Keras would reject.
    pub fn schedule(&self, peak: f64) -> Result<LearningRateSchedule> {
        if self.iterations <= self.warmup {
            return Err(format!(
                "{} steps leave no room after {} warm-up steps",
                self.iterations, self.warmup
            )
            .into());
        }
        Ok(LearningRateSchedule::cosine_decay(
            0.0,
            (self.iterations - self.warmup) as f64,
            self.min_lr_fraction,
            Some(peak),
            self.warmup as f64,
        )?)
    }
}

/// Steps of the default quick run.
pub const QUICK_ITERATIONS: usize = 300;

/// The parameters of a model by rank (this GPT has matrices and vectors only).
#[derive(Default)]
pub struct ParamIds {
    /// `(path, id)` of every vector.
    pub vectors: Vec<(String, ParamId)>,
    /// `(path, id)` of every matrix.
    pub matrices: Vec<(String, ParamId)>,
    /// Parameters of another rank.
    pub other: Vec<String>,
    path: Vec<String>,
}

impl ModuleVisitor for ParamIds {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let entry = (self.path.join("."), param.id);
        match D {
            1 => self.vectors.push(entry),
            2 => self.matrices.push(entry),
            _ => self.other.push(entry.0),
        }
    }
}

impl ParamIds {
    /// The parameters of `model`.
    ///
    /// # Errors
    /// A parameter that is neither a vector nor a matrix.
    pub fn of<M: Module>(model: &M) -> Result<Self> {
        let mut ids = ParamIds::default();
        model.visit(&mut ids);
        if !ids.other.is_empty() {
            return Err(format!("parameters of rank > 2: {}", ids.other.join(", ")).into());
        }
        Ok(ids)
    }

    /// Sum of squares of every gradient in `grads` (one host read).
    fn squared_norm(&self, grads: &GradientsParams) -> Option<f32> {
        let vectors = self
            .vectors
            .iter()
            .filter_map(|(_, id)| grads.get::<1>(*id));
        let matrices = self
            .matrices
            .iter()
            .filter_map(|(_, id)| grads.get::<2>(*id));
        vectors
            .map(|g| g.square().sum())
            .chain(matrices.map(|g| g.square().sum()))
            .reduce(|a, b| a + b)
            .map(|s| s.into_scalar::<f32>())
    }

    /// nanoGPT's gradient clipping (`torch.nn.utils.clip_grad_norm_`): every gradient scaled
    /// by `max_norm / (norm + 1e-6)` when the global L2 norm exceeds `max_norm`.
    fn clip_global_norm(&self, mut grads: GradientsParams, max_norm: f32) -> GradientsParams {
        let norm = self.squared_norm(&grads).unwrap_or(0.0).sqrt();
        if norm <= max_norm {
            return grads;
        }
        let scale = f64::from(max_norm / (norm + 1e-6));
        for (_, id) in &self.vectors {
            if let Some(g) = grads.remove::<1>(*id) {
                grads.register(*id, g.mul_scalar(scale));
            }
        }
        for (_, id) in &self.matrices {
            if let Some(g) = grads.remove::<2>(*id) {
                grads.register(*id, g.mul_scalar(scale));
            }
        }
        grads
    }

    /// Moves the vectors' gradients out of `grads` into a set of their own.
    fn take_vectors(&self, grads: &mut GradientsParams) -> GradientsParams {
        let mut taken = GradientsParams::new();
        for (_, id) in &self.vectors {
            if let Some(g) = grads.remove::<1>(*id) {
                taken.register(*id, g);
            }
        }
        taken
    }

    /// The paths of the parameters that `grads` leaves without a gradient or with an all-zero
    /// one.
    pub fn without_gradient(&self, grads: &GradientsParams) -> Vec<String> {
        let live1 = |id: ParamId| {
            grads
                .get::<1>(id)
                .map(|g| g.abs().sum().into_scalar::<f32>())
        };
        let live2 = |id: ParamId| {
            grads
                .get::<2>(id)
                .map(|g| g.abs().sum().into_scalar::<f32>())
        };
        let vectors = self.vectors.iter().map(|(p, id)| (p, live1(*id)));
        let matrices = self.matrices.iter().map(|(p, id)| (p, live2(*id)));
        vectors
            .chain(matrices)
            .filter(|(_, s)| !s.is_some_and(|s| s > 0.0))
            .map(|(p, _)| p.clone())
            .collect()
    }
}

/// The optimizers behind one interface.
enum RunOptimizer {
    Keras(Box<Adafactor>),
    BurnAdafactor {
        opt: ModuleOptimizer,
        schedule: LearningRateSchedule,
    },
    BurnAdamW {
        /// Matrices and embeddings (weight decay 0.1).
        decayed: ModuleOptimizer,
        /// Layer-norm weights (no weight decay).
        plain: ModuleOptimizer,
        schedule: LearningRateSchedule,
        ids: ParamIds,
    },
}

impl RunOptimizer {
    fn new(kind: RunKind, peak: f64, cfg: &TrainConfig, model: &Gpt) -> Result<Self> {
        let schedule = cfg.schedule(peak)?;
        Ok(match kind {
            RunKind::KerasAdafactor => {
                let mut opt = Adafactor::new(keras_adafactor_config(peak, cfg)?)?;
                // Its state exists from the start, so that its size can be reported.
                opt.build(model)?;
                RunOptimizer::Keras(Box::new(opt))
            }
            RunKind::BurnAdafactor => RunOptimizer::BurnAdafactor {
                opt: BurnAdafactorConfig::new().init(),
                schedule,
            },
            RunKind::BurnAdamW => {
                let adamw = |weight_decay| {
                    AdamWConfig::new()
                        .with_beta_1(0.9)
                        .with_beta_2(0.99)
                        .with_epsilon(1e-8)
                        .with_weight_decay(weight_decay)
                        .init()
                };
                RunOptimizer::BurnAdamW {
                    decayed: adamw(0.1),
                    plain: adamw(0.0),
                    schedule,
                    ids: ParamIds::of(model)?,
                }
            }
        })
    }

    /// Step `step` (0-based) with this step's gradients.
    fn step(&mut self, model: Gpt, mut grads: GradientsParams, step: u64) -> Result<Gpt> {
        match self {
            RunOptimizer::Keras(o) => o.step(model, grads).map_err(|e| e.error.into()),
            RunOptimizer::BurnAdafactor { opt, schedule } => {
                Ok(opt.step(f64::from(schedule.value(step)), model, grads))
            }
            RunOptimizer::BurnAdamW {
                decayed,
                plain,
                schedule,
                ids,
            } => {
                let lr = f64::from(schedule.value(step));
                grads = ids.clip_global_norm(grads, 1.0);
                let vectors = ids.take_vectors(&mut grads);
                let model = decayed.step(lr, model, grads);
                Ok(plain.step(lr, model, vectors))
            }
        }
    }

    /// Bytes of optimizer state: this crate's own count for Keras's Adafactor; for burn's
    /// optimizers what their state layout holds in f32 (Adafactor: a row and a column
    /// statistic per matrix, a full second moment per vector; AdamW: two moments).
    fn state_bytes(&self, model: &Gpt) -> usize {
        match self {
            RunOptimizer::Keras(o) => o.state_bytes(),
            RunOptimizer::BurnAdafactor { .. } => 4 * burn_adafactor_state_floats(model),
            RunOptimizer::BurnAdamW { .. } => 2 * 4 * model.num_params(),
        }
    }
}

/// The Keras-exact Adafactor of the `keras-adafactor` run (the candle example's `adafactor`).
///
/// # Errors
/// A schedule Keras would reject.
pub fn keras_adafactor_config(peak: f64, cfg: &TrainConfig) -> Result<AdafactorConfig> {
    Ok(AdafactorConfig {
        learning_rate: cfg.schedule(peak)?.into(),
        global_clipnorm: Some(1.0),
        ..AdafactorConfig::default()
    })
}

/// f32 values of burn's Adafactor state for `model`: rows + columns per matrix, the whole
/// vector per vector.
fn burn_adafactor_state_floats(model: &Gpt) -> usize {
    struct Count(usize);
    impl ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let dims = param.val().dims();
            self.0 += match D {
                0 | 1 => dims.iter().product(),
                _ => {
                    let lead: usize = dims[..D - 2].iter().product();
                    lead * (dims[D - 2] + dims[D - 1])
                }
            };
        }
    }
    let mut count = Count(0);
    model.visit(&mut count);
    count.0
}

/// Mean loss over batches of up to `batch_size` windows starting at `starts`, on the model
/// without autodiff.
fn mean_loss(model: &Gpt, tokens: &[u32], starts: &[usize], batch_size: usize) -> Result<f32> {
    let context = model.context();
    let model = model.valid();
    let device = Device::flex();
    let mut total = 0f64;
    for chunk in starts.chunks(batch_size.max(1)) {
        let (x, y) = windows(tokens, chunk, context)?;
        let x = int_tensor(x, chunk.len(), context, &device);
        let y = int_tensor(y, chunk.len(), context, &device);
        let loss = model.loss(x, y).into_scalar::<f32>();
        total += f64::from(loss) * chunk.len() as f64;
    }
    Ok((total / starts.len().max(1) as f64) as f32)
}

/// Validation loss on `cfg.eval_batches` random batches drawn from `seed`.
///
/// # Errors
/// A validation split no longer than the context.
pub fn estimate_val_loss(
    model: &Gpt,
    corpus: &Corpus,
    cfg: &TrainConfig,
    seed: u64,
) -> Result<f32> {
    let mut rng = SplitMix64::new(seed);
    let n = cfg.eval_batches * cfg.batch_size;
    let starts = random_starts(corpus.val.len(), n, cfg.model.context, &mut rng)?;
    mean_loss(model, &corpus.val, &starts, 4 * cfg.batch_size)
}

/// Validation loss on the whole validation split, cut into consecutive windows of the model's
/// context (as the candle example's final evaluation).
///
/// # Errors
/// A failed window.
pub fn full_val_loss(model: &Gpt, corpus: &Corpus) -> Result<f32> {
    let starts = consecutive_starts(corpus.val.len(), model.context());
    mean_loss(model, &corpus.val, &starts, 64)
}

/// The outcome of one run.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The run's name.
    pub name: String,
    /// Its peak learning rate.
    pub learning_rate: f64,
    /// `(step, validation loss)` at step 0, every `eval_interval` steps and after the last.
    #[allow(dead_code)] // the example's test reads it
    pub val_curve: Vec<(usize, f32)>,
    /// Validation loss on the whole validation split after training.
    pub val_loss: f32,
    /// Mean training loss of the last `eval_interval` steps.
    pub train_loss: f32,
    /// Optimizer state in bytes.
    pub state_bytes: usize,
    /// Trainable parameters.
    pub params: usize,
    /// Wall time of the run (training and evaluations).
    pub seconds: f64,
    /// Wall time of the training steps alone.
    pub train_seconds: f64,
    /// Of which in the optimizer (clipping included).
    pub optimizer_seconds: f64,
    /// Training tokens per second of training time.
    pub tokens_per_s: f64,
}

impl RunResult {
    /// The machine-readable summary line, in the candle example's format: `result
    /// optimizer=NAME val_loss=.. train_loss=.. state_bytes=.. params=.. tokens_per_s=..
    /// seconds=..`.
    pub fn result_line(&self) -> String {
        format!(
            "result optimizer={} val_loss={:.4} train_loss={:.4} state_bytes={} params={} \
             tokens_per_s={:.0} seconds={:.2}",
            self.name,
            self.val_loss,
            self.train_loss,
            self.state_bytes,
            self.params,
            self.tokens_per_s,
            self.seconds
        )
    }
}

/// Trains a freshly initialised GPT (the same weights for every run with `cfg.seed`) with run
/// `name` on the same sequence of random training batches, evaluates it every `eval_interval`
/// steps and on the whole validation split at the end. Calls `on_eval(step, train, val)` at
/// every evaluation.
///
/// # Errors
/// An unknown run, a bad configuration, a corpus part no longer than the context, a parameter
/// without gradient in the first step, a non-finite training loss, or a refused step.
pub fn train_run(
    corpus: &Corpus,
    name: &str,
    cfg: &TrainConfig,
    on_eval: &mut dyn FnMut(usize, f32, f32),
) -> Result<RunResult> {
    let (name, kind, peak) = run_named(name)?;
    if cfg.batch_size == 0 || cfg.eval_interval == 0 || cfg.eval_batches == 0 {
        return Err("the batch size, eval interval and eval batches must be at least 1".into());
    }
    let start = Instant::now();
    let device = Device::flex().autodiff();
    let mut model = Gpt::new(cfg.model, cfg.seed, &device)?;
    let ids = ParamIds::of(&model)?;
    let params = model.num_params();
    let mut opt = RunOptimizer::new(kind, peak, cfg, &model)?;
    let state_bytes = opt.state_bytes(&model);

    let eval_seed = |step: usize| cfg.seed ^ 0xE7A1_0000 ^ step as u64;
    let first = estimate_val_loss(&model, corpus, cfg, eval_seed(0))?;
    on_eval(0, f32::NAN, first);
    let mut val_curve = vec![(0, first)];
    let mut batch_rng = SplitMix64::new(cfg.seed ^ 0xBA7C_4000);
    let (mut train_seconds, mut optimizer_seconds) = (0f64, 0f64);
    let (mut losses, mut train_loss) = (Vec::with_capacity(cfg.eval_interval), f32::NAN);
    for iteration in 1..=cfg.iterations {
        let t0 = Instant::now();
        let (b, t) = (cfg.batch_size, cfg.model.context);
        let starts = random_starts(corpus.train.len(), b, t, &mut batch_rng)?;
        let (x, y) = windows(&corpus.train, &starts, t)?;
        let loss = model.loss(int_tensor(x, b, t, &device), int_tensor(y, b, t, &device));
        let value = loss.clone().into_scalar::<f32>();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        if iteration == 1 {
            let missing = ids.without_gradient(&grads);
            if !missing.is_empty() {
                return Err(format!("no gradient reaches {}", missing.join(", ")).into());
            }
        }
        let t1 = Instant::now();
        model = opt.step(model, grads, iteration as u64 - 1)?;
        optimizer_seconds += t1.elapsed().as_secs_f64();
        train_seconds += t0.elapsed().as_secs_f64();
        if !value.is_finite() {
            return Err(
                format!("run `{name}`: the training loss is {value} at step {iteration}").into(),
            );
        }
        losses.push(value);
        if iteration % cfg.eval_interval == 0 || iteration == cfg.iterations {
            train_loss = losses.iter().sum::<f32>() / losses.len() as f32;
            losses.clear();
            let v = if iteration == cfg.iterations {
                full_val_loss(&model, corpus)?
            } else {
                estimate_val_loss(&model, corpus, cfg, eval_seed(iteration))?
            };
            val_curve.push((iteration, v));
            on_eval(iteration, train_loss, v);
        }
    }
    let val_loss = val_curve.last().map_or(f32::NAN, |p| p.1);
    let tokens = (cfg.iterations * cfg.batch_size * cfg.model.context) as f64;
    Ok(RunResult {
        name: name.to_string(),
        learning_rate: peak,
        val_curve,
        val_loss,
        train_loss,
        state_bytes,
        params,
        seconds: start.elapsed().as_secs_f64(),
        train_seconds,
        optimizer_seconds,
        tokens_per_s: tokens / train_seconds.max(1e-9),
    })
}
