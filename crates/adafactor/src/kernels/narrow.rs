//! Few rows (`1 x n`, `4 x n`, `64 x n`): work units across columns.
//!
//! A unit holds every row of a range of columns, so its column statistics are complete inside
//! it (each unit writes its own columns of `c`) and only the `n` row sums are combined across
//! units, in unit order. A row loop over such a matrix would give each unit a column accumulator
//! as long as the row, read and written for every row. See [`super::shaped`] for the passes.

use super::cpu::{prefetch, prefetch_raw};
use super::element::Element;
use super::factored::row_sq_and_cols;
use super::grad::{decayed_view, Decay, Grad};
use super::parallel::{map_units_wide, parallel_for, UNIT_ELEMS};
use super::reduce::{nonfinite_probe, sum_sq, CHUNK};
use super::row_args::new_stat;
use super::shaped::{add_into, load_grad, Fresh, Reads, StatArgs, Statistics, Sums, WriteArgs};
use crate::state::Factoring;

/// Fewest and most columns per unit: long enough runs for the prefetcher, a buffer that stays
/// in the first-level cache. At least one block of [`CHUNK`] columns, so that each visit to a
/// row reads a whole block (4 KiB of float32): with 512 columns, `64 x 262144` read 2 KiB runs
/// a megabyte apart and took 17.0 to 18.3 ms a step against 13.2 to 15.3 ms with 1024
/// (BENCHMARKS.md).
const MIN_COLS: usize = CHUNK;
const MAX_COLS: usize = 8192;

/// Elements of a row between two asks for the next row's block.
const PIECE: usize = 128;

/// Columns per work unit of `n` rows: about [`UNIT_ELEMS`] elements.
fn cols_per_unit(n: usize) -> usize {
    (UNIT_ELEMS / n.max(1)).clamp(MIN_COLS, MAX_COLS)
}

/// Asks for `len` elements at `start` of the gradient and of the weight (clipped to them): the
/// next row's block. A unit visits one block of [`CHUNK`] elements per row, row after row, too
/// short a run for the hardware prefetcher to see the next one coming (a single row is one
/// stream, which it does see: `1 x n` asks for nothing).
#[inline(always)]
fn ask_block<T>(g: &[T], x: Option<&[T]>, start: usize, len: usize) {
    for v in [Some(g), x].into_iter().flatten() {
        let from = start.min(v.len());
        prefetch(&v[from..(from + len).min(v.len())]);
    }
}

/// A row's squares `g_j^2` added into the unit's float32 column sums `col`; returns the row's
/// sum of squares, [`sum_sq`] (float32 lanes within a block of [`CHUNK`], blocks added in
/// f64). The caller checks that the sums are finite (a matrix of few rows adds
/// at most [`super::shaped::MAX_FEW_ROWS`] squares per column in float32, as the row loops
/// add a block of rows).
///
/// `ask(k)` is called before element `k` of every [`PIECE`], to ask for what comes next.
#[inline(always)]
fn squares_into(g: &[f32], col: &mut [f32], ask: impl Fn(usize)) -> f64 {
    let mut total = 0f64;
    for (k0, (gb, cb)) in g.chunks(CHUNK).zip(col.chunks_mut(CHUNK)).enumerate() {
        // Two loops over a block in the first-level cache, each of which the compiler
        // vectorises (one loop doing both does not); the first in pieces (elementwise, so
        // they change no bits).
        for (p, (gp, cp)) in gb.chunks(PIECE).zip(cb.chunks_mut(PIECE)).enumerate() {
            ask(k0 * CHUNK + p * PIECE);
            for (c, g) in cp.iter_mut().zip(gp) {
                *c += g * g;
            }
        }
        total += sum_sq(gb);
    }
    total
}

/// `sum_j ((s g_j) b_j)^2` over a block, float32 lanes added in f64.
#[inline(always)]
fn weighted_sq(g: &[f32], b: &[f32], s: f32) -> f64 {
    let mut lanes = [0f32; 16];
    let mut gi = g.chunks_exact(16);
    let mut bi = b.chunks_exact(16);
    for (gc, bc) in (&mut gi).zip(&mut bi) {
        for l in 0..16 {
            let t = (s * gc[l]) * bc[l];
            lanes[l] += t * t;
        }
    }
    for (g, b) in gi.remainder().iter().zip(bi.remainder()) {
        let t = (s * g) * b;
        lanes[0] += t * t;
    }
    lanes.iter().map(|v| *v as f64).sum()
}

