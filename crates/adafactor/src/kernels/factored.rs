//! The three passes for a factored variable (rank >= 2: `lead` slices of `n x m`).

use super::{decay_in_place, map_units, parallel_for, rows_per_unit, Decay, Element, Grad, CHUNK};
use crate::state::Factoring;
use rayon::prelude::*;

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
}

#[derive(Debug, Clone, Copy)]
struct Unit {
    slice: usize,
    row0: usize,
    rows: usize,
}

fn units(f: Factoring, parallel: bool) -> Vec<Unit> {
    let rpu = if parallel {
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

/// Sum of squares of `g` while adding each square into `col`. The squares are float32, as
/// Keras computes them; the sums are f64, so a row or column of large finite squares whose
/// float32 sum would overflow still has a finite mean.
#[inline]
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

/// `x_j -= ca * (s g_j) * b_j`.
#[inline]
fn update_row(x: &mut [f32], g: &[f32], b: &[f32], ca: f32, s: f32) {
    for ((xv, g), bj) in x.iter_mut().zip(g).zip(b) {
        *xv -= ca * (s * g) * bj;
    }
}

/// `sum_j ((s g_j) b_j)^2`, blocked like [`super::sum_sq`].
#[inline]
fn weighted_sum_sq(g: &[f32], b: &[f32], s: f32) -> f64 {
    let mut total = 0f64;
    for (gb, bb) in g.chunks(CHUNK).zip(b.chunks(CHUNK)) {
        let mut lanes = [0f32; 8];
        let mut gi = gb.chunks_exact(8);
        let mut bi = bb.chunks_exact(8);
        for (gc, bc) in (&mut gi).zip(&mut bi) {
            for l in 0..8 {
                let u = s * gc[l] * bc[l];
                lanes[l] += u * u;
            }
        }
        let mut rem = 0f32;
        for (g, b) in gi.remainder().iter().zip(bi.remainder()) {
            let u = s * g * b;
            rem += u * u;
        }
        total += (rem + lanes.iter().sum::<f32>()) as f64;
    }
    total
}

/// Pass 1: row and column sums of the effective gradient squared, the weight's sum of squares
/// after weight decay, and (when `check_finite`) whether the gradient is finite.
pub fn pass1<T: Element>(
    grad: &Grad<'_, T>,
    x: &[T],
    decay: Option<Decay>,
    f: Factoring,
    check_finite: bool,
) -> Pass1 {
    let m = f.m;
    let parallel = parallel_for(f.len());
    let outs = map_units(units(f, parallel), parallel, |u| {
        let mut gbuf = vec![0f32; m];
        let mut xbuf = vec![0f32; m];
        let mut col = vec![0f64; m];
        let mut rows = Vec::with_capacity(u.rows);
        let (mut se, mut sx, mut probe) = (0f64, 0f64, 0f32);
        for k in 0..u.rows {
            let base = (u.row0 + k) * m;
            let g = grad.view(base, &mut gbuf);
            let rs = row_sq_and_cols(g, &mut col);
            rows.push(rs);
            se += rs;
            if check_finite && !rs.is_finite() {
                // Rare: a NaN or infinity, or a finite value whose square overflows. Decide on
                // the unscaled values themselves.
                probe += grad.load_checked(base, &mut gbuf);
            }
            sx += super::sum_sq(super::decayed_view(&x[base..base + m], decay, &mut xbuf));
        }
        (u, rows, col, se, sx, probe)
    });
    let mut out = Pass1 {
        row_sums: vec![0.0; f.lead * f.n],
        col_sums: vec![0.0; f.lead * m],
        sum_sq_grad: 0.0,
        sum_sq_x: 0.0,
        finite: true,
    };
    for (u, rows, col, se, sx, probe) in outs {
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
    let s2 = (grad_scale as f64) * (grad_scale as f64);
    // A zero scale (clipping by an overflowed norm) zeroes the gradient, even where its sum of
    // squares overflowed.
    let mean_sq = |sum: f64| if s2 == 0.0 { 0.0 } else { sum * s2 };
    let mean_q = |sum: f64, count: usize| (mean_sq(sum) / count as f64 + epsilon_1 as f64) as f32;
    let ema = |old: f32, q: f32| beta2 * old + (1.0 - beta2) * q;
    let r: Vec<f32> = p1
        .row_sums
        .iter()
        .zip(r_old)
        .map(|(s, old)| ema(*old, mean_q(*s, f.m)))
        .collect();
    let c: Vec<f32> = p1
        .col_sums
        .iter()
        .zip(c_old)
        .map(|(s, old)| ema(*old, mean_q(*s, f.n)))
        .collect();
    let mut row_factor = vec![0f32; r.len()];
    if f.n > 0 {
        for (rs, af) in r.chunks(f.n).zip(row_factor.chunks_mut(f.n)) {
            let mean = (rs.iter().map(|v| *v as f64).sum::<f64>() / f.n as f64) as f32;
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
    }
}

/// Pass 2: `sum(u^2)` with `u_ij = (s g_ij) b_j a_i`, for RMS(u). The scale is applied first,
/// as clipping does, so that a clipped huge gradient cannot overflow.
pub fn pass2<T: Element>(grad: &Grad<'_, T>, p: &Prepared, f: Factoring, grad_scale: f32) -> f64 {
    let m = f.m;
    let parallel = parallel_for(f.len());
    let sums = map_units(units(f, parallel), parallel, |u| {
        let mut gbuf = vec![0f32; m];
        let b = &p.col_factor[u.slice * m..(u.slice + 1) * m];
        let mut total = 0f64;
        for k in 0..u.rows {
            let row = u.row0 + k;
            let a = p.row_factor[row] as f64;
            total += weighted_sum_sq(grad.view(row * m, &mut gbuf), b, grad_scale) * a * a;
        }
        total
    });
    sums.iter().sum::<f64>()
}

/// Pass 3: `x = decay(x) - coef * a_i * (s g_ij) * b_j`, with `coef = alpha / max(1, RMS(u)/d)`.
pub fn pass3<T: Element>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    p: &Prepared,
    f: Factoring,
    coef: f32,
    grad_scale: f32,
    decay: Option<Decay>,
) {
    let m = f.m;
    if m == 0 || f.n == 0 {
        return;
    }
    let parallel = parallel_for(f.len());
    let rows_chunk = if parallel {
        rows_per_unit(f.lead * f.n, m)
    } else {
        f.lead * f.n
    };
    let body = |(ci, xs): (usize, &mut [T])| {
        let mut gbuf = vec![0f32; m];
        let mut xbuf = vec![0f32; m];
        for (k, xrow) in xs.chunks_mut(m).enumerate() {
            let row = ci * rows_chunk + k;
            let slice = row / f.n;
            let b = &p.col_factor[slice * m..(slice + 1) * m];
            let ca = coef * p.row_factor[row];
            let g = grad.view(row * m, &mut gbuf);
            if decay.is_none() {
                if let Some(xs) = T::as_f32_mut(xrow) {
                    update_row(xs, g, b, ca, grad_scale);
                    continue;
                }
            }
            T::load(xrow, &mut xbuf);
            decay_in_place(decay, &mut xbuf);
            update_row(&mut xbuf, g, b, ca, grad_scale);
            T::store(&xbuf, xrow);
        }
    };
    if parallel {
        x.par_chunks_mut(rows_chunk * m).enumerate().for_each(body);
    } else {
        x.chunks_mut(rows_chunk * m).enumerate().for_each(body);
    }
}
