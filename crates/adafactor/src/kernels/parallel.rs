//! Parallel scheduling: how a tensor is split into work units across rayon's threads, each
//! unit compiled for the best allowed instruction set ([`super::cpu::vectorized`]).

use super::cpu::{vectorized, vectorized_wide};
use rayon::prelude::*;

/// Tensors with fewer elements than this run on the calling thread: many small tensors are
/// parallelised across tensors by the caller, not inside each one.
pub const PARALLEL_THRESHOLD: usize = 1 << 16;

/// Target elements per parallel work unit of one large tensor.
pub const UNIT_ELEMS: usize = 1 << 15;

/// Runs `f(start, chunk)` over `dst` in chunks of [`UNIT_ELEMS`] elements in parallel when the
/// tensor is large, else over the whole slice at once (nothing for an empty slice).
pub(crate) fn for_chunks<A: Send>(dst: &mut [A], f: impl Fn(usize, &mut [A]) + Sync + Send) {
    if parallel_for(dst.len()) {
        dst.par_chunks_mut(UNIT_ELEMS)
            .enumerate()
            .for_each(|(i, c)| {
                vectorized(
                    #[inline(always)]
                    || f(i * UNIT_ELEMS, c),
                )
            });
    } else if !dst.is_empty() {
        vectorized(
            #[inline(always)]
            || f(0, dst),
        );
    }
}

/// `dst` cut into its work units, each with the index of its first element: chunks of
/// [`UNIT_ELEMS`] from [`split_for`]'s length on, else the whole slice (the length alone decides,
/// so reductions over the units do not depend on the thread count).
pub(crate) fn chunk_units<A>(dst: &mut [A]) -> Vec<(usize, &mut [A])> {
    let len = dst.len();
    let chunk = if split_for(len) {
        UNIT_ELEMS
    } else {
        len.max(1)
    };
    dst.chunks_mut(chunk)
        .enumerate()
        .map(|(i, c)| (i * chunk, c))
        .collect()
}

/// Runs `f` over work units, in parallel when `parallel`, keeping the units' order in the
/// results (so reductions are deterministic).
pub(crate) fn map_units<U: Send, R: Send>(
    units: Vec<U>,
    parallel: bool,
    f: impl Fn(U) -> R + Sync + Send,
) -> Vec<R> {
    map_units_at::<false, U, R>(units, parallel, f)
}

/// [`map_units`], each unit compiled for AVX-512 where allowed ([`vectorized_wide`]).
pub(crate) fn map_units_wide<U: Send, R: Send>(
    units: Vec<U>,
    parallel: bool,
    f: impl Fn(U) -> R + Sync + Send,
) -> Vec<R> {
    map_units_at::<true, U, R>(units, parallel, f)
}

/// [`map_units`] with the units compiled by [`vectorized_wide`] when `WIDE`, else by
/// [`vectorized`].
#[inline(always)]
fn map_units_at<const WIDE: bool, U: Send, R: Send>(
    units: Vec<U>,
    parallel: bool,
    f: impl Fn(U) -> R + Sync + Send,
) -> Vec<R> {
    let run = |u: U| {
        if WIDE {
            vectorized_wide(
                #[inline(always)]
                || f(u),
            )
        } else {
            vectorized(
                #[inline(always)]
                || f(u),
            )
        }
    };
    if parallel && units.len() > 1 {
        units.into_par_iter().map(run).collect()
    } else {
        units.into_iter().map(run).collect()
    }
}

/// Most work units a factored tensor's rows are split into: four per thread for up to sixteen
/// threads, and few enough that the units' column partial sums stay small. A constant, not the
/// thread count, so that the units, and the grouping in which their partial sums are added,
/// are the same on every machine.
pub(crate) const MAX_UNITS: usize = 64;

/// Fewest rows per work unit (when the tensor has that many): pass 1 adds its float32 column
/// sums into the unit's f64 totals every 64 rows, and shorter units would do it more often.
pub(crate) const MIN_UNIT_ROWS: usize = 64;

/// Rows per work unit for `rows` rows of `m` elements: about [`UNIT_ELEMS`] elements and at
/// least [`MIN_UNIT_ROWS`] rows, and at most [`MAX_UNITS`] units.
pub(crate) fn rows_per_unit(rows: usize, m: usize) -> usize {
    let by_size = (UNIT_ELEMS / m.max(1)).max(MIN_UNIT_ROWS.min(rows));
    by_size.max(rows.div_ceil(MAX_UNITS)).max(1)
}

/// Whether a tensor of `len` elements is split into work units. The shape alone decides (the
/// units run in parallel when [`parallel_for`] says so), so reductions over the units give the
/// same bits with any number of threads.
pub(crate) fn split_for(len: usize) -> bool {
    len >= PARALLEL_THRESHOLD
}

/// Whether a tensor of `len` elements is split across threads.
pub(crate) fn parallel_for(len: usize) -> bool {
    len >= PARALLEL_THRESHOLD && rayon::current_num_threads() > 1
}

/// Runs `f` on this thread's value of `key`, taken out meanwhile (a nested call gets the
/// default): what a thread keeps from one work unit to the next, instead of allocating it per
/// unit.
#[inline(always)]
pub(crate) fn with_kept<S: Default, R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<S>>,
    f: impl FnOnce(&mut S) -> R,
) -> R {
    let mut s = key.take();
    let out = f(&mut s);
    key.set(s);
    out
}

/// Runs `f` on a rayon pool of `threads` threads (tests of thread-count independence).
#[cfg(test)]
pub(crate) fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool")
        .install(f)
}
