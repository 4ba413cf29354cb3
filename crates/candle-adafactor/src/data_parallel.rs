//! `DataParallel`: [`Adafactor`] on one rank of a data-parallel group, replicated or with
//! sharded optimizer state (ZeRO-1). The logic is the core's ([`adafactor::data_parallel`]);
//! this file moves candle tensors in and out of it.

use crate::checkpoint::StateDict;
use crate::optimizer::{core_err, err, Adafactor};
use adafactor::collective::{check_same_on_all_ranks, Collective, Fingerprint};
use adafactor::data_parallel::{
    all_gather_keyed, all_gather_packed, average_gradients, pack_entry, pack_entry_f32, Sharding,
};
use adafactor::engine::Outcome;
use adafactor::{AdafactorConfig, StepPlan};
use candle_core::{DType, Result, Tensor, Var};
use std::path::Path;

pub use adafactor::data_parallel::{Mode, DEFAULT_BUCKET_BYTES};

/// [`Adafactor`] on one rank of a data-parallel group ([`adafactor::collective::Collective`]:
/// threads of one process, or MPI processes with the `adafactor-mpi` crate).
///
/// Every rank builds it on the same variables with the same config (checked: a mismatch is an
/// error on every rank), computes gradients on its own share of the batch and calls
/// [`DataParallel::apply_gradients`] with them. The gradients are averaged across ranks, and
/// the step is exactly the step one process makes with the averaged gradient, bit for bit, in
/// both modes:
/// - [`Mode::Replicated`]: every rank keeps the whole state and makes the whole step;
/// - [`Mode::Sharded`]: a rank keeps EMA averages and accumulators only for the variables it
///   owns (about `1 / world_size` of them, balanced by bytes), updates those, and the owners
///   share the new weights.
///
/// ```
/// use adafactor::collective::ThreadGroup;
/// use candle_adafactor::{AdafactorConfig, DataParallel, Mode};
/// use candle_core::{Device, Tensor, Var};
/// # fn main() -> candle_core::Result<()> {
/// let comms = ThreadGroup::new(2).map_err(candle_core::Error::wrap)?;
/// let weights = std::thread::scope(|s| {
///     let ranks: Vec<_> = comms
///         .into_iter()
///         .map(|comm| {
///             s.spawn(move || -> candle_core::Result<Vec<f32>> {
///                 let w = Var::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu)?;
///                 let mut opt = DataParallel::new_named(
///                     vec![("w".into(), w.clone())],
///                     AdafactorConfig::with_learning_rate(0.5),
///                     Box::new(comm),
///                     Mode::Sharded,
///                 )?;
///                 // Each rank's gradient of its share of the batch.
///                 let g = Tensor::new(&[1f32, 6.0, 7.0, 2.0], &Device::Cpu)?;
///                 let g = (g * (opt.rank() as f64 + 0.5))?;
///                 opt.apply_gradients(&[(Some(&g), &w)])?;
///                 w.to_vec1::<f32>()
///             })
///         })
///         .collect();
///     ranks.into_iter().map(|r| r.join().expect("rank")).collect::<candle_core::Result<Vec<_>>>()
/// })?;
/// assert_eq!(weights[0], weights[1]);
/// assert!((weights[0][0] - -0.36930645).abs() < 1e-6); // the average is Keras's test gradient
/// # Ok(()) }
/// ```
pub struct DataParallel<'c> {
    opt: Adafactor,
    comm: Box<dyn Collective + 'c>,
    sharding: Sharding,
    bucket_bytes: usize,
}

impl std::fmt::Debug for DataParallel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("mode", &self.sharding.mode())
            .field("optimizer", &self.opt)
            .finish()
    }
}

/// The fingerprint of what every rank must agree on at build.
fn build_fingerprint(
    config: &AdafactorConfig,
    vars: &[(String, Var)],
    mode: Mode,
    valid: &std::result::Result<(), String>,
) -> Fingerprint {
    let mut fp = Fingerprint::new();
    fp.add(config.to_keras_config().to_string().as_bytes())
        .add(mode.name().as_bytes());
    if let Err(e) = valid {
        fp.add(b"invalid").add(e.as_bytes());
    }
    for (name, v) in vars {
        fp.add_variable(name, v.dims(), v.dtype().as_str());
    }
    fp
}

