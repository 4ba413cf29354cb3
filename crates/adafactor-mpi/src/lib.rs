//! MPI transport of the Adafactor core's [`Collective`] contract: ranks are processes, on one
//! machine or many, started by `mpirun`.
//!
//! ```no_run
//! use adafactor::collective::Collective;
//!
//! # fn main() -> adafactor::Result<()> {
//! let universe = adafactor_mpi::initialize()?;
//! let mut comm = adafactor_mpi::MpiCollective::new(&universe)?;
//! let mut grad = vec![comm.rank() as f32; 1024];
//! comm.all_reduce_sum_f32(&mut grad)?;
//! # Ok(()) }
//! ```
//!
//! # Sums
//!
//! By default ([`SumOrder::RankOrder`]) a sum is the contributions added in rank order, element by
//! element, so every rank gets the same bits, and those of one process adding the contributions
//! in rank order: each rank receives one slice of every rank's buffer (`MPI_Alltoallv`), adds the
//! slices in rank order, and the sums are shared (`MPI_Allgatherv`). That moves the same bytes as
//! a ring all-reduce. [`SumOrder::Native`] uses `MPI_Allreduce`, whose order of addition is the
//! library's (MPI recommends, but does not promise, the same result on every rank); with two
//! ranks both orders give the same bits.
//!
//! # Safety net
//!
//! Before each collective the ranks exchange a 32-byte header (operation, length, root, chunk
//! size), so a rank that calls a different collective, or the same one with another length or
//! root, gets an error on every rank instead of a hang or a truncated buffer. MPI's own failures
//! (a rank that dies, a network error) abort the whole job: MPI's default error handler.

#![deny(missing_docs)]

use adafactor::collective::{collective_error, Collective};
use adafactor::Result;
use mpi::collective::SystemOperation;
use mpi::datatype::{Equivalence, Partition, PartitionMut};
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};
use mpi::Count;
use std::marker::PhantomData;

pub use mpi;

/// Initializes MPI for use from any one thread at a time (`MPI_THREAD_SERIALIZED`), which
/// [`MpiCollective`] needs because it may be moved to another thread. Keep the returned
/// universe alive as long as any [`MpiCollective`]: dropping it finalizes MPI.
///
/// # Errors
/// MPI was already initialized in this process, or the library does not support
/// `MPI_THREAD_SERIALIZED`.
pub fn initialize() -> Result<Universe> {
    let (universe, provided) =
        mpi::initialize_with_threading(Threading::Serialized).ok_or_else(|| {
            collective_error("initialize", "MPI is already initialized in this process")
        })?;
    check_threading(provided)?;
    Ok(universe)
}

fn check_threading(provided: Threading) -> Result<()> {
    match provided {
        Threading::Serialized | Threading::Multiple => Ok(()),
        other => Err(collective_error(
            "initialize",
            format!(
                "the MPI library provides thread support {other:?}, and this transport needs \
                 Serialized or Multiple (initialize MPI with adafactor_mpi::initialize())"
            ),
        )),
    }
}

/// How [`MpiCollective`] adds floating-point contributions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SumOrder {
    /// In rank order: the same bits on every rank and as one process adding in rank order.
    RankOrder,
    /// `MPI_Allreduce`: the library's order. With two ranks that is the rank order's bits; with
    /// more, the bits can depend on the buffer's length and an element's place in it (OpenMPI
    /// picks its algorithm by size), so bucketing gradients differently changes the sums.
    Native,
}

/// Elements per reduction round by default: 16 Mi elements (64 MiB of `f32`). Longer buffers are
/// reduced in rounds, which bounds the scratch memory and keeps every count within MPI's `int`.
pub const DEFAULT_CHUNK_ELEMENTS: usize = 1 << 24;

/// Bytes per broadcast round (MPI counts are `int`).
const BYTE_ROUND: usize = 1 << 30;

/// Header operation codes.
const OP_F32: u64 = 1;
const OP_F64: u64 = 2;
const OP_MAX_U64: u64 = 3;
const OP_BROADCAST: u64 = 4;
const OP_GATHER: u64 = 5;
const OP_BARRIER: u64 = 6;

/// One rank of an MPI job, over a private duplicate of `MPI_COMM_WORLD` (so that its traffic
/// never mixes with the program's own MPI calls).
///
/// Its methods take `&mut self`, so calls on one handle never overlap; the program must not make
/// other MPI calls at the same time from other threads (`MPI_THREAD_SERIALIZED`).
pub struct MpiCollective<'u> {
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
    order: SumOrder,
    chunk: usize,
    /// Kept between calls (at most one round each), so that a step's all-reduces do not
    /// allocate and fault in fresh pages every time.
    scratch_f32: Vec<f32>,
    scratch_f64: Vec<f64>,
    scratch_u64: Vec<u64>,
    _universe: PhantomData<&'u Universe>,
}

// SAFETY: the handle holds an MPI communicator (an opaque handle value, not thread-bound). MPI was
// initialized with at least MPI_THREAD_SERIALIZED (checked in `new`), which allows MPI calls from
// any thread as long as they do not overlap; `&mut self` on every call serializes this handle's
// calls, and the type documents that the program must not overlap its own MPI calls with them.
unsafe impl Send for MpiCollective<'_> {}

