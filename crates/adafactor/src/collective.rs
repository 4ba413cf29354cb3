//! The collective contract of data-parallel training: what every rank of a group can ask of the
//! others (sums of slices, bytes shared from one rank or from all), plus the pure helpers built
//! on it: a consistency check of ranks' descriptions, gradient buckets, and a byte-balanced
//! partition of variables across ranks.
//!
//! Two implementations: [`ThreadGroup`] here (ranks are threads of one process: the test double
//! that lets the ordinary test suite cover distributed logic, and a single-machine convenience),
//! and MPI in the `adafactor-mpi` crate (ranks are processes on one or many machines).
//!
//! # Bit-exactness
//!
//! Replicas that must stay bit-identical cannot tolerate a sum that differs in its last bit from
//! one rank to another. Every implementation of [`Collective`] must therefore give **every rank
//! the identical result, bit for bit**. [`ThreadGroup`] (and the MPI transport's default) go
//! further: a sum is the contributions added **in rank order**, `((x0 + x1) + x2) + ...`, element
//! by element, so it equals what a single process adding the ranks' contributions in rank order
//! computes. With two ranks any order gives these bits, since floating-point addition is
//! commutative.
//!
//! # Misuse
//!
//! All ranks must call the same collectives in the same order with matching arguments (the same
//! slice length, the same root). Where an implementation can see a mismatch it returns an error
//! on every rank instead of hanging or returning garbage.
//!
//! ```
//! use adafactor::collective::{Collective, ThreadGroup};
//!
//! # fn main() -> adafactor::Result<()> {
//! let sums = std::thread::scope(|s| {
//!     let handles: Vec<_> = ThreadGroup::new(3)?
//!         .into_iter()
//!         .map(|mut c| {
//!             s.spawn(move || -> adafactor::Result<Vec<f32>> {
//!                 let mut grad = vec![c.rank() as f32 + 1.0; 4];
//!                 c.all_reduce_sum_f32(&mut grad)?;
//!                 Ok(grad)
//!             })
//!         })
//!         .collect();
//!     handles
//!         .into_iter()
//!         .map(|h| h.join().expect("rank thread panicked"))
//!         .collect::<adafactor::Result<Vec<_>>>()
//! })?;
//! assert!(sums.iter().all(|s| s == &vec![6.0f32; 4]));
//! # Ok(()) }
//! ```

use crate::error::{Error, Result};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What one rank of a data-parallel group can ask of all the others.
///
/// Every method is a collective: all ranks call it, in the same order, with matching arguments;
/// it returns once this rank's part is done. Sums give every rank the identical bits (see the
/// [module documentation](self)). Errors name the operation and, where known, the rank at fault.
pub trait Collective: Send {
    /// This rank's index, `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Replaces `values` with the element-wise sum of every rank's `values` (same length on every
    /// rank).
    ///
    /// # Errors
    /// The ranks' lengths differ, or the transport failed.
    fn all_reduce_sum_f32(&mut self, values: &mut [f32]) -> Result<()>;

    /// [`all_reduce_sum_f32`](Self::all_reduce_sum_f32) for `f64` (partial sums of squares of a
    /// global norm).
    ///
    /// # Errors
    /// The ranks' lengths differ, or the transport failed.
    fn all_reduce_sum_f64(&mut self, values: &mut [f64]) -> Result<()>;

    /// Replaces `values` with the element-wise maximum over the ranks (flags: any rank saw a
    /// non-finite gradient).
    ///
    /// # Errors
    /// The ranks' lengths differ, or the transport failed.
    fn all_reduce_max_u64(&mut self, values: &mut [u64]) -> Result<()>;

    /// Replaces `bytes` on every rank with `root`'s `bytes` (whatever the other ranks held, of
    /// any length).
    ///
    /// # Errors
    /// `root` is not a rank, the ranks name different roots, or the transport failed.
    fn broadcast_bytes(&mut self, root: usize, bytes: &mut Vec<u8>) -> Result<()>;

