//! A single row (`1 x m` in Keras's factoring) runs on the vector's loops.
//!
//! Keras's second moment of a factored variable is `v_ij = (r_i / mean(r)) c_j` (Shazeer & Stern
//! 2018, arXiv:1804.04235, Algorithm 4). With one row, `r / mean(r) = 1`, so `u_j = g_j /
//! sqrt(c_j)` and the column statistics `c_j = b2 c_j + (1 - b2) ((s g_j)^2 + eps1)` are a
//! vector's velocity: [`super::vector`]'s passes compute them and the update, reading the row as
//! one stream, and the one row statistic comes from the row's sum of squares, which pass 1 sums
//! anyway. Without norm clipping the new `c_j` has the bits of the general kernels' (for one row,
//! `(g^2 / 1 + eps1)` rounded once from f64 is the float32 sum `g^2 + eps1`); the update is
//! Keras's `g / sqrt(c)` instead of `(g a) b` with `a = 1` and `b = 1 / sqrt(c)`.

use super::after_write::Tail;
use super::element::Element;
use super::grad::{Decay, Grad};
use super::reduce::CHUNK;
use super::row_args::new_stat;
use super::shaped::{Fresh, Reads, StatArgs, Statistics, Sums};
use super::store::Rounding;
use super::vector;
use crate::state::Factoring;

/// True for a single row in Keras's factoring (`[1, m]`, or `[1, ..., 1, m]` with batch axes
/// of one): the variables this kernel takes.
pub(crate) fn takes(f: Factoring) -> bool {
    f.strided.is_none() && f.lead == 1 && f.n == 1
}

/// The statistics pass of a single row: new `r` and `c`, `sum(u^2)` and, when `reads` has the
/// weight (pass 1 without norm clipping), pass 1's sums.
pub(crate) fn statistics<T: Element>(
    grad: &Grad<'_, T>,
    reads: Reads<'_, T>,
    args: StatArgs<'_>,
    out: Fresh,
) -> (Statistics, Sums) {
    let Fresh { mut r, mut c } = out;
    let (b2, eps, s) = (args.beta2, args.epsilon_1, args.scale);
    let (mut sums, row_sum, sum_u2) = match reads.x {
        Some(x) if s == 1.0 => {
            let (p, u2) = vector::pass1_fold(
                grad,
                x,
                reads.decay,
                reads.check,
                args.c_old,
                &mut c,
                b2,
                eps,
            );
            (sums_of(p), p.sum_sq_grad, u2)
        }
        Some(x) => {
            let p = vector::pass1(grad, x, reads.decay, reads.check);
            let u2 = vector::pass2(grad, args.c_old, &mut c, b2, eps, s);
            (sums_of(p), p.sum_sq_grad, u2)
        }
        None => {
            let (u2, g2) = vector::pass2_with_sum_sq(grad, args.c_old, &mut c, (b2, eps, s));
            let sums = Sums {
                sum_sq_grad: g2,
                ..Sums::default()
            };
            (sums, g2, u2)
        }
    };
    // The float32 block sums overflow on large but finite squares: the row's sum is then taken
    // in f64, as the other kernels take it (for the row statistic and for the norms).
    if !row_sum.is_finite() {
        sums.sum_sq_grad = sum_sq_f64(grad);
    }
    let row_sum = sums.sum_sq_grad;
    let s2 = (s as f64) * (s as f64);
    for (r, old) in r.iter_mut().zip(args.r_old) {
        *r = new_stat(*old, row_sum, c.len(), b2, eps, s2);
    }
    let row_mean = r.clone();
    // `a = sqrt(mean(r)) / sqrt(r)`: 1, or NaN where `r` is 0 or not finite, as elsewhere.
    let a = row_factor(&row_mean, &r) as f64;
    let st = Statistics {
        r,
        c,
        row_mean,
        sum_sq_update: sum_u2 * a * a,
    };
    (st, sums)
}

/// The row's factor `a = sqrt(mean(r)) / sqrt(r)`, as the other kernels compute it.
fn row_factor(row_mean: &[f32], r: &[f32]) -> f32 {
    match (row_mean.first(), r.first()) {
        (Some(mean), Some(r)) => mean.sqrt() / r.sqrt(),
        _ => 1.0,
    }
}

fn sums_of(p: vector::Pass1) -> Sums {
    Sums {
        sum_sq_grad: p.sum_sq_grad,
        sum_sq_x: p.sum_sq_x,
        probe: if p.finite { 0.0 } else { f32::NAN },
    }
}

/// The sum of the float32 squares of the effective gradient, added in f64.
fn sum_sq_f64<T: Element>(grad: &Grad<'_, T>) -> f64 {
    let mut buf = [0f32; CHUNK];
    let mut total = 0f64;
    for b in (0..grad.len()).step_by(CHUNK) {
        let n = CHUNK.min(grad.len() - b);
        let g = grad.view(b, &mut buf[..n]);
        total += g.iter().map(|v| (v * v) as f64).sum::<f64>();
    }
    total
}

