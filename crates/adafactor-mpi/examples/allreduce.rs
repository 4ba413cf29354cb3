//! All-reduce timings between MPI ranks: latency (one value), 16 MiB in one buffer, and the
//! t5-small gradient (49 tensors, 35,330,048 float32) in buckets, through the collective contract
//! in both sum orders and through raw `MPI_Allreduce`.
//!
//! ```sh
//! cargo build --release --manifest-path crates/adafactor-mpi/Cargo.toml --target-dir target \
//!     --example allreduce
//! mpirun --oversubscribe -np 2 target/release/examples/allreduce [--reps 10] [--bucket-mib 25]
//! ```
//!
//! Rank 0 prints one line per case: the median and minimum over `--reps` timed runs (after two
//! warm-up runs, each started after a barrier), and the bytes per rank divided by the median.

use adafactor::collective::{all_reduce_sum_bucketed, Collective};
use adafactor_mpi::mpi::collective::SystemOperation;
use adafactor_mpi::mpi::traits::{Communicator, CommunicatorCollectives};
use adafactor_mpi::{MpiCollective, SumOrder};
use std::time::Instant;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The t5-small parameter set of the optimizer benchmark (`bench --set t5-small`).
fn t5_small_lens() -> Vec<usize> {
    let mut lens = vec![32128 * 512];
    for _ in 0..6 {
        lens.extend([512 * 512; 4]);
        lens.extend([512 * 2048, 2048 * 512, 512, 512]);
    }
    lens
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Times `run` `reps` times after two warm-ups, each run started after a barrier; milliseconds.
fn time(
    world: &impl CommunicatorCollectives,
    reps: usize,
    mut run: impl FnMut() -> BoxResult<()>,
) -> BoxResult<Vec<f64>> {
    let mut out = Vec::with_capacity(reps);
    for i in 0..reps + 2 {
        world.barrier();
        let t = Instant::now();
        run()?;
        if i >= 2 {
            out.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(out)
}

fn arg(args: &[String], name: &str, default: usize) -> BoxResult<usize> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => Ok(args
            .get(i + 1)
            .ok_or(format!("{name} needs a value"))?
            .parse()
            .map_err(|e| format!("{name}: {e}"))?),
    }
}

fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reps = arg(&args, "--reps", 10)?.max(1);
    let bucket_bytes = arg(&args, "--bucket-mib", 25)?.max(1) << 20;
    let universe = adafactor_mpi::initialize()?;
    let world = universe.world();
    let (rank, ranks) = (world.rank(), world.size());
    let mut lines = Vec::new();
    let mut report = |what: &str, bytes: usize, ms: Vec<f64>| {
        let min = ms.iter().copied().fold(f64::INFINITY, f64::min);
        let med = median(ms);
        lines.push(format!(
            "allreduce ranks={ranks} case={what} bytes={bytes} median_ms={med:.4} min_ms={min:.4} \
             GB/s={:.2}",
            bytes as f64 / med / 1e6
        ));
    };

    // Latency: one float32.
    let one = [1.0f32];
    let mut got = [0.0f32];
    let ms = time(&world, reps * 10, || {
        world.all_reduce_into(&one[..], &mut got[..], SystemOperation::sum());
        Ok(())
    })?;
    report("raw-MPI_Allreduce-1-f32", 4, ms);
    for order in [SumOrder::RankOrder, SumOrder::Native] {
        let mut c = MpiCollective::new(&universe)?.with_order(order);
        let mut v = [1.0f32];
        let ms = time(&world, reps * 10, || Ok(c.all_reduce_sum_f32(&mut v)?))?;
        report(&format!("contract-{order:?}-1-f32"), 4, ms);
    }

    // 16 MiB in one buffer.
    let n = 4 << 20;
    let send = vec![1.0f32; n];
    let mut recv = vec![0.0f32; n];
    let ms = time(&world, reps, || {
        world.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
        Ok(())
    })?;
    report("raw-MPI_Allreduce-16MiB", n * 4, ms);
    for order in [SumOrder::RankOrder, SumOrder::Native] {
        let mut c = MpiCollective::new(&universe)?.with_order(order);
        let mut v = vec![1.0f32; n];
        let ms = time(&world, reps, || Ok(c.all_reduce_sum_f32(&mut v)?))?;
        report(&format!("contract-{order:?}-16MiB"), n * 4, ms);
    }
    drop((send, recv));

    // The t5-small gradient, bucketed.
    let lens = t5_small_lens();
    let total: usize = lens.iter().sum();
    let mut grads: Vec<Vec<f32>> = lens.iter().map(|&l| vec![0.5f32; l]).collect();
    for order in [SumOrder::RankOrder, SumOrder::Native] {
        let mut c = MpiCollective::new(&universe)?.with_order(order);
        let ms = time(&world, reps, || {
            let mut views: Vec<&mut [f32]> = grads.iter_mut().map(|g| g.as_mut_slice()).collect();
            Ok(all_reduce_sum_bucketed(&mut c, &mut views, bucket_bytes)?)
        })?;
        report(
            &format!(
                "contract-{order:?}-t5-small-buckets-{}MiB",
                bucket_bytes >> 20
            ),
            total * 4,
            ms,
        );
    }
    if rank == 0 {
        for l in &lines {
            println!("{l}");
        }
    }
    Ok(())
}
