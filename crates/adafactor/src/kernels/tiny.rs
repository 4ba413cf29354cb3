//! Short rows: batches of tiny matrices (a convolution kernel `[out, in, kh, kw]` factored over
//! its last two axes is `out * in` matrices of `kh x kw`) and matrices of a few columns
//! (`n x 1`, `n x 4`).
//!
//! Both stream the gradient as it is stored, in blocks of about [`CHUNK`] elements (whole
//! groups of [`LANES`] matrices or rows). A group of sixteen tiny matrices is turned lane-major
//! (`transpose.rs`, element `e` of matrix `l` at `[e][l]`), and each step of a matrix (row and
//! column sums, statistics update, factors `a_i = sqrt(mean(r)) / sqrt(r_i)`,
//! `b_j = 1 / sqrt(c_j)`, `sum(u^2)`) runs on the sixteen at once, one vector instruction per
//! step; short rows add into per-lane accumulators, lane `l` taking row `l` of each group.
//! A tiny matrix's sums of squares are f64; short rows sum a block in float32 lanes and add
//! the blocks in f64, taking f64 sums for a block whose float32 sums are not finite (a row of
//! huge finite squares still has a finite mean, as in the row loops). Every sum runs in a fixed
//! order: the bits do not depend on the thread count. The update runs in the weight's own
//! layout with the factors `a_i b_j` laid out alongside. See [`super::shaped`] for the passes.

use super::cpu::{
    prefetch_ahead, prefetch_ahead_by, prefetch_ahead_raw, FAR_PREFETCH_BYTES, PREFETCH_BYTES,
};
use super::element::Element;
use super::grad::{decayed_view, probe_unless_finite, Grad};
use super::parallel::{map_units, map_units_wide, parallel_for, with_kept, UNIT_ELEMS};
use super::reduce::{sum_sq, CHUNK};
use super::row_args::new_stat;
use super::shaped::{
    add_into, load_grad, update_block, Fresh, Reads, StatArgs, Statistics, Sums, WriteArgs,
    MAX_SHORT_ROW,
};
use super::transpose::{from_lanes, to_lanes, to_lanes_groups};
use crate::state::Factoring;

/// Elements per piece of the short-row write pass, each of which asks for its own data ahead.
const WRITE_PIECE: usize = 128;

/// How far ahead the short-row write pass asks for the gradient, the weight and the row
/// statistics.
const WRITE_AHEAD: usize = PREFETCH_BYTES;

/// Matrices (or rows) per group, one per lane.
pub const LANES: usize = 16;

/// Largest matrix (`n * m` elements) that runs as a batch of tiny matrices.
pub const MAX_MATRIX: usize = 64;

type Lanes = [f32; LANES];
type Lanes64 = [f64; LANES];

/// An array of [`LANES`] values, `$e` for each lane `$l`, built in a plain loop: inlined where
/// it is used, so it gets the caller's instruction set (`std::array::from_fn` may be left out
/// of line, compiled for the baseline).
macro_rules! per_lane {
    (|$l:ident| $e:expr) => {{
        let mut out = [Default::default(); LANES];
        for $l in 0..LANES {
            out[$l] = $e;
        }
        out
    }};
}
/// A batch's work unit: its index and its matrices' new `r` and `c`.
type BatchUnit<'a> = (usize, (&'a mut [f32], &'a mut [f32]));

/// Per-unit scratch: a block's gradient, weight and factors in their layout, one group's
/// matrices lane-major, and the short-row loop's block and sums.
struct Scratch {
    gbuf: Vec<f32>,
    xbuf: Vec<f32>,
    fac: Vec<f32>,
    group: Box<GroupLanes>,
    rows: Box<RowsLanes>,
}

impl Scratch {
    fn new() -> Self {
        let flat = vec![0f32; CHUNK];
        Scratch {
            gbuf: flat.clone(),
            xbuf: flat.clone(),
            fac: flat,
            group: Box::new(GroupLanes {
                g: [[0.0; LANES]; MAX_MATRIX],
                row: [[0.0; LANES]; MAX_MATRIX],
                col: [[0.0; LANES]; MAX_MATRIX],
                row_sq: [[0.0; LANES]; MAX_MATRIX],
                col_sq: [[0.0; LANES]; MAX_MATRIX],
            }),
            rows: Box::new(RowsLanes {
                gl: [[0.0; LANES]; CHUNK / LANES],
                rs: [[0.0; LANES]; MAX_GROUPS],
                inv: [[0.0; LANES]; MAX_GROUPS],
                c32: [[0.0; LANES]; MAX_SHORT_ROW],
                w32: [[0.0; LANES]; MAX_SHORT_ROW],
                tot: RowsTotals::ZERO,
            }),
        }
    }
}

