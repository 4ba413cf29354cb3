//! Sixteen float32 lanes on x86: one AVX-512 register or two AVX2 registers, and the element
//! types (`f32`, `bf16`, `f16`) that load into them and round out of them.
//!
//! The row loops in [`super::wide`] are written once over [`Lanes`] and compiled once per
//! instruction set (see the `twins!` macro there). Every operation here is a single float32
//! operation per lane, so both instruction sets give the same bits as the portable loops.

use crate::rounding::{middle_key, random_bits, random_word, RoundingKey};
use half::{bf16, f16};
use std::arch::x86_64::*;

/// Sixteen float32 lanes held in the registers of one instruction set.
///
/// # Safety
/// Every method needs the instruction set of the implementing type.
pub(crate) trait Lanes: Copy {
    /// All lanes zero.
    unsafe fn zero() -> Self;
    /// All lanes `v`.
    unsafe fn splat(v: f32) -> Self;
    /// Lane-wise `self + o`.
    unsafe fn add(self, o: Self) -> Self;
    /// Lane-wise `self - o`.
    unsafe fn sub(self, o: Self) -> Self;
    /// Lane-wise `self * o`.
    unsafe fn mul(self, o: Self) -> Self;
    /// Lane-wise `self / o` (a true division, as the scalar code divides).
    unsafe fn div(self, o: Self) -> Self;
    /// Lane-wise `self.clamp(lo, hi)` as [`f32::clamp`] computes it: a NaN lane stays itself.
    /// The max and min instructions return their second operand when either is NaN (or both
    /// are zeros), so the value goes second: `min(hi, max(lo, x))`.
    unsafe fn clamp(self, lo: Self, hi: Self) -> Self;
    /// Sixteen float32 values from `p`.
    unsafe fn load(p: *const f32) -> Self;
    /// The lanes into `p..p + 16`.
    unsafe fn store(self, p: *mut f32);
    /// The lanes as an array, in order.
    #[inline(always)]
    unsafe fn to_array(self) -> [f32; 16] {
        let mut out = [0f32; 16];
        self.store(out.as_mut_ptr());
        out
    }

    /// Sixteen 32-bit integer lanes.
    type Bits: Copy;
    /// [`random_bits`]`(key, index + l)` in lane `l`, as the scalar generator computes it
    /// (16-bit values).
    unsafe fn random_bits(key: RoundingKey, index: u64) -> Self::Bits;
    /// [`random_bits`]`(key, index + l)` for `l` in `0..32`: two groups of sixteen lanes, for
    /// instruction sets that make more generator words at once than one group needs.
    #[inline(always)]
    unsafe fn random_bits32(key: RoundingKey, index: u64) -> (Self::Bits, Self::Bits) {
        (
            Self::random_bits(key, index),
            Self::random_bits(key, index + 16),
        )
    }
    /// The integer lanes as an array, in order (the tests compare them with the scalar bits).
    #[cfg(test)]
    unsafe fn bits_array(b: Self::Bits) -> [u32; 16];
}

/// The scalar generator on sixteen consecutive indices (where the low halves of the indices
/// wrap, which the vector versions do not handle).
#[inline(always)]
fn random_bits16(key: RoundingKey, index: u64) -> [u32; 16] {
    std::array::from_fn(|l| random_bits(key, index + l as u64))
}

/// Whether the low 32 bits of the generator's words for `index..index + 16` wrap (the high
/// half changes inside).
#[inline(always)]
fn low_half_wraps(index: u64) -> bool {
    ((index >> 1) as u32) > u32::MAX - 8
}

/// [`crate::rounding::hash32`] on eight lanes.
#[inline(always)]
unsafe fn hash32_8(mut x: __m256i, k: u32) -> __m256i {
    x = _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB_352D));
    x = _mm256_xor_si256(x, _mm256_set1_epi32(k as i32));
    x = _mm256_xor_si256(x, _mm256_srli_epi32::<15>(x));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x846C_A68Bu32 as i32));
    _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x))
}

