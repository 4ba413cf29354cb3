//! The per-row inner loops of the factored passes, where almost all of a step's time goes.
//!
//! Each loop has a portable version, written with eight explicit lanes, and for `f32` and `bf16`
//! a hand-vectorised AVX2 twin ([`avx2`]) that the CPU takes when it has AVX2. The twins do the
//! same float32 operations in the same order on the same lanes (no fused multiply-add), so both
//! give the same bits. The compiler's own vectorisation of these loops proved fragile: a loop
//! that reads two 16-bit streams and keeps three sums came out scalar.

use super::{Decay, Element, CHUNK};

/// The sum of eight lanes, in lane order (both versions reduce through this).
#[inline(always)]
fn lane_sum(lanes: &[f32; 8]) -> f32 {
    lanes.iter().sum()
}

/// Pass 1 over one row, in one sweep: the float32 sum of squares of `g` (eight lanes, blocked by
/// [`CHUNK`], blocks added in float32), each square added into `col`, and the sum of squares of
/// the weight `x` after the optional decay (blocked likewise, blocks added in f64).
#[inline(always)]
pub(crate) fn pass1<T: Element>(
    g: &[T],
    x: &[T],
    decay: Option<Decay>,
    col: &mut [f32],
) -> (f32, f64) {
    match decay {
        None => pass1_with(g, x, col, |v| v),
        Some(d) => pass1_with(g, x, col, move |v| d.apply(v)),
    }
}

#[inline(always)]
fn pass1_with<T: Element>(
    g: &[T],
    x: &[T],
    col: &mut [f32],
    xmap: impl Fn(f32) -> f32 + Copy,
) -> (f32, f64) {
    let len = g.len().min(x.len()).min(col.len());
    let (mut total_g, mut total_x) = (0f32, 0f64);
    let mut start = 0;
    while start < len {
        let end = (start + CHUNK).min(len);
        let mut lanes = [0f32; 8];
        let mut xlanes = [0f32; 8];
        let mut j = start;
        while j + 8 <= end {
            for l in 0..8 {
                let gv = g[j + l].to_f32();
                let e = gv * gv;
                col[j + l] += e;
                lanes[l] += e;
                let xv = xmap(x[j + l].to_f32());
                xlanes[l] += xv * xv;
            }
            j += 8;
        }
        let (rem, xrem) = pass1_tail(&g[j..end], &x[j..end], &mut col[j..end], xmap);
        total_g += rem + lane_sum(&lanes);
        total_x += (xrem + lane_sum(&xlanes)) as f64;
        start = end;
    }
    (total_g, total_x)
}

/// The elements after the last whole group of eight in a block, one at a time: their sums of
/// squares of `g` and of the mapped `x`, each square of `g` added into `col`.
#[inline(always)]
fn pass1_tail<T: Element>(
    g: &[T],
    x: &[T],
    col: &mut [f32],
    xmap: impl Fn(f32) -> f32,
) -> (f32, f32) {
    let (mut rem, mut xrem) = (0f32, 0f32);
    for ((g, x), c) in g.iter().zip(x).zip(col) {
        let gv = g.to_f32();
        let e = gv * gv;
        *c += e;
        rem += e;
        let xv = xmap(x.to_f32());
        xrem += xv * xv;
    }
    (rem, xrem)
}

/// `w_j += g_j^2 * scale` (pass 1's row fold).
#[inline(always)]
pub(crate) fn add_scaled_squares<T: Element>(g: &[T], scale: f32, w: &mut [f32]) {
    for (w, g) in w.iter_mut().zip(g) {
        let gv = g.to_f32();
        *w += gv * gv * scale;
    }
}

/// Pass 3 over one row: `x_j = decay(x_j) - ca * (s g_j) * b_j`, computed in float32 and
/// rounded once.
#[inline(always)]
pub(crate) fn update<T: Element>(
    x: &mut [T],
    g: &[T],
    b: &[f32],
    ca: f32,
    s: f32,
    decay: Option<Decay>,
) {
    match decay {
        None => {
            for ((xv, g), bj) in x.iter_mut().zip(g).zip(b) {
                *xv = T::from_f32(xv.to_f32() - ca * (s * g.to_f32()) * bj);
            }
        }
        Some(d) => {
            for ((xv, g), bj) in x.iter_mut().zip(g).zip(b) {
                *xv = T::from_f32(d.apply(xv.to_f32()) - ca * (s * g.to_f32()) * bj);
            }
        }
    }
}

