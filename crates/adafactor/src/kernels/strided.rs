//! Passes 1 to 3 for a variable factored over two axes other than its last two
//! ([`crate::axes`]): the tensor seen as `[outer, low, mid, high, inner]` ([`Strided`]), the
//! factored axes `low` and `high`, `outer * mid * inner` independent matrices.
//!
//! The formulas are those of [`super::factored`] (Shazeer & Stern, 2018, arXiv:1804.04235,
//! Algorithm 4); only the memory order differs. The kernels stream over *lines*: for each
//! `(outer, low, mid)` index, the `high * inner` elements that follow each other in memory. Within
//! a line, the statistic of the `high` axis is indexed like the elements themselves, and the
//! statistic of the `low` axis has `inner` lanes, one per batch index of the innermost axes, so
//! the loops are contiguous and vectorise across the independent matrices (a candle convolution
//! kernel `[out, in, kh, kw]` factored over `(in, out)` is `low = out`, `high = in`,
//! `inner = kh * kw`). Statistics are accumulated in that grad order and transposed once into
//! the storage order `[batch, n]`, `[batch, m]`, so [`super::factored::prepare`] serves both layouts.
//!
//! The work units are ranges of lines of about [`UNIT_ELEMS`] elements, fixed by the shape, and
//! their partial sums are added in unit order: results do not depend on the number of threads.

use super::cpu::prefetch_ahead;
use super::dispatch::RowLoops;
use super::element::Element;
use super::factored::{Pass1, Prepared, RowFold};
use super::grad::{decayed_view, Decay, Grad};
use super::parallel::{map_units, parallel_for, UNIT_ELEMS};
use super::store::Rounding;
use crate::axes::Strided;
use crate::state::Factoring;
use rayon::prelude::*;
use std::ops::Range;

/// Elements per line.
fn line_len(s: Strided) -> usize {
    s.high * s.inner
}

/// Number of lines.
fn line_count(s: Strided) -> usize {
    s.outer * s.low * s.mid
}

/// The same variable as Keras's batch of row-major matrices, when it is one: with no batch axes
/// between or after the factored ones (`mid = inner = 1`, as in a `1 x 1` convolution kernel
/// `[out, in, 1, 1]`), the tensor is `outer` matrices of `low` rows of `high` elements each,
/// and the row loops of [`super::factored`] run on it at their speed. Their rows are the `low`
/// axis, whichever of the two factored axes that is; the callers put the statistics and the
/// factors on the right sides.
fn as_rows(s: Strided) -> Option<Factoring> {
    (s.mid == 1 && s.inner == 1).then_some(Factoring {
        lead: s.outer,
        n: s.low,
        m: s.high,
        strided: None,
    })
}

/// `p` seen from the row loops of [`as_rows`]: their rows are the `low` axis, so when that is
/// the columns' axis, statistics and factors change sides (`coef` then scales the columns'
/// factor: the same product, rounded in another order).
fn rows_first(s: Strided, p: &Prepared) -> std::borrow::Cow<'_, Prepared> {
    if s.rows_low {
        return std::borrow::Cow::Borrowed(p);
    }
    std::borrow::Cow::Owned(Prepared {
        r: p.c.clone(),
        c: p.r.clone(),
        row_factor: p.col_factor.clone(),
        col_factor: p.row_factor.clone(),
        row_mean: p.row_mean.clone(),
    })
}

/// Lines per work unit: about [`UNIT_ELEMS`] elements or a 16th of the tensor, whichever is
/// more (fewer per-unit partial sums to allocate and add), at least one line.
fn lines_per_unit(s: Strided) -> usize {
    (UNIT_ELEMS.max(s.len() / 16) / line_len(s).max(1)).max(1)
}

/// The effective gradient of elements `start..start + len`: the stored slice for a plain
/// float32 gradient, else converted into `buf` (sized on first use).
#[inline(always)]
fn line_of<'b, T: Element>(
    grad: &'b Grad<'_, T>,
    start: usize,
    len: usize,
    buf: &'b mut Vec<f32>,
) -> &'b [f32] {
    if grad.is_plain() {
        if let Some(g) = T::as_f32(&grad.g[start..start + len]) {
            return g;
        }
    }
    buf.resize(len, 0.0);
    grad.load(start, buf);
    buf
}

/// A scratch buffer of `len` values, allocated only when `needed`.
fn scratch(len: usize, needed: bool) -> Vec<f32> {
    vec![0f32; if needed { len } else { 0 }]
}

/// The work units: ranges of lines, fixed by the shape.
fn units(s: Strided) -> Vec<Range<usize>> {
    let (n, per, mid) = (line_count(s), lines_per_unit(s), s.mid.max(1));
    if per < mid {
        // A unit within one `(outer, low)` block of `mid` lines: it touches `per` consecutive
        // `(outer, mid)` indices, so its partial sums stay the size of the unit.
        (0..n / mid)
            .flat_map(|b| {
                (0..mid.div_ceil(per))
                    .map(move |u| b * mid + u * per..b * mid + ((u + 1) * per).min(mid))
            })
            .collect()
    } else {
        // Whole blocks per unit.
        let per = per / mid * mid;
        (0..n.div_ceil(per))
            .map(|u| u * per..((u + 1) * per).min(n))
            .collect()
    }
}

