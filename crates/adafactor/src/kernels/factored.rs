//! The three passes for a factored variable (rank >= 2: `lead` slices of `n x m`).
//!
//! The factored second moment is Shazeer & Stern (2018), "Adafactor: Adaptive Learning Rates
//! with Sublinear Memory Cost", arXiv:1804.04235, Algorithm 4: row statistics
//! `r = b2 r + (1 - b2) mean_j(g^2 + eps1)`, column statistics `c` likewise, and
//! `v_ij = r_i c_j / mean(r)`, so the update is `g_ij / sqrt(v_ij)`.

use super::after_write::{write_blocks, Tail};
use super::cpu::vectorized;
use super::dispatch::RowLoops;
use super::grad::{decayed_view, Decay, Grad};
use super::parallel::{map_units, parallel_for, rows_per_unit, split_for, with_kept};
use super::reduce::nonfinite_probe;
use super::row_args::new_stat;
pub use super::row_args::{FoldRows, Pass1Rows, Pass1Sums, RowFold, RowUpdate};
use super::store::Rounding;
use crate::state::Factoring;

/// What pass 1 learns about a factored variable.
#[derive(Debug, Clone, PartialEq)]
pub struct Pass1 {
    /// Sum of `g^2` over the last axis, per row (`lead * n`).
    pub row_sums: Vec<f64>,
    /// Sum of `g^2` over the second-to-last axis, per column (`lead * m`).
    pub col_sums: Vec<f64>,
    /// Sum of `g^2` over the whole tensor (for clipnorm and global_clipnorm).
    pub sum_sq_grad: f64,
    /// Sum of `x^2` of the weight after weight decay (for RMS(x)).
    pub sum_sq_x: f64,
    /// False when the unscaled gradient holds NaN or infinity (only checked when asked).
    pub finite: bool,
    /// With a [`RowFold`]: `sum_i g_ij^2 / r_i` per column (`lead * m`), from which
    /// [`sum_sq_update`] gets RMS(u) without pass 2.
    pub weighted_cols: Option<Vec<f64>>,
}

#[derive(Debug, Clone, Copy)]
struct Unit {
    slice: usize,
    row0: usize,
    rows: usize,
}

/// The work units of a factored variable: runs of rows of one slice, fixed by the shape.
fn units(f: Factoring) -> Vec<Unit> {
    let rpu = if split_for(f.len()) {
        rows_per_unit(f.lead * f.n, f.m).min(f.n.max(1))
    } else {
        f.n.max(1)
    };
    let mut out = Vec::new();
    for slice in 0..f.lead {
        let mut r = 0;
        while r < f.n {
            let rows = rpu.min(f.n - r);
            out.push(Unit {
                slice,
                row0: slice * f.n + r,
                rows,
            });
            r += rows;
        }
    }
    out
}

/// Where pass 1 adds the sums of rows from `first_row` on.
#[inline(always)]
fn sums_into<'a>(
    fold: Option<RowFold<'a>>,
    first_row: usize,
    col: &'a mut [f32],
    (w, squares): (&'a mut [f32], &'a mut [f32]),
    row_sums: &'a mut Vec<f64>,
    probe: &'a mut f32,
) -> Pass1Sums<'a> {
    Pass1Sums {
        col,
        fold: fold.map(|fold| FoldRows {
            fold,
            first_row,
            w,
            squares,
        }),
        row_sums,
        probe,
    }
}

/// Rows per block of pass 1's float32 fast path.
const BLOCK_ROWS: usize = 64;

/// `acc += part` elementwise, widening to f64.
#[inline(always)]
fn add_into(acc: &mut [f64], part: &[f32]) {
    for (a, p) in acc.iter_mut().zip(part) {
        *a += *p as f64;
    }
}

/// Sum of squares of `g` while adding each square into `col`. The squares are float32, as
/// Keras computes them; the sums are f64, so a row or column of large finite squares whose
/// float32 sum would overflow still has a finite mean (also the few-row kernel's fallback when
/// its float32 sums overflow).
#[inline(always)]
pub(crate) fn row_sq_and_cols(g: &[f32], col: &mut [f64]) -> f64 {
    let mut lanes = [0f64; 4];
    let mut gi = g.chunks_exact(4);
    let mut ci = col.chunks_exact_mut(4);
    for (gc, cc) in (&mut gi).zip(&mut ci) {
        for l in 0..4 {
            let e2 = (gc[l] * gc[l]) as f64;
            lanes[l] += e2;
            cc[l] += e2;
        }
    }
    let mut total: f64 = lanes.iter().sum();
    for (g, c) in gi.remainder().iter().zip(ci.into_remainder()) {
        let e2 = (g * g) as f64;
        total += e2;
        *c += e2;
    }
    total
}

/// One work unit's pass-1 sums.
#[derive(Debug, Default)]
struct UnitSums {
    /// Sum of `g^2` per row of the unit.
    rows: Vec<f64>,
    /// Sum of `g^2` per column.
    col: Vec<f64>,
    /// With a fold, `sum_i g_ij^2 / r_i` per column (empty without).
    wcol: Vec<f64>,
    /// Sum of `g^2`.
    se: f64,
    /// Sum of `x^2` after weight decay.
    sx: f64,
    /// Zero when the gradient is finite (or was not checked).
    probe: f32,
}

/// A unit's working buffers: converted rows and the float32 block sums.
#[derive(Debug, Default)]
struct UnitWork {
    gbuf: Vec<f32>,
    xbuf: Vec<f32>,
    block: Vec<f32>,
}

/// What a thread keeps from one small variable to the next: with thousands of small tensors,
/// allocating a unit's buffers and sums for each costs as much as reading it.
#[derive(Debug, Default)]
struct Scratch {
    work: UnitWork,
    sums: UnitSums,
    factors: Factors,
}

/// Pass 3's factors and `mean(r)` per slice, when the [`Prepared`] left them out.
#[derive(Debug, Default)]
struct Factors {
    row_factor: Vec<f32>,
    col_factor: Vec<f32>,
    row_mean: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// Runs `f` on this thread's [`Scratch`] (taken out meanwhile, so a nested call gets a fresh one).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    with_kept(&SCRATCH, f)
}

