//! The data-parallel checks, one rank's side: each [`Case`] runs on every rank of a group and
//! fails on a rank with a message. The same cases run on a group of threads
//! (`tests/data_parallel.rs`) and on MPI processes (the `adafactor-mpi` crate's
//! `mpi_data_parallel` binary under `mpirun -np 2`).
//!
//! Each rank computes the reference itself: one process fed the averaged gradient (the
//! rank-order float32 sum of every rank's gradient divided by the number of ranks), and compares
//! its weights and its whole optimizer state with it after every step, bit for bit. All ranks
//! equal to the reference means the replicas are identical too.

#![allow(dead_code)] // each harness uses some of it

use adafactor::collective::Collective;
use candle_adafactor::{
    Adafactor, AdafactorConfig, DataParallel, LearningRateSchedule, Mode, OnNonFinite,
};
use candle_core::{DType, Device, Tensor, Var};
use std::ops::Range;
use std::path::PathBuf;

/// Steps per run: with gradient accumulation of 2, the last call accumulates only.
pub const STEPS: usize = 7;

/// Keras defaults at learning rate 0.1, and the configs that exercise each stage across ranks.
pub fn configs(jit: bool) -> Vec<(&'static str, AdafactorConfig)> {
    let b = AdafactorConfig {
        learning_rate: 0.1.into(),
        jit_compile: jit,
        ..Default::default()
    };
    vec![
        ("plain", b.clone()),
        (
            "clipnorm",
            AdafactorConfig {
                clipnorm: Some(0.5),
                clipvalue: None,
                ..b.clone()
            },
        ),
        (
            "global_clipnorm",
            AdafactorConfig {
                global_clipnorm: Some(0.5),
                ..b.clone()
            },
        ),
        (
            "everything",
            AdafactorConfig {
                learning_rate: LearningRateSchedule::cosine_decay(0.1, 10.0, 0.1, None, 0.0)
                    .expect("schedule")
                    .into(),
                weight_decay: Some(0.05),
                global_clipnorm: Some(1.0),
                use_ema: true,
                ema_momentum: 0.8,
                ema_overwrite_frequency: Some(3),
                gradient_accumulation_steps: Some(2),
                loss_scale_factor: Some(2.0),
                ..b
            },
        ),
    ]
}

fn everything(jit: bool) -> AdafactorConfig {
    configs(jit)
        .into_iter()
        .find(|(n, _)| *n == "everything")
        .map(|(_, c)| c)
        .expect("everything")
}

/// Rank 2, 1, 3 and 2 variables; `*/bias` is excluded from weight decay.
fn shapes() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("dense/kernel", vec![6, 5]),
        ("dense/bias", vec![5]),
        ("conv/kernel", vec![2, 3, 4]),
        ("out/kernel", vec![5, 6]),
    ]
}

fn initial_weights(dtype: DType) -> Vec<(String, Tensor)> {
    shapes()
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| ((i as f32) * 0.37 + k as f32).sin())
                .collect();
            let t = Tensor::from_vec(v, shape, &Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
                .expect("weight");
            (name.to_string(), t)
        })
        .collect()
}

fn vars_of(weights: &[(String, Tensor)]) -> Vec<(String, Var)> {
    weights
        .iter()
        .map(|(n, t)| (n.clone(), Var::from_tensor(t).expect("var")))
        .collect()
}

/// Where a NaN goes: `(rank, step)` (in the rank-3 variable).
type NanAt = Option<(usize, usize)>;

/// Rank `rank`'s gradients at step `step`.
fn rank_grads(rank: usize, step: usize, dtype: DType, nan_at: NanAt) -> Vec<Tensor> {
    shapes()
        .iter()
        .enumerate()
        .map(|(v, (_, shape))| {
            let n: usize = shape.iter().product();
            let mut g: Vec<f32> = (0..n)
                .map(|i| {
                    ((i as f32) * 0.61 + step as f32 * 0.7 + v as f32 + rank as f32 * 1.3).sin()
                        * 0.8
                })
                .collect();
            if nan_at == Some((rank, step)) && v == 2 {
                g[n / 2] = f32::NAN;
            }
            Tensor::from_vec(g, shape.as_slice(), &Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
                .expect("grad")
        })
        .collect()
}

/// The averaged gradient one process is fed: the rank-order float32 sum divided by the number
/// of ranks, in the variables' dtype.
fn averaged_grads(ranks: usize, step: usize, dtype: DType, nan_at: NanAt) -> Vec<Tensor> {
    let per_rank: Vec<Vec<Tensor>> = (0..ranks)
        .map(|r| rank_grads(r, step, dtype, nan_at))
        .collect();
    (0..shapes().len())
        .map(|v| {
            let mut sum = per_rank[0][v].to_dtype(DType::F32).expect("f32");
            for g in &per_rank[1..] {
                sum = (sum + g[v].to_dtype(DType::F32).expect("f32")).expect("add");
            }
            // A division, as the average is computed (`/ 3` and `* (1/3)` differ).
            let n = Tensor::new(ranks as f32, &Device::Cpu).expect("ranks");
            sum.broadcast_div(&n)
                .and_then(|t| t.to_dtype(dtype))
                .expect("average")
        })
        .collect()
}

/// Weights (as float32 bits: every weight dtype converts exactly) and the whole optimizer
/// state (file bytes) after a step.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    weights: Vec<Vec<u32>>,
    state: Vec<u8>,
    skipped: u64,
}