std::thread_local! {
    /// Each thread's [`Scratch`], kept between work units (about 55 KiB per thread): a
    /// new one per unit was zeroed and moved into place, a few per cent of a batch's time
    /// (and, in a batch of short-row matrices, more than the matrix itself).
    static KEPT: std::cell::Cell<Option<Box<Scratch>>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` on this thread's [`Scratch`], which holds what the last unit left: every use
/// writes before it reads.
#[inline(always)]
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    with_kept(
        &KEPT,
        #[inline(always)]
        |s| f(s.get_or_insert_with(|| Box::new(Scratch::new()))),
    )
}

/// One group of [`LANES`] tiny matrices lane-major: element `e` of matrix `l` at `[e][l]`, so
/// that every step of a matrix runs on all sixteen matrices at once in plain per-lane loops
/// (which compile to vector instructions). Only the first `n * m`, `n` or `m` rows are used.
struct GroupLanes {
    /// The gradient.
    g: [Lanes; MAX_MATRIX],
    /// Row statistics (old, then new), then the factors `a_i`.
    row: [Lanes; MAX_MATRIX],
    /// Column statistics (old, then new), then the factors `b_j`.
    col: [Lanes; MAX_MATRIX],
    /// Row sums of `g^2`.
    row_sq: [Lanes64; MAX_MATRIX],
    /// Column sums of `g^2`.
    col_sq: [Lanes64; MAX_MATRIX],
}

/// What [`rows_unit`] works in: a block's gradient lane-major (group `t`'s column `j` at
/// `[t * m + j]`), its rows' sums of squares and `1 / r_i` by group, one block's float32 column
/// sums, and the unit's f64 totals. Every use writes before it reads (a call's first block sets
/// the totals), so nothing is zeroed per matrix.
struct RowsLanes {
    gl: [Lanes; CHUNK / LANES],
    rs: [Lanes; MAX_GROUPS],
    inv: [Lanes; MAX_GROUPS],
    c32: [Lanes; MAX_SHORT_ROW],
    w32: [Lanes; MAX_SHORT_ROW],
    tot: RowsTotals,
}

/// Asks for the gradient and the weight of elements `start..start + len`, [`PREFETCH_BYTES`]
/// ahead.
#[inline(always)]
fn ask_ahead<T: Element>(grad: &Grad<'_, T>, x: Option<&[T]>, start: usize, len: usize) {
    ask_ahead_by(grad, x, start, len, PREFETCH_BYTES);
}

/// [`ask_ahead`], `bytes` ahead.
#[inline(always)]
fn ask_ahead_by<T: Element>(
    grad: &Grad<'_, T>,
    x: Option<&[T]>,
    start: usize,
    len: usize,
    bytes: usize,
) {
    prefetch_ahead_by(grad.g, start, len, bytes);
    if let Some(x) = x {
        prefetch_ahead_by(x, start, len, bytes);
    }
}

/// Sum of `x^2` of a block of the weight after the optional decay (pass 1 only).
#[inline(always)]
fn weight_sq<T: Element>(reads: &Reads<'_, T>, start: usize, xbuf: &mut [f32]) -> f64 {
    match reads.x {
        Some(x) => sum_sq(decayed_view(
            &x[start..start + xbuf.len()],
            reads.decay,
            xbuf,
        )),
        None => 0.0,
    }
}

/// One group of at most [`LANES`] tiny `n x m` matrices (their gradient `g`, stored matrix after
/// matrix): the new statistics written to `r_out`, `c_out` (the group's own), and the group's
/// `sum(u^2)` and `sum(g^2)`. The sixteen matrices run side by side, lane-major in `lanes`
/// (lanes past the group's end hold a zero gradient and unit statistics, and are dropped);
/// each lane's sums run in the order of the per-matrix loops, so the bits are theirs: row and
/// column sums of `g^2` in f64 (a row of huge finite squares still has a finite mean, as in
/// the row loops), `sum(u^2)` of a matrix in float32 row after row, the group's matrices added
/// in f64 in order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn matrices_group(
    g: &[f32],
    n: usize,
    m: usize,
    r_old: &[f32],
    c_old: &[f32],
    args: &StatArgs<'_>,
    r_out: &mut [f32],
    c_out: &mut [f32],
    lanes: &mut GroupLanes,
) -> (f64, f64) {
    let (b2, eps, sc) = (args.beta2, args.epsilon_1, args.scale);
    let s2 = (sc as f64) * (sc as f64);
    let (k, cnt) = (n * m, r_out.len() / n);
    let GroupLanes {
        g: gl,
        row,
        col,
        row_sq,
        col_sq,
    } = lanes;
    to_lanes(g, k, 0.0, gl);
    to_lanes(r_old, n, 1.0, row);
    to_lanes(c_old, m, 1.0, col);
    // Sums of squares: rows in order, each column down the rows.
    for cs in col_sq[..m].iter_mut() {
        *cs = [0.0; LANES];
    }
    let mut g2 = [0f64; LANES];
    for (i, rs) in row_sq[..n].iter_mut().enumerate() {
        let mut acc = [0f64; LANES];
        for (gv, cs) in gl[i * m..(i + 1) * m].iter().zip(col_sq[..m].iter_mut()) {
            let e = squares64(gv);
            acc = add64(&acc, &e);
            *cs = add64(cs, &e);
        }
        g2 = add64(&g2, &acc);
        *rs = acc;
    }
    // The new statistics.
    for (rv, rs) in row[..n].iter_mut().zip(&row_sq[..n]) {
        *rv = new_stats(rv, rs, m, b2, eps, s2);
    }
    for (cv, cs) in col[..m].iter_mut().zip(&col_sq[..m]) {
        *cv = new_stats(cv, cs, n, b2, eps, s2);
    }
    from_lanes(row, n, r_out);
    from_lanes(col, m, c_out);
    // The factors, in place of the statistics, and sum(u^2).
    lane_factors(&mut row[..n], &mut col[..m]);
    let mut u2 = [0f32; LANES];
    for (i, av) in row[..n].iter().enumerate() {
        for (gv, bv) in gl[i * m..(i + 1) * m].iter().zip(&col[..m]) {
            u2 = add_update_sq(&u2, gv, av, bv, sc);
        }
    }
    let (mut su2, mut sg2) = (0f64, 0f64);
    for l in 0..cnt {
        su2 += u2[l] as f64;
        sg2 += g2[l];
    }
    (su2, sg2)
}

/// [`matrix_factors`] of sixteen matrices at once, lane-major, with its bits: their new row
/// statistics `r` become `a_i`, their column statistics `c` become `b_j`.
#[inline(always)]
fn lane_factors(r: &mut [Lanes], c: &mut [Lanes]) {
    let mut sum = [0f64; LANES];
    for rv in r.iter() {
        sum = add64(&sum, &widen(rv));
    }
    let count = r.len() as f64;
    let sm: Lanes = per_lane!(|l| ((sum[l] / count) as f32).sqrt());
    for rv in r.iter_mut() {
        *rv = per_lane!(|l| sm[l] / rv[l].sqrt());
    }
    for cv in c.iter_mut() {
        *cv = per_lane!(|l| 1.0 / cv[l].sqrt());
    }
}

// Whole-lane steps, each a function of arrays by value: the per-matrix loops above unroll
// fully, and a step written as one small function is what the compiler turns into vector
// instructions after that.

/// `(g * g) as f64` per lane.
#[inline(always)]
fn squares64(g: &Lanes) -> Lanes64 {
    per_lane!(|l| (g[l] * g[l]) as f64)
}

/// Each lane widened to f64.
#[inline(always)]
fn widen(v: &Lanes) -> Lanes64 {
    per_lane!(|l| v[l] as f64)
}

/// `a + b` per lane.
#[inline(always)]
fn add64(a: &Lanes64, b: &Lanes64) -> Lanes64 {
    per_lane!(|l| a[l] + b[l])
}

/// `a + b` per lane.
#[inline(always)]
fn add(a: &Lanes, b: &Lanes) -> Lanes {
    per_lane!(|l| a[l] + b[l])
}

/// `a * b` per lane.
#[inline(always)]
fn mul(a: &Lanes, b: &Lanes) -> Lanes {
    per_lane!(|l| a[l] * b[l])
}

/// [`new_stat`] per lane.
#[inline(always)]
fn new_stats(old: &Lanes, sum: &Lanes64, count: usize, b2: f32, eps: f32, s2: f64) -> Lanes {
    per_lane!(|l| new_stat(old[l], sum[l], count, b2, eps, s2))
}

/// `acc + ((s g)^2 inv) as f64` per lane: one column of sixteen short rows added to its
/// `sum_i (s g_ij)^2 / r_i`.
#[inline(always)]
fn add_weighted_sq(acc: &Lanes64, g: &Lanes, inv: &Lanes, s: f32) -> Lanes64 {
    per_lane!(|l| {
        let ge = s * g[l];
        acc[l] + ((ge * ge) * inv[l]) as f64
    })
}

/// [`add_weighted_sq`] in float32: `acc + (s g)^2 inv` per lane.
#[inline(always)]
fn add_weighted_sq32(acc: &Lanes, g: &Lanes, inv: &Lanes, s: f32) -> Lanes {
    per_lane!(|l| {
        let ge = s * g[l];
        acc[l] + (ge * ge) * inv[l]
    })
}

/// `u2 + t * t` per lane, `t = (s g) (a b)`: one element of sixteen matrices added to their
/// `sum(u^2)`.
#[inline(always)]
fn add_update_sq(u2: &Lanes, g: &Lanes, a: &Lanes, b: &Lanes, s: f32) -> Lanes {
    per_lane!(|l| {
        let t = (s * g[l]) * (a[l] * b[l]);
        u2[l] + t * t
    })
}

/// The factors `a_i`, `b_j` of `1/sqrt(v_ij) = a_i b_j` of one matrix from its new statistics:
/// `a_i = sqrt(mean(r)) / sqrt(r_i)` (as the composed path evaluates Keras's
/// `v = r / mean(r) * c`, so that a tiny `r_i` next to huge ones cannot underflow `v`), `b_j` = 1 / sqrt(c_j)`.
#[inline(always)]
#[cfg(test)]
fn matrix_factors(r: &[f32], c: &[f32], a: &mut [f32], b: &mut [f32]) {
    let mut sum = 0f64;
    for v in r {
        sum += *v as f64;
    }
    let sm = ((sum / r.len() as f64) as f32).sqrt();
    for (ai, v) in a.iter_mut().zip(r) {
        *ai = sm / v.sqrt();
    }
    for (bj, v) in b.iter_mut().zip(c) {
        *bj = 1.0 / v.sqrt();
    }
}

/// A block of `1 x 1` matrices (a `1 x 1` convolution's kernel, at most [`CHUNK`]): their new
/// statistics into `r_out`, `c_out`, and each lane's `sum(u^2)` and `sum(g^2)` (element `i` of
/// the block in lane `i % LANES`, widened to f64) added to `lane_u2`, `lane_g2`. The same
/// steps and bits as [`matrices_group`] on one-element matrices (`mean(r) = r`, so
/// `a = sqrt(r) / sqrt(r)`), in three loops over the block that each compile to vector
/// instructions: the statistics, the factors (one check of the block for `a = 1`), `u^2`.
/// `ask(i)` runs before the statistics of the group at element `i`, to ask for data ahead.
#[inline(always)]
fn ones_block(
    g: &[f32],
    (r_old, c_old): (&[f32], &[f32]),
    args: &StatArgs<'_>,
    (r_out, c_out): (&mut [f32], &mut [f32]),
    fac: &mut [f32],
    (lane_u2, lane_g2): (&mut Lanes64, &mut Lanes64),
    ask: impl Fn(usize),
) {
    let (b2, eps, sc) = (args.beta2, args.epsilon_1, args.scale);
    let s2 = (sc as f64) * (sc as f64);
    let len = g.len();
    let (r_old, c_old) = (&r_old[..len], &c_old[..len]);
    let (r_out, c_out, fac) = (&mut r_out[..len], &mut c_out[..len], &mut fac[..len]);
    // The new statistics and `sum(g^2)`, sixteen at a time, then the partial group.
    let stat = |gv: f32, ro: f32, co: f32, rw: &mut f32, cw: &mut f32, acc: &mut f64| {
        let e = (gv * gv) as f64;
        *rw = new_stat(ro, e, 1, b2, eps, s2);
        *cw = new_stat(co, e, 1, b2, eps, s2);
        *acc += e;
    };
    let whole = len - len % LANES;
    {
        let (gs, ros, cos) = (
            g[..whole].as_chunks::<LANES>().0,
            r_old[..whole].as_chunks::<LANES>().0,
            c_old[..whole].as_chunks::<LANES>().0,
        );
        let (rws, cws) = (
            r_out[..whole].as_chunks_mut::<LANES>().0,
            c_out[..whole].as_chunks_mut::<LANES>().0,
        );
        let groups = gs.iter().zip(ros).zip(cos).zip(rws).zip(cws);
        for (t, ((((gv, ro), co), rw), cw)) in groups.enumerate() {
            ask(t * LANES);
            for l in 0..LANES {
                stat(gv[l], ro[l], co[l], &mut rw[l], &mut cw[l], &mut lane_g2[l]);
            }
        }
    }
    for i in whole..len {
        let (rw, cw) = (&mut r_out[i], &mut c_out[i]);
        stat(g[i], r_old[i], c_old[i], rw, cw, &mut lane_g2[i - whole]);
    }
    ones_factors(r_out, c_out, fac);
    // `u = (s g) a b`, its square per lane.
    let sq = |gv: f32, f: f32, acc: &mut f64| {
        let t = (sc * gv) * f;
        *acc += (t * t) as f64;
    };
    let (gs, fs) = (
        g[..whole].as_chunks::<LANES>().0,
        fac[..whole].as_chunks::<LANES>().0,
    );
    for (gv, fv) in gs.iter().zip(fs) {
        for l in 0..LANES {
            sq(gv[l], fv[l], &mut lane_u2[l]);
        }
    }
    for i in whole..len {
        sq(g[i], fac[i], &mut lane_u2[i - whole]);
    }
}

/// Up to [`LANES`] values, zero-padded (a whole group is one vector move, not a copy call).
#[inline(always)]
fn lanes_of(src: &[f32]) -> Lanes {
    match <Lanes>::try_from(src) {
        Ok(v) => v,
        Err(_) => {
            let mut v = [0f32; LANES];
            for (d, s) in v.iter_mut().zip(src) {
                *d = *s;
            }
            v
        }
    }
}

/// The first `dst.len()` lanes of `v` into `dst`.
#[inline(always)]
fn store_lanes(v: &Lanes, dst: &mut [f32]) {
    match <&mut Lanes>::try_from(&mut *dst) {
        Ok(d) => *d = *v,
        Err(_) => {
            for (d, s) in dst.iter_mut().zip(v) {
                *d = *s;
            }
        }
    }
}

/// `a b` of `1 x 1` matrices from their new statistics, with the bits of [`matrix_factors`]:
/// `a = sqrt(r) / sqrt(r)`, which is exactly 1 for a positive finite `r` (then `a b = b`, one
/// square root and one division per matrix instead of two of each); any other `r` in the block
/// takes the whole formula.
#[inline(always)]
fn ones_factors(r: &[f32], c: &[f32], out: &mut [f32]) {
    // Positive and finite: the bits of such a float32 are 1 to 0x7F7F_FFFF, so `bits - 1`
    // (wrapping) is below 0x7F7F_FFFF; zero, negative values, infinities and NaN land at or
    // above it. One integer maximum per lane, which vectorises.
    const TOP: u32 = 0x7F7F_FFFF;
    let mut worst = [0u32; LANES];
    let (groups, rest) = r.as_chunks::<LANES>();
    for v in groups {
        for l in 0..LANES {
            worst[l] = worst[l].max(v[l].to_bits().wrapping_sub(1));
        }
    }
    for v in rest {
        worst[0] = worst[0].max(v.to_bits().wrapping_sub(1));
    }
    let regular = worst.iter().fold(0, |a, w| a.max(*w)) < TOP;
    if regular {
        for (o, c) in out.iter_mut().zip(c) {
            *o = 1.0 / c.sqrt();
        }
    } else {
        for ((o, r), c) in out.iter_mut().zip(r).zip(c) {
            // `sqrt(mean(r)) / sqrt(r_i)` with `mean(r) = r_i`.
            let (mean_root, root) = (r.sqrt(), r.sqrt());
            *o = (mean_root / root) * (1.0 / c.sqrt());
        }
    }
}

/// Matrices per work unit of a batch: whole groups, about [`UNIT_ELEMS`] elements.
fn matrices_per_unit(k: usize) -> usize {
    LANES * (UNIT_ELEMS / (LANES * k.max(1))).max(1)
}

/// Matrices per block of a batch: whole groups, about [`CHUNK`] elements.
fn matrices_per_block(k: usize) -> usize {
    LANES * (CHUNK / (LANES * k.max(1))).max(1)
}

/// Rows per work unit of the short-row kernel: whole groups, about [`UNIT_ELEMS`] elements.
fn rows_per_unit(m: usize) -> usize {
    LANES * (UNIT_ELEMS / (LANES * m.max(1))).max(1)
}

/// The statistics pass of a batch of tiny matrices or of short rows.
pub(crate) fn statistics<T: Element>(
    grad: &Grad<'_, T>,
    reads: Reads<'_, T>,
    f: Factoring,
    args: StatArgs<'_>,
    out: Fresh,
) -> (Statistics, Sums) {
    if f.n * f.m <= MAX_MATRIX {
        batch_statistics(grad, reads, f, args, out)
    } else {
        rows_statistics(grad, reads, f, args, out)
    }
}

/// Runs `$body` with `$n` and `$m` bound to constants for the common tiny shapes (so that the
/// per-matrix loops unroll), else to the runtime values: square convolution kernels, and the
/// `k x 1` and `1 x k` kernels of factorised (separable) convolutions, which took about three
/// times as long with runtime sizes.
macro_rules! with_dims {
    ($f:expr, ($n:ident, $m:ident) => $body:expr) => {
        with_dims!(@ $f, ($n, $m) => $body;
            (1, 1) (3, 3) (4, 4) (2, 2) (5, 5) (7, 7) (3, 1) (1, 3) (5, 1) (1, 5) (7, 1) (1, 7))
    };
    (@ $f:expr, ($n:ident, $m:ident) => $body:expr; $(($a:literal, $b:literal))*) => {
        match ($f.n, $f.m) {
            $(($a, $b) => {
                let ($n, $m): (usize, usize) = ($a, $b);
                $body
            })*
            ($n, $m) => $body,
        }
    };
}

fn batch_statistics<T: Element>(
    grad: &Grad<'_, T>,
    reads: Reads<'_, T>,
    f: Factoring,
    args: StatArgs<'_>,
    out: Fresh,
) -> (Statistics, Sums) {
    let (n, m, k) = (f.n, f.m, f.n * f.m);
    let mpu = matrices_per_unit(k);
    let Fresh { mut r, mut c } = out;
    // Finiteness from each unit's sum of squares ([`probe_unless_finite`]), unless `clipvalue`
    // could hide a non-finite value from it.
    let probe_clip = reads.check && grad.transform.clip_value.is_some();
    let units: Vec<BatchUnit<'_>> = r
        .chunks_mut(mpu * n)
        .zip(c.chunks_mut(mpu * m))
        .enumerate()
        .collect();
    let outs = map_units_wide(
        units,
        parallel_for(f.len()),
        #[inline(always)]
        |(u, (r_out, c_out))| {
            with_scratch(
                #[inline(always)]
                |s| {
                    with_dims!(f, (n, m) => {
                        let k = n * m;
                        let mut sums = Sums::default();
                        let mut su2 = 0f64;
                        let first = u * mpu;
                        if k == 1 {
                            // Blocks of CHUNK matrices; the sums per lane, then the lanes in order.
                            let (mut lane_u2, mut lane_g2) = ([0f64; LANES], [0f64; LANES]);
                            for (bi, (rw, cw)) in r_out.chunks_mut(CHUNK).zip(c_out.chunks_mut(CHUNK)).enumerate() {
                                let (l0, cnt) = (first + bi * CHUNK, rw.len());
                                sums.sum_sq_x += weight_sq(&reads, l0, &mut s.xbuf[..cnt]);
                                let g = load_grad(grad, l0, &mut s.gbuf[..cnt], probe_clip, &mut sums.probe);
                                let old = (&args.r_old[l0..l0 + cnt], &args.c_old[l0..l0 + cnt]);
                                // Each group asks for its four streams a block ahead.
                                let ask = |i: usize| {
                                    ask_ahead(grad, reads.x, l0 + i, LANES);
                                    prefetch_ahead(args.r_old, l0 + i, LANES);
                                    prefetch_ahead(args.c_old, l0 + i, LANES);
                                };
                                let sums_out = (&mut lane_u2, &mut lane_g2);
                                ones_block(g, old, &args, (rw, cw), &mut s.fac, sums_out, ask);
                            }
                            su2 = lane_u2.iter().sum();
                            sums.sum_sq_grad = lane_g2.iter().sum();
                        } else {
                            // Blocks of whole groups, about CHUNK elements each.
                            let bm = matrices_per_block(k);
                            for (bi, (rw, cw)) in r_out.chunks_mut(bm * n).zip(c_out.chunks_mut(bm * m)).enumerate() {
                                let l0 = first + bi * bm;
                                let cnt = rw.len() / n;
                                let (e0, len) = (l0 * k, cnt * k);
                                sums.sum_sq_x += weight_sq(&reads, e0, &mut s.xbuf[..len]);
                                let g = load_grad(grad, e0, &mut s.gbuf[..len], probe_clip, &mut sums.probe);
                                let (ro, co) = (
                                    &args.r_old[l0 * n..(l0 + cnt) * n],
                                    &args.c_old[l0 * m..(l0 + cnt) * m],
                                );
                                let groups = g
                                    .chunks(LANES * k)
                                    .zip(ro.chunks(LANES * n))
                                    .zip(co.chunks(LANES * m))
                                    .zip(rw.chunks_mut(LANES * n).zip(cw.chunks_mut(LANES * m)));
                                for (t, (((gg, rog), cog), (rwg, cwg))) in groups.enumerate() {
                                    ask_ahead(grad, reads.x, e0 + t * LANES * k, LANES * k);
                                    let (u2, g2) = matrices_group(gg, n, m, rog, cog, &args, rwg, cwg, &mut s.group);
                                    su2 += u2;
                                    sums.sum_sq_grad += g2;
                                }
                            }
                        }
                        if reads.check && !probe_clip {
                            let range = (first * k, (first + r_out.len() / n) * k);
                            sums.probe += probe_unless_finite(grad, range, sums.sum_sq_grad);
                        }
                        (su2, sums)
                    })
                },
            )
        },
    );
    let mut sums = Sums::default();
    let mut sum_sq_update = 0f64;
    for (u2, s) in &outs {
        sum_sq_update += u2;
        sums.add(s);
    }
    let st = Statistics {
        r,
        c,
        row_mean: Vec::new(),
        sum_sq_update,
    };
    (st, sums)
}

/// Runs `$body` with `$m` bound to a constant for the common short rows.
macro_rules! with_cols {
    ($m0:expr, $m:ident => $body:expr) => {
        match $m0 {
            1 => {
                let $m = 1usize;
                $body
            }
            2 => {
                let $m = 2usize;
                $body
            }
            3 => {
                let $m = 3usize;
                $body
            }
            4 => {
                let $m = 4usize;
                $body
            }
            8 => {
                let $m = 8usize;
                $body
            }
            $m => $body,
        }
    };
}

/// One unit's partial sums of a slice of short rows (columns past `m` are zero).
struct RowsPart {
    slice: usize,
    /// Column sums of `g^2`.
    col: [f64; MAX_SHORT_ROW],
    /// Per column, `sum_i (s g_ij)^2 / r_i`.
    weighted: [f64; MAX_SHORT_ROW],
    /// Sum of the new row statistics.
    sum_r: f64,
    sums: Sums,
}

/// Whole slices per work unit of the short-row kernel when a slice has fewer rows than a unit
/// (`None` otherwise): a batch of small matrices (`[65536, 16, 16]`) then makes units of many
/// matrices, not one unit (with its setup, buffers and parallel job) per matrix.
fn slices_per_unit(f: Factoring) -> Option<usize> {
    let rpu = rows_per_unit(f.m);
    (f.n > 0 && f.n < rpu && f.lead > 1).then(|| rpu / f.n)
}

/// The work units of short rows: `(slice, first row in the slice)` and the unit's rows of `r`.
fn rows_units(r: &mut [f32], f: Factoring) -> Vec<((usize, usize), &mut [f32])> {
    let rpu = rows_per_unit(f.m);
    r.chunks_mut(f.n)
        .enumerate()
        .flat_map(|(slice, rs)| {
            rs.chunks_mut(rpu)
                .enumerate()
                .map(move |(k, c)| ((slice, k * rpu), c))
        })
        .collect()
}

fn rows_statistics<T: Element>(
    grad: &Grad<'_, T>,
    reads: Reads<'_, T>,
    f: Factoring,
    args: StatArgs<'_>,
    out: Fresh,
) -> (Statistics, Sums) {
    if let Some(k) = slices_per_unit(f) {
        return grouped_rows_statistics(grad, reads, f, args, out, k);
    }
    let (n, m) = (f.n, f.m);
    let Fresh { mut r, mut c } = out;
    let units = rows_units(&mut r, f);
    let parts = map_units(
        units,
        parallel_for(f.len()),
        #[inline(always)]
        |((slice, i0), r_out)| {
            with_scratch(
                #[inline(always)]
                |s| {
                    let q0 = slice * n + i0;
                    if m == 1 {
                        return column_unit(grad, &reads, &args, slice, q0, r_out, s);
                    }
                    with_cols!(m, m => rows_unit(grad, &reads, &args, m, (slice, q0), r_out, s))
                },
            )
        },
    );
    // Each slice's units, added in order.
    let mut col = vec![0f64; f.lead * m];
    let mut weighted = vec![0f64; f.lead * m];
    let mut sum_r = vec![0f64; f.lead];
    let mut sums = Sums::default();
    for p in &parts {
        let at = p.slice * m..(p.slice + 1) * m;
        add_into(&mut col[at.clone()], &p.col[..m]);
        add_into(&mut weighted[at], &p.weighted[..m]);
        sum_r[p.slice] += p.sum_r;
        sums.add(&p.sums);
    }
    let (row_mean, sum_sq_update) = finish_slices(&col, &weighted, &sum_r, f, &args, &mut c);
    let st = Statistics {
        r,
        c,
        row_mean,
        sum_sq_update,
    };
    (st, sums)
}

/// [`rows_statistics`] of a batch of small matrices of short rows, `k` whole matrices per work
/// unit ([`slices_per_unit`]): each matrix's rows run as one unit would, and its new column
/// statistics, `mean(r)` and share of `sum(u^2)` are computed in the same job, with no list of
/// f64 column sums as large as the statistics (for `[131072, 8, 16]`, 32 MB of fresh pages per
/// step). The same calls and the same additions in the same order as there: the same bits.
fn grouped_rows_statistics<T: Element>(
    grad: &Grad<'_, T>,
    reads: Reads<'_, T>,
    f: Factoring,
    args: StatArgs<'_>,
    out: Fresh,
    k: usize,
) -> (Statistics, Sums) {
    let (n, m) = (f.n, f.m);
    let Fresh { mut r, mut c } = out;
    let mut row_mean = vec![0f32; f.lead];
    let units: Vec<_> = r
        .chunks_mut(k * n)
        .zip(c.chunks_mut(k * m))
        .zip(row_mean.chunks_mut(k))
        .enumerate()
        .map(|(u, ((r, c), means))| (u * k, r, c, means))
        .collect();
    let parts = map_units(
        units,
        parallel_for(f.len()),
        #[inline(always)]
        |(first, r_out, c_out, means)| {
            with_scratch(
                #[inline(always)]
                |s| {
                    // A plain loop, not an iterator's closure: a closure left out of line
                    // would be compiled for the baseline, not for the unit's instruction set.
                    let slices = r_out.chunks_mut(n).zip(c_out.chunks_mut(m)).zip(means);
                    let mut out = Vec::with_capacity(k);
                    for (j, ((r_s, c_s), mean)) in slices.enumerate() {
                        let slice = first + j;
                        let q0 = slice * n;
                        let p = if m == 1 {
                            column_unit(grad, &reads, &args, slice, q0, r_s, s)
                        } else {
                            with_cols!(m, m => rows_unit(grad, &reads, &args, m, (slice, q0), r_s, s))
                        };
                        let (col, weighted) = (&p.col[..m], &p.weighted[..m]);
                        let (mu, share) =
                            finish_slice(col, weighted, p.sum_r, n, slice, &args, c_s);
                        *mean = mu;
                        out.push((share, p.sums));
                    }
                    out
                },
            )
        },
    );
    let mut sums = Sums::default();
    let mut shares = Vec::with_capacity(f.lead);
    for (share, s) in parts.iter().flatten() {
        sums.add(s);
        shares.push(*share);
    }
    let st = Statistics {
        r,
        c,
        row_mean,
        // As `weighted_sum` adds the slices' shares.
        sum_sq_update: shares.into_iter().sum(),
    };
    (st, sums)
}

/// One work unit of an `n x 1` variable (rows `q0..q0 + r_out.len()`, one element each): the
/// steps and bits of the short-row loop, whose lane `l` holds the rows `l`, `l + 16`, ... of the
/// unit, here streamed as they are stored, in blocks of [`CHUNK`] rows. A row's only element is
/// its sum, so the column sum of `g^2` is the sum of the rows' sums.
#[inline(always)]
fn column_unit<T: Element>(
    grad: &Grad<'_, T>,
    reads: &Reads<'_, T>,
    args: &StatArgs<'_>,
    slice: usize,
    q0: usize,
    r_out: &mut [f32],
    scratch: &mut Scratch,
) -> RowsPart {
    let (b2, eps, sc) = (args.beta2, args.epsilon_1, args.scale);
    let s2 = (sc as f64) * (sc as f64);
    let (gbuf, xbuf) = (&mut scratch.gbuf[..CHUNK], &mut scratch.xbuf[..CHUNK]);
    let mut sums = Sums::default();
    let probe_clip = reads.check && grad.transform.clip_value.is_some();
    let (mut sum_g, mut sum_w, mut sum_r) = ([0f64; LANES], [0f64; LANES], [0f64; LANES]);
    // Lane `l` of the accumulators takes the row `l` of each group of sixteen.
    let mut row = |g: f32, old: f32, l: usize| -> f32 {
        let e = (g * g) as f64;
        let rn = new_stat(old, e, 1, b2, eps, s2);
        let ge = sc * g;
        sum_g[l] += e;
        sum_r[l] += rn as f64;
        sum_w[l] += ((ge * ge) * (1.0 / rn)) as f64;
        rn
    };
    for (bi, out) in r_out.chunks_mut(CHUNK).enumerate() {
        let (q, len) = (q0 + bi * CHUNK, out.len());
        sums.sum_sq_x += weight_sq(reads, q, &mut xbuf[..len]);
        let g = load_grad(grad, q, &mut gbuf[..len], probe_clip, &mut sums.probe);
        let old = &args.r_old[q..q + len];
        let (g16, g_rest) = g.as_chunks::<LANES>();
        let (o16, o_rest) = old.as_chunks::<LANES>();
        let (out16, out_rest) = out.as_chunks_mut::<LANES>();
        for (t, ((gv, ov), rv)) in g16.iter().zip(o16).zip(out16.iter_mut()).enumerate() {
            let e = q + t * LANES;
            ask_ahead(grad, reads.x, e, LANES);
            prefetch_ahead(args.r_old, e, LANES);
            for l in 0..LANES {
                rv[l] = row(gv[l], ov[l], l);
            }
        }
        for (l, ((g, o), r)) in g_rest.iter().zip(o_rest).zip(out_rest).enumerate() {
            *r = row(*g, *o, l);
        }
    }
    let lanes = |v: &Lanes64| v.iter().sum::<f64>();
    sums.sum_sq_grad = lanes(&sum_g);
    if reads.check && !probe_clip {
        let range = (q0, q0 + r_out.len());
        sums.probe += probe_unless_finite(grad, range, sums.sum_sq_grad);
    }
    let (mut col, mut weighted) = ([0f64; MAX_SHORT_ROW], [0f64; MAX_SHORT_ROW]);
    (col[0], weighted[0]) = (sums.sum_sq_grad, lanes(&sum_w));
    RowsPart {
        slice,
        col,
        weighted,
        sum_r: lanes(&sum_r),
        sums,
    }
}

/// Most groups of [`LANES`] short rows (of at least two elements) in one block of [`CHUNK`].
const MAX_GROUPS: usize = CHUNK / (2 * LANES);

/// One work unit of short rows of `m` elements (rows `q0..q0 + r_out.len()`), streamed as they
/// are stored in blocks of whole groups of [`LANES`] rows: the row `l` of each group adds into
/// the accumulators of lane `l` (the column sums at `[j][l]`). A block's sums are float32
/// lanes, added into the unit's f64 totals at its end, as the row loops add a block of rows;
/// a block whose float32 sums are not finite (huge but finite squares, or a non-finite
/// gradient) is summed again in f64 from cache ([`rows_block_f64`]). The blocks are fixed by
/// the unit, so the bits do not depend on the thread count.
///
/// A block runs in steps, each a short loop over the whole block in the first-level cache:
/// the gradient lane-major; its squares into the row and column sums; the rows' new
/// statistics; the weighted sums. One loop doing all of them per group keeps too many values
/// live for the registers and leaves the compiler mixing scalar and vector code. The block
/// buffers and the totals live in the thread's [`Scratch`]: a batch of small matrices calls
/// this once per matrix, and setting up 24 KiB of arrays per call took longer than the matrix.
#[inline(always)]
fn rows_unit<T: Element>(
    grad: &Grad<'_, T>,
    reads: &Reads<'_, T>,
    args: &StatArgs<'_>,
    m: usize,
    (slice, q0): (usize, usize),
    r_out: &mut [f32],
    scratch: &mut Scratch,
) -> RowsPart {
    let (b2, eps, sc) = (args.beta2, args.epsilon_1, args.scale);
    let s2 = (sc as f64) * (sc as f64);
    let (gbuf, xbuf) = (&mut scratch.gbuf[..CHUNK], &mut scratch.xbuf[..CHUNK]);
    let mut sums = Sums::default();
    let probe_clip = reads.check && grad.transform.clip_value.is_some();
    // Column `j` of lane `l` (row `l` of each group) at `[j][l]`: the unit's totals, and one
    // block's float32 sums; a block's gradient lane-major, and its rows' sums of squares and
    // `1 / r_i` by group (zero past the last row). Kept by the thread: the first block sets the
    // totals (below).
    let RowsLanes {
        gl,
        rs,
        inv,
        c32,
        w32,
        tot,
    } = &mut *scratch.rows;
    if r_out.is_empty() {
        *tot = RowsTotals::ZERO;
    }
    let block_rows = LANES * (CHUNK / (LANES * m)).max(1);
    for (bi, out) in r_out.chunks_mut(block_rows).enumerate() {
        let q = q0 + bi * block_rows;
        let (e0, rows) = (q * m, out.len());
        let len = rows * m;
        let groups = rows.div_ceil(LANES);
        sums.sum_sq_x += weight_sq(reads, e0, &mut xbuf[..len]);
        let g = load_grad(grad, e0, &mut gbuf[..len], probe_clip, &mut sums.probe);
        let old = &args.r_old[q..q + rows];
        let (gl, rs, inv) = (&mut gl[..groups * m], &mut rs[..groups], &mut inv[..groups]);
        // Sixteen rows lane-major (a zero gradient past the end).
        to_lanes_groups(g, m, 0.0, gl);
        // Their squares into the row sums and the block's column sums.
        for (j, cs) in c32[..m].iter_mut().enumerate() {
            *cs = [0.0; LANES];
            w32[j] = [0.0; LANES];
        }
        let (mut sr, mut sg) = ([0f32; LANES], [0f32; LANES]);
        for (t, (glt, rst)) in gl.chunks_exact(m).zip(rs.iter_mut()).enumerate() {
            // Further ahead than the other passes, and the old row statistics too: this
            // pass computes more per byte ([`FAR_PREFETCH_BYTES`]).
            let far = FAR_PREFETCH_BYTES;
            ask_ahead_by(grad, reads.x, e0 + t * LANES * m, LANES * m, far);
            prefetch_ahead_by(args.r_old, q + t * LANES, LANES, far);
            let mut sum = [0f32; LANES];
            for (gv, cs) in glt.iter().zip(c32.iter_mut()) {
                let e = mul(gv, gv);
                sum = add(&sum, &e);
                *cs = add(cs, &e);
            }
            sg = add(&sg, &sum);
            *rst = sum;
        }
        // The rows' new statistics and their inverses (lanes past the last row take no part).
        let rs_rows = &rs.as_flattened()[..rows];
        let inv_rows = inv.as_flattened_mut();
        for (((rn, iv), s), o) in out
            .iter_mut()
            .zip(inv_rows.iter_mut())
            .zip(rs_rows)
            .zip(old)
        {
            *rn = new_stat(*o, *s as f64, m, b2, eps, s2);
            *iv = 1.0 / *rn;
        }
        inv_rows[rows..].fill(0.0);
        let (whole, rest) = out.as_chunks::<LANES>();
        for rg in whole {
            sr = add(&sr, rg);
        }
        for (s, r) in sr.iter_mut().zip(rest) {
            *s += r;
        }
        // The weighted sums `(s g)^2 / r_i` per column and lane.
        for (glt, it) in gl.chunks_exact(m).zip(inv.iter()) {
            for (gv, ws) in glt.iter().zip(w32.iter_mut()) {
                *ws = add_weighted_sq32(ws, gv, it, sc);
            }
        }
        if all_finite(&c32[..m]) && all_finite(&w32[..m]) && all_finite(&[sr, sg]) {
            // The totals start at zero, and `0.0 + s` is `s` for these sums (squares times
            // positive factors: never -0.0): the first block's sums are the totals. Most
            // units of a batch of small matrices are one block.
            let block = (&c32[..m], &w32[..m], &sr, &sg);
            if bi == 0 {
                tot.add_block::<true>(block);
            } else {
                tot.add_block::<false>(block);
            }
        } else {
            if bi == 0 {
                *tot = RowsTotals::ZERO;
            }
            let mut lanes = [[0f32; LANES]; MAX_SHORT_ROW];
            rows_block_f64(g, old, out, m, args, tot, &mut lanes);
        }
    }
    let lanes = |v: &Lanes64| v.iter().sum::<f64>();
    // Column `j`: its lanes added in order.
    let by_lanes = |acc: &[Lanes64; MAX_SHORT_ROW]| {
        let mut out = [0f64; MAX_SHORT_ROW];
        for (o, a) in out[..m].iter_mut().zip(acc) {
            *o = lanes(a);
        }
        out
    };
    sums.sum_sq_grad = lanes(&tot.sum_g);
    if reads.check && !probe_clip {
        let range = (q0 * m, (q0 + r_out.len()) * m);
        sums.probe += probe_unless_finite(grad, range, sums.sum_sq_grad);
    }
    RowsPart {
        slice,
        col: by_lanes(&tot.col),
        weighted: by_lanes(&tot.weighted),
        sum_r: lanes(&tot.sum_r),
        sums,
    }
}

/// A short-row unit's f64 sums, per lane: column sums of `g^2` and `sum_i (s g_ij)^2 / r_i`
/// at `[j][l]`, the new row statistics and `g^2`.
struct RowsTotals {
    col: [Lanes64; MAX_SHORT_ROW],
    weighted: [Lanes64; MAX_SHORT_ROW],
    sum_r: Lanes64,
    sum_g: Lanes64,
}

impl RowsTotals {
    /// Every total zero.
    const ZERO: RowsTotals = RowsTotals {
        col: [[0.0; LANES]; MAX_SHORT_ROW],
        weighted: [[0.0; LANES]; MAX_SHORT_ROW],
        sum_r: [0.0; LANES],
        sum_g: [0.0; LANES],
    };

    /// A block's float32 sums (per column: `g^2` and weighted; the row statistics, `g^2`)
    /// widened and added to the totals, or, with `FIRST`, set as the totals (the same bits
    /// when the totals are zero, without reading them). A constant, not a closure or a
    /// runtime flag: each branch gets its own loop, inlined into the caller's instruction-set
    /// frame.
    #[inline(always)]
    fn add_block<const FIRST: bool>(&mut self, (col, weighted, sr, sg): BlockSums<'_>) {
        for (j, (c, w)) in col.iter().zip(weighted).enumerate() {
            add_widened::<FIRST>(&mut self.col[j], c);
            add_widened::<FIRST>(&mut self.weighted[j], w);
        }
        add_widened::<FIRST>(&mut self.sum_r, sr);
        add_widened::<FIRST>(&mut self.sum_g, sg);
    }
}

/// `total += widen(v)`, or with `FIRST`, `total = widen(v)`.
#[inline(always)]
fn add_widened<const FIRST: bool>(total: &mut Lanes64, v: &Lanes) {
    *total = if FIRST {
        widen(v)
    } else {
        add64(total, &widen(v))
    };
}

/// One block's float32 sums of a short-row unit: `g^2` and weighted sums per column, the new
/// row statistics and `g^2`.
type BlockSums<'a> = (&'a [Lanes], &'a [Lanes], &'a Lanes, &'a Lanes);

/// One block of [`rows_unit`] again with every sum in f64 (its new row statistics rewritten
/// into `out`): the rare block whose float32 sums are not finite. A row of huge but finite
/// squares still has a finite mean, as in the row loops; a non-finite gradient gives the
/// non-finite sums that the caller's check finds.
#[cold]
#[inline(never)]
fn rows_block_f64(
    g: &[f32],
    old: &[f32],
    out: &mut [f32],
    m: usize,
    args: &StatArgs<'_>,
    tot: &mut RowsTotals,
    gl: &mut [Lanes; MAX_SHORT_ROW],
) {
    let (b2, eps, sc) = (args.beta2, args.epsilon_1, args.scale);
    let s2 = (sc as f64) * (sc as f64);
    let groups = g
        .chunks(LANES * m)
        .zip(old.chunks(LANES))
        .zip(out.chunks_mut(LANES));
    for ((gg, og), rg) in groups {
        let cnt = rg.len();
        to_lanes(gg, m, 0.0, &mut gl[..m]);
        let mut rs = [0f64; LANES];
        for (gv, ca) in gl[..m].iter().zip(tot.col.iter_mut()) {
            let e = squares64(gv);
            rs = add64(&rs, &e);
            *ca = add64(ca, &e);
        }
        let rn = new_stats(&lanes_of(og), &rs, m, b2, eps, s2);
        let mut inv = [0f32; LANES];
        for l in 0..cnt {
            tot.sum_r[l] += rn[l] as f64;
            tot.sum_g[l] += rs[l];
            inv[l] = 1.0 / rn[l];
        }
        store_lanes(&rn, rg);
        for (gv, wa) in gl[..m].iter().zip(tot.weighted.iter_mut()) {
            *wa = add_weighted_sq(wa, gv, &inv, sc);
        }
    }
}

/// True when every lane of every vector is finite (`v * 0` sums to zero).
#[inline(always)]
fn all_finite(vs: &[Lanes]) -> bool {
    let mut probe = [0f32; LANES];
    for v in vs {
        probe = add(&probe, &mul(v, &[0.0; LANES]));
    }
    probe.iter().all(|p| *p == 0.0)
}

/// The column statistics (into `c`), `mean(r)` per slice and `sum(u^2)` from the slices'
/// combined sums: `sum_ij u_ij^2 = mean(r) sum_j (sum_i (s g_ij)^2 / r_i) / c_j`.
fn finish_slices(
    col: &[f64],
    weighted: &[f64],
    sum_r: &[f64],
    f: Factoring,
    args: &StatArgs<'_>,
    c: &mut [f32],
) -> (Vec<f32>, f64) {
    let m = f.m;
    let mut row_mean = Vec::with_capacity(sum_r.len());
    let mut shares = Vec::with_capacity(sum_r.len());
    for (s, (sr, c_s)) in sum_r.iter().zip(c.chunks_mut(m)).enumerate() {
        let at = s * m..(s + 1) * m;
        let (mean, share) = finish_slice(&col[at.clone()], &weighted[at], *sr, f.n, s, args, c_s);
        row_mean.push(mean);
        shares.push(share);
    }
    // As `weighted_sum` adds the slices' shares: in slice order, after all of them.
    (row_mean, shares.into_iter().sum())
}

/// [`finish_slices`] of slice `slice` (its `m` column sums, weighted sums and new `c`, its sum
/// of new row statistics over `n` rows): its `mean(r)` and share of `sum(u^2)`.
fn finish_slice(
    col: &[f64],
    weighted: &[f64],
    sum_r: f64,
    n: usize,
    slice: usize,
    args: &StatArgs<'_>,
    c: &mut [f32],
) -> (f32, f64) {
    let s2 = (args.scale as f64) * (args.scale as f64);
    let c_old = &args.c_old[slice * c.len()..(slice + 1) * c.len()];
    for ((cv, s), old) in c.iter_mut().zip(col).zip(c_old) {
        *cv = new_stat(*old, *s, n, args.beta2, args.epsilon_1, s2);
    }
    let mean = (sum_r / n as f64) as f32;
    (
        mean,
        super::factored::weighted_sum(weighted, c, c.len(), &[mean]),
    )
}

/// The write pass of a batch of tiny matrices or of short rows.
pub(crate) fn write<T: Element>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    st: &Statistics,
    f: Factoring,
    w: WriteArgs,
) {
    if f.is_empty() {
        return;
    }
    if f.n * f.m <= MAX_MATRIX {
        batch_write(x, grad, st, f, w)
    } else {
        rows_write(x, grad, st, f, w)
    }
}

