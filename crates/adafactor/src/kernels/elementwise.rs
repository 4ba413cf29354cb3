//! Whole-tensor elementwise kernels: accumulation, EMA, overwrite, finiteness.

use super::{for_chunks, parallel_for, Element, Grad, UNIT_ELEMS};
use rayon::prelude::*;

/// Whether the unscaled gradient is finite (a read-only pass, for accumulate-only calls).
pub fn is_finite<T: Element>(grad: &Grad<'_, T>) -> bool {
    let len = grad.len();
    let check = |s: usize, e: usize| {
        let mut buf = vec![0f32; e - s];
        grad.load_checked(s, &mut buf) == 0.0
    };
    if parallel_for(len) {
        (0..len)
            .into_par_iter()
            .step_by(UNIT_ELEMS)
            .all(|s| check(s, (s + UNIT_ELEMS).min(len)))
    } else {
        check(0, len)
    }
}

/// Gradient accumulation: `acc += g` (the gradient after unscaling).
pub fn accumulate<T: Element>(acc: &mut [f32], grad: &Grad<'_, T>) {
    for_chunks(acc, |start, a| {
        let mut buf = vec![0f32; a.len()];
        grad.load(start, &mut buf);
        for (a, g) in a.iter_mut().zip(&buf) {
            *a += g;
        }
    });
}

/// EMA: `avg = m * avg + (1 - m) * x`.
pub fn ema<T: Element>(avg: &mut [f32], x: &[T], momentum: f32) {
    for_chunks(avg, |start, a| {
        let mut buf = vec![0f32; a.len()];
        T::load(&x[start..start + a.len()], &mut buf);
        for (a, x) in a.iter_mut().zip(&buf) {
            *a = momentum * *a + (1.0 - momentum) * x;
        }
    });
}

/// Overwrite: `x = src` rounded to the weight type.
pub fn assign<T: Element>(x: &mut [T], src: &[f32]) {
    for_chunks(x, |start, xs| T::store(&src[start..start + xs.len()], xs));
}

/// Sets every element to zero.
pub fn zero(a: &mut [f32]) {
    for_chunks(a, |_, a| a.fill(0.0));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elementwise_kernels() {
        let g = [1f32, -2.0, 3.0];
        let mut acc = vec![0.5f32; 3];
        accumulate(&mut acc, &Grad::plain(&g[..]));
        assert_eq!(acc, vec![1.5, -1.5, 3.5]);
        let mut avg = vec![1f32; 3];
        ema(&mut avg, &g[..], 0.5);
        assert_eq!(avg, vec![1.0, -0.5, 2.0]);
        let mut x = [half::bf16::ZERO; 3];
        assign(&mut x, &avg);
        assert_eq!(x[1].to_f32(), -0.5);
        zero(&mut avg);
        assert_eq!(avg, vec![0.0; 3]);
        assert!(is_finite(&Grad::plain(&g[..])));
        assert!(!is_finite(&Grad::plain(&[1.0, f32::NAN][..])));
        assert!(!is_finite(&Grad::plain(&[f32::NEG_INFINITY][..])));
    }
}
