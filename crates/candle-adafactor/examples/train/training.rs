//! The `train` example's training loop, shared with `tests/train_example.rs`: the runs (which
//! optimizer, which learning-rate schedule), one training run of the GPT, its evaluation and a
//! generated sample.

use crate::data::{batch_at, consecutive_starts, random_batch, Corpus};
use crate::model::{build_gpt, named_vars, Gpt, GptConfig};
use crate::options::Preset;
use crate::rng::SplitMix64;
use candle_adafactor::{Adafactor, AdafactorConfig, LearningRateSchedule};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use std::time::Instant;

fn msg(text: String) -> candle_core::Error {
    candle_core::Error::Msg(text)
}

/// Which optimizer a run uses, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// Adafactor with the run's learning rate as the peak of a Keras `CosineDecay` schedule with
    /// linear warm-up, and `global_clipnorm` 1.0.
    Adafactor,
    /// Adafactor with Keras's defaults: a constant learning rate, no clipping.
    AdafactorKerasDefault,
    /// candle-nn's `AdamW` as nanoGPT sets it up: betas (0.9, 0.99), weight decay 0.1 on
    /// matrices only, the same warm-up and cosine schedule, gradients clipped to global norm 1.0.
    AdamW,
}

/// One run of this example.
pub type RunSpec = crate::options::RunSpec<OptimizerKind>;

/// The named runs: `(name, optimizer, default learning rate)`.
pub const PRESETS: [Preset<OptimizerKind>; 3] = [
    // The paper's step-size cap 1e-2 as the schedule's peak.
    ("adafactor", OptimizerKind::Adafactor, 1e-2),
    // nanoGPT's shakespeare_char setting.
    ("adamw", OptimizerKind::AdamW, 1e-3),
    // keras.optimizers.Adafactor() as it comes.
    (
        "adafactor-keras-default",
        OptimizerKind::AdafactorKerasDefault,
        1e-3,
    ),
];

/// Everything about a run but the optimizer (the same for every run).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainConfig {
    /// The model's shape.
    pub model: GptConfig,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Optimizer steps.
    pub iterations: usize,
    /// Linear warm-up steps of the scheduled runs.
    pub warmup: usize,
    /// The schedule's floor as a fraction of its peak.
    pub min_lr_fraction: f64,
    /// Validation loss every this many steps (and after the last).
    pub eval_interval: usize,
    /// Random validation batches per intermediate evaluation (the final one reads the whole
    /// validation split).
    pub eval_batches: usize,
    /// Characters generated after training.
    pub sample_chars: usize,
    /// Seed of the initial weights, the batches and the sample.
    pub seed: u64,
}

impl TrainConfig {
    /// nanoGPT's published CPU setup (4 layers, 4 heads, 128 wide, context 64, batch 12, 2000
    /// steps, 100 warm-up steps, cosine decay to a tenth) with evaluations every 100 steps.
    pub fn reference(vocab_size: usize) -> Self {
        TrainConfig {
            model: GptConfig::reference(vocab_size),
            batch_size: 12,
            iterations: 2000,
            warmup: 100,
            min_lr_fraction: 0.1,
            eval_interval: 100,
            eval_batches: 20,
            sample_chars: 300,
            seed: 1337,
        }
    }

    /// The default quick run: the reference model and schedule shape, fewer steps.
    pub fn quick(vocab_size: usize) -> Self {
        TrainConfig {
            iterations: 400,
            ..Self::reference(vocab_size)
        }
    }

    /// A model and run small enough for tests: 1 layer, 2 heads, width 32, context 16, batch 8,
    /// 5 warm-up steps, an evaluation every 20 steps.
    #[allow(dead_code)] // the examples' tests use it
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
            eval_interval: 20,
            eval_batches: 2,
            sample_chars: 40,
            seed: 7,
        }
    }

    /// Tokens per optimizer step.
    pub fn tokens_per_step(&self) -> usize {
        self.batch_size * self.model.context
    }

    /// Warm-up from 0 to `peak` over `warmup` steps, then cosine decay to
    /// `min_lr_fraction * peak` at the last step (Keras `CosineDecay` with `warmup_target`).
    ///
    /// # Errors
    /// Fewer steps than warm-up steps, or a schedule Keras would reject.
    pub fn schedule(&self, peak: f64) -> Result<LearningRateSchedule> {
        if self.iterations <= self.warmup {
            return Err(msg(format!(
                "{} iterations leave no room after {} warm-up steps",
                self.iterations, self.warmup
            )));
        }
        LearningRateSchedule::cosine_decay(
            0.0,
            (self.iterations - self.warmup) as f64,
            self.min_lr_fraction,
            Some(peak),
            self.warmup as f64,
        )
        .map_err(|e| msg(format!("learning-rate schedule: {e}")))
    }
}

