//! The per-row inner loops of the factored passes, where almost all of a step's time goes, in
//! portable Rust.
//!
//! Each loop has this portable version and, for `f32`, `bf16` and `f16`, hand-vectorised twins
//! in `wide.rs`: AVX-512 (one register per sixteen lanes) and AVX2 (two), taken
//! when the CPU has the instructions. All versions do the same float32 operations in the same
//! order on the same [`LANES`] lanes (no fused multiply-add), so they give the same bits. The
//! compiler's own vectorisation of these loops proved fragile: a loop that reads two 16-bit
//! streams and keeps three sums came out scalar.
//!
//! The loops read the gradient through [`Grad`]: with `FX` false (a plain gradient, the
//! default) the stored values, with `FX` true the effective gradient (unscaled, averaged with
//! the accumulator, clamped) computed as each element is read ([`Grad::at`]), so that a
//! transformed gradient needs no float32 row buffer.

use super::cpu::{prefetch, PREFETCH_BYTES};
use super::element::Element;
use super::grad::{Decay, Grad};
pub(crate) use super::reduce::lane_sum;
use super::reduce::CHUNK;
use super::row_args::{Pass1Rows, Pass1Sums, RowUpdate};
use super::store::{with_store, Store};

/// Lanes of a reduction: element `j` of a block adds into lane `j % LANES`, and the lanes are
/// summed by [`lane_sum`] at the end of the block (every version reduces this way).
pub(crate) const LANES: usize = 16;

/// Pass 1 over one row, in one sweep: the float32 sum of squares of `g` ([`LANES`] lanes,
/// blocked by [`CHUNK`], blocks added in float32), each square added into `col` (and written to
/// `squares` unless it is empty, for the row fold), and the sum of squares of the weight `x`
/// after the optional decay (blocked likewise, blocks added in f64). With `FX`, the unscaled
/// gradient is probed into `probe`.
#[inline(always)]
pub(crate) fn pass1<T: Element, const FX: bool>(
    g: Grad<'_, T>,
    x: &[T],
    decay: Option<Decay>,
    col: &mut [f32],
    squares: &mut [f32],
    probe: &mut f32,
) -> (f32, f64) {
    match decay {
        None => pass1_with::<T, FX>(g, x, col, squares, probe, |v| v),
        Some(d) => pass1_with::<T, FX>(g, x, col, squares, probe, move |v| d.apply(v)),
    }
}

#[inline(always)]
fn pass1_with<T: Element, const FX: bool>(
    g: Grad<'_, T>,
    x: &[T],
    col: &mut [f32],
    squares: &mut [f32],
    probe: &mut f32,
    xmap: impl Fn(f32) -> f32 + Copy,
) -> (f32, f64) {
    let len = g.len().min(x.len()).min(col.len());
    let keep = !squares.is_empty();
    let (mut total_g, mut total_x) = (0f32, 0f64);
    let mut start = 0;
    while start < len {
        let end = (start + CHUNK).min(len);
        let mut lanes = [0f32; LANES];
        let mut xlanes = [0f32; LANES];
        let mut j = start;
        while j + LANES <= end {
            for l in 0..LANES {
                let gv = g.at::<FX>(j + l, probe);
                let e = gv * gv;
                col[j + l] += e;
                if keep {
                    squares[j + l] = e;
                }
                lanes[l] += e;
                let xv = xmap(x[j + l].to_f32());
                xlanes[l] += xv * xv;
            }
            j += LANES;
        }
        let rem = tail_squares_into::<T, FX>(g, col, squares, j..end, probe);
        let xrem = tail_squares(&x[j..end], xmap);
        total_g += rem + lane_sum(&lanes);
        total_x += (xrem + lane_sum(&xlanes)) as f64;
        start = end;
    }
    (total_g, total_x)
}

/// The elements `range` after the last whole group of lanes in a block, one at a time: the sum
/// of their squares, each square also added into `col` (and written to `squares` unless empty).
#[inline(always)]
pub(crate) fn tail_squares_into<T: Element, const FX: bool>(
    g: Grad<'_, T>,
    col: &mut [f32],
    squares: &mut [f32],
    range: std::ops::Range<usize>,
    probe: &mut f32,
) -> f32 {
    let mut rem = 0f32;
    let keep = !squares.is_empty();
    for j in range {
        let gv = g.at::<FX>(j, probe);
        let e = gv * gv;
        col[j] += e;
        if keep {
            squares[j] = e;
        }
        rem += e;
    }
    rem
}

