//! Command-line options of the `train_wine` example.

use crate::options::{parse_count, parse_learning_rate, parse_runs, parse_seed};
use crate::training::{default_runs, OptimizerKind, TrainConfig, PRESETS};
use std::path::PathBuf;

/// `--help` text.
pub const USAGE: &str = "\
Trains an 11-64-64-6 MLP on the red wine quality data (shipped in linfa-datasets) with
Adafactor and AdamW from the same initial weights and batches, then prints a results table,
one `result ...` line per run and the path of a chart of loss and accuracy against step.

Usage: cargo run --release --example train_wine -- [OPTIONS]

Options:
  --epochs N          passes over the training set (default 60)
  --batch-size N      samples per mini-batch (default 32)
  --seed N            seed of the split, the initial weights and the batch order (default 42)
  --optimizers LIST   comma-separated runs (default adafactor,adafactor-paper,adamw):
                        adafactor        Adafactor, Keras defaults (learning rate 1e-3)
                        adafactor-paper  Adafactor, the paper's step min(1e-2, 1/sqrt(t))
                        adamw            candle-nn AdamW (learning rate 1e-3, weight decay 0.01)
                      NAME@LR sets a run's learning rate, e.g. adafactor@3e-3
  --lr LR             learning rate of every run given without @LR
  --out DIR           where the chart goes (default: target/adafactor-train-wine)
  -h, --help          this text
";

/// Parsed options.
pub type Args = crate::options::TrainArgs<TrainConfig, OptimizerKind>;

/// What the command line asks for.
pub type Command = crate::options::Command<Args>;

/// Parses the arguments after the program name. Options take their value as the next
/// argument or after `=` (`--epochs 10` or `--epochs=10`).
///
/// # Errors
/// An unknown option, a missing or invalid value, an unknown or repeated run name.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    let mut train = TrainConfig::default();
    let mut runs: Option<String> = None;
    let mut lr = None;
    let mut out = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        let (option, inline) = match arg.split_once('=') {
            Some((o, v)) if o.starts_with("--") => (o.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if !matches!(
            option.as_str(),
            "--epochs" | "--batch-size" | "--seed" | "--optimizers" | "--lr" | "--out"
        ) {
            return Err(format!("unknown argument `{arg}` (see --help)"));
        }
        let value = match inline.or_else(|| args.next()) {
            Some(v) => v,
            None => return Err(format!("{option} expects a value")),
        };
        match option.as_str() {
            "--epochs" => train.epochs = parse_count(&option, &value)?,
            "--batch-size" => train.batch_size = parse_count(&option, &value)?,
            "--seed" => train.seed = parse_seed(&value)?,
            "--optimizers" => runs = Some(value),
            "--lr" => lr = Some(parse_learning_rate(&value).map_err(|e| format!("--lr: {e}"))?),
            _ => out = Some(PathBuf::from(value)),
        }
    }
    let mut specs = match runs {
        None => default_runs(),
        Some(names) => parse_runs(&names, &PRESETS).map_err(|e| format!("--optimizers: {e}"))?,
    };
    if let Some(lr) = lr {
        specs
            .iter_mut()
            .filter(|s| !s.name.contains('@'))
            .for_each(|s| s.learning_rate = lr);
    }
    Ok(Command::Train(Args {
        train,
        runs: specs,
        out,
    }))
}