/// `(outer, mid)` index of a line, as one index `p * mid + q` into the `high` statistics.
#[inline(always)]
fn outer_mid(s: Strided, line: usize) -> usize {
    let p = line / (s.low * s.mid);
    p * s.mid + line % s.mid
}

/// A partial sum's type: float32 on the fast path, f64 when a float32 partial sum overflowed.
trait Acc: Copy + Default + std::ops::AddAssign + From<f32> + Into<f64> + Send {}
impl Acc for f32 {}
impl Acc for f64 {}

/// Adds the squares of one line into the `high` statistics (`h`, laid out like the line) and
/// the `low` statistic's `inner` lanes (`l`); returns the line's sum of squares. The squares
/// are float32, as Keras computes them. `wide` is scratch space whose length is a multiple of
/// `l.len()`: blocks of that many elements are added elementwise (one vectorised loop updates
/// both statistics), then folded into the lanes.
/// `ask(k, len)` is called before elements `k..k + len`, to ask for what comes next.
#[inline(always)]
fn line_squares<A: Acc>(
    g: &[f32],
    h: &mut [A],
    l: &mut [f64],
    wide: &mut [A],
    ask: impl Fn(usize, usize),
) -> f64 {
    let r = l.len();
    let w = wide.len();
    wide.fill(A::default());
    let mut gi = g.chunks_exact(w);
    let mut hi = h.chunks_exact_mut(w);
    for (k, (gc, hc)) in (&mut gi).zip(&mut hi).enumerate() {
        ask(k * w, w);
        for ((wv, hv), gv) in wide.iter_mut().zip(hc.iter_mut()).zip(gc) {
            let e = A::from(gv * gv);
            *hv += e;
            *wv += e;
        }
    }
    let (gr, hr) = (gi.remainder(), hi.into_remainder());
    for ((wv, hv), gv) in wide.iter_mut().zip(hr.iter_mut()).zip(gr) {
        let e = A::from(gv * gv);
        *hv += e;
        *wv += e;
    }
    // Lane `k` of each block of `r` into `l[k]`, in order (no division per element).
    let mut total = 0.0;
    for block in wide.chunks_exact(r) {
        for (lv, wv) in l.iter_mut().zip(block) {
            let v: f64 = (*wv).into();
            *lv += v;
            total += v;
        }
    }
    total
}

/// Scratch length for [`line_squares`]'s lanes: a multiple of `inner` of about 64.
fn wide_len(inner: usize) -> usize {
    inner.max(1) * (64 / inner.max(1)).max(1)
}

/// Elements of a line between two asks for what lies ahead, in passes 2 and 3.
const PIECE: usize = 256;

/// Elements per piece of a line of `line` elements where the `low` factor is spread along it:
/// the multiple of `inner` nearest above [`PIECE`], at most the line (a multiple of `inner`
/// too), at least one lane's worth so that an empty line still has room for the spread. A
/// piece starts at lane 0 of the `low` statistic, so one spread copy of that length serves
/// every piece of the line (not one copy of the whole line).
fn lane_piece(inner: usize, line: usize) -> usize {
    let r = inner.max(1);
    (r * PIECE.div_ceil(r)).min(line).max(r)
}

/// Elements per segment of a line in pass 1 (4 KiB of float32 partial sums).
const SEGMENT: usize = 1024;

/// Lines whose float32 partial sums of the `high` statistics are added into the f64 ones at a
/// time (a float32 sum of at most this many squares per value).
const FLUSH_LINES: usize = 64;

/// Sum of squares of a line: float32 lanes over blocks of at most [`super::CHUNK`] elements,
/// the blocks added in f64, as the row loops sum.
#[inline(always)]
fn sum_sq(x: &[f32]) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(super::CHUNK) {
        let mut lanes = [0f32; 16];
        let mut xi = block.chunks_exact(16);
        for c in &mut xi {
            for k in 0..16 {
                lanes[k] += c[k] * c[k];
            }
        }
        let tail: f32 = xi.remainder().iter().map(|v| v * v).sum();
        total += (lanes.iter().sum::<f32>() + tail) as f64;
    }
    total
}

/// One unit's pass-1 sums.
struct Part1 {
    lines: Range<usize>,
    /// First `(outer, mid)` index of `high`.
    first_pq: usize,
    high: Vec<f64>,
    low: Vec<f64>,
    sum_sq_grad: f64,
    sum_sq_x: f64,
    probe: f32,
}

impl Part1 {
    /// Whether every sum is finite (else a float32 partial sum may have overflowed).
    fn finite(&self) -> bool {
        self.sum_sq_grad.is_finite() && self.high.iter().all(|v| v.is_finite())
    }
}

