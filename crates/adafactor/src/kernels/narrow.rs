//! Few rows (`1 x n`, `4 x n`, `64 x n`): work units across columns.
//!
//! A unit holds every row of a range of columns, so its column statistics are complete inside
//! it (each unit writes its own columns of `c`) and only the `n` row sums are combined across
//! units, in unit order. A row loop over such a matrix would give each unit a column accumulator
//! as long as the row, read and written for every row. See [`super::shaped`] for the passes.

use super::element::Element;
use super::grad::{decayed_view, Grad};
use super::parallel::{map_units, parallel_for, UNIT_ELEMS};
use super::reduce::sum_sq;
use super::row_args::new_stat;
use super::shaped::{
    add_into, load_grad, update_block, Fresh, Reads, StatArgs, Statistics, Sums, WriteArgs,
};
use crate::state::Factoring;

/// Fewest and most columns per unit: long enough runs for the prefetcher, a buffer that stays
/// in the first-level cache.
const MIN_COLS: usize = 512;
const MAX_COLS: usize = 8192;

/// Columns per work unit of `n` rows: about [`UNIT_ELEMS`] elements.
fn cols_per_unit(n: usize) -> usize {
    (UNIT_ELEMS / n.max(1)).clamp(MIN_COLS, MAX_COLS)
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
    let parts = map_units(
        units,
        parallel_for(f.len()),
        #[inline(always)]
        |((slice, j0), c_out)| {
            let width = c_out.len();
            let mut gbuf = vec![0f32; width];
            let mut xbuf = vec![0f32; if reads.x.is_some() { width } else { 0 }];
            let mut col = vec![0f64; width];
            let mut rows = vec![0f64; n];
            let mut sums = Sums::default();
            for (i, rsum) in rows.iter_mut().enumerate() {
                let start = (slice * n + i) * m + j0;
                if let Some(x) = reads.x {
                    let xv = decayed_view(&x[start..start + width], reads.decay, &mut xbuf);
                    sums.sum_sq_x += sum_sq(xv);
                }
                let g = load_grad(grad, start, &mut gbuf, reads.check, &mut sums.probe);
                let mut lanes = [0f64; 8];
                let mut gi = g.chunks_exact(8);
                let mut ci = col.chunks_exact_mut(8);
                for (gc, cc) in (&mut gi).zip(&mut ci) {
                    for l in 0..8 {
                        let e = (gc[l] * gc[l]) as f64;
                        lanes[l] += e;
                        cc[l] += e;
                    }
                }
                for (g, c) in gi.remainder().iter().zip(ci.into_remainder()) {
                    let e = (g * g) as f64;
                    lanes[0] += e;
                    *c += e;
                }
                *rsum = lanes.iter().sum();
                sums.sum_sq_grad += *rsum;
            }
            let c_old = &args.c_old[slice * m + j0..slice * m + j0 + width];
            let mut b = vec![0f32; width];
            for (((co, cs), old), bj) in c_out.iter_mut().zip(&col).zip(c_old).zip(&mut b) {
                *co = new_stat(*old, *cs, n, b2, eps, s2);
                *bj = 1.0 / co.sqrt();
            }
            // RMS(u) needs every column's new statistic: a second sweep, from cache.
            let mut weighted = vec![0f64; n];
            let mut probe = 0f32;
            for (i, wsum) in weighted.iter_mut().enumerate() {
                let start = (slice * n + i) * m + j0;
                let g = load_grad(grad, start, &mut gbuf, false, &mut probe);
                let mut lanes = [0f32; 16];
                let mut gi = g.chunks_exact(16);
                let mut bi = b.chunks_exact(16);
                for (gc, bc) in (&mut gi).zip(&mut bi) {
                    for l in 0..16 {
                        let t = (sc * gc[l]) * bc[l];
                        lanes[l] += t * t;
                    }
                }
                for (g, b) in gi.remainder().iter().zip(bi.remainder()) {
                    let t = (sc * g) * b;
                    lanes[0] += t * t;
                }
                *wsum = lanes.iter().map(|v| *v as f64).sum();
            }
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
    map_units(
        units,
        parallel_for(f.len()),
        #[inline(always)]
        |(slice, j0)| {
            let width = cpu.min(m - j0);
            let mut a = vec![0f32; n];
            let sm = st.row_mean[slice].sqrt();
            for (a, r) in a.iter_mut().zip(&st.r[slice * n..(slice + 1) * n]) {
                *a = sm / r.sqrt();
            }
            let b: Vec<f32> = st.c[slice * m + j0..slice * m + j0 + width]
                .iter()
                .map(|c| 1.0 / c.sqrt())
                .collect();
            let (mut gbuf, mut xbuf, mut fac) =
                (vec![0f32; width], vec![0f32; width], vec![0f32; width]);
            let mut probe = 0f32;
            for (i, ai) in a.iter().enumerate() {
                let start = (slice * n + i) * m + j0;
                for (fv, bj) in fac.iter_mut().zip(&b) {
                    *fv = ai * bj;
                }
                let g = load_grad(grad, start, &mut gbuf, false, &mut probe);
                // SAFETY: units cover disjoint column ranges, so no two touch the same elements.
                let xs = unsafe { x_at.slice(start, width) };
                T::load(xs, &mut xbuf);
                update_block(&mut xbuf, g, &fac, w);
                w.rounding.store_slice(&xbuf, xs, start as u64);
            }
        },
    );
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
