//! The row loops of the factored passes per element type, dispatched to the portable loops
//! ([`super::portable`]) or their vector twins by the instruction set [`cpu::simd`] picked.

use super::cpu;
use super::element::Element;
use super::grad::Grad;
use super::portable;
use super::row_args::{Pass1Rows, Pass1Sums, RowUpdate};
#[cfg(target_arch = "x86_64")]
use super::wide;
use half::{bf16, f16};

/// An [`Element`] with the factored passes' row loops.
pub trait RowLoops: Element {
    /// Pass 1's loop over whole rows of a factored variable: each row's float32 sum of `g^2` is
    /// pushed to `row_sums` and its squares added into `col`; with a fold, each row also adds
    /// `g^2 / r_i` into the fold's accumulator. Returns the sum of `x^2` after the optional
    /// decay. The gradient is read through its transform ([`Grad`]), applied as it is
    /// loaded. Hand-vectorised for `f32` and `bf16` on CPUs with AVX-512 or AVX2; same
    /// bits every way.
    #[inline(always)]
    fn pass1_rows(rows: Pass1Rows<'_, Self>, sums: Pass1Sums<'_>) -> f64 {
        portable::pass1_rows(rows, sums)
    }

    /// Pass 2's loop over whole rows of one slice of a factored variable:
    /// `sum_k a_k^2 sum_j ((s g_kj) b_j)^2`, `a` the rows' factors, `b` the slice's column
    /// factors (one per element of a row).
    #[inline(always)]
    fn pass2_rows(g: Grad<'_, Self>, b: &[f32], a: &[f32], s: f32) -> f64 {
        portable::pass2_rows(g, b, a, s)
    }

    /// Pass 3's loop over whole rows of a factored variable, the first being row `first_row`:
    /// `x = decay(x) - coef * a_i * (s g_ij) * b_j`, computed in f32 and rounded once.
    #[inline(always)]
    fn update_rows(x: &mut [Self], g: Grad<'_, Self>, first_row: usize, u: &RowUpdate<'_>) {
        portable::update_rows(x, g, first_row, u)
    }
}

/// Overrides the row loops of [`RowLoops`] with their AVX-512 or AVX2 twins when the CPU has
/// them.
macro_rules! wide_rows {
    () => {
        #[inline(always)]
        fn pass1_rows(rows: Pass1Rows<'_, Self>, sums: Pass1Sums<'_>) -> f64 {
            by_simd!(pass1_rows(rows, sums))
        }

        #[inline(always)]
        fn pass2_rows(g: Grad<'_, Self>, b: &[f32], a: &[f32], s: f32) -> f64 {
            by_simd!(pass2_rows(g, b, a, s))
        }

        #[inline(always)]
        fn update_rows(x: &mut [Self], g: Grad<'_, Self>, first_row: usize, u: &RowUpdate<'_>) {
            by_simd!(update_rows(x, g, first_row, u))
        }
    };
}

/// Calls the version of a row loop that [`cpu::simd`] picked.
macro_rules! by_simd {
    ($f:ident($($arg:expr),*)) => {
        // SAFETY (each arm): `cpu::simd()` only picks an instruction set the CPU has.
        match cpu::simd() {
            #[cfg(target_arch = "x86_64")]
            cpu::Simd::Avx512Bf16 => unsafe { wide::avx512_bf16::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            cpu::Simd::Avx512 => unsafe { wide::avx512::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            cpu::Simd::Avx2 => unsafe { wide::avx2::$f($($arg),*) },
            _ => portable::$f($($arg),*),
        }
    };
}

impl RowLoops for f32 {
    wide_rows!();
}

impl RowLoops for bf16 {
    wide_rows!();
}

impl RowLoops for f16 {
    wide_rows!();
}