    /// Every rank's `bytes` (any length, may differ between ranks), indexed by rank.
    ///
    /// # Errors
    /// The transport failed.
    fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Returns once every rank has called it.
    ///
    /// # Errors
    /// The transport failed.
    fn barrier(&mut self) -> Result<()>;

    /// Whether `flag` is true on any rank (one [`all_reduce_max_u64`](Self::all_reduce_max_u64)
    /// of a single value).
    ///
    /// # Errors
    /// As [`all_reduce_max_u64`](Self::all_reduce_max_u64).
    fn any(&mut self, flag: bool) -> Result<bool> {
        let mut v = [u64::from(flag)];
        self.all_reduce_max_u64(&mut v)?;
        Ok(v[0] != 0)
    }

    /// The sum of `x` over the ranks (one [`all_reduce_sum_f64`](Self::all_reduce_sum_f64) of a
    /// single value).
    ///
    /// # Errors
    /// As [`all_reduce_sum_f64`](Self::all_reduce_sum_f64).
    fn sum_f64(&mut self, x: f64) -> Result<f64> {
        let mut v = [x];
        self.all_reduce_sum_f64(&mut v)?;
        Ok(v[0])
    }
}

/// The error of a collective `op` (all collective failures go through here, so they read alike).
pub fn collective_error(op: &str, message: impl std::fmt::Display) -> Error {
    Error::invalid(op, format!("collective `{op}` failed: {message}"))
}

/// A 64-bit fingerprint of a sequence of byte strings, to compare ranks' descriptions (config
/// JSON, variable names, shapes, dtypes) without sending them.
///
/// The hash is 64-bit FNV-1a over each part's length (8 bytes, little-endian) followed by its
/// bytes, so `["ab", "c"]` and `["a", "bc"]` differ. It is stable across platforms and releases
/// (it is compared between processes that may run different builds). It detects accidents, not
/// adversaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Self::new()
    }
}

impl Fingerprint {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    /// The fingerprint of nothing.
    pub fn new() -> Self {
        Self(Self::OFFSET)
    }

