//! Which two axes of a variable are factored (ours, beyond Keras).
//!
//! Keras factors the last two axes of a rank >= 2 variable: for a gradient `[..., n, m]` the row
//! statistics are means over the last axis and the column statistics means over the one before,
//! and every leading index is a matrix of its own (Shazeer & Stern, 2018, arXiv:1804.04235,
//! Algorithm 4). A variable may name two other axes, `row` and `col`: row statistics are then
//! means over `col` (one per index of `row`), column statistics means over `row`, and every
//! other axis is a batch axis, each index with its own statistics.
//!
//! The reason is layout. Keras stores a convolution kernel as `[kh, kw, in, out]`, so it factors
//! `(in, out)` per kernel position; candle stores the same kernel as `[out, in, kh, kw]`, whose
//! last two axes are tiny. [`FactoredAxes::CONVOLUTION`] (`row = 1`, `col = 0`) on candle's
//! layout is exactly the optimizer Keras runs on its own.
//!
//! Storage order: row statistics have the shape `[batch axes..., shape[row]]` and column
//! statistics `[batch axes..., shape[col]]`, the batch axes in their order in the variable. For
//! the default axes this is Keras's `[..., n]` and `[..., m]`; for a candle convolution kernel
//! `[out, in, kh, kw]` it is `[kh, kw, in]` and `[kh, kw, out]`, Keras's own shapes for the same
//! convolution, so its `r` and `c` exchange with Keras as they are.

use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// The two factored axes of one variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FactoredAxes {
    /// The axis of the row statistics (one per index of this axis, means over `col`).
    pub row: usize,
    /// The axis of the column statistics (one per index of this axis, means over `row`).
    pub col: usize,
}

impl FactoredAxes {
    /// Candle's convolution weights `[out, in, k...]`: rows are the input channels (axis 1),
    /// columns the output channels (axis 0), each kernel position its own matrix, as Keras
    /// factors its `[k..., in, out]` kernels.
    pub const CONVOLUTION: FactoredAxes = FactoredAxes { row: 1, col: 0 };

    /// Keras's choice for a variable of `rank`: the last two axes (`None` below rank 2).
    ///
    /// ```
    /// use adafactor::FactoredAxes;
    /// assert_eq!(FactoredAxes::keras(4), Some(FactoredAxes { row: 2, col: 3 }));
    /// assert_eq!(FactoredAxes::keras(1), None);
    /// ```
    pub fn keras(rank: usize) -> Option<FactoredAxes> {
        (rank >= 2).then(|| FactoredAxes {
            row: rank - 2,
            col: rank - 1,
        })
    }

    /// Checks the pair on its own: two different axes.
    ///
    /// # Errors
    /// Equal axes, naming the variable and the value.
    pub fn check_pair(self, variable: &str) -> Result<()> {
        if self.row == self.col {
            return Err(Error::invalid(
                "factored_axes",
                format!(
                    "`factored_axes` of variable `{variable}` must name two different axes. \
                     Received: [{}, {}]",
                    self.row, self.col
                ),
            ));
        }
        Ok(())
    }

    /// Checks the pair against the variable's shape.
    ///
    /// # Errors
    /// Equal axes, or an axis out of range for the variable's rank (a variable of rank < 2
    /// has nothing to factor), naming the variable, the value and the shape.
    pub fn check(self, variable: &str, shape: &[usize]) -> Result<()> {
        self.check_pair(variable)?;
        let rank = shape.len();
        if self.row >= rank || self.col >= rank {
            return Err(Error::invalid(
                "factored_axes",
                format!(
                    "`factored_axes` of variable `{variable}` is [{}, {}], but the variable has \
                     shape {shape:?} (rank {rank}): each axis must be in [0, {rank})",
                    self.row, self.col
                ),
            ));
        }
        Ok(())
    }

    /// The factored axes of candle's convolution weights among `vars` (`(name, shape)`): every
    /// variable of rank 3 to 5 (`[out, in, k]`, `[out, in, kh, kw]`, `[out, in, kd, kh, kw]`)
    /// gets [`FactoredAxes::CONVOLUTION`]. Framework-free, for any adapter whose convolution
    /// weights are stored `[out, in, k...]`.
    ///
    /// ```
    /// use adafactor::FactoredAxes;
    /// let vars = [("conv/w", &[64usize, 3, 7, 7][..]), ("fc/w", &[10, 64][..]), ("b", &[64][..])];
    /// let axes = FactoredAxes::convolutions(vars);
    /// assert_eq!(axes.len(), 1);
    /// assert_eq!(axes["conv/w"], FactoredAxes::CONVOLUTION);
    /// ```
    pub fn convolutions<'a>(
        vars: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ) -> BTreeMap<String, FactoredAxes> {
        vars.into_iter()
            .filter(|(_, shape)| (3..=5).contains(&shape.len()))
            .map(|(name, _)| (name.to_string(), FactoredAxes::CONVOLUTION))
            .collect()
    }
}