impl<'c> DataParallel<'c> {
    /// One rank's optimizer on named variables (as [`Adafactor::new_named`]), with the
    /// gradient average in buckets of [`DEFAULT_BUCKET_BYTES`]. A collective call: every rank
    /// makes it, and they check that they all hold the same config, mode and variables (names,
    /// shapes, dtypes, in order).
    ///
    /// # Errors
    /// On every rank: the ranks' configs, modes or variables differ (a rank whose own config is
    /// invalid reports that instead); the collective failed. As [`Adafactor::new_named`].
    pub fn new_named(
        vars: Vec<(String, Var)>,
        config: AdafactorConfig,
        mut comm: Box<dyn Collective + 'c>,
        mode: Mode,
    ) -> Result<Self> {
        let vars: Vec<(String, Var)> = vars
            .into_iter()
            .filter(|(_, v)| v.dtype().is_float())
            .collect();
        let valid = config.validate().map_err(|e| e.to_string());
        let fp = build_fingerprint(&config, &vars, mode, &valid);
        let agreed = check_same_on_all_ranks(
            comm.as_mut(),
            "the optimizer config, the data-parallel mode and the variables",
            fp,
        );
        valid.map_err(err)?;
        agreed.map_err(core_err)?;
        let elements: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
        let sharding =
            Sharding::new(mode, comm.rank(), comm.world_size(), &elements).map_err(core_err)?;
        let mut opt = Adafactor::unbuilt(config)?;
        opt.build_named_keeping(vars, &|i| sharding.owns(i))?;
        Ok(DataParallel {
            opt,
            comm,
            sharding,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
        })
    }