/// [`crate::rounding::hash32`] on sixteen lanes.
#[inline(always)]
unsafe fn hash32_16(mut x: __m512i, k: u32) -> __m512i {
    x = _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7FEB_352D));
    x = _mm512_xor_si512(x, _mm512_set1_epi32(k as i32));
    x = _mm512_xor_si512(x, _mm512_srli_epi32::<15>(x));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x846C_A68Bu32 as i32));
    _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x))
}

/// [`random_bits`] of `index..index + 16` as sixteen 16-bit values
/// in order (indices whose words do not wrap, see [`low_half_wraps`]): eight words of the
/// generator ([`random_word`] on eight lanes), shifted by one half for an odd `index`, whose
/// last element takes the low half of a ninth word.
#[inline(always)]
unsafe fn random_halves16(key: RoundingKey, index: u64) -> __m256i {
    let pair = index >> 1;
    let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let idx = _mm256_add_epi32(_mm256_set1_epi32(pair as u32 as i32), iota);
    let x = _mm256_xor_si256(idx, _mm256_set1_epi32(key.0[0] as i32));
    let w = hash32_8(x, middle_key(key, pair));
    if index & 1 == 0 {
        return w;
    }
    let (lo, up) = (_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
    let ninth = _mm_cvtsi32_si128(random_word(key, pair + 8) as i32);
    _mm256_set_m128i(
        _mm_alignr_epi8::<2>(ninth, up),
        _mm_alignr_epi8::<2>(up, lo),
    )
}

/// An element type that loads into, and rounds out of, lanes of `V`.
///
/// # Safety
/// Both methods need the instruction set of `V`, and `p..p + 16` in bounds.
pub(crate) trait Wide<V: Lanes>: super::element::Element {
    /// Sixteen elements from `p` as float32.
    unsafe fn load16(p: *const Self) -> V;
    /// Sixteen float32 lanes rounded into `p..p + 16`.
    unsafe fn store16(p: *mut Self, v: V);
    /// Sixteen float32 lanes rounded stochastically into `p..p + 16`, lane `l` with the random
    /// word in lane `l` of `r`, as [`super::element::Element::from_f32_stochastic`] rounds.
    unsafe fn store16_stochastic(p: *mut Self, v: V, r: V::Bits);
}

/// Two AVX2 registers: lanes 0..8, then 8..16.
#[derive(Clone, Copy)]
pub(crate) struct Avx2(__m256, __m256);

/// One AVX-512 register; `BF16` when the CPU also has AVX-512 BF16 (and DQ), whose one-instruction
/// rounding to bf16 is used where it gives the same bits (all but subnormal inputs).
#[derive(Clone, Copy)]
pub(crate) struct Avx512<const BF16: bool>(__m512);

impl Lanes for Avx2 {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Avx2(_mm256_setzero_ps(), _mm256_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Avx2(_mm256_set1_ps(v), _mm256_set1_ps(v))
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        Avx2(_mm256_add_ps(self.0, o.0), _mm256_add_ps(self.1, o.1))
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        Avx2(_mm256_sub_ps(self.0, o.0), _mm256_sub_ps(self.1, o.1))
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        Avx2(_mm256_mul_ps(self.0, o.0), _mm256_mul_ps(self.1, o.1))
    }
    #[inline(always)]
    unsafe fn div(self, o: Self) -> Self {
        Avx2(_mm256_div_ps(self.0, o.0), _mm256_div_ps(self.1, o.1))
    }
    #[inline(always)]
    unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
        Avx2(
            _mm256_min_ps(hi.0, _mm256_max_ps(lo.0, self.0)),
            _mm256_min_ps(hi.1, _mm256_max_ps(lo.1, self.1)),
        )
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Avx2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm256_storeu_ps(p, self.0);
        _mm256_storeu_ps(p.add(8), self.1);
    }

    type Bits = (__m256i, __m256i);
    #[inline(always)]
    unsafe fn random_bits(key: RoundingKey, index: u64) -> Self::Bits {
        if low_half_wraps(index) {
            let a = random_bits16(key, index);
            let p = a.as_ptr() as *const __m256i;
            return (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)));
        }
        let h = random_halves16(key, index);
        (
            _mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)),
            _mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(h)),
        )
    }
    #[cfg(test)]
    #[inline(always)]
    unsafe fn bits_array(b: Self::Bits) -> [u32; 16] {
        let mut out = [0u32; 16];
        let p = out.as_mut_ptr() as *mut __m256i;
        _mm256_storeu_si256(p, b.0);
        _mm256_storeu_si256(p.add(1), b.1);
        out
    }
}