impl std::fmt::Debug for MpiCollective<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCollective")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("order", &self.order)
            .field("chunk", &self.chunk)
            .finish()
    }
}

impl<'u> MpiCollective<'u> {
    /// All the processes of the job (`MPI_COMM_WORLD`, duplicated), summing in rank order.
    /// Every rank must call it, in the same order as its other collectives (duplicating a
    /// communicator is itself a collective call).
    ///
    /// # Errors
    /// MPI runs with less thread support than `MPI_THREAD_SERIALIZED` (initialize it with
    /// [`initialize`]).
    pub fn new(universe: &'u Universe) -> Result<Self> {
        check_threading(mpi::environment::threading_support())?;
        let comm = universe.world().duplicate();
        let rank = usize::try_from(comm.rank())
            .map_err(|_| collective_error("new", "MPI reported a negative rank"))?;
        let size = usize::try_from(comm.size())
            .map_err(|_| collective_error("new", "MPI reported a negative size"))?;
        Ok(Self {
            comm,
            rank,
            size,
            order: SumOrder::RankOrder,
            chunk: DEFAULT_CHUNK_ELEMENTS,
            scratch_f32: Vec::new(),
            scratch_f64: Vec::new(),
            scratch_u64: Vec::new(),
            _universe: PhantomData,
        })
    }

    /// The same handle with another [`SumOrder`] (every rank must choose the same).
    pub fn with_order(mut self, order: SumOrder) -> Self {
        self.order = order;
        self
    }

    /// The same handle reducing at most `elements` per round (every rank must choose the same;
    /// checked at each call).
    ///
    /// # Errors
    /// `elements` is zero or does not fit MPI's `int` counts.
    pub fn with_chunk_elements(mut self, elements: usize) -> Result<Self> {
        if elements == 0 || Count::try_from(elements).is_err() {
            return Err(collective_error(
                "with_chunk_elements",
                format!(
                    "elements per round must be in 1..={}, got {elements}",
                    Count::MAX
                ),
            ));
        }
        self.chunk = elements;
        Ok(self)
    }

    /// Elements per reduction round.
    pub fn chunk_elements(&self) -> usize {
        self.chunk
    }

    /// The sum order in use.
    pub fn order(&self) -> SumOrder {
        self.order
    }

    /// Checks that every rank is calling the same collective with the same length and root: one
    /// all-gather of 32 bytes per rank. Every rank sees every header, so all return the same
    /// error.
    fn agree(&mut self, op: &str, code: u64, len: usize, root: usize) -> Result<()> {
        let mine = [code, len as u64, root as u64, self.chunk as u64];
        let mut all = vec![0u64; 4 * self.size];
        self.comm.all_gather_into(&mine[..], &mut all[..]);
        let first = &all[..4];
        match all.chunks_exact(4).position(|h| h != first) {
            None => Ok(()),
            Some(r) => Err(collective_error(
                op,
                format!(
                    "the ranks called different collectives: rank 0 called {}, rank {r} called {}",
                    describe(first),
                    describe(&all[4 * r..4 * r + 4])
                ),
            )),
        }
    }

    /// Sums or maximizes `values` across the ranks, in rounds of `self.chunk` elements, with
    /// `scratch` as the receive (rank order) or send (native) buffer.
    fn reduce<T>(
        &mut self,
        op: &str,
        code: u64,
        values: &mut [T],
        scratch: &mut Vec<T>,
    ) -> Result<()>
    where
        T: Equivalence + Copy + Default + std::ops::AddAssign,
    {
        self.agree(op, code, values.len(), 0)?;
        if self.size == 1 {
            return Ok(());
        }
        for round in values.chunks_mut(self.chunk) {
            match (code, self.order) {
                (OP_MAX_U64, _) | (_, SumOrder::Native) => {
                    scratch.clear();
                    scratch.extend_from_slice(round);
                    let operation = if code == OP_MAX_U64 {
                        SystemOperation::max()
                    } else {
                        SystemOperation::sum()
                    };
                    self.comm.all_reduce_into(&scratch[..], round, operation);
                }
                _ => self.sum_round_in_rank_order(round, scratch),
            }
        }
        Ok(())
    }

