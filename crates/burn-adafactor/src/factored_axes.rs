//! Choosing the factored axes of the optimizer's parameters, and the helper for burn's
//! convolution weights (see [`adafactor::axes`] for the storage order of the statistics).

use crate::error::{Result, invalid};
use crate::optimizer::Adafactor;
use crate::params;
use adafactor::{FactoredAxes, axes};
use burn::module::Module;

impl Adafactor {
    /// Factors burn's convolution weights as Keras factors the same convolution: every
    /// parameter of `module` of rank 3 to 5 gets [`FactoredAxes::CONVOLUTION`] (rows over axis
    /// 1, columns over axis 0, each kernel position a matrix with its own statistics). Builds
    /// the optimizer on `module` first when it is not built yet. Returns the paths it set.
    ///
    /// burn's `Conv1d`, `Conv2d` and `Conv3d` store their weight as `[out, in, k...]`: factored
    /// over its last two axes (Keras's rule applied to burn's layout) a `3 x 3` kernel becomes
    /// `out * in` tiny matrices with a row and a column statistic each, more state than the
    /// weight. Keras stores the same kernel as `[k..., in, out]` and factors `(in, out)`; with
    /// this call a burn CNN gets that optimizer, and state of a few bytes per channel pair.
    /// (`ConvTranspose*d` store `[in, out, k...]`, and Keras's transposed kernels
    /// `[k..., out, in]`: the same axes again.)
    ///
    /// ```
    /// use burn::module::Module;
    /// use burn::nn::conv::{Conv2d, Conv2dConfig};
    /// use burn::tensor::Device;
    /// use burn_adafactor::{Adafactor, AdafactorConfig};
    ///
    /// #[derive(Module, Debug)]
    /// struct Net {
    ///     conv: Conv2d,
    /// }
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let device = Device::flex().autodiff();
    /// let net = Net { conv: Conv2dConfig::new([32, 64], [3, 3]).init(&device) };
    /// let mut opt = Adafactor::new(AdafactorConfig::default())?;
    /// assert_eq!(opt.factor_convolutions(&net)?, ["conv.weight"]);
    /// // r is [kh, kw, in] and c is [kh, kw, out], as in Keras: 9 * (32 + 64) floats, not
    /// // 64 * 32 * (3 + 3); plus the bias's 64.
    /// assert_eq!(opt.state_bytes(), 4 * (9 * (32 + 64) + 64));
    /// assert_eq!(opt.get_config()["factored_axes"]["conv.weight"], serde_json::json!([1, 0]));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The optimizer has already applied gradients (the statistics would be lost), or is built
    /// on other parameters than `module`'s. Nothing changes on error.
    pub fn factor_convolutions<M: Module>(&mut self, module: &M) -> Result<Vec<String>> {
        let infos = params::list(module);
        let axes =
            FactoredAxes::convolutions(infos.iter().map(|i| (i.path.as_str(), i.shape.as_slice())));
        let mut next = self.clone();
        if next.built() {
            next.check_module(&infos)?;
        } else {
            next.build(module)?;
        }
        let paths: Vec<String> = axes.keys().cloned().collect();
        next.set_all_factored_axes(axes.into_iter().map(|(p, a)| (p, Some(a))).collect())?;
        *self = next;
        Ok(paths)
    }

    /// Sets the two factored axes of one parameter (`None`: Keras's last two), recorded in the
    /// config's `factored_axes` and so in `get_config()` and checkpoints. Its statistics are
    /// rebuilt (zero), so this is for a built optimizer that has not stepped yet
    /// ([`Adafactor::build`]); before building, set `factored_axes` in the config instead.
    ///
    /// # Errors
    /// Not built, or already applied gradients; no parameter has this path; axes equal or out
    /// of range for the parameter's rank. Each names the parameter and the value; nothing
    /// changes on error.
    pub fn set_factored_axes(&mut self, path: &str, axes: Option<FactoredAxes>) -> Result<()> {
        self.set_all_factored_axes(vec![(path.to_string(), axes)])
    }

    /// Checks every change, then applies them all.
    fn set_all_factored_axes(
        &mut self,
        changes: Vec<(String, Option<FactoredAxes>)>,
    ) -> Result<()> {
        if !self.built() {
            return Err(invalid(format!(
                "optimizer `{}` is not built: build it on the module (`build(&model)`) before \
                 choosing the factored axes of its parameters (or set `factored_axes` in its \
                 config)",
                self.config.name
            )));
        }
        let slots = &self.slots;
        let find = |path: &str| {
            let i = slots.iter().position(|s| s.path == path)?;
            Some((i, slots[i].shape.as_slice()))
        };
        let (config, fresh) = axes::refactor(&self.config, &self.counters, changes, find)?;
        for (i, stats) in fresh {
            self.slots[i].stats = stats;
        }
        self.config = config;
        Ok(())
    }
}
