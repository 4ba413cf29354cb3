//! Keras 3 `Adafactor` for [candle](https://github.com/huggingface/candle), step-exact with
//! Keras 3.15.1, with the memory savings Adafactor promises.
//!
//! See [`Adafactor`] for the optimizer and [`AdafactorConfig`] for its arguments, and
//! [`DataParallel`] for data-parallel training across ranks (threads or MPI processes).
#![deny(missing_docs)]

mod checkpoint;
mod composed;
mod data_parallel;
mod factored_axes;
mod fused;
mod keras_weights;
mod optimizer;
mod slot;
mod weights;

pub use adafactor::{
    AdafactorConfig, FactoredAxes, LearningRate, LearningRateSchedule, OnNonFinite, WeightRounding,
};
pub use checkpoint::{StateDict, STATE_FORMAT, STATE_FORMAT_VERSION};
pub use data_parallel::{DataParallel, Mode, DEFAULT_BUCKET_BYTES};
pub use optimizer::{Adafactor, DataPath};

/// The crate README's code sample, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct CrateReadmeDoctests;
