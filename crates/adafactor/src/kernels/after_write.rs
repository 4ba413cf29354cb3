//! What follows the write of the new weights, done block by block while each block is still in
//! cache instead of in passes of its own: the EMA of the new weights (`avg = m * avg + (1 - m) *
//! x`), the overwrite of the weights by the average, and the zeroing of the gradient accumulator
//! that the write read last (the update call of gradient accumulation).
//!
//! Every element is computed as [`super::elementwise`]'s whole-tensor kernels compute it
//! ([`super::elementwise::ema`], [`super::elementwise::assign`], [`super::elementwise::zero`]),
//! so the bits do not depend on whether the step runs them here or as separate passes.

use super::cpu::{vectorized, vectorized_wide};
use super::element::Element;
use super::elementwise::{ema_block, ema_overwrite_block};
use super::grad::Grad;
use super::store::Rounding;
use rayon::prelude::*;

/// Elements per block of the tail (about 64 KiB of each float32 buffer): what a block's write,
/// EMA and zeroing touch stays in the core's cache between them.
pub const TAIL_BLOCK: usize = 1 << 14;

/// The EMA of one tensor's new weights.
#[derive(Debug)]
pub struct Ema<'a> {
    /// The float32 average, as long as the weight.
    pub avg: &'a mut [f32],
    /// `m` in `avg = m * avg + (1 - m) * x`.
    pub momentum: f32,
    /// `Some`: the weights are then overwritten with the average, rounded by this.
    pub overwrite: Option<Rounding>,
}

/// What follows the write of one tensor, block by block.
#[derive(Debug, Default)]
pub struct Tail<'a> {
    /// The EMA (and overwrite) of the new weights.
    pub ema: Option<Ema<'a>>,
    /// The gradient accumulator to set to zero once the write has read it: the write reads it
    /// from here (the gradient handed to the write then carries no accumulator).
    pub zero_acc: Option<&'a mut [f32]>,
}

impl<'a> Tail<'a> {
    /// The whole tensor as one piece, with the EMA's momentum and overwrite rounding.
    fn over<'x, T>(self, x: &'x mut [T]) -> (Piece<'x, T>, f32, Option<Rounding>)
    where
        'a: 'x,
    {
        let momentum = self.ema.as_ref().map_or(0.0, |e| e.momentum);
        let overwrite = self.ema.as_ref().and_then(|e| e.overwrite);
        let piece = Piece {
            start: 0,
            x,
            avg: self.ema.map(|e| e.avg),
            acc: self.zero_acc,
        };
        (piece, momentum, overwrite)
    }

    /// True when nothing follows the write.
    pub fn is_empty(&self) -> bool {
        self.ema.is_none() && self.zero_acc.is_none()
    }

    /// The EMA, overwrite and zeroing of the whole tensor, after a write that read the
    /// accumulator from `self.zero_acc` (for kernels that write a tensor in one piece).
    pub fn finish<T: Element>(self, x: &mut [T]) {
        if self.is_empty() {
            return;
        }
        let wide = self.ema.is_some();
        let (piece, momentum, overwrite) = self.over(x);
        // The EMA and its overwrite at the widest vectors there are, as in `write_blocks`.
        let run = |p: Piece<'_, T>| {
            if wide {
                vectorized_wide(
                    #[inline(always)]
                    || p.finish(momentum, overwrite),
                )
            } else {
                vectorized(
                    #[inline(always)]
                    || p.finish(momentum, overwrite),
                )
            }
        };
        if super::parallel::parallel_for(piece.x.len()) {
            piece
                .split(super::parallel::UNIT_ELEMS)
                .into_par_iter()
                .for_each(run);
        } else {
            run(piece);
        }
    }
}

/// Writes a whole tensor with `write(x, grad)` (a kernel that does not split its write into
/// blocks), then runs the tail on the whole tensor: in cache when the tensor is small.
pub fn write_whole<T: Element>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    tail: Tail<'_>,
    write: impl FnOnce(&mut [T], &Grad<'_, T>),
) {
    let g = Grad {
        g: grad.g,
        acc: tail.zero_acc.as_deref().or(grad.acc),
        transform: grad.transform,
    };
    write(x, &g);
    tail.finish(x);
}

/// Elements `start..start + x.len()` of a tensor with their parts of the tail's buffers.
struct Piece<'a, T> {
    start: usize,
    x: &'a mut [T],
    avg: Option<&'a mut [f32]>,
    acc: Option<&'a mut [f32]>,
}

/// Splits an optional buffer like the weight.
fn split_opt(buf: Option<&mut [f32]>, len: usize) -> impl Iterator<Item = Option<&mut [f32]>> {
    let mut chunks = buf.map(|b| b.chunks_mut(len.max(1)));
    std::iter::from_fn(move || Some(chunks.as_mut().and_then(|c| c.next())))
}