/// The optimizers behind one interface; `step` applies this step's gradients.
// One value per run, so the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
enum RunOptimizer {
    Adafactor(Adafactor),
    AdamW {
        /// Matrices and embeddings (weight decay 0.1).
        decayed: candle_nn::AdamW,
        /// Layer-norm weights (no weight decay).
        plain: candle_nn::AdamW,
        schedule: LearningRateSchedule,
        step: u64,
    },
}

/// nanoGPT's gradient clipping: scale every gradient by `max_norm / norm` when the global L2
/// norm exceeds `max_norm`.
fn clip_global_norm(grads: &GradStore, vars: &[Var], max_norm: f64) -> Result<GradStore> {
    let mut sum = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v) {
            sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sum.sqrt();
    let mut clipped = GradStore::default();
    let scale = if norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    };
    for v in vars {
        if let Some(g) = grads.get(v) {
            clipped.insert(v, (g * scale)?);
        }
    }
    Ok(clipped)
}

/// The Adafactor configuration of an Adafactor run (`None` for AdamW).
///
/// # Errors
/// A schedule Keras would reject.
pub fn adafactor_config(spec: &RunSpec, cfg: &TrainConfig) -> Result<Option<AdafactorConfig>> {
    Ok(match spec.kind {
        OptimizerKind::Adafactor => Some(AdafactorConfig {
            learning_rate: cfg.schedule(spec.learning_rate)?.into(),
            global_clipnorm: Some(1.0),
            ..AdafactorConfig::default()
        }),
        OptimizerKind::AdafactorKerasDefault => {
            Some(AdafactorConfig::with_learning_rate(spec.learning_rate))
        }
        OptimizerKind::AdamW => None,
    })
}

/// What the training loop asks of an optimizer.
pub trait Stepper {
    /// One update from this step's gradients (clipping and the schedule included).
    ///
    /// # Errors
    /// The optimizer refuses the step.
    fn step(&mut self, grads: &GradStore, vars: &[(String, Var)]) -> Result<()>;

    /// Bytes of optimizer state this process keeps for a model of `params` parameters.
    fn state_bytes(&self, params: usize) -> usize;
}

impl RunOptimizer {
    fn new(spec: &RunSpec, vars: &[(String, Var)], cfg: &TrainConfig) -> Result<Self> {
        match spec.kind {
            OptimizerKind::Adafactor | OptimizerKind::AdafactorKerasDefault => {
                let config = adafactor_config(spec, cfg)?
                    .ok_or_else(|| msg(format!("run `{}` is not an Adafactor run", spec.name)))?;
                let opt = Adafactor::new_named(vars.to_vec(), config)?;
                Ok(RunOptimizer::Adafactor(opt))
            }
            OptimizerKind::AdamW => {
                let (matrices, vectors): (Vec<Var>, Vec<Var>) = vars
                    .iter()
                    .map(|(_, v)| v.clone())
                    .partition(|v| v.rank() >= 2);
                let params = |weight_decay| ParamsAdamW {
                    lr: 0.0,
                    beta1: 0.9,
                    beta2: 0.99,
                    eps: 1e-8,
                    weight_decay,
                };
                Ok(RunOptimizer::AdamW {
                    decayed: candle_nn::AdamW::new(matrices, params(0.1))?,
                    plain: candle_nn::AdamW::new(vectors, params(0.0))?,
                    schedule: cfg.schedule(spec.learning_rate)?,
                    step: 0,
                })
            }
        }
    }
}

impl Stepper for RunOptimizer {
    fn state_bytes(&self, params: usize) -> usize {
        match self {
            RunOptimizer::Adafactor(o) => o.state_bytes(),
            // First and second moments: two float32 buffers per parameter.
            RunOptimizer::AdamW { .. } => 2 * 4 * params,
        }
    }