    /// Sets the size of the gradient buckets (one all-reduce per bucket). Every rank must use
    /// the same size (checked at each step).
    ///
    /// # Errors
    /// `bytes` is zero.
    pub fn set_bucket_bytes(&mut self, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Err(err(
                "the gradient bucket size must be positive, got 0 bytes",
            ));
        }
        self.bucket_bytes = bytes;
        Ok(())
    }

    /// This rank's index.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.sharding.mode()
    }

    /// The optimizer of this rank. In sharded mode it holds statistics, EMA averages and
    /// accumulators only for the variables this rank owns, so its own `variables()` and
    /// `state_dict()` are incomplete: use [`DataParallel::state_dict`].
    pub fn optimizer(&self) -> &Adafactor {
        &self.opt
    }

    /// Whether this rank owns variable `i` (in build order): keeps its full state and updates
    /// it. Every variable in replicated mode.
    pub fn owns(&self, i: usize) -> bool {
        self.sharding.owns(i)
    }

    /// Bytes of optimizer state this rank keeps (see [`Adafactor::state_bytes`]).
    pub fn state_bytes(&self) -> usize {
        self.opt.state_bytes()
    }

    /// Keras `iterations`.
    pub fn iterations(&self) -> u64 {
        self.opt.iterations()
    }

    /// As [`Adafactor::exclude_from_weight_decay`]; every rank must exclude the same variables.
    ///
    /// # Errors
    /// As [`Adafactor::exclude_from_weight_decay`].
    pub fn exclude_from_weight_decay(
        &mut self,
        var_list: &[&Var],
        var_names: &[&str],
    ) -> Result<()> {
        self.opt.exclude_from_weight_decay(var_list, var_names)
    }

    /// Keras `apply_gradients` on this rank's gradients: averages them across the ranks, then
    /// steps (see the type's docs); returns `iterations`. A collective call.
    ///
    /// # Errors
    /// On every rank: the ranks disagree on the step (different counters, a gradient present
    /// on one rank and missing on another, different bucket sizes), or any rank's gradients
    /// fail [`Adafactor::apply_gradients`]'s checks (that rank names the problem, the others
    /// name the rank); a non-finite averaged gradient with `on_nonfinite = "error"`; the
    /// collective failed. Nothing changes on these errors. A failure after the update has
    /// begun (a transport failure in sharing the weights) leaves the ranks' weights different:
    /// restart from a checkpoint.
    pub fn apply_gradients(&mut self, pairs: &[(Option<&Tensor>, &Var)]) -> Result<u64> {
        let checked = self.opt.check_pairs(pairs);
        let mut fp = Fingerprint::new();
        fp.add(&self.opt.raw_iterations().to_le_bytes())
            .add(&self.opt.skipped_steps().to_le_bytes());
        match &checked {
            Ok(items) => {
                for (i, _) in items {
                    fp.add(&(*i as u64).to_le_bytes());
                }
            }
            Err(e) => {
                fp.add(b"invalid").add(e.to_string().as_bytes());
            }
        }
        let agreed = check_same_on_all_ranks(self.comm.as_mut(), "the step and its gradients", fp);
        let items = checked?;
        agreed.map_err(core_err)?;

        let mut flat = items
            .iter()
            .map(|(_, g)| g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .collect::<Result<Vec<Vec<f32>>>>()?;
        {
            let mut slices: Vec<&mut [f32]> = flat.iter_mut().map(Vec::as_mut_slice).collect();
            average_gradients(self.comm.as_mut(), &mut slices, self.bucket_bytes)
                .map_err(core_err)?;
        }
        let averaged = items
            .iter()
            .zip(flat)
            .map(|((i, g), v)| {
                let t = Tensor::from_vec(v, g.shape(), g.device())?.to_dtype(g.dtype())?;
                Ok((*i, t))
            })
            .collect::<Result<Vec<(usize, Tensor)>>>()?;
        match self.sharding.mode() {
            Mode::Replicated => {
                let vars: Vec<Var> = averaged
                    .iter()
                    .map(|(i, _)| self.opt.slots[*i].var.clone())
                    .collect();
                let pairs: Vec<(Option<&Tensor>, &Var)> = averaged
                    .iter()
                    .zip(&vars)
                    .map(|((_, g), v)| (Some(g), v))
                    .collect();
                self.opt.apply_gradients(&pairs)
            }
            Mode::Sharded => self.apply_sharded(&averaged),
        }
    }

    /// The sharded step on averaged gradients, then the owners' new weights to every rank.
    fn apply_sharded(&mut self, averaged: &[(usize, Tensor)]) -> Result<u64> {
        let plan = StepPlan::new(self.opt.config(), self.opt.raw_iterations());
        let writes = plan.update.is_some() || plan.ema.is_some_and(|e| e.overwrite);
        match self
            .opt
            .apply_sharded(averaged, self.comm.as_mut(), &self.sharding)
        {
            Ok(outcome @ Outcome::Applied) => {
                if writes {
                    self.share_weights(false)?;
                }
                self.opt.record(outcome, true)?;
            }
            // Refused by all ranks together: nothing changed anywhere.
            Ok(outcome @ Outcome::NonFinite { .. }) => self.opt.record(outcome, true)?,
            Err(e) => {
                if writes {
                    // The others are waiting for this rank's weights.
                    let _ = self.share_weights(true);
                }
                return Err(e);
            }
        }
        Ok(self.opt.iterations())
    }

    /// Sends the weights this rank owns to every other rank and takes theirs; `failed` tells
    /// the others that this rank's step failed (then every rank returns an error).
    fn share_weights(&mut self, failed: bool) -> Result<()> {
        const STATUS: usize = usize::MAX;
        let owned = if failed {
            Vec::new()
        } else {
            self.sharding.owned()
        };
        let total: usize = owned
            .iter()
            .map(|&i| 16 + 4 * self.opt.slots[i].var.elem_count())
            .sum();
        let mut packed = Vec::with_capacity(17 + total);
        pack_entry(&mut packed, STATUS, &[u8::from(failed)]);
        for &i in &owned {
            let w = self.opt.slots[i].var.as_tensor();
            let v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            pack_entry_f32(&mut packed, i, &v);
        }
        let mut others_failed = false;
        let mut updates = Vec::new();
        let slots = &self.opt.slots;
        let sharding = &self.sharding;
        all_gather_packed(self.comm.as_mut(), packed, |i, b| {
            if i == STATUS {
                others_failed |= b.first() == Some(&1);
                return Ok(());
            }
            let slot = slots.get(i).ok_or_else(|| {
                adafactor::Error::invalid(
                    "weights",
                    format!("a rank sent the weights of variable {i}, which does not exist"),
                )
            })?;
            if sharding.owns(i) || b.len() != 4 * slot.var.elem_count() {
                return Err(adafactor::Error::invalid(
                    "weights",
                    format!(
                        "a rank sent {} bytes of weights for `{}` (this rank owns it: {})",
                        b.len(),
                        slot.name,
                        sharding.owns(i)
                    ),
                ));
            }
            let v = adafactor::checkpoint::f32_from_le_bytes(b);
            let t = Tensor::from_vec(v, slot.var.shape(), slot.var.device())
                .and_then(|t| t.to_dtype(slot.var.dtype()))
                .and_then(|t| slot.var.set(&t));
            updates.push((i, t.map_err(|e| e.to_string())));
            Ok(())
        })
        .map_err(core_err)?;
        if others_failed || failed {
            return Err(err(
                "a rank failed in a sharded step; the ranks' weights may now differ (restart \
                 from a checkpoint)",
            ));
        }
        if let Some((i, Err(e))) = updates.into_iter().find(|(_, r)| r.is_err()) {
            return Err(err(format!(
                "could not set the weights of `{}` sent by its owner: {e}",
                self.opt.slots[i].name
            )));
        }
        Ok(())
    }

    /// Keras `finalize_variable_values` on every variable: with `use_ema`, copies each
    /// variable's moving average into it (in sharded mode the owners copy theirs and share the
    /// weights); without, does nothing. A collective call.
    ///
    /// # Errors
    /// As [`Adafactor::finalize_variable_values`]; the weight exchange failed.
    pub fn finalize_variable_values(&mut self) -> Result<()> {
        if !self.opt.config().use_ema {
            return Ok(());
        }
        let owned: Vec<Var> = self
            .sharding
            .owned()
            .into_iter()
            .map(|i| self.opt.slots[i].var.clone())
            .collect();
        let refs: Vec<&Var> = owned.iter().collect();
        let done = self.opt.finalize_variable_values(&refs);
        if self.sharding.mode() == Mode::Sharded {
            self.share_weights(done.is_err())?;
        }
        done
    }

    /// The whole optimizer state (as [`Adafactor::state_dict`] of one process), gathered from
    /// the owners in sharded mode: an ordinary state file's content, loadable by any world
    /// size. A collective call; every rank gets the whole state.
    ///
    /// # Errors
    /// As [`Adafactor::state_dict`]; the collective failed.
    pub fn state_dict(&mut self) -> Result<StateDict> {
        if self.sharding.mode() == Mode::Replicated {
            return self.opt.state_dict();
        }
        let sharding = &self.sharding;
        let (mut sd, per_var) = self.opt.state_dict_of_owned(&|i| sharding.owns(i))?;
        let mine: Vec<(usize, &[u8])> = per_var
            .iter()
            .filter(|(_, var)| sharding.owns(*var))
            .map(|&(e, _)| Ok((e, sd.entry_data(e)?)))
            .collect::<Result<_>>()?;
        let got = all_gather_keyed(self.comm.as_mut(), &mine).map_err(core_err)?;
        for (i, data) in got {
            sd.fill(i, data)?;
        }
        Ok(sd)
    }

    /// Saves the whole optimizer state ([`DataParallel::state_dict`]) to one ordinary state
    /// file, written by rank 0 (to a temporary file, then renamed), loadable by
    /// [`Adafactor::load_state`] in one process or by [`DataParallel::load_state`] on any
    /// number of ranks. A collective call; it returns on every rank once the file is complete.
    ///
    /// # Errors
    /// As [`DataParallel::state_dict`] and [`StateDict::save`] (on every rank: rank 0's write
    /// result is shared).
    pub fn save_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let sd = self.state_dict()?;
        let written = if self.rank() == 0 {
            sd.save(path).map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        let mut status = match &written {
            Ok(()) => Vec::new(),
            Err(e) => e.clone().into_bytes(),
        };
        self.comm
            .broadcast_bytes(0, &mut status)
            .map_err(core_err)?;
        if status.is_empty() {
            Ok(())
        } else {
            Err(err(format!(
                "rank 0 could not write the optimizer state: {}",
                String::from_utf8_lossy(&status)
            )))
        }
    }

    /// Restores a whole optimizer state (from [`Adafactor::state_dict`] of one process or
    /// [`DataParallel::state_dict`] of any number of ranks); this rank keeps what it owns. The
    /// ranks then check that they all loaded the same state.
    ///
    /// # Errors
    /// As [`Adafactor::load_state_dict`]; the ranks loaded different states (on every rank).
    pub fn load_state_dict(&mut self, sd: &StateDict) -> Result<()> {
        let loaded = self.opt.load_state_dict(sd);
        let mut fp = Fingerprint::new();
        match &loaded {
            Ok(()) => {
                fp.add(&sd.raw_iterations().to_le_bytes())
                    .add(&sd.skipped_steps().to_le_bytes());
            }
            Err(e) => {
                fp.add(b"invalid").add(e.to_string().as_bytes());
            }
        }
        let agreed = check_same_on_all_ranks(self.comm.as_mut(), "the loaded optimizer state", fp);
        loaded?;
        agreed.map_err(core_err)
    }

    /// Reads a state file on every rank and loads it ([`DataParallel::load_state_dict`]).
    ///
    /// # Errors
    /// As [`StateDict::load`] and [`DataParallel::load_state_dict`].
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let sd = StateDict::load(path);
        match sd {
            Ok(sd) => self.load_state_dict(&sd),
            Err(e) => {
                // Take part in the check so that the other ranks do not wait.
                let mut fp = Fingerprint::new();
                fp.add(b"unreadable").add(e.to_string().as_bytes());
                let _ =
                    check_same_on_all_ranks(self.comm.as_mut(), "the loaded optimizer state", fp);
                Err(e)
            }
        }
    }
}