/// Pass 1 over one unit's lines with partial sums in `A`.
#[inline(always)]
fn unit_pass1<A: Acc, T: Element>(
    grad: &Grad<'_, T>,
    x: &[T],
    decay: Option<Decay>,
    s: Strided,
    check_finite: bool,
    lines: Range<usize>,
) -> Part1 {
    let (hr, r) = (line_len(s), s.inner);
    let probe_rows = check_finite && grad.transform.clip_value.is_some();
    // The `(outer, mid)` indices the unit touches: consecutive ones within one block of `mid`
    // lines, else (whole blocks; the indices repeat across `low`) every one of its outer
    // indices.
    let (a, b) = (outer_mid(s, lines.start), outer_mid(s, lines.end - 1));
    let (first_pq, last_pq) = if lines.len() < s.mid {
        (a, b)
    } else {
        (a / s.mid * s.mid, b / s.mid * s.mid + s.mid - 1)
    };
    let span = (last_pq - first_pq + 1) * hr;
    let mut high = vec![0f64; span];
    let mut part = vec![A::default(); span];
    let mut low = vec![0f64; lines.len() * r];
    let converts = decay.is_some() || T::as_f32(&x[..0]).is_none();
    // Lines are read in segments (a multiple of `inner` elements), all the unit's lines for one
    // segment before the next, so the float32 partial sums of a segment stay in the L1 cache.
    let seg = (r * (SEGMENT / r).max(1)).min(hr).max(1);
    let (mut gbuf, mut xbuf) = (scratch(seg, probe_rows), scratch(seg, converts));
    let mut wide = vec![A::default(); wide_len(r)];
    let (mut se, mut sx, mut probe) = (0f64, 0f64, 0f32);
    let mut flushed: Vec<usize> = Vec::with_capacity(FLUSH_LINES);
    let mut s0 = 0;
    while s0 < hr {
        let s1 = (s0 + seg).min(hr);
        let len = s1 - s0;
        for (k, line) in lines.clone().enumerate() {
            let base = line * hr + s0;
            // The next line's segment, asked for piece by piece along this one (a burst of
            // asks at the start of each segment stalls on the CPU's fill buffers).
            let ask = |k: usize, n: usize| {
                let at = base + hr + k;
                super::cpu::prefetch(&grad.g[at.min(grad.g.len())..(at + n).min(grad.g.len())]);
                super::cpu::prefetch(&x[at.min(x.len())..(at + n).min(x.len())]);
            };
            let g = if probe_rows {
                // Clamping would hide an infinity from the sums: probe before it.
                probe += grad.load_checked(base, &mut gbuf[..len]);
                &gbuf[..len]
            } else {
                line_of(grad, base, len, &mut gbuf)
            };
            let pq = outer_mid(s, line) - first_pq;
            let h = &mut part[pq * hr + s0..pq * hr + s1];
            let total = line_squares(g, h, &mut low[k * r..(k + 1) * r], &mut wide, ask);
            se += total;
            let xv = &x[base..base + len];
            let xbuf_len = if converts { len } else { 0 };
            sx += sum_sq(decayed_view(xv, decay, &mut xbuf[..xbuf_len]));
            if check_finite && !probe_rows && !total.is_finite() {
                // Decide on the unscaled values: NaN or infinity, or a finite value whose
                // square overflows.
                gbuf.resize(seg, 0.0);
                probe += grad.load_checked(base, &mut gbuf[..len]);
            }
            if (k + 1) % FLUSH_LINES == 0 || line + 1 == lines.end {
                // The partial sums of the lines since the last flush, into the f64 ones.
                let from = lines.start + k - k % FLUSH_LINES;
                flushed.clear();
                for l in from..=line {
                    let at = (outer_mid(s, l) - first_pq) * hr;
                    if flushed.contains(&at) {
                        continue;
                    }
                    flushed.push(at);
                    let (a, b) = (&mut high[at + s0..at + s1], &mut part[at + s0..at + s1]);
                    for (a, b) in a.iter_mut().zip(b.iter_mut()) {
                        *a += (*b).into();
                        *b = A::default();
                    }
                }
            }
        }
        s0 = s1;
    }
    Part1 {
        lines,
        first_pq,
        high,
        low,
        sum_sq_grad: se,
        sum_sq_x: sx,
        probe,
    }
}

/// Pass 1: row and column sums of the effective gradient squared (storage order), the weight's
/// sum of squares after weight decay, and (when `check_finite`) whether the gradient is finite.
/// Partial sums are float32 over at most `FLUSH_LINES` lines; a unit whose sums come out
/// non-finite is summed again in f64 (huge but finite squares).
pub fn pass1<T: RowLoops>(
    grad: &Grad<'_, T>,
    x: &[T],
    decay: Option<Decay>,
    s: Strided,
    check_finite: bool,
) -> Pass1 {
    pass1_with(grad, x, decay, s, check_finite, None).0
}

