//! Data-parallel step timings on the t5-small parameter set (the optimizer benchmark's
//! `--set t5-small`: 49 float32 tensors, 35,330,048 parameters) across MPI ranks, replicated and
//! sharded, with `use_ema` (so that there is full-size state to shard):
//!
//! ```sh
//! cargo build --release --manifest-path crates/adafactor-mpi/Cargo.toml --target-dir target \
//!     --example data_parallel_bench
//! mpirun --oversubscribe -np 2 target/release/examples/data_parallel_bench --mode sharded
//! ```
//!
//! Per step, on every rank: the time of the gradient average alone (the bucketed all-reduce and
//! division, on a second communicator, same buffers) and of a whole `DataParallel` step (copy of
//! the gradients, their average, the update, and in sharded mode the sharing of the new
//! weights). Rank 0 prints the medians over `--steps` timed steps after two warm-up steps, and
//! each rank its optimizer state and peak resident memory (`VmHWM`, reset after the tensors
//! are made). The last line is machine-readable:
//! `dp_bench ranks=.. mode=.. allreduce_ms=.. step_ms=.. state_bytes_per_rank=.. peak_rss_mib=..`
//! (the state and peak: the largest over the ranks).

use adafactor::collective::Collective;
use adafactor::data_parallel::{average_gradients, DEFAULT_BUCKET_BYTES};
use adafactor_mpi::MpiCollective;
use candle_adafactor::{AdafactorConfig, DataParallel, Mode};
use candle_core::{Device, Tensor, Var};
use std::time::Instant;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The t5-small parameter set of the optimizer benchmark.
fn t5_small() -> Vec<Vec<usize>> {
    let mut s = vec![vec![32128, 512]];
    for _ in 0..6 {
        s.extend(std::iter::repeat_n(vec![512, 512], 4));
        s.extend([vec![512, 2048], vec![2048, 512], vec![512], vec![512]]);
    }
    s
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> BoxResult<()> {
    let mut mode = Mode::Sharded;
    let mut steps = 10usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mode" => mode = Mode::parse(&args.next().ok_or("--mode expects a value")?)?,
            "--steps" => steps = args.next().ok_or("--steps expects a value")?.parse()?,
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    let universe = adafactor_mpi::initialize()?;
    let mut timing = MpiCollective::new(&universe)?;
    let (rank, ranks) = (timing.rank(), timing.world_size());

    let shapes = t5_small();
    let dev = Device::Cpu;
    let vars: Vec<(String, Var)> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|k| ((k % 1000) as f32 * 1e-3 - 0.5) * 0.1)
                .collect();
            Ok((format!("p{i:02}"), Var::from_vec(v, s.as_slice(), &dev)?))
        })
        .collect::<candle_core::Result<_>>()?;
    let grads: Vec<Tensor> = shapes
        .iter()
        .map(|s| {
            let n: usize = s.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|k| (((k * 7 + rank * 13) % 997) as f32 * 1e-3 - 0.5) * 0.01)
                .collect();
            Tensor::from_vec(v, s.as_slice(), &dev)
        })
        .collect::<candle_core::Result<_>>()?;
    let cfg = AdafactorConfig {
        learning_rate: 1e-3.into(),
        use_ema: true,
        ..Default::default()
    };
    let mut dp = DataParallel::new_named(
        vars.clone(),
        cfg,
        Box::new(MpiCollective::new(&universe)?),
        mode,
    )?;
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let pairs: Vec<(Option<&Tensor>, &Var)> = grads
        .iter()
        .zip(&vars)
        .map(|(g, (_, v))| (Some(g), v))
        .collect();
    let mut flat: Vec<Vec<f32>> = grads
        .iter()
        .map(|g| g.flatten_all()?.to_vec1::<f32>())
        .collect::<candle_core::Result<_>>()?;

    let (mut reduce_ms, mut step_ms) = (Vec::new(), Vec::new());
    for i in 0..steps + 2 {
        timing.barrier()?;
        let t = Instant::now();
        {
            let mut slices: Vec<&mut [f32]> = flat.iter_mut().map(Vec::as_mut_slice).collect();
            average_gradients(&mut timing, &mut slices, DEFAULT_BUCKET_BYTES)?;
        }
        let r = t.elapsed().as_secs_f64() * 1e3;
        timing.barrier()?;
        let t = Instant::now();
        dp.apply_gradients(&pairs)?;
        let s = t.elapsed().as_secs_f64() * 1e3;
        if i >= 2 {
            reduce_ms.push(r);
            step_ms.push(s);
        }
    }
    let state = dp.state_bytes() as u64;
    let peak = peak_rss_kib();
    println!(
        "rank {rank}: state_bytes={state} peak_rss_mib={:.1}{}",
        peak as f64 / 1024.0,
        if reset {
            ""
        } else {
            " (peak since start: clear_refs refused)"
        }
    );
    let mut most = [state, peak];
    timing.all_reduce_max_u64(&mut most)?;
    if rank == 0 {
        println!(
            "dp_bench ranks={ranks} mode={} allreduce_ms={:.1} step_ms={:.1} \
             state_bytes_per_rank={} peak_rss_mib={:.1}",
            mode.name(),
            median(reduce_ms),
            median(step_ms),
            most[0],
            most[1] as f64 / 1024.0
        );
    }
    Ok(())
}