/// Pass 1's inputs, shared by its units.
struct Pass1In<'a, 'g, T> {
    grad: &'a Grad<'g, T>,
    x: &'a [T],
    decay: Option<Decay>,
    m: usize,
    check_finite: bool,
    fold: Option<RowFold<'a>>,
}

impl<T: RowLoops> Pass1In<'_, '_, T> {
    /// Pass 1 over unit `u`, its sums written to `out` (whose buffers are reused).
    #[inline(always)]
    fn unit(&self, u: Unit, work: &mut UnitWork, out: &mut UnitSums) {
        let Pass1In {
            grad,
            x,
            decay,
            m,
            check_finite,
            fold,
        } = *self;
        let probe_rows = check_finite && grad.transform.clip_value.is_some();
        let UnitWork { gbuf, xbuf, block } = work;
        let UnitSums {
            rows,
            col,
            wcol,
            se,
            sx,
            probe,
        } = out;
        rows.clear();
        rows.reserve(u.rows);
        col.clear();
        col.resize(m, 0.0);
        wcol.clear();
        wcol.resize(if fold.is_some() { m } else { 0 }, 0.0);
        // Float32 column sums of a block, and with a fold its weighted column sums and two
        // rows of squares: one buffer.
        block.clear();
        block.resize(m + 3 * wcol.len(), 0.0);
        let (col32, rest) = block.split_at_mut(m);
        let (wcol32, squares) = rest.split_at_mut(wcol.len());
        (*se, *sx, *probe) = (0.0, 0.0, 0.0);
        let mut k0 = 0;
        while k0 < u.rows {
            let block = BLOCK_ROWS.min(u.rows - k0);
            // Fast path: float32 sums over a block of rows, added into the f64 totals.
            col32.fill(0.0);
            wcol32.fill(0.0);
            let first = u.row0 + k0;
            if T::in_registers() {
                // Gradient and weight converted (and the gradient transformed) in
                // registers, one sweep over both.
                let (b0, b1) = (first * m, (first + block) * m);
                let rows_in = Pass1Rows {
                    g: grad.slice(b0, b1),
                    x: &x[b0..b1],
                    m,
                    decay,
                };
                // Clamping would hide an infinity from the sums: the rows probe the
                // unscaled gradient.
                let mut row_probe = 0f32;
                *sx += T::pass1_rows(
                    rows_in,
                    sums_into(
                        fold,
                        first,
                        &mut *col32,
                        (&mut *wcol32, &mut *squares),
                        rows,
                        &mut row_probe,
                    ),
                );
                if probe_rows {
                    *probe += row_probe;
                }
            } else {
                gbuf.resize(m, 0.0);
                xbuf.resize(m, 0.0);
                for row in first..first + block {
                    let base = row * m;
                    let g = if probe_rows {
                        // Clamping would hide an infinity from the sums: probe before it.
                        *probe += grad.load_checked(base, gbuf);
                        &gbuf[..]
                    } else {
                        grad.view(base, gbuf)
                    };
                    let xv = decayed_view(&x[base..base + m], decay, xbuf);
                    let rows_in = Pass1Rows {
                        g: Grad::plain(g),
                        x: xv,
                        m,
                        decay: None,
                    };
                    *sx += f32::pass1_rows(
                        rows_in,
                        sums_into(
                            fold,
                            row,
                            &mut *col32,
                            (&mut *wcol32, &mut *squares),
                            rows,
                            &mut 0.0,
                        ),
                    );
                }
            }
            let mut ok = rows[k0..].iter().all(|r| r.is_finite());
            ok &= nonfinite_probe(col32) + nonfinite_probe(wcol32) == 0.0;
            if ok {
                add_into(col, col32);
                add_into(wcol, wcol32);
            } else {
                // Rare: float32 partial sums overflowed (huge but finite squares) or the
                // gradient is not finite. Redo the block in f64, from cache.
                rows.truncate(k0);
                gbuf.resize(m, 0.0);
                for k in k0..k0 + block {
                    let row = u.row0 + k;
                    let base = row * m;
                    let g = grad.view(base, gbuf);
                    let rs = row_sq_and_cols(g, col);
                    if let Some(fold) = fold {
                        let inv_r = fold.inv_r(row, rs, m);
                        for (w, g) in wcol.iter_mut().zip(g) {
                            *w += (g * g) as f64 * inv_r;
                        }
                    }
                    rows.push(rs);
                    if check_finite && !probe_rows && !rs.is_finite() {
                        // Decide on the unscaled values themselves: a NaN or infinity, or only a
                        // finite value whose square overflows.
                        *probe += grad.load_checked(base, gbuf);
                    }
                }
            }
            k0 += block;
        }
        *se += rows.iter().sum::<f64>();
    }
}

/// The single work unit of a variable too small to split, if it is one.
fn single_unit(f: Factoring) -> Option<Unit> {
    (f.lead == 1 && !split_for(f.len())).then_some(Unit {
        slice: 0,
        row0: 0,
        rows: f.n,
    })
}