/// The scalars of [`new_stat`] for a unit's columns.
#[derive(Clone, Copy)]
struct StatScalars {
    /// Rows per column.
    count: usize,
    beta2: f32,
    epsilon_1: f32,
    /// The square of the gradient scale.
    s2: f64,
}

/// Each column's new statistic, `c_j = new_stat(old_j, sum_j, ...)` bit for bit, and its
/// factor `b_j = 1 / sqrt(c_j)`, in one vectorisable loop: the division by the row count is a
/// multiplication by its reciprocal when the count is a power of two (`1 x n`, `4 x n`, `64 x
/// n`), which gives the same bits (`x * 2^-k` and `x / 2^k` are the same real number).
#[inline(always)]
fn column_stats<S: Copy + Into<f64>>(
    sums: &[S],
    old: &[f32],
    k: StatScalars,
    c: &mut [f32],
    b: &mut [f32],
) {
    if k.count.is_power_of_two() {
        let inv = 1.0 / k.count as f64;
        column_stats_by(sums, old, k, c, b, move |q| q * inv);
    } else {
        let d = k.count as f64;
        column_stats_by(sums, old, k, c, b, move |q| q / d);
    }
}

#[inline(always)]
fn column_stats_by<S: Copy + Into<f64>>(
    sums: &[S],
    old: &[f32],
    k: StatScalars,
    c: &mut [f32],
    b: &mut [f32],
    mean: impl Fn(f64) -> f64,
) {
    let (beta2, eps, s2) = (k.beta2, k.epsilon_1 as f64, k.s2);
    // As `new_stat`: a zero scale zeroes the gradient, even where its sum of squares overflowed.
    let zero = s2 == 0.0;
    for (((c, b), s), old) in c.iter_mut().zip(b.iter_mut()).zip(sums).zip(old) {
        let sum: f64 = (*s).into();
        let sq = if zero { 0.0 } else { sum * s2 };
        let q = (mean(sq) + eps) as f32;
        *c = beta2 * old + (1.0 - beta2) * q;
        *b = 1.0 / c.sqrt();
    }
}

/// One unit's partial row sums.
struct Part {
    slice: usize,
    /// Per row, the sum of `g^2` over the unit's columns.
    rows: Vec<f64>,
    /// Per row, `sum_j ((s g_ij) b_j)^2` over the unit's columns.
    weighted: Vec<f64>,
    sums: Sums,
}

