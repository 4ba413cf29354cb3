//! The data-parallel checks of `candle-adafactor` (its `tests/data_parallel/checks.rs`: the
//! same cases its test suite runs on threads) across MPI processes; run it under mpirun with
//! two ranks (`tests/mpirun.rs` does):
//!
//! ```sh
//! cargo build --release --manifest-path crates/adafactor-mpi/Cargo.toml --target-dir target
//! mpirun --oversubscribe -np 2 target/release/mpi_data_parallel
//! ```
//!
//! Every rank runs every case; a case fails if it fails on any rank. Rank 0 prints one line per
//! case and `mpi data parallel: P passed, F failed (N ranks)`; the exit status is 1 if any
//! failed.

#[path = "../../../candle-adafactor/tests/data_parallel/checks.rs"]
mod checks;

use adafactor::collective::Collective;
use adafactor_mpi::MpiCollective;
use std::process::ExitCode;

fn main() -> ExitCode {
    let universe = match adafactor_mpi::initialize() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("mpi data parallel: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut control = match MpiCollective::new(&universe) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mpi data parallel: cannot open a communicator: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (rank, world) = (control.rank(), control.world_size());
    // Rank 0's process id names the checkpoint files of this run on every rank.
    let mut tag = std::process::id().to_le_bytes().to_vec();
    if let Err(e) = control.broadcast_bytes(0, &mut tag) {
        eprintln!("mpi data parallel: cannot agree on a run tag: {e}");
        return ExitCode::FAILURE;
    }
    let tag = format!(
        "mpi-{}",
        tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let cases = checks::cases(&tag);
    let mut failed: Vec<u64> = Vec::with_capacity(cases.len());
    for case in &cases {
        let outcome = MpiCollective::new(&universe)
            .map_err(|e| e.to_string())
            .and_then(|c| case.run(Box::new(c)));
        if let Err(e) = &outcome {
            eprintln!("rank {rank}: {}: {e}", case.name());
        }
        failed.push(u64::from(outcome.is_err()));
    }
    if let Err(e) = control.all_reduce_max_u64(&mut failed) {
        eprintln!("mpi data parallel: cannot combine the ranks' results: {e}");
        return ExitCode::FAILURE;
    }
    let bad = failed.iter().filter(|&&f| f != 0).count();
    if rank == 0 {
        for case in &cases {
            if let Some(f) = case.file() {
                std::fs::remove_file(f).ok();
            }
        }
        for (case, f) in cases.iter().zip(&failed) {
            println!(
                "{} {}",
                if *f == 0 { "ok    " } else { "FAILED" },
                case.name()
            );
        }
        println!(
            "mpi data parallel: {} passed, {bad} failed ({world} ranks)",
            cases.len() - bad
        );
    }
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