fn weight_bits(vars: &[(String, Var)]) -> Vec<Vec<u32>> {
    vars.iter()
        .map(|(_, v)| {
            v.as_tensor()
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("weights")
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

fn weights_from_bits(like: &[(String, Tensor)], bits: &[Vec<u32>]) -> Vec<(String, Tensor)> {
    like.iter()
        .zip(bits)
        .map(|((n, t), b)| {
            let v: Vec<f32> = b.iter().map(|x| f32::from_bits(*x)).collect();
            let w = Tensor::from_vec(v, t.shape(), &Device::Cpu)
                .and_then(|w| w.to_dtype(t.dtype()))
                .expect("weights");
            (n.clone(), w)
        })
        .collect()
}

type Steps = Vec<Result<Snapshot, String>>;

/// One process fed the averaged gradient of `ranks` ranks for `steps`, from `weights` and an
/// optional state file; a snapshot after each step (`Err` text for a refused step).
fn single(
    cfg: &AdafactorConfig,
    ranks: usize,
    dtype: DType,
    weights: &[(String, Tensor)],
    (state, steps): (Option<&PathBuf>, Range<usize>),
    nan_at: NanAt,
) -> Result<(Steps, Adafactor), String> {
    let vars = vars_of(weights);
    let mut opt = Adafactor::new_named(vars.clone(), cfg.clone()).map_err(|e| e.to_string())?;
    opt.exclude_from_weight_decay(&[], &["bias"])
        .map_err(|e| e.to_string())?;
    if let Some(p) = state {
        opt.load_state(p).map_err(|e| e.to_string())?;
    }
    let mut out = Vec::new();
    for step in steps {
        let g = averaged_grads(ranks, step, dtype, nan_at);
        let pairs: Vec<_> = g
            .iter()
            .zip(&vars)
            .map(|(g, (_, v))| (Some(g), v))
            .collect();
        out.push(
            opt.apply_gradients(&pairs)
                .map_err(|e| e.to_string())
                .map(|_| Snapshot {
                    weights: weight_bits(&vars),
                    state: opt.to_safetensors_bytes().expect("state"),
                    skipped: opt.skipped_steps(),
                }),
        );
    }
    Ok((out, opt))
}

/// One rank's run: builds, loads, steps (a snapshot after each), saves.
struct Run<'a> {
    cfg: &'a AdafactorConfig,
    mode: Mode,
    dtype: DType,
    weights: &'a [(String, Tensor)],
    load: Option<&'a PathBuf>,
    steps: Range<usize>,
    nan_at: NanAt,
    save: Option<&'a PathBuf>,
    /// Calls `finalize_variable_values` after the steps (one more snapshot).
    finalize: bool,
}

fn rank_run<'c>(run: &Run<'_>, comm: Box<dyn Collective + 'c>) -> Result<Steps, String> {
    let e = |e: candle_core::Error| e.to_string();
    let r = comm.rank();
    let vars = vars_of(run.weights);
    let mut dp =
        DataParallel::new_named(vars.clone(), run.cfg.clone(), comm, run.mode).map_err(e)?;
    dp.exclude_from_weight_decay(&[], &["bias"]).map_err(e)?;
    if let Some(p) = run.load {
        dp.load_state(p).map_err(e)?;
    }
    let mut out = Vec::new();
    for step in run.steps.clone() {
        let g = rank_grads(r, step, run.dtype, run.nan_at);
        let pairs: Vec<_> = g
            .iter()
            .zip(&vars)
            .map(|(g, (_, v))| (Some(g), v))
            .collect();
        let applied = dp.apply_gradients(&pairs).map_err(e);
        let state = dp
            .state_dict()
            .and_then(|sd| sd.to_safetensors_bytes())
            .map_err(e)?;
        out.push(applied.map(|_| Snapshot {
            weights: weight_bits(&vars),
            state,
            skipped: dp.optimizer().skipped_steps(),
        }));
    }
    if let Some(p) = run.save {
        dp.save_state(p).map_err(e)?;
    }
    if run.finalize {
        dp.finalize_variable_values().map_err(e)?;
        out.push(Ok(Snapshot {
            weights: weight_bits(&vars),
            state: Vec::new(),
            skipped: dp.optimizer().skipped_steps(),
        }));
    }
    Ok(out)
}

fn same(
    what: &str,
    got: &[Result<Snapshot, String>],
    want: &[Result<Snapshot, String>],
) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} steps, want {}", got.len(), want.len()));
    }
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        match (g, w) {
            (Ok(g), Ok(w)) => {
                if g.weights != w.weights {
                    return Err(format!("{what}: weights differ after step {k}"));
                }
                if g.skipped != w.skipped {
                    return Err(format!(
                        "{what}: {} skipped steps after step {k}, want {}",
                        g.skipped, w.skipped
                    ));
                }
                if g.state != w.state {
                    return Err(format!("{what}: optimizer state differs after step {k}"));
                }
            }
            (Err(_), Err(_)) => {}
            _ => return Err(format!("{what}: step {k}: {g:?} vs {w:?}")),
        }
    }
    Ok(())
}

