//! The element types of weights and gradients (`f32`, `bf16`, `f16`) and their conversions to
//! and from float32, in which all arithmetic is done.

use super::cpu;
use crate::rounding::{bf16_stochastic, f16_stochastic};
use half::{bf16, f16, slice::HalfFloatSliceExt};

/// A weight or gradient element type: converted to `f32` for all arithmetic.
pub trait Element: Copy + Send + Sync + 'static {
    /// True for `f32`, which every rounding writes exactly.
    const IS_F32: bool = false;
    /// Converts a slice to `f32` (`out.len() == src.len()`).
    fn load(src: &[Self], out: &mut [f32]);
    /// Rounds a slice of `f32` into this type (`out.len() == src.len()`).
    fn store(src: &[f32], out: &mut [Self]);
    /// The slice itself when this type is `f32` (lets kernels skip a conversion buffer).
    #[inline(always)]
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    /// The mutable slice itself when this type is `f32`.
    #[inline(always)]
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    /// True when the row kernels convert this type in registers, element by element, instead
    /// of through a float32 buffer.
    #[inline(always)]
    fn in_registers() -> bool {
        false
    }
    /// One element to `f32`.
    fn to_f32(self) -> f32;
    /// One `f32` rounded to this type (as [`Element::store`] rounds).
    fn from_f32(v: f32) -> Self;
    /// One `f32` rounded stochastically with the random word `r` ([`crate::rounding`]);
    /// `f32` itself is exact.
    fn from_f32_stochastic(v: f32, r: u32) -> Self;
}

impl Element for f32 {
    const IS_F32: bool = true;
    #[inline(always)]
    fn load(src: &[f32], out: &mut [f32]) {
        out.copy_from_slice(src);
    }
    #[inline(always)]
    fn store(src: &[f32], out: &mut [f32]) {
        out.copy_from_slice(src);
    }
    #[inline(always)]
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    #[inline(always)]
    fn as_f32_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
    #[inline(always)]
    fn in_registers() -> bool {
        true
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn from_f32_stochastic(v: f32, _: u32) -> f32 {
        v
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn load(src: &[bf16], out: &mut [f32]) {
        // A bf16 is the top half of an f32.
        for (o, v) in out.iter_mut().zip(src) {
            *o = f32::from_bits((v.to_bits() as u32) << 16);
        }
    }
    #[inline(always)]
    fn store(src: &[f32], out: &mut [bf16]) {
        for (o, v) in out.iter_mut().zip(src) {
            // Not `Self::from_f32`: inside this impl that names `half`'s own (inherent)
            // conversion, which vectorises to more instructions than ours.
            *o = bf16::from_bits(f32_to_bf16_bits(*v));
        }
    }
    #[inline(always)]
    fn in_registers() -> bool {
        true
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // A bf16 is the top half of an f32.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> bf16 {
        bf16::from_bits(f32_to_bf16_bits(v))
    }
    #[inline(always)]
    fn from_f32_stochastic(v: f32, r: u32) -> bf16 {
        bf16_stochastic(v, r)
    }
}

/// `half::bf16::from_f32`, bit for bit (round to nearest even, NaN kept quiet), written without
/// branches so that it vectorises: adding 0x7FFF plus the lowest kept bit carries into the kept
/// bits exactly when the value rounds up (as the AVX2 and AVX-512 row loops round, `simd.rs`),
/// fewer instructions than testing the round bit and the sticky bits.
#[inline(always)]
fn f32_to_bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    // Signed compare (the masked value fits in i31): vectorises without unsigned compares.
    let nan = ((x & 0x7FFF_FFFF) as i32) > 0x7F80_0000;
    let kept = x >> 16;
    // No finite value or infinity carries out of 32 bits (the largest, -infinity, is
    // 0xFF80_0000); NaNs, which may, take the quiet value instead.
    let rounded = x.wrapping_add(0x7FFF + (kept & 1)) >> 16;
    (if nan { kept | 0x0040 } else { rounded }) as u16
}

impl Element for f16 {
    #[inline(always)]
    fn load(src: &[f16], out: &mut [f32]) {
        src.convert_to_f32_slice(out);
    }
    #[inline(always)]
    fn store(src: &[f32], out: &mut [f16]) {
        out.convert_from_f32_slice(src);
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    /// Only with the vector twins: one at a time, `half`'s conversions are far slower than
    /// its slice conversions.
    #[inline(always)]
    fn in_registers() -> bool {
        cpu::simd() >= cpu::Simd::Avx2
    }
    #[inline(always)]
    fn from_f32(v: f32) -> f16 {
        f16::from_f32(v)
    }
    #[inline(always)]
    fn from_f32_stochastic(v: f32, r: u32) -> f16 {
        f16_stochastic(v, r)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Values that exercise every bf16 rounding case: ties to even, just above and below a tie,
    /// around every exponent, NaNs, infinities and the extremes.
    pub(crate) fn bf16_rounding_probes() -> Vec<f32> {
        let mut probes: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1e-40,
            3.3895314e38,
        ];
        // Every rounding case: ties to even, just above and below a tie, around every exponent.
        let mut x = 0x0001_0000u32;
        while x < 0x7F80_0000 {
            for d in [0u32, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x18000] {
                probes.push(f32::from_bits(x + d));
                probes.push(-f32::from_bits(x + d));
            }
            x = x.wrapping_mul(3) / 2 + 0x1_0000;
        }
        probes.push(f32::from_bits(0x7FC0_1234));
        probes.push(f32::from_bits(0x7F80_0001));
        probes
    }

    /// Our branch-free conversion (the slice store and the one-value one) against `half`'s
    /// (`bf16::from_f32`, the inherent function).
    #[test]
    fn bf16_conversion_matches_half_bit_for_bit() {
        let probes = bf16_rounding_probes();
        let mut ours = vec![bf16::ZERO; probes.len()];
        <bf16 as Element>::store(&probes, &mut ours);
        for (p, o) in probes.iter().zip(&ours) {
            let half = bf16::from_f32(*p).to_bits();
            let what = format!("{p:e} ({:#x})", p.to_bits());
            assert_eq!(o.to_bits(), half, "slice store of {what}");
            let one = <bf16 as Element>::from_f32(*p).to_bits();
            assert_eq!(one, half, "one value: {what}");
        }
        let mut back = vec![0f32; ours.len()];
        bf16::load(&ours, &mut back);
        for (o, b) in ours.iter().zip(&back) {
            assert_eq!(o.to_f32().to_bits(), b.to_bits());
        }
    }
}