/// Pass 1: row and column sums of the effective gradient squared, the weight's sum of squares
/// after weight decay, and (when `check_finite`) whether the gradient is finite.
pub fn pass1<T: RowLoops>(
    grad: &Grad<'_, T>,
    x: &[T],
    decay: Option<Decay>,
    f: Factoring,
    check_finite: bool,
    fold: Option<RowFold<'_>>,
) -> Pass1 {
    let m = f.m;
    let job = Pass1In {
        grad,
        x,
        decay,
        m,
        check_finite,
        fold,
    };
    let mut outs = match single_unit(f) {
        // One unit (a small matrix): its sums are the result, no copy.
        Some(u) => {
            let sums = vectorized(
                #[inline(always)]
                || with_scratch(|s| run_unit(&job, u, &mut s.work)),
            );
            vec![(u, sums)]
        }
        None => {
            let parallel = parallel_for(f.len());
            map_units(
                units(f),
                parallel,
                #[inline(always)]
                |u| (u, with_scratch(|s| run_unit(&job, u, &mut s.work))),
            )
        }
    };
    if f.lead == 1 && outs.len() == 1 {
        if let Some((_, s)) = outs.pop() {
            return Pass1 {
                row_sums: s.rows,
                col_sums: s.col,
                sum_sq_grad: s.se,
                sum_sq_x: s.sx,
                finite: s.probe == 0.0,
                weighted_cols: fold.map(|_| s.wcol),
            };
        }
    }
    let mut out = Pass1 {
        row_sums: vec![0.0; f.lead * f.n],
        col_sums: vec![0.0; f.lead * m],
        sum_sq_grad: 0.0,
        sum_sq_x: 0.0,
        finite: true,
        weighted_cols: fold.map(|_| vec![0.0; f.lead * m]),
    };
    for (u, s) in outs {
        if let Some(w) = out.weighted_cols.as_mut() {
            for (a, b) in w[u.slice * m..(u.slice + 1) * m].iter_mut().zip(&s.wcol) {
                *a += b;
            }
        }
        out.row_sums[u.row0..u.row0 + u.rows].copy_from_slice(&s.rows);
        for (a, b) in out.col_sums[u.slice * m..(u.slice + 1) * m]
            .iter_mut()
            .zip(&s.col)
        {
            *a += b;
        }
        out.sum_sq_grad += s.se;
        out.sum_sq_x += s.sx;
        out.finite &= s.probe == 0.0;
    }
    out
}

/// One unit's sums in buffers of its own (they are the unit's result).
#[inline(always)]
fn run_unit<T: RowLoops>(job: &Pass1In<'_, '_, T>, u: Unit, work: &mut UnitWork) -> UnitSums {
    let mut sums = UnitSums::default();
    job.unit(u, work, &mut sums);
    sums
}

/// The statistics update of a factored variable folded into pass 1 (without norm clipping):
/// what the write pass needs and the sums the step's scalars need.
#[derive(Debug, Clone, PartialEq)]
pub struct Folded {
    /// New statistics and the factors of `1/sqrt(v)`.
    pub prepared: Prepared,
    /// `sum(u^2)`, for RMS(u).
    pub sum_sq_update: f64,
    /// Sum of `g^2` over the whole tensor.
    pub sum_sq_grad: f64,
    /// Sum of `x^2` of the weight after weight decay.
    pub sum_sq_x: f64,
    /// False when the gradient holds NaN or infinity (only checked when asked).
    pub finite: bool,
}

/// [`pass1`] with `fold`, then [`prepare`] and [`sum_sq_update`] with a gradient scale of 1:
/// the same bits. A variable too small to split keeps its pass-1 sums in a per-thread scratch,
/// so that thousands of small tensors do not allocate them each.
pub fn pass1_folded<T: RowLoops>(
    grad: &Grad<'_, T>,
    x: &[T],
    decay: Option<Decay>,
    f: Factoring,
    check_finite: bool,
    fold: RowFold<'_>,
    c_old: &[f32],
) -> Folded {
    let (beta2, eps1) = (fold.beta2, fold.epsilon_1);
    let job = Pass1In {
        grad,
        x,
        decay,
        m: f.m,
        check_finite,
        fold: Some(fold),
    };
    if slice_units(f) {
        return slices_folded(&job, f, fold, c_old);
    }
    let Some(u) = single_unit(f).filter(|_| f.strided.is_none()) else {
        let p1 = pass1(grad, x, decay, f, check_finite, Some(fold));
        let prepared = prepare(&p1, fold.r_old, c_old, f, beta2, eps1, 1.0);
        let sum_sq_update = match sum_sq_update(&p1, &prepared, f) {
            Some(s) => s,
            None => pass2(grad, &prepared, f, 1.0),
        };
        return Folded {
            prepared,
            sum_sq_update,
            sum_sq_grad: p1.sum_sq_grad,
            sum_sq_x: p1.sum_sq_x,
            finite: p1.finite,
        };
    };
    with_scratch(|s| {
        vectorized(
            #[inline(always)]
            || {
                job.unit(u, &mut s.work, &mut s.sums);
                let sums = &s.sums;
                let rc = (&sums.rows[..], &sums.col[..]);
                let (r, c) = new_stats(rc, (fold.r_old, c_old), f, (beta2, eps1, 1.0));
                s.factors.row_mean.resize(f.lead, 0.0);
                row_means(&r, f, &mut s.factors.row_mean);
                let sum_sq_update = weighted_sum(&sums.wcol, &c, f.m, &s.factors.row_mean);
                Folded {
                    // The factors are left to pass 3: a tensor's buffers that live from this
                    // stage to the write cost as much as computing them there.
                    prepared: Prepared {
                        r,
                        c,
                        row_factor: Vec::new(),
                        col_factor: Vec::new(),
                        row_mean: Vec::new(),
                    },
                    sum_sq_update,
                    sum_sq_grad: sums.se,
                    sum_sq_x: sums.sx,
                    finite: sums.probe == 0.0,
                }
            },
        )
    })
}

/// Whether [`units`] makes exactly one work unit of each of several slices (a batch of small
/// matrices, `[10000, 64, 64]`), which [`slices_folded`] then runs slice by slice.
fn slice_units(f: Factoring) -> bool {
    let whole = !split_for(f.len()) || rows_per_unit(f.lead * f.n, f.m) >= f.n;
    f.lead > 1 && f.n > 0 && f.m > 0 && f.strided.is_none() && whole
}

