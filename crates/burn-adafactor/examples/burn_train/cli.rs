//! Command-line options of the burn `train` example.

use crate::training::{self, RUNS, TrainConfig};

/// `--help` text.
pub const USAGE: &str = "\
Trains a small character-level GPT (burn's own layers) on tiny Shakespeare with Keras-exact
Adafactor, burn's own Adafactor and burn's AdamW, from the same initial weights and batches, then
prints a results table and one `result ...` line per run.

Usage: cargo run --release -p burn-adafactor --example burn_train -- [OPTIONS]

Options:
  --full          nanoGPT's whole reference run: 2000 steps (default: 300 steps)
  --steps N       optimizer steps (overrides --full's and the default; above the 100 warm-up steps)
  --seed N        seed of the initial weights and the batches (default 1337)
  --runs LIST     comma-separated runs (default keras-adafactor,burn-adafactor,burn-adamw):
                    keras-adafactor  this crate's Adafactor as the candle example's `adafactor`
                                     run: peak step 1e-2, 100 warm-up steps, cosine decay to a
                                     tenth, global_clipnorm 1.0
                    burn-adafactor   burn's AdafactorConfig::new() (defaults: relative step
                                     min(lr, 1/sqrt(t)) times RMS(w), no clipping), lr = the
                                     same schedule's value at each step
                    burn-adamw       burn's AdamW as nanoGPT: peak lr 1e-3, betas (0.9, 0.99),
                                     weight decay 0.1 on matrices, same schedule, global-norm
                                     clipping 1.0
  -h, --help      this text
";

/// What the command line asks for, for a corpus of `vocab_size` characters: the run's
/// configuration and the runs' names, or `None` for `--help`. Options take their value as the
/// next argument or after `=`.
///
/// # Errors
/// An unknown option, a missing or invalid value, an unknown run, no steps after the warm-up.
pub fn parse_args(
    args: impl IntoIterator<Item = String>,
    vocab_size: usize,
) -> Result<Option<(TrainConfig, Vec<String>)>, String> {
    let mut cfg = TrainConfig::quick(vocab_size);
    let (mut full, mut steps) = (false, None);
    let mut runs: Vec<String> = RUNS.iter().map(|r| r.0.to_string()).collect();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (option, inline) = match arg.split_once('=') {
            Some((o, v)) if o.starts_with("--") => (o.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        match option.as_str() {
            "-h" | "--help" => return Ok(None),
            "--full" => {
                full = true;
                continue;
            }
            "--steps" | "--seed" | "--runs" => {}
            _ => return Err(format!("unknown argument `{arg}` (see --help)")),
        }
        let value = inline
            .or_else(|| args.next())
            .ok_or_else(|| format!("{option} expects a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{option} expects a whole number, got `{value}`"))
        };
        match option.as_str() {
            "--steps" => steps = Some(number()? as usize),
            "--seed" => cfg.seed = number()?,
            _ => {
                runs = value.split(',').map(|s| s.trim().to_string()).collect();
                for name in &runs {
                    training::run_named(name).map_err(|e| format!("--runs: {e}"))?;
                }
            }
        }
    }
    if full {
        cfg.iterations = TrainConfig::reference(vocab_size).iterations;
    }
    if let Some(n) = steps {
        cfg.iterations = n;
    }
    if cfg.iterations <= cfg.warmup {
        return Err(format!(
            "--steps must be above the {} warm-up steps, got {}",
            cfg.warmup, cfg.iterations
        ));
    }
    Ok(Some((cfg, runs)))
}
