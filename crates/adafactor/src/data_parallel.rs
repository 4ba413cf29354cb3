//! Data-parallel training over a [`Collective`]: the framework-free driver that an adapter's
//! data-parallel optimizer calls around the step pipeline ([`crate::engine`]).
//!
//! Two modes ([`Mode`]), with the same result, bit for bit, as one process fed the averaged
//! gradient:
//! - **Replicated** (DDP): every rank keeps the whole optimizer state. The gradients are
//!   averaged across ranks ([`average_gradients`]: a few large bucketed all-reduces, then a
//!   division by the world size), and every rank runs the ordinary step. Unscaling, the
//!   finiteness check, `clipnorm`, `global_clipnorm`, accumulation and weight decay all see the
//!   averaged gradient, so a NaN on one rank makes every rank skip (or fail) the same step.
//! - **Sharded** (ZeRO stage 1): variables are partitioned across ranks, balanced by bytes
//!   ([`Sharding`]); a rank keeps EMA averages and accumulators only for the variables it owns
//!   and updates only those ([`run_sharded`]), then the owners share the new weights
//!   ([`all_gather_packed`]). The global norm and the non-finite decision are collective.
//!
//! # Bit-exactness of the global norm
//! One process sums the per-variable sums of squares in call order. Adding per-rank partial
//! sums would group the same numbers differently (and so could differ in the last bit), so
//! [`run_sharded`] shares the per-variable sums (one `f64` per variable, zero where a rank does
//! not own it: an exact all-reduce) and every rank adds them in the call order.
//!
//! # Failures
//! Every rank checks at build that all ranks hold the same config and variables
//! ([`crate::collective::check_same_on_all_ranks`]); a mismatch is an error on every rank. A
//! rank that dies mid-step cannot be recovered from: MPI aborts the whole job. Checkpoints are
//! written to a temporary file and renamed, so a dying rank never leaves a half-written one.

use crate::collective::{
    all_reduce_sum_bucketed, collective_error, partition_by_bytes, Collective,
};
use crate::engine::{self, Backend, Combine, Measure, Outcome, Step, Target, UpdateContext};
use crate::engine::{GradScale, WriteScalars};
use crate::error::{Error, Result};
use crate::kernels::GradTransform;
use crate::plan::EmaPlan;
use crate::state::Stats;
use std::cell::RefCell;

/// The default size of a gradient bucket: 16 MiB of float32 (a few all-reduces per step for a
/// model of some hundred MiB).
pub const DEFAULT_BUCKET_BYTES: usize = 16 << 20;

/// How the optimizer state is spread over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every rank keeps the whole state and runs the whole step on the averaged gradient.
    Replicated,
    /// Every rank keeps and updates the state of the variables it owns, then shares the new
    /// weights (ZeRO stage 1).
    Sharded,
}

impl Mode {
    /// `"replicated"` or `"sharded"`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Replicated => "replicated",
            Mode::Sharded => "sharded",
        }
    }

    /// The mode of a name given by [`Mode::name`].
    ///
    /// # Errors
    /// Any other name.
    pub fn parse(name: &str) -> Result<Mode> {
        match name {
            "replicated" => Ok(Mode::Replicated),
            "sharded" => Ok(Mode::Sharded),
            other => Err(Error::invalid(
                "mode",
                format!("data-parallel mode must be `replicated` or `sharded`, got `{other}`"),
            )),
        }
    }
}

/// Which rank owns (keeps the state of, and updates) each variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharding {
    rank: usize,
    owner: Vec<usize>,
    mode: Mode,
}