/// The elements after the last whole group of lanes in a block: the sum of their mapped squares.
#[inline(always)]
pub(crate) fn tail_squares<T: Element>(x: &[T], xmap: impl Fn(f32) -> f32) -> f32 {
    let mut rem = 0f32;
    for x in x {
        let xv = xmap(x.to_f32());
        rem += xv * xv;
    }
    rem
}

/// `w_j += e_j * scale`, `e` a row's squares (pass 1's row fold).
#[inline(always)]
pub(crate) fn add_scaled(e: &[f32], scale: f32, w: &mut [f32]) {
    for (w, e) in w.iter_mut().zip(e) {
        *w += e * scale;
    }
}

/// Pass 3 over one row: `x_j = decay(x_j) - ca * (s g_j) * b_j`, computed in float32 and
/// rounded once by `store`, `x[0]` being element `base` of the variable.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn update<T: Element, S: Store, const FX: bool>(
    x: &mut [T],
    g: Grad<'_, T>,
    b: &[f32],
    ca: f32,
    s: f32,
    decay: Option<Decay>,
    store: S,
    base: u64,
) {
    // Pass 3 does not probe.
    let mut probe = 0f32;
    let len = x.len().min(g.len()).min(b.len());
    let g = g.slice(0, len);
    match decay {
        None => {
            for (j, (xv, bj)) in x[..len].iter_mut().zip(b).enumerate() {
                let v = xv.to_f32() - ca * (s * g.at::<FX>(j, &mut probe)) * bj;
                *xv = store.store(v, base + j as u64);
            }
        }
        Some(d) => {
            for (j, (xv, bj)) in x[..len].iter_mut().zip(b).enumerate() {
                let v = d.apply(xv.to_f32()) - ca * (s * g.at::<FX>(j, &mut probe)) * bj;
                *xv = store.store(v, base + j as u64);
            }
        }
    }
}