/// [`pass1_folded`] of a batch of matrices that are one work unit each ([`slice_units`]): each
/// slice runs as a small matrix does, in the thread's scratch, and its statistics, factors and
/// share of `sum(u^2)` are computed in the same job, jobs of whole slices in parallel. Every
/// value is a slice's own and the slices' sums are added in slice order, so the bits are those
/// of [`pass1`], [`prepare`] and [`sum_sq_update`] on any number of threads. (Through those,
/// the statistics of thousands of slices were updated in one thread after the parallel pass:
/// a fifth of the step of `[10000, 64, 64]`.)
fn slices_folded<T: RowLoops>(
    job: &Pass1In<'_, '_, T>,
    f: Factoring,
    fold: RowFold<'_>,
    c_old: &[f32],
) -> Folded {
    let (n, m) = (f.n, f.m);
    let one = Factoring { lead: 1, ..f };
    let update = (fold.beta2, fold.epsilon_1, 1.0);
    let mut prepared = Prepared::zeroed(f);
    // Per slice: sum of g^2, sum of x^2, the finiteness probe and its share of sum(u^2).
    let parts = map_units(
        prepared.shares(f),
        parallel_for(f.len()),
        #[inline(always)]
        |(first, (r, c, means, a, b))| {
            with_scratch(|s| {
                let Scratch { work, sums, .. } = s;
                let mut out = Vec::with_capacity(means.len());
                for (k, mean) in means.iter_mut().enumerate() {
                    let slice = first + k;
                    let u = Unit {
                        slice,
                        row0: slice * n,
                        rows: n,
                    };
                    job.unit(u, work, sums);
                    let (rows, cols) = (k * n..(k + 1) * n, k * m..(k + 1) * m);
                    let olds = (
                        &fold.r_old[slice * n..(slice + 1) * n],
                        &c_old[slice * m..(slice + 1) * m],
                    );
                    let out_k = (
                        &mut r[rows.clone()],
                        &mut c[cols.clone()],
                        std::slice::from_mut(mean),
                        &mut a[rows],
                        &mut b[cols.clone()],
                    );
                    prepare_into((&sums.rows, &sums.col), olds, one, update, out_k);
                    let u2 = weighted_sum(&sums.wcol, &c[cols], m, &[*mean]);
                    out.push((sums.se, sums.sx, sums.probe, u2));
                }
                out
            })
        },
    );
    let (mut sum_sq_grad, mut sum_sq_x, mut finite) = (0f64, 0f64, true);
    let mut shares = Vec::with_capacity(f.lead);
    for (se, sx, probe, u2) in parts.into_iter().flatten() {
        sum_sq_grad += se;
        sum_sq_x += sx;
        finite &= probe == 0.0;
        shares.push(u2);
    }
    Folded {
        prepared,
        // As `weighted_sum` adds the slices' shares.
        sum_sq_update: shares.into_iter().sum(),
        sum_sq_grad,
        sum_sq_x,
        finite,
    }
}

/// New statistics and the per-row and per-column factors of `1/sqrt(v)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// New row statistics `r` (`lead * n`).
    pub r: Vec<f32>,
    /// New column statistics `c` (`lead * m`).
    pub c: Vec<f32>,
    /// `a_i = sqrt(mean(r) / r_i)`, the row factor of `1/sqrt(v_ij)`. Empty, with
    /// `col_factor` and `row_mean`, when [`pass1_folded`] left them to [`pass3`], which then
    /// computes them from `r` and `c`.
    pub row_factor: Vec<f32>,
    /// `b_j = 1 / sqrt(c_j)`, the column factor of `1/sqrt(v_ij)`.
    pub col_factor: Vec<f32>,
    /// `mean(r)` per leading slice.
    pub row_mean: Vec<f32>,
}

impl Prepared {
    /// Zeroed statistics and factors for `f`'s shape.
    fn zeroed(f: Factoring) -> Prepared {
        Prepared {
            r: vec![0f32; f.lead * f.n],
            c: vec![0f32; f.lead * f.m],
            row_factor: vec![0f32; f.lead * f.n],
            col_factor: vec![0f32; f.lead * f.m],
            row_mean: vec![0f32; f.lead],
        }
    }

    /// The fields split into jobs of whole slices, about a work unit's elements each (all of
    /// them in one job when a slice is empty), each with the index of its first slice.
    fn shares(&mut self, f: Factoring) -> Vec<(usize, PreparedShare<'_>)> {
        let (n, m) = (f.n, f.m);
        let Prepared {
            r,
            c,
            row_factor,
            col_factor,
            row_mean,
        } = self;
        if n == 0 || m == 0 {
            return vec![(
                0,
                (
                    &mut r[..],
                    &mut c[..],
                    &mut row_mean[..],
                    &mut row_factor[..],
                    &mut col_factor[..],
                ),
            )];
        }
        let per = (super::parallel::UNIT_ELEMS / (n * m)).max(1);
        r.chunks_mut(per * n)
            .zip(c.chunks_mut(per * m))
            .zip(row_mean.chunks_mut(per))
            .zip(row_factor.chunks_mut(per * n))
            .zip(col_factor.chunks_mut(per * m))
            .enumerate()
            .map(|(k, ((((r, c), mean), a), b))| (k * per, (r, c, mean, a, b)))
            .collect()
    }
}

/// The O(n + m) statistics update: `r = b2 r + (1 - b2) mean_j(q)`, `c` likewise with
/// `q = (s g)^2 + eps1`, `s` the norm-clipping scale; then `v_ij = r_i c_j / mean(r)` in
/// factored form.
pub fn prepare(
    p1: &Pass1,
    r_old: &[f32],
    c_old: &[f32],
    f: Factoring,
    beta2: f32,
    epsilon_1: f32,
    grad_scale: f32,
) -> Prepared {
    let sums = (&p1.row_sums[..], &p1.col_sums[..]);
    let update = (beta2, epsilon_1, grad_scale);
    let (n, m) = (f.n, f.m);
    let mut out = Prepared::zeroed(f);
    // A batch of matrices runs in jobs of whole slices, in parallel (every value is per element
    // or per slice, so the bits do not depend on the jobs); square roots and divisions
    // vectorised: per row and column, this is most of a small matrix's cost outside the passes.
    map_units(
        out.shares(f),
        parallel_for(f.len()),
        #[inline(always)]
        |(first, share)| {
            let k = share.2.len();
            let (rows, cols) = (first * n..(first + k) * n, first * m..(first + k) * m);
            let sums = (&sums.0[rows.clone()], &sums.1[cols.clone()]);
            let olds = (&r_old[rows], &c_old[cols]);
            prepare_into(sums, olds, Factoring { lead: k, ..f }, update, share);
        },
    );
    out
}

