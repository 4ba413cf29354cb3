//! Whole-tensor elementwise kernels: accumulation, EMA, overwrite, finiteness.
//!
//! Each parallel chunk works through blocks of [`CHUNK`] elements with a float32 buffer on the
//! stack where a conversion is needed: no allocation per chunk (a chunk-sized buffer would be
//! an `mmap` and its page faults on every call).

use super::cpu::{prefetch_ahead, vectorized};
use super::element::Element;
use super::grad::Grad;
use super::parallel::{for_chunks, parallel_for, UNIT_ELEMS};
use super::reduce::CHUNK;
use super::store::Rounding;
use rayon::prelude::*;

/// Whether the unscaled gradient is finite (a read-only pass, for accumulate-only calls).
pub fn is_finite<T: Element>(grad: &Grad<'_, T>) -> bool {
    let len = grad.len();
    // Compiled for AVX2 where allowed, as the other elementwise kernels (`for_chunks`): the
    // 16-bit conversions need it to vectorise.
    let check = |s: usize, e: usize| {
        vectorized(
            #[inline(always)]
            || {
                let mut buf = [0f32; CHUNK];
                (s..e).step_by(CHUNK).all(|b| {
                    let n = CHUNK.min(e - b);
                    grad.load_checked(b, &mut buf[..n]) == 0.0
                })
            },
        )
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
    for_chunks(
        acc,
        #[inline(always)]
        |start, a| {
            let mut buf = [0f32; CHUNK];
            let g = &grad.g[start..start + a.len()];
            for b in (0..a.len()).step_by(CHUNK) {
                let n = CHUNK.min(a.len() - b);
                let gb = grad.view(start + b, &mut buf[..n]);
                // Both streams ask ahead, piece by piece, as the EMA does ([`ema_block`]).
                for p in (0..n).step_by(ASK_PIECE) {
                    let (at, pn) = (b + p, ASK_PIECE.min(n - p));
                    prefetch_ahead(a, at, pn);
                    prefetch_ahead(g, at, pn);
                    for (a, g) in a[at..at + pn].iter_mut().zip(&gb[p..p + pn]) {
                        *a += g;
                    }
                }
            }
        },
    );
}

/// EMA: `avg = m * avg + (1 - m) * x`.
pub fn ema<T: Element>(avg: &mut [f32], x: &[T], momentum: f32) {
    for_chunks(
        avg,
        #[inline(always)]
        |start, a| ema_block(a, &x[start..start + a.len()], momentum),
    );
}

/// [`ema`] of one block on the calling thread (also the EMA the write stage folds in,
/// [`super::after_write`]): every element on its own, so any split gives the same bits.
#[inline(always)]
pub(crate) fn ema_block<T: Element>(avg: &mut [f32], x: &[T], momentum: f32) {
    let mut buf = [0f32; CHUNK];
    for b in (0..avg.len()).step_by(CHUNK) {
        let n = CHUNK.min(avg.len() - b);
        ema_chunk(avg, b, &x[b..b + n], momentum, &mut buf);
    }
}

/// [`ema_block`] and then the overwrite (`x = avg` rounded by `rounding`, `x[0]` being element
/// `offset` of the tensor), chunk by chunk while each chunk of the average is in the
/// first-level cache: the bits of the two one after the other.
#[inline(always)]
pub(crate) fn ema_overwrite_block<T: Element>(
    avg: &mut [f32],
    x: &mut [T],
    momentum: f32,
    rounding: Rounding,
    offset: u64,
) {
    let mut buf = [0f32; CHUNK];
    for b in (0..avg.len()).step_by(CHUNK) {
        let n = CHUNK.min(avg.len() - b);
        ema_chunk(avg, b, &x[b..b + n], momentum, &mut buf);
        rounding.store_slice(&avg[b..b + n], &mut x[b..b + n], offset + b as u64);
    }
}

/// `avg[b..] = m * avg[b..] + (1 - m) * x` for the chunk `x` (at most [`CHUNK`] elements).
#[inline(always)]
fn ema_chunk<T: Element>(avg: &mut [f32], b: usize, xs: &[T], momentum: f32, buf: &mut [f32]) {
    let n = xs.len();
    let xf = match T::as_f32(xs) {
        Some(xf) => xf,
        None => {
            T::load(xs, &mut buf[..n]);
            &buf[..n]
        }
    };
    // The average is read here for the first time in the step: each piece asks for the one
    // `PREFETCH_BYTES` further on, as the passes ask for their streams (the hardware
    // prefetcher stops at every page).
    for p in (0..n).step_by(ASK_PIECE) {
        let (at, pn) = (b + p, ASK_PIECE.min(n - p));
        prefetch_ahead(avg, at, pn);
        for (a, x) in avg[at..at + pn].iter_mut().zip(&xf[p..p + pn]) {
            *a = momentum * *a + (1.0 - momentum) * x;
        }
    }
}

/// Elements between two asks for what comes next, in the elementwise kernels.
const ASK_PIECE: usize = 256;

/// Overwrite: `x = src` rounded to the weight type by `rounding`.
pub fn assign<T: Element>(x: &mut [T], src: &[f32], rounding: Rounding) {
    for_chunks(
        x,
        #[inline(always)]
        |start, xs| rounding.store_slice(&src[start..start + xs.len()], xs, start as u64),
    );
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
        assign(&mut x, &avg, Rounding::Nearest);
        assert_eq!(x[1].to_f32(), -0.5);
        zero(&mut avg);
        assert_eq!(avg, vec![0.0; 3]);
        assert!(is_finite(&Grad::plain(&g[..])));
        assert!(!is_finite(&Grad::plain(&[1.0, f32::NAN][..])));
        assert!(!is_finite(&Grad::plain(&[f32::NEG_INFINITY][..])));
    }
}
