//! Blocked reductions: float32 lanes within a block of [`CHUNK`] elements, blocks added in
//! `f64`, so a sum does not depend on how the work is split across threads.

/// Elements per block of a blocked reduction (f32 partial sums, then f64 across blocks).
pub const CHUNK: usize = 1024;

/// Float32 lanes of [`sum_sq`]: four vector accumulators of eight, so that the loop runs at
/// the rate of the adds rather than at their latency. Left to the compiler, a lane array was
/// vectorised two floats at a time inside the short-row kernels, where it took a quarter of
/// the statistics pass; the AVX2 twin ([`avx2::block_sum_sq`]) is written out.
const SQ_LANES: usize = 32;

/// Sum of squares of a buffer, blocked: f32 lanes within each block of [`CHUNK`]
/// ([`block_sum_sq`]), blocks added in f64.
#[inline(always)]
pub(crate) fn sum_sq(x: &[f32]) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(CHUNK) {
        total += block_sum_sq(block) as f64;
    }
    total
}

/// Sum of squares of one block: lane `l` of [`SQ_LANES`] adds the elements `l`, `l + 32`, ...,
/// the elements past the last whole 32 are added in order, then the lanes summed as a tree
/// ([`lane_sum`]). The same bits on every instruction set.
#[inline(always)]
pub(crate) fn block_sum_sq(block: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::simd() >= super::cpu::Simd::Avx2 {
        // SAFETY: the CPU has AVX2 (`simd` checked it).
        return unsafe { avx2::block_sum_sq(block) };
    }
    portable_block_sum_sq(block)
}

/// [`block_sum_sq`] in plain Rust: the twin the vector version is checked against.
#[inline(always)]
pub(crate) fn portable_block_sum_sq(block: &[f32]) -> f32 {
    let mut lanes = [0f32; SQ_LANES];
    let mut it = block.chunks_exact(SQ_LANES);
    for c in &mut it {
        for l in 0..SQ_LANES {
            lanes[l] += c[l] * c[l];
        }
    }
    let mut s: f32 = it.remainder().iter().map(|v| v * v).sum();
    s += lane_sum(&lanes);
    s
}

/// The sum of `N` lanes (a power of two) as a tree: lane `i` plus lane `i + N / 2`, then
/// `i + N / 4`, ..., `i + 1`. Vector adds and `log2 N` dependent steps instead of a chain of
/// `N - 1` scalar ones; every version of a loop that sums lanes reduces them this way.
#[inline(always)]
pub(crate) fn lane_sum<const N: usize>(lanes: &[f32; N]) -> f32 {
    let mut v = *lanes;
    let mut half = N / 2;
    while half > 0 {
        for i in 0..half {
            v[i] += v[i + half];
        }
        half /= 2;
    }
    v[0]
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::block_sum_sq`] with lanes `8k..8k + 8` in accumulator `k`.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn block_sum_sq(block: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut it = block.chunks_exact(super::SQ_LANES);
        for c in &mut it {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: `c` holds 32 floats.
                let v = unsafe { _mm256_loadu_ps(c.as_ptr().add(8 * k)) };
                *a = _mm256_add_ps(*a, _mm256_mul_ps(v, v));
            }
        }
        let mut s: f32 = it.remainder().iter().map(|v| v * v).sum();
        // The tree of `lane_sum`: w = 16 (accumulators 0 + 2, 1 + 3), 8, 4 (the 128-bit
        // halves), 2, 1.
        let e = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
        let q = _mm_add_ps(_mm256_castps256_ps128(e), _mm256_extractf128_ps::<1>(e));
        let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let o = _mm_add_ss(d, _mm_shuffle_ps::<0x55>(d, d));
        s += _mm_cvtss_f32(o);
        s
    }
}

/// `x * 0` summed: 0 when every element is finite, NaN otherwise.
#[inline(always)]
pub(crate) fn nonfinite_probe(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            lanes[l] += c[l] * 0.0;
        }
    }
    it.remainder().iter().map(|v| v * 0.0).sum::<f32>() + lanes.iter().sum::<f32>()
}