/// [`pass1`] with the statistics fold, when the gradient scale is 1 (no norm clipping): each
/// line holds every element of its `low` statistics (the `inner` lanes), so their new values
/// are known once the line is summed, and the unit then adds `g^2 / q` into an accumulator laid
/// out like the `high` statistics, `q` the new `low` statistic of each element. Returned in
/// storage order next to the sums, it gives RMS(u) without pass 2 ([`sum_sq_update`]), as
/// [`super::factored::RowFold`] does for the row loops. `fold.r_old` holds the old statistics
/// of the `low` axis: `r` when the rows are the first factored axis, else `c`.
pub fn pass1_fold<T: RowLoops>(
    grad: &Grad<'_, T>,
    x: &[T],
    decay: Option<Decay>,
    s: Strided,
    check_finite: bool,
    fold: RowFold<'_>,
) -> (Pass1, Vec<f64>) {
    let (p, w) = pass1_with(grad, x, decay, s, check_finite, Some(fold));
    (p, w.unwrap_or_default())
}

/// Index in storage order (`[outer, mid, inner, low]`) of lane `k` of line `line`'s `low`
/// statistic, as [`low_to_storage`] places it.
#[inline(always)]
fn low_storage_index(s: Strided, line: usize, k: usize) -> usize {
    let (l, q, r) = (s.low, s.mid.max(1), s.inner);
    let (p, i, j) = (line / (l * q), (line / q) % l, line % q);
    p * l * q * r + (j * r + k) * l + i
}

/// One unit's fold: for each of its lines, the new `low` statistics from the line's sums
/// (`part.low`), then `g^2 / q` of every element added into a float32 accumulator of the unit's
/// `high` span (the gradient is read again from the cache: a unit is about [`UNIT_ELEMS`]
/// elements), returned in f64 for the sum over units.
fn unit_fold<T: Element>(
    grad: &Grad<'_, T>,
    s: Strided,
    part: &Part1,
    fold: RowFold<'_>,
) -> Vec<f64> {
    let (hr, r) = (line_len(s), s.inner);
    let piece = lane_piece(r, hr);
    let mut w = vec![0f32; part.high.len()];
    let mut inv = vec![0f32; r];
    let (mut gbuf, mut ibuf) = (Vec::new(), vec![0f32; piece]);
    super::cpu::vectorized(
        #[inline(always)]
        || {
            for (k, line) in part.lines.clone().enumerate() {
                for (lane, q) in inv.iter_mut().enumerate() {
                    let at = low_storage_index(s, line, lane);
                    *q = fold.inv_r(at, part.low[k * r + lane], s.high) as f32;
                }
                spread(&inv, &mut ibuf);
                let g = line_of(grad, line * hr, hr, &mut gbuf);
                let pq = outer_mid(s, line) - part.first_pq;
                let ws = &mut w[pq * hr..(pq + 1) * hr];
                for (wp, gp) in ws.chunks_mut(piece).zip(g.chunks(piece)) {
                    for ((wv, gv), q) in wp.iter_mut().zip(gp).zip(&ibuf) {
                        *wv += gv * gv * q;
                    }
                }
            }
        },
    );
    w.iter().map(|v| *v as f64).collect()
}

/// [`pass1`], and the fold's accumulator in storage order when there is a `fold`.
fn pass1_with<T: RowLoops>(
    grad: &Grad<'_, T>,
    x: &[T],
    decay: Option<Decay>,
    s: Strided,
    check_finite: bool,
    fold: Option<RowFold<'_>>,
) -> (Pass1, Option<Vec<f64>>) {
    if let Some(pf) = as_rows(s) {
        // The row loops' rows are the `low` axis: their column sums (and the fold's weighted
        // sums) are the `high` statistics', already in storage order.
        let mut p = super::factored::pass1(grad, x, decay, pf, check_finite, fold);
        let weighted = p.weighted_cols.take();
        if !s.rows_low {
            std::mem::swap(&mut p.row_sums, &mut p.col_sums);
        }
        return (p, fold.map(|_| weighted.unwrap_or_default()));
    }
    let (hr, r) = (line_len(s), s.inner);
    let parts = map_units(
        units(s),
        parallel_for(s.len()),
        #[inline(always)]
        |lines: Range<usize>| {
            let p = unit_pass1::<f32, T>(grad, x, decay, s, check_finite, lines.clone());
            let p = if p.finite() {
                p
            } else {
                unit_pass1::<f64, T>(grad, x, decay, s, check_finite, lines)
            };
            let w = fold.map(|f| unit_fold(grad, s, &p, f));
            (p, w)
        },
    );
    let mut high = vec![0f64; s.outer * s.mid * hr];
    let mut low = vec![0f64; line_count(s) * r];
    let mut weighted = fold.map(|_| vec![0f64; high.len()]);
    let mut out = Pass1 {
        row_sums: Vec::new(),
        col_sums: Vec::new(),
        sum_sq_grad: 0.0,
        sum_sq_x: 0.0,
        finite: true,
        weighted_cols: None,
    };
    for (p, w) in parts {
        let at = p.first_pq * hr;
        for (a, b) in high[at..at + p.high.len()].iter_mut().zip(&p.high) {
            *a += b;
        }
        if let (Some(all), Some(w)) = (weighted.as_mut(), w) {
            for (a, b) in all[at..at + w.len()].iter_mut().zip(&w) {
                *a += b;
            }
        }
        low[p.lines.start * r..p.lines.end * r].copy_from_slice(&p.low);
        out.sum_sq_grad += p.sum_sq_grad;
        out.sum_sq_x += p.sum_sq_x;
        out.finite &= p.probe == 0.0;
    }
    let (high, low) = (high_to_storage(s, &high), low_to_storage(s, &low));
    (out.row_sums, out.col_sums) = if s.rows_low { (low, high) } else { (high, low) };
    (out, weighted.map(|w| high_to_storage(s, &w)))
}

