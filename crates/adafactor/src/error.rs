//! The one error type of the core crate.

use std::fmt;

/// Everything that can go wrong in the framework-free core.
///
/// Messages name the argument, variable or shape at fault; where Keras has its own message for the
/// same mistake the text is Keras's, so a user moving from Keras recognises it.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A constructor or schedule argument has an invalid value.
    InvalidArgument {
        /// The argument's Keras name, e.g. `ema_momentum`.
        argument: String,
        /// The full message (Keras's wording where Keras checks the same thing).
        message: String,
    },
    /// A Keras config document could not be read (wrong type, missing key, unknown class, ...).
    MalformedConfig(String),
    /// A slice or shape handed to a kernel or to the state does not have the expected size.
    ShapeMismatch {
        /// What was being checked, e.g. a variable name and slot.
        what: String,
        /// The expected shape or length.
        expected: Vec<usize>,
        /// What was supplied.
        got: Vec<usize>,
    },
    /// A gradient holds NaN or infinity and the configured policy is to refuse the step.
    NonFinite {
        /// The variable whose gradient is not finite.
        variable: String,
    },
    /// A broken invariant between the pipeline and a backend (a bug, never a user error).
    Internal(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(argument: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            argument: argument.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument { message, .. } => f.write_str(message),
            Error::MalformedConfig(m) => write!(f, "malformed Adafactor config: {m}"),
            Error::ShapeMismatch {
                what,
                expected,
                got,
            } => write!(f, "{what}: expected shape {expected:?}, got {got:?}"),
            Error::NonFinite { variable } => write!(
                f,
                "the gradient of variable `{variable}` contains NaN or infinity; \
                 the step was refused and nothing was changed (on_nonfinite = \"error\")"
            ),
            Error::Internal(m) => write!(f, "internal error of the Adafactor pipeline: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// The core crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