/// The write pass: `x = decay(x) - (coef a) (s g) / sqrt(c)`, each block followed by its
/// [`Tail`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_then<T: Element>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    st: &Statistics,
    coef: f32,
    scale: f32,
    decay: Option<Decay>,
    rounding: Rounding,
    tail: Tail<'_>,
) {
    let coef = coef * row_factor(&st.row_mean, &st.r);
    vector::pass3_then(x, grad, &st.c, coef, scale, decay, rounding, tail);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::narrow;
    use crate::kernels::shaped::tests::values;

    fn row(m: usize) -> Factoring {
        Factoring {
            lead: 1,
            n: 1,
            m,
            strided: None,
        }
    }

    /// The statistics update's inputs: `beta2` 0.8, `epsilon_1` 1e-30.
    fn args<'a>(r_old: &'a [f32], c_old: &'a [f32], scale: f32) -> StatArgs<'a> {
        StatArgs {
            r_old,
            c_old,
            beta2: 0.8,
            epsilon_1: 1e-30,
            scale,
        }
    }

    /// Without norm clipping the column statistics have the bits of the few-row kernel's, and
    /// the row statistic and pass 1's sums agree with it; with a gradient scale (the statistics
    /// pass after pass 1) they agree within float32 rounding.
    #[test]
    fn statistics_agree_with_the_few_row_kernel() {
        for m in [1usize, 7, 1025, 5000, 70000] {
            let f = row(m);
            let g = values(m as u64, m, -1.0, 2.0);
            let x = values(m as u64 + 1, m, -0.5, 1.0);
            let (r_old, c_old) = ([0.3f32], values(m as u64 + 2, m, 0.1, 1.0));
            let grad = Grad::plain(&g[..]);
            for scale in [1.0f32, 0.25] {
                let args = args(&r_old, &c_old, scale);
                let reads = Reads {
                    x: (scale == 1.0).then_some(&x[..]),
                    decay: None,
                    check: scale == 1.0,
                };
                let (got, sums) = statistics(&grad, reads, args, Fresh::zeroed(f));
                let (want, want_sums) = narrow::statistics(&grad, reads, f, args, Fresh::zeroed(f));
                let what = format!("m {m} scale {scale}");
                if scale == 1.0 {
                    assert_eq!(got.c, want.c, "{what}");
                } else {
                    for (a, b) in got.c.iter().zip(&want.c) {
                        assert!((a - b).abs() <= 1e-6 * b.abs(), "{what}: {a} vs {b}");
                    }
                }
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs();
                assert!(close(got.r[0] as f64, want.r[0] as f64), "{what}");
                assert_eq!(got.row_mean, got.r, "{what}");
                assert!(close(got.sum_sq_update, want.sum_sq_update), "{what}");
                assert!(close(sums.sum_sq_grad, want_sums.sum_sq_grad), "{what}");
                assert!(close(sums.sum_sq_x, want_sums.sum_sq_x), "{what}");
                assert_eq!(sums.probe, want_sums.probe, "{what}");
            }
        }
    }

    /// The update is Keras's `x - coef (s g) / sqrt(c)` for one row (`r / mean(r) = 1`), bit for
    /// bit, and RMS(u) is that of `(s g) / sqrt(c)`.
    #[test]
    fn the_update_is_g_over_the_square_root_of_c() {
        let m = 40000;
        let f = row(m);
        let g = values(5, m, -1.0, 2.0);
        let x0 = values(6, m, -0.5, 1.0);
        let (r_old, c_old) = ([0.7f32], values(7, m, 0.1, 1.0));
        let grad = Grad::plain(&g[..]);
        let scale = 0.5f32;
        let args = args(&r_old, &c_old, scale);
        let reads = Reads {
            x: None,
            decay: None,
            check: false,
        };
        let (st, _) = statistics(&grad, reads, args, Fresh::zeroed(f));
        let mut x = x0.clone();
        let coef = 0.01;
        write_then(
            &mut x,
            &grad,
            &st,
            coef,
            scale,
            None,
            Rounding::Nearest,
            Tail::default(),
        );
        let mut sum_u2 = 0f64;
        for j in 0..m {
            let u = (scale * g[j]) / st.c[j].sqrt();
            sum_u2 += (u as f64) * (u as f64);
            assert_eq!(x[j], x0[j] - coef * u, "x[{j}]");
        }
        let rel = (st.sum_sq_update - sum_u2).abs() / sum_u2;
        assert!(rel < 1e-6, "sum(u^2) {} vs {sum_u2}", st.sum_sq_update);
    }

    /// A row of large but finite squares (`1.5e19`, whose float32 sums overflow) keeps a finite
    /// row statistic, from the f64 sum.
    #[test]
    fn huge_finite_squares_keep_a_finite_row_statistic() {
        let m = 3000;
        let g = vec![1.5e19f32; m];
        let x = vec![0.5f32; m];
        let (r_old, c_old) = ([1f32], vec![1f32; m]);
        let args = args(&r_old, &c_old, 1.0);
        let reads = Reads {
            x: Some(&x[..]),
            decay: None,
            check: true,
        };
        let (st, sums) = statistics(&Grad::plain(&g[..]), reads, args, Fresh::zeroed(row(m)));
        assert_eq!(sums.probe, 0.0, "a finite gradient");
        let sq = (1.5e19f32 * 1.5e19f32) as f64;
        assert_eq!(st.r[0], new_stat(1.0, sq * m as f64, m, 0.8, 1e-30, 1.0));
        assert!(st.r[0].is_finite() && st.c.iter().all(|c| c.is_finite()));
    }
}