    fn step(&mut self, grads: &GradStore, vars: &[(String, Var)]) -> Result<()> {
        match self {
            RunOptimizer::Adafactor(o) => {
                let pairs: Vec<(Option<&Tensor>, &Var)> =
                    vars.iter().map(|(_, v)| (grads.get(v), v)).collect();
                o.apply_gradients(&pairs).map(|_| ())
            }
            RunOptimizer::AdamW {
                decayed,
                plain,
                schedule,
                step,
            } => {
                let all: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
                let clipped = clip_global_norm(grads, &all, 1.0)?;
                let lr = schedule.value(*step) as f64;
                decayed.set_learning_rate(lr);
                plain.set_learning_rate(lr);
                decayed.step(&clipped)?;
                plain.step(&clipped)?;
                *step += 1;
                Ok(())
            }
        }
    }
}

/// Bytes of optimizer state that run `spec` keeps for the model of `cfg`.
///
/// # Errors
/// A bad configuration.
#[allow(dead_code)] // The example reports the bytes of the runs it trains; the tests use this.
pub fn optimizer_state_bytes(spec: &RunSpec, cfg: &TrainConfig) -> Result<usize> {
    let (varmap, _) = build_gpt(cfg.model, cfg.seed)?;
    let vars = named_vars(&varmap)?;
    let params = vars.iter().map(|(_, v)| v.elem_count()).sum();
    Ok(RunOptimizer::new(spec, &vars, cfg)?.state_bytes(params))
}

/// The names of the variables that `grads` leaves without a gradient or with an all-zero one.
///
/// # Errors
/// A failed tensor operation.
pub fn weights_without_gradient(vars: &[(String, Var)], grads: &GradStore) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for (name, var) in vars {
        let live = match grads.get(var) {
            Some(g) => g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
            None => false,
        };
        if !live {
            missing.push(name.clone());
        }
    }
    Ok(missing)
}

/// Mean loss over `batch_size`-sequence batches of the windows starting at `starts`.
fn mean_loss(model: &Gpt, tokens: &[u32], starts: &[usize], batch_size: usize) -> Result<f32> {
    let context = model.config().context;
    let mut total = 0f64;
    for chunk in starts.chunks(batch_size.max(1)) {
        let b = batch_at(tokens, chunk, context)?;
        let loss = model.loss(&b.x, &b.y)?.to_scalar::<f32>()?;
        total += loss as f64 * chunk.len() as f64;
    }
    Ok((total / starts.len().max(1) as f64) as f32)
}

/// Validation loss on `batches` random batches drawn from `seed` (the same windows for every
/// run at the same step).
///
/// # Errors
/// A failed tensor operation.
pub fn estimate_val_loss(
    model: &Gpt,
    corpus: &Corpus,
    cfg: &TrainConfig,
    seed: u64,
) -> Result<f32> {
    let context = cfg.model.context;
    let mut rng = SplitMix64::new(seed);
    let span = corpus.val.len() - context;
    let starts: Vec<usize> = (0..cfg.eval_batches * cfg.batch_size)
        .map(|_| rng.below(span))
        .collect();
    mean_loss(model, &corpus.val, &starts, 4 * cfg.batch_size)
}

/// Validation loss on the whole validation split, cut into consecutive windows of the model's
/// context (every character but the first of each window is predicted once).
///
/// # Errors
/// A failed tensor operation.
pub fn full_val_loss(model: &Gpt, corpus: &Corpus) -> Result<f32> {
    let context = model.config().context;
    let starts = consecutive_starts(corpus.val.len(), context);
    mean_loss(model, &corpus.val, &starts, 64)
}

/// Progress of a run, reported after every step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tick {
    /// Completed steps.
    pub iteration: usize,
    /// Mean training loss of the steps since the last evaluation.
    pub train_loss: f32,
    /// Validation loss, at evaluation steps only.
    pub val_loss: Option<f32>,
}

