//! Trains a small character-level GPT on tiny Shakespeare with Adafactor and with AdamW, and
//! compares them: validation loss, optimizer memory, time.
//!
//! `cargo run --release --example train` (add `-- --help` for the options, `-- --full` for
//! nanoGPT's whole reference run). The corpus ships in the repository
//! (`examples/data/tinyshakespeare.txt`) and is embedded in the binary. Every run starts from the
//! same seeded weights and sees the same batches; only the optimizer differs. The output is a
//! table, one machine-readable `result ...` line per run, a sample of each trained model and a
//! PNG chart of training and validation loss against step.

#[path = "common/chart.rs"]
mod chart;
#[path = "train/cli.rs"]
mod cli;
#[path = "train/data.rs"]
mod data;
#[path = "train/model.rs"]
mod model;
#[allow(dead_code)]
#[path = "common/options.rs"]
mod options;
#[path = "train/plot.rs"]
mod plot;
#[path = "common/report.rs"]
mod report;
// Shared with the other training example, which uses other parts.
#[allow(dead_code)]
#[path = "common/rng.rs"]
mod rng;
#[path = "train/training.rs"]
mod training;

use cli::{parse_args, Args, USAGE};
use data::Corpus;
use report::{default_out_dir, Progress};
use std::error::Error;
use std::process::ExitCode;
use training::{train_run, RunResult, Tick};

fn main() -> ExitCode {
    let corpus = match Corpus::shakespeare() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let command = parse_args(std::env::args().skip(1), corpus.tokenizer.vocab_size());
    options::exit_code(command, USAGE, |args| run(&corpus, &args))
}

fn run(corpus: &Corpus, args: &Args) -> Result<(), Box<dyn Error>> {
    let cfg = args.train;
    let m = cfg.model;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_out_dir("adafactor-train"));
    std::fs::create_dir_all(&out)
        .map_err(|e| format!("cannot create the output folder {}: {e}", out.display()))?;
    let params: usize = model::named_vars(&model::build_gpt(m, cfg.seed)?.0)?
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    println!(
        "tiny Shakespeare: {} training / {} validation characters, {} distinct",
        corpus.train.len(),
        corpus.val.len(),
        m.vocab_size
    );
    println!(
        "model: GPT, {} layers, {} heads, width {}, context {}, {params} parameters; \
         {} steps of {} sequences, seed {}",
        m.layers, m.heads, m.width, m.context, cfg.iterations, cfg.batch_size, cfg.seed
    );
    println!(
        "unigram baseline (each character at its training frequency): validation loss {:.4}\n",
        corpus.unigram_baseline()
    );

    let name_width = args.runs.iter().map(|r| r.name.len()).max().unwrap_or(8);
    let mut results = Vec::with_capacity(args.runs.len());
    for spec in &args.runs {
        let progress = Progress::new(&spec.name, name_width, "iter", cfg.iterations)?;
        let mut last_val = f32::NAN;
        let mut on_tick = |t: &Tick| {
            last_val = t.val_loss.unwrap_or(last_val);
            let message = if t.iteration == 0 {
                format!("val loss {last_val:.4}")
            } else {
                format!("train loss {:.4}  val loss {last_val:.4}", t.train_loss)
            };
            progress.update(t.iteration, &message, t.val_loss.is_some());
        };
        let result = train_run(corpus, spec, &cfg, &mut on_tick);
        progress.finish();
        results.push(result?);
    }

    print_table(&results, name_width);
    for r in &results {
        println!("{}", r.result_line());
    }
    for r in &results {
        println!(
            "\nsample from {} ({} characters):",
            r.spec.name,
            r.sample.len()
        );
        println!("{}", r.sample);
    }

    let path = out.join("train.png");
    let title = format!(
        "Adafactor vs AdamW: {}-layer GPT ({params} parameters) on tiny Shakespeare, seed {}",
        m.layers, cfg.seed
    );
    chart::write_png(
        &title,
        "step",
        &plot::panels(&results, corpus.unigram_baseline()),
        &path,
    )?;
    println!("\nchart: {}", path.display());
    Ok(())
}

fn print_table(results: &[RunResult], name_width: usize) {
    let w = name_width.max("optimizer".len());
    println!();
    println!(
        "{:<w$}  {:>8}  {:>8}  {:>10}  {:>11}  {:>8}  {:>7}  {:>9}",
        "optimizer",
        "lr",
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
            r.spec.name,
            format!("{:e}", r.spec.learning_rate),
            r.val_loss,
            r.train_loss,
            r.state_bytes,
            r.tokens_per_s,
            r.seconds,
            100.0 * r.optimizer_seconds / r.train_seconds
        );
    }
    println!(
        "\n\"val loss\": the whole validation split after training; \"opt share\": the share of \
         the training steps' time spent in the optimizer (apply_gradients; for AdamW its steps \
         and the clipping), the rest is the model's forward and backward."
    );
}