/// Pass 1 over whole rows of `m` elements: [`pass1`] on each row (its sum of squares pushed to
/// `row_sums`, its squares added into `col`), and with a fold, `w += g^2 / r_i` for each row
/// from the squares the sweep kept, done after the next row's sweep so that the sweep does not
/// wait for the row's statistic. Returns the sum of the rows' `x^2` sums.
///
/// `ask_rows`: ask for each short row's streams [`PREFETCH_BYTES`] ahead before its sweep
/// (the portable loops, which do not ask as they go; the vector twins ask in their loops).
#[inline(always)]
pub(crate) fn pass1_rows_with<T: Element>(
    rows: Pass1Rows<'_, T>,
    sums: Pass1Sums<'_>,
    ask_rows: bool,
    sweep: impl Fn(Grad<'_, T>, &[T], &mut [f32], &mut [f32], &mut f32) -> (f32, f64),
    add: impl Fn(&[f32], f32, &mut [f32]),
    add_again: impl Fn(Grad<'_, T>, f32, &mut [f32]),
) -> f64 {
    let Pass1Rows { g, x, m, .. } = rows;
    let Pass1Sums {
        col,
        mut fold,
        row_sums,
        probe,
    } = sums;
    if m == 0 {
        return 0.0;
    }
    // Two rows of squares: this row's, and the previous row's, whose fold is pending (none for
    // long rows, whose fold reads the gradient again).
    let keep = keeps_squares(m);
    let mut own: Vec<f32>;
    let mut squares: (&mut [f32], &mut [f32]) = (&mut [], &mut []);
    if let Some(f) = fold.as_mut().filter(|_| keep) {
        let mut scratch = std::mem::take(&mut f.squares);
        if scratch.len() < 2 * m {
            own = vec![0f32; 2 * m];
            scratch = &mut own;
        }
        let (a, b) = scratch.split_at_mut(m);
        squares = (a, &mut b[..m]);
    }
    let (mut cur, mut prev) = squares;
    let mut sum_x = 0f64;
    // The previous row's index and `1 / r_i`.
    let mut pending: Option<(usize, f32)> = None;
    let ahead = PREFETCH_BYTES / std::mem::size_of::<T>().max(1);
    // Rows longer than the distance are left to the hardware prefetcher: asking for a whole
    // row at its start pulls it into the first-level cache ahead of its use and evicts the
    // column sums (a 4096 x 4096 step took a sixth more CPU time with it).
    let ask = ask_rows && m <= ahead;
    for (k, xr) in x.chunks_exact(m).take(g.len() / m).enumerate() {
        if ask {
            let next = (k * m + ahead).min(g.len());
            let end = (next + m).min(g.len());
            prefetch(&g.g[next..end]);
            prefetch(&x[next..end]);
            if let Some(a) = g.acc {
                prefetch(&a[next..end]);
            }
        }
        let (rs, sxr) = sweep(g.slice(k * m, (k + 1) * m), xr, col, cur, probe);
        if let Some(f) = fold.as_mut() {
            match pending.take() {
                Some((_, sp)) if keep => add(prev, sp, f.w),
                Some((pk, sp)) => add_again(g.slice(pk * m, (pk + 1) * m), sp, f.w),
                None => {}
            }
            pending = Some((k, f.fold.inv_r(f.first_row + k, rs as f64, m) as f32));
            std::mem::swap(&mut cur, &mut prev);
        }
        row_sums.push(rs as f64);
        sum_x += sxr;
    }
    match (fold.as_mut(), pending) {
        (Some(f), Some((_, sp))) if keep => add(prev, sp, f.w),
        (Some(f), Some((pk, sp))) => add_again(g.slice(pk * m, (pk + 1) * m), sp, f.w),
        _ => {}
    }
    sum_x
}

/// Rows longer than this many elements do not keep their squares for pass 1's fold: the
/// column sums, two rows of squares and the fold's weighted sums (`4 m` float32 values) would
/// not fit the first-level cache together (a `4096 x 4096` step took 1.7 times its ideal, a
/// `32768 x 512` one of the same bytes 0.97), so the fold reads the row's gradient again
/// ([`add_sq_scaled`]), still in a near cache, and squares it the same way.
pub(crate) const KEEP_SQUARES_UP_TO: usize = 2048;

/// Whether pass 1's fold over rows of `m` elements keeps each row's squares.
#[inline(always)]
pub(crate) fn keeps_squares(m: usize) -> bool {
    m <= KEEP_SQUARES_UP_TO
}

/// `w_j += g_j^2 * scale`, `g` a row's effective gradient read again: the same bits as
/// [`add_scaled`] of the squares a sweep keeps. The sweep has probed these values already.
#[inline(always)]
pub(crate) fn add_sq_scaled<T: Element, const FX: bool>(g: Grad<'_, T>, scale: f32, w: &mut [f32]) {
    let mut probe = 0f32;
    for (j, w) in w.iter_mut().enumerate().take(g.len()) {
        let gv = g.at::<FX>(j, &mut probe);
        let e = gv * gv;
        *w += e * scale;
    }
}

/// Pass 3 over whole rows of `m` elements, the first being row `first_row` of the variable:
/// [`update`] on each row with its column and row factors and the index of its first element.
#[inline(always)]
pub(crate) fn update_rows_with<T: Element>(
    x: &mut [T],
    g: Grad<'_, T>,
    first_row: usize,
    u: &RowUpdate<'_>,
    upd: impl Fn(&mut [T], Grad<'_, T>, &[f32], f32, u64),
) {
    let (m, n) = (u.m, u.n);
    if m == 0 || n == 0 {
        return;
    }
    let (mut row, mut slice, mut in_slice) = (first_row, first_row / n, first_row % n);
    for (k, xr) in x.chunks_exact_mut(m).take(g.len() / m).enumerate() {
        let gr = g.slice(k * m, (k + 1) * m);
        let b = &u.col_factor[slice * m..(slice + 1) * m];
        upd(xr, gr, b, u.coef * u.row_factor[row], (row * m) as u64);
        row += 1;
        in_slice += 1;
        if in_slice == n {
            in_slice = 0;
            slice += 1;
        }
    }
}

/// Pass 2 over one row: `sum_j ((s g_j) b_j)^2`, blocked like pass 1's sums.
#[inline(always)]
pub(crate) fn weighted_sq<T: Element, const FX: bool>(g: Grad<'_, T>, b: &[f32], s: f32) -> f64 {
    // Pass 2 does not probe.
    let mut probe = 0f32;
    let len = g.len().min(b.len());
    let mut total = 0f64;
    let mut start = 0;
    while start < len {
        let end = (start + CHUNK).min(len);
        let mut lanes = [0f32; LANES];
        let mut j = start;
        while j + LANES <= end {
            for l in 0..LANES {
                let u = s * g.at::<FX>(j + l, &mut probe) * b[j + l];
                lanes[l] += u * u;
            }
            j += LANES;
        }
        let rem = tail_weighted_sq::<T, FX>(g.slice(j, end), &b[j..end], s);
        total += (rem + lane_sum(&lanes)) as f64;
        start = end;
    }
    total
}

/// The elements after the last whole group of lanes in a block: their `((s g) b)^2`, summed.
#[inline(always)]
pub(crate) fn tail_weighted_sq<T: Element, const FX: bool>(
    g: Grad<'_, T>,
    b: &[f32],
    s: f32,
) -> f32 {
    let (mut rem, mut probe) = (0f32, 0f32);
    for (j, b) in b.iter().enumerate().take(g.len()) {
        let u = s * g.at::<FX>(j, &mut probe) * b;
        rem += u * u;
    }
    rem
}

/// Pass 2 over whole rows of one slice: `sum_k a_k^2 sum_j ((s g_kj) b_j)^2`, `a` the rows'
/// factors and `b` the slice's column factors (its length is the row length). `ask_rows`: as
/// in [`pass1_rows_with`].
#[inline(always)]
pub(crate) fn pass2_rows_with<T: Element>(
    g: Grad<'_, T>,
    b: &[f32],
    a: &[f32],
    ask_rows: bool,
    row: impl Fn(Grad<'_, T>) -> f64,
) -> f64 {
    let m = b.len();
    if m == 0 {
        return 0.0;
    }
    let ahead = PREFETCH_BYTES / std::mem::size_of::<T>().max(1);
    let mut total = 0f64;
    for (k, ak) in a.iter().take(g.len() / m).enumerate() {
        if ask_rows {
            let next = (k * m + ahead).min(g.len());
            let end = (next + m).min(g.len());
            prefetch(&g.g[next..end]);
            if let Some(acc) = g.acc {
                prefetch(&acc[next..end]);
            }
        }
        let ak = *ak as f64;
        total += row(g.slice(k * m, (k + 1) * m)) * ak * ak;
    }
    total
}

/// Pass 2 over whole rows, portable: see [`pass2_rows_with`].
#[inline(always)]
pub(crate) fn pass2_rows<T: Element>(g: Grad<'_, T>, b: &[f32], a: &[f32], s: f32) -> f64 {
    if g.is_plain() {
        pass2_rows_with(g, b, a, true, |g| weighted_sq::<T, false>(g, b, s))
    } else {
        pass2_rows_with(g, b, a, true, |g| weighted_sq::<T, true>(g, b, s))
    }
}

/// Pass 1 over whole rows, portable: see [`pass1_rows_with`].
#[inline(always)]
pub(crate) fn pass1_rows<T: Element>(rows: Pass1Rows<'_, T>, sums: Pass1Sums<'_>) -> f64 {
    let decay = rows.decay;
    if rows.g.is_plain() {
        pass1_rows_with(
            rows,
            sums,
            true,
            |g, x, c, e, p| pass1::<T, false>(g, x, decay, c, e, p),
            add_scaled,
            add_sq_scaled::<T, false>,
        )
    } else {
        pass1_rows_with(
            rows,
            sums,
            true,
            |g, x, c, e, p| pass1::<T, true>(g, x, decay, c, e, p),
            add_scaled,
            add_sq_scaled::<T, true>,
        )
    }
}

/// Pass 3 over whole rows, portable: see [`update_rows_with`].
#[inline(always)]
pub(crate) fn update_rows<T: Element>(
    x: &mut [T],
    g: Grad<'_, T>,
    first_row: usize,
    u: &RowUpdate<'_>,
) {
    with_store!(u.rounding.for_type::<T>(), st => {
        if g.is_plain() {
            update_rows_with(x, g, first_row, u, |x, g, b, ca, base| {
                update::<T, _, false>(x, g, b, ca, u.grad_scale, u.decay, st, base)
            })
        } else {
            update_rows_with(x, g, first_row, u, |x, g, b, ca, base| {
                update::<T, _, true>(x, g, b, ca, u.grad_scale, u.decay, st, base)
            })
        }
    })
}