/// The new statistics `r` and `c` from pass 1's row and column sums;
/// `(beta2, epsilon_1, grad_scale)` are the update's scalars.
#[inline(always)]
fn new_stats(
    (row_sums, col_sums): (&[f64], &[f64]),
    (r_old, c_old): (&[f32], &[f32]),
    f: Factoring,
    (beta2, epsilon_1, grad_scale): (f32, f32, f32),
) -> (Vec<f32>, Vec<f32>) {
    let mut r = vec![0f32; row_sums.len().min(r_old.len())];
    let mut c = vec![0f32; col_sums.len().min(c_old.len())];
    let update = (beta2, epsilon_1, grad_scale);
    new_stats_into(
        (row_sums, col_sums),
        (r_old, c_old),
        f,
        update,
        (&mut r, &mut c),
    );
    (r, c)
}

/// [`new_stats`] into `r` and `c`.
#[inline(always)]
fn new_stats_into(
    (row_sums, col_sums): (&[f64], &[f64]),
    (r_old, c_old): (&[f32], &[f32]),
    f: Factoring,
    (beta2, epsilon_1, grad_scale): (f32, f32, f32),
    (r, c): (&mut [f32], &mut [f32]),
) {
    let s2 = (grad_scale as f64) * (grad_scale as f64);
    for ((r, s), old) in r.iter_mut().zip(row_sums).zip(r_old) {
        *r = new_stat(*old, *s, f.m, beta2, epsilon_1, s2);
    }
    for ((c, s), old) in c.iter_mut().zip(col_sums).zip(c_old) {
        *c = new_stat(*old, *s, f.n, beta2, epsilon_1, s2);
    }
}

/// Some slices' share of [`Prepared`]'s fields: `r`, `c`, `row_mean`, `row_factor`,
/// `col_factor`.
type PreparedShare<'a> = (
    &'a mut [f32],
    &'a mut [f32],
    &'a mut [f32],
    &'a mut [f32],
    &'a mut [f32],
);

/// The statistics and factors of the `f.lead` slices whose sums are given, written to their
/// share of [`Prepared`]'s fields: what [`prepare`] computes, for some slices of a batch.
#[inline(always)]
fn prepare_into(
    sums: (&[f64], &[f64]),
    olds: (&[f32], &[f32]),
    f: Factoring,
    update: (f32, f32, f32),
    (r, c, mean, a, b): PreparedShare<'_>,
) {
    new_stats_into(sums, olds, f, update, (&mut *r, &mut *c));
    means_and_factors_into(r, c, f, mean, (a, b));
}

/// `mean(r)` per slice into `out` (`lead` values).
#[inline(always)]
fn row_means(r: &[f32], f: Factoring, out: &mut [f32]) {
    out.fill(0.0);
    if f.n > 0 {
        for (rs, mean) in r.chunks(f.n).zip(out.iter_mut()) {
            *mean = (rs.iter().map(|v| *v as f64).sum::<f64>() / f.n as f64) as f32;
        }
    }
}

/// `mean(r)` per slice into `row_mean`, and the factors of `1/sqrt(v_ij) = a_i b_j`:
/// `a_i = sqrt(mean(r) / r_i)` into `row_factor`, `b_j = 1 / sqrt(c_j)` into `col_factor`. The
/// column factors come first: independent of the means, their divisions and square roots run
/// while each mean's one-after-another sum does (BENCHMARKS.md, 2026-12-05 12:30 UTC).
#[inline(always)]
fn means_and_factors_into(
    r: &[f32],
    c: &[f32],
    f: Factoring,
    row_mean: &mut [f32],
    (row_factor, col_factor): (&mut [f32], &mut [f32]),
) {
    for (b, cj) in col_factor.iter_mut().zip(c) {
        *b = (1.0 / (*cj as f64).sqrt()) as f32;
    }
    row_means(r, f, row_mean);
    if f.n > 0 {
        for ((rs, af), mean) in r
            .chunks(f.n)
            .zip(row_factor.chunks_mut(f.n))
            .zip(&*row_mean)
        {
            for (a, ri) in af.iter_mut().zip(rs) {
                *a = (*mean as f64 / *ri as f64).sqrt() as f32;
            }
        }
    }
}

/// `sum(u^2)` as the element-wise sum `sum((g_ij a_i b_j)^2)` has it, from a fold's `sum_u2`
/// and the new statistics `r` and `c`. The two differ only when the statistics overflowed: a
/// fold computes `mean(r) * sum_j w_j / c_j` with `w_j = sum_i g_ij^2 / r_i`, which is `inf`
/// where a row of `r_i = inf` makes `mean(r) = inf`, while element by element that row's
/// `a_i = sqrt(inf / inf)` is NaN and so is the sum (a slice of zero `r`, or a NaN `r_i` or
/// `c_j`, likewise). The composed path and Keras take RMS(u) element by element, so a NaN
/// there must be a NaN here too: `max(1, NaN)` and `max(1, inf)` clip differently. Only a
/// non-finite `sum_u2` is looked at, so a finite step pays nothing.
pub(crate) fn elementwise_sum_sq_update(sum_u2: f64, r: &[f32], c: &[f32], f: Factoring) -> f64 {
    if sum_u2.is_finite() || f.n == 0 {
        return sum_u2;
    }
    let undefined_row = r
        .chunks(f.n)
        .any(|rs| rs.iter().all(|v| *v == 0.0) || rs.iter().any(|v| !v.is_finite()));
    if undefined_row || c.iter().any(|v| v.is_nan()) {
        f64::NAN
    } else {
        sum_u2
    }
}

/// `sum(u^2)` from pass 1's [`RowFold`] sums, when it ran with one: pass 2 is then not needed.
pub fn sum_sq_update(p1: &Pass1, p: &Prepared, f: Factoring) -> Option<f64> {
    let w = p1.weighted_cols.as_ref()?;
    Some(weighted_sum(w, &p.c, f.m, &p.row_mean))
}

