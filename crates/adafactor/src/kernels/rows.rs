//! The per-row inner loops of the factored passes, where almost all of a step's time goes.
//!
//! Each loop has a portable version and, for `f32`, `bf16` and `f16`, hand-vectorised twins:
//! [`avx512`] and [`avx512_bf16`] (one register per sixteen lanes) and [`avx2`] (two), taken
//! when the CPU has the instructions. All versions do the same float32 operations in the same
//! order on the same [`LANES`] lanes (no fused multiply-add), so they give the same bits. The
//! compiler's own vectorisation of these loops proved fragile: a loop that reads two 16-bit
//! streams and keeps three sums came out scalar.

use super::factored::{Pass1Rows, Pass1Sums, RowUpdate};
#[cfg(target_arch = "x86_64")]
use super::simd;
use super::{Decay, Element, CHUNK};

/// Lanes of a reduction: element `j` of a block adds into lane `j % LANES`, and the lanes are
/// summed by [`lane_sum`] at the end of the block (every version reduces this way).
pub(crate) const LANES: usize = 16;

/// The sum of the lanes as a tree (lane `i` plus lane `i + 8`, then `i + 4`, ...): four
/// dependent additions instead of fifteen, on the path from one row's sums to the next step.
#[inline(always)]
fn lane_sum(lanes: &[f32; LANES]) -> f32 {
    let mut v = *lanes;
    let mut half = LANES / 2;
    while half > 0 {
        for i in 0..half {
            v[i] += v[i + half];
        }
        half /= 2;
    }
    v[0]
}

/// Pass 1 over one row, in one sweep: the float32 sum of squares of `g` ([`LANES`] lanes,
/// blocked by [`CHUNK`], blocks added in float32), each square added into `col` (and written to
/// `squares` unless it is empty, for the row fold), and the sum of squares of the weight `x`
/// after the optional decay (blocked likewise, blocks added in f64).
#[inline(always)]
pub(crate) fn pass1<T: Element>(
    g: &[T],
    x: &[T],
    decay: Option<Decay>,
    col: &mut [f32],
    squares: &mut [f32],
) -> (f32, f64) {
    match decay {
        None => pass1_with(g, x, col, squares, |v| v),
        Some(d) => pass1_with(g, x, col, squares, move |v| d.apply(v)),
    }
}

