//! Per-variable second-moment statistics, always float32.
//!
//! A factored variable (rank >= 2, shape `[..., n, m]`) keeps only its row statistics `r`
//! (`[..., n]`) and column statistics `c` (`[..., m]`): the full-size `v` Keras also stores is
//! `r_i * c_j / mean(r)` and is recomputed each step (Shazeer & Stern, 2018, arXiv:1804.04235,
//! Algorithm 4). Rank 0 and 1 variables keep `v`.

use crate::error::{Error, Result};

/// How a variable of a given shape is factored: the last two axes are `n x m`, the leading axes
/// form `lead` independent slices (each normalised by its own `mean(r)`, as Keras does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Factoring {
    /// Product of the leading axes (1 for a matrix).
    pub lead: usize,
    /// Second-to-last axis.
    pub n: usize,
    /// Last axis.
    pub m: usize,
}

impl Factoring {
    /// `Some` for rank >= 2 shapes, `None` for scalars and vectors.
    pub fn of(shape: &[usize]) -> Option<Factoring> {
        let rank = shape.len();
        (rank >= 2).then(|| Factoring {
            lead: shape[..rank - 2].iter().product(),
            n: shape[rank - 2],
            m: shape[rank - 1],
        })
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
    /// Zero statistics for a variable of `shape`.
    pub fn zeros(shape: &[usize]) -> Stats {
        match Factoring::of(shape) {
            Some(f) => Stats::Factored {
                factoring: f,
                r: vec![0.0; f.lead * f.n],
                c: vec![0.0; f.lead * f.m],
            },
            None => Stats::Unfactored {
                v: vec![0.0; shape.iter().product()],
            },
        }
    }

    /// The slot names and shapes of a variable of `var_shape`: `r` (`[..., n]`) and `c`
    /// (`[..., m]`) for rank >= 2, else `v` (the variable's shape).
    pub fn slot_shapes(var_shape: &[usize]) -> Vec<(&'static str, Vec<usize>)> {
        let rank = var_shape.len();
        if rank >= 2 {
            let r = var_shape[..rank - 1].to_vec();
            let mut c = var_shape[..rank - 2].to_vec();
            c.push(var_shape[rank - 1]);
            vec![("r", r), ("c", c)]
        } else {
            vec![("v", var_shape.to_vec())]
        }
    }

    /// The slots as `(suffix, shape, values)`: `r` and `c`, or `v`.
    pub fn slots(&self, var_shape: &[usize]) -> Vec<(&'static str, Vec<usize>, &[f32])> {
        let values: Vec<&[f32]> = match self {
            Stats::Factored { r, c, .. } => vec![r, c],
            Stats::Unfactored { v } => vec![v],
        };
        Self::slot_shapes(var_shape)
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
