//! Times one `Adafactor::apply_gradients` step on a fixed parameter set and, in the same run,
//! the two yardsticks it is judged by: the machine's memory bandwidth and the configuration's
//! roofline.
//!
//! ```text
//! cargo run --release --example bench -- (--set <t5-small|t5-base|resnet50|tiny|many-small>
//!     | --shape 4x4194304) [--path fused|composed] [--steps N] [--dtype f32|bf16|f16]
//!     [--warmup W] [--triad-mib M] [--triad-reps R] [--config '<Keras config JSON>']
//!     [--factor-convolutions on|off]
//! ```
//!
//! `--path` defaults to `fused` and `--steps` to 20; `--config` merges Keras config keys over
//! the defaults. `--factor-convolutions on` calls `Adafactor::factor_convolutions` (every rank 3
//! to 5 tensor, candle's `[out, in, k...]` convolution weights, factored over `(in, out)` as
//! Keras factors the same convolution) and prints the state's size against the weights'.
//!
//! Weights are normal(0, 0.02) and gradients normal(0, 1e-3), both from a seeded splitmix64
//! generator (one stream per tensor); one gradient set is made once and reused every step, as
//! the peer script `bench/peers.py` does. The memory bandwidth is a STREAM-style triad
//! `a[i] = b[i] + s * c[i]` over three float32 arrays of `--triad-mib` MiB each (default 256),
//! multi-threaded with rayon over all cores, best of `--triad-reps` repetitions, counting 12 bytes
//! per element as STREAM does. The roofline (`bench/ideal.rs`) is a kernel that moves exactly the
//! bytes this configuration must move, with trivial arithmetic, over buffers of the same sizes,
//! timed over the same call sequence. Both run before the parameters are made; their buffers
//! are freed and the process's peak-RSS counter is reset (`/proc/self/clear_refs`), so
//! `peak_rss_mib` is the optimizer run's own peak.
//!
//! The last line is machine-readable:
//! `bench set=.. path=.. dtype=.. params=.. tensors=.. median_ms=.. min_ms=.. triad_gbps=..
//! floor_ms=.. state_bytes=.. peak_rss_mib=.. ideal_ms=.. vs_ideal=.. bytes_per_param=..
//! cpu_ms=..`, where `vs_ideal = median_ms / ideal_ms`, `floor_ms = 24 bytes x params / triad
//! bandwidth` (kept for comparison with older runs; the ideal is the bound that counts) and
//! `cpu_ms` the CPU time of all the process's threads per timed step: unlike wall time it does
//! not grow when other processes take the cores, so it compares two configurations' work on a
//! busy machine.

#[path = "bench/ideal.rs"]
mod ideal;

use adafactor::Strided;
use candle_adafactor::{Adafactor, AdafactorConfig, DataPath, FactoredAxes};
use candle_core::{DType, Device, Tensor, Var, WithDType};
use rayon::prelude::*;
use std::error::Error;
use std::time::Instant;

type BoxResult<T> = Result<T, Box<dyn Error>>;

const USAGE: &str = "usage: bench (--set <t5-small|t5-base|resnet50|tiny|many-small> | --shape AxB..) [--path fused|composed] \
[--steps N] [--dtype f32|bf16|f16] [--warmup W] [--triad-mib M] [--triad-reps R] \
[--config '<Keras config JSON, merged over the defaults>'] [--factor-convolutions on|off]";

/// Command-line options.
#[derive(Debug)]
struct Args {
    set: String,
    path: String,
    steps: usize,
    dtype: DType,
    warmup: usize,
    triad_mib: usize,
    triad_reps: usize,
    config: AdafactorConfig,
    factor_convolutions: bool,
}