/// Updates a block of the weight (element `offset` of the tensor on) from its gradient and
/// factors, stored with the step's rounding: the only place this kernel writes the weight.
#[inline(always)]
fn store_block<T: Element>(
    xs: &mut [T],
    offset: usize,
    g: &[f32],
    fac: &[f32],
    xbuf: &mut [f32],
    w: WriteArgs,
) {
    // A float32 weight is written exactly by any rounding: updated where it is stored.
    if let Some(xf) = T::as_f32_mut(xs) {
        update_block(xf, g, fac, w);
        return;
    }
    T::load(xs, xbuf);
    update_block(xbuf, g, fac, w);
    w.rounding.store_slice(xbuf, xs, offset as u64);
}

fn batch_write<T: Element>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    st: &Statistics,
    f: Factoring,
    w: WriteArgs,
) {
    let k = f.n * f.m;
    let mpu = matrices_per_unit(k);
    // Last units first: pass 1 read them last, so they may still be in the last-level cache.
    let units: Vec<(usize, &mut [T])> = x.chunks_mut(mpu * k).enumerate().rev().collect();
    map_units_wide(
        units,
        parallel_for(f.len()),
        #[inline(always)]
        |(u, xs)| {
            with_scratch(
                #[inline(always)]
                |s| {
                    with_dims!(f, (n, m) => {
                        let k = n * m;
                        let mut probe = 0f32;
                        if k == 1 {
                            // Elementwise: blocks as large as the scratch, not one group.
                            let block = s.fac.len();
                            for at in (0..xs.len()).step_by(block) {
                                let (e0, len) = (u * mpu + at, block.min(xs.len() - at));
                                // The gradient and the weight a block ahead (the weight's clipped to the unit).
                                prefetch_ahead(grad.g, e0, len);
                                prefetch_ahead(&*xs, at, len);
                                let (r, c) = (&st.r[e0..e0 + len], &st.c[e0..e0 + len]);
                                ones_factors(r, c, &mut s.fac[..len]);
                                let g = load_grad(grad, e0, &mut s.gbuf[..len], false, &mut probe);
                                let xb = &mut xs[at..at + len];
                                store_block(xb, e0, g, &s.fac[..len], &mut s.xbuf[..len], w);
                            }
                            return;
                        }
                        // Blocks of whole groups, as many as the scratch holds; each matrix's factors
                        // in its own layout.
                        let bm = matrices_per_block(k);
                        for bi in 0..xs.len().div_ceil(bm * k) {
                            let l0 = u * mpu + bi * bm;
                            let len = (xs.len() - bi * bm * k).min(bm * k);
                            let cnt = len / k;
                            let (r, c) = (&st.r[l0 * n..(l0 + cnt) * n], &st.c[l0 * m..(l0 + cnt) * m]);
                            let groups = s.fac[..len]
                                .chunks_mut(LANES * k)
                                .zip(r.chunks(LANES * n).zip(c.chunks(LANES * m)));
                            for (t, (fg, (rg, cg))) in groups.enumerate() {
                                // The gradient and the weight a block ahead, group by group (clipped
                                // to the unit's weight).
                                let at = bi * bm * k + t * LANES * k;
                                prefetch_ahead(grad.g, u * mpu * k + at, LANES * k);
                                prefetch_ahead(&*xs, at, LANES * k);
                                let GroupLanes { g: fl, row, col, .. } = &mut *s.group;
                                to_lanes(rg, n, 1.0, row);
                                to_lanes(cg, m, 1.0, col);
                                lane_factors(&mut row[..n], &mut col[..m]);
                                for (i, av) in row[..n].iter().enumerate() {
                                    for (fv, bv) in fl[i * m..(i + 1) * m].iter_mut().zip(&col[..m]) {
                                        *fv = mul(av, bv);
                                    }
                                }
                                from_lanes(fl, k, fg);
                            }
                            let g = load_grad(grad, l0 * k, &mut s.gbuf[..len], false, &mut probe);
                            let xb = &mut xs[bi * bm * k..bi * bm * k + len];
                            store_block(xb, l0 * k, g, &s.fac[..len], &mut s.xbuf[..len], w);
                        }
                    })
                },
            )
        },
    );
}

