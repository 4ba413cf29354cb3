//! Per-variable second-moment statistics, always float32.
//!
//! A factored variable (rank >= 2, shape `[..., n, m]`) keeps only its row statistics `r`
//! (`[..., n]`) and column statistics `c` (`[..., m]`): the full-size `v` Keras also stores is
//! `r_i * c_j / mean(r)` and is recomputed each step (Shazeer & Stern, 2018, arXiv:1804.04235,
//! Algorithm 4). Rank 0 and 1 variables keep `v`.

use crate::axes::{batch_dims, FactoredAxes, Strided};
use crate::error::{Error, Result};

/// Float32 elements per 4 KiB memory page.
const PAGE_ELEMS: usize = 4096 / std::mem::size_of::<f32>();

/// `len` float32 zeros whose memory pages are already mapped, by a write to each page.
///
/// A large zeroed allocation comes from the operating system with no page mapped. A buffer
/// that the first step reads before it writes it (an EMA average, an accumulator, a vector's
/// statistics) then maps the shared zero page on the read and copies it on the write: two
/// faults per 4 KiB page, the second of which also flushes the page from the other cores'
/// translation buffers. On a 2-core machine that made the first step of t5-small with
/// `use_ema` take 424 ms instead of about 28 ms. Written first, each page faults once, here.
///
/// ```
/// let v = adafactor::touched_zeros(10_000);
/// assert_eq!(v.len(), 10_000);
/// assert!(v.iter().all(|x| x.to_bits() == 0));
/// ```
pub fn touched_zeros(len: usize) -> Vec<f32> {
    let mut v = vec![0f32; len];
    for i in (0..len).step_by(PAGE_ELEMS) {
        // A value the compiler cannot see, so that the store of the zero already there stays.
        v[i] = std::hint::black_box(0.0);
    }
    v
}

/// How a variable of a given shape is factored: `lead` independent `n x m` matrices (each
/// normalised by its own `mean(r)`, as Keras does). By default the matrices are the last two
/// axes; with other [`FactoredAxes`] they are strided through the variable ([`Strided`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Factoring {
    /// Number of matrices: product of the leading (batch) axes (1 for a matrix).
    pub lead: usize,
    /// Rows: the second-to-last axis, or the `row` axis.
    pub n: usize,
    /// Columns: the last axis, or the `col` axis.
    pub m: usize,
    /// `None` for the last two axes (Keras's choice); the layout for other axes.
    pub strided: Option<Strided>,
}

impl Factoring {
    /// `Some` for rank >= 2 shapes, `None` for scalars and vectors (Keras's last two axes).
    pub fn of(shape: &[usize]) -> Option<Factoring> {
        let rank = shape.len();
        (rank >= 2).then(|| Factoring {
            lead: shape[..rank - 2].iter().product(),
            n: shape[rank - 2],
            m: shape[rank - 1],
            strided: None,
        })
    }

