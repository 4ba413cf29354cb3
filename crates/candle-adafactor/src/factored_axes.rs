//! Choosing the factored axes of a built optimizer's variables, and the helper for candle's
//! convolution weights (see [`adafactor::axes`] for the storage order of the statistics).

use crate::optimizer::{core_err, err, Adafactor};
use adafactor::{axes, FactoredAxes};
use candle_core::Result;

impl Adafactor {
    /// Factors candle's convolution weights as Keras factors the same convolution: every
    /// variable of rank 3 to 5 (`[out, in, k...]`, what `candle_nn::conv1d`, `conv2d` and
    /// `conv3d` make) gets [`FactoredAxes::CONVOLUTION`]: rows are the input channels,
    /// columns the output channels, each kernel position a matrix with its own statistics.
    /// Returns the names of the variables it set.
    ///
    /// Keras stores a `Conv2D` kernel as `[kh, kw, in, out]` and factors its last two axes;
    /// candle's `[out, in, kh, kw]` factored over its last two axes is a different optimizer
    /// whose state (one row and one column statistic per `kh x kw` matrix) outgrows the
    /// weights. With this call a candle CNN gets Keras's optimizer, and state of a few bytes per
    /// channel pair.
    ///
    /// ```
    /// use candle_adafactor::{Adafactor, AdafactorConfig};
    /// use candle_core::{DType, Device, Var};
    /// # fn main() -> candle_core::Result<()> {
    /// let conv = Var::zeros((64, 32, 3, 3), DType::F32, &Device::Cpu)?;
    /// let bias = Var::zeros(64, DType::F32, &Device::Cpu)?;
    /// let vars = vec![("conv/weight".to_string(), conv), ("conv/bias".to_string(), bias)];
    /// let mut opt = Adafactor::new_named(vars, AdafactorConfig::default())?;
    /// let before = opt.state_bytes();
    /// assert_eq!(opt.factor_convolutions()?, ["conv/weight"]);
    /// // r is [kh, kw, in] and c is [kh, kw, out], as in Keras: 9 * (32 + 64) floats, not
    /// // 64 * 32 * (3 + 3).
    /// assert_eq!(opt.state_bytes(), 4 * (9 * (32 + 64) + 64));
    /// assert!(opt.state_bytes() < before);
    /// assert!(opt.get_config()["factored_axes"]["conv/weight"] == serde_json::json!([1, 0]));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Adafactor::set_factored_axes`]; nothing changes on error.
    pub fn factor_convolutions(&mut self) -> Result<Vec<String>> {
        let axes =
            FactoredAxes::convolutions(self.slots.iter().map(|s| (s.name.as_str(), s.var.dims())));
        let names: Vec<String> = axes.keys().cloned().collect();
        self.set_all_factored_axes(axes.into_iter().map(|(n, a)| (n, Some(a))).collect())?;
        Ok(names)
    }

    /// Sets the two factored axes of one variable (`None`: Keras's last two), recorded in the
    /// config's `factored_axes` and so in `get_config()` and checkpoints. The variable's
    /// statistics are rebuilt (zero), so this is for a fresh optimizer.
    ///
    /// # Errors
    /// The optimizer is not built or has already applied a gradient (its statistics would be
    /// lost); no variable has this name; axes equal or out of range for the variable's rank.
    /// Each names the variable and the value; nothing changes on error.
    pub fn set_factored_axes(&mut self, name: &str, axes: Option<FactoredAxes>) -> Result<()> {
        self.set_all_factored_axes(vec![(name.to_string(), axes)])
    }

    /// Checks every change, then applies them all.
    fn set_all_factored_axes(
        &mut self,
        changes: Vec<(String, Option<FactoredAxes>)>,
    ) -> Result<()> {
        if !self.built {
            return Err(err(format!(
                "optimizer `{}` is not built: build it on its variables before choosing their \
                 factored axes (or set `factored_axes` in its config)",
                self.config.name
            )));
        }
        let slots = &self.slots;
        let find = |name: &str| {
            let i = slots.iter().position(|s| s.name == name)?;
            Some((i, slots[i].var.dims()))
        };
        let (config, fresh) =
            axes::refactor(&self.config, &self.counters, changes, find).map_err(core_err)?;
        for (i, stats) in fresh {
            self.slots[i].stats = stats;
        }
        self.config = config;
        Ok(())
    }
}