impl<const BF16: bool> Lanes for Avx512<BF16> {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Avx512(_mm512_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Avx512(_mm512_set1_ps(v))
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        Avx512(_mm512_add_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        Avx512(_mm512_sub_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        Avx512(_mm512_mul_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn div(self, o: Self) -> Self {
        Avx512(_mm512_div_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
        Avx512(_mm512_min_ps(hi.0, _mm512_max_ps(lo.0, self.0)))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Avx512(_mm512_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm512_storeu_ps(p, self.0)
    }

    type Bits = __m512i;
    #[inline(always)]
    unsafe fn random_bits(key: RoundingKey, index: u64) -> __m512i {
        if low_half_wraps(index) {
            return _mm512_loadu_si512(random_bits16(key, index).as_ptr() as *const _);
        }
        _mm512_cvtepu16_epi32(random_halves16(key, index))
    }
    #[inline(always)]
    unsafe fn random_bits32(key: RoundingKey, index: u64) -> (__m512i, __m512i) {
        let pair = index >> 1;
        if index & 1 == 1 || (pair as u32) > u32::MAX - 16 {
            return (
                Self::random_bits(key, index),
                Self::random_bits(key, index + 16),
            );
        }
        // Sixteen generator words in one register: their 32 halves are the 32 elements.
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let idx = _mm512_add_epi32(_mm512_set1_epi32(pair as u32 as i32), iota);
        let x = _mm512_xor_si512(idx, _mm512_set1_epi32(key.0[0] as i32));
        let w = hash32_16(x, middle_key(key, pair));
        (
            _mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)),
            _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(w)),
        )
    }
    #[cfg(test)]
    #[inline(always)]
    unsafe fn bits_array(b: __m512i) -> [u32; 16] {
        let mut out = [0u32; 16];
        _mm512_storeu_si512(out.as_mut_ptr() as *mut _, b);
        out
    }
}

impl<V: Lanes> Wide<V> for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> V {
        V::load(p)
    }
    #[inline(always)]
    unsafe fn store16(p: *mut f32, v: V) {
        v.store(p)
    }
    #[inline(always)]
    unsafe fn store16_stochastic(p: *mut f32, v: V, _: V::Bits) {
        v.store(p)
    }
}

/// Eight 32-bit lanes holding 16-bit values, twice, narrowed into `p..p + 16` in order.
#[inline(always)]
unsafe fn narrow16_avx2(a: __m256i, b: __m256i, p: *mut u16) {
    // Every lane fits in 16 bits, so the unsigned saturating pack only narrows; it packs
    // within 128-bit halves, and the permute puts the four quarters in order.
    let packed = _mm256_packus_epi32(a, b);
    let ordered = _mm256_permute4x64_epi64::<0b11_01_10_00>(packed);
    _mm256_storeu_si256(p as *mut __m256i, ordered);
}

/// `bf16_stochastic` on eight lanes, as 32-bit lanes holding the 16-bit results: the random
/// low half added below the kept bits, truncated; NaN kept quiet as rounding to nearest does.
#[inline(always)]
unsafe fn bf16_stochastic_bits8(v: __m256, r: __m256i) -> __m256i {
    let x = _mm256_castps_si256(v);
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    // `r` holds 16-bit values (see `Lanes::random_bits`); a NaN lane adds nothing and gets the
    // quiet bit instead.
    let sum = _mm256_add_epi32(x, _mm256_andnot_si256(nan, r));
    let quiet = _mm256_and_si256(nan, _mm256_set1_epi32(0x0040_0000));
    _mm256_srli_epi32::<16>(_mm256_or_si256(sum, quiet))
}

/// `f16_stochastic` on eight lanes in float16's normal range (`2^-14 <= |x| <= 65504`):
/// 13 random bits added below the kept ones, truncated. Returns the 16-bit results in 32-bit
/// lanes and whether every lane was in that range.
#[inline(always)]
unsafe fn f16_stochastic_bits8(v: __m256, r: __m256i) -> (__m256i, bool) {
    let x = _mm256_castps_si256(v);
    let m = _mm256_and_si256(x, _mm256_set1_epi32(0x7FFF_FFFF));
    let small = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3880_0000), m);
    let large = _mm256_cmpgt_epi32(m, _mm256_set1_epi32(0x477F_E000));
    let normal = _mm256_testz_si256(_mm256_or_si256(small, large), _mm256_set1_epi32(-1)) == 1;
    let low = _mm256_and_si256(r, _mm256_set1_epi32(0x1FFF));
    let up = _mm256_srli_epi32::<13>(_mm256_add_epi32(m, low));
    let mag = _mm256_sub_epi32(up, _mm256_set1_epi32(0x1_C000));
    let sign = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(0x8000));
    (_mm256_or_si256(sign, mag), normal)
}