/// A variable's shape seen from its factored axes: `[outer, low, mid, high, inner]`, with `low`
/// and `high` the two factored axes in memory order and the other three products of the batch
/// axes before, between and after them. The kernels of [`crate::kernels::strided`] run on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strided {
    /// Product of the axes before the first factored axis.
    pub outer: usize,
    /// Size of the first factored axis.
    pub low: usize,
    /// Product of the axes between the two factored axes.
    pub mid: usize,
    /// Size of the second factored axis.
    pub high: usize,
    /// Product of the axes after the second factored axis.
    pub inner: usize,
    /// True when the rows are the first factored axis (`row < col`).
    pub rows_low: bool,
    /// The axes this layout was made from.
    pub axes: FactoredAxes,
}

impl Strided {
    /// The split of `shape` for `axes` (checked by the caller).
    pub fn of(shape: &[usize], axes: FactoredAxes) -> Strided {
        let (lo, hi) = (axes.row.min(axes.col), axes.row.max(axes.col));
        let prod = |s: &[usize]| s.iter().product::<usize>();
        Strided {
            outer: prod(&shape[..lo]),
            low: shape[lo],
            mid: prod(&shape[lo + 1..hi]),
            high: shape[hi],
            inner: prod(&shape[hi + 1..]),
            rows_low: axes.row < axes.col,
            axes,
        }
    }

    /// Number of independent matrices (`outer * mid * inner`).
    pub fn batch(&self) -> usize {
        self.outer * self.mid * self.inner
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.outer * self.low * self.mid * self.high * self.inner
    }

    /// True for a variable with no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(rows, cols)`: the sizes of the row and column axes.
    pub fn rows_cols(&self) -> (usize, usize) {
        if self.rows_low {
            (self.low, self.high)
        } else {
            (self.high, self.low)
        }
    }
}

/// Checks that a checkpoint was written with the factored axes of `optimizer`: its Keras config
/// `checkpoint_config` lists them under `factored_axes` (absent in checkpoints written before
/// the key existed, which factor every variable over its last two axes).
///
/// # Errors
/// The first variable whose axes differ, named, with both values; a malformed
/// `factored_axes` in the checkpoint.
pub fn check_checkpoint_axes(
    checkpoint_config: &serde_json::Value,
    optimizer: &crate::AdafactorConfig,
) -> Result<()> {
    let saved = crate::AdafactorConfig::factored_axes_from_keras(checkpoint_config)?;
    let show = |a: Option<&FactoredAxes>| {
        a.map_or("the last two axes (the default)".to_string(), |a| {
            format!("axes [{}, {}]", a.row, a.col)
        })
    };
    for name in saved.keys().chain(optimizer.factored_axes.keys()) {
        let (a, b) = (saved.get(name), optimizer.factored_axes.get(name));
        if a != b {
            return Err(Error::invalid(
                "factored_axes",
                format!(
                    "cannot load the optimizer state: variable `{name}` is factored over {} in \
                     the checkpoint but over {} in the optimizer",
                    show(a),
                    show(b)
                ),
            ));
        }
    }
    Ok(())
}