impl<'a, T: Element> Piece<'a, T> {
    /// Pieces of `len` elements (the last one shorter).
    fn split(self, len: usize) -> Vec<Piece<'a, T>> {
        let start = self.start;
        self.x
            .chunks_mut(len.max(1))
            .zip(split_opt(self.avg, len))
            .zip(split_opt(self.acc, len))
            .enumerate()
            .map(|(i, ((x, avg), acc))| Piece {
                start: start + i * len,
                x,
                avg,
                acc,
            })
            .collect()
    }

    /// EMA, overwrite and zeroing of this piece (after its write).
    #[inline(always)]
    fn finish(self, momentum: f32, overwrite: Option<Rounding>) {
        if let Some(avg) = self.avg {
            match overwrite {
                Some(r) => ema_overwrite_block(avg, self.x, momentum, r, self.start as u64),
                None => ema_block(avg, self.x, momentum),
            }
        }
        if let Some(acc) = self.acc {
            acc.fill(0.0);
        }
    }
}

/// Writes a tensor block by block, each block followed by its tail: `write(start, xs, grad)`
/// writes elements `start..start + xs.len()` with `grad` the gradient of those elements only
/// (its element 0 is element `start`). Blocks are whole multiples of `unit` elements (a row):
/// `chunk` per parallel job (in parallel when `parallel`, the last first), and within a job
/// [`TAIL_BLOCK`] or more when there is a tail, so that the tail finds the block in cache.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_blocks<T: Element>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    unit: usize,
    chunk: usize,
    parallel: bool,
    tail: Tail<'_>,
    write: impl Fn(usize, &mut [T], &Grad<'_, T>) + Sync + Send,
) {
    let unit = unit.max(1);
    let block = if tail.is_empty() {
        chunk
    } else {
        TAIL_BLOCK.div_ceil(unit) * unit
    };
    // The EMA and its overwrite (elementwise loops) run at the widest vectors there are.
    let wide = tail.ema.is_some();
    let (piece, momentum, overwrite) = tail.over(x);
    // Each job's loop runs in an instruction-set frame of its own: a closure is not inlined
    // into a frame around its call, and the tails' loops left at the baseline ran at four
    // lanes.
    let run = |job: Piece<'_, T>| {
        let go = (block.min(chunk), momentum, overwrite);
        if wide {
            vectorized_wide(
                #[inline(always)]
                || write_job(job, grad, &write, go),
            )
        } else {
            vectorized(
                #[inline(always)]
                || write_job(job, grad, &write, go),
            )
        }
    };
    if parallel {
        // Last blocks first: pass 1 reads them last, so they may still be in the last-level
        // cache.
        piece.split(chunk).into_par_iter().rev().for_each(run);
    } else if !piece.x.is_empty() {
        run(piece);
    }
}

/// One job of [`write_blocks`]: its blocks written, each followed by its tail.
#[inline(always)]
fn write_job<T: Element>(
    job: Piece<'_, T>,
    grad: &Grad<'_, T>,
    write: &impl Fn(usize, &mut [T], &Grad<'_, T>),
    (block, momentum, overwrite): (usize, f32, Option<Rounding>),
) {
    for p in job.split(block) {
        let (s, e) = (p.start, p.start + p.x.len());
        let local = Grad {
            g: &grad.g[s..e],
            acc: match &p.acc {
                Some(a) => Some(&a[..]),
                None => grad.acc.map(|a| &a[s..e]),
            },
            transform: grad.transform,
        };
        write(s, &mut *p.x, &local);
        p.finish(momentum, overwrite);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::elementwise::{assign, ema};
    use crate::kernels::UNIT_ELEMS;
    use crate::rounding::{RoundingKey, RoundingStream};

    /// The tail's EMA and overwrite of a whole tensor (the separate EMA stage's overwrite) give
    /// the bits of the whole-tensor EMA and then the overwrite, on a tensor split into parallel
    /// pieces, with both roundings (stochastic rounding keys its bits by element index, so a
    /// piece's offset must be its place in the tensor).
    #[test]
    fn finished_ema_overwrite_has_the_bits_of_ema_then_assign() {
        let len = 2 * UNIT_ELEMS + 1000;
        let x0: Vec<half::bf16> = (0..len)
            .map(|i| half::bf16::from_f32(((i * 7919) % 1013) as f32 * 0.37 - 180.0))
            .collect();
        let avg0: Vec<f32> = (0..len)
            .map(|i| ((i * 104_729) % 997) as f32 * 0.011 - 5.0)
            .collect();
        let key = RoundingKey::new(7, 2, 3, RoundingStream::EmaOverwrite);
        for rounding in [Rounding::Nearest, Rounding::Stochastic(key)] {
            let (mut avg_a, mut x_a) = (avg0.clone(), x0.clone());
            ema(&mut avg_a, &x_a, 0.9);
            assign(&mut x_a, &avg_a, rounding);
            let (mut avg_b, mut x_b) = (avg0.clone(), x0.clone());
            let ema = Ema {
                avg: &mut avg_b,
                momentum: 0.9,
                overwrite: Some(rounding),
            };
            Tail {
                ema: Some(ema),
                zero_acc: None,
            }
            .finish(&mut x_b);
            let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&avg_a), bits(&avg_b), "{rounding:?}");
            assert_eq!(x_a, x_b, "{rounding:?}");
            assert_ne!(x_b, x0, "the overwrite wrote the weight");
        }
    }
}
