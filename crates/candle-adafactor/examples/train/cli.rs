//! Command-line options of the `train` example.

use crate::options::{parse_count, parse_runs, parse_seed};
use crate::training::{OptimizerKind, TrainConfig, PRESETS};
use std::path::PathBuf;

/// `--help` text.
pub const USAGE: &str = "\
Trains a small character-level GPT on tiny Shakespeare with Adafactor and with AdamW, from the
same initial weights and batches, then prints a results table, one `result ...` line per run,
a sample of each trained model and the path of a chart of the losses against step.

Usage: cargo run --release --example train -- [OPTIONS]

Options:
  --full              nanoGPT's whole reference run: 2000 steps (default: 400 steps)
  --iters N           optimizer steps (overrides --full's and the default)
  --batch-size N      sequences of 64 characters per step (default 12)
  --eval-interval N   validation loss every N steps (default 100)
  --eval-batches N    random validation batches per intermediate evaluation (default 20;
                      the final evaluation reads the whole validation split)
  --seed N            seed of the initial weights, the batches and the samples (default 1337)
  --optimizers LIST   comma-separated runs (default adafactor,adamw):
                        adafactor                Adafactor, peak step 1e-2, warm-up and cosine
                                                 decay, global_clipnorm 1.0
                        adamw                    AdamW as nanoGPT: lr 1e-3, betas (0.9, 0.99),
                                                 weight decay 0.1, same schedule, clipping 1.0
                        adafactor-keras-default  Adafactor with Keras's defaults (lr 1e-3)
                      NAME@LR sets a run's (peak) learning rate, e.g. adafactor@2e-2
  --out DIR           where the chart goes (default: target/adafactor-train)
  -h, --help          this text
";

/// Parsed options.
pub type Args = crate::options::TrainArgs<TrainConfig, OptimizerKind>;

/// What the command line asks for.
pub type Command = crate::options::Command<Args>;

/// The runs when `--optimizers` is not given.
pub const DEFAULT_RUNS: &str = "adafactor,adamw";

/// Parses the arguments after the program name, for a corpus of `vocab_size` characters.
/// Options take their value as the next argument or after `=` (`--iters 10`, `--iters=10`).
///
/// # Errors
/// An unknown option, a missing or invalid value, an unknown or repeated run name, fewer steps
/// than the 100 warm-up steps.
pub fn parse_args<I: IntoIterator<Item = String>>(
    args: I,
    vocab_size: usize,
) -> Result<Command, String> {
    let mut train = TrainConfig::quick(vocab_size);
    let (mut full, mut iters) = (false, None);
    let mut runs = DEFAULT_RUNS.to_string();
    let mut out = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--full" => {
                full = true;
                continue;
            }
            _ => {}
        }
        let (option, inline) = match arg.split_once('=') {
            Some((o, v)) if o.starts_with("--") => (o.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if !matches!(
            option.as_str(),
            "--iters"
                | "--batch-size"
                | "--eval-interval"
                | "--eval-batches"
                | "--seed"
                | "--optimizers"
                | "--out"
        ) {
            return Err(format!("unknown argument `{arg}` (see --help)"));
        }
        let value = match inline.or_else(|| args.next()) {
            Some(v) => v,
            None => return Err(format!("{option} expects a value")),
        };
        match option.as_str() {
            "--iters" => iters = Some(parse_count(&option, &value)?),
            "--batch-size" => train.batch_size = parse_count(&option, &value)?,
            "--eval-interval" => train.eval_interval = parse_count(&option, &value)?,
            "--eval-batches" => train.eval_batches = parse_count(&option, &value)?,
            "--seed" => train.seed = parse_seed(&value)?,
            "--optimizers" => runs = value,
            _ => out = Some(PathBuf::from(value)),
        }
    }
    if full {
        train.iterations = TrainConfig::reference(vocab_size).iterations;
    }
    if let Some(n) = iters {
        train.iterations = n;
    }
    if train.iterations <= train.warmup {
        return Err(format!(
            "--iters must be above the {} warm-up steps, got {}",
            train.warmup, train.iterations
        ));
    }
    let runs = parse_runs(&runs, &PRESETS).map_err(|e| format!("--optimizers: {e}"))?;
    Ok(Command::Train(Args { train, runs, out }))
}