/// The outcome of one run.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The run.
    pub spec: RunSpec,
    /// `(step, mean training loss of the steps since the previous point)`, every 10 steps.
    pub train_curve: Vec<(usize, f32)>,
    /// `(step, validation loss)` at step 0, every `eval_interval` steps and after the last.
    pub val_curve: Vec<(usize, f32)>,
    /// Validation loss on the whole validation split after training.
    pub val_loss: f32,
    /// Mean training loss of the last `eval_interval` steps (on this process's share of each batch).
    pub train_loss: f32,
    /// Optimizer state in bytes.
    pub state_bytes: usize,
    /// Trainable parameters.
    pub params: usize,
    /// Wall time of the run (training, evaluations, sample).
    pub seconds: f64,
    /// Wall time of the training steps alone.
    pub train_seconds: f64,
    /// Of which in the optimizer (`apply_gradients`; for AdamW its steps and the clipping).
    pub optimizer_seconds: f64,
    /// Training tokens per second of training time.
    pub tokens_per_s: f64,
    /// Text generated by the trained model.
    pub sample: String,
}

impl RunResult {
    /// The machine-readable summary line: `result optimizer=NAME val_loss=.. train_loss=..
    /// state_bytes=.. params=.. tokens_per_s=.. seconds=..`.
    pub fn result_line(&self) -> String {
        self.result_line_with(self.state_bytes)
    }

    /// [`RunResult::result_line`] with `state_bytes` in place of the run's own (a data-parallel
    /// run reports the sum over its ranks).
    pub fn result_line_with(&self, state_bytes: usize) -> String {
        format!(
            "result optimizer={} val_loss={:.4} train_loss={:.4} state_bytes={} params={} \
             tokens_per_s={:.0} seconds={:.2}",
            self.spec.name,
            self.val_loss,
            self.train_loss,
            state_bytes,
            self.params,
            self.tokens_per_s,
            self.seconds
        )
    }
}

/// Steps between two points of the training-loss curve.
pub const CURVE_EVERY: usize = 10;

/// Trains a freshly initialised GPT (the same weights for every run with `cfg.seed`) with one
/// optimizer on the same sequence of random training batches, evaluates it every
/// `eval_interval` steps and at the end, and generates a sample. Calls `on_tick` after every
/// step (and once before training).
///
/// # Errors
/// A bad configuration, a corpus part no longer than the context, a weight that receives no
/// gradient in the first step, or a failed tensor operation.
pub fn train_run(
    corpus: &Corpus,
    spec: &RunSpec,
    cfg: &TrainConfig,
    on_tick: &mut dyn FnMut(&Tick),
) -> Result<RunResult> {
    let make = |vars: &[(String, Var)]| RunOptimizer::new(spec, vars, cfg);
    train_with(corpus, spec, cfg, Share::WHOLE, make, on_tick)
}

/// The rows of every batch that one process of a data-parallel group computes the gradient of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// This process's rank.
    pub rank: usize,
    /// The number of processes.
    pub ranks: usize,
}

impl Share {
    /// The whole batch (one process).
    pub const WHOLE: Share = Share { rank: 0, ranks: 1 };

    /// Rows `[start, end)` of a batch of `len` rows: equal shares when `ranks` divides `len`.
    pub fn rows(&self, len: usize) -> (usize, usize) {
        (
            len * self.rank / self.ranks,
            len * (self.rank + 1) / self.ranks,
        )
    }
}

