//! Data-parallel training of the `train` example's GPT with Adafactor, on a group of ranks that
//! are threads of this process (the `adafactor-mpi` crate's `train_mpi` example runs the same
//! code on MPI processes: `mpirun -np 2 target/release/examples/train_mpi`).
//!
//! `cargo run --release --example train_data_parallel -- --ranks 2 --mode sharded`
//!
//! Each rank computes the gradient of its own share of every batch; the optimizer averages them
//! across ranks. It prints the `train` example's `result` line for the run (rank 0's, every rank
//! holding the same weights) with `ranks=N mode=M state_bytes_per_rank=B`, and checks that every
//! rank ended with the same validation loss.

#[allow(dead_code)] // the unigram baseline belongs to `train`
#[path = "train/data.rs"]
mod data;
#[path = "train/data_parallel.rs"]
mod data_parallel;
#[path = "train/model.rs"]
mod model;
#[allow(dead_code)] // the presets' parsing is shared with `train`
#[path = "common/options.rs"]
mod options;
#[allow(dead_code)]
#[path = "common/rng.rs"]
mod rng;
#[allow(dead_code)] // the AdamW runs and the argument parsing belong to `train`
#[path = "train/training.rs"]
mod training;

use adafactor::collective::ThreadGroup;
use candle_adafactor::Mode;
use data::Corpus;
use std::error::Error;
use std::process::ExitCode;
use training::{RunSpec, TrainConfig};

const USAGE: &str = "\
Usage: cargo run --release --example train_data_parallel -- [OPTIONS]

Options:
  --ranks N          ranks (threads), default 2; at most the batch size (12)
  --mode MODE        replicated or sharded (default: both, one after the other)
  --iterations N     optimizer steps (default 200; more than the 100 warm-up steps)
  -h, --help         this text
";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let corpus = Corpus::shakespeare()?;
    let mut ranks = 2usize;
    let mut modes = vec![Mode::Replicated, Mode::Sharded];
    let mut cfg = TrainConfig {
        iterations: 200,
        ..TrainConfig::quick(corpus.tokenizer.vocab_size())
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} expects a value"));
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(());
            }
            "--ranks" => ranks = value()?.parse().map_err(|e| format!("--ranks: {e}"))?,
            "--mode" => modes = vec![Mode::parse(&value()?)?],
            "--iterations" => {
                cfg.iterations = value()?.parse().map_err(|e| format!("--iterations: {e}"))?
            }
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    let spec = RunSpec::parse("adafactor", &training::PRESETS)?;
    for mode in modes {
        let comms = ThreadGroup::new(ranks)?;
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let (corpus, spec, cfg) = (&corpus, &spec, &cfg);
                    s.spawn(move || {
                        data_parallel::train_rank(
                            corpus,
                            spec,
                            cfg,
                            Box::new(comm),
                            mode,
                            &mut |_| {},
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| "a rank panicked".to_string()))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let results = results
            .into_iter()
            .collect::<candle_core::Result<Vec<_>>>()?;
        let first = &results[0].run;
        for r in &results[1..] {
            if r.run.val_loss.to_bits() != first.val_loss.to_bits() {
                return Err(format!("rank {} ended elsewhere than rank 0", r.rank).into());
            }
        }
        for r in &results {
            println!(
                "rank {} of {}: {} state bytes",
                r.rank, r.ranks, r.run.state_bytes
            );
        }
        let bytes = results.iter().map(|r| r.run.state_bytes);
        let (total, most) = (bytes.clone().sum(), bytes.max().unwrap_or(0));
        println!("{}", results[0].result_line(total, most));
    }
    Ok(())
}
