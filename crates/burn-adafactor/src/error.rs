//! The crate's error type: a core error, or a message naming the parameter at fault.

use std::fmt;

/// Everything that can go wrong in the burn adapter. Every error leaves the model and the
/// optimizer state as they were.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// An error of the framework-free core (config, schedules, non-finite gradients, state).
    Core(adafactor::Error),
    /// A parameter, gradient or record that does not fit (the message names the parameter path).
    Invalid(String),
    /// Reading or writing a checkpoint or record failed.
    Io(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Core(e) => e.fmt(f),
            Error::Invalid(m) | Error::Io(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<adafactor::Error> for Error {
    fn from(e: adafactor::Error) -> Self {
        Error::Core(e)
    }
}

/// Shorthand for an [`Error::Invalid`] with a message.
pub(crate) fn invalid(msg: impl fmt::Display) -> Error {
    Error::Invalid(msg.to_string())
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// A failed [`Adafactor::step`](crate::Adafactor::step): the error and the model, unchanged.
pub struct StepError<M> {
    /// The model as it was before the step.
    pub model: M,
    /// What went wrong.
    pub error: Error,
}

impl<M> StepError<M> {
    /// The model, unchanged.
    pub fn into_model(self) -> M {
        self.model
    }
}

impl<M> fmt::Debug for StepError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<M> fmt::Display for StepError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl<M> std::error::Error for StepError<M> {}

/// Refuses the configuration keys the per-tensor optimizer cannot honour, so that none is
/// ignored silently: `factored_axes` names parameters by path, and burn's per-tensor
/// `Optimizer::step` is given the tensor without its path.
pub(crate) fn check_per_tensor(config: &adafactor::AdafactorConfig) -> Result<()> {
    if let Some((name, axes)) = config.factored_axes.iter().next() {
        return Err(invalid(format!(
            "`factored_axes` (here [{}, {}] for `{name}`) names parameters by path, which burn's \
             per-tensor Optimizer does not see: use burn_adafactor::Adafactor::step on the module \
             (and `factor_convolutions`) instead",
            axes.row, axes.col
        )));
    }
    Ok(())
}
