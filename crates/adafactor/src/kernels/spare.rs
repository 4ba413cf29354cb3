//! Buffers of replaced statistics, kept for the next step's statistics.
//!
//! Statistics as large as the weight (a vector's velocity, the row statistics of `n x 1`, both
//! statistics of a batch of `1 x 1` matrices) are written to fresh buffers every step, since the
//! old ones must survive until the step commits. A fresh buffer of more than a few hundred
//! kilobytes comes from the operating system: one page fault and one zeroed page per 4 KiB, as
//! much time as a pass over the weight. A [`Spare`] owned by the optimizer keeps the buffers a
//! step replaced and hands them to the next one; it never holds more than one step's statistics.

use rayon::prelude::*;
use std::sync::Mutex;

/// Buffers smaller than this (in float32 elements) come from the allocator's own free lists.
pub const MIN_KEPT: usize = 1 << 15;

/// Replaced statistics buffers, reused by the next step.
#[derive(Debug, Default)]
pub struct Spare {
    bufs: Mutex<Vec<Vec<f32>>>,
}

impl Spare {
    /// An empty spare.
    pub fn new() -> Self {
        Spare::default()
    }

    /// A buffer of `len` elements whose values are unspecified (the caller writes every one):
    /// a kept one of that capacity when there is one.
    pub fn take(&self, len: usize) -> Vec<f32> {
        if len >= MIN_KEPT {
            if let Ok(mut bufs) = self.bufs.lock() {
                if let Some(i) = bufs.iter().position(|b| b.capacity() == len) {
                    let mut b = bufs.swap_remove(i);
                    // Kept buffers hold their old (initialised) values: no fill needed.
                    b.resize(len, 0.0);
                    return b;
                }
            }
        }
        vec![0f32; len]
    }

    /// Keeps a replaced buffer for the next step (small ones are freed).
    pub fn keep(&self, buf: Vec<f32>) {
        if buf.capacity() < MIN_KEPT {
            return;
        }
        if let Ok(mut bufs) = self.bufs.lock() {
            bufs.push(buf);
        }
    }

    /// Frees every kept buffer (the kept ones are one step's statistics at most: call this
    /// before keeping a new step's).
    pub fn clear(&self) {
        if let Ok(mut bufs) = self.bufs.lock() {
            bufs.clear();
        }
    }

    /// Frees every kept buffer and keeps those of `replaced` large enough to keep, freeing the
    /// others in parallel (with thousands of small tensors, freeing them one by one takes as
    /// long as a pass).
    pub fn replace_with(&self, replaced: impl ParallelIterator<Item = Vec<f32>>) {
        let kept: Vec<Vec<f32>> = replaced.filter(|b| b.capacity() >= MIN_KEPT).collect();
        if let Ok(mut bufs) = self.bufs.lock() {
            *bufs = kept;
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bufs
            .lock()
            .map_or(0, |b| b.iter().map(|v| v.capacity() * 4).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_buffer_is_handed_out_again_and_small_ones_are_not_kept() {
        let spare = Spare::new();
        let big = vec![1f32; MIN_KEPT];
        let ptr = big.as_ptr();
        spare.keep(big);
        spare.keep(vec![1f32; 10]);
        assert_eq!(spare.bytes(), MIN_KEPT * 4);
        let again = spare.take(MIN_KEPT);
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again.len(), MIN_KEPT);
        assert_eq!(spare.bytes(), 0);
        let fresh = spare.take(MIN_KEPT);
        assert_ne!(fresh.as_ptr(), ptr);
        spare.keep(fresh);
        spare.clear();
        assert_eq!(spare.bytes(), 0);
    }

    #[test]
    fn replacing_keeps_only_the_large_buffers_of_the_new_step() {
        let spare = Spare::new();
        spare.keep(vec![1f32; MIN_KEPT]);
        let big = vec![2f32; MIN_KEPT + 1];
        let ptr = big.as_ptr();
        spare.replace_with(vec![vec![3f32; 7], big, vec![4f32; 1]].into_par_iter());
        assert_eq!(
            spare.bytes(),
            (MIN_KEPT + 1) * 4,
            "the old step's buffer is freed"
        );
        let again = spare.take(MIN_KEPT + 1);
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(spare.bytes(), 0);
    }
}
