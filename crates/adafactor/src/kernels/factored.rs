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
use super::parallel::{map_units, parallel_for, rows_per_unit, split_for};
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
/// float32 sum would overflow still has a finite mean.
#[inline(always)]
fn row_sq_and_cols(g: &[f32], col: &mut [f64]) -> f64 {
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
    let parallel = parallel_for(f.len());
    let probe_rows = check_finite && grad.transform.clip_value.is_some();
    let outs = map_units(
        units(f),
        parallel,
        #[inline(always)]
        |u| {
            let (mut gbuf, mut xbuf) = (Vec::new(), Vec::new());
            let mut col = vec![0f64; m];
            let mut wcol = vec![0f64; if fold.is_some() { m } else { 0 }];
            // Float32 column sums of a block, and with a fold its weighted column sums and two
            // rows of squares: one allocation.
            let mut block_cols = vec![0f32; m + 3 * wcol.len()];
            let (col32, rest) = block_cols.split_at_mut(m);
            let (wcol32, squares) = rest.split_at_mut(wcol.len());
            let mut rows = Vec::with_capacity(u.rows);
            let (mut se, mut sx, mut probe) = (0f64, 0f64, 0f32);
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
                    sx += T::pass1_rows(
                        rows_in,
                        sums_into(
                            fold,
                            first,
                            &mut *col32,
                            (&mut *wcol32, &mut *squares),
                            &mut rows,
                            &mut row_probe,
                        ),
                    );
                    if probe_rows {
                        probe += row_probe;
                    }
                } else {
                    gbuf.resize(m, 0.0);
                    xbuf.resize(m, 0.0);
                    for row in first..first + block {
                        let base = row * m;
                        let g = if probe_rows {
                            // Clamping would hide an infinity from the sums: probe before it.
                            probe += grad.load_checked(base, &mut gbuf);
                            &gbuf[..]
                        } else {
                            grad.view(base, &mut gbuf)
                        };
                        let xv = decayed_view(&x[base..base + m], decay, &mut xbuf);
                        let rows_in = Pass1Rows {
                            g: Grad::plain(g),
                            x: xv,
                            m,
                            decay: None,
                        };
                        sx += f32::pass1_rows(
                            rows_in,
                            sums_into(
                                fold,
                                row,
                                &mut *col32,
                                (&mut *wcol32, &mut *squares),
                                &mut rows,
                                &mut 0.0,
                            ),
                        );
                    }
                }
                let mut ok = rows[k0..].iter().all(|r| r.is_finite());
                ok &= nonfinite_probe(col32) + nonfinite_probe(wcol32) == 0.0;
                if ok {
                    add_into(&mut col, col32);
                    add_into(&mut wcol, wcol32);
                } else {
                    // Rare: float32 partial sums overflowed (huge but finite squares) or the
                    // gradient is not finite. Redo the block in f64, from cache.
                    rows.truncate(k0);
                    gbuf.resize(m, 0.0);
                    for k in k0..k0 + block {
                        let row = u.row0 + k;
                        let base = row * m;
                        let g = grad.view(base, &mut gbuf);
                        let rs = row_sq_and_cols(g, &mut col);
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
                            probe += grad.load_checked(base, &mut gbuf);
                        }
                    }
                }
                k0 += block;
            }
            se += rows.iter().sum::<f64>();
            (u, rows, col, wcol, se, sx, probe)
        },
    );
    let mut outs = outs;
    if f.lead == 1 && outs.len() == 1 {
        // One unit (a small matrix): its sums are the result, no copy.
        if let Some((_, rows, col, wcol, se, sx, probe)) = outs.pop() {
            return Pass1 {
                row_sums: rows,
                col_sums: col,
                sum_sq_grad: se,
                sum_sq_x: sx,
                finite: probe == 0.0,
                weighted_cols: fold.map(|_| wcol),
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
    for (u, rows, col, wcol, se, sx, probe) in outs {
        if let Some(w) = out.weighted_cols.as_mut() {
            for (a, b) in w[u.slice * m..(u.slice + 1) * m].iter_mut().zip(&wcol) {
                *a += b;
            }
        }
        out.row_sums[u.row0..u.row0 + u.rows].copy_from_slice(&rows);
        for (a, b) in out.col_sums[u.slice * m..(u.slice + 1) * m]
            .iter_mut()
            .zip(&col)
        {
            *a += b;
        }
        out.sum_sq_grad += se;
        out.sum_sq_x += sx;
        out.finite &= probe == 0.0;
    }
    out
}

/// New statistics and the per-row and per-column factors of `1/sqrt(v)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// New row statistics `r` (`lead * n`).
    pub r: Vec<f32>,
    /// New column statistics `c` (`lead * m`).
    pub c: Vec<f32>,
    /// `a_i = sqrt(mean(r) / r_i)`, the row factor of `1/sqrt(v_ij)`.
    pub row_factor: Vec<f32>,
    /// `b_j = 1 / sqrt(c_j)`, the column factor of `1/sqrt(v_ij)`.
    pub col_factor: Vec<f32>,
    /// `mean(r)` per leading slice.
    pub row_mean: Vec<f32>,
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
    // Vectorised square roots and divisions: per row and column, this is most of a small
    // matrix's cost outside the passes.
    vectorized(
        #[inline(always)]
        || {
            let s2 = (grad_scale as f64) * (grad_scale as f64);
            let r: Vec<f32> = p1
                .row_sums
                .iter()
                .zip(r_old)
                .map(|(s, old)| new_stat(*old, *s, f.m, beta2, epsilon_1, s2))
                .collect();
            let c: Vec<f32> = p1
                .col_sums
                .iter()
                .zip(c_old)
                .map(|(s, old)| new_stat(*old, *s, f.n, beta2, epsilon_1, s2))
                .collect();
            let mut row_factor = vec![0f32; r.len()];
            let mut row_mean = vec![0f32; f.lead];
            if f.n > 0 {
                for ((rs, af), mean_out) in r
                    .chunks(f.n)
                    .zip(row_factor.chunks_mut(f.n))
                    .zip(&mut row_mean)
                {
                    let mean = (rs.iter().map(|v| *v as f64).sum::<f64>() / f.n as f64) as f32;
                    *mean_out = mean;
                    for (a, ri) in af.iter_mut().zip(rs) {
                        *a = (mean as f64 / *ri as f64).sqrt() as f32;
                    }
                }
            }
            let col_factor = c
                .iter()
                .map(|cj| (1.0 / (*cj as f64).sqrt()) as f32)
                .collect();
            Prepared {
                r,
                c,
                row_factor,
                col_factor,
                row_mean,
            }
        },
    )
}

/// `sum(u^2)` from pass 1's [`RowFold`] sums, when it ran with one: pass 2 is then not needed.
pub fn sum_sq_update(p1: &Pass1, p: &Prepared, f: Factoring) -> Option<f64> {
    let w = p1.weighted_cols.as_ref()?;
    if f.m == 0 {
        return Some(0.0);
    }
    let total = w
        .chunks(f.m)
        .zip(p.c.chunks(f.m))
        .zip(&p.row_mean)
        .map(|((ws, cs), mean)| {
            let per_col: f64 = ws.iter().zip(cs).map(|(w, c)| w / *c as f64).sum();
            *mean as f64 * per_col
        })
        .sum();
    Some(total)
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
    p: &'a Prepared,
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
            col_factor: &self.p.col_factor,
            row_factor: &self.p.row_factor,
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
    let job = Pass3 {
        p,
        f,
        coef,
        grad_scale,
        decay,
        rounding: rounding.for_type::<T>(),
    };
    let body = |start: usize, xs: &mut [T], grad: &Grad<'_, T>| job.rows(start / m, xs, grad);
    write_blocks(x, grad, m, rows_chunk * m, parallel, tail, body);
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
