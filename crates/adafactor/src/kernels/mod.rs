//! Fused slice kernels: one Adafactor update in three streaming passes, no full-size temporary.
//!
//! For a factored variable (`lead` slices of `n x m`):
//! 1. [`factored::pass1`] reads the gradient (and the weight, for RMS(x) after weight decay) once
//!    and accumulates row and column sums of `g^2`. The statistics update is then O(n + m)
//!    ([`factored::prepare`]).
//! 2. [`factored::pass2`] reads the gradient again for RMS(u), with `1/sqrt(v_ij) = a_i * b_j`
//!    from per-row and per-column factors (no per-element square root).
//! 3. [`factored::pass3`] reads gradient and weight once and writes the weight.
//!
//! That is 24 bytes per float32 parameter. Without norm clipping (the default) the gradient scale
//! is known before pass 1, so pass 1 also updates the row statistics as it goes and collects
//! `sum_i g_ij^2 / r_i` per column ([`factored::RowFold`]); RMS(u) then follows from the
//! statistics alone and pass 2 is skipped: 20 bytes per float32 parameter. Rank 0 and 1
//! variables use the same three passes with their velocity ([`vector`]). Reductions run in
//! blocks of at most [`CHUNK`] elements, each summed in float32 lanes and the blocks in `f64`, so
//! the result does not depend on the number of threads.
//!
//! Every kernel takes `&[T]`/`&mut [T]` for `T` in `f32`, `bf16`, `f16` ([`Element`]); statistics
//! are always `f32` and the update is computed in `f32` and rounded once. The factored passes
//! spend their time in per-row loops ([`RowLoops::pass1_rows`], [`RowLoops::pass2_rows`],
//! [`RowLoops::update_rows`]), hand-vectorised for AVX-512 and AVX2 with portable twins that give
//! the same bits; the environment variable `ADAFACTOR_SIMD` (`portable`, `avx2`, `avx512`) caps
//! the instruction set they use.

//!
//! One file per concern, each depending only on those above it: [`Element`] types
//! (`element.rs`) and CPU features (`cpu.rs`); reductions (`reduce.rs`), gradient transforms
//! (`grad.rs`) and parallel scheduling (`parallel.rs`); the row loops' arguments
//! (`row_args.rs`) and weight stores (`store.rs`, the one primitive through which every kernel
//! writes a weight, [`Rounding`]), portable loops (`portable.rs`), vector lanes (`simd.rs`) and
//! vector twins (`wide.rs`), dispatched per element type by [`RowLoops`] (`dispatch.rs`); the
//! kernels themselves ([`factored`], [`strided`] for variables factored over other axes than
//! their last two, [`vector`], [`elementwise`]); for factored shapes other than large matrices,
//! [`shaped`] picks the short-row kernel (`tiny.rs`, with `transpose.rs` for its lane-major
//! groups), the column-split one (`narrow.rs`) or, for a single row, the vector's
//! (`single_row.rs`).

pub mod after_write;
mod cpu;
mod dispatch;
mod element;
pub mod elementwise;
pub mod factored;
mod grad;
mod narrow;
mod parallel;
mod portable;
mod reduce;
mod row_args;
pub mod shaped;
#[cfg(target_arch = "x86_64")]
mod simd;
mod single_row;
mod spare;
pub mod store;
pub mod strided;
mod tiny;
mod transpose;
#[cfg(all(test, target_arch = "x86_64"))]
mod twins_tests;
pub mod vector;
#[cfg(target_arch = "x86_64")]
mod wide;

pub use after_write::Tail;
pub(crate) use cpu::prefetch_head;
pub use dispatch::RowLoops;
pub use element::Element;
pub use grad::{Decay, Grad, GradTransform};
pub use parallel::{PARALLEL_THRESHOLD, UNIT_ELEMS};
pub use reduce::CHUNK;
pub use spare::Spare;
pub use store::Rounding;