/// `f16_stochastic` on eight lanes, every case: `normal` holds the lanes of float16's normal
/// range (from [`f16_stochastic_bits8`]); below 2^-14 the magnitude in quanta of 2^-24 is split
/// into whole quanta `k` and a fraction whose first 16 bits are compared with the random bits
/// (the variable shifts give 0 for counts above 31, which covers zeros and the values far below
/// one quantum); overflow and NaN take the hardware conversion to nearest, as `half` rounds them.
#[inline(always)]
unsafe fn f16_stochastic_any8(v: __m256, r: __m256i, normal: __m256i) -> __m256i {
    let x = _mm256_castps_si256(v);
    let m = _mm256_and_si256(x, _mm256_set1_epi32(0x7FFF_FFFF));
    let small = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3880_0000), m);
    let large = _mm256_cmpgt_epi32(m, _mm256_set1_epi32(0x477F_E000));
    let e = _mm256_srli_epi32::<23>(m);
    let mant = _mm256_or_si256(
        _mm256_and_si256(m, _mm256_set1_epi32(0x7F_FFFF)),
        _mm256_set1_epi32(0x80_0000),
    );
    let s = _mm256_sub_epi32(_mm256_set1_epi32(126), e);
    let k = _mm256_srlv_epi32(mant, s);
    let frac = _mm256_sub_epi32(mant, _mm256_sllv_epi32(k, s));
    let sixteen = _mm256_set1_epi32(16);
    let first16 = _mm256_or_si256(
        _mm256_srlv_epi32(frac, _mm256_sub_epi32(s, sixteen)),
        _mm256_sllv_epi32(frac, _mm256_sub_epi32(sixteen, s)),
    );
    let r16 = _mm256_and_si256(r, _mm256_set1_epi32(0xFFFF));
    // -1 where the lane rounds up.
    let up = _mm256_cmpgt_epi32(first16, r16);
    let sign = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(0x8000));
    let sub = _mm256_or_si256(sign, _mm256_sub_epi32(k, up));
    let bits = _mm256_blendv_epi8(normal, sub, small);
    let nearest = _mm256_cvtepu16_epi32(_mm256_cvtps_ph::<F16_ROUNDING>(v));
    _mm256_blendv_epi8(bits, nearest, large)
}

/// Eight bf16 as float32: a bf16 is the top half of an f32.
#[inline(always)]
unsafe fn bf16_load8(p: *const bf16) -> __m256 {
    let h = _mm_loadu_si128(p as *const __m128i);
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

/// `f32_to_bf16_bits` on eight lanes, as 32-bit lanes holding the 16-bit results: round to
/// nearest even by adding 0x7FFF plus the lowest kept bit (a carry into bit 16 is the
/// round-up), NaN kept quiet.
#[inline(always)]
unsafe fn bf16_bits8(v: __m256) -> __m256i {
    let x = _mm256_castps_si256(v);
    let abs = _mm256_and_si256(x, _mm256_set1_epi32(0x7FFF_FFFF));
    let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7F80_0000));
    let top = _mm256_srli_epi32::<16>(x);
    let lsb = _mm256_and_si256(top, _mm256_set1_epi32(1));
    let biased = _mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    let rounded = _mm256_srli_epi32::<16>(biased);
    let quiet = _mm256_or_si256(top, _mm256_set1_epi32(0x40));
    _mm256_blendv_epi8(rounded, quiet, nan)
}