/// The statistics pass of a matrix of few rows.
pub(crate) fn statistics<T: Element>(
    grad: &Grad<'_, T>,
    reads: Reads<'_, T>,
    f: Factoring,
    args: StatArgs<'_>,
    out: Fresh,
) -> (Statistics, Sums) {
    let (n, m) = (f.n, f.m);
    let cpu = cols_per_unit(n);
    let Fresh { mut r, mut c } = out;
    let units: Vec<((usize, usize), &mut [f32])> = c
        .chunks_mut(m)
        .enumerate()
        .flat_map(|(slice, cs)| {
            cs.chunks_mut(cpu)
                .enumerate()
                .map(move |(k, c)| ((slice, k * cpu), c))
        })
        .collect();
    let (b2, eps, sc) = (args.beta2, args.epsilon_1, args.scale);
    let s2 = (sc as f64) * (sc as f64);
    // Clamping would hide an infinity from the sums: with clipvalue the gradient is probed as
    // it is read; otherwise finite sums show a finite gradient, and only a unit whose sums are
    // not finite looks at the values themselves.
    let probe_clip = reads.check && grad.transform.clip_value.is_some();
    let parts = map_units_wide(
        units,
        parallel_for(f.len()),
        #[inline(always)]
        |((slice, j0), c_out)| {
            let width = c_out.len();
            let row_start = |i: usize| (slice * n + i) * m + j0;
            let bw = CHUNK.min(width);
            let mut gbuf = vec![0f32; bw];
            let mut xbuf = vec![0f32; if reads.x.is_some() { bw } else { 0 }];
            let (mut col, mut b) = (vec![0f32; bw], vec![0f32; bw]);
            let (mut rows, mut xrows) = (vec![0f64; n], vec![0f64; n]);
            let (mut block_rows, mut weighted) = (vec![0f64; n], vec![0f64; n]);
            let mut col64 = Vec::new();
            let mut sums = Sums::default();
            let stat = StatScalars {
                count: n,
                beta2: b2,
                epsilon_1: eps,
                s2,
            };
            // Column blocks of CHUNK, every row of a block before the next block: the rows'
            // streams are read side by side, and each row's sums are added block by block in
            // the order of one sweep along the row.
            for k0 in (0..width).step_by(CHUNK) {
                let w = CHUNK.min(width - k0);
                let (col, b) = (&mut col[..w], &mut b[..w]);
                col.fill(0.0);
                for (i, brow) in block_rows.iter_mut().enumerate() {
                    let start = row_start(i) + k0;
                    let (next, next_w) = next_block(i, n, row_start, k0, w, width);
                    if let Some(x) = reads.x {
                        let xv = decayed_view(&x[start..start + w], reads.decay, &mut xbuf[..w]);
                        xrows[i] += sum_sq(xv);
                    }
                    let g = load_grad(grad, start, &mut gbuf[..w], probe_clip, &mut sums.probe);
                    // The next row's block, asked for piece by piece along this one.
                    let ask = |k: usize| {
                        if n > 1 && k < next_w {
                            ask_block(grad.g, reads.x, next + k, PIECE.min(next_w - k));
                        }
                    };
                    *brow = squares_into(g, col, ask);
                }
                let c_old = &args.c_old[slice * m + j0 + k0..slice * m + j0 + k0 + w];
                let c_new = &mut c_out[k0..k0 + w];
                if block_rows.iter().all(|r| r.is_finite()) && nonfinite_probe(col) == 0.0 {
                    column_stats(col, c_old, stat, c_new, b);
                } else {
                    // Rare: float32 partial sums overflowed (huge but finite squares) or the
                    // gradient is not finite. Redo the block in f64, from cache.
                    col64.clear();
                    col64.resize(w, 0f64);
                    for (i, brow) in block_rows.iter_mut().enumerate() {
                        let start = row_start(i) + k0;
                        let g = grad.view(start, &mut gbuf[..w]);
                        *brow = row_sq_and_cols(g, &mut col64);
                        if reads.check && !probe_clip && !brow.is_finite() {
                            // Decide on the unscaled values themselves: a NaN or infinity, or
                            // only a finite value whose square overflows.
                            sums.probe += grad.load_checked(start, &mut gbuf[..w]);
                        }
                    }
                    column_stats(&col64, c_old, stat, c_new, b);
                }
                add_into(&mut rows, &block_rows);
                // RMS(u) needs the block's new column statistics: a second sweep, from cache.
                let mut probe = 0f32;
                for (i, wsum) in weighted.iter_mut().enumerate() {
                    let start = row_start(i) + k0;
                    let g = load_grad(grad, start, &mut gbuf[..w], false, &mut probe);
                    *wsum += weighted_sq(g, b, sc);
                }
            }
            sums.sum_sq_x = xrows.iter().sum();
            sums.sum_sq_grad = rows.iter().sum();
            Part {
                slice,
                rows,
                weighted,
                sums,
            }
        },
    );
    let mut row_sums = vec![0f64; f.lead * n];
    let mut weighted = vec![0f64; f.lead * n];
    let mut sums = Sums::default();
    for p in &parts {
        let at = p.slice * n..(p.slice + 1) * n;
        add_into(&mut row_sums[at.clone()], &p.rows);
        add_into(&mut weighted[at], &p.weighted);
        sums.add(&p.sums);
    }
    for ((r, s), old) in r.iter_mut().zip(&row_sums).zip(args.r_old) {
        *r = new_stat(*old, *s, m, b2, eps, s2);
    }
    let mut row_mean = Vec::with_capacity(f.lead);
    let mut sum_sq_update = 0f64;
    let mut a = vec![0f32; n];
    for (rs, ws) in r.chunks(n).zip(weighted.chunks(n)) {
        let mean = row_factors(rs, &mut a);
        row_mean.push(mean);
        sum_sq_update += a
            .iter()
            .zip(ws)
            .map(|(a, w)| (*a as f64) * (*a as f64) * w)
            .sum::<f64>();
    }
    let st = Statistics {
        r,
        c,
        row_mean,
        sum_sq_update,
    };
    (st, sums)
}