/// `sum(u^2)` from [`pass1_fold`]'s accumulator and the new statistics: `u_ij^2 = g_ij^2
/// mean(r) / (r_i c_j)`, so per matrix `sum(u^2) = mean(r) sum_h w_h / q_h`, with `h` running
/// over the `high` axis's statistics (`c` when the rows are the first factored axis, else `r`).
pub fn sum_sq_update(weighted: &[f64], p: &Prepared, f: Factoring) -> f64 {
    let (stats, per) = match f.strided {
        Some(s) if !s.rows_low => (&p.r, f.n),
        _ => (&p.c, f.m),
    };
    super::factored::weighted_sum(weighted, stats, per, &p.row_mean)
}

/// `[outer, mid, high, inner]` (grad order) to `[outer, mid, inner, high]` (storage order).
fn high_to_storage<V: Copy + Default>(s: Strided, v: &[V]) -> Vec<V> {
    let (h, r) = (s.high, s.inner);
    let mut out = vec![V::default(); v.len()];
    for (src, dst) in v.chunks_exact(h * r).zip(out.chunks_exact_mut(h * r)) {
        for i in 0..h {
            for k in 0..r {
                dst[k * h + i] = src[i * r + k];
            }
        }
    }
    out
}

/// The inverse of [`high_to_storage`].
fn high_from_storage<V: Copy + Default>(s: Strided, v: &[V]) -> Vec<V> {
    let (h, r) = (s.high, s.inner);
    let mut out = vec![V::default(); v.len()];
    for (src, dst) in v.chunks_exact(h * r).zip(out.chunks_exact_mut(h * r)) {
        for i in 0..h {
            for k in 0..r {
                dst[i * r + k] = src[k * h + i];
            }
        }
    }
    out
}

/// `[outer, low, mid, inner]` (grad order) to `[outer, mid, inner, low]` (storage order).
fn low_to_storage<V: Copy + Default>(s: Strided, v: &[V]) -> Vec<V> {
    let (l, q, r) = (s.low, s.mid, s.inner);
    let mut out = vec![V::default(); v.len()];
    for (src, dst) in v
        .chunks_exact(l * q * r)
        .zip(out.chunks_exact_mut(l * q * r))
    {
        for i in 0..l {
            for j in 0..q {
                for k in 0..r {
                    dst[(j * r + k) * l + i] = src[(i * q + j) * r + k];
                }
            }
        }
    }
    out
}

/// The inverse of [`low_to_storage`].
fn low_from_storage<V: Copy + Default>(s: Strided, v: &[V]) -> Vec<V> {
    let (l, q, r) = (s.low, s.mid, s.inner);
    let mut out = vec![V::default(); v.len()];
    for (src, dst) in v
        .chunks_exact(l * q * r)
        .zip(out.chunks_exact_mut(l * q * r))
    {
        for i in 0..l {
            for j in 0..q {
                for k in 0..r {
                    dst[(i * q + j) * r + k] = src[(j * r + k) * l + i];
                }
            }
        }
    }
    out
}

/// The factors of `1/sqrt(v)` in grad order: `(high, low)`, the row factor multiplied by
/// `coef` (pass 3's `coef * a_i`; 1 for pass 2).
fn grad_order_factors(s: Strided, p: &Prepared, coef: f32) -> (Vec<f32>, Vec<f32>) {
    let rows: Vec<f32> = p.row_factor.iter().map(|a| coef * a).collect();
    let (low, high) = if s.rows_low {
        (&rows, &p.col_factor)
    } else {
        (&p.col_factor, &rows)
    };
    (high_from_storage(s, high), low_from_storage(s, low))
}

/// The `low` factor of one line repeated along it, so the per-element loops are plain zips
/// (copies of doubling length: a few calls per line, not one per `inner` values).
#[inline(always)]
fn spread(low: &[f32], out: &mut [f32]) {
    if low.len() == 1 {
        out.fill(low[0]);
        return;
    }
    let n = out.len();
    out[..low.len()].copy_from_slice(low);
    let mut have = low.len();
    while have < n {
        let take = have.min(n - have);
        out.copy_within(..take, have);
        have += take;
    }
}

