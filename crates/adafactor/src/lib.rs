//! Framework-free core of a Keras-exact Adafactor optimizer.
//!
//! - [`AdafactorConfig`]: every Keras 3 `Adafactor` argument with its Keras default, validation,
//!   and Keras JSON in and out.
//! - [`LearningRateSchedule`]: the six Keras schedules.
//! - [`plan`]: which pipeline stages run in one apply, and their scalars (`t`, `beta2_t`, `rho`, ...).
//! - [`Stats`]: the per-variable statistics (row and column factors only, for rank >= 2).
//! - [`collective`]: the contract of data-parallel training (sums and bytes across ranks), an
//!   in-process group of threads implementing it, gradient buckets and a byte-balanced partition.
//! - [`kernels`]: fused slice kernels over `f32`, `bf16` and `f16` with f32 statistics.
//! - [`rounding`]: deterministic stochastic rounding into `bf16` and `f16` weights.
//!
//! The framework adapters (`candle-adafactor`) own the tensors and call into this crate.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod collective;
mod config;
pub mod engine;
mod error;
mod exclusions;
mod json;
pub mod kernels;
pub mod manifest;
pub mod plan;
pub mod rounding;
mod schedule;
mod state;

pub use collective::{Collective, ThreadCollective, ThreadGroup};
pub use config::{AdafactorConfig, LearningRate, OnNonFinite};
pub use error::{Error, Result};
pub use exclusions::NameExclusions;
pub use plan::{Accumulation, Clip, EmaPlan, StepPlan, UpdateScalars};
pub use schedule::LearningRateSchedule;
pub use state::{Factoring, Stats};
