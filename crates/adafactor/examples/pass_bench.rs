//! The two passes of a factored variable's fused step, timed apart, each beside an ideal pass
//! that moves the same bytes in the same process.
//!
//! The step bench (`candle-adafactor`'s `bench` example) times whole steps against an ideal
//! timed in the same run; on a machine whose memory bandwidth drifts between runs, two builds
//! compared that way differ by less than the drift. This one times the statistics pass and the
//! write pass of the kernels for shapes other than large matrices (`kernels::shaped`: batches
//! of tiny matrices, short rows, few rows, a single row) and, in the same iterations, an ideal
//! statistics pass (reads gradient, weight and old statistics, writes the new statistics to
//! separate buffers, as the kernels do) and an ideal write pass (reads gradient, weight and
//! statistics, writes the weight), words moved as integers with trivial arithmetic, over rayon
//! with jobs of 32768 elements. It prints the median of each and their ratios (one line):
//!
//! ```text
//! cargo run --release -p adafactor --example pass_bench -- 4194304x4 [REPS]
//! pass_bench shape=4194304x4 kernel=ShortRows stats_ms=.. ideal_stats_ms=.. stats_vs_ideal=..
//!     write_ms=.. ideal_write_ms=.. write_vs_ideal=.. vs_ideal=..
//! ```
//!
//! Float32 gradient and weight, `epsilon_1` 1e-30 (Keras's default), no clipping and no weight
//! decay, the finiteness check on: what a default step runs.

use adafactor::kernels::shaped::{self, Fresh, Kernel, Reads, StatArgs};
use adafactor::kernels::{Grad, Rounding};
use adafactor::Factoring;
use rayon::prelude::*;
use std::time::Instant;

/// Elements per job of the ideal passes.
const JOB: usize = 1 << 15;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Deterministic values in `[-0.5, 0.5)`.
fn values(seed: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i.wrapping_mul(seed) % 1000) as f32 - 500.0) * 1e-3)
        .collect()
}

fn parse(args: &[String]) -> Result<(Vec<usize>, usize), String> {
    let usage = "usage: pass_bench SHAPE [REPS], e.g. pass_bench 4194304x4 30";
    let shape = args.get(1).ok_or(usage)?;
    let dims = shape
        .split('x')
        .map(|d| {
            d.parse::<usize>()
                .map_err(|_| format!("bad shape {shape:?}: {usage}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let reps = match args.get(2) {
        Some(r) => r.parse().map_err(|_| format!("bad REPS {r:?}: {usage}"))?,
        None => 30,
    };
    Ok((dims, reps.max(1)))
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let (dims, reps) = parse(&args)?;
    let f = Factoring::of(&dims).ok_or("the shape must have at least two axes")?;
    let kernel = shaped::preferred(f);
    if kernel == Kernel::Rows || f.is_empty() {
        return Err(format!(
            "{dims:?} runs on the row loops of large matrices; time it with the step bench \
             (cargo run --release --example bench -p candle-adafactor -- --shape ..)"
        ));
    }
    let len = f.len();
    let (rows, cols) = (f.lead * f.n, f.lead * f.m);
    let g = values(7919, len);
    let mut x = values(104_729, len);
    let (r_old, c_old) = (vec![1e-3f32; rows], vec![1e-3f32; cols]);
    let mut fresh = Some(Fresh::zeroed(f));
    // The ideal's own buffers: the same sizes, statistics split across the jobs in proportion.
    let (gi, mut xi) = (vec![1u32; len], vec![2u32; len]);
    let (si, mut so) = (vec![3u32; rows + cols], vec![0u32; rows + cols]);
    let jobs = len.div_ceil(JOB).max(1);
    let per = (rows + cols).div_ceil(jobs).max(1);
    let mut times: [Vec<f64>; 4] = Default::default();
    for it in 0..reps + 3 {
        let t = Instant::now();
        let grad = Grad::plain(&g[..]);
        // A decay of 0.5: both terms of the statistics update count.
        let stat = StatArgs {
            r_old: &r_old,
            c_old: &c_old,
            beta2: 0.5,
            epsilon_1: 1e-30,
            scale: 1.0,
        };
        let reads = Reads {
            x: Some(&x[..]),
            decay: None,
            check: true,
        };
        let out = fresh.take().ok_or("statistics buffers")?;
        let (st, _) = shaped::statistics(&grad, reads, f, stat, out);
        let stats_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        shaped::write(&mut x, &grad, &st, f, 1e-9, 1.0, None, Rounding::Nearest);
        let write_ms = t.elapsed().as_secs_f64() * 1e3;
        fresh = Some(Fresh { r: st.r, c: st.c });

        let t = Instant::now();
        let key: u32 = gi
            .par_chunks(JOB)
            .zip(xi.par_chunks(JOB))
            .zip(si.par_chunks(per).zip(so.par_chunks_mut(per)))
            .map(|((g, x), (s, o))| {
                let a = g.iter().zip(x).fold(0u32, |a, (g, x)| a ^ g ^ x);
                for (s, o) in s.iter().zip(o.iter_mut()) {
                    *o = s ^ a;
                }
                a
            })
            .reduce(|| 0, |a, b| a ^ b);
        let ideal_stats_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        // In reverse, as the write pass runs its units.
        gi.par_chunks(JOB)
            .zip(xi.par_chunks_mut(JOB))
            .zip(so.par_chunks(per))
            .rev()
            .for_each(|((g, x), s)| {
                let k = s.iter().fold(key, |k, s| k ^ s);
                for (g, x) in g.iter().zip(x.iter_mut()) {
                    *x ^= g ^ k;
                }
            });
        let ideal_write_ms = t.elapsed().as_secs_f64() * 1e3;
        if it >= 3 {
            for (v, ms) in
                times
                    .iter_mut()
                    .zip([stats_ms, ideal_stats_ms, write_ms, ideal_write_ms])
            {
                v.push(ms);
            }
        }
    }
    let [s, is, w, iw] = times.map(|mut v| median(&mut v));
    println!(
        "pass_bench shape={} kernel={kernel:?} stats_ms={s:.3} ideal_stats_ms={is:.3} \
         stats_vs_ideal={:.2} write_ms={w:.3} ideal_write_ms={iw:.3} write_vs_ideal={:.2} \
         vs_ideal={:.2}",
        args[1],
        s / is,
        w / iw,
        (s + w) / (is + iw)
    );
    Ok(())
}