impl Sharding {
    /// The ownership of variables of `elements[i]` elements on rank `rank` of `world_size`:
    /// in replicated mode this rank owns every variable; in sharded mode each variable has one
    /// owner, balanced by bytes ([`partition_by_bytes`]; every rank computes the same one).
    ///
    /// # Errors
    /// `world_size` is zero or `rank` is not below it.
    pub fn new(mode: Mode, rank: usize, world_size: usize, elements: &[usize]) -> Result<Self> {
        if rank >= world_size {
            return Err(Error::invalid(
                "rank",
                format!("rank {rank} is not a rank of a group of {world_size}"),
            ));
        }
        let owner = match mode {
            Mode::Replicated => vec![rank; elements.len()],
            Mode::Sharded => partition_by_bytes(elements, world_size)?,
        };
        Ok(Sharding { rank, owner, mode })
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether this rank keeps the state of variable `var` and updates it.
    pub fn owns(&self, var: usize) -> bool {
        self.owner.get(var) == Some(&self.rank)
    }

    /// The rank that updates variable `var` (this rank for every variable when replicated).
    pub fn owner(&self, var: usize) -> Option<usize> {
        self.owner.get(var).copied()
    }

    /// The variables this rank owns, in order.
    pub fn owned(&self) -> Vec<usize> {
        (0..self.owner.len()).filter(|&v| self.owns(v)).collect()
    }
}

/// Replaces every gradient with its average over the ranks: the rank-order sum (in buckets of
/// `bucket_bytes`, see [`all_reduce_sum_bucketed`]) divided by the world size, in float32. Every
/// rank gets the same bits, those of a single process computing the same sum and division.
///
/// # Errors
/// The ranks hold different gradient lengths (an error on every rank, nothing changes), or the
/// transport failed.
pub fn average_gradients(
    comm: &mut dyn Collective,
    grads: &mut [&mut [f32]],
    bucket_bytes: usize,
) -> Result<()> {
    all_reduce_sum_bucketed(comm, grads, bucket_bytes)?;
    let n = comm.world_size() as f32;
    if n != 1.0 {
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x /= n;
            }
        }
    }
    Ok(())
}

/// Appends one `(key, bytes)` entry to a buffer for [`all_gather_packed`].
pub fn pack_entry(buf: &mut Vec<u8>, key: usize, bytes: &[u8]) {
    buf.extend_from_slice(&(key as u64).to_le_bytes());
    buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    buf.extend_from_slice(bytes);
}

/// [`pack_entry`] of float32 values as little-endian bytes (without an intermediate copy).
pub fn pack_entry_f32(buf: &mut Vec<u8>, key: usize, values: &[f32]) {
    buf.extend_from_slice(&(key as u64).to_le_bytes());
    buf.extend_from_slice(&(4 * values.len() as u64).to_le_bytes());
    buf.reserve(4 * values.len());
    for x in values {
        buf.extend_from_slice(&x.to_le_bytes());
    }
}

/// Shares this rank's entries (packed by [`pack_entry`]) with every rank in one all-gather and
/// calls `f(key, bytes)` for each entry of every other rank, in rank order. The buffer is freed
/// once sent, and entries are read in place (no copy), to keep the peak memory of sharing the
/// weights of a large model low.
///
/// # Errors
/// The transport failed, a rank sent a malformed buffer, or `f` failed.
pub fn all_gather_packed(
    comm: &mut dyn Collective,
    packed: Vec<u8>,
    mut f: impl FnMut(usize, &[u8]) -> Result<()>,
) -> Result<()> {
    let all = comm.all_gather_bytes(&packed)?;
    drop(packed);
    let me = comm.rank();
    for (rank, buf) in all.into_iter().enumerate() {
        if rank == me {
            continue;
        }
        let truncated = || {
            collective_error(
                "all_gather_packed",
                format!("rank {rank} sent a truncated entry"),
            )
        };
        let mut at = 0;
        while at < buf.len() {
            let word = |at: usize| -> Result<usize> {
                buf.get(at..at + 8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(|b| u64::from_le_bytes(b) as usize)
                    .ok_or_else(truncated)
            };
            let key = word(at)?;
            let len = word(at + 8)?;
            let bytes = buf.get(at + 16..at + 16 + len).ok_or_else(truncated)?;
            f(key, bytes)?;
            at += 16 + len;
        }
    }
    Ok(())
}

/// Every other rank's `(key, bytes)` entries, given this rank's ([`all_gather_packed`] into
/// owned entries). Used to gather a sharded checkpoint.
///
/// # Errors
/// As [`all_gather_packed`].
pub fn all_gather_keyed(
    comm: &mut dyn Collective,
    mine: &[(usize, &[u8])],
) -> Result<Vec<(usize, Vec<u8>)>> {
    let mut packed = Vec::with_capacity(mine.iter().map(|(_, b)| 16 + b.len()).sum());
    for (key, bytes) in mine {
        pack_entry(&mut packed, *key, bytes);
    }
    let mut out = Vec::new();
    all_gather_packed(comm, packed, |key, bytes| {
        out.push((key, bytes.to_vec()));
        Ok(())
    })?;
    Ok(out)
}

/// The per-variable sums of squares the measure stage reported on this rank.
type Sums = RefCell<Vec<(usize, f64)>>;

/// A backend that records the measure stage's sums of squares (for the exact global norm).
struct Recording<'a, B> {
    inner: &'a mut B,
    sums: &'a Sums,
}

