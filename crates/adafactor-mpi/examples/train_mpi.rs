//! The `train` example's model (an 11-64-64-6 MLP on the red wine quality data), trained with
//! Adafactor data-parallel across MPI processes, each rank on its own share of every batch:
//!
//! ```sh
//! cargo build --release --manifest-path crates/adafactor-mpi/Cargo.toml --target-dir target \
//!     --example train_mpi
//! mpirun --oversubscribe -np 2 target/release/examples/train_mpi --mode sharded
//! ```
//!
//! Rank 0 prints the `train` example's `result` line plus `ranks=N mode=M
//! state_bytes_per_rank=B`; every rank checks that all ranks ended with the same results.

#[path = "../../candle-adafactor/examples/train/data_parallel.rs"]
mod data_parallel;
#[path = "../../candle-adafactor/examples/train/training.rs"]
#[allow(dead_code)] // the AdamW runs belong to the single-process example
mod training;

use adafactor::collective::Collective;
use adafactor_mpi::MpiCollective;
use candle_adafactor::Mode;
use training::{load_wine, RunSpec, TrainConfig};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> BoxResult<()> {
    let mut mode = Mode::Sharded;
    let mut cfg = TrainConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mode" => mode = Mode::parse(&args.next().ok_or("--mode expects a value")?)?,
            "--epochs" => cfg.epochs = args.next().ok_or("--epochs expects a value")?.parse()?,
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    let universe = adafactor_mpi::initialize()?;
    let mut control = MpiCollective::new(&universe)?;
    let data = load_wine(cfg.seed)?;
    let spec = RunSpec::parse("adafactor-paper")?;
    let comm = MpiCollective::new(&universe)?;
    let result = data_parallel::train_rank(&data, &spec, &cfg, Box::new(comm), mode, &mut |_| {})?;
    let last = result.run.last();
    // Every rank must end with rank 0's loss and accuracy.
    let mut mine =
        [u64::from(last.train_loss.to_bits()) << 32 | u64::from(last.test_accuracy.to_bits())];
    let all = control.all_gather_bytes(&mine[0].to_le_bytes())?;
    if all.iter().any(|b| b.as_slice() != mine[0].to_le_bytes()) {
        return Err("the ranks ended with different results".into());
    }
    let bytes = result.run.state_bytes as u64;
    mine[0] = bytes;
    control.all_reduce_max_u64(&mut mine)?;
    let total = control.sum_f64(bytes as f64)? as usize;
    println!(
        "rank {} of {}: {} state bytes",
        result.rank, result.ranks, result.run.state_bytes
    );
    control.barrier()?;
    if result.rank == 0 {
        println!("{}", result.result_line(total, mine[0] as usize));
    }
    Ok(())
}