/// A checkpoint file every rank of a group names the same way (`tag` tells runs apart).
fn shared_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("adafactor-dp-check-{tag}.safetensors"))
}

/// One check, run on every rank of a group.
#[derive(Debug, Clone)]
pub enum Case {
    /// The mode on every rank equals one process fed the averaged gradient, after every step
    /// and after `finalize_variable_values`.
    Equivalence {
        /// A name of [`configs`].
        config: &'static str,
        /// The data path.
        jit: bool,
        /// The weights' dtype.
        dtype: DType,
        /// The mode.
        mode: Mode,
    },
    /// A NaN in rank 1's gradient at `step`: every rank skips (or refuses) that step as one
    /// process fed the average does.
    NonFinite {
        /// `on_nonfinite`.
        policy: OnNonFinite,
        /// The mode.
        mode: Mode,
        /// The step (with accumulation of 2, odd steps update, even ones accumulate).
        step: usize,
    },
    /// Sharded checkpoint of 4 steps loaded by one process (`to_one`) or a one-process
    /// checkpoint loaded by the group: the run continues bit-exactly. `tag` names the file.
    Checkpoint {
        /// True: the group saves, one process loads; false: the reverse.
        to_one: bool,
        /// The data path.
        jit: bool,
        /// Names the shared file (unique per run of the checks).
        tag: String,
    },
    /// Rank 1 builds with another config or variables: an error on every rank.
    Mismatch {
        /// `config`, `shape`, `name` or `invalid`.
        what: &'static str,
    },
    /// Rank 1's gradient has the wrong shape: the step fails on every rank, nothing changes.
    RefusedStep,
    /// A sharded rank keeps at most 55% of the optimizer state of one process.
    StateBytes,
}

/// Every case, for a group of `ranks` (the checkpoint files are named with `tag`).
pub fn cases(tag: &str) -> Vec<Case> {
    let mut out = Vec::new();
    for jit in [true, false] {
        for (config, _) in configs(jit) {
            for dtype in [DType::F32, DType::BF16] {
                if dtype == DType::BF16 && config != "everything" {
                    continue;
                }
                for mode in [Mode::Replicated, Mode::Sharded] {
                    out.push(Case::Equivalence {
                        config,
                        jit,
                        dtype,
                        mode,
                    });
                }
            }
        }
    }
    for policy in [OnNonFinite::Skip, OnNonFinite::Error] {
        for mode in [Mode::Replicated, Mode::Sharded] {
            for step in [3, 4] {
                out.push(Case::NonFinite { policy, mode, step });
            }
        }
    }
    for jit in [true, false] {
        for to_one in [true, false] {
            out.push(Case::Checkpoint {
                to_one,
                jit,
                tag: format!("{tag}-{jit}-{to_one}"),
            });
        }
    }
    for what in ["config", "shape", "name", "invalid"] {
        out.push(Case::Mismatch { what });
    }
    out.push(Case::RefusedStep);
    out.push(Case::StateBytes);
    out
}