    /// The factoring of `shape` over `axes` (`None`: Keras's last two axes; naming the last two
    /// axes is the same). The axes must have passed [`FactoredAxes::check`].
    pub fn with_axes(shape: &[usize], axes: Option<FactoredAxes>) -> Option<Factoring> {
        match axes {
            Some(a) if Some(a) != FactoredAxes::keras(shape.len()) => {
                let s = Strided::of(shape, a);
                let (n, m) = s.rows_cols();
                Some(Factoring {
                    lead: s.batch(),
                    n,
                    m,
                    strided: Some(s),
                })
            }
            _ => Factoring::of(shape),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.lead * self.n * self.m
    }

    /// True for a variable with no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The second-moment statistics of one variable.
#[derive(Debug, Clone, PartialEq)]
pub enum Stats {
    /// Row and column statistics of a rank >= 2 variable.
    Factored {
        /// The shape split.
        factoring: Factoring,
        /// Row statistics, `lead * n` values (shape `[..., n]`).
        r: Vec<f32>,
        /// Column statistics, `lead * m` values (shape `[..., m]`).
        c: Vec<f32>,
    },
    /// The full second moment of a scalar or vector.
    Unfactored {
        /// One value per element.
        v: Vec<f32>,
    },
}

impl Stats {
    /// Zero statistics for a variable of `shape`, factored over its last two axes.
    pub fn zeros(shape: &[usize]) -> Stats {
        Self::zeros_with(shape, None)
    }

    /// Zero statistics for a variable of `shape` factored over `axes` (`None`: the last two).
    pub fn zeros_with(shape: &[usize], axes: Option<FactoredAxes>) -> Stats {
        match Factoring::with_axes(shape, axes) {
            Some(f) => Stats::Factored {
                factoring: f,
                r: touched_zeros(f.lead * f.n),
                c: touched_zeros(f.lead * f.m),
            },
            None => Stats::Unfactored {
                v: touched_zeros(shape.iter().product()),
            },
        }
    }

    /// The slot names and shapes of a variable of `var_shape`: `r` (`[..., n]`) and `c`
    /// (`[..., m]`) for rank >= 2, else `v` (the variable's shape).
    pub fn slot_shapes(var_shape: &[usize]) -> Vec<(&'static str, Vec<usize>)> {
        Self::slot_shapes_with(var_shape, None)
    }

    /// [`Stats::slot_shapes`] of a variable factored over `axes`: `r` is
    /// `[batch axes..., shape[row]]` and `c` is `[batch axes..., shape[col]]` (see
    /// [`crate::axes`] for why this order).
    pub fn slot_shapes_with(
        var_shape: &[usize],
        axes: Option<FactoredAxes>,
    ) -> Vec<(&'static str, Vec<usize>)> {
        let rank = var_shape.len();
        if let Some(a) = axes.filter(|a| Some(*a) != FactoredAxes::keras(rank)) {
            let mut r = batch_dims(var_shape, a);
            let mut c = r.clone();
            r.push(var_shape[a.row]);
            c.push(var_shape[a.col]);
            return vec![("r", r), ("c", c)];
        }
        if rank >= 2 {
            let r = var_shape[..rank - 1].to_vec();
            let mut c = var_shape[..rank - 2].to_vec();
            c.push(var_shape[rank - 1]);
            vec![("r", r), ("c", c)]
        } else {
            vec![("v", var_shape.to_vec())]
        }
    }

    /// The shape Keras gives the full-size velocity of a variable of `var_shape` factored over
    /// `axes`: the variable's own shape for the default axes, else
    /// `[batch axes..., shape[row], shape[col]]` (Keras's layout of the same matrices).
    pub fn velocity_shape(var_shape: &[usize], axes: Option<FactoredAxes>) -> Vec<usize> {
        match axes.filter(|a| Some(*a) != FactoredAxes::keras(var_shape.len())) {
            Some(a) => {
                let mut v = batch_dims(var_shape, a);
                v.extend([var_shape[a.row], var_shape[a.col]]);
                v
            }
            None => var_shape.to_vec(),
        }
    }

    /// The factored axes these statistics were built for (`None`: the last two, or unfactored).
    pub fn axes(&self) -> Option<FactoredAxes> {
        match self {
            Stats::Factored { factoring, .. } => factoring.strided.map(|s| s.axes),
            Stats::Unfactored { .. } => None,
        }
    }

    /// The slots as `(suffix, shape, values)`: `r` and `c`, or `v`.
    pub fn slots(&self, var_shape: &[usize]) -> Vec<(&'static str, Vec<usize>, &[f32])> {
        let values: Vec<&[f32]> = match self {
            Stats::Factored { r, c, .. } => vec![r, c],
            Stats::Unfactored { v } => vec![v],
        };
        Self::slot_shapes_with(var_shape, self.axes())
            .into_iter()
            .zip(values)
            .map(|((name, shape), v)| (name, shape, v))
            .collect()
    }

    /// Mutable access to the slots, in [`Stats::slots`] order.
    pub fn slots_mut(&mut self) -> Vec<&mut Vec<f32>> {
        match self {
            Stats::Factored { r, c, .. } => vec![r, c],
            Stats::Unfactored { v } => vec![v],
        }
    }

    /// Bytes held by the statistics.
    pub fn bytes(&self) -> usize {
        4 * match self {
            Stats::Factored { r, c, .. } => r.len() + c.len(),
            Stats::Unfactored { v } => v.len(),
        }
    }

    /// Replaces the values of every slot, checking lengths first (nothing changes on error).
    ///
    /// # Errors
    /// A slot of the wrong length, named `{name}/{slot}`.
    pub fn set_from(&mut self, name: &str, values: &[Vec<f32>]) -> Result<()> {
        let mut slots = self.slots_mut();
        if values.len() != slots.len() {
            return Err(Error::ShapeMismatch {
                what: format!("statistics of `{name}` (slot count)"),
                expected: vec![slots.len()],
                got: vec![values.len()],
            });
        }
        for (slot, v) in slots.iter().zip(values) {
            if slot.len() != v.len() {
                return Err(Error::ShapeMismatch {
                    what: format!("statistics of `{name}`"),
                    expected: vec![slot.len()],
                    got: vec![v.len()],
                });
            }
        }
        for (slot, v) in slots.iter_mut().zip(values) {
            slot.copy_from_slice(v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factored_state_is_rows_plus_columns() {
        let s = Stats::zeros(&[2, 3, 5]);
        let slots = s.slots(&[2, 3, 5]);
        assert_eq!(slots[0].1, vec![2, 3]);
        assert_eq!(slots[1].1, vec![2, 5]);
        assert_eq!(s.bytes(), 4 * (6 + 10));
        assert_eq!(Stats::zeros(&[7]).bytes(), 28);
        assert_eq!(Stats::zeros(&[]).bytes(), 4);
        // T5-small's embedding: 32128 + 512 floats, not 32128 * 512.
        assert_eq!(Stats::zeros(&[32128, 512]).bytes(), 4 * (32128 + 512));
    }

    #[test]
    fn set_from_checks_before_writing() {
        let mut s = Stats::zeros(&[2, 2]);
        let before = s.clone();
        assert!(s.set_from("w", &[vec![1.0, 2.0], vec![1.0]]).is_err());
        assert_eq!(s, before);
        s.set_from("w", &[vec![1.0, 2.0], vec![3.0, 4.0]]).unwrap();
        assert_eq!(s.slots(&[2, 2])[1].2, &[3.0, 4.0]);
    }
}
