//! Data-parallel training of the `train` example's model: every rank starts from the same
//! seeded weights, sees the same batches, computes the gradient of its own share of each batch
//! (an equal slice of its rows) and steps a [`DataParallel`] Adafactor, which averages the
//! gradients across the ranks. Shared by `examples/train_data_parallel.rs` (ranks are threads)
//! and the `adafactor-mpi` crate's `train_mpi` example (ranks are MPI processes).

use crate::training::{
    build_model, measure_point, Point, RunResult, RunSpec, SplitMix64, TrainConfig, WineData,
};
use adafactor::collective::Collective;
use candle_adafactor::{AdafactorConfig, DataParallel, Mode};
use candle_core::{Device, Module, Result, Tensor, Var};
use std::time::Instant;

/// What one rank reports after a data-parallel run.
#[derive(Debug, Clone)]
pub struct RankResult {
    /// The run, as the single-process example reports it (`state_bytes`: this rank's).
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
        let last = self.run.last();
        format!(
            "result optimizer={} test_accuracy={:.4} train_loss={:.4} state_bytes={} \
             seconds={:.2} ranks={} mode={} state_bytes_per_rank={}",
            self.run.spec.name,
            last.test_accuracy,
            last.train_loss,
            total,
            self.run.seconds,
            self.ranks,
            self.mode.name(),
            most
        )
    }
}

/// Rows `[start, end)` of a batch of `len` that rank `rank` of `ranks` computes.
fn share(len: usize, rank: usize, ranks: usize) -> (usize, usize) {
    (len * rank / ranks, len * (rank + 1) / ranks)
}

/// Trains the model with Adafactor (`spec`'s learning rate) on this rank of `comm`'s group.
/// Evaluation runs on every rank (the weights are the same everywhere); `on_point` sees each
/// epoch's point.
///
/// # Errors
/// A zero batch size or epoch count; the group disagrees or fails; a failed tensor operation.
pub fn train_rank<'c>(
    data: &WineData,
    spec: &RunSpec,
    cfg: &TrainConfig,
    comm: Box<dyn Collective + 'c>,
    mode: Mode,
    on_point: &mut dyn FnMut(&Point),
) -> Result<RankResult> {
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(candle_core::Error::Msg(format!(
            "batch size ({}) and epochs ({}) must be at least 1",
            cfg.batch_size, cfg.epochs
        )));
    }
    let start = Instant::now();
    let (rank, ranks) = (comm.rank(), comm.world_size());
    let (varmap, model) = build_model(cfg.seed)?;
    let mut vars: Vec<(String, Var)> = {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("the VarMap's lock is poisoned".into()))?;
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = DataParallel::new_named(
        vars.clone(),
        AdafactorConfig::with_learning_rate(spec.learning_rate),
        comm,
        mode,
    )?;

    let mut history = Vec::with_capacity(cfg.epochs + 1);
    let mut record = |epoch: usize, step: usize, history: &mut Vec<Point>| -> Result<()> {
        let point = measure_point(&model, data, epoch, step)?;
        on_point(&point);
        history.push(point);
        Ok(())
    };
    record(0, 0, &mut history)?;

    let mut order: Vec<u32> = (0..data.n_train as u32).collect();
    let mut step = 0;
    for epoch in 1..=cfg.epochs {
        SplitMix64::new(cfg.seed ^ (0xBA7C_4000 + epoch as u64)).shuffle(&mut order);
        for batch in order.chunks(cfg.batch_size) {
            let (a, b) = share(batch.len(), rank, ranks);
            let grads: Vec<Tensor> = if a == b {
                // A batch smaller than the group: this rank's share is empty.
                vars.iter()
                    .map(|(_, v)| v.as_tensor().zeros_like())
                    .collect::<Result<_>>()?
            } else {
                let rows = &batch[a..b];
                let idx = Tensor::from_slice(rows, rows.len(), &Device::Cpu)?;
                let x = data.train_x.index_select(&idx, 0)?;
                let y = data.train_y.index_select(&idx, 0)?;
                let loss = candle_nn::loss::cross_entropy(&model.forward(&x)?, &y)?;
                let store = loss.backward()?;
                vars.iter()
                    .map(|(_, v)| match store.get(v) {
                        Some(g) => Ok(g.clone()),
                        None => v.as_tensor().zeros_like(),
                    })
                    .collect::<Result<_>>()?
            };
            let pairs: Vec<(Option<&Tensor>, &Var)> = grads
                .iter()
                .zip(&vars)
                .map(|(g, (_, v))| (Some(g), v))
                .collect();
            opt.apply_gradients(&pairs)?;
            step += 1;
        }
        record(epoch, step, &mut history)?;
    }
    Ok(RankResult {
        run: RunResult {
            spec: spec.clone(),
            history,
            state_bytes: opt.state_bytes(),
            seconds: start.elapsed().as_secs_f64(),
        },
        rank,
        ranks,
        mode,
    })
}