/// [`train_run`] with the optimizer made by `make` from the model's variables, computing the
/// gradient of `share`'s rows of every batch only (every process of a data-parallel group draws
/// the same batches and evaluates the same weights).
///
/// # Errors
/// As [`train_run`]; also a share of a batch with no rows.
pub fn train_with<S: Stepper>(
    corpus: &Corpus,
    spec: &RunSpec,
    cfg: &TrainConfig,
    share: Share,
    make: impl FnOnce(&[(String, Var)]) -> Result<S>,
    on_tick: &mut dyn FnMut(&Tick),
) -> Result<RunResult> {
    if cfg.batch_size == 0 || cfg.iterations == 0 || cfg.eval_interval == 0 {
        return Err(msg(format!(
            "batch size ({}), iterations ({}) and eval interval ({}) must be at least 1",
            cfg.batch_size, cfg.iterations, cfg.eval_interval
        )));
    }
    if share.ranks == 0 || share.rank >= share.ranks || share.ranks > cfg.batch_size {
        return Err(msg(format!(
            "rank {} of {} cannot take a share of a batch of {} sequences",
            share.rank, share.ranks, cfg.batch_size
        )));
    }
    let shortest = corpus.train.len().min(corpus.val.len());
    if shortest <= cfg.model.context {
        return Err(msg(format!(
            "a corpus part of {shortest} characters cannot hold a window of {} tokens",
            cfg.model.context + 1
        )));
    }
    let start = Instant::now();
    let (varmap, model) = build_gpt(cfg.model, cfg.seed)?;
    let vars = named_vars(&varmap)?;
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = make(&vars)?;
    let state_bytes = opt.state_bytes(params);

    let eval_seed = |step: usize| cfg.seed ^ 0xE7A1_0000 ^ step as u64;
    let first_val = estimate_val_loss(&model, corpus, cfg, eval_seed(0))?;
    let mut val_curve = vec![(0, first_val)];
    let mut train_curve = Vec::new();
    let mut interval_losses = Vec::with_capacity(cfg.eval_interval);
    let mut curve_losses = Vec::with_capacity(CURVE_EVERY);
    on_tick(&Tick {
        iteration: 0,
        train_loss: f32::NAN,
        val_loss: Some(first_val),
    });

    let mut batch_rng = SplitMix64::new(cfg.seed ^ 0xBA7C_4000);
    let (mut train_seconds, mut optimizer_seconds) = (0f64, 0f64);
    let mut train_loss = f32::NAN;
    for iteration in 1..=cfg.iterations {
        let t0 = Instant::now();
        let batch = random_batch(
            &corpus.train,
            cfg.batch_size,
            cfg.model.context,
            &mut batch_rng,
        )?;
        let loss = if share == Share::WHOLE {
            model.loss(&batch.x, &batch.y)?
        } else {
            let (a, b) = share.rows(cfg.batch_size);
            model.loss(&batch.x.narrow(0, a, b - a)?, &batch.y.narrow(0, a, b - a)?)?
        };
        let grads = loss.backward()?;
        if iteration == 1 {
            let missing = weights_without_gradient(&vars, &grads)?;
            if !missing.is_empty() {
                return Err(msg(format!(
                    "these weights receive no gradient: {}",
                    missing.join(", ")
                )));
            }
        }
        let t1 = Instant::now();
        opt.step(&grads, &vars)?;
        optimizer_seconds += t1.elapsed().as_secs_f64();
        let value = loss.to_scalar::<f32>()?;
        train_seconds += t0.elapsed().as_secs_f64();
        if !value.is_finite() {
            return Err(msg(format!(
                "run `{}`: the training loss is {value} at step {iteration}",
                spec.name
            )));
        }
        interval_losses.push(value);
        curve_losses.push(value);
        if curve_losses.len() == CURVE_EVERY || iteration == cfg.iterations {
            train_curve.push((iteration, mean(&curve_losses)));
            curve_losses.clear();
        }
        let running = mean(&interval_losses);
        let val_loss = if iteration % cfg.eval_interval == 0 || iteration == cfg.iterations {
            train_loss = running;
            interval_losses.clear();
            let v = if iteration == cfg.iterations {
                full_val_loss(&model, corpus)?
            } else {
                estimate_val_loss(&model, corpus, cfg, eval_seed(iteration))?
            };
            val_curve.push((iteration, v));
            Some(v)
        } else {
            None
        };
        on_tick(&Tick {
            iteration,
            train_loss: running,
            val_loss,
        });
    }
    let val_loss = val_curve.last().map_or(f32::NAN, |p| p.1);
    let prompt = corpus.tokenizer.encode("\n").map_err(msg)?;
    let mut sample_rng = SplitMix64::new(cfg.seed ^ 0x5A3F_1E00);
    let sample = model.generate(&prompt, cfg.sample_chars, &mut sample_rng)?;
    Ok(RunResult {
        spec: spec.clone(),
        train_curve,
        val_curve,
        val_loss,
        train_loss,
        state_bytes,
        params,
        seconds: start.elapsed().as_secs_f64(),
        train_seconds,
        optimizer_seconds,
        tokens_per_s: (cfg.iterations * cfg.tokens_per_step()) as f64 / train_seconds,
        sample: corpus.tokenizer.decode(&sample),
    })
}

fn mean(values: &[f32]) -> f32 {
    values.iter().sum::<f32>() / values.len().max(1) as f32
}