impl Case {
    /// A short name for reports.
    pub fn name(&self) -> String {
        match self {
            Case::Equivalence {
                config,
                jit,
                dtype,
                mode,
            } => format!(
                "{} equals one process: {config} {dtype:?} jit={jit}",
                mode.name()
            ),
            Case::NonFinite { policy, mode, step } => {
                format!("{} NaN on rank 1 at step {step}: {policy:?}", mode.name())
            }
            Case::Checkpoint { to_one, jit, .. } => format!(
                "sharded checkpoint {} jit={jit}",
                if *to_one {
                    "ranks -> 1 process"
                } else {
                    "1 process -> ranks"
                }
            ),
            Case::Mismatch { what } => format!("ranks disagree at build: {what}"),
            Case::RefusedStep => "a step one rank refuses fails on every rank".into(),
            Case::StateBytes => "a sharded rank keeps about 1/ranks of the state".into(),
        }
    }

    /// The file a checkpoint case writes, for the harness to remove once every rank is done.
    pub fn file(&self) -> Option<PathBuf> {
        match self {
            Case::Checkpoint { tag, .. } => Some(shared_path(tag)),
            _ => None,
        }
    }

    /// Runs this case on this rank of a group of `comm.world_size()` ranks.
    ///
    /// # Errors
    /// The check failed on this rank (the message says how).
    pub fn run<'c>(&self, comm: Box<dyn Collective + 'c>) -> Result<(), String> {
        let ranks = comm.world_size();
        let rank = comm.rank();
        match self {
            Case::Equivalence {
                config,
                jit,
                dtype,
                mode,
            } => {
                let cfg = configs(*jit)
                    .into_iter()
                    .find(|(n, _)| n == config)
                    .map(|(_, c)| c)
                    .ok_or("unknown config")?;
                let weights = initial_weights(*dtype);
                let (want, reference) =
                    single(&cfg, ranks, *dtype, &weights, (None, 0..STEPS), None)?;
                let vars_ref: Vec<(String, Var)> = reference
                    .trainable_variables()
                    .iter()
                    .map(|(n, v)| (n.to_string(), (*v).clone()))
                    .collect();
                if let Some(Err(e)) = want.iter().find(|s| s.is_err()) {
                    return Err(format!("the reference run fails: {e}"));
                }
                let run = Run {
                    cfg: &cfg,
                    mode: *mode,
                    dtype: *dtype,
                    weights: &weights,
                    load: None,
                    steps: 0..STEPS,
                    nan_at: None,
                    save: None,
                    finalize: true,
                };
                let mut want = want;
                let refs: Vec<&Var> = vars_ref.iter().map(|(_, v)| v).collect();
                reference
                    .finalize_variable_values(&refs)
                    .map_err(|e| e.to_string())?;
                want.push(Ok(Snapshot {
                    weights: weight_bits(&vars_ref),
                    state: Vec::new(),
                    skipped: reference.skipped_steps(),
                }));
                same(&format!("rank {rank}"), &rank_run(&run, comm)?, &want)
            }
            Case::NonFinite { policy, mode, step } => {
                let cfg = AdafactorConfig {
                    on_nonfinite: *policy,
                    ..everything(true)
                };
                let weights = initial_weights(DType::F32);
                let nan_at = Some((1 % ranks, *step));
                let (want, _) =
                    single(&cfg, ranks, DType::F32, &weights, (None, 0..STEPS), nan_at)?;
                let run = Run {
                    cfg: &cfg,
                    mode: *mode,
                    dtype: DType::F32,
                    weights: &weights,
                    load: None,
                    steps: 0..STEPS,
                    nan_at,
                    save: None,
                    finalize: false,
                };
                let got = rank_run(&run, comm)?;
                match (policy, &got[STEPS - 1], &got[*step]) {
                    (OnNonFinite::Skip, Ok(last), _) if last.skipped == 1 => {}
                    (OnNonFinite::Error, _, Err(e))
                        if e.contains("non-finite") || e.contains("NaN") => {}
                    (_, last, at) => {
                        return Err(format!("rank {rank}: step {step}: {at:?}; last: {last:?}"))
                    }
                }
                same(&format!("rank {rank}"), &got, &want)
            }
            Case::Checkpoint { to_one, jit, tag } => {
                let cfg = everything(*jit);
                let dtype = DType::F32;
                let weights = initial_weights(dtype);
                let stop = 4;
                let (want, _) = single(&cfg, ranks, dtype, &weights, (None, 0..STEPS), None)?;
                let path = shared_path(tag);
                let result = if *to_one {
                    let run = Run {
                        cfg: &cfg,
                        mode: Mode::Sharded,
                        dtype,
                        weights: &weights,
                        load: None,
                        steps: 0..stop,
                        nan_at: None,
                        save: Some(&path),
                        finalize: false,
                    };
                    let first = rank_run(&run, comm)?;
                    let at_stop = first[stop - 1].clone()?;
                    // The model weights are saved apart from the optimizer state.
                    let resumed_from = weights_from_bits(&weights, &at_stop.weights);
                    let (resumed, _) = single(
                        &cfg,
                        ranks,
                        dtype,
                        &resumed_from,
                        (Some(&path), stop..STEPS),
                        None,
                    )?;
                    same(&format!("rank {rank}"), &resumed, &want[stop..])
                } else {
                    let (_, opt) = single(&cfg, ranks, dtype, &weights, (None, 0..stop), None)?;
                    let mut comm = comm;
                    if rank == 0 {
                        opt.save_state(&path).map_err(|e| e.to_string())?;
                    }
                    comm.barrier().map_err(|e| e.to_string())?;
                    let mid = want[stop - 1].clone()?;
                    let mid_weights = weights_from_bits(&weights, &mid.weights);
                    let run = Run {
                        cfg: &cfg,
                        mode: Mode::Sharded,
                        dtype,
                        weights: &mid_weights,
                        load: Some(&path),
                        steps: stop..STEPS,
                        nan_at: None,
                        save: None,
                        finalize: false,
                    };
                    same(
                        &format!("rank {rank}"),
                        &rank_run(&run, comm)?,
                        &want[stop..],
                    )
                };
                result
            }
            Case::Mismatch { what } => {
                let mut cfg = AdafactorConfig::default();
                let mut vars = vars_of(&initial_weights(DType::F32));
                if rank == 1 {
                    match *what {
                        "config" => cfg.weight_decay = Some(0.1),
                        "shape" => {
                            vars[1].1 = Var::zeros(7, DType::F32, &Device::Cpu)
                                .map_err(|e| e.to_string())?
                        }
                        "name" => vars[0].0 = "renamed".into(),
                        _ => cfg.ema_momentum = 2.0,
                    }
                }
                match DataParallel::new_named(vars, cfg, comm, Mode::Sharded) {
                    Ok(_) => Err(format!("rank {rank} built although the ranks disagree")),
                    Err(e) => {
                        let e = e.to_string();
                        if e.contains("disagree")
                            || (*what == "invalid" && e.contains("ema_momentum"))
                        {
                            Ok(())
                        } else {
                            Err(format!("rank {rank}: unexpected error: {e}"))
                        }
                    }
                }
            }
            Case::RefusedStep => {
                let weights = initial_weights(DType::F32);
                let vars = vars_of(&weights);
                let cfg = AdafactorConfig::with_learning_rate(0.1);
                let mut dp = DataParallel::new_named(vars.clone(), cfg, comm, Mode::Sharded)
                    .map_err(|e| e.to_string())?;
                let mut g = rank_grads(rank, 0, DType::F32, None);
                if rank == 1 {
                    g[0] = Tensor::zeros((5, 6), DType::F32, &Device::Cpu)
                        .map_err(|e| e.to_string())?;
                }
                let pairs: Vec<_> = g
                    .iter()
                    .zip(&vars)
                    .map(|(g, (_, v))| (Some(g), v))
                    .collect();
                let e = match dp.apply_gradients(&pairs) {
                    Ok(_) => return Err(format!("rank {rank} stepped although rank 1 refused")),
                    Err(e) => e.to_string(),
                };
                let want = if rank == 1 { "shape" } else { "disagree" };
                if !e.contains(want) {
                    return Err(format!("rank {rank}: unexpected error: {e}"));
                }
                if weight_bits(&vars) != weight_bits(&vars_of(&weights)) {
                    return Err(format!("rank {rank}: the weights changed"));
                }
                Ok(())
            }
            Case::StateBytes => {
                let cfg = everything(true);
                // Equal variables, a multiple of the ranks: each rank owns the same number.
                let weights: Vec<(String, Tensor)> = (0..4 * ranks)
                    .map(|i| {
                        let t = Tensor::ones((32, 32), DType::F32, &Device::Cpu).expect("w");
                        (format!("w{i}"), t)
                    })
                    .collect();
                let full = Adafactor::new_named(vars_of(&weights), cfg.clone())
                    .map_err(|e| e.to_string())?
                    .state_bytes();
                let dp = DataParallel::new_named(vars_of(&weights), cfg, comm, Mode::Sharded)
                    .map_err(|e| e.to_string())?;
                let bytes = dp.state_bytes();
                // EMA and accumulator: 2 x 4 KiB per variable; statistics: 256 bytes.
                if bytes * 100 * ranks > full * 110 {
                    return Err(format!(
                        "rank {rank} keeps {bytes} of {full} bytes of optimizer state"
                    ));
                }
                Ok(())
            }
        }
    }
}
