//! Checks the collective contract across MPI processes; run it under mpirun with any number of
//! ranks (`tests/mpirun.rs` runs it on two):
//!
//! ```sh
//! cargo build --release --manifest-path crates/adafactor-mpi/Cargo.toml --target-dir target
//! mpirun --oversubscribe -np 3 target/release/mpi_collective
//! ```
//!
//! Every rank runs every check; a check fails if it fails on any rank. Rank 0 prints one line per
//! check and `mpi collective: P passed, F failed (N ranks)`; the exit status is 1 if any failed.

use adafactor::collective::{
    all_reduce_sum_bucketed, check_same_on_all_ranks, Collective, Fingerprint,
};
use adafactor_mpi::{MpiCollective, SumOrder};
use std::process::ExitCode;

type Outcome = Result<(), String>;

/// Deterministic values whose sum depends on the order of addition; every rank can compute every
/// rank's contribution, hence the expected sum.
fn values(rank: usize, len: usize) -> Vec<f32> {
    let mut x = 0x2545_f491_4f6c_dd1du64.wrapping_mul(rank as u64 + 3);
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let unit = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            unit * [1e8f32, 1e-2, 1.0, 7e3][(i + rank) % 4]
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn err(e: adafactor::Error) -> String {
    e.to_string()
}

/// The same bytes on every rank, or an error naming a rank that differs.
fn identical_everywhere(c: &mut dyn Collective, what: &str, bytes: &[u8]) -> Outcome {
    let all = c.all_gather_bytes(bytes).map_err(err)?;
    match all.iter().position(|b| b != &all[0]) {
        None => Ok(()),
        Some(r) => Err(format!("{what}: rank {r} holds other bytes than rank 0")),
    }
}

/// f32 sums of several lengths (shorter than the rank count, uneven splits, many rounds): the
/// same bits on every rank; in rank order they are the rank-order sum (and so with two ranks in
/// any order).
fn f32_sums(c: &mut MpiCollective) -> Outcome {
    let p = c.world_size();
    // Millions of elements only where that is a few rounds, not hundreds of thousands.
    let long = if c.chunk_elements() >= 1 << 20 {
        5_000_003
    } else {
        20_011
    };
    for len in [0usize, 1, 3, 1000, long] {
        let mut v = values(c.rank(), len);
        c.all_reduce_sum_f32(&mut v).map_err(err)?;
        identical_everywhere(c, &format!("sum of {len}"), &bits(&v))?;
        let mut want = values(0, len);
        for r in 1..p {
            want.iter_mut()
                .zip(values(r, len))
                .for_each(|(s, x)| *s += x);
        }
        if (c.order() == SumOrder::RankOrder || p <= 2) && bits(&v) != bits(&want) {
            return Err(format!(
                "sum of {len} values differs from the rank-order sum"
            ));
        }
    }
    Ok(())
}

fn f64_max_and_flags(c: &mut MpiCollective) -> Outcome {
    let (r, p) = (c.rank(), c.world_size());
    let mut f = vec![0.1 * (r as f64 + 1.0), -(r as f64), 1e300];
    c.all_reduce_sum_f64(&mut f).map_err(err)?;
    let mut want = [0.1f64, -0.0, 1e300];
    for q in 1..p {
        want[0] += 0.1 * (q as f64 + 1.0);
        want[1] += -(q as f64);
        want[2] += 1e300;
    }
    if f.iter()
        .map(|x| x.to_bits())
        .ne(want.iter().map(|x| x.to_bits()))
    {
        return Err(format!("f64 sum {f:?}, expected {want:?}"));
    }
    let mut m = vec![r as u64, 100 - r as u64, u64::MAX - r as u64];
    c.all_reduce_max_u64(&mut m).map_err(err)?;
    if m != [p as u64 - 1, 100, u64::MAX] {
        return Err(format!("max {m:?}"));
    }
    let last = c.any(r + 1 == p).map_err(err)?;
    let none = c.any(false).map_err(err)?;
    let total = c.sum_f64(2.0).map_err(err)?;
    if !last || none || total != 2.0 * p as f64 {
        return Err(format!("any(last)={last} any(false)={none} sum={total}"));
    }
    c.barrier().map_err(err)
}

fn broadcast_and_gather(c: &mut MpiCollective) -> Outcome {
    let (r, p) = (c.rank(), c.world_size());
    for root in 0..p {
        let want = vec![root as u8 ^ 0x5a; 3 + root * 300_001];
        let mut b = if r == root {
            want.clone()
        } else {
            vec![1; r * 11]
        };
        c.broadcast_bytes(root, &mut b).map_err(err)?;
        if b != want {
            return Err(format!(
                "broadcast from {root}: {} bytes, not the root's",
                b.len()
            ));
        }
    }
    let got = c.all_gather_bytes(&vec![r as u8 + 7; r * 5]).map_err(err)?;
    for (q, b) in got.iter().enumerate() {
        if b != &vec![q as u8 + 7; q * 5] {
            return Err(format!(
                "all-gather: rank {q}'s bytes are wrong ({} bytes)",
                b.len()
            ));
        }
    }
    Ok(())
}

/// Mismatched lengths, operations and roots: an error on every rank, and the group still works.
fn mismatches_are_errors_on_every_rank(c: &mut MpiCollective) -> Outcome {
    let (r, p) = (c.rank(), c.world_size());
    if p < 2 {
        return Ok(());
    }
    let mut v = vec![1.0f32; if r == p - 1 { 9 } else { 8 }];
    match c.all_reduce_sum_f32(&mut v) {
        Err(e) if e.to_string().contains("8 values") && e.to_string().contains("9 values") => {}
        other => return Err(format!("lengths 8 and 9: {other:?}")),
    }
    let other = if r == 0 {
        c.barrier()
    } else {
        c.all_reduce_sum_f64(&mut [1.0])
    };
    match other {
        Err(e) if e.to_string().contains("barrier") => {}
        other => return Err(format!("barrier against a sum: {other:?}")),
    }
    let mut b = vec![0u8; 4];
    match c.broadcast_bytes(usize::from(r == 0), &mut b) {
        Err(e) if e.to_string().contains("root 0") && e.to_string().contains("root 1") => {}
        other => return Err(format!("roots 1 and 0: {other:?}")),
    }
    let mut grads = vec![vec![1.0f32; 10]; if r == p - 1 { 3 } else { 2 }];
    let mut views: Vec<&mut [f32]> = grads.iter_mut().map(|g| g.as_mut_slice()).collect();
    match all_reduce_sum_bucketed(c, &mut views, 40) {
        Err(e) if e.to_string().contains("gradient lengths") => {}
        other => return Err(format!("bucketed sums of 2 and 3 gradients: {other:?}")),
    }
    let mut v = vec![1.0f32; 2];
    c.all_reduce_sum_f32(&mut v).map_err(err)?;
    if v != vec![p as f32; 2] {
        return Err(format!("after the mismatches a sum gave {v:?}"));
    }
    Ok(())
}

fn config_check(c: &mut MpiCollective) -> Outcome {
    let (r, p) = (c.rank(), c.world_size());
    let describe = |shape: &[usize]| {
        let mut f = Fingerprint::new();
        f.add(br#"{"learning_rate": 0.01}"#)
            .add_variable("dense/kernel", shape, "f32");
        f
    };
    check_same_on_all_ranks(c, "config and variables", describe(&[4, 8])).map_err(err)?;
    let differs = describe(if r + 1 == p { &[8, 4] } else { &[4, 8] });
    match check_same_on_all_ranks(c, "config and variables", differs) {
        Ok(()) if p == 1 => Ok(()),
        Err(e) if p > 1 && e.to_string().contains(&format!("rank {} has", p - 1)) => Ok(()),
        other => Err(format!("the last rank's other shape: {other:?}")),
    }
}

fn bucketed_equals_per_tensor(c: &mut MpiCollective) -> Outcome {
    let lens = [512usize * 64, 512, 512, 64 * 2048, 2048 * 64, 512, 7];
    let r = c.rank();
    let mut per: Vec<Vec<f32>> = lens.iter().map(|&l| values(r + l, l)).collect();
    let mut bucketed = per.clone();
    for v in per.iter_mut() {
        c.all_reduce_sum_f32(v).map_err(err)?;
    }
    let mut views: Vec<&mut [f32]> = bucketed.iter_mut().map(|v| v.as_mut_slice()).collect();
    all_reduce_sum_bucketed(c, &mut views, 256 * 1024).map_err(err)?;
    // MPI_Allreduce's order of addition may depend on the buffer's length and an element's
    // position (with more than two ranks), so only the rank order promises these bits.
    let exact = c.order() == SumOrder::RankOrder || c.world_size() <= 2;
    if exact && per.iter().zip(&bucketed).any(|(a, b)| bits(a) != bits(b)) {
        return Err("bucketed sums differ from per-tensor sums".into());
    }
    Ok(())
}

type Check = fn(&mut MpiCollective) -> Outcome;

fn main() -> ExitCode {
    let universe = match adafactor_mpi::initialize() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("mpi collective: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handles = [
        ("rank order", MpiCollective::new(&universe)),
        (
            "rank order, rounds of 7",
            MpiCollective::new(&universe).and_then(|c| c.with_chunk_elements(7)),
        ),
        (
            "rank order, rounds of 1M",
            MpiCollective::new(&universe).and_then(|c| c.with_chunk_elements(1 << 20)),
        ),
        (
            "native",
            MpiCollective::new(&universe).map(|c| c.with_order(SumOrder::Native)),
        ),
    ];
    let mut runs: Vec<(String, Outcome)> = Vec::new();
    let mut rank = 0;
    let mut world = 1;
    for (i, (label, handle)) in handles.into_iter().enumerate() {
        let mut c = match handle {
            Ok(c) => c,
            Err(e) => {
                eprintln!("mpi collective: cannot open the {label} handle: {e}");
                return ExitCode::FAILURE;
            }
        };
        (rank, world) = (c.rank(), c.world_size());
        let sums: &[(&str, Check)] = &[
            ("f32 sums", f32_sums),
            ("bucketed", bucketed_equals_per_tensor),
        ];
        let once: &[(&str, Check)] = &[
            ("f64 sums, max, flags, barrier", f64_max_and_flags),
            ("broadcast and all-gather", broadcast_and_gather),
            (
                "mismatches are errors on every rank",
                mismatches_are_errors_on_every_rank,
            ),
            ("config check", config_check),
        ];
        for (name, check) in sums.iter().chain(if i == 0 { once } else { &[] }) {
            runs.push((format!("{name} ({label})"), check(&mut c)));
        }
    }
    // A check fails if it failed on any rank.
    let mut failed: Vec<u64> = runs.iter().map(|(_, o)| u64::from(o.is_err())).collect();
    for (name, outcome) in &runs {
        if let Err(e) = outcome {
            eprintln!("rank {rank}: {name}: {e}");
        }
    }
    let agreed = MpiCollective::new(&universe).and_then(|mut c| c.all_reduce_max_u64(&mut failed));
    if let Err(e) = agreed {
        eprintln!("mpi collective: cannot combine the ranks' results: {e}");
        return ExitCode::FAILURE;
    }
    let bad = failed.iter().filter(|&&f| f != 0).count();
    if rank == 0 {
        for ((name, _), f) in runs.iter().zip(&failed) {
            println!("{} {name}", if *f == 0 { "ok    " } else { "FAILED" });
        }
        println!(
            "mpi collective: {} passed, {bad} failed ({world} ranks)",
            runs.len() - bad
        );
    }
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
