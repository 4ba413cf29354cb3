//! The three passes for an unfactored variable (rank 0 or 1), which keeps its velocity `v`.

use super::element::Element;
use super::grad::{decay_in_place, Decay, Grad};
use super::parallel::{for_chunks, map_units, parallel_for, sum_chunks, UNIT_ELEMS};
use super::reduce::{sum_sq, CHUNK};
use super::store::Rounding;

/// What pass 1 learns about an unfactored variable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pass1 {
    /// Sum of `g^2` (for clipnorm and global_clipnorm).
    pub sum_sq_grad: f64,
    /// Sum of `x^2` after weight decay (for RMS(x)).
    pub sum_sq_x: f64,
    /// False when the unscaled gradient holds NaN or infinity (only checked when asked).
    pub finite: bool,
}

fn ranges(len: usize, parallel: bool) -> Vec<(usize, usize)> {
    let step = if parallel { UNIT_ELEMS } else { len.max(1) };
    (0..len)
        .step_by(step)
        .map(|s| (s, (s + step).min(len)))
        .collect()
}

/// Pass 1: sums of squares of the gradient and of the decayed weight.
pub fn pass1<T: Element>(
    grad: &Grad<'_, T>,
    x: &[T],
    decay: Option<Decay>,
    check_finite: bool,
) -> Pass1 {
    let parallel = parallel_for(x.len());
    let outs = map_units(
        ranges(x.len(), parallel),
        parallel,
        #[inline(always)]
        |(s, e)| {
            // Blocks of CHUNK through stack buffers: the same sums as over the whole range.
            let (mut gbuf, mut xbuf) = ([0f32; CHUNK], [0f32; CHUNK]);
            let (mut sg, mut sx, mut probe) = (0f64, 0f64, 0f32);
            for b in (s..e).step_by(CHUNK) {
                let n = CHUNK.min(e - b);
                let (gb, xb) = (&mut gbuf[..n], &mut xbuf[..n]);
                if check_finite {
                    probe += grad.load_checked(b, gb);
                } else {
                    grad.load(b, gb);
                }
                T::load(&x[b..b + n], xb);
                decay_in_place(decay, xb);
                sg += sum_sq(gb);
                sx += sum_sq(xb);
            }
            (sg, sx, probe)
        },
    );
    outs.iter().fold(
        Pass1 {
            sum_sq_grad: 0.0,
            sum_sq_x: 0.0,
            finite: true,
        },
        |acc, (g, x, p)| Pass1 {
            sum_sq_grad: acc.sum_sq_grad + g,
            sum_sq_x: acc.sum_sq_x + x,
            finite: acc.finite && *p == 0.0,
        },
    )
}

/// Pass 2: `v_new = b2 v + (1 - b2) ((s g)^2 + eps1)` and returns `sum(u^2)`, `u = s g / sqrt(v_new)`.
pub fn pass2<T: Element>(
    grad: &Grad<'_, T>,
    v_old: &[f32],
    v_new: &mut [f32],
    beta2: f32,
    epsilon_1: f32,
    grad_scale: f32,
) -> f64 {
    sum_chunks(v_new, |start, vs| {
        let mut gbuf = [0f32; CHUNK];
        let mut total = 0f64;
        for (k, vb) in vs.chunks_mut(CHUNK).enumerate() {
            let b = start + k * CHUNK;
            let gb = &mut gbuf[..vb.len()];
            grad.load(b, gb);
            for ((v, g), old) in vb.iter_mut().zip(gb.iter_mut()).zip(&v_old[b..]) {
                let ge = grad_scale * *g;
                *v = beta2 * old + (1.0 - beta2) * (ge * ge + epsilon_1);
                *g = ge / v.sqrt();
            }
            total += sum_sq(gb);
        }
        total
    })
}

/// Pass 3: `x = decay(x) - coef * s g / sqrt(v_new)`, `coef = alpha / max(1, RMS(u)/d)`,
/// rounded into the weight by `rounding`.
pub fn pass3<T: Element>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    v_new: &[f32],
    coef: f32,
    grad_scale: f32,
    decay: Option<Decay>,
    rounding: Rounding,
) {
    for_chunks(x, |start, xs| {
        let (mut gbuf, mut xbuf) = ([0f32; CHUNK], [0f32; CHUNK]);
        for (k, xblock) in xs.chunks_mut(CHUNK).enumerate() {
            let b = start + k * CHUNK;
            let (gb, xb) = (&mut gbuf[..xblock.len()], &mut xbuf[..xblock.len()]);
            grad.load(b, gb);
            T::load(xblock, xb);
            decay_in_place(decay, xb);
            for ((xv, g), v) in xb.iter_mut().zip(gb.iter()).zip(&v_new[b..]) {
                *xv -= coef * ((grad_scale * g) / v.sqrt());
            }
            rounding.store_slice(xb, xblock, b as u64);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keras's own Adafactor test on a vector (`adafactor_test.py`, `test_single_step_1d`):
    /// x = [1, 2, 3, 4], g = [1, 6, 7, 2], learning rate 0.5, first step (beta2 = 0, rho = 0.5).
    #[test]
    fn first_step_matches_keras() {
        let g = [1f32, 6.0, 7.0, 2.0];
        let mut x = [1f32, 2.0, 3.0, 4.0];
        let grad = Grad::plain(&g[..]);
        let p1 = pass1(&grad, &x, None, true);
        assert!(p1.finite);
        assert_eq!(p1.sum_sq_grad, 90.0);
        assert_eq!(p1.sum_sq_x, 30.0);
        let mut v = [0f32; 4];
        let sum_u2 = pass2(&grad, &[0.0; 4], &mut v, 0.0, 1e-30, 1.0);
        // v = g^2 + eps1, so u = g / |g| and RMS(u) = 1: no update clipping.
        assert_eq!(v, [1.0, 36.0, 49.0, 4.0]);
        assert_eq!(sum_u2, 4.0);
        let alpha = (30f32 / 4.0).sqrt() * 0.5;
        pass3(&mut x, &grad, &v, alpha, 1.0, None, Rounding::Nearest);
        for (got, want) in x
            .iter()
            .zip([-0.36930645f32, 0.63069355, 1.6306936, 2.6306934])
        {
            assert!((got - want).abs() < 1e-6, "{got} vs Keras {want}");
        }
    }
}