impl Wide<Avx2> for bf16 {
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> Avx2 {
        Avx2(bf16_load8(p), bf16_load8(p.add(8)))
    }
    #[inline(always)]
    unsafe fn store16(p: *mut bf16, v: Avx2) {
        narrow16_avx2(bf16_bits8(v.0), bf16_bits8(v.1), p as *mut u16);
    }
    #[inline(always)]
    unsafe fn store16_stochastic(p: *mut bf16, v: Avx2, r: (__m256i, __m256i)) {
        let a = bf16_stochastic_bits8(v.0, r.0);
        narrow16_avx2(a, bf16_stochastic_bits8(v.1, r.1), p as *mut u16);
    }
}

impl<const BF16: bool> Wide<Avx512<BF16>> for bf16 {
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> Avx512<BF16> {
        let h = _mm256_loadu_si256(p as *const __m256i);
        Avx512(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(
            _mm512_cvtepu16_epi32(h),
        )))
    }
    #[inline(always)]
    unsafe fn store16(p: *mut bf16, v: Avx512<BF16>) {
        if BF16 {
            // The instruction rounds to nearest even and quiets NaN as `half` does, but flushes
            // subnormal inputs to zero: those (rare) vectors take the integer path.
            let subnormal = _mm512_fpclass_ps_mask::<0x20>(v.0);
            if subnormal == 0 {
                let r = _mm512_cvtneps_pbh(v.0);
                _mm256_storeu_si256(
                    p as *mut __m256i,
                    std::mem::transmute::<__m256bh, __m256i>(r),
                );
                return;
            }
        }
        // As `bf16_bits8`, on sixteen lanes.
        let x = _mm512_castps_si512(v.0);
        let abs = _mm512_and_si512(x, _mm512_set1_epi32(0x7FFF_FFFF));
        let nan = _mm512_cmpgt_epi32_mask(abs, _mm512_set1_epi32(0x7F80_0000));
        let top = _mm512_srli_epi32::<16>(x);
        let lsb = _mm512_and_si512(top, _mm512_set1_epi32(1));
        let biased = _mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
        let rounded = _mm512_srli_epi32::<16>(biased);
        let quiet = _mm512_or_si512(top, _mm512_set1_epi32(0x40));
        let bits = _mm512_mask_blend_epi32(nan, rounded, quiet);
        // Every lane fits in 16 bits: narrowing keeps it.
        _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(bits));
    }
    #[inline(always)]
    unsafe fn store16_stochastic(p: *mut bf16, v: Avx512<BF16>, r: __m512i) {
        // As `bf16_stochastic_bits8`, on sixteen lanes.
        let x = _mm512_castps_si512(v.0);
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v.0, v.0);
        let quiet = _mm512_or_si512(x, _mm512_set1_epi32(0x0040_0000));
        let sum = _mm512_mask_add_epi32(quiet, !nan, x, r);
        _mm256_storeu_si256(p as *mut __m256i, upper_halves(sum));
    }
}

/// The upper 16 bits of each 32-bit lane, in order: one word permute, where a shift and a
/// narrowing move take three operations.
#[inline(always)]
unsafe fn upper_halves(v: __m512i) -> __m256i {
    let odd = _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11,
        9, 7, 5, 3, 1,
    );
    _mm512_castsi512_si256(_mm512_permutexvar_epi16(odd, v))
}

/// The hardware conversions round to nearest even, as `half` does.
const F16_ROUNDING: i32 = _MM_FROUND_TO_NEAREST_INT;