/// `a_i = sqrt(mean(r)) / sqrt(r_i)` for one slice's rows; returns `mean(r)`.
fn row_factors(r: &[f32], a: &mut [f32]) -> f32 {
    let mean = (r.iter().map(|v| *v as f64).sum::<f64>() / r.len() as f64) as f32;
    let sm = mean.sqrt();
    for (a, r) in a.iter_mut().zip(r) {
        *a = sm / r.sqrt();
    }
    mean
}

/// The write pass of a matrix of few rows.
pub(crate) fn write<T: Element>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    st: &Statistics,
    f: Factoring,
    w: WriteArgs,
) {
    let (n, m) = (f.n, f.m);
    if f.is_empty() {
        return;
    }
    let cpu = cols_per_unit(n);
    let units: Vec<(usize, usize)> = (0..f.lead)
        .flat_map(|slice| (0..m).step_by(cpu).map(move |j0| (slice, j0)))
        .rev()
        .collect();
    let x_at = SharedRows::new(x);
    map_units_wide(
        units,
        parallel_for(f.len()),
        #[inline(always)]
        |(slice, j0)| {
            let width = cpu.min(m - j0);
            let sm = st.row_mean[slice].sqrt();
            // `coef * a_i`, `a_i = sqrt(mean(r)) / sqrt(r_i)`, as the row loops compute it.
            let ca: Vec<f32> = st.r[slice * n..(slice + 1) * n]
                .iter()
                .map(|r| w.coef * (sm / r.sqrt()))
                .collect();
            let row_start = |i: usize| (slice * n + i) * m + j0;
            let bw = CHUNK.min(width);
            let (mut b, mut gbuf) = (vec![0f32; bw], vec![0f32; bw]);
            let mut xbuf = vec![0f32; if T::IS_F32 { 0 } else { bw }];
            // Column blocks of CHUNK, every row of a block before the next, as in the
            // statistics pass.
            for k0 in (0..width).step_by(CHUNK) {
                let len = CHUNK.min(width - k0);
                let c = &st.c[slice * m + j0 + k0..slice * m + j0 + k0 + len];
                let b = &mut b[..len];
                for (b, c) in b.iter_mut().zip(c) {
                    *b = 1.0 / c.sqrt();
                }
                for (i, ca) in ca.iter().enumerate() {
                    let start = row_start(i) + k0;
                    let (next, next_len) = next_block(i, n, row_start, k0, len, width);
                    // Pieces of the row, each asking for the same piece of the next row's
                    // block first: the asks spread over the row, not all at its start (the
                    // update is elementwise, so the pieces change no bits).
                    for p0 in (0..len).step_by(PIECE) {
                        let (at, pl) = (start + p0, PIECE.min(len - p0));
                        if n > 1 && p0 < next_len {
                            let nl = PIECE.min(next_len - p0);
                            ask_block(grad.g, None, next + p0, nl);
                            x_at.ask(next + p0, nl);
                        }
                        let g = grad.view(at, &mut gbuf[..pl]);
                        let b = &b[p0..p0 + pl];
                        // SAFETY: units cover disjoint column ranges, so no two touch the
                        // same elements.
                        let xs = unsafe { x_at.slice(at, pl) };
                        match T::as_f32_mut(xs) {
                            // A float32 weight is updated where it is stored.
                            Some(xf) => update_row(xf, g, b, *ca, w.scale, w.decay),
                            None => {
                                let xb = &mut xbuf[..pl];
                                T::load(xs, xb);
                                update_row(xb, g, b, *ca, w.scale, w.decay);
                                w.rounding.store_slice(xb, xs, at as u64);
                            }
                        }
                    }
                }
            }
        },
    );
}

