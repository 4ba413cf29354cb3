//! Trains a small character-level GPT on tiny Shakespeare with Keras-exact Adafactor (this
//! crate), burn's own Adafactor and burn's AdamW, and compares them: the candle adapter's main
//! example with burn's own layers (`Embedding`, `Linear`, `LayerNorm`, `Gelu`) on
//! `Device::flex().autodiff()`.
//!
//! `cargo run --release -p burn-adafactor --example burn_train` (add `-- --help` for the options,
//! `-- --full` for nanoGPT's whole 2000-step run). The corpus ships in the repository
//! (`crates/candle-adafactor/examples/data/tinyshakespeare.txt`, embedded in the binary; the
//! tokenizer and the batch windows are the candle example's plain-Rust `corpus.rs`). Every run
//! starts from the same seeded weights and sees the same batches; only the optimizer differs.
//! The output is a table and one machine-readable `result ...` line per run, in the candle
//! example's format.

#[path = "burn_train/cli.rs"]
mod cli;
// Shared with the candle examples, which also decode text.
#[allow(dead_code)]
#[path = "../../candle-adafactor/examples/train/corpus.rs"]
mod corpus;
#[path = "burn_train/model.rs"]
mod model;
// Shared with the candle examples, which use more of it.
#[allow(dead_code)]
#[path = "../../candle-adafactor/examples/common/rng.rs"]
mod rng;
#[path = "burn_train/training.rs"]
mod training;

use cli::{USAGE, parse_args};
use corpus::Corpus;
use std::error::Error;
use std::process::ExitCode;
use training::{QUICK_ITERATIONS, RunResult, TrainConfig, train_run};

fn main() -> ExitCode {
    let result = Corpus::shakespeare().and_then(|corpus| {
        match parse_args(std::env::args().skip(1), corpus.tokenizer.vocab_size()) {
            Ok(Some((cfg, runs))) => run(&corpus, &cfg, &runs).map_err(|e| e.to_string()),
            Ok(None) => {
                print!("{USAGE}");
                Ok(())
            }
            Err(e) => Err(format!("{e}\n\n{USAGE}")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(corpus: &Corpus, cfg: &TrainConfig, runs: &[String]) -> Result<(), Box<dyn Error>> {
    let m = cfg.model;
    println!(
        "tiny Shakespeare: {} training / {} validation characters, {} distinct",
        corpus.train.len(),
        corpus.val.len(),
        m.vocab_size
    );
    println!(
        "model: GPT with burn's layers, {} layers, {} heads, width {}, context {}; {} steps of {} \
         sequences, seed {} (default {QUICK_ITERATIONS} steps, --full for 2000)",
        m.layers, m.heads, m.width, m.context, cfg.iterations, cfg.batch_size, cfg.seed
    );
    println!(
        "unigram baseline (each character at its training frequency): validation loss {:.4}\n",
        corpus.unigram_baseline()
    );
    let width = runs.iter().map(String::len).max().unwrap_or(8);
    let mut results = Vec::with_capacity(runs.len());
    for name in runs {
        let mut on_eval = |step: usize, train: f32, val: f32| {
            println!(
                "{name:<width$}  step {step:>5}/{}  train loss {train:.4}  val loss {val:.4}{}",
                cfg.iterations,
                if step == cfg.iterations {
                    " (whole split)"
                } else {
                    ""
                }
            );
        };
        results.push(train_run(corpus, name, cfg, &mut on_eval)?);
    }
    print_table(&results, width);
    for r in &results {
        println!("{}", r.result_line());
    }
    Ok(())
}

fn print_table(results: &[RunResult], name_width: usize) {
    let w = name_width.max("optimizer".len());
    println!();
    println!(
        "{:<w$}  {:>8}  {:>8}  {:>10}  {:>11}  {:>8}  {:>7}  {:>9}",
        "optimizer",
        "peak lr",
        "val loss",
        "train loss",
        "state bytes",
        "tokens/s",
        "seconds",
        "opt share"
    );
    for r in results {
        println!(
            "{:<w$}  {:>8}  {:>8.4}  {:>10.4}  {:>11}  {:>8.0}  {:>7.1}  {:>8.1}%",
            r.name,
            format!("{:e}", r.learning_rate),
            r.val_loss,
            r.train_loss,
            r.state_bytes,
            r.tokens_per_s,
            r.seconds,
            100.0 * r.optimizer_seconds / r.train_seconds.max(1e-9)
        );
    }
    println!(
        "\n\"val loss\": the whole validation split after training; \"train loss\": the mean of \
         the last 100 steps; \"state bytes\": this crate's count for keras-adafactor, burn's f32 \
         state layout for the others; \"opt share\": the share of the training steps' time spent \
         in the optimizer (clipping included)."
    );
}