impl<B: Backend> Backend for Recording<'_, B> {
    type Error = B::Error;
    type Measured = B::Measured;
    type Updated = B::Updated;

    fn core_error(e: Error) -> Self::Error {
        B::core_error(e)
    }

    fn check_gradients(
        &mut self,
        targets: &[Target],
        transform: GradTransform,
    ) -> std::result::Result<Vec<bool>, Self::Error> {
        self.inner.check_gradients(targets, transform)
    }

    fn accumulate(
        &mut self,
        targets: &[Target],
        transform: GradTransform,
    ) -> std::result::Result<(), Self::Error> {
        self.inner.accumulate(targets, transform)
    }

    fn measure(
        &mut self,
        targets: &[Target],
        stats: &[Stats],
        ctx: &UpdateContext,
    ) -> std::result::Result<Vec<(Measure, Self::Measured)>, Self::Error> {
        let out = self.inner.measure(targets, stats, ctx)?;
        *self.sums.borrow_mut() = targets
            .iter()
            .zip(&out)
            .map(|(t, (m, _))| (t.var, m.sum_sq_grad))
            .collect();
        Ok(out)
    }

    fn update(
        &mut self,
        targets: &[Target],
        stats: &[Stats],
        measured: &[(Measure, Self::Measured)],
        scales: &[GradScale],
        ctx: &UpdateContext,
    ) -> std::result::Result<Vec<(f32, Self::Updated)>, Self::Error> {
        self.inner.update(targets, stats, measured, scales, ctx)
    }

    fn write(
        &mut self,
        targets: &[Target],
        stats: &[Stats],
        updated: Vec<(f32, Self::Updated)>,
        scalars: &[WriteScalars],
        ctx: &UpdateContext,
    ) -> std::result::Result<Vec<Stats>, Self::Error> {
        self.inner.write(targets, stats, updated, scalars, ctx)
    }

    fn zero_accumulators(&mut self, vars: &[usize]) -> std::result::Result<(), Self::Error> {
        self.inner.zero_accumulators(vars)
    }

    fn ema(&mut self, vars: &[usize], ema: EmaPlan) -> std::result::Result<(), Self::Error> {
        self.inner.ema(vars, ema)
    }

    fn commit(&mut self) -> std::result::Result<(), Self::Error> {
        self.inner.commit()
    }
}

/// The sharded [`Combine`]: the global norm from every variable's sum in call order, the
/// finiteness flag from every rank.
struct ShardCombine<'a> {
    comm: RefCell<&'a mut dyn Collective>,
    /// Every variable with a gradient this step (on any rank), in call order.
    order: &'a [usize],
    variables: usize,
    sums: &'a Sums,
}

impl Combine for ShardCombine<'_> {
    fn sum(&self, _local: f64) -> Result<f64> {
        let mut all = vec![0.0f64; self.variables];
        for &(var, s) in self.sums.borrow().iter() {
            let slot = all.get_mut(var).ok_or_else(|| {
                Error::Internal(format!("variable {var} is not one of {}", self.variables))
            })?;
            *slot = s;
        }
        // One owner per variable: every element is one rank's value plus zeros (exact).
        self.comm.borrow_mut().all_reduce_sum_f64(&mut all)?;
        Ok(self.order.iter().map(|&v| all[v]).sum())
    }

    fn all(&self, local: bool) -> Result<bool> {
        Ok(!self.comm.borrow_mut().any(!local)?)
    }
}

