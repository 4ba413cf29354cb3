//! Blocked reductions: float32 lanes within a block of [`CHUNK`] elements, blocks added in
//! `f64`, so a sum does not depend on how the work is split across threads.

/// Elements per block of a blocked reduction (f32 partial sums, then f64 across blocks).
pub const CHUNK: usize = 1024;

/// Sum of squares of a buffer, blocked: f32 lanes within the buffer, returned as f64.
#[inline(always)]
pub(crate) fn sum_sq(x: &[f32]) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(CHUNK) {
        let mut lanes = [0f32; 8];
        let mut it = block.chunks_exact(8);
        for c in &mut it {
            for l in 0..8 {
                lanes[l] += c[l] * c[l];
            }
        }
        let mut s: f32 = it.remainder().iter().map(|v| v * v).sum();
        s += lanes.iter().sum::<f32>();
        total += s as f64;
    }
    total
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
