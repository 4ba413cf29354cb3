//! The three passes for an unfactored variable (rank 0 or 1), which keeps its velocity `v`.

use super::{decay_in_place, map_units, parallel_for, Decay, Element, Grad, UNIT_ELEMS};

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
            let mut gbuf = vec![0f32; e - s];
            let mut xbuf = vec![0f32; e - s];
            let probe = if check_finite {
                grad.load_checked(s, &mut gbuf)
            } else {
                grad.load(s, &mut gbuf);
                0.0
            };
            T::load(&x[s..e], &mut xbuf);
            decay_in_place(decay, &mut xbuf);
            (super::sum_sq(&gbuf), super::sum_sq(&xbuf), probe)
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
    super::sum_chunks(v_new, |start, vs| {
        let mut gbuf = vec![0f32; vs.len()];
        grad.load(start, &mut gbuf);
        for ((v, g), old) in vs.iter_mut().zip(gbuf.iter_mut()).zip(&v_old[start..]) {
            let ge = grad_scale * *g;
            *v = beta2 * old + (1.0 - beta2) * (ge * ge + epsilon_1);
            *g = ge / v.sqrt();
        }
        super::sum_sq(&gbuf)
    })
}

/// Pass 3: `x = decay(x) - coef * s g / sqrt(v_new)`, `coef = alpha / max(1, RMS(u)/d)`.
pub fn pass3<T: Element>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    v_new: &[f32],
    coef: f32,
    grad_scale: f32,
    decay: Option<Decay>,
) {
    super::for_chunks(x, |start, xs| {
        let mut gbuf = vec![0f32; xs.len()];
        let mut xbuf = vec![0f32; xs.len()];
        grad.load(start, &mut gbuf);
        T::load(xs, &mut xbuf);
        decay_in_place(decay, &mut xbuf);
        for ((xv, g), v) in xbuf.iter_mut().zip(&gbuf).zip(&v_new[start..]) {
            *xv -= coef * ((grad_scale * g) / v.sqrt());
        }
        T::store(&xbuf, xs);
    });
}