/// Runs one sharded step: `step.targets` and `step.scope` are this rank's owned variables,
/// `order` every variable with a gradient this step (on every rank, in call order) and
/// `variables` the number of variables. The global norm is computed exactly as one process
/// computes it (see the module docs), and a non-finite gradient on any rank refuses the step on
/// every rank (this rank's [`Outcome::NonFinite`] names no variable when another rank saw it).
/// The caller shares the owners' new weights afterwards.
///
/// # Errors
/// As [`engine::run`]; a collective failure.
pub fn run_sharded<B: Backend>(
    backend: &mut B,
    stats: &mut [Stats],
    step: Step<'_>,
    comm: &mut dyn Collective,
    order: &[usize],
    variables: usize,
) -> std::result::Result<Outcome, B::Error> {
    let sums = RefCell::new(Vec::new());
    let combine = ShardCombine {
        comm: RefCell::new(comm),
        order,
        variables,
        sums: &sums,
    };
    let mut recording = Recording {
        inner: backend,
        sums: &sums,
    };
    engine::run(&mut recording, stats, step, &combine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::ThreadGroup;

    /// Runs `f` on every rank of a thread group and returns the results by rank.
    fn on_ranks<T: Send>(
        n: usize,
        f: impl Fn(&mut dyn Collective) -> Result<T> + Sync,
    ) -> Vec<Result<T>> {
        let group = ThreadGroup::new(n).expect("group");
        std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .map(|mut c| {
                    let f = &f;
                    s.spawn(move || f(&mut c))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank panicked"))
                .collect()
        })
    }

    #[test]
    fn average_is_the_rank_order_sum_divided_by_the_world_size() {
        let grad = |rank: usize| -> Vec<f32> {
            (0..37)
                .map(|i| (i as f32 * 0.37 + rank as f32).sin() / 3.0)
                .collect()
        };
        let out = on_ranks(3, |c| {
            let mut a = grad(c.rank());
            let mut b = grad(c.rank() + 10)[..5].to_vec();
            average_gradients(c, &mut [&mut a, &mut b], 64)?;
            Ok((a, b))
        });
        let want_a: Vec<f32> = (0..37)
            .map(|i| (grad(0)[i] + grad(1)[i] + grad(2)[i]) / 3.0)
            .collect();
        for r in out {
            let (a, b) = r.expect("average");
            assert_eq!(
                a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want_a.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(b.len(), 5);
            assert_eq!(b[0], (grad(10)[0] + grad(11)[0] + grad(12)[0]) / 3.0);
        }
    }

    #[test]
    fn average_refuses_different_lengths_on_every_rank() {
        let out = on_ranks(2, |c| {
            let mut a = vec![1.0f32; 4 + c.rank()];
            average_gradients(c, &mut [&mut a], 1024)
        });
        for r in out {
            let e = r.expect_err("lengths differ");
            assert!(e.to_string().contains("gradient lengths"), "{e}");
        }
    }

    #[test]
    fn keyed_entries_reach_every_other_rank() {
        let out = on_ranks(3, |c| {
            let r = c.rank();
            let bytes = vec![r as u8; r + 1];
            let mine: Vec<(usize, &[u8])> = vec![(r * 10, &bytes), (r * 10 + 1, &[])];
            all_gather_keyed(c, &mine)
        });
        for (rank, r) in out.into_iter().enumerate() {
            let got = r.expect("gather");
            let want: Vec<(usize, Vec<u8>)> = (0..3)
                .filter(|&o| o != rank)
                .flat_map(|o| [(o * 10, vec![o as u8; o + 1]), (o * 10 + 1, vec![])])
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn sharding_gives_each_variable_one_owner() {
        let elems = [100, 400, 200, 50];
        let shards: Vec<Sharding> = (0..2)
            .map(|r| Sharding::new(Mode::Sharded, r, 2, &elems).expect("sharding"))
            .collect();
        for v in 0..elems.len() {
            assert_eq!(
                shards.iter().filter(|s| s.owns(v)).count(),
                1,
                "variable {v}"
            );
        }
        assert_eq!(shards[0].owned(), [1]);
        assert_eq!(shards[1].owned(), [0, 2, 3]);
        let rep = Sharding::new(Mode::Replicated, 1, 2, &elems).expect("replicated");
        assert_eq!(rep.owned(), [0, 1, 2, 3]);
        assert!(Sharding::new(Mode::Sharded, 2, 2, &elems).is_err());
        assert_eq!(Mode::parse("sharded").expect("mode"), Mode::Sharded);
        assert!(Mode::parse("zero").is_err());
    }
}