fn parse_args() -> BoxResult<Args> {
    let mut args = Args {
        set: String::new(),
        path: "fused".to_string(),
        steps: 20,
        dtype: DType::F32,
        warmup: 2,
        triad_mib: 256,
        triad_reps: 10,
        config: AdafactorConfig::default(),
        factor_convolutions: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .ok_or_else(|| format!("option `{flag}` needs a value\n{USAGE}"))?;
        let number = |v: &str| -> BoxResult<usize> {
            v.parse::<usize>()
                .map_err(|e| format!("option `{flag}`: `{v}` is not a count ({e})").into())
        };
        match flag.as_str() {
            "--set" => args.set = value,
            "--shape" => args.set = format!("shape:{value}"),
            "--path" => args.path = value,
            "--steps" => args.steps = number(&value)?,
            "--warmup" => args.warmup = number(&value)?,
            "--triad-mib" => args.triad_mib = number(&value)?,
            "--triad-reps" => args.triad_reps = number(&value)?,
            "--config" => args.config = merged_config(&value)?,
            "--factor-convolutions" => {
                args.factor_convolutions = match value.as_str() {
                    "on" => true,
                    "off" => false,
                    other => {
                        return Err(
                            format!("--factor-convolutions `{other}`: expected on or off").into(),
                        )
                    }
                }
            }
            "--dtype" => {
                args.dtype = match value.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    other => {
                        return Err(format!("--dtype `{other}`: expected f32, bf16 or f16").into())
                    }
                }
            }
            other => return Err(format!("unknown option `{other}`\n{USAGE}").into()),
        }
    }
    if args.set.is_empty() {
        return Err(format!("--set or --shape is required\n{USAGE}").into());
    }
    if args.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    if args.path != "fused" && args.path != "composed" {
        return Err(format!("--path `{}`: expected fused or composed", args.path).into());
    }
    if args.triad_mib == 0 || args.triad_reps == 0 {
        return Err("--triad-mib and --triad-reps must be at least 1".into());
    }
    Ok(args)
}

/// The default config with the keys of a Keras config JSON object replaced, e.g.
/// `{"global_clipnorm": 1.0, "weight_decay": 0.01}`.
fn merged_config(json: &str) -> BoxResult<AdafactorConfig> {
    let given: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("--config: not JSON ({e})"))?;
    let given = given
        .as_object()
        .ok_or("--config: expected a JSON object of Keras config keys")?;
    let mut config = AdafactorConfig::default().to_keras_config();
    let fields = config
        .as_object_mut()
        .ok_or("internal: the Keras config is not an object")?;
    for (k, v) in given {
        fields.insert(k.clone(), v.clone());
    }
    Ok(AdafactorConfig::from_keras_config(&config)?)
}