/// Pass 2: `sum(u^2)` with `u = (s g) a_i b_j`, for RMS(u).
pub fn pass2<T: RowLoops>(grad: &Grad<'_, T>, p: &Prepared, s: Strided, grad_scale: f32) -> f64 {
    if let Some(pf) = as_rows(s) {
        return super::factored::pass2(grad, &rows_first(s, p), pf, grad_scale);
    }
    let (hr, r) = (line_len(s), s.inner);
    let (high, low) = grad_order_factors(s, p, 1.0);
    let sums = map_units(
        units(s),
        parallel_for(s.len()),
        #[inline(always)]
        |lines: Range<usize>| {
            let mut gbuf = Vec::new();
            let (mut lbuf, mut ubuf) = (vec![0f32; hr], vec![0f32; hr]);
            let mut total = 0f64;
            for line in lines {
                for p0 in (0..hr).step_by(PIECE) {
                    prefetch_ahead(grad.g, line * hr + p0, PIECE.min(hr - p0));
                }
                let g = line_of(grad, line * hr, hr, &mut gbuf);
                let pq = outer_mid(s, line);
                spread(&low[line * r..(line + 1) * r], &mut lbuf);
                let hf = &high[pq * hr..(pq + 1) * hr];
                for (u, (g, (h, l))) in ubuf.iter_mut().zip(g.iter().zip(hf.iter().zip(&lbuf))) {
                    *u = grad_scale * g * (h * l);
                }
                total += sum_sq(&ubuf);
            }
            total
        },
    );
    sums.iter().sum()
}

/// Pass 3: `x = decay(x) - (coef a_i) (s g_ij) b_j`, with `coef = alpha / max(1, RMS(u)/d)`,
/// each 16-bit weight stored with `rounding`.
#[allow(clippy::too_many_arguments)]
pub fn pass3<T: RowLoops>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    p: &Prepared,
    s: Strided,
    coef: f32,
    grad_scale: f32,
    decay: Option<Decay>,
    rounding: Rounding,
) {
    if let Some(pf) = as_rows(s) {
        let p = rows_first(s, p);
        return super::factored::pass3(x, grad, &p, pf, coef, grad_scale, decay, rounding);
    }
    let (hr, r) = (line_len(s), s.inner);
    if hr == 0 || x.is_empty() {
        return;
    }
    // The row factor with `coef` folded in, on whichever side the rows are.
    let (high, low) = grad_order_factors(s, p, coef);
    let per = lines_per_unit(s);
    let body = |(u, xs): (usize, &mut [T])| {
        super::cpu::vectorized(
            #[inline(always)]
            || {
                let piece = lane_piece(r, hr);
                let (mut gbuf, mut lbuf) = (Vec::new(), vec![0f32; piece]);
                let mut xbuf = scratch(piece, T::as_f32(&xs[..0]).is_none());
                for k in 0..xs.len() / hr {
                    let line = u * per + k;
                    spread(&low[line * r..(line + 1) * r], &mut lbuf);
                    let pq = outer_mid(s, line);
                    let hf = &high[pq * hr..(pq + 1) * hr];
                    // Piece by piece, each asking for what lies ahead of it first: the asks
                    // spread over the line, not all at its start.
                    for p0 in (0..hr).step_by(piece) {
                        let (at, pl) = (line * hr + p0, piece.min(hr - p0));
                        prefetch_ahead(grad.g, at, pl);
                        prefetch_ahead(xs, k * hr + p0, pl);
                        let xl = &mut xs[k * hr + p0..k * hr + p0 + pl];
                        let g = line_of(grad, at, pl, &mut gbuf);
                        // `a` carries `coef`; `a` first, as the default kernel multiplies.
                        let (hp, lp) = (&hf[p0..p0 + pl], &lbuf[..pl]);
                        let (a, b) = if s.rows_low { (lp, hp) } else { (hp, lp) };
                        match T::as_f32_mut(xl) {
                            Some(xf) => update_line(xf, g, a, b, grad_scale, decay),
                            None => {
                                let xb = &mut xbuf[..pl];
                                T::load(xl, xb);
                                update_line(xb, g, a, b, grad_scale, decay);
                                rounding.store_slice(xb, xl, at as u64);
                            }
                        }
                    }
                }
            },
        )
    };
    if parallel_for(s.len()) {
        x.par_chunks_mut(per * hr).enumerate().for_each(body);
    } else {
        x.chunks_mut(per * hr).enumerate().for_each(body);
    }
}