impl Wide<Avx2> for f16 {
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> Avx2 {
        Avx2(
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            _mm256_cvtph_ps(_mm_loadu_si128(p.add(8) as *const __m128i)),
        )
    }
    #[inline(always)]
    unsafe fn store16(p: *mut f16, v: Avx2) {
        _mm_storeu_si128(p as *mut __m128i, _mm256_cvtps_ph::<F16_ROUNDING>(v.0));
        _mm_storeu_si128(
            p.add(8) as *mut __m128i,
            _mm256_cvtps_ph::<F16_ROUNDING>(v.1),
        );
    }
    #[inline(always)]
    unsafe fn store16_stochastic(p: *mut f16, v: Avx2, r: (__m256i, __m256i)) {
        let ((a, an), (b, bn)) = (
            f16_stochastic_bits8(v.0, r.0),
            f16_stochastic_bits8(v.1, r.1),
        );
        if an && bn {
            narrow16_avx2(a, b, p as *mut u16);
        } else {
            // Subnormal results, zeros, overflow, NaN (rare in weights): every case per lane.
            let a = f16_stochastic_any8(v.0, r.0, a);
            narrow16_avx2(a, f16_stochastic_any8(v.1, r.1, b), p as *mut u16);
        }
    }
}

impl<const BF16: bool> Wide<Avx512<BF16>> for f16 {
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> Avx512<BF16> {
        Avx512(_mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)))
    }
    #[inline(always)]
    unsafe fn store16(p: *mut f16, v: Avx512<BF16>) {
        _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtps_ph::<F16_ROUNDING>(v.0));
    }
    #[inline(always)]
    unsafe fn store16_stochastic(p: *mut f16, v: Avx512<BF16>, r: __m512i) {
        // As `f16_stochastic_bits8`, on sixteen lanes.
        let x = _mm512_castps_si512(v.0);
        let m = _mm512_and_si512(x, _mm512_set1_epi32(0x7FFF_FFFF));
        let normal = _mm512_cmpge_epi32_mask(m, _mm512_set1_epi32(0x3880_0000))
            & _mm512_cmple_epi32_mask(m, _mm512_set1_epi32(0x477F_E000));
        let low = _mm512_and_si512(r, _mm512_set1_epi32(0x1FFF));
        let up = _mm512_srli_epi32::<13>(_mm512_add_epi32(m, low));
        let mag = _mm512_sub_epi32(up, _mm512_set1_epi32(0x1_C000));
        let sign = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(0x8000));
        let mut bits = _mm512_or_si512(sign, mag);
        if normal != 0xFFFF {
            // Subnormal results and zeros (in quanta of 2^-24, as `f16_stochastic_any8` computes
            // them), then overflow and NaN, rounded to nearest by the hardware
            // conversion as `half` rounds them (rare in weights).
            let small = _mm512_cmplt_epi32_mask(m, _mm512_set1_epi32(0x3880_0000));
            let large = _mm512_cmpgt_epi32_mask(m, _mm512_set1_epi32(0x477F_E000));
            let e = _mm512_srli_epi32::<23>(m);
            let mant = _mm512_or_si512(
                _mm512_and_si512(m, _mm512_set1_epi32(0x7F_FFFF)),
                _mm512_set1_epi32(0x80_0000),
            );
            let s = _mm512_sub_epi32(_mm512_set1_epi32(126), e);
            let k = _mm512_srlv_epi32(mant, s);
            let frac = _mm512_sub_epi32(mant, _mm512_sllv_epi32(k, s));
            let sixteen = _mm512_set1_epi32(16);
            let first16 = _mm512_or_si512(
                _mm512_srlv_epi32(frac, _mm512_sub_epi32(s, sixteen)),
                _mm512_sllv_epi32(frac, _mm512_sub_epi32(sixteen, s)),
            );
            let r16 = _mm512_and_si512(r, _mm512_set1_epi32(0xFFFF));
            let up = _mm512_cmpgt_epi32_mask(first16, r16);
            let quanta = _mm512_mask_add_epi32(k, up, k, _mm512_set1_epi32(1));
            bits = _mm512_mask_blend_epi32(small, bits, _mm512_or_si512(sign, quanta));
            let nearest = _mm512_cvtepu16_epi32(_mm512_cvtps_ph::<F16_ROUNDING>(v.0));
            bits = _mm512_mask_blend_epi32(large, bits, nearest);
        }
        _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(bits));
    }
}