/// The parameter shapes of a set, in the order `bench/peers.py` uses, or the single tensor of a
/// `--shape` (`shape:4x4194304`).
fn shapes(set: &str) -> BoxResult<Vec<Vec<usize>>> {
    if let Some(dims) = set.strip_prefix("shape:") {
        let dims = dims
            .split('x')
            .map(|d| {
                d.parse::<usize>()
                    .map_err(|e| format!("--shape `{dims}`: `{d}` ({e})"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if dims.iter().product::<usize>() == 0 {
            return Err(format!("--shape `{set}`: no elements").into());
        }
        return Ok(vec![dims]);
    }
    // A transformer block's matrices and the two layer-norm vectors, `blocks` times.
    let blocks = |s: &mut Vec<Vec<usize>>, n: usize, d: usize, ff: usize| {
        for _ in 0..n {
            s.extend(std::iter::repeat_n(vec![d, d], 4));
            s.push(vec![d, ff]);
            s.push(vec![ff, d]);
            s.push(vec![d]);
            s.push(vec![d]);
        }
    };
    match set {
        "t5-small" | "t5small" => {
            let mut s = vec![vec![32128, 512]];
            blocks(&mut s, 6, 512, 2048);
            Ok(s)
        }
        "t5-base" | "t5base" => {
            // About 223M parameters: larger than any last-level cache.
            let mut s = vec![vec![32128, 768]];
            blocks(&mut s, 24, 768, 3072);
            s.extend(std::iter::repeat_n(vec![768, 768], 48)); // cross-attention
            Ok(s)
        }
        "resnet50" => Ok(resnet50()),
        "tiny" => Ok(vec![
            vec![256, 256],
            vec![256],
            vec![256, 1024],
            vec![1024, 256],
        ]),
        "many-small" => Ok(vec![vec![64, 64]; 10_000]),
        other => Err(format!(
            "--set `{other}`: expected t5-small, t5-base, resnet50, tiny or many-small"
        )
        .into()),
    }
}

/// ResNet-50's 161 parameter tensors in candle's layout (`[out, in, kh, kw]` convolution
/// kernels, then batch-norm scale and shift vectors), as `bench/peers.py --set resnet50`.
fn resnet50() -> Vec<Vec<usize>> {
    let mut s = vec![vec![64, 3, 7, 7], vec![64], vec![64]];
    let mut cin = 64;
    for (mid, out, n) in [(64, 256, 3), (128, 512, 4), (256, 1024, 6), (512, 2048, 3)] {
        for b in 0..n {
            for conv in [
                vec![mid, cin, 1, 1],
                vec![mid, mid, 3, 3],
                vec![out, mid, 1, 1],
            ] {
                let c = conv[0];
                s.extend([conv, vec![c], vec![c]]);
            }
            if b == 0 {
                s.extend([vec![out, cin, 1, 1], vec![out], vec![out]]);
            }
            cin = out;
        }
    }
    s.extend([vec![1000, 2048], vec![1000]]);
    s
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// splitmix64: a small, well-mixed 64-bit generator.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: 53 random bits, never zero (so `ln` is finite).
    fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// `n` normal(0, std) values (Box-Muller) from the stream `seed`, converted by `conv`.
fn normals<T>(seed: u64, n: usize, std: f64, conv: fn(f32) -> T) -> Vec<T> {
    let mut rng = SplitMix64(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let r = (-2.0 * rng.next_open01().ln()).sqrt() * std;
        let theta = std::f64::consts::TAU * rng.next_open01();
        out.push(conv((r * theta.cos()) as f32));
        if out.len() < n {
            out.push(conv((r * theta.sin()) as f32));
        }
    }
    out
}

/// One variable and one gradient per shape, generated in parallel (one stream per tensor) and
/// moved into candle storage without a copy.
fn make_tensors<T: WithDType + Send>(
    shapes: &[Vec<usize>],
    conv: fn(f32) -> T,
) -> BoxResult<(Vec<Var>, Vec<Tensor>)> {
    let dev = Device::Cpu;
    let gen = |base: u64, std: f64| -> Vec<Vec<T>> {
        shapes
            .par_iter()
            .enumerate()
            .map(|(i, s)| normals(base + i as u64, s.iter().product(), std, conv))
            .collect()
    };
    let mut vars = Vec::with_capacity(shapes.len());
    for (data, s) in gen(0x5EED_0000_0000, 0.02).into_iter().zip(shapes) {
        vars.push(Var::from_vec(data, s.as_slice(), &dev)?);
    }
    let mut grads = Vec::with_capacity(shapes.len());
    for (data, s) in gen(0x6EAD_0000_0000, 1e-3).into_iter().zip(shapes) {
        grads.push(Tensor::from_vec(data, s.as_slice(), &dev)?);
    }
    Ok((vars, grads))
}

/// STREAM-style triad over three float32 arrays of `mib` MiB each, on every rayon thread; the
/// best of `reps` repetitions, in GB/s (1e9 bytes), counting 12 bytes per element.
fn triad_gbps(mib: usize, reps: usize) -> f64 {
    const CHUNK: usize = 1 << 16;
    let n = mib * 1024 * 1024 / 4;
    let mut a = vec![0f32; n];
    let mut b = vec![0f32; n];
    let mut c = vec![0f32; n];
    // First touch on the worker threads, so that page faults stay out of the timed loops.
    a.par_chunks_mut(CHUNK).for_each(|x| x.fill(0.0));
    b.par_chunks_mut(CHUNK).for_each(|x| x.fill(1.0));
    c.par_chunks_mut(CHUNK).for_each(|x| x.fill(2.0));
    let s = std::hint::black_box(3.0f32);
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        a.par_chunks_mut(CHUNK)
            .zip(b.par_chunks(CHUNK))
            .zip(c.par_chunks(CHUNK))
            .for_each(|((a, b), c)| {
                for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
                    *x = y + s * z;
                }
            });
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&mut a);
    }
    (12 * n) as f64 / best / 1e9
}

/// Reads a `/proc/self/status` field in KiB (`VmHWM`, `VmRSS`).
fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// CPU time of all the process's threads so far, in ms (`/proc/self/task/*/schedstat` starts
/// with a thread's time on a CPU in ns); `None` where that is not available.
fn cpu_ms() -> Option<f64> {
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(entry.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total as f64 / 1e6)
}

/// Float32 statistics per tensor: one per row and one per column of every factored matrix
/// (the last two axes, or `(in, out)` of a convolution kernel with `--factor-convolutions on`),
/// one per element of a vector.
fn stat_lens(shapes: &[Vec<usize>], factor_convolutions: bool) -> Vec<usize> {
    let names: Vec<String> = (0..shapes.len()).map(|i| format!("p{i}")).collect();
    let convolutions = if factor_convolutions {
        FactoredAxes::convolutions(
            names
                .iter()
                .map(String::as_str)
                .zip(shapes.iter().map(|s| &s[..])),
        )
    } else {
        Default::default()
    };
    names
        .iter()
        .zip(shapes)
        .map(|(name, shape)| {
            let axes = convolutions
                .get(name)
                .copied()
                .or(FactoredAxes::keras(shape.len()));
            match axes {
                Some(axes) => {
                    let s = Strided::of(shape, axes);
                    let (rows, cols) = s.rows_cols();
                    s.batch() * (rows + cols)
                }
                None => shape.iter().product(),
            }
        })
        .collect()
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench: {e}");
        std::process::exit(2);
    }
}

fn run() -> BoxResult<()> {
    let args = parse_args()?;
    let shapes = shapes(&args.set)?;
    let set = if args.set == "t5small" {
        "t5-small"
    } else {
        args.set.as_str()
    };
    let dtype = dtype_name(args.dtype);
    let threads = rayon::current_num_threads();

    let triad = triad_gbps(args.triad_mib, args.triad_reps);
    println!(
        "triad arrays=3x{} MiB threads={threads} reps={} best_gbps={triad:.2}",
        args.triad_mib, args.triad_reps
    );
    // The roofline: the same call sequence on buffers of the same sizes, moving only the bytes
    // this configuration must move.
    let lens: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
    let on = |v: Option<f64>| v.is_some_and(|v| v > 0.0);
    let traffic = ideal::Traffic {
        elem_bytes: args.dtype.size_in_bytes(),
        norm_pass: on(args.config.clipnorm) || on(args.config.global_clipnorm),
        ema: args.config.use_ema,
        accumulation: args.config.gradient_accumulation_steps.filter(|k| *k >= 2),
    };
    let stat_lens = stat_lens(&shapes, args.factor_convolutions);
    let ideal_times = ideal::Ideal::new(&lens, &stat_lens, traffic).time(args.warmup, args.steps);
    let mut sorted_ideal = ideal_times.clone();
    sorted_ideal.sort_by(f64::total_cmp);
    let ideal_ms = median(&sorted_ideal);
    let stats_per_param =
        stat_lens.iter().sum::<usize>() as f64 / lens.iter().sum::<usize>().max(1) as f64;
    let bytes_per_param = traffic.mean_bytes_per_param(stats_per_param);
    println!(
        "ideal bytes_per_param={bytes_per_param:.1} median_ms={ideal_ms:.3} gbps={:.2}",
        bytes_per_param * lens.iter().sum::<usize>() as f64 / (ideal_ms * 1e6)
    );
    // The triad and ideal buffers are freed; restart the peak-RSS counter so it covers the step
    // alone.
    let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();

    let (vars, grads) = match args.dtype {
        DType::BF16 => make_tensors(&shapes, half::bf16::from_f32)?,
        DType::F16 => make_tensors(&shapes, half::f16::from_f32)?,
        _ => make_tensors(&shapes, |x| x)?,
    };
    let params: usize = vars.iter().map(|v| v.elem_count()).sum();
    let tensors = vars.len();
    let named = vars
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("p{i}"), v.clone()))
        .collect();
    let config = AdafactorConfig {
        jit_compile: args.path == "fused",
        ..args.config.clone()
    };
    let mut opt = Adafactor::new_named(named, config)?;
    if args.factor_convolutions {
        let set = opt.factor_convolutions()?;
        println!("factor_convolutions tensors={}", set.len());
    }
    let data_path = opt.data_path();
    println!(
        "data_path={data_path:?} requested={} set={set} dtype={dtype} params={params} tensors={tensors}",
        args.path
    );
    if args.path == "fused" && data_path == DataPath::Composed {
        println!("note: the fused kernels do not apply here; this run used composed ops");
    }

    let pairs: Vec<(Option<&Tensor>, &Var)> = grads.iter().map(Some).zip(vars.iter()).collect();
    for _ in 0..args.warmup {
        opt.apply_gradients(&pairs)?;
    }
    let mut times = Vec::with_capacity(args.steps);
    let cpu_before = cpu_ms();
    for _ in 0..args.steps {
        let t = Instant::now();
        opt.apply_gradients(&pairs)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let cpu_per_step = match (cpu_before, cpu_ms()) {
        (Some(a), Some(b)) => format!("{:.3}", (b - a) / args.steps.max(1) as f64),
        _ => "unknown".to_string(),
    };
    // Every call is an update, or every k-th with gradient accumulation.
    let applies = (args.warmup + args.steps) as u64;
    let expected = applies / args.config.gradient_accumulation_steps.unwrap_or(1).max(1);
    if opt.iterations() != expected {
        return Err(format!(
            "the optimizer counted {} iterations after {applies} applies (expected {expected})",
            opt.iterations()
        )
        .into());
    }
    let detail: Vec<String> = times.iter().map(|t| format!("{t:.2}")).collect();
    println!("step_ms {}", detail.join(" "));

    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median_ms = median(&sorted);
    let min_ms = sorted[0];
    let elem_bytes = args.dtype.size_in_bytes();
    let mib = |bytes: usize| bytes as f64 / (1024.0 * 1024.0);
    let weights_bytes = params * elem_bytes;
    let budget = mib(2 * weights_bytes) * 1.1 + 64.0;
    let hwm = proc_status_kib("VmHWM:").map(|k| k as f64 / 1024.0);
    println!(
        "memory params_mib={:.1} grads_mib={:.1} state_mib={:.2} lean_budget_mib={budget:.1} \
         peak_rss_mib={} peak_since={}",
        mib(weights_bytes),
        mib(weights_bytes),
        mib(opt.state_bytes()),
        hwm.map_or("unknown".to_string(), |h| format!("{h:.1}")),
        if hwm_reset {
            "after-triad"
        } else {
            "process-start"
        },
    );
    println!(
        "state state_bytes={} weights_bytes={weights_bytes} state_pct_of_weights={:.3} \
         factor_convolutions={}",
        opt.state_bytes(),
        100.0 * opt.state_bytes() as f64 / weights_bytes.max(1) as f64,
        if args.factor_convolutions {
            "on"
        } else {
            "off"
        }
    );
    if args.dtype != DType::F32 {
        // A 16-bit step moves half the bytes of a float32 one (statistics aside).
        println!(
            "floor_{dtype}_ms={:.3} (12 bytes/param at the triad bandwidth)",
            12.0 * params as f64 / (triad * 1e9) * 1e3
        );
    }
    let floor_ms = 24.0 * params as f64 / (triad * 1e9) * 1e3;
    // On the last line too, so that memory growth shows in every benchmark run.
    let peak_rss = hwm.map_or("unknown".to_string(), |h| format!("{h:.1}"));
    println!(
        "bench set={set} path={} dtype={dtype} params={params} tensors={tensors} \
         median_ms={median_ms:.4} min_ms={min_ms:.4} triad_gbps={triad:.2} floor_ms={floor_ms:.3} \
         state_bytes={} peak_rss_mib={peak_rss} ideal_ms={ideal_ms:.4} vs_ideal={:.3} \
         bytes_per_param={bytes_per_param:.1} cpu_ms={cpu_per_step}",
        args.path,
        opt.state_bytes(),
        median_ms / ideal_ms
    );
    Ok(())
}
