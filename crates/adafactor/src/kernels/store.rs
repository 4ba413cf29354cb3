//! How a kernel writes a float32 result into a weight: the one primitive every weight store
//! goes through, so that `weight_rounding` applies to every kernel alike.
//!
//! A kernel gets a [`Rounding`] and the index of its first element in the whole tensor, and
//! stores each element with [`Rounding::store`]`(x, index)` (or a slice with
//! [`Rounding::store_slice`]). Hot loops take a [`Store`] type parameter instead, chosen once
//! per call with `with_store!`: [`Nearest`] compiles to the plain conversion, [`Stochastic`]
//! to [`crate::rounding`]'s generator and rounding, so nearest rounding costs nothing extra.
//! The random bits depend only on the key and the element's index, never on how work is split
//! or which instruction set runs, so every version gives the same bits.

use super::element::Element;
use crate::rounding::{random_bits, RoundingKey, RoundingStream, StepRounding};

/// The rounding of one tensor's weight write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rounding {
    /// Round to nearest even (Keras's behaviour).
    #[default]
    Nearest,
    /// Stochastic rounding with this tensor's key.
    Stochastic(RoundingKey),
}

impl Rounding {
    /// The rounding of variable `var`'s write `stream` in a step: stochastic when the step has
    /// a [`StepRounding`], else nearest.
    pub fn for_variable(step: Option<StepRounding>, var: usize, stream: RoundingStream) -> Self {
        match step {
            Some(s) => Rounding::Stochastic(s.key(var, stream)),
            None => Rounding::Nearest,
        }
    }

    /// Element `index` of the tensor, `x` rounded into `T`.
    #[inline(always)]
    pub fn store<T: Element>(self, x: f32, index: u64) -> T {
        match self {
            Rounding::Nearest => Nearest.store(x, index),
            Rounding::Stochastic(k) => Stochastic(k).store(x, index),
        }
    }

    /// `dst[i] = src[i]` rounded into `T`, `dst[0]` being element `offset` of the tensor.
    #[inline(always)]
    pub fn store_slice<T: Element>(self, src: &[f32], dst: &mut [T], offset: u64) {
        match self {
            Rounding::Nearest => T::store(src, dst),
            Rounding::Stochastic(_) if T::IS_F32 => T::store(src, dst),
            Rounding::Stochastic(k) => {
                for (i, (d, &x)) in dst.iter_mut().zip(src).enumerate() {
                    *d = Stochastic(k).store(x, offset + i as u64);
                }
            }
        }
    }

    /// Nearest for `f32` weights (written exactly either way: no bits to draw), else `self`.
    #[inline(always)]
    pub fn for_type<T: Element>(self) -> Self {
        if T::IS_F32 {
            Rounding::Nearest
        } else {
            self
        }
    }
}

/// A weight store fixed at compile time (chosen once per call by `with_store!`).
pub trait Store: Copy + Send + Sync {
    /// The stochastic key, when this store draws bits (the vector loops draw them sixteen at a
    /// time themselves).
    fn key(self) -> Option<RoundingKey>;

    /// Element `index` of the tensor, `x` rounded into `T`.
    fn store<T: Element>(self, x: f32, index: u64) -> T;
}

/// Round to nearest even.
#[derive(Debug, Clone, Copy)]
pub struct Nearest;

/// Stochastic rounding with a tensor's key.
#[derive(Debug, Clone, Copy)]
pub struct Stochastic(pub RoundingKey);

impl Store for Nearest {
    #[inline(always)]
    fn key(self) -> Option<RoundingKey> {
        None
    }
    #[inline(always)]
    fn store<T: Element>(self, x: f32, _: u64) -> T {
        T::from_f32(x)
    }
}

impl Store for Stochastic {
    #[inline(always)]
    fn key(self) -> Option<RoundingKey> {
        Some(self.0)
    }
    #[inline(always)]
    fn store<T: Element>(self, x: f32, index: u64) -> T {
        T::from_f32_stochastic(x, random_bits(self.0, index))
    }
}

/// Runs `$body` with `$s` bound to the [`Store`] of a [`Rounding`] (one instantiation each).
macro_rules! with_store {
    ($rounding:expr, $s:ident => $body:expr) => {
        match $rounding {
            $crate::kernels::Rounding::Nearest => {
                let $s = $crate::kernels::store::Nearest;
                $body
            }
            $crate::kernels::Rounding::Stochastic(k) => {
                let $s = $crate::kernels::store::Stochastic(k);
                $body
            }
        }
    };
}
pub(crate) use with_store;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rounding::{bf16_stochastic, f16_stochastic};
    use half::{bf16, f16};

    #[test]
    fn stores_follow_the_reference() {
        let key = RoundingKey::new(5, 6, 7, RoundingStream::Update);
        let src: Vec<f32> = (0..300).map(|i| 0.3 + i as f32 * 1.7e-5).collect();
        let s = Rounding::Stochastic(key);
        let mut b = vec![bf16::ZERO; 200];
        s.store_slice(&src[100..], &mut b, 100);
        let mut h = vec![f16::ZERO; 200];
        s.store_slice(&src[100..], &mut h, 100);
        for (i, x) in src[100..].iter().enumerate() {
            let r = random_bits(key, 100 + i as u64);
            assert_eq!(b[i], bf16_stochastic(*x, r));
            assert_eq!(h[i], f16_stochastic(*x, r));
            assert_eq!(s.store::<bf16>(*x, 100 + i as u64), b[i]);
        }
        // Nearest is the plain conversion; float32 is exact under both.
        assert_eq!(
            Rounding::Nearest.store::<bf16>(src[7], 7),
            bf16::from_f32(src[7])
        );
        assert_eq!(s.store::<f32>(src[7], 7), src[7]);
        assert_eq!(s.for_type::<f32>(), Rounding::Nearest);
        // Stochastic rounding moves some of these values up and some down.
        let near: Vec<bf16> = src[100..].iter().map(|x| bf16::from_f32(*x)).collect();
        let differ = near.iter().zip(&b).filter(|(a, b)| a != b).count();
        assert!(differ > 10 && differ < 190, "{differ} of 200 differ");
    }
}
