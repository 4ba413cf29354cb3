//! Framework-free engine of a Keras-exact Adafactor optimizer (Shazeer & Stern, 2018,
//! "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", arXiv:1804.04235, as Keras 3
//! implements it).
//!
//! - [`AdafactorConfig`]: every Keras 3 `Adafactor` argument with its Keras default, validation,
//!   and Keras JSON in and out.
//! - [`LearningRateSchedule`]: the six Keras schedules.
//! - [`plan`]: which pipeline stages run in one apply, and their scalars (`t`, `beta2_t`, `rho`, ...).
//! - [`engine`]: the step pipeline, written once, over a [`engine::Backend`] that a framework
//!   adapter implements; [`engine::fused`] runs the kernels over a framework's slices.
//! - [`Stats`]: the per-variable statistics (row and column factors only, for rank >= 2).
//! - [`collective`]: the contract of data-parallel training (sums and bytes across ranks), an
//!   in-process group of threads implementing it, gradient buckets and a byte-balanced partition.
//! - [`data_parallel`]: replicated and sharded (ZeRO-1) data parallelism around the step pipeline.
//! - [`manifest`]: what the optimizer's state is, and the orders it is listed in.
//! - [`checkpoint`]: the framework-free part of the checkpoint format.
//! - [`kernels`]: fused slice kernels over `f32`, `bf16` and `f16` with f32 statistics.
//! - [`rounding`]: deterministic stochastic rounding into `bf16` and `f16` weights.
//!
//! The framework adapters (`candle-adafactor`) own the tensors and implement the engine's
//! traits; the module docs of [`engine`] say how a new framework or a data-parallel driver
//! plugs in.
//!
//! # Adding a config key
//! 1. `config.rs`: the field on [`AdafactorConfig`] with its Keras default, its check in
//!    `validate` (Keras's message where Keras checks it), its name in `KERAS_KEYS` (or
//!    `EXTRA_KEYS` for a key Keras does not have), and its line in `to_keras_config` and
//!    `from_keras_config`.
//! 2. If it changes the step: its scalar in [`plan::StepPlan`] (or [`plan::UpdateScalars`]) and
//!    the stage that uses it in [`engine::run`]; a new primitive operation is a new
//!    [`engine::Backend`] method, implemented by [`engine::fused::Fused`] (with a kernel in
//!    [`kernels`]) and by every adapter's composed backend.
//! 3. If it adds state: a [`manifest::Part`] and its line in [`manifest::variables`].
//! 4. Tests: a recorded Keras run in `conformance/` exercising it; a row in
//!    `crates/candle-adafactor/tests/common` `configs` (every property test then covers it).
//!
//! # Adding a schedule
//! 1. `schedule.rs`: the variant of [`LearningRateSchedule`], its constructor (validated as
//!    Keras validates), its arm in `validate`, `value` (float32 as Keras computes it), `to_keras`
//!    and `from_keras`.
//! 2. Tests: beside it in `schedule.rs` (values against Keras's) and a JSON round trip in
//!    `tests/config_properties.rs`.
#![deny(missing_docs)]

pub mod axes;
pub mod checkpoint;
pub mod collective;
mod config;
pub mod data_parallel;
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

pub use axes::{FactoredAxes, Strided};
pub use collective::{Collective, ThreadCollective, ThreadGroup};
pub use config::{AdafactorConfig, LearningRate, OnNonFinite, WeightRounding};
pub use error::{Error, Result};
pub use exclusions::NameExclusions;
pub use plan::{Accumulation, Clip, EmaPlan, StepPlan, UpdateScalars};
pub use schedule::LearningRateSchedule;
pub use state::{touched_zeros, Factoring, Stats};
