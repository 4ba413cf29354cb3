//! Data-parallel training on groups of threads (2, and 3 for some): every case of
//! `data_parallel/checks.rs`
//! (replicated and sharded training equal one process fed the averaged gradient, bit for bit,
//! on both data paths, with a schedule, weight decay with exclusions, `global_clipnorm`, EMA
//! with overwrite and accumulation stopped mid-cycle; a non-finite gradient on one rank; ranks
//! that disagree; sharded checkpoints loaded into another world size; the state a sharded rank
//! keeps). The `adafactor-mpi` crate runs the same cases on 2 MPI processes.

#[path = "data_parallel/checks.rs"]
mod checks;

use adafactor::collective::ThreadGroup;
use std::time::Duration;

/// Runs every case matching `filter` on a fresh group of 2 threads; panics with every failure.
fn run_cases(filter: impl Fn(&checks::Case) -> bool) {
    run_cases_on(2, filter)
}

/// [`run_cases`] on `ranks` threads.
fn run_cases_on(ranks: usize, filter: impl Fn(&checks::Case) -> bool) {
    let tag = format!("threads-{}", std::process::id());
    let mut failures = Vec::new();
    let mut ran = 0;
    for case in checks::cases(&tag).into_iter().filter(|c| filter(c)) {
        ran += 1;
        // A rank that stops taking part is an error on the others after a minute, not a hang.
        let comms = ThreadGroup::with_timeout(ranks, Duration::from_secs(60)).expect("group");
        let results: Vec<Result<(), String>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let case = &case;
                    s.spawn(move || case.run(Box::new(comm)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("the rank panicked".into())))
                .collect()
        });
        if let Some(f) = case.file() {
            std::fs::remove_file(f).ok();
        }
        for (rank, r) in results.into_iter().enumerate() {
            if let Err(e) = r {
                failures.push(format!("{} (rank {rank}): {e}", case.name()));
            }
        }
    }
    assert!(ran > 0, "no case matched");
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn replicated_and_sharded_equal_one_process_fed_the_averaged_gradient() {
    run_cases(|c| matches!(c, checks::Case::Equivalence { .. }));
}

#[test]
fn a_non_finite_gradient_on_one_rank_is_skipped_or_refused_by_every_rank() {
    run_cases(|c| matches!(c, checks::Case::NonFinite { .. }));
}

#[test]
fn sharded_checkpoints_load_into_one_process_and_back_bit_exactly() {
    run_cases(|c| matches!(c, checks::Case::Checkpoint { .. }));
}

#[test]
fn ranks_that_disagree_fail_on_every_rank_without_hanging() {
    run_cases(|c| matches!(c, checks::Case::Mismatch { .. } | checks::Case::RefusedStep));
}

#[test]
fn a_sharded_rank_keeps_about_half_the_averages_and_accumulators() {
    run_cases(|c| matches!(c, checks::Case::StateBytes));
}

/// Three ranks: an uneven partition, a division by 3 in the average, three contributions to the
/// global norm.
#[test]
fn three_ranks_equal_one_process_fed_the_averaged_gradient() {
    run_cases_on(3, |c| {
        matches!(
            c,
            checks::Case::Equivalence {
                config: "everything" | "global_clipnorm",
                ..
            } | checks::Case::NonFinite { .. }
                | checks::Case::StateBytes
        )
    });
}