/// New factored axes for some variables of a built optimizer that has not stepped yet: `config`
/// with `changes` (variable name, new axes; `None`: the last two) applied to its
/// `factored_axes`, each checked against the variable's shape, and each changed variable's
/// index with its fresh (zero) statistics. `find` gives a name's index and shape. An adapter
/// applies both only when this returns `Ok`, so an error changes nothing.
///
/// ```
/// use adafactor::{axes, AdafactorConfig, FactoredAxes, Stats};
/// use adafactor::engine::Counters;
/// let shapes = [("conv/w", vec![8usize, 4, 3, 3])];
/// let find = |n: &str| shapes.iter().position(|(m, _)| *m == n).map(|i| (i, &shapes[i].1[..]));
/// let changes = vec![("conv/w".to_string(), Some(FactoredAxes::CONVOLUTION))];
/// let cfg = AdafactorConfig::default();
/// let (next, fresh) = axes::refactor(&cfg, &Counters::default(), changes, find)?;
/// assert_eq!(next.axes_of("conv/w"), Some(FactoredAxes::CONVOLUTION));
/// assert_eq!(fresh[0].1.bytes(), 4 * 9 * (4 + 8));
/// # Ok::<(), adafactor::Error>(())
/// ```
///
/// # Errors
/// The optimizer has already applied gradients (its statistics would be lost); no variable has
/// a changed name; axes equal or out of range for the variable's rank. Each names the variable
/// and the value.
pub fn refactor<'a>(
    config: &crate::AdafactorConfig,
    counters: &crate::engine::Counters,
    changes: Vec<(String, Option<FactoredAxes>)>,
    find: impl Fn(&str) -> Option<(usize, &'a [usize])>,
) -> Result<(crate::AdafactorConfig, Vec<(usize, crate::Stats)>)> {
    if counters.raw_iterations != 0 || counters.skipped_steps != 0 {
        return Err(Error::invalid(
            "factored_axes",
            format!(
                "optimizer `{}` has already applied gradients: changing the factored axes would \
                 discard the statistics; set them before the first step",
                config.name
            ),
        ));
    }
    let mut next = config.clone();
    let mut fresh = Vec::with_capacity(changes.len());
    for (name, axes) in changes {
        let (i, shape) = find(&name).ok_or_else(|| {
            Error::invalid(
                "factored_axes",
                format!(
                    "cannot set the factored axes of variable `{name}`: the optimizer has no \
                     variable of that name"
                ),
            )
        })?;
        match axes {
            Some(a) => {
                a.check(&name, shape)?;
                next.factored_axes.insert(name, a);
            }
            None => {
                next.factored_axes.remove(&name);
            }
        }
        fresh.push((i, crate::Stats::zeros_with(shape, axes)));
    }
    next.validate()?;
    Ok((next, fresh))
}

/// The batch axes of `shape` (all but the two factored ones), in order.
pub(crate) fn batch_dims(shape: &[usize], axes: FactoredAxes) -> Vec<usize> {
    shape
        .iter()
        .enumerate()
        .filter(|(k, _)| *k != axes.row && *k != axes.col)
        .map(|(_, d)| *d)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convolution_split_and_errors() {
        let s = Strided::of(&[8, 4, 3, 3], FactoredAxes::CONVOLUTION);
        assert_eq!(
            s,
            Strided {
                outer: 1,
                low: 8,
                mid: 1,
                high: 4,
                inner: 9,
                rows_low: false,
                axes: FactoredAxes::CONVOLUTION,
            }
        );
        assert_eq!(s.batch(), 9);
        assert_eq!(s.rows_cols(), (4, 8));
        assert_eq!(batch_dims(&[8, 4, 3, 5], FactoredAxes::CONVOLUTION), [3, 5]);
        let e = FactoredAxes { row: 1, col: 1 }
            .check("w", &[2, 2])
            .unwrap_err();
        assert!(
            e.to_string().contains("`w`") && e.to_string().contains("[1, 1]"),
            "{e}"
        );
        let e = FactoredAxes { row: 0, col: 2 }
            .check("k", &[2, 2])
            .unwrap_err();
        assert!(
            e.to_string().contains("`k`") && e.to_string().contains("[2, 2]"),
            "{e}"
        );
        assert!(FactoredAxes { row: 0, col: 1 }.check("v", &[3]).is_err());
        assert!(FactoredAxes { row: 2, col: 0 }
            .check("v", &[1, 2, 3])
            .is_ok());
    }

    #[test]
    fn config_key_round_trips_and_checks_variables() {
        use crate::AdafactorConfig;
        let cfg = AdafactorConfig {
            factored_axes: FactoredAxes::convolutions([("c", &[8usize, 4, 3][..]), ("d", &[2, 2])]),
            ..Default::default()
        };
        let json = cfg.to_keras_serialized();
        assert_eq!(
            json["config"]["factored_axes"],
            serde_json::json!({"c": [1, 0]})
        );
        let back = AdafactorConfig::from_keras_config(&json).unwrap();
        assert_eq!(back.factored_axes, cfg.factored_axes);
        assert_eq!(
            AdafactorConfig::factored_axes_from_keras(&json).unwrap(),
            cfg.factored_axes
        );
        assert!(cfg
            .check_factored_axes([("c", &[8usize, 4, 3][..])])
            .is_ok());
        let e = cfg
            .check_factored_axes([("x", &[8usize, 4, 3][..])])
            .unwrap_err();
        assert!(e.to_string().contains("`c`"), "{e}");
        let e = cfg.check_factored_axes([("c", &[8usize][..])]).unwrap_err();
        assert!(e.to_string().contains("rank 1"), "{e}");
        let bad = AdafactorConfig {
            factored_axes: [("w".to_string(), FactoredAxes { row: 0, col: 0 })].into(),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("`w`"));
    }
}