/// One line of pass 3 in float32.
#[inline(always)]
fn update_line(x: &mut [f32], g: &[f32], a: &[f32], b: &[f32], s: f32, decay: Option<Decay>) {
    let it = x.iter_mut().zip(g).zip(a).zip(b);
    match decay {
        None => it.for_each(|(((x, g), a), b)| *x -= a * (s * g) * b),
        Some(d) => it.for_each(|(((x, g), a), b)| *x = d.apply(*x) - a * (s * g) * b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::axes::FactoredAxes;
    use crate::state::Factoring;

    /// A `[4, 3, 2, 5]` tensor factored over every pair of axes, a `[3, 40, 3, 3]` one whose
    /// lines (up to 360 elements) run in more than one piece of pass 3, and a `1 x 1`
    /// convolution kernel `[4, 5, 1, 1]` over its first two axes (in both orders: the row
    /// loops run it, with statistics and factors on either side): the passes against the
    /// paper's formulas in f64 on the same matrices taken out by index.
    #[test]
    fn every_axis_pair_follows_the_formulas() {
        for shape in [[4usize, 3, 2, 5], [3, 40, 3, 3], [4, 5, 1, 1]] {
            axis_pairs_follow_the_formulas(shape);
        }
    }

    fn axis_pairs_follow_the_formulas(shape: [usize; 4]) {
        let len: usize = shape.iter().product();
        let g: Vec<f32> = (0..len)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let x0: Vec<f32> = (0..len)
            .map(|i| ((i * 11 % 17) as f32 - 8.0) / 5.0)
            .collect();
        let strides = [
            shape[1] * shape[2] * shape[3],
            shape[2] * shape[3],
            shape[3],
            1,
        ];
        for row in 0..4 {
            for col in 0..4 {
                if row == col || (row, col) == (2, 3) || (shape[2] == 1 && row.max(col) > 1) {
                    continue;
                }
                let axes = FactoredAxes { row, col };
                let f = Factoring::with_axes(&shape, Some(axes)).unwrap();
                let s = f.strided.unwrap();
                let grad = Grad::plain(&g[..]);
                let p1 = pass1(&grad, &x0, None, s, true);
                let prep = crate::kernels::factored::prepare(
                    &p1,
                    &vec![0.0; f.lead * f.n],
                    &vec![0.0; f.lead * f.m],
                    f,
                    0.0,
                    1e-30,
                    1.0,
                );
                let sum_u2 = pass2(&grad, &prep, s, 1.0);
                let mut x = x0.clone();
                pass3(&mut x, &grad, &prep, s, 0.1, 1.0, None, Rounding::Nearest);
                // The batch axes in order, then each matrix by (i, j).
                let batch: Vec<usize> = (0..4).filter(|k| *k != row && *k != col).collect();
                let mut want_u2 = 0.0;
                for b0 in 0..shape[batch[0]] {
                    for b1 in 0..shape[batch[1]] {
                        let b = b0 * shape[batch[1]] + b1;
                        let at = |i: usize, j: usize| {
                            b0 * strides[batch[0]]
                                + b1 * strides[batch[1]]
                                + i * strides[row]
                                + j * strides[col]
                        };
                        let (n, m) = (shape[row], shape[col]);
                        let gd = |i, j| g[at(i, j)] as f64;
                        let r: Vec<f64> = (0..n)
                            .map(|i| (0..m).map(|j| gd(i, j).powi(2)).sum::<f64>() / m as f64)
                            .collect();
                        let c: Vec<f64> = (0..m)
                            .map(|j| (0..n).map(|i| gd(i, j).powi(2)).sum::<f64>() / n as f64)
                            .collect();
                        let mean_r = r.iter().sum::<f64>() / n as f64;
                        for i in 0..n {
                            let got = prep.r[b * n + i] as f64;
                            assert!((got - r[i]).abs() <= 1e-6 * r[i], "{axes:?} r");
                            for j in 0..m {
                                let u = gd(i, j) / (r[i] * c[j] / mean_r).sqrt();
                                want_u2 += u * u;
                                let want = x0[at(i, j)] as f64 - 0.1 * u;
                                let got = x[at(i, j)] as f64;
                                assert!((got - want).abs() <= 1e-5, "{axes:?} x {got} {want}");
                            }
                        }
                        for (got, want) in prep.c[b * m..(b + 1) * m].iter().zip(&c) {
                            let got = *got as f64;
                            assert!((got - want).abs() <= 1e-6 * want, "{axes:?} c");
                        }
                    }
                }
                assert!((sum_u2 - want_u2).abs() <= 1e-5 * want_u2, "{axes:?}");
                let want_sx: f64 = x0.iter().map(|v| (v * v) as f64).sum();
                assert!((p1.sum_sq_x - want_sx).abs() <= 1e-6 * want_sx);
            }
        }
    }

    /// The fold (pass 1 with the statistics update, no pass 2) gives pass 1's sums bit for bit
    /// and pass 2's sum(u^2) up to rounding, for every pair of axes and for units that split a
    /// block of lines, with old statistics and beta2 that make the update matter.
    #[test]
    fn the_fold_gives_pass_2s_rms() {
        let cases: Vec<(Vec<usize>, FactoredAxes)> = (0..4)
            .flat_map(|row| (0..4).map(move |col| (row, col)))
            .filter(|(row, col)| row != col && (*row, *col) != (2, 3))
            .map(|(row, col)| (vec![4usize, 3, 2, 5], FactoredAxes { row, col }))
            .chain([
                (
                    vec![2usize, 3, 20000, 4, 2],
                    FactoredAxes { row: 1, col: 3 },
                ),
                (
                    vec![2usize, 3, 20000, 4, 2],
                    FactoredAxes { row: 3, col: 1 },
                ),
                (vec![64usize, 48, 3, 3], FactoredAxes::CONVOLUTION),
            ])
            .collect();
        for (shape, axes) in cases {
            let f = Factoring::with_axes(&shape, Some(axes)).unwrap();
            let s = f.strided.unwrap();
            let len = s.len();
            let g: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 300.0)
                .collect();
            let x: Vec<f32> = (0..len).map(|i| (i % 13) as f32 * 0.1).collect();
            let r_old: Vec<f32> = (0..f.lead * f.n).map(|i| 0.5 + (i % 7) as f32).collect();
            let c_old: Vec<f32> = (0..f.lead * f.m).map(|i| 0.25 + (i % 5) as f32).collect();
            let (beta2, eps) = (0.7f32, 1e-30f32);
            let grad = Grad::plain(&g[..]);
            let p1 = pass1(&grad, &x, None, s, true);
            let prep = crate::kernels::factored::prepare(&p1, &r_old, &c_old, f, beta2, eps, 1.0);
            let want = pass2(&grad, &prep, s, 1.0);
            let fold = RowFold {
                r_old: if s.rows_low { &r_old } else { &c_old },
                beta2,
                epsilon_1: eps,
            };
            let (pf, w) = pass1_fold(&grad, &x, None, s, true, fold);
            assert_eq!(pf, p1, "{shape:?} {axes:?}: the sums");
            let got = sum_sq_update(&w, &prep, f);
            assert!(
                (got - want).abs() <= 1e-6 * want,
                "{shape:?} {axes:?}: sum(u^2) {got} against pass 2's {want}"
            );
        }
    }

    /// Squares near float32's maximum: their float32 partial sums overflow, the unit is summed
    /// again in f64, and the means are finite, as the composed path's (which divides first).
    #[test]
    fn huge_finite_squares_keep_finite_statistics() {
        let shape = [6usize, 4, 3];
        let len: usize = shape.iter().product();
        let g = vec![1.5e19f32; len];
        let x = vec![1f32; len];
        let f = Factoring::with_axes(&shape, Some(FactoredAxes::CONVOLUTION)).unwrap();
        let p1 = pass1(&Grad::plain(&g[..]), &x, None, f.strided.unwrap(), true);
        assert!(p1.finite, "finite gradient values");
        let sq = (1.5e19f32 * 1.5e19f32) as f64;
        for r in &p1.row_sums {
            assert_eq!(*r, 6.0 * sq, "each row sums the 6 output channels");
        }
        for c in &p1.col_sums {
            assert_eq!(*c, 4.0 * sq);
        }
        let prep = crate::kernels::factored::prepare(&p1, &[0.0; 12], &[0.0; 18], f, 0.0, 0.0, 1.0);
        assert!(prep
            .r
            .iter()
            .chain(&prep.c)
            .all(|v| v.is_finite() && *v > 0.0));
    }

    /// A long middle batch axis: the work units split one `(outer, low)` block of lines, and
    /// the sums still equal the sums taken element by element.
    #[test]
    fn units_within_a_block_sum_like_the_definition() {
        let shape = [2usize, 3, 20000, 4, 2];
        let axes = FactoredAxes { row: 1, col: 3 };
        let s = Strided::of(&shape, axes);
        assert!(lines_per_unit(s) < s.mid, "units split a block");
        let len = s.len();
        let g: Vec<f32> = (0..len)
            .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 300.0)
            .collect();
        let x = vec![0.5f32; len];
        let p1 = pass1(&Grad::plain(&g[..]), &x, None, s, true);
        let (n, m) = (shape[1], shape[3]);
        let batch = s.batch();
        let (mut rows, mut cols) = (vec![0f64; batch * n], vec![0f64; batch * m]);
        for (k, v) in g.iter().enumerate() {
            let rr = k % 2;
            let j = k / 2 % 4;
            let q = k / 8 % 20000;
            let i = k / 160000 % 3;
            let p = k / 480000;
            let b = (p * 20000 + q) * 2 + rr;
            let e = (v * v) as f64;
            rows[b * n + i] += e;
            cols[b * m + j] += e;
        }
        for (got, want) in p1
            .row_sums
            .iter()
            .zip(&rows)
            .chain(p1.col_sums.iter().zip(&cols))
        {
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1e-30),
                "{got} {want}"
            );
        }
        assert!((p1.sum_sq_x - 0.25 * len as f64).abs() <= 1e-6 * len as f64);
    }
}
