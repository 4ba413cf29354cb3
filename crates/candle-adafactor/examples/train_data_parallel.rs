//! Data-parallel training of the `train` example's model with Adafactor, on a group of ranks
//! that are threads of this process (the `adafactor-mpi` crate's `train_mpi` example runs the same
//! code on MPI processes: `mpirun -np 2 target/release/examples/train_mpi`).
//!
//! `cargo run --release --example train_data_parallel -- --ranks 2 --mode sharded`
//!
//! Each rank computes the gradient of its own share of every batch; the optimizer averages them
//! across ranks. It prints the `train` example's `result` line for the run (rank 0's, every rank
//! holding the same weights) with `ranks=N mode=M state_bytes_per_rank=B`, and checks that every
//! rank ended with the same weights and results.

#[path = "train/data_parallel.rs"]
mod data_parallel;
#[path = "train/training.rs"]
#[allow(dead_code)] // the AdamW runs and the argument parsing belong to `train`
mod training;

use adafactor::collective::ThreadGroup;
use candle_adafactor::Mode;
use std::error::Error;
use std::process::ExitCode;
use training::{load_wine, RunSpec, TrainConfig};

const USAGE: &str = "\
Usage: cargo run --release --example train_data_parallel -- [OPTIONS]

Options:
  --ranks N          ranks (threads), default 2
  --mode MODE        replicated or sharded (default: both, one after the other)
  --epochs N         passes over the training set (default 60)
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
    let mut ranks = 2usize;
    let mut modes = vec![Mode::Replicated, Mode::Sharded];
    let mut cfg = TrainConfig::default();
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
            "--epochs" => cfg.epochs = value()?.parse().map_err(|e| format!("--epochs: {e}"))?,
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    let data = load_wine(cfg.seed)?;
    let spec = RunSpec::parse("adafactor-paper")?;
    for mode in modes {
        let comms = ThreadGroup::new(ranks)?;
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let (data, spec, cfg) = (&data, &spec, &cfg);
                    s.spawn(move || {
                        data_parallel::train_rank(
                            data,
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
        let first = results[0].run.last();
        for r in &results[1..] {
            let last = r.run.last();
            if last.train_loss.to_bits() != first.train_loss.to_bits()
                || last.test_accuracy.to_bits() != first.test_accuracy.to_bits()
            {
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