    fn eat(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    /// Adds one part.
    pub fn add(&mut self, part: &[u8]) -> &mut Self {
        self.eat(&(part.len() as u64).to_le_bytes());
        self.eat(part);
        self
    }

    /// Adds one variable: its name, shape and dtype name, as three parts.
    pub fn add_variable(&mut self, name: &str, shape: &[usize], dtype: &str) -> &mut Self {
        let dims: Vec<u8> = shape
            .iter()
            .flat_map(|&d| (d as u64).to_le_bytes())
            .collect();
        self.add(name.as_bytes()).add(&dims).add(dtype.as_bytes())
    }

    /// The 64-bit value.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// Checks that every rank holds the same `fingerprint` of `what` (e.g. "config and variables").
///
/// One all-gather of 8 bytes per rank; every rank compares all of them, so on a mismatch every
/// rank returns the same error, naming the first rank that differs from rank 0.
///
/// # Errors
/// The ranks' fingerprints differ, or the collective failed.
pub fn check_same_on_all_ranks(
    comm: &mut dyn Collective,
    what: &str,
    fingerprint: Fingerprint,
) -> Result<()> {
    let all = comm.all_gather_bytes(&fingerprint.value().to_le_bytes())?;
    let values = all
        .iter()
        .enumerate()
        .map(|(rank, b)| {
            <[u8; 8]>::try_from(b.as_slice())
                .map(u64::from_le_bytes)
                .map_err(|_| {
                    collective_error(
                        "check_same_on_all_ranks",
                        format!(
                            "rank {rank} sent {} bytes, not an 8-byte fingerprint",
                            b.len()
                        ),
                    )
                })
        })
        .collect::<Result<Vec<u64>>>()?;
    match values.iter().position(|&v| v != values[0]) {
        None => Ok(()),
        Some(rank) => Err(collective_error(
            "check_same_on_all_ranks",
            format!(
                "the ranks disagree on {what}: rank {rank} has fingerprint {:016x}, rank 0 has \
                 {:016x} (every rank must build the same config and the same variables, in the \
                 same order, with the same shapes and dtypes)",
                values[rank], values[0]
            ),
        )),
    }
}

/// One gradient bucket: consecutive tensors summed by one all-reduce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// The tensors, as indices into the list given to [`buckets`].
    pub tensors: Range<usize>,
    /// Their total number of elements.
    pub elements: usize,
}

/// Groups consecutive tensors of `lens` elements (`elem_bytes` each) into buckets of at most
/// `bucket_bytes`, so that a step does a few large all-reduces rather than one per tensor. A
/// tensor larger than `bucket_bytes` is a bucket of its own; empty tensors join their neighbours.
/// The result depends only on the arguments (every rank computes the same buckets).
///
/// ```
/// use adafactor::collective::buckets;
///
/// // float32 tensors of 10, 20, 100 and 5 elements, buckets of at most 128 bytes:
/// let b = buckets(&[10, 20, 100, 5], 4, 128)?;
/// assert_eq!(b.iter().map(|b| b.tensors.clone()).collect::<Vec<_>>(), [0..2, 2..3, 3..4]);
/// assert_eq!(b[0].elements, 30);
/// # Ok::<(), adafactor::Error>(())
/// ```
///
/// # Errors
/// `elem_bytes` or `bucket_bytes` is zero.
pub fn buckets(lens: &[usize], elem_bytes: usize, bucket_bytes: usize) -> Result<Vec<Bucket>> {
    if elem_bytes == 0 || bucket_bytes == 0 {
        return Err(Error::invalid(
            "bucket_bytes",
            format!(
                "gradient buckets need a positive element size and bucket size, got \
                 elem_bytes={elem_bytes}, bucket_bytes={bucket_bytes}"
            ),
        ));
    }
    let mut out: Vec<Bucket> = Vec::new();
    let mut start = 0;
    let mut bytes = 0usize;
    let mut elements = 0usize;
    for (i, &len) in lens.iter().enumerate() {
        let b = len.saturating_mul(elem_bytes);
        if i > start && bytes.saturating_add(b) > bucket_bytes {
            out.push(Bucket {
                tensors: start..i,
                elements,
            });
            start = i;
            bytes = 0;
            elements = 0;
        }
        bytes = bytes.saturating_add(b);
        elements += len;
    }
    if start < lens.len() {
        out.push(Bucket {
            tensors: start..lens.len(),
            elements,
        });
    }
    Ok(out)
}

/// Sums `slices` across the ranks in the [`buckets`] of `bucket_bytes`: a bucket of one tensor is
/// reduced in place, a bucket of several is packed into one buffer, reduced, and unpacked. The
/// result is the same as reducing each slice on its own (sums are element-wise).
///
/// The ranks first check that they hold the same slice lengths and bucket size (one 8-byte
/// all-gather), since otherwise they would make different numbers of calls and wait forever.
///
/// # Errors
/// The ranks' slice lengths or bucket sizes differ (nothing is summed), or as [`buckets`] and
/// [`Collective::all_reduce_sum_f32`]; after an error in a sum the slices hold partial results
/// (some buckets summed, others not).
pub fn all_reduce_sum_bucketed(
    comm: &mut dyn Collective,
    slices: &mut [&mut [f32]],
    bucket_bytes: usize,
) -> Result<()> {
    let lens: Vec<usize> = slices.iter().map(|s| s.len()).collect();
    let mut layout = Fingerprint::new();
    layout.add(&(bucket_bytes as u64).to_le_bytes());
    for &len in &lens {
        layout.add(&(len as u64).to_le_bytes());
    }
    check_same_on_all_ranks(comm, "the gradient lengths and bucket size", layout)?;
    let mut packed: Vec<f32> = Vec::new();
    for bucket in buckets(&lens, std::mem::size_of::<f32>(), bucket_bytes)? {
        let group = &mut slices[bucket.tensors];
        if let [only] = group {
            comm.all_reduce_sum_f32(only)?;
            continue;
        }
        packed.clear();
        packed.reserve(bucket.elements);
        for s in group.iter() {
            packed.extend_from_slice(s);
        }
        comm.all_reduce_sum_f32(&mut packed)?;
        let mut at = 0;
        for s in group.iter_mut() {
            s.copy_from_slice(&packed[at..at + s.len()]);
            at += s.len();
        }
    }
    Ok(())
}

/// Assigns each variable (of `bytes[i]` bytes) to one of `ranks` ranks, balanced by bytes: the
/// owner of each variable, indexed like `bytes`.
///
/// Largest first (ties: lower index first), each to the rank with the fewest bytes so far (ties:
/// lower rank). Deterministic; every variable gets exactly one owner; the most and the least
/// loaded ranks differ by at most the largest variable.
///
/// ```
/// use adafactor::collective::partition_by_bytes;
///
/// // Two ranks: the 400-byte variable alone, the rest together (300 bytes).
/// assert_eq!(partition_by_bytes(&[100, 400, 200], 2)?, [1, 0, 1]);
/// # Ok::<(), adafactor::Error>(())
/// ```
///
/// # Errors
/// `ranks` is zero.
pub fn partition_by_bytes(bytes: &[usize], ranks: usize) -> Result<Vec<usize>> {
    if ranks == 0 {
        return Err(Error::invalid(
            "ranks",
            "a partition of variables across ranks needs at least one rank, got 0",
        ));
    }
    let mut order: Vec<usize> = (0..bytes.len()).collect();
    order.sort_by(|&a, &b| bytes[b].cmp(&bytes[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; ranks];
    let mut owner = vec![0usize; bytes.len()];
    for i in order {
        let r = (0..ranks).min_by_key(|&r| (load[r], r)).unwrap_or_default();
        owner[i] = r;
        load[r] = load[r].saturating_add(bytes[i]);
    }
    Ok(owner)
}

/// One rank's contribution to a collective, as the thread group exchanges it.
#[derive(Debug)]
enum Payload {
    F32(Vec<f32>),
    F64(Vec<f64>),
    U64(Vec<u64>),
    Broadcast { root: usize, bytes: Option<Vec<u8>> },
    Gather(Vec<u8>),
    Barrier,
}

impl Payload {
    /// What all ranks must agree on: the operation and its length or root.
    fn signature(&self) -> String {
        match self {
            Payload::F32(v) => format!("all_reduce_sum_f32 of {} values", v.len()),
            Payload::F64(v) => format!("all_reduce_sum_f64 of {} values", v.len()),
            Payload::U64(v) => format!("all_reduce_max_u64 of {} values", v.len()),
            Payload::Broadcast { root, .. } => format!("broadcast_bytes from root {root}"),
            Payload::Gather(_) => "all_gather_bytes".to_string(),
            Payload::Barrier => "barrier".to_string(),
        }
    }
}

#[derive(Debug, PartialEq)]
enum Phase {
    /// Ranks are depositing their contributions.
    Gathering,
    /// All have; ranks are taking the contributions (the next call waits).
    Releasing,
}

#[derive(Debug)]
struct State {
    generation: u64,
    phase: Phase,
    slots: Vec<Option<Arc<Payload>>>,
    arrived: usize,
    departed: usize,
    /// Set once the group cannot complete collectives any more (a rank left, or timed out).
    broken: Option<String>,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    timeout: Option<Duration>,
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-updated in a way that matters:
        // the panicking rank's handle is dropped during unwinding and marks the group broken.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Constructor of an in-process group of ranks that are threads.
///
/// The handles are [`ThreadCollective`]s, one per rank, to move into one thread each. Sums are in
/// rank order (see the [module documentation](self)). Misuse gives errors on every rank: different
/// operations or lengths at the same call; a handle dropped (its thread returned or panicked)
/// while others wait; and, with [`with_timeout`](Self::with_timeout), a rank that does not arrive
/// in time. After a rank left or timed out the group is broken: every later call fails.
#[derive(Debug)]
pub struct ThreadGroup;

impl ThreadGroup {
    /// A group of `size` ranks that wait for each other as long as it takes (as MPI does).
    ///
    /// # Errors
    /// `size` is zero.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(size: usize) -> Result<Vec<ThreadCollective>> {
        Self::build(size, None)
    }

    /// A group whose ranks give up with an error after waiting `timeout` for the others.
    ///
    /// # Errors
    /// `size` is zero.
    pub fn with_timeout(size: usize, timeout: Duration) -> Result<Vec<ThreadCollective>> {
        Self::build(size, Some(timeout))
    }

    fn build(size: usize, timeout: Option<Duration>) -> Result<Vec<ThreadCollective>> {
        if size == 0 {
            return Err(Error::invalid(
                "size",
                "a thread group needs at least one rank, got 0",
            ));
        }
        let shared = Arc::new(Shared {
            size,
            timeout,
            state: Mutex::new(State {
                generation: 0,
                phase: Phase::Gathering,
                slots: vec![None; size],
                arrived: 0,
                departed: 0,
                broken: None,
            }),
            wake: Condvar::new(),
        });
        Ok((0..size)
            .map(|rank| ThreadCollective {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect())
    }
}

/// One rank of a [`ThreadGroup`].
#[derive(Debug)]
pub struct ThreadCollective {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadCollective {
    /// Waits on the condition variable, honouring the group's timeout; `Err` names what was
    /// awaited once the deadline has passed.
    fn wait<'a>(
        &self,
        guard: MutexGuard<'a, State>,
        deadline: Option<Instant>,
    ) -> std::result::Result<MutexGuard<'a, State>, MutexGuard<'a, State>> {
        match deadline {
            None => Ok(self
                .shared
                .wake
                .wait(guard)
                .unwrap_or_else(|e| e.into_inner())),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(guard);
                }
                let (g, _) = self
                    .shared
                    .wake
                    .wait_timeout(guard, left)
                    .unwrap_or_else(|e| e.into_inner());
                Ok(g)
            }
        }
    }

    /// Deposits this rank's contribution and returns everyone's, once all have arrived.
    fn exchange(&mut self, op: &str, payload: Payload) -> Result<Vec<Arc<Payload>>> {
        let shared = Arc::clone(&self.shared);
        let deadline = shared.timeout.map(|t| Instant::now() + t);
        let mut st = shared.lock();
        // Wait for the previous collective to be fully taken.
        loop {
            if let Some(why) = &st.broken {
                return Err(collective_error(op, why));
            }
            if st.phase == Phase::Gathering {
                break;
            }
            st = match self.wait(st, deadline) {
                Ok(g) => g,
                Err(mut g) => {
                    let why = format!(
                        "rank {} waited {:?} for the previous collective to finish",
                        self.rank,
                        shared.timeout.unwrap_or_default()
                    );
                    g.broken = Some(why.clone());
                    shared.wake.notify_all();
                    return Err(collective_error(op, why));
                }
            };
        }
        let generation = st.generation;
        st.slots[self.rank] = Some(Arc::new(payload));
        st.arrived += 1;
        if st.arrived == shared.size {
            st.phase = Phase::Releasing;
            st.departed = 0;
            shared.wake.notify_all();
        }
        while !(st.generation == generation && st.phase == Phase::Releasing) {
            if let Some(why) = &st.broken {
                return Err(collective_error(op, why));
            }
            st = match self.wait(st, deadline) {
                Ok(g) => g,
                Err(mut g) => {
                    let missing: Vec<usize> =
                        (0..shared.size).filter(|&r| g.slots[r].is_none()).collect();
                    let why = format!(
                        "rank {} waited {:?} for ranks {missing:?}, which did not join",
                        self.rank,
                        shared.timeout.unwrap_or_default()
                    );
                    g.broken = Some(why.clone());
                    shared.wake.notify_all();
                    return Err(collective_error(op, why));
                }
            };
        }
        let all: Vec<Arc<Payload>> = st.slots.iter().flatten().cloned().collect();
        st.departed += 1;
        if st.departed == shared.size {
            st.slots.iter_mut().for_each(|s| *s = None);
            st.arrived = 0;
            st.phase = Phase::Gathering;
            st.generation += 1;
            shared.wake.notify_all();
        }
        drop(st);
        let first = all[0].signature();
        if let Some(r) = all.iter().position(|p| p.signature() != first) {
            return Err(collective_error(
                op,
                format!(
                    "the ranks called different collectives: rank 0 called {first}, rank {r} \
                     called {}",
                    all[r].signature()
                ),
            ));
        }
        Ok(all)
    }
}

impl Drop for ThreadCollective {
    fn drop(&mut self) {
        if self.shared.size == 1 {
            return;
        }
        let mut st = self.shared.lock();
        if st.broken.is_none() {
            st.broken = Some(format!(
                "rank {} left the group (its handle was dropped: its thread returned or panicked)",
                self.rank
            ));
        }
        self.shared.wake.notify_all();
    }
}

/// Sums the ranks' vectors element by element, in rank order.
fn sum_in_rank_order<'a, T: Copy + std::ops::AddAssign + 'a>(
    out: &mut [T],
    parts: impl Iterator<Item = Result<&'a [T]>>,
) -> Result<()> {
    for (i, part) in parts.enumerate() {
        let part = part?;
        if i == 0 {
            out.copy_from_slice(part);
        } else {
            out.iter_mut().zip(part).for_each(|(o, &x)| *o += x);
        }
    }
    Ok(())
}

fn unexpected(op: &str) -> Error {
    collective_error(
        op,
        "internal error: a rank's contribution has the wrong kind",
    )
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum_f32(&mut self, values: &mut [f32]) -> Result<()> {
        const OP: &str = "all_reduce_sum_f32";
        let all = self.exchange(OP, Payload::F32(values.to_vec()))?;
        sum_in_rank_order(
            values,
            all.iter().map(|p| match &**p {
                Payload::F32(v) => Ok(v.as_slice()),
                _ => Err(unexpected(OP)),
            }),
        )
    }

    fn all_reduce_sum_f64(&mut self, values: &mut [f64]) -> Result<()> {
        const OP: &str = "all_reduce_sum_f64";
        let all = self.exchange(OP, Payload::F64(values.to_vec()))?;
        sum_in_rank_order(
            values,
            all.iter().map(|p| match &**p {
                Payload::F64(v) => Ok(v.as_slice()),
                _ => Err(unexpected(OP)),
            }),
        )
    }

    fn all_reduce_max_u64(&mut self, values: &mut [u64]) -> Result<()> {
        const OP: &str = "all_reduce_max_u64";
        let all = self.exchange(OP, Payload::U64(values.to_vec()))?;
        for p in &all {
            match &**p {
                Payload::U64(v) => values
                    .iter_mut()
                    .zip(v)
                    .for_each(|(o, &x)| *o = (*o).max(x)),
                _ => return Err(unexpected(OP)),
            }
        }
        Ok(())
    }

    fn broadcast_bytes(&mut self, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
        const OP: &str = "broadcast_bytes";
        if root >= self.shared.size {
            // Still take part, so that the ranks that named a valid root are not left waiting.
            let _ = self.exchange(OP, Payload::Broadcast { root, bytes: None });
            return Err(collective_error(
                OP,
                format!(
                    "root {root} is not a rank of a group of {}",
                    self.shared.size
                ),
            ));
        }
        let mine = (self.rank == root).then(|| bytes.clone());
        let all = self.exchange(OP, Payload::Broadcast { root, bytes: mine })?;
        match &*all[root] {
            Payload::Broadcast {
                bytes: Some(root_bytes),
                ..
            } => {
                bytes.clone_from(root_bytes);
                Ok(())
            }
            _ => Err(unexpected(OP)),
        }
    }

    fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        const OP: &str = "all_gather_bytes";
        let all = self.exchange(OP, Payload::Gather(bytes.to_vec()))?;
        all.iter()
            .map(|p| match &**p {
                Payload::Gather(v) => Ok(v.clone()),
                _ => Err(unexpected(OP)),
            })
            .collect()
    }

    fn barrier(&mut self) -> Result<()> {
        self.exchange("barrier", Payload::Barrier).map(|_| ())
    }
}
