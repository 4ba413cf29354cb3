//! The arguments of the factored passes' row loops, shared by the passes ([`super::factored`])
//! and the loops ([`super::portable`], the vector twins).

use super::grad::{Decay, Grad};
use super::store::Rounding;

/// Folds the row-statistics update into pass 1, which then also collects what RMS(u) needs, so
/// pass 2 is skipped (20 instead of 24 bytes per float32 parameter). Only valid when the
/// gradient scale is 1, i.e. without clipnorm or global_clipnorm, whose scale is known only
/// after pass 1 over every gradient.
///
/// Why it works: `u_ij^2 = g_ij^2 mean(r) / (r_i c_j)`, and `r_i` is known once row `i` has been
/// read, so `sum_ij u_ij^2 = mean(r) sum_j (sum_i g_ij^2 / r_i) / c_j`; the row is re-read from
/// cache, not memory.
#[derive(Debug, Clone, Copy)]
pub struct RowFold<'a> {
    /// The row statistics before this update.
    pub r_old: &'a [f32],
    /// `beta2_t`.
    pub beta2: f32,
    /// `epsilon_1`.
    pub epsilon_1: f32,
}

impl RowFold<'_> {
    /// `1 / r_i` for the new row statistic of `row`, from its sum of squares over `m` columns.
    #[inline(always)]
    pub(crate) fn inv_r(&self, row: usize, sum: f64, m: usize) -> f64 {
        1.0 / new_stat(self.r_old[row], sum, m, self.beta2, self.epsilon_1, 1.0) as f64
    }
}

/// A [`RowFold`] applied to a run of rows: their first row's index in the variable and the
/// accumulator of `sum_i g_ij^2 / r_i` per column.
#[derive(Debug)]
pub struct FoldRows<'a> {
    /// The fold's inputs.
    pub fold: RowFold<'a>,
    /// Index of the run's first row in the variable (rows of all slices counted in order).
    pub first_row: usize,
    /// Per-column accumulator (`m` values).
    pub w: &'a mut [f32],
    /// Scratch for two rows of squares (`2 m` values; a shorter one is replaced by an
    /// allocation), so that the fold does not convert and square the gradient again.
    pub squares: &'a mut [f32],
}

/// Pass 1's inputs for a run of whole rows.
#[derive(Debug, Clone, Copy)]
pub struct Pass1Rows<'a, T> {
    /// The gradient's rows (with their accumulator and transform, applied as they are read).
    pub g: Grad<'a, T>,
    /// The weight's rows.
    pub x: &'a [T],
    /// Row length.
    pub m: usize,
    /// The optional weight decay (RMS(x) is of the decayed weight).
    pub decay: Option<Decay>,
}

/// Where pass 1 adds a run of rows' sums.
#[derive(Debug)]
pub struct Pass1Sums<'a> {
    /// Float32 column sums of `g^2` (`m` values).
    pub col: &'a mut [f32],
    /// The optional row fold.
    pub fold: Option<FoldRows<'a>>,
    /// Each row's sum of `g^2` is pushed here.
    pub row_sums: &'a mut Vec<f64>,
    /// With a transformed gradient, `u * 0` of each unscaled value `u` is added here: NaN when
    /// one is not finite (checked before clamping, which could hide an infinity).
    pub probe: &'a mut f32,
}

/// What pass 3 needs for a run of rows: `x = decay(x) - coef * a_i * (s g_ij) * b_j`.
#[derive(Debug, Clone, Copy)]
pub struct RowUpdate<'a> {
    /// `b_j` per slice (`lead * m`).
    pub col_factor: &'a [f32],
    /// `a_i` per row (`lead * n`).
    pub row_factor: &'a [f32],
    /// Rows per slice.
    pub n: usize,
    /// Row length.
    pub m: usize,
    /// `alpha / max(1, RMS(u) / d)`.
    pub coef: f32,
    /// The norm-clipping scale `s`.
    pub grad_scale: f32,
    /// The optional weight decay.
    pub decay: Option<Decay>,
    /// How the new weights are rounded (element `j` of row `i` is element `i * m + j` of the
    /// variable).
    pub rounding: Rounding,
}

/// One statistic's update: `b2 * old + (1 - b2) * (s^2 sum / count + eps1)`, shared by pass 1's
/// fold and [`super::factored::prepare`] so both compute the same bits.
#[inline(always)]
pub(crate) fn new_stat(
    old: f32,
    sum: f64,
    count: usize,
    beta2: f32,
    epsilon_1: f32,
    s2: f64,
) -> f32 {
    // A zero scale (clipping by an overflowed norm) zeroes the gradient, even where its sum of
    // squares overflowed.
    let sq = if s2 == 0.0 { 0.0 } else { sum * s2 };
    let q = (sq / count as f64 + epsilon_1 as f64) as f32;
    beta2 * old + (1.0 - beta2) * q
}
