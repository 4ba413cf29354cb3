//! The `train` example's GPT on tiny Shakespeare, trained with Adafactor data-parallel across MPI
//! processes, each rank on its own share of every batch:
//!
//! ```sh
//! cargo build --release --manifest-path crates/adafactor-mpi/Cargo.toml --target-dir target \
//!     --example train_mpi
//! mpirun --oversubscribe -np 2 target/release/examples/train_mpi --mode sharded
//! ```
//!
//! Rank 0 prints the `train` example's `result` line plus `ranks=N mode=M
//! state_bytes_per_rank=B`; every rank checks that all ranks ended with the same validation loss.

#[allow(dead_code)] // the unigram baseline belongs to `train`
#[path = "../../candle-adafactor/examples/train/data.rs"]
mod data;
#[path = "../../candle-adafactor/examples/train/data_parallel.rs"]
mod data_parallel;
#[path = "../../candle-adafactor/examples/train/model.rs"]
mod model;
#[allow(dead_code)] // the presets' parsing is shared with `train`
#[path = "../../candle-adafactor/examples/common/options.rs"]
mod options;
#[allow(dead_code)]
#[path = "../../candle-adafactor/examples/common/rng.rs"]
mod rng;
#[allow(dead_code)] // the AdamW runs belong to the single-process example
#[path = "../../candle-adafactor/examples/train/training.rs"]
mod training;

use adafactor::collective::Collective;
use adafactor_mpi::MpiCollective;
use candle_adafactor::Mode;
use data::Corpus;
use training::{RunSpec, TrainConfig, PRESETS};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> BoxResult<()> {
    let corpus = Corpus::shakespeare()?;
    let mut mode = Mode::Sharded;
    let mut cfg = TrainConfig {
        iterations: 200,
        ..TrainConfig::quick(corpus.tokenizer.vocab_size())
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mode" => mode = Mode::parse(&args.next().ok_or("--mode expects a value")?)?,
            "--iterations" => {
                cfg.iterations = args.next().ok_or("--iterations expects a value")?.parse()?
            }
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    let universe = adafactor_mpi::initialize()?;
    let mut control = MpiCollective::new(&universe)?;
    let spec = RunSpec::parse("adafactor", &PRESETS)?;
    let comm = MpiCollective::new(&universe)?;
    let result =
        data_parallel::train_rank(&corpus, &spec, &cfg, Box::new(comm), mode, &mut |_| {})?;
    // Every rank must end with rank 0's validation loss (the same weights).
    let mine = result.run.val_loss.to_bits().to_le_bytes();
    let all = control.all_gather_bytes(&mine)?;
    if all.iter().any(|b| b.as_slice() != mine) {
        return Err("the ranks ended with different validation losses".into());
    }
    let bytes = result.run.state_bytes as u64;
    let mut most = [bytes];
    control.all_reduce_max_u64(&mut most)?;
    let total = control.sum_f64(bytes as f64)? as usize;
    println!(
        "rank {} of {}: {} state bytes",
        result.rank, result.ranks, result.run.state_bytes
    );
    control.barrier()?;
    if result.rank == 0 {
        println!("{}", result.result_line(total, most[0] as usize));
    }
    Ok(())
}