/// The block a unit reads after row `i`'s block of `w` columns at `k0` (the unit's rows
/// starting at `row_start(i)`, `width` columns wide), and its width: the next row's same
/// block, and after the last row the first row's next block (zero wide after the last block).
/// Asked for while row `i` is read, so that each row's block is on its way before it is read.
/// (The last row used to ask for its own next block, which the row before it asks for again
/// in time, and nothing asked for the first row's: `4 x 4194304` took 7% less time with this.)
#[inline(always)]
fn next_block(
    i: usize,
    n: usize,
    row_start: impl Fn(usize) -> usize,
    k0: usize,
    w: usize,
    width: usize,
) -> (usize, usize) {
    if i + 1 < n {
        (row_start(i + 1) + k0, w)
    } else {
        let k1 = k0 + w;
        (row_start(0) + k1, CHUNK.min(width - k1))
    }
}

/// `x_j = decay(x_j) - ca * (s g_j) * b_j` over one row's columns, the operations of the row
/// loops' update in their order.
#[inline(always)]
fn update_row(x: &mut [f32], g: &[f32], b: &[f32], ca: f32, s: f32, decay: Option<Decay>) {
    match decay {
        None => {
            for ((x, g), b) in x.iter_mut().zip(g).zip(b) {
                *x -= ca * (s * g) * b;
            }
        }
        Some(d) => {
            for ((x, g), b) in x.iter_mut().zip(g).zip(b) {
                *x = d.apply(*x) - ca * (s * g) * b;
            }
        }
    }
}

/// Disjoint writable pieces of one buffer handed to parallel units (each unit writes a column
/// range of every row, which `chunks_mut` cannot express).
struct SharedRows<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: units only write disjoint element ranges (see `slice`).
unsafe impl<T: Send> Sync for SharedRows<T> {}
unsafe impl<T: Send> Send for SharedRows<T> {}

impl<T> SharedRows<T> {
    fn new(x: &mut [T]) -> Self {
        SharedRows {
            ptr: x.as_mut_ptr(),
            len: x.len(),
        }
    }

    /// Asks for elements `start..start + len` (clipped to the buffer), reading none.
    fn ask(&self, start: usize, len: usize) {
        let from = start.min(self.len);
        prefetch_raw(self.ptr.wrapping_add(from), len.min(self.len - from));
    }