    /// One round of the rank-order sum: slice `r` of every rank's buffer goes to rank `r`, which
    /// adds the slices in rank order; then every rank gathers every slice's sum.
    fn sum_round_in_rank_order<T>(&self, round: &mut [T], scratch: &mut Vec<T>)
    where
        T: Equivalence + Copy + Default + std::ops::AddAssign,
    {
        let (p, len) = (self.size, round.len());
        // `len <= self.chunk`, which fits a Count, so every count and offset below does too.
        let counts: Vec<Count> = (0..p)
            .map(|r| (len / p + usize::from(r < len % p)) as Count)
            .collect();
        let displs = offsets(&counts);
        let mine = counts[self.rank] as usize;
        scratch.clear();
        scratch.resize(mine * p, T::default());
        let recv_counts = vec![mine as Count; p];
        let recv_displs: Vec<Count> = (0..p).map(|q| (q * mine) as Count).collect();
        self.comm.all_to_all_varcount_into(
            &Partition::new(&round[..], &counts[..], &displs[..]),
            &mut PartitionMut::new(&mut scratch[..], &recv_counts[..], &recv_displs[..]),
        );
        let (sum, rest) = scratch.split_at_mut(mine);
        for part in rest.chunks_exact(mine.max(1)) {
            sum.iter_mut().zip(part).for_each(|(s, &x)| *s += x);
        }
        self.comm.all_gather_varcount_into(
            &sum[..],
            &mut PartitionMut::new(round, &counts[..], &displs[..]),
        );
    }
}

/// Where each part starts when parts of `counts` elements are laid end to end.
fn offsets(counts: &[Count]) -> Vec<Count> {
    counts
        .iter()
        .scan(0, |at, &c| {
            let d = *at;
            *at += c;
            Some(d)
        })
        .collect()
}

/// A header as words: `all_reduce_sum_f32 of 10 values`, `broadcast_bytes from root 1`, ...
fn describe(h: &[u64]) -> String {
    let rounds = format!(" in rounds of {} elements", h[3]);
    match h[0] {
        OP_F32 => format!("all_reduce_sum_f32 of {} values{rounds}", h[1]),
        OP_F64 => format!("all_reduce_sum_f64 of {} values{rounds}", h[1]),
        OP_MAX_U64 => format!("all_reduce_max_u64 of {} values{rounds}", h[1]),
        OP_BROADCAST => format!("broadcast_bytes from root {}", h[2]),
        OP_GATHER => "all_gather_bytes".to_string(),
        OP_BARRIER => "barrier".to_string(),
        other => format!("unknown operation {other}"),
    }
}

impl Collective for MpiCollective<'_> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum_f32(&mut self, values: &mut [f32]) -> Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch_f32);
        let done = self.reduce("all_reduce_sum_f32", OP_F32, values, &mut scratch);
        self.scratch_f32 = scratch;
        done
    }

    fn all_reduce_sum_f64(&mut self, values: &mut [f64]) -> Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch_f64);
        let done = self.reduce("all_reduce_sum_f64", OP_F64, values, &mut scratch);
        self.scratch_f64 = scratch;
        done
    }

    fn all_reduce_max_u64(&mut self, values: &mut [u64]) -> Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch_u64);
        let done = self.reduce("all_reduce_max_u64", OP_MAX_U64, values, &mut scratch);
        self.scratch_u64 = scratch;
        done
    }

    fn broadcast_bytes(&mut self, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
        const OP: &str = "broadcast_bytes";
        self.agree(OP, OP_BROADCAST, 0, root)?;
        if root >= self.size {
            return Err(collective_error(
                OP,
                format!("root {root} is not a rank of a group of {}", self.size),
            ));
        }
        let from = self.comm.process_at_rank(root as mpi::Rank);
        let mut len = bytes.len() as u64;
        from.broadcast_into(&mut len);
        let len = usize::try_from(len).map_err(|_| {
            collective_error(OP, format!("{len} bytes do not fit this machine's memory"))
        })?;
        bytes.resize(len, 0);
        for round in bytes.chunks_mut(BYTE_ROUND) {
            from.broadcast_into(round);
        }
        Ok(())
    }

    fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        const OP: &str = "all_gather_bytes";
        self.agree(OP, OP_GATHER, 0, 0)?;
        let mut lens = vec![0u64; self.size];
        self.comm
            .all_gather_into(&(bytes.len() as u64), &mut lens[..]);
        let total: u64 = lens.iter().sum();
        let counts: Vec<Count> = lens
            .iter()
            .map(|&l| Count::try_from(l))
            .collect::<std::result::Result<_, _>>()
            .ok()
            .filter(|_| Count::try_from(total).is_ok())
            .ok_or_else(|| {
                collective_error(
                    OP,
                    format!(
                        "the ranks' {total} bytes in all exceed MPI's count limit of {} bytes",
                        Count::MAX
                    ),
                )
            })?;
        let displs = offsets(&counts);
        // An empty Vec<u8> points at address 1, which is OpenMPI's MPI_IN_PLACE: keep one spare
        // byte on both sides so that no buffer is ever empty.
        let mut all = vec![0u8; total as usize + 1];
        let spare = [0u8; 1];
        let send = if bytes.is_empty() { &spare[..0] } else { bytes };
        self.comm.all_gather_varcount_into(
            send,
            &mut PartitionMut::new(&mut all[..], &counts[..], &displs[..]),
        );
        let mut out = Vec::with_capacity(self.size);
        let mut at = 0;
        for &c in &counts {
            out.push(all[at..at + c as usize].to_vec());
            at += c as usize;
        }
        Ok(out)
    }

    fn barrier(&mut self) -> Result<()> {
        self.agree("barrier", OP_BARRIER, 0, 0)?;
        self.comm.barrier();
        Ok(())
    }
}
