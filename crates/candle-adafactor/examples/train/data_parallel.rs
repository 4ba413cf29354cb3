//! Data-parallel training of the `train` example's GPT: every rank starts from the same seeded
//! weights, draws the same batches, computes the gradient of its own share of each batch (an
//! equal slice of its sequences) and steps a [`DataParallel`] Adafactor, which averages the
//! gradients across the ranks. Shared by `examples/train_data_parallel.rs` (ranks are threads)
//! and the `adafactor-mpi` crate's `train_mpi` example (ranks are MPI processes).

use crate::data::Corpus;
use crate::training::{
    adafactor_config, train_with, RunResult, RunSpec, Share, Stepper, Tick, TrainConfig,
};
use adafactor::collective::Collective;
use candle_adafactor::{DataParallel, Mode};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// What one rank reports after a data-parallel run.
#[derive(Debug, Clone)]
pub struct RankResult {
    /// The run, as the single-process example reports it (`state_bytes`: this rank's;
    /// `train_loss`: on this rank's share of the batches).
    pub run: RunResult,
    /// This rank's index.
    pub rank: usize,
    /// The number of ranks.
    pub ranks: usize,
    /// The mode.
    pub mode: Mode,
}

impl RankResult {
    /// The `result ...` line of the single-process example (`state_bytes`: the sum over the
    /// ranks, `total`) plus `ranks`, `mode` and `state_bytes_per_rank` (the most a rank keeps,
    /// `most`).
    pub fn result_line(&self, total: usize, most: usize) -> String {
        format!(
            "{} ranks={} mode={} state_bytes_per_rank={}",
            self.run.result_line_with(total),
            self.ranks,
            self.mode.name(),
            most
        )
    }
}

/// A [`DataParallel`] Adafactor as the training loop's optimizer.
struct DataParallelStepper<'c>(DataParallel<'c>);

impl Stepper for DataParallelStepper<'_> {
    fn step(&mut self, grads: &GradStore, vars: &[(String, Var)]) -> Result<()> {
        let pairs: Vec<(Option<&Tensor>, &Var)> =
            vars.iter().map(|(_, v)| (grads.get(v), v)).collect();
        self.0.apply_gradients(&pairs).map(|_| ())
    }

    fn state_bytes(&self, _params: usize) -> usize {
        self.0.state_bytes()
    }
}

/// Trains the GPT with the Adafactor run `spec` on this rank of `comm`'s group. Evaluation runs
/// on every rank (the weights are the same everywhere); `on_tick` sees every step.
///
/// # Errors
/// An AdamW run, more ranks than sequences per batch, the group disagrees or fails, or a failed
/// tensor operation.
pub fn train_rank<'c>(
    corpus: &Corpus,
    spec: &RunSpec,
    cfg: &TrainConfig,
    comm: Box<dyn Collective + 'c>,
    mode: Mode,
    on_tick: &mut dyn FnMut(&Tick),
) -> Result<RankResult> {
    let config = adafactor_config(spec, cfg)?.ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "run `{}` is not an Adafactor run; data-parallel training runs Adafactor",
            spec.name
        ))
    })?;
    let share = Share {
        rank: comm.rank(),
        ranks: comm.world_size(),
    };
    let make = |vars: &[(String, Var)]| {
        DataParallel::new_named(vars.to_vec(), config, comm, mode).map(DataParallelStepper)
    };
    let run = train_with(corpus, spec, cfg, share, make, on_tick)?;
    Ok(RankResult {
        run,
        rank: share.rank,
        ranks: share.ranks,
        mode,
    })
}