#[inline(always)]
fn pass1_with<T: Element>(
    g: &[T],
    x: &[T],
    col: &mut [f32],
    squares: &mut [f32],
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
                let gv = g[j + l].to_f32();
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
        let rem = tail_squares_into(g, col, squares, j..end);
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
fn tail_squares_into<T: Element>(
    g: &[T],
    col: &mut [f32],
    squares: &mut [f32],
    range: std::ops::Range<usize>,
) -> f32 {
    let mut rem = 0f32;
    let keep = !squares.is_empty();
    for j in range {
        let gv = g[j].to_f32();
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
fn tail_squares<T: Element>(x: &[T], xmap: impl Fn(f32) -> f32) -> f32 {
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
/// rounded once.
#[inline(always)]
pub(crate) fn update<T: Element>(
    x: &mut [T],
    g: &[T],
    b: &[f32],
    ca: f32,
    s: f32,
    decay: Option<Decay>,
) {
    match decay {
        None => {
            for ((xv, g), bj) in x.iter_mut().zip(g).zip(b) {
                *xv = T::from_f32(xv.to_f32() - ca * (s * g.to_f32()) * bj);
            }
        }
        Some(d) => {
            for ((xv, g), bj) in x.iter_mut().zip(g).zip(b) {
                *xv = T::from_f32(d.apply(xv.to_f32()) - ca * (s * g.to_f32()) * bj);
            }
        }
    }
}

/// How far ahead pass 1 asks for the gradient and the weight: the hardware prefetcher alone
/// leaves pass 1, which reads two streams and computes between rows, short of the bandwidth.
const PREFETCH_BYTES: usize = 4096;

/// Pass 1 over whole rows of `m` elements: [`pass1`] on each row (its sum of squares pushed to
/// `row_sums`, its squares added into `col`), and with a fold, `w += g^2 / r_i` for each row
/// from the squares the sweep kept, done after the next row's sweep so that the sweep does not
/// wait for the row's statistic. Returns the sum of the rows' `x^2` sums.
#[inline(always)]
pub(crate) fn pass1_rows_with<T: Element>(
    rows: Pass1Rows<'_, T>,
    sums: Pass1Sums<'_>,
    sweep: impl Fn(&[T], &[T], &mut [f32], &mut [f32]) -> (f32, f64),
    add: impl Fn(&[f32], f32, &mut [f32]),
) -> f64 {
    let Pass1Rows { g, x, m, .. } = rows;
    let Pass1Sums {
        col,
        mut fold,
        row_sums,
    } = sums;
    if m == 0 {
        return 0.0;
    }
    // Two rows of squares: this row's, and the previous row's, whose fold is pending.
    let mut own: Vec<f32>;
    let mut squares: (&mut [f32], &mut [f32]) = (&mut [], &mut []);
    if let Some(f) = fold.as_mut() {
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
    let mut pending: Option<f32> = None;
    let ahead = PREFETCH_BYTES / std::mem::size_of::<T>().max(1);
    for (k, (gr, xr)) in g.chunks_exact(m).zip(x.chunks_exact(m)).enumerate() {
        let next = (k * m + ahead).min(g.len());
        let end = (next + m).min(g.len());
        super::prefetch(&g[next..end]);
        super::prefetch(&x[next..end]);
        let (rs, sxr) = sweep(gr, xr, col, cur);
        if let Some(f) = fold.as_mut() {
            if let Some(sp) = pending.take() {
                add(prev, sp, f.w);
            }
            pending = Some(f.fold.inv_r(f.first_row + k, rs as f64, m) as f32);
            std::mem::swap(&mut cur, &mut prev);
        }
        row_sums.push(rs as f64);
        sum_x += sxr;
    }
    if let (Some(f), Some(sp)) = (fold.as_mut(), pending) {
        add(prev, sp, f.w);
    }
    sum_x
}

/// Pass 3 over whole rows of `m` elements, the first being row `first_row` of the variable:
/// [`update`] on each row with its column and row factors.
#[inline(always)]
pub(crate) fn update_rows_with<T: Element>(
    x: &mut [T],
    g: &[T],
    first_row: usize,
    u: &RowUpdate<'_>,
    upd: impl Fn(&mut [T], &[T], &[f32], f32),
) {
    let (m, n) = (u.m, u.n);
    if m == 0 || n == 0 {
        return;
    }
    let (mut row, mut slice, mut in_slice) = (first_row, first_row / n, first_row % n);
    for (xr, gr) in x.chunks_exact_mut(m).zip(g.chunks_exact(m)) {
        let b = &u.col_factor[slice * m..(slice + 1) * m];
        upd(xr, gr, b, u.coef * u.row_factor[row]);
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
fn weighted_sq<T: Element>(g: &[T], b: &[f32], s: f32) -> f64 {
    let len = g.len().min(b.len());
    let mut total = 0f64;
    let mut start = 0;
    while start < len {
        let end = (start + CHUNK).min(len);
        let mut lanes = [0f32; LANES];
        let mut j = start;
        while j + LANES <= end {
            for l in 0..LANES {
                let u = s * g[j + l].to_f32() * b[j + l];
                lanes[l] += u * u;
            }
            j += LANES;
        }
        let rem = tail_weighted_sq(&g[j..end], &b[j..end], s);
        total += (rem + lane_sum(&lanes)) as f64;
        start = end;
    }
    total
}

/// The elements after the last whole group of lanes in a block: their `((s g) b)^2`, summed.
#[inline(always)]
fn tail_weighted_sq<T: Element>(g: &[T], b: &[f32], s: f32) -> f32 {
    let mut rem = 0f32;
    for (g, b) in g.iter().zip(b) {
        let u = s * g.to_f32() * b;
        rem += u * u;
    }
    rem
}

/// Pass 2 over whole rows of one slice: `sum_k a_k^2 sum_j ((s g_kj) b_j)^2`, `a` the rows'
/// factors and `b` the slice's column factors (its length is the row length).
#[inline(always)]
pub(crate) fn pass2_rows_with<T: Element>(
    g: &[T],
    b: &[f32],
    a: &[f32],
    row: impl Fn(&[T]) -> f64,
) -> f64 {
    let m = b.len();
    if m == 0 {
        return 0.0;
    }
    let ahead = PREFETCH_BYTES / std::mem::size_of::<T>().max(1);
    let mut total = 0f64;
    for (k, (gr, ak)) in g.chunks_exact(m).zip(a).enumerate() {
        let next = (k * m + ahead).min(g.len());
        super::prefetch(&g[next..(next + m).min(g.len())]);
        let ak = *ak as f64;
        total += row(gr) * ak * ak;
    }
    total
}

/// Pass 2 over whole rows, portable: see [`pass2_rows_with`].
#[inline(always)]
pub(crate) fn pass2_rows<T: Element>(g: &[T], b: &[f32], a: &[f32], s: f32) -> f64 {
    pass2_rows_with(g, b, a, |g| weighted_sq(g, b, s))
}

/// Pass 1 over whole rows, portable: see [`pass1_rows_with`].
#[inline(always)]
pub(crate) fn pass1_rows<T: Element>(rows: Pass1Rows<'_, T>, sums: Pass1Sums<'_>) -> f64 {
    let decay = rows.decay;
    pass1_rows_with(
        rows,
        sums,
        |g, x, c, e| pass1(g, x, decay, c, e),
        add_scaled,
    )
}

/// Pass 3 over whole rows, portable: see [`update_rows_with`].
#[inline(always)]
pub(crate) fn update_rows<T: Element>(x: &mut [T], g: &[T], first_row: usize, u: &RowUpdate<'_>) {
    update_rows_with(x, g, first_row, u, |x, g, b, ca| {
        update(x, g, b, ca, u.grad_scale, u.decay)
    })
}

/// The instruction sets the row loops can run on, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Simd {
    /// The portable loops.
    Portable,
    /// The [`avx2`] twins.
    Avx2,
    /// The [`avx512`] twins.
    Avx512,
    /// The [`avx512_bf16`] twins.
    Avx512Bf16,
}

/// The instruction set the row loops use: the best this CPU has, capped by the environment
/// variable `ADAFACTOR_SIMD` (`portable`, `avx2` or `avx512`; other values are ignored) to
/// compare the versions. Read once per process; every version gives the same bits.
#[inline(always)]
pub(crate) fn simd() -> Simd {
    static CHOSEN: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let best = if has_avx512_bf16() {
            Simd::Avx512Bf16
        } else if has_avx512() {
            Simd::Avx512
        } else if has_avx2() {
            Simd::Avx2
        } else {
            Simd::Portable
        };
        let cap = match std::env::var("ADAFACTOR_SIMD").as_deref() {
            Ok("portable") => Simd::Portable,
            Ok("avx2") => Simd::Avx2,
            Ok("avx512") => Simd::Avx512Bf16,
            _ => Simd::Avx512Bf16,
        };
        best.min(cap)
    })
}

/// True when this CPU runs the AVX-512 twins.
#[inline(always)]
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when this CPU runs the AVX-512 twins with the bf16 conversion instruction (and DQ's
/// class test that finds the subnormals it would flush).
#[inline(always)]
pub(crate) fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx512()
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when this CPU runs the AVX2 twins (AVX2 and F16C; the standard library checks once).
#[inline(always)]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The loops sixteen lanes at a time, written once for every [`simd::Lanes`]; the tails go to
/// the portable loops.
#[cfg(target_arch = "x86_64")]
mod wide {
    use super::simd::{Lanes, Wide};
    use super::{lane_sum, tail_squares, tail_squares_into, tail_weighted_sq, Decay, CHUNK, LANES};

    /// `x - x * wd * lr` on every lane, as [`Decay::apply`] rounds it.
    #[inline(always)]
    unsafe fn decayed<V: Lanes>(x: V, wd: V, lr: V) -> V {
        x.sub(x.mul(wd).mul(lr))
    }

    /// The decay's lanes (zero without one).
    #[inline(always)]
    unsafe fn decay_lanes<V: Lanes>(decay: Option<Decay>) -> (V, V) {
        match decay {
            Some(d) => (V::splat(d.weight_decay), V::splat(d.learning_rate)),
            None => (V::zero(), V::zero()),
        }
    }

    /// `DECAY`: `decay` is set; `KEEP`: the squares are kept for a fold (fixed per
    /// instantiation, as in [`update`]).
    #[inline(always)]
    pub(super) unsafe fn pass1<V: Lanes, W: Wide<V>, const DECAY: bool, const KEEP: bool>(
        g: &[W],
        x: &[W],
        decay: Option<Decay>,
        col: &mut [f32],
        squares: &mut [f32],
    ) -> (f32, f64) {
        let len = g.len().min(x.len()).min(col.len());
        let len = if KEEP { len.min(squares.len()) } else { len };
        let (wd, lr) = decay_lanes::<V>(decay);
        let (gp, xp, cp) = (g.as_ptr(), x.as_ptr(), col.as_mut_ptr());
        let ep = squares.as_mut_ptr();
        let (mut total_g, mut total_x) = (0f32, 0f64);
        let mut start = 0;
        while start < len {
            let end = (start + CHUNK).min(len);
            let (mut lanes, mut xlanes) = (V::zero(), V::zero());
            let mut j = start;
            while j + LANES <= end {
                // SAFETY: j + LANES <= len, within all three slices.
                let gv = W::load16(gp.add(j));
                let e = gv.mul(gv);
                V::load(cp.add(j)).add(e).store(cp.add(j));
                if KEEP {
                    e.store(ep.add(j));
                }
                lanes = lanes.add(e);
                let mut xv = W::load16(xp.add(j));
                if DECAY {
                    xv = decayed(xv, wd, lr);
                }
                xlanes = xlanes.add(xv.mul(xv));
                j += LANES;
            }
            let rem = tail_squares_into(g, col, squares, j..end);
            let xrem = match decay {
                None => tail_squares(&x[j..end], |v| v),
                Some(d) => tail_squares(&x[j..end], |v| d.apply(v)),
            };
            total_g += rem + lane_sum(&lanes.to_array());
            total_x += (xrem + lane_sum(&xlanes.to_array())) as f64;
            start = end;
        }
        (total_g, total_x)
    }

    #[inline(always)]
    pub(super) unsafe fn add_scaled<V: Lanes>(e: &[f32], scale: f32, w: &mut [f32]) {
        let len = e.len().min(w.len());
        let vs = V::splat(scale);
        let (ep, wp) = (e.as_ptr(), w.as_mut_ptr());
        let mut j = 0;
        while j + LANES <= len {
            // SAFETY: j + LANES <= len, within both slices.
            V::load(wp.add(j))
                .add(V::load(ep.add(j)).mul(vs))
                .store(wp.add(j));
            j += LANES;
        }
        super::add_scaled(&e[j..len], scale, &mut w[j..len]);
    }

    /// `SCALED`: `s != 1` (as in [`update`]).
    #[inline(always)]
    pub(super) unsafe fn weighted_sq<V: Lanes, W: Wide<V>, const SCALED: bool>(
        g: &[W],
        b: &[f32],
        s: f32,
    ) -> f64 {
        let len = g.len().min(b.len());
        let vs = V::splat(s);
        let (gp, bp) = (g.as_ptr(), b.as_ptr());
        let mut total = 0f64;
        let mut start = 0;
        while start < len {
            let end = (start + CHUNK).min(len);
            let mut lanes = V::zero();
            let mut j = start;
            while j + LANES <= end {
                // SAFETY: j + LANES <= len, within both slices.
                let mut gs = W::load16(gp.add(j));
                if SCALED {
                    gs = vs.mul(gs);
                }
                let u = gs.mul(V::load(bp.add(j)));
                lanes = lanes.add(u.mul(u));
                j += LANES;
            }
            let rem = tail_weighted_sq(&g[j..end], &b[j..end], s);
            total += (rem + lane_sum(&lanes.to_array())) as f64;
            start = end;
        }
        total
    }

    /// `DECAY`: `decay_by` is set; `SCALED`: `s != 1` (without norm clipping, the default,
    /// `s * g` is `g`). Fixed per instantiation, so the loop has no branch but its own.
    #[inline(always)]
    pub(super) unsafe fn update<V: Lanes, W: Wide<V>, const DECAY: bool, const SCALED: bool>(
        x: &mut [W],
        g: &[W],
        b: &[f32],
        ca: f32,
        s: f32,
        decay_by: Option<Decay>,
    ) {
        let len = x.len().min(g.len()).min(b.len());
        let (wd, lr) = decay_lanes::<V>(decay_by);
        let (vca, vs) = (V::splat(ca), V::splat(s));
        let (xp, gp, bp) = (x.as_mut_ptr(), g.as_ptr(), b.as_ptr());
        let mut j = 0;
        while j + LANES <= len {
            // SAFETY: j + LANES <= len, within all three slices.
            let mut xv = W::load16(xp.add(j));
            if DECAY {
                xv = decayed(xv, wd, lr);
            }
            let mut gs = W::load16(gp.add(j));
            if SCALED {
                gs = vs.mul(gs);
            }
            W::store16(xp.add(j), xv.sub(vca.mul(gs).mul(V::load(bp.add(j)))));
            j += LANES;
        }
        super::update(&mut x[j..len], &g[j..len], &b[j..len], ca, s, decay_by);
    }
}

#[cfg(target_arch = "x86_64")]
mod wide_rows {
    use super::simd::{Lanes, Wide};
    use super::{
        pass1_rows_with, pass2_rows_with, update_rows_with, wide, Pass1Rows, Pass1Sums, RowUpdate,
    };

    #[inline(always)]
    pub(super) unsafe fn pass1_rows<V: Lanes, W: Wide<V>>(
        rows: Pass1Rows<'_, W>,
        sums: Pass1Sums<'_>,
    ) -> f64 {
        match (rows.decay.is_some(), sums.fold.is_some()) {
            (false, false) => pass1_rows_as::<V, W, false, false>(rows, sums),
            (true, false) => pass1_rows_as::<V, W, true, false>(rows, sums),
            (false, true) => pass1_rows_as::<V, W, false, true>(rows, sums),
            (true, true) => pass1_rows_as::<V, W, true, true>(rows, sums),
        }
    }

    /// `DECAY`: the rows have a decay; `KEEP`: the sweep keeps the squares for a fold.
    #[inline(always)]
    unsafe fn pass1_rows_as<V: Lanes, W: Wide<V>, const DECAY: bool, const KEEP: bool>(
        rows: Pass1Rows<'_, W>,
        sums: Pass1Sums<'_>,
    ) -> f64 {
        let decay = rows.decay;
        // SAFETY (both closures): the caller has the instruction set of `V`. Inlined, so that
        // they are compiled with it.
        pass1_rows_with(
            rows,
            sums,
            #[inline(always)]
            |g, x, c, e| unsafe { wide::pass1::<V, W, DECAY, KEEP>(g, x, decay, c, e) },
            #[inline(always)]
            |e, s, w| unsafe { wide::add_scaled::<V>(e, s, w) },
        )
    }

    #[inline(always)]
    pub(super) unsafe fn pass2_rows<V: Lanes, W: Wide<V>>(
        g: &[W],
        b: &[f32],
        a: &[f32],
        s: f32,
    ) -> f64 {
        // SAFETY (both closures): the caller has the instruction set of `V`. Inlined, so that
        // they are compiled with it.
        if s != 1.0 {
            pass2_rows_with(
                g,
                b,
                a,
                #[inline(always)]
                |g| unsafe { wide::weighted_sq::<V, W, true>(g, b, s) },
            )
        } else {
            pass2_rows_with(
                g,
                b,
                a,
                #[inline(always)]
                |g| unsafe { wide::weighted_sq::<V, W, false>(g, b, s) },
            )
        }
    }

    #[inline(always)]
    pub(super) unsafe fn update_rows<V: Lanes, W: Wide<V>>(
        x: &mut [W],
        g: &[W],
        first_row: usize,
        u: &RowUpdate<'_>,
    ) {
        match (u.decay.is_some(), u.grad_scale != 1.0) {
            (false, false) => update_rows_as::<V, W, false, false>(x, g, first_row, u),
            (true, false) => update_rows_as::<V, W, true, false>(x, g, first_row, u),
            (false, true) => update_rows_as::<V, W, false, true>(x, g, first_row, u),
            (true, true) => update_rows_as::<V, W, true, true>(x, g, first_row, u),
        }
    }

    #[inline(always)]
    unsafe fn update_rows_as<V: Lanes, W: Wide<V>, const DECAY: bool, const SCALED: bool>(
        x: &mut [W],
        g: &[W],
        first_row: usize,
        u: &RowUpdate<'_>,
    ) {
        // SAFETY: the caller has the instruction set of `V`. Inlined, so that it is compiled
        // with it.
        update_rows_with(
            x,
            g,
            first_row,
            u,
            #[inline(always)]
            |x, g, b, ca| unsafe {
                wide::update::<V, W, DECAY, SCALED>(x, g, b, ca, u.grad_scale, u.decay)
            },
        )
    }
}

/// The row loops compiled for one instruction set, with the portable loops' signatures.
macro_rules! twins {
    ($(#[$doc:meta])* $name:ident, $lanes:ty, $features:literal) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        pub(crate) mod $name {
            use super::simd::Wide;
            use super::{wide_rows, Pass1Rows, Pass1Sums, RowUpdate};

            /// [`super::pass1_rows`].
            ///
            /// # Safety
            /// The CPU must have the instruction set.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn pass1_rows<W: Wide<$lanes>>(
                rows: Pass1Rows<'_, W>,
                sums: Pass1Sums<'_>,
            ) -> f64 {
                wide_rows::pass1_rows::<$lanes, W>(rows, sums)
            }

            /// [`super::pass2_rows`].
            ///
            /// # Safety
            /// The CPU must have the instruction set.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn pass2_rows<W: Wide<$lanes>>(
                g: &[W],
                b: &[f32],
                a: &[f32],
                s: f32,
            ) -> f64 {
                wide_rows::pass2_rows::<$lanes, W>(g, b, a, s)
            }

            /// [`super::update_rows`].
            ///
            /// # Safety
            /// The CPU must have the instruction set.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn update_rows<W: Wide<$lanes>>(
                x: &mut [W],
                g: &[W],
                first_row: usize,
                u: &RowUpdate<'_>,
            ) {
                wide_rows::update_rows::<$lanes, W>(x, g, first_row, u)
            }
        }
    };
}

twins!(
    /// The row loops on AVX2 and F16C (two registers per sixteen lanes).
    avx2,
    super::simd::Avx2,
    "avx2,f16c"
);
twins!(
    /// The row loops on AVX-512 (one register per sixteen lanes).
    avx512,
    super::simd::Avx512<false>,
    "avx512f,avx512bw"
);
twins!(
    /// The row loops on AVX-512 with its bf16 conversion.
    avx512_bf16,
    super::simd::Avx512<true>,
    "avx512f,avx512bw,avx512dq,avx512bf16"
);

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::kernels::factored::{FoldRows, RowFold};
    use half::{bf16, f16};

    fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    type Pass1Fn<T> = fn(Pass1Rows<'_, T>, Pass1Sums<'_>) -> f64;
    type UpdateFn<T> = fn(&mut [T], &[T], usize, &RowUpdate<'_>);
    type Pass2Fn<T> = fn(&[T], &[f32], &[f32], f32) -> f64;

    /// Every version of the row loops, on rows of every remainder length and longer than a
    /// block, several rows (across slices), with and without decay and fold: the same bits as
    /// the portable loops.
    fn twins_agree<
        T: simd::Wide<simd::Avx2> + simd::Wide<simd::Avx512<false>> + simd::Wide<simd::Avx512<true>>,
    >(
        from: impl Fn(&[f32]) -> Vec<T>,
    ) {
        let mut versions: Vec<(Pass1Fn<T>, Pass2Fn<T>, UpdateFn<T>)> = Vec::new();
        if has_avx2() {
            // SAFETY (both): only called when the CPU has AVX2.
            versions.push((
                |rows, sums| unsafe { avx2::pass1_rows(rows, sums) },
                |g, b, a, s| unsafe { avx2::pass2_rows(g, b, a, s) },
                |x, g, first, u| unsafe { avx2::update_rows(x, g, first, u) },
            ));
        }
        if has_avx512() {
            // SAFETY (both): only called when the CPU has AVX-512 F and BW.
            versions.push((
                |rows, sums| unsafe { avx512::pass1_rows(rows, sums) },
                |g, b, a, s| unsafe { avx512::pass2_rows(g, b, a, s) },
                |x, g, first, u| unsafe { avx512::update_rows(x, g, first, u) },
            ));
        }
        if has_avx512_bf16() {
            // SAFETY (both): only called when the CPU has AVX-512 F, BW, DQ and BF16.
            versions.push((
                |rows, sums| unsafe { avx512_bf16::pass1_rows(rows, sums) },
                |g, b, a, s| unsafe { avx512_bf16::pass2_rows(g, b, a, s) },
                |x, g, first, u| unsafe { avx512_bf16::update_rows(x, g, first, u) },
            ));
        }
        for (pass1_v, pass2_v, update_v) in versions {
            versions_agree(&from, pass1_v, pass2_v, update_v);
        }
    }

    fn versions_agree<T: Element>(
        from: &impl Fn(&[f32]) -> Vec<T>,
        pass1_v: Pass1Fn<T>,
        pass2_v: Pass2Fn<T>,
        update_v: UpdateFn<T>,
    ) {
        let decays = [
            None,
            Some(Decay {
                weight_decay: 0.1,
                learning_rate: 0.01,
            }),
        ];
        let (n, rows, first) = (2, 3, 1);
        for m in (0..40).chain([1023, 1024, 1025, 2100]) {
            for decay in decays {
                let len = rows * m;
                let g = from(&values(m as u64, len, 2.0));
                let x = from(&values(m as u64 + 99, len, 0.2));
                let col0 = values(m as u64 + 3, m, 1.0);
                let r_old = values(m as u64 + 5, first + rows, 1.0);
                let r_old: Vec<f32> = r_old.iter().map(|v| v.abs() + 0.1).collect();
                let fold = RowFold {
                    r_old: &r_old,
                    beta2: 0.3,
                    epsilon_1: 1e-30,
                };
                for folded in [false, true] {
                    let (mut col_p, mut col_v) = (col0.clone(), col0.clone());
                    let (mut w_p, mut w_v) = (col0.clone(), col0.clone());
                    let (mut rows_p, mut rows_v) = (Vec::new(), Vec::new());
                    let rows_in = Pass1Rows {
                        g: &g,
                        x: &x,
                        m,
                        decay,
                    };
                    // The portable run gets no scratch (it allocates its own).
                    let (mut sq_p, mut sq_v) = (Vec::new(), vec![0f32; 2 * m]);
                    let sums = |col, w, squares, row_sums| Pass1Sums {
                        col,
                        fold: folded.then_some(FoldRows {
                            fold,
                            first_row: first,
                            w,
                            squares,
                        }),
                        row_sums,
                    };
                    let sums_p = sums(&mut col_p, &mut w_p, &mut sq_p, &mut rows_p);
                    let sx_p = pass1_rows(rows_in, sums_p);
                    let sums_v = sums(&mut col_v, &mut w_v, &mut sq_v, &mut rows_v);
                    let sx_v = pass1_v(rows_in, sums_v);
                    assert_eq!(sx_p.to_bits(), sx_v.to_bits(), "m {m}");
                    assert_eq!(rows_p, rows_v, "m {m}");
                    assert_eq!(bits(&col_p), bits(&col_v), "m {m}");
                    assert_eq!(bits(&w_p), bits(&w_v), "m {m}");
                }

                let col_factor = values(m as u64 + 7, 3 * m, 4.0);
                let row_factor = values(m as u64 + 11, first + rows, 2.0);
                for s in [1.0, 0.9] {
                    let (b, a) = (&col_factor[..m], &row_factor[..rows]);
                    let sum_p = pass2_rows(&g, b, a, s);
                    let sum_v = pass2_v(&g, b, a, s);
                    assert_eq!(sum_p.to_bits(), sum_v.to_bits(), "m {m}, scale {s}");
                    let u = RowUpdate {
                        col_factor: &col_factor,
                        row_factor: &row_factor,
                        n,
                        m,
                        coef: 0.013,
                        grad_scale: s,
                        decay,
                    };
                    let (mut x_p, mut x_v) = (x.clone(), x.clone());
                    update_rows(&mut x_p, &g, first, &u);
                    update_v(&mut x_v, &g, first, &u);
                    let (x_p, x_v): (Vec<f32>, Vec<f32>) = (
                        x_p.iter().map(|v| v.to_f32()).collect(),
                        x_v.iter().map(|v| v.to_f32()).collect(),
                    );
                    assert_eq!(bits(&x_p), bits(&x_v), "m {m}, scale {s}");
                }
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn vector_twins_match_portable_loops_f32() {
        twins_agree::<f32>(|v| v.to_vec());
    }

    #[test]
    fn vector_twins_match_portable_loops_bf16() {
        twins_agree::<bf16>(|v| v.iter().map(|x| bf16::from_f32(*x)).collect());
    }

    #[test]
    fn vector_twins_match_portable_loops_f16() {
        twins_agree::<f16>(|v| v.iter().map(|x| f16::from_f32(*x)).collect());
    }

    /// Loads every 16-bit pattern sixteen at a time through `V` and rounds a range of float32
    /// values back: both conversions match `half` bit for bit (NaNs by their bits too).
    fn conversions_match_half<V: simd::Lanes, T: simd::Wide<V>>(probes: &[f32]) {
        let all: Vec<T> = (0..=u16::MAX)
            .map(|b| {
                let mut v = [T::from_f32(0.0)];
                // SAFETY: a 16-bit element type has exactly 2 bytes and every pattern is a value.
                unsafe {
                    std::ptr::copy_nonoverlapping(&b as *const u16 as *const T, v.as_mut_ptr(), 1)
                };
                v[0]
            })
            .collect();
        for chunk in all.chunks(16) {
            let mut out = [0f32; 16];
            // SAFETY: the caller checked the instruction set; sixteen elements on each side.
            unsafe { T::load16(chunk.as_ptr()).store(out.as_mut_ptr()) };
            for (e, o) in chunk.iter().zip(out) {
                assert_eq!(o.to_bits(), e.to_f32().to_bits());
            }
        }
        for chunk in probes.chunks(16).filter(|c| c.len() == 16) {
            let mut out = [T::from_f32(0.0); 16];
            // SAFETY: as above.
            unsafe { T::store16(out.as_mut_ptr(), V::load(chunk.as_ptr())) };
            for (p, o) in chunk.iter().zip(out) {
                let want = T::from_f32(*p);
                // SAFETY: both are 2-byte values read as their bits.
                let bits = |v: T| unsafe { std::mem::transmute_copy::<T, u16>(&v) };
                assert_eq!(bits(o), bits(want), "{p:e}");
            }
        }
    }

    #[test]
    fn vector_f16_conversions_match_half() {
        // Around every f16 rounding boundary, from f16 subnormals to overflow, and NaNs.
        let mut probes = vec![f32::NAN, -f32::NAN, f32::INFINITY, 65504.0, 65520.0, 1e-40];
        probes.push(f32::from_bits(0x7FC0_1234));
        probes.push(f32::from_bits(0x7F80_0001));
        probes.push(f32::from_bits(0xFFBF_FFFF));
        let mut x = 0x3000_0000u32;
        while x < 0x4800_0000 {
            for d in [0u32, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x3000] {
                probes.push(f32::from_bits(x + d));
                probes.push(-f32::from_bits(x + d));
            }
            x += 0x0003_2000;
        }
        if has_avx2() {
            conversions_match_half::<simd::Avx2, f16>(&probes);
        }
        if has_avx512() {
            conversions_match_half::<simd::Avx512<false>, f16>(&probes);
        }
    }

    #[test]
    fn vector_bf16_conversions_match_half() {
        let probes = crate::kernels::tests::bf16_rounding_probes();
        if has_avx2() {
            conversions_match_half::<simd::Avx2, bf16>(&probes);
        }
        if has_avx512() {
            conversions_match_half::<simd::Avx512<false>, bf16>(&probes);
        }
        if has_avx512_bf16() {
            conversions_match_half::<simd::Avx512<true>, bf16>(&probes);
        }
    }
}