    /// Elements `start..start + len`.
    ///
    /// # Safety
    /// No other live reference covers these elements.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        assert!(
            start + len <= self.len,
            "a unit's range lies within the buffer"
        );
        // SAFETY: in bounds (checked above); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::shaped::tests::{batch, half_decay, pass1_reads};
    use crate::kernels::shaped::{self, Fresh};
    use crate::kernels::Rounding;

    /// The vectorisable column update against [`new_stat`], bit for bit: row counts that are
    /// powers of two (a multiplication) and others (a division), scales of zero, one and
    /// others, sums near zero, huge and infinite.
    #[test]
    fn column_stats_have_the_bits_of_new_stat() {
        let sums: Vec<f64> = (0..200)
            .map(|i| match i % 7 {
                0 => 0.0,
                1 => f64::INFINITY,
                2 => 1e300 * i as f64,
                3 => 1e-40 * i as f64,
                _ => (i as f64 * 0.731).sin().abs() * 10f64.powi(i % 13 - 6),
            })
            .collect();
        let sums32: Vec<f32> = sums.iter().map(|s| *s as f32).collect();
        let old: Vec<f32> = (0..200).map(|i| 1e-3 * (1 + i % 17) as f32).collect();
        for count in [1usize, 2, 3, 4, 7, 64] {
            for s2 in [0.0, 1.0, 0.3, 2.5e-5] {
                let k = StatScalars {
                    count,
                    beta2: 0.75,
                    epsilon_1: 1e-30,
                    s2,
                };
                let (mut c, mut b) = (vec![0f32; 200], vec![0f32; 200]);
                column_stats(&sums, &old, k, &mut c, &mut b);
                let (mut c32, mut b32) = (vec![0f32; 200], vec![0f32; 200]);
                column_stats(&sums32, &old, k, &mut c32, &mut b32);
                for j in 0..200 {
                    let want = new_stat(old[j], sums[j], count, 0.75, 1e-30, s2);
                    let want32 = new_stat(old[j], sums32[j] as f64, count, 0.75, 1e-30, s2);
                    let what = format!("count {count} s2 {s2} sum {}", sums[j]);
                    assert_eq!(c[j].to_bits(), want.to_bits(), "{what}");
                    assert_eq!(c32[j].to_bits(), want32.to_bits(), "{what} (float32)");
                    assert_eq!(b[j].to_bits(), (1.0 / want.sqrt()).to_bits(), "{what}");
                }
            }
        }
    }

    fn few_rows(n: usize, m: usize) -> Factoring {
        batch(1, n, m)
    }

    /// Squares too large for float32 sums (finite gradients near `1e18`) still give finite
    /// statistics and a finite gradient, through the f64 redo; a NaN or an infinity in the
    /// gradient is reported, with or without clipvalue.
    #[test]
    fn overflowing_squares_are_summed_in_f64_and_nonfinite_gradients_found() {
        let f = few_rows(3, 3000);
        let len = f.len();
        let x = vec![0.5f32; len];
        let (r_old, c_old) = (vec![1f32; 3], vec![1f32; 3000]);
        let (args, reads) = (half_decay(&r_old, &c_old), pass1_reads(&x, true));
        let mut g: Vec<f32> = (0..len).map(|i| 1e18 * (1.0 + (i % 5) as f32)).collect();
        let (st, sums) = statistics(&Grad::plain(&g[..]), reads, f, args, Fresh::zeroed(f));
        assert_eq!(sums.probe, 0.0);
        assert!(sums.sum_sq_grad.is_finite() && sums.sum_sq_grad > 1e40);
        assert!(st.r.iter().all(|r| *r > 1e36), "{:?}", st.r);
        assert!(st.r.iter().chain(&st.c).all(|v| v.is_finite()), "{st:?}");
        // The mean of column 0's squares: (1e18)^2 on each of the three rows.
        let want = new_stat(1.0, 3.0 * (1e18f32 * 1e18f32) as f64, 3, 0.5, 1e-30, 1.0);
        assert_eq!(st.c[0], want);
        for bad in [f32::NAN, f32::INFINITY] {
            g[len / 2] = bad;
            let plain = Grad::plain(&g[..]);
            let (_, sums) = statistics(&plain, reads, f, args, Fresh::zeroed(f));
            assert!(sums.probe.is_nan(), "{bad} not found");
            let mut clipped = plain;
            clipped.transform.clip_value = Some(1.0);
            let (_, sums) = statistics(&clipped, reads, f, args, Fresh::zeroed(f));
            assert!(sums.probe.is_nan(), "{bad} not found under clipvalue");
        }
    }

    /// The write pass's stochastic rounding is keyed by each element's index in the tensor:
    /// the kernel's bf16 weights are those of rounding its float32 result element by element.
    #[test]
    fn stochastic_rounding_is_keyed_by_element_index() {
        use crate::rounding::{RoundingKey, RoundingStream};
        use half::bf16;
        let f = few_rows(2, 40000);
        let len = f.len();
        let g: Vec<f32> = (0..len)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
            .collect();
        let x32: Vec<f32> = (0..len).map(|i| 1.0 + (i % 97) as f32 * 1e-3).collect();
        let xb: Vec<bf16> = x32.iter().map(|v| bf16::from_f32(*v)).collect();
        let x0: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        let st = shaped::Statistics {
            r: vec![0.5, 2.0],
            c: (0..40000).map(|j| 1e-3 * (1 + j % 11) as f32).collect(),
            row_mean: vec![1.25],
            sum_sq_update: 0.0,
        };
        let key = Rounding::Stochastic(RoundingKey::new(1, 2, 3, RoundingStream::Update));
        let gb: Vec<bf16> = g.iter().map(|v| bf16::from_f32(*v)).collect();
        let mut got = xb.clone();
        shaped::write(
            &mut got,
            &Grad::plain(&gb[..]),
            &st,
            f,
            0.01,
            1.0,
            None,
            key,
        );
        let g0: Vec<f32> = gb.iter().map(|v| v.to_f32()).collect();
        let mut want = x0.clone();
        shaped::write(
            &mut want,
            &Grad::plain(&g0[..]),
            &st,
            f,
            0.01,
            1.0,
            None,
            key,
        );
        for (i, (a, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(*a, key.store::<bf16>(*w, i as u64), "element {i}");
        }
    }
}
