//! Framework-free core of a Keras-exact Adafactor optimizer.
//!
//! - [`AdafactorConfig`]: every Keras 3 `Adafactor` argument with its Keras default, validation,
//!   and Keras JSON in and out.
//! - [`LearningRateSchedule`]: the six Keras schedules.
//! - [`plan`]: which pipeline stages run in one apply, and their scalars (`t`, `beta2_t`, `rho`, ...).
//! - [`Stats`]: the per-variable statistics (row and column factors only, for rank >= 2).
//! - [`kernels`]: fused slice kernels over `f32`, `bf16` and `f16` with f32 statistics.
//!
//! The framework adapters (`candle-adafactor`) own the tensors and call into this crate.
#![deny(missing_docs)]

pub mod checkpoint;
mod config;
pub mod engine;
mod error;
mod exclusions;
mod json;
pub mod kernels;
pub mod manifest;
pub mod plan;
mod schedule;
mod state;

pub use config::{AdafactorConfig, LearningRate, OnNonFinite};
pub use error::{Error, Result};
pub use exclusions::NameExclusions;
pub use plan::{Accumulation, Clip, EmaPlan, StepPlan, UpdateScalars};
pub use schedule::LearningRateSchedule;
pub use state::{Factoring, Stats};