/// True when this CPU runs the AVX2 twins (the standard library checks once and caches).
#[inline(always)]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The AVX2 twins of the row loops, for `f32` and `bf16` elements.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{lane_sum, pass1_tail, Decay, CHUNK};
    use half::bf16;
    use std::arch::x86_64::*;

    /// An element type loaded and stored eight at a time as float32 lanes.
    pub(crate) trait Wide: super::Element {
        /// Eight elements from `p` as float32.
        ///
        /// # Safety
        /// AVX2 must be available and `p..p + 8` readable.
        unsafe fn load8(p: *const Self) -> __m256;
        /// Eight float32 lanes rounded into `p..p + 8`.
        ///
        /// # Safety
        /// AVX2 must be available and `p..p + 8` writable.
        unsafe fn store8(p: *mut Self, v: __m256);
    }

    impl Wide for f32 {
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn store8(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
    }

    impl Wide for bf16 {
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn load8(p: *const bf16) -> __m256 {
            // A bf16 is the top half of an f32.
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn store8(p: *mut bf16, v: __m256) {
            // `f32_to_bf16_bits` on eight lanes: round to nearest even, NaN kept quiet.
            let x = _mm256_castps_si256(v);
            let abs = _mm256_and_si256(x, _mm256_set1_epi32(0x7FFF_FFFF));
            let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7F80_0000));
            let zero = _mm256_setzero_si256();
            let half_clear =
                _mm256_cmpeq_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x8000)), zero);
            let tie_even =
                _mm256_cmpeq_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x1_7FFF)), zero);
            let round =
                _mm256_andnot_si256(_mm256_or_si256(half_clear, tie_even), _mm256_set1_epi32(1));
            let top = _mm256_srli_epi32::<16>(x);
            let rounded = _mm256_add_epi32(top, round);
            let quiet = _mm256_or_si256(top, _mm256_set1_epi32(0x40));
            let bits = _mm256_blendv_epi8(rounded, quiet, nan);
            // Every lane fits in 16 bits, so the unsigned saturating pack only narrows.
            let packed = _mm_packus_epi32(
                _mm256_castsi256_si128(bits),
                _mm256_extracti128_si256::<1>(bits),
            );
            _mm_storeu_si128(p as *mut __m128i, packed);
        }
    }

    #[inline(always)]
    unsafe fn lanes_of(v: __m256) -> [f32; 8] {
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), v);
        out
    }

    /// `x - x * wd * lr` on eight lanes, as [`Decay::apply`] rounds it.
    #[inline(always)]
    unsafe fn decay8(x: __m256, wd: __m256, lr: __m256) -> __m256 {
        _mm256_sub_ps(x, _mm256_mul_ps(_mm256_mul_ps(x, wd), lr))
    }

    fn decay_lanes(decay: Option<Decay>) -> (bool, f32, f32) {
        match decay {
            Some(d) => (true, d.weight_decay, d.learning_rate),
            None => (false, 0.0, 0.0),
        }
    }

    /// [`super::pass1`].
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn pass1<W: Wide>(
        g: &[W],
        x: &[W],
        decay: Option<Decay>,
        col: &mut [f32],
    ) -> (f32, f64) {
        let len = g.len().min(x.len()).min(col.len());
        let (decayed, wd, lr) = decay_lanes(decay);
        let (vwd, vlr) = (_mm256_set1_ps(wd), _mm256_set1_ps(lr));
        let (gp, xp, cp) = (g.as_ptr(), x.as_ptr(), col.as_mut_ptr());
        let (mut total_g, mut total_x) = (0f32, 0f64);
        let mut start = 0;
        while start < len {
            let end = (start + CHUNK).min(len);
            let mut lanes = _mm256_setzero_ps();
            let mut xlanes = _mm256_setzero_ps();
            let mut j = start;
            while j + 8 <= end {
                // SAFETY: j + 8 <= len, within all three slices.
                let gv = W::load8(gp.add(j));
                let e = _mm256_mul_ps(gv, gv);
                _mm256_storeu_ps(cp.add(j), _mm256_add_ps(_mm256_loadu_ps(cp.add(j)), e));
                lanes = _mm256_add_ps(lanes, e);
                let mut xv = W::load8(xp.add(j));
                if decayed {
                    xv = decay8(xv, vwd, vlr);
                }
                xlanes = _mm256_add_ps(xlanes, _mm256_mul_ps(xv, xv));
                j += 8;
            }
            let (rem, xrem) = match decay {
                None => pass1_tail(&g[j..end], &x[j..end], &mut col[j..end], |v| v),
                Some(d) => pass1_tail(&g[j..end], &x[j..end], &mut col[j..end], |v| d.apply(v)),
            };
            total_g += rem + lane_sum(&lanes_of(lanes));
            total_x += (xrem + lane_sum(&lanes_of(xlanes))) as f64;
            start = end;
        }
        (total_g, total_x)
    }

    /// [`super::add_scaled_squares`].
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn add_scaled_squares<W: Wide>(g: &[W], scale: f32, w: &mut [f32]) {
        let len = g.len().min(w.len());
        let vs = _mm256_set1_ps(scale);
        let (gp, wp) = (g.as_ptr(), w.as_mut_ptr());
        let mut j = 0;
        while j + 8 <= len {
            // SAFETY: j + 8 <= len, within both slices.
            let gv = W::load8(gp.add(j));
            let add = _mm256_mul_ps(_mm256_mul_ps(gv, gv), vs);
            _mm256_storeu_ps(wp.add(j), _mm256_add_ps(_mm256_loadu_ps(wp.add(j)), add));
            j += 8;
        }
        while j < len {
            let gv = g[j].to_f32();
            w[j] += gv * gv * scale;
            j += 1;
        }
    }

    /// [`super::update`].
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn update<W: Wide>(
        x: &mut [W],
        g: &[W],
        b: &[f32],
        ca: f32,
        s: f32,
        decay: Option<Decay>,
    ) {
        let len = x.len().min(g.len()).min(b.len());
        let (decayed, wd, lr) = decay_lanes(decay);
        let (vwd, vlr) = (_mm256_set1_ps(wd), _mm256_set1_ps(lr));
        let (vca, vs) = (_mm256_set1_ps(ca), _mm256_set1_ps(s));
        let (xp, gp, bp) = (x.as_mut_ptr(), g.as_ptr(), b.as_ptr());
        let mut j = 0;
        while j + 8 <= len {
            // SAFETY: j + 8 <= len, within all three slices.
            let mut xv = W::load8(xp.add(j));
            if decayed {
                xv = decay8(xv, vwd, vlr);
            }
            let gs = _mm256_mul_ps(vs, W::load8(gp.add(j)));
            let step = _mm256_mul_ps(_mm256_mul_ps(vca, gs), _mm256_loadu_ps(bp.add(j)));
            W::store8(xp.add(j), _mm256_sub_ps(xv, step));
            j += 8;
        }
        while j < len {
            let mut v = x[j].to_f32();
            if let Some(d) = decay {
                v = d.apply(v);
            }
            x[j] = W::from_f32(v - ca * (s * g[j].to_f32()) * b[j]);
            j += 1;
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use half::bf16;

    fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    /// Both versions of every row loop, on rows of every remainder length and longer than a
    /// block, with and without decay: the same bits.
    fn twins_agree<T: avx2::Wide>(from: impl Fn(&[f32]) -> Vec<T>) {
        if !has_avx2() {
            return;
        }
        let decays = [
            None,
            Some(Decay {
                weight_decay: 0.1,
                learning_rate: 0.01,
            }),
        ];
        for len in (0..40).chain([1023, 1024, 1025, 2100]) {
            for decay in decays {
                let g = from(&values(len as u64, len, 2.0));
                let x = from(&values(len as u64 + 99, len, 0.2));
                let b = values(len as u64 + 7, len, 4.0);
                let col0 = values(len as u64 + 3, len, 1.0);

                let (mut col_p, mut col_v) = (col0.clone(), col0.clone());
                let sums_p = pass1(&g, &x, decay, &mut col_p);
                // SAFETY: checked above.
                let sums_v = unsafe { avx2::pass1(&g, &x, decay, &mut col_v) };
                assert_eq!(sums_p.0.to_bits(), sums_v.0.to_bits(), "len {len}");
                assert_eq!(sums_p.1.to_bits(), sums_v.1.to_bits(), "len {len}");
                assert_eq!(bits(&col_p), bits(&col_v), "len {len}");

                let (mut w_p, mut w_v) = (col0.clone(), col0.clone());
                add_scaled_squares(&g, 0.37, &mut w_p);
                // SAFETY: checked above.
                unsafe { avx2::add_scaled_squares(&g, 0.37, &mut w_v) };
                assert_eq!(bits(&w_p), bits(&w_v), "len {len}");

                let (mut x_p, mut x_v) = (x.clone(), x.clone());
                update(&mut x_p, &g, &b, 0.013, 0.9, decay);
                // SAFETY: checked above.
                unsafe { avx2::update(&mut x_v, &g, &b, 0.013, 0.9, decay) };
                let (x_p, x_v): (Vec<f32>, Vec<f32>) = (
                    x_p.iter().map(|v| v.to_f32()).collect(),
                    x_v.iter().map(|v| v.to_f32()).collect(),
                );
                assert_eq!(bits(&x_p), bits(&x_v), "len {len}");
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn avx2_twins_match_portable_loops_f32() {
        twins_agree::<f32>(|v| v.to_vec());
    }

    #[test]
    fn avx2_twins_match_portable_loops_bf16() {
        twins_agree::<bf16>(|v| v.iter().map(|x| bf16::from_f32(*x)).collect());
    }

    #[test]
    fn avx2_bf16_store_rounds_like_half() {
        if !has_avx2() {
            return;
        }
        // Ties, near-ties, NaNs, infinities, the largest values: the vector rounding matches
        // `half` bit for bit.
        let probes = crate::kernels::tests::bf16_rounding_probes();
        for chunk in probes.chunks(8).filter(|c| c.len() == 8) {
            let mut out = [bf16::ZERO; 8];
            // SAFETY: checked above; eight elements on each side.
            unsafe {
                let v = std::arch::x86_64::_mm256_loadu_ps(chunk.as_ptr());
                <bf16 as avx2::Wide>::store8(out.as_mut_ptr(), v);
            }
            for (p, o) in chunk.iter().zip(out) {
                assert_eq!(o.to_bits(), bf16::from_f32(*p).to_bits(), "{p:e}");
            }
        }
    }
}