fn rows_write<T: Element>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    st: &Statistics,
    f: Factoring,
    w: WriteArgs,
) {
    let (n, m) = (f.n, f.m);
    let rpu = rows_per_unit(m);
    // As the statistics pass: several whole slices per unit when slices are small.
    let units: Vec<((usize, usize), &mut [T])> = match slices_per_unit(f) {
        Some(k) => x
            .chunks_mut(k * n * m)
            .enumerate()
            .map(|(u, xs)| ((u * k, 0), xs))
            .rev()
            .collect(),
        None => x
            .chunks_mut(n * m)
            .enumerate()
            .flat_map(|(slice, xs)| {
                xs.chunks_mut(rpu * m)
                    .enumerate()
                    .map(move |(k, c)| ((slice, k * rpu), c))
            })
            .rev()
            .collect(),
    };
    map_units(
        units,
        parallel_for(f.len()),
        #[inline(always)]
        |((first, i0), unit)| {
            with_scratch(
                #[inline(always)]
                |s| {
                    // Each slice of the unit as a unit of its own (the factors are per element,
                    // so the units change no bits).
                    let per = (n * m).min(unit.len());
                    // The rows' `a_i` of a block (of at least two columns), written before
                    // they are read: set up once per unit, not per slice.
                    let mut a_buf = [0f32; CHUNK / 2];
                    for (j, xs) in unit.chunks_mut(per).enumerate() {
                        let slice = first + j;
                        with_cols!(m, m => {
                            let mut probe = 0f32;
                            let sm = st.row_mean[slice].sqrt();
                            let mut b = [0f32; LANES];
                            for (bj, c) in b.iter_mut().zip(&st.c[slice * m..(slice + 1) * m]) {
                                *bj = 1.0 / c.sqrt();
                            }
                            // Blocks of whole rows, as many as the scratch holds: the factors are per
                            // element, so the blocking changes no bits.
                            let block_rows = s.fac.len() / m;
                            for bi in 0..xs.len().div_ceil(block_rows * m) {
                                let q = slice * n + i0 + bi * block_rows;
                                let at = bi * block_rows * m;
                                let len = (xs.len() - at).min(block_rows * m);
                                // The weight's place, to ask ahead in it while a block of it
                                // is borrowed for the update (a prefetch reads nothing).
                                let (x_ptr, x_len) = (xs.as_ptr(), xs.len());
                                let xb = &mut xs[at..at + len];
                                let fac = &mut s.fac[..len];
                                if m == 1 {
                                    for (fv, r) in fac.iter_mut().zip(&st.r[q..q + len]) {
                                        *fv = (sm / r.sqrt()) * b[0];
                                    }
                                } else {
                                    let rows = len / m;
                                    let a = &mut a_buf[..rows];
                                    for (al, r) in a.iter_mut().zip(&st.r[q..q + rows]) {
                                        *al = sm / r.sqrt();
                                    }
                                    for (frow, al) in fac.chunks_exact_mut(m).zip(a.iter()) {
                                        for (fv, bj) in frow.iter_mut().zip(&b[..m]) {
                                            *fv = al * bj;
                                        }
                                    }
                                }
                                let g = load_grad(grad, q * m, &mut s.gbuf[..len], false, &mut probe);
                                // In pieces, each asking for the gradient and the weight a
                                // distance ahead (clipped to the unit's weight) and the row
                                // statistics with them: the asks spread over the block instead
                                // of a burst at its start that stalled on the memory system
                                // (the update is elementwise: the pieces change no bits).
                                let pieces = xb
                                    .chunks_mut(WRITE_PIECE)
                                    .zip(g.chunks(WRITE_PIECE))
                                    .zip(s.fac[..len].chunks(WRITE_PIECE))
                                    .zip(s.xbuf[..len].chunks_mut(WRITE_PIECE));
                                for (p, (((xp, gp), fp), bp)) in pieces.enumerate() {
                                    let e = q * m + p * WRITE_PIECE;
                                    prefetch_ahead_by(grad.g, e, gp.len(), WRITE_AHEAD);
                                    let x_at = at + p * WRITE_PIECE;
                                    prefetch_ahead_raw(x_ptr, x_len, x_at, gp.len(), WRITE_AHEAD);
                                    prefetch_ahead_by(&st.r, e / m, gp.len() / m, WRITE_AHEAD);
                                    store_block(xp, e, gp, fp, bp, w);
                                }
                            }
                        })
                    }
                },
            )
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One tiny matrix the plain way, as the kernel computed it before the lanes: its new
    /// statistics, `sum(u^2)` (float32, row after row) and `sum(g^2)`.
    fn one_matrix(
        g: &[f32],
        (n, m): (usize, usize),
        (r_old, c_old): (&[f32], &[f32]),
        args: &StatArgs<'_>,
    ) -> (Vec<f32>, Vec<f32>, f32, f64) {
        let (b2, eps, sc) = (args.beta2, args.epsilon_1, args.scale);
        let s2 = (sc as f64) * (sc as f64);
        let (mut r, mut c) = (vec![0f32; n], vec![0f32; m]);
        let mut cs = vec![0f64; m];
        let mut g2 = 0f64;
        for (i, grow) in g.chunks_exact(m).enumerate() {
            let mut rs = 0f64;
            for (j, gv) in grow.iter().enumerate() {
                let e = (gv * gv) as f64;
                rs += e;
                cs[j] += e;
            }
            g2 += rs;
            r[i] = new_stat(r_old[i], rs, m, b2, eps, s2);
        }
        for j in 0..m {
            c[j] = new_stat(c_old[j], cs[j], n, b2, eps, s2);
        }
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; m]);
        matrix_factors(&r, &c, &mut a, &mut b);
        let mut u2 = 0f32;
        for (grow, ai) in g.chunks_exact(m).zip(&a) {
            for (gv, bj) in grow.iter().zip(&b) {
                let t = (sc * gv) * (ai * bj);
                u2 += t * t;
            }
        }
        (r, c, u2, g2)
    }

    /// Statistics arguments with a fast decay, a tiny epsilon and a clipping scale.
    fn test_args<'a>(r_old: &'a [f32], c_old: &'a [f32]) -> StatArgs<'a> {
        StatArgs {
            r_old,
            c_old,
            beta2: 0.8,
            epsilon_1: 1e-30,
            scale: 0.75,
        }
    }

    /// Values `lo * 10^(span * u)`, `u` uniform in `[0, 1)` from a xorshift stream `seed`:
    /// spread over `span` binades of ten.
    fn spread(seed: u64) -> impl FnMut(f32, f32) -> f32 {
        let mut s = seed;
        move |lo, span| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo * 10f32.powf(span * ((s >> 40) as f32 / (1u64 << 24) as f32))
        }
    }

    /// A batch of small matrices of short rows, run several whole matrices per work unit, gives
    /// every matrix the bits it gets alone (a batch of one, one unit per matrix), and the batch's
    /// sums are the matrices' added in order; its write pass likewise.
    #[test]
    fn grouped_short_row_matrices_have_the_bits_of_one_matrix_at_a_time() {
        let mut next = spread(0x9e37_79b9_7f4a_7c15);
        for (lead, n, m) in [
            (40, 16, 16),
            (300, 8, 16),
            (129, 16, 8),
            (70, 17, 16),
            (37, 100, 1),
        ] {
            let f = Factoring {
                lead,
                n,
                m,
                strided: None,
            };
            assert!(slices_per_unit(f).is_some(), "{lead}x{n}x{m} is grouped");
            let k = n * m;
            let g: Vec<f32> = (0..lead * k)
                .map(|i| next(1e-3, 6.0) * if i % 3 == 0 { -1.0 } else { 1.0 })
                .collect();
            let x: Vec<f32> = (0..lead * k).map(|_| next(1e-2, 3.0)).collect();
            let r_old: Vec<f32> = (0..lead * n).map(|_| next(1e-8, 8.0)).collect();
            let c_old: Vec<f32> = (0..lead * m).map(|_| next(1e-8, 8.0)).collect();
            let args = test_args(&r_old, &c_old);
            let grad = Grad::plain(&g[..]);
            let reads = Reads {
                x: Some(&x[..]),
                decay: None,
                check: true,
            };
            let (st, sums) = statistics(&grad, reads, f, args, Fresh::zeroed(f));
            let mut want = Sums::default();
            let mut shares = Vec::new();
            let w = WriteArgs {
                coef: 0.01,
                scale: 0.75,
                decay: None,
                rounding: crate::kernels::Rounding::Nearest,
            };
            let mut x_all = x.clone();
            write(&mut x_all, &grad, &st, f, w);
            for l in 0..lead {
                let one = Factoring { lead: 1, ..f };
                let (gs, xs) = (&g[l * k..(l + 1) * k], &x[l * k..(l + 1) * k]);
                let olds = (&r_old[l * n..(l + 1) * n], &c_old[l * m..(l + 1) * m]);
                let reads = Reads {
                    x: Some(xs),
                    decay: None,
                    check: true,
                };
                let grad_l = Grad::plain(gs);
                let (st1, s1) = statistics(
                    &grad_l,
                    reads,
                    one,
                    test_args(olds.0, olds.1),
                    Fresh::zeroed(one),
                );
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let what = format!("{lead}x{n}x{m}, matrix {l}");
                assert_eq!(bits(&st.r[l * n..(l + 1) * n]), bits(&st1.r), "r, {what}");
                assert_eq!(bits(&st.c[l * m..(l + 1) * m]), bits(&st1.c), "c, {what}");
                assert_eq!(
                    st.row_mean[l].to_bits(),
                    st1.row_mean[0].to_bits(),
                    "mean, {what}"
                );
                let mut x1 = xs.to_vec();
                write(&mut x1, &grad_l, &st1, one, w);
                assert_eq!(
                    bits(&x_all[l * k..(l + 1) * k]),
                    bits(&x1),
                    "weights, {what}"
                );
                want.add(&s1);
                shares.push(st1.sum_sq_update);
            }
            let total: f64 = shares.into_iter().sum();
            assert_eq!(
                st.sum_sq_update.to_bits(),
                total.to_bits(),
                "sum(u^2), {lead}x{n}x{m}"
            );
            assert_eq!(sums, want, "sums, {lead}x{n}x{m}");
        }
    }

    /// A group of sixteen matrices run lane-major, and the partial groups at a batch's end, give
    /// each matrix the bits of [`one_matrix`], for every tiny shape the batches take and
    /// statistics spread over many binades.
    #[test]
    fn lane_major_groups_have_the_bits_of_one_matrix_at_a_time() {
        let mut next = spread(0x2545_f491_4f6c_dd1d);
        let mut group = Scratch::new().group;
        for (n, m) in [
            (1, 2),
            (2, 2),
            (3, 3),
            (4, 4),
            (2, 5),
            (7, 7),
            (8, 8),
            (1, 64),
            (64, 1),
        ] {
            for cnt in [LANES, 5, 1] {
                let k = n * m;
                let g: Vec<f32> = (0..cnt * k)
                    .map(|i| next(1e-3, 6.0) * if i % 3 == 0 { -1.0 } else { 1.0 })
                    .collect();
                let r_old: Vec<f32> = (0..cnt * n).map(|_| next(1e-8, 8.0)).collect();
                let c_old: Vec<f32> = (0..cnt * m).map(|_| next(1e-8, 8.0)).collect();
                let args = test_args(&r_old, &c_old);
                let (mut r, mut c) = (vec![0f32; cnt * n], vec![0f32; cnt * m]);
                let (su2, sg2) =
                    matrices_group(&g, n, m, &r_old, &c_old, &args, &mut r, &mut c, &mut group);
                let (mut want_u2, mut want_g2) = (0f64, 0f64);
                for l in 0..cnt {
                    let (rw, cw, u2, g2) = one_matrix(
                        &g[l * k..(l + 1) * k],
                        (n, m),
                        (&r_old[l * n..(l + 1) * n], &c_old[l * m..(l + 1) * m]),
                        &args,
                    );
                    let what = format!("{n}x{m}, {cnt} matrices, matrix {l}");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&r[l * n..(l + 1) * n]), bits(&rw), "{what}: r");
                    assert_eq!(bits(&c[l * m..(l + 1) * m]), bits(&cw), "{what}: c");
                    want_u2 += u2 as f64;
                    want_g2 += g2;
                }
                let what = format!("{n}x{m}, {cnt} matrices");
                assert_eq!(su2.to_bits(), want_u2.to_bits(), "{what}: sum(u^2)");
                assert_eq!(sg2.to_bits(), want_g2.to_bits(), "{what}: sum(g^2)");
            }
        }
    }

    /// Blocks of `1 x 1` matrices give each matrix the bits of [`one_matrix`], and each lane
    /// (element `i` in lane `i % LANES`) the f64 sum of its matrices' `u^2` and `g^2` in order:
    /// whole and partial groups, with a zero, NaN, negative or infinite old `r` in some blocks
    /// (which then take the general formula).
    #[test]
    fn ones_blocks_have_the_bits_of_one_matrix_at_a_time() {
        let mut next = spread(0x9e37_79b9_7f4a_7c15);
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        let same64 = |a: f64, b: f64| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        let cases = [
            (CHUNK, None),
            (37, None),
            (LANES, Some(0.0)),
            (5, Some(f32::NAN)),
            (1000, Some(-1.0)),
            (21, Some(f32::INFINITY)),
        ];
        for (len, odd) in cases {
            let g: Vec<f32> = (0..len)
                .map(|i| next(1e-3, 6.0) * if i % 3 == 0 { -1.0 } else { 1.0 })
                .collect();
            let mut r_old: Vec<f32> = (0..len).map(|_| next(1e-8, 8.0)).collect();
            let c_old: Vec<f32> = (0..len).map(|_| next(1e-8, 8.0)).collect();
            if let Some(v) = odd {
                r_old[len / 2] = v;
            }
            let args = test_args(&r_old, &c_old);
            let (mut r, mut c, mut fac) = (vec![0f32; len], vec![0f32; len], vec![0f32; CHUNK]);
            let (mut lane_u2, mut lane_g2) = ([0f64; LANES], [0f64; LANES]);
            let old = (&r_old[..], &c_old[..]);
            let out = (&mut r[..], &mut c[..]);
            let sums = (&mut lane_u2, &mut lane_g2);
            ones_block(&g, old, &args, out, &mut fac, sums, |_| {});
            let (mut want_u2, mut want_g2) = ([0f64; LANES], [0f64; LANES]);
            for i in 0..len {
                let old = (&r_old[i..i + 1], &c_old[i..i + 1]);
                let (rw, cw, u2, g2) = one_matrix(&g[i..i + 1], (1, 1), old, &args);
                assert!(
                    same(r[i], rw[0]),
                    "{len} matrices, odd {odd:?}, matrix {i}: r"
                );
                assert!(
                    same(c[i], cw[0]),
                    "{len} matrices, odd {odd:?}, matrix {i}: c"
                );
                want_u2[i % LANES] += u2 as f64;
                want_g2[i % LANES] += g2;
            }
            for l in 0..LANES {
                let what = format!("{len} matrices, odd {odd:?}, lane {l}");
                assert!(same64(lane_u2[l], want_u2[l]), "{what}: sum(u^2)");
                assert!(same64(lane_g2[l], want_g2[l]), "{what}: sum(g^2)");
            }
        }
    }

    /// The `1 x 1` factors against [`matrix_factors`] (the general formula), bit for bit,
    /// on regular blocks and on blocks holding a zero, infinite, NaN, negative or subnormal `r`.
    #[test]
    fn ones_factors_have_the_bits_of_the_general_formula() {
        let odd = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NAN,
            -1.0,
            f32::MIN_POSITIVE / 8.0,
            1e-30,
            3e38,
        ];
        for case in 0..=odd.len() {
            let r: Lanes = std::array::from_fn(|l| 0.37 + l as f32 * 1.7);
            let mut r = r;
            if case < odd.len() {
                r[case % LANES] = odd[case];
            }
            let c: Lanes = std::array::from_fn(|l| {
                if l == 3 {
                    odd[case % odd.len()]
                } else {
                    1e-3 * (l as f32 + 1.0)
                }
            });
            let mut fast = [0f32; LANES];
            ones_factors(&r, &c, &mut fast);
            for l in 0..LANES {
                let (mut a, mut b) = ([0f32], [0f32]);
                matrix_factors(&r[l..l + 1], &c[l..l + 1], &mut a, &mut b);
                let want = a[0] * b[0];
                assert_eq!(
                    fast[l].to_bits(),
                    want.to_bits(),
                    "case {case} lane {l}: r {} c {}",
                    r[l],
                    c[l]
                );
            }
        }
    }
}
