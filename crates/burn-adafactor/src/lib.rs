//! Keras 3 `Adafactor` for [burn](https://burn.dev) 0.22, step-exact with Keras 3.15.1, on the
//! same engine as the candle adapter: the core's pipeline ([`adafactor::engine`]) over burn
//! tensors.
//!
//! - [`Adafactor`]: the module-level optimizer (every Keras argument, one global `iterations`,
//!   `global_clipnorm`, EMA, gradient accumulation, atomic steps, errors naming the parameter).
//! - The fused path (feature `flex`): the core's kernels in place on the Flex backend's storage.
//!   The composed path: burn tensor ops, for every other backend.
#![deny(missing_docs)]

mod checkpoint;
mod composed;
mod error;
mod factored_axes;
#[cfg(feature = "flex")]
mod fused;
mod optimizer;
mod params;
mod per_tensor;
mod slot;

pub use adafactor::{
    AdafactorConfig, FactoredAxes, LearningRate, LearningRateSchedule, OnNonFinite, WeightRounding,
};
pub use checkpoint::{STATE_FORMAT, STATE_FORMAT_VERSION};
pub use error::{Error, Result, StepError};
pub use optimizer::{Adafactor, DataPath};
pub use per_tensor::{KerasAdafactor, KerasClock, TensorState};

/// The crate README's code sample, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct CrateReadmeDoctests;