/// `sum(u^2) = sum over slices of mean(r) sum_h w_h / q_h`: `w` a fold's weighted sums and `q`
/// the new statistics of the same axis, `per` of each per slice (the row fold's weighted column
/// sums against `c`; the strided and short-row kernels' own folds likewise).
pub(crate) fn weighted_sum(w: &[f64], q: &[f32], per: usize, row_mean: &[f32]) -> f64 {
    if per == 0 {
        return 0.0;
    }
    w.chunks(per)
        .zip(q.chunks(per))
        .zip(row_mean)
        .map(|((ws, qs), mean)| {
            let per_stat: f64 = ws.iter().zip(qs).map(|(w, q)| w / *q as f64).sum();
            *mean as f64 * per_stat
        })
        .sum()
}

/// Pass 2: `sum(u^2)` with `u_ij = (s g_ij) b_j a_i`, for RMS(u). The scale is applied first,
/// as clipping does, so that a clipped huge gradient cannot overflow.
pub fn pass2<T: RowLoops>(grad: &Grad<'_, T>, p: &Prepared, f: Factoring, grad_scale: f32) -> f64 {
    let m = f.m;
    let parallel = parallel_for(f.len());
    let sums = map_units(
        units(f),
        parallel,
        #[inline(always)]
        |u| {
            let b = &p.col_factor[u.slice * m..(u.slice + 1) * m];
            let a = &p.row_factor[u.row0..u.row0 + u.rows];
            if T::in_registers() {
                let g = grad.slice(u.row0 * m, (u.row0 + u.rows) * m);
                return T::pass2_rows(g, b, a, grad_scale);
            }
            let mut gbuf = vec![0f32; m];
            let mut total = 0f64;
            for (k, ak) in a.chunks(1).enumerate() {
                let g = grad.view((u.row0 + k) * m, &mut gbuf);
                total += f32::pass2_rows(Grad::plain(g), b, ak, grad_scale);
            }
            total
        },
    );
    sums.iter().sum::<f64>()
}

/// Pass 3's inputs, shared by its chunks.
struct Pass3<'a> {
    row_factor: &'a [f32],
    col_factor: &'a [f32],
    f: Factoring,
    coef: f32,
    grad_scale: f32,
    decay: Option<Decay>,
    rounding: Rounding,
}

impl Pass3<'_> {
    /// Updates whole rows starting at `first_row`, `grad` being the gradient of these rows only.
    #[inline(always)]
    fn rows<T: RowLoops>(&self, first_row: usize, xs: &mut [T], grad: &Grad<'_, T>) {
        let m = self.f.m;
        let u = RowUpdate {
            col_factor: self.col_factor,
            row_factor: self.row_factor,
            n: self.f.n,
            m,
            coef: self.coef,
            grad_scale: self.grad_scale,
            decay: self.decay,
            rounding: self.rounding,
        };
        if T::in_registers() {
            T::update_rows(xs, grad.slice(0, xs.len()), first_row, &u);
            return;
        }
        let (mut gbuf, mut xbuf) = (vec![0f32; m], vec![0f32; m]);
        for (k, xrow) in xs.chunks_mut(m).enumerate() {
            let row = first_row + k;
            let g = grad.view(k * m, &mut gbuf);
            if let Some(xf) = T::as_f32_mut(xrow) {
                f32::update_rows(xf, Grad::plain(g), row, &u);
                continue;
            }
            T::load(xrow, &mut xbuf);
            f32::update_rows(&mut xbuf, Grad::plain(g), row, &u);
            self.rounding.store_slice(&xbuf, xrow, (row * m) as u64);
        }
    }
}

/// Pass 3: `x = decay(x) - coef * a_i * (s g_ij) * b_j`, with `coef = alpha / max(1, RMS(u)/d)`,
/// rounded into the weight by `rounding`.
#[allow(clippy::too_many_arguments)]
pub fn pass3<T: RowLoops>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    p: &Prepared,
    f: Factoring,
    coef: f32,
    grad_scale: f32,
    decay: Option<Decay>,
    rounding: Rounding,
) {
    let tail = Tail::default();
    pass3_then(x, grad, p, f, coef, grad_scale, decay, rounding, tail);
}

/// [`pass3`], each block of rows followed by its [`Tail`] (EMA, overwrite, accumulator
/// zeroing) while it is in cache.
#[allow(clippy::too_many_arguments)]
pub fn pass3_then<T: RowLoops>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    p: &Prepared,
    f: Factoring,
    coef: f32,
    grad_scale: f32,
    decay: Option<Decay>,
    rounding: Rounding,
    tail: Tail<'_>,
) {
    let m = f.m;
    if m == 0 || f.n == 0 {
        tail.finish(x);
        return;
    }
    let parallel = parallel_for(f.len());
    let rows_chunk = if parallel {
        rows_per_unit(f.lead * f.n, m)
    } else {
        f.lead * f.n
    };
    let run = |row_factor: &[f32], col_factor: &[f32]| {
        let job = Pass3 {
            row_factor,
            col_factor,
            f,
            coef,
            grad_scale,
            decay,
            rounding: rounding.for_type::<T>(),
        };
        let body = |start: usize, xs: &mut [T], grad: &Grad<'_, T>| job.rows(start / m, xs, grad);
        write_blocks(x, grad, m, rows_chunk * m, parallel, tail, body);
    };
    if p.row_factor.len() == p.r.len() && p.col_factor.len() == p.c.len() {
        return run(&p.row_factor, &p.col_factor);
    }
    // Factors left out by `pass1_folded`: computed here, in this thread's scratch.
    with_scratch(|s| {
        let Factors {
            row_factor,
            col_factor,
            row_mean,
        } = &mut s.factors;
        row_mean.resize(f.lead, 0.0);
        row_factor.resize(p.r.len(), 0.0);
        col_factor.resize(p.c.len(), 0.0);
        vectorized(
            #[inline(always)]
            || {
                means_and_factors_into(&p.r, &p.c, f, row_mean, (row_factor, col_factor));
            },
        );
        run(row_factor, col_factor)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large matrix's pass 1 (with and without the row fold) gives the same bits on 1, 2 and
    /// 3 threads: its work units, and the order in which their partial sums are added, come
    /// from the shape alone. The gradient spans forty binary orders of magnitude, so that
    /// adding the same partial sums in another grouping rounds differently.
    #[test]
    fn pass1_gives_the_same_bits_on_any_thread_count() {
        let f = Factoring::of(&[1024, 2048]).expect("a matrix");
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let g: Vec<f32> = (0..f.len())
            .map(|_| {
                let w = next();
                let unit = (w >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                unit * 2f32.powi((w % 41) as i32 - 20)
            })
            .collect();
        let x: Vec<f32> = g.iter().map(|v| v * 0.5 + 0.25).collect();
        let r_old = vec![0.5f32; f.n];
        let grad = Grad::plain(&g[..]);
        let bits = |p: &Pass1| {
            let w = p.weighted_cols.clone().unwrap_or_default();
            let all: Vec<u64> = (p.row_sums.iter().chain(&p.col_sums).chain(&w))
                .chain([p.sum_sq_grad, p.sum_sq_x].iter())
                .map(|v| v.to_bits())
                .collect();
            all
        };
        for fold in [false, true] {
            let runs: Vec<Vec<u64>> = [1, 2, 3]
                .iter()
                .map(|&threads| {
                    let row_fold = fold.then_some(RowFold {
                        r_old: &r_old,
                        beta2: 0.5,
                        epsilon_1: 1e-30,
                    });
                    super::super::parallel::on_threads(threads, || {
                        bits(&pass1(&grad, &x, None, f, true, row_fold))
                    })
                })
                .collect();
            assert!(runs[1] == runs[0], "fold {fold}: 2 threads differ from 1");
            assert!(runs[2] == runs[0], "fold {fold}: 3 threads differ from 1");
        }
    }

    /// [`pass1_folded`] gives the bits of [`pass1`] with the fold, [`prepare`] and
    /// [`sum_sq_update`], on a matrix too small to split (whose factors it leaves to pass 3),
    /// on one split into work units and on batches of matrices run slice by slice (small, and
    /// large enough for parallel jobs, on 1 and 3 threads); pass 3 then writes the same weights
    /// from either.
    #[test]
    fn pass1_folded_gives_the_bits_of_the_three_steps() {
        let shapes: [&[usize]; 5] = [
            &[48, 40],
            &[300, 256],
            &[5, 8, 12],
            &[700, 24, 40],
            &[3, 2, 7, 9],
        ];
        for (shape, threads) in shapes.iter().flat_map(|s| [(*s, 1), (*s, 3)]) {
            super::super::parallel::on_threads(threads, || folded_against_three_steps(shape));
        }
    }

    /// A row statistic that overflowed to `inf` in an earlier step (a gradient above 1.9e19
    /// squares past float32's range) stays `inf`: the row fold's `sum(u^2)` is `inf`, the
    /// element-wise sum over `u_ij = g_ij a_i b_j` is NaN (the overflowed row has
    /// `a_i = sqrt(inf / inf)`), and RMS(u) must follow the element-wise sum, as the composed
    /// path computes it. With finite statistics the fold is
    /// kept as it is, and an `inf` fold with only finite factors stays `inf`.
    #[test]
    fn overflowed_statistics_give_the_element_wise_sum() {
        let f = Factoring::of(&[2, 4]).expect("a matrix");
        let g = [3e18f32, -4e18, 5e18, 1e18, -2e18, -6e18, 3e18, 9e18];
        let x = [0.5f32; 8];
        let grad = Grad::plain(&g[..]);
        let (r_old, c_old) = (
            [6e37f32, f32::INFINITY],
            [4e37f32, 7e37, 1e38, f32::INFINITY],
        );
        let fold = RowFold {
            r_old: &r_old,
            beta2: 0.5,
            epsilon_1: 1e-30,
        };
        let p1 = pass1(&grad, &x, None, f, true, Some(fold));
        let prep = prepare(&p1, &r_old, &c_old, f, 0.5, 1e-30, 1.0);
        let folded = sum_sq_update(&p1, &prep, f).expect("a fold");
        let mut elementwise = 0f64;
        for i in 0..f.n {
            for j in 0..f.m {
                let u = g[i * f.m + j] * prep.row_factor[i] * prep.col_factor[j];
                elementwise += (u as f64) * (u as f64);
            }
        }
        assert!(elementwise.is_nan(), "element-wise {elementwise}");
        assert_eq!(folded, f64::INFINITY, "the fold alone");
        let got = elementwise_sum_sq_update(folded, &prep.r, &prep.c, f);
        assert!(got.is_nan(), "{got}");
        // Finite statistics: the fold is returned as it is, finite or not.
        let (r, c) = ([1.0f32, 0.0], [1.0f32; 4]);
        assert_eq!(elementwise_sum_sq_update(2.5, &r, &c, f), 2.5);
        assert_eq!(
            elementwise_sum_sq_update(f64::INFINITY, &r, &c, f),
            f64::INFINITY
        );
        // A slice of zero `r` (0 / 0) or a NaN column statistic is NaN.
        assert!(elementwise_sum_sq_update(f64::INFINITY, &[0.0; 2], &c, f).is_nan());
        let c_nan = [1.0, f32::NAN, 1.0, 1.0];
        assert!(elementwise_sum_sq_update(f64::INFINITY, &r, &c_nan, f).is_nan());
    }

    /// A gradient and old statistics for `f`, every slice's values different.
    fn batch_inputs(f: Factoring) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let g = (0..f.len())
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-3)
            .collect();
        let r_old = (0..f.lead * f.n)
            .map(|i| 0.5 + (i % 97) as f32 * 1e-3)
            .collect();
        let c_old = (0..f.lead * f.m)
            .map(|j| 0.25 + (j % 89) as f32 * 1e-3)
            .collect();
        (g, r_old, c_old)
    }

    fn folded_against_three_steps(shape: &[usize]) {
        {
            let f = Factoring::of(shape).expect("a matrix");
            assert_eq!(slice_units(f), f.lead > 1, "{shape:?}: slice by slice");
            let (g, r_old, c_old) = batch_inputs(f);
            let x0: Vec<f32> = (0..f.len())
                .map(|i| ((i % 37) as f32) * 0.01 - 0.2)
                .collect();
            let fold = RowFold {
                r_old: &r_old,
                beta2: 0.75,
                epsilon_1: 1e-30,
            };
            let decay = Some(Decay {
                weight_decay: 0.01,
                learning_rate: 0.1,
            });
            let grad = Grad::plain(&g[..]);
            let p1 = pass1(&grad, &x0, decay, f, true, Some(fold));
            let prep = prepare(&p1, &r_old, &c_old, f, 0.75, 1e-30, 1.0);
            let want_u2 = sum_sq_update(&p1, &prep, f).expect("a fold");
            let got = pass1_folded(&grad, &x0, decay, f, true, fold, &c_old);
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.prepared.r), bits(&prep.r), "{shape:?}: r");
            assert_eq!(bits(&got.prepared.c), bits(&prep.c), "{shape:?}: c");
            assert_eq!(got.sum_sq_update.to_bits(), want_u2.to_bits(), "{shape:?}");
            assert_eq!(got.sum_sq_grad.to_bits(), p1.sum_sq_grad.to_bits());
            assert_eq!(got.sum_sq_x.to_bits(), p1.sum_sq_x.to_bits());
            assert!(got.finite && p1.finite);
            let compact = got.prepared.row_factor.is_empty();
            assert_eq!(compact, shape == [48, 40], "{shape:?}: factors left out");
            if !compact {
                assert_eq!(bits(&got.prepared.row_factor), bits(&prep.row_factor));
                assert_eq!(bits(&got.prepared.col_factor), bits(&prep.col_factor));
                assert_eq!(bits(&got.prepared.row_mean), bits(&prep.row_mean));
            }
            let write = |p: &Prepared| {
                let mut x = x0.clone();
                pass3(&mut x, &grad, p, f, 0.01, 1.0, decay, Rounding::Nearest);
                bits(&x)
            };
            assert_eq!(write(&got.prepared), write(&prep), "{shape:?}: pass 3");
        }
    }

    /// [`prepare`] of a batch of matrices gives the same bits in one thread (one sweep) and in
    /// three (jobs of whole slices), with and without a gradient scale. A mutation that mixes
    /// up the slices of a job fails it.
    #[test]
    fn prepare_gives_the_same_bits_on_any_thread_count() {
        for shape in [[700usize, 24, 40], [3, 300, 256], [5000, 4, 4]] {
            let f = Factoring::of(&shape).expect("a batch");
            let (g, r_old, c_old) = batch_inputs(f);
            let x = vec![0.5f32; f.len()];
            let p1 = pass1(&Grad::plain(&g[..]), &x, None, f, false, None);
            for scale in [1.0f32, 0.375] {
                let run = |threads| {
                    super::super::parallel::on_threads(threads, || {
                        prepare(&p1, &r_old, &c_old, f, 0.75, 1e-30, scale)
                    })
                };
                let (one, three) = (run(1), run(3));
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&one.r), bits(&three.r), "{shape:?}");
                assert_eq!(bits(&one.c), bits(&three.c), "{shape:?}");
                assert_eq!(bits(&one.row_mean), bits(&three.row_mean), "{shape:?}");
                assert_eq!(bits(&one.row_factor), bits(&three.row_factor), "{shape:?}");
                assert_eq!(bits(&one.col_factor), bits(&three.col_factor), "{shape:?}");
            }
        }
    }

    /// One first step (beta2 = 0) of a 2 x 3 matrix through the three passes, against the
    /// paper's formulas evaluated directly in f64: `r_i = mean_j(g^2 + eps1)`, `c_j` likewise,
    /// `v_ij = r_i c_j / mean(r)`, `u = g / sqrt(v)`, `x -= coef * u`; with and without the row
    /// fold (which skips pass 2), the same bits.
    #[test]
    fn three_passes_follow_the_formulas() {
        let f = Factoring::of(&[2, 3]).expect("a matrix");
        let g = [0.5f32, -1.0, 2.0, 0.25, 3.0, -0.75];
        let x0 = [1f32, -2.0, 0.5, 0.25, -1.5, 2.0];
        let eps1 = 1e-30f32;
        let grad = Grad::plain(&g[..]);
        let gd: Vec<f64> = g.iter().map(|&v| v as f64).collect();
        let r: Vec<f64> = (0..2)
            .map(|i| (0..3).map(|j| gd[i * 3 + j].powi(2)).sum::<f64>() / 3.0)
            .collect();
        let c: Vec<f64> = (0..3)
            .map(|j| (0..2).map(|i| gd[i * 3 + j].powi(2)).sum::<f64>() / 2.0)
            .collect();
        let mean_r = (r[0] + r[1]) / 2.0;
        let coef = 0.1f32;
        let mut results = Vec::new();
        for fold in [false, true] {
            let fold = fold.then_some(RowFold {
                r_old: &[0.0, 0.0],
                beta2: 0.0,
                epsilon_1: eps1,
            });
            let p1 = pass1(&grad, &x0, None, f, true, fold);
            assert!(p1.finite);
            let prep = prepare(&p1, &[0.0; 2], &[0.0; 3], f, 0.0, eps1, 1.0);
            for (got, want) in prep.r.iter().zip(&r).chain(prep.c.iter().zip(&c)) {
                assert!((*got as f64 - want).abs() <= 1e-6 * want, "{got} vs {want}");
            }
            let sum_u2 = match sum_sq_update(&p1, &prep, f) {
                Some(s) => s,
                None => pass2(&grad, &prep, f, 1.0),
            };
            let mut x = x0;
            pass3(&mut x, &grad, &prep, f, coef, 1.0, None, Rounding::Nearest);
            let mut want_u2 = 0.0;
            for i in 0..2 {
                for j in 0..3 {
                    let u = gd[i * 3 + j] / (r[i] * c[j] / mean_r).sqrt();
                    want_u2 += u * u;
                    let want = x0[i * 3 + j] as f64 - coef as f64 * u;
                    let got = x[i * 3 + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6,
                        "x[{i},{j}] = {got}, formula {want}"
                    );
                }
            }
            assert!(
                (sum_u2 - want_u2).abs() <= 1e-5 * want_u2,
                "{sum_u2} vs {want_u2}"
            );
            results.push(x.map(f32::to_bits));
        }
        assert_eq!(results[0], results[1], "the row fold changes no bit");
    }
}
