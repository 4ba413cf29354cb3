//! Tiny Shakespeare for the `train` example as candle tensors: the plain-Rust corpus of
//! `corpus.rs` (shared with the burn adapter's example) and its windows as batches.

use crate::rng::SplitMix64;
use candle_core::{Device, Result, Tensor};

#[path = "corpus.rs"]
pub mod corpus;
pub use corpus::{consecutive_starts, Corpus};

fn msg(text: String) -> candle_core::Error {
    candle_core::Error::Msg(text)
}

/// Inputs and next-character targets, both `(batch, context)` u32.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Input tokens.
    pub x: Tensor,
    /// The token after each input token.
    pub y: Tensor,
}

/// Windows of `context + 1` tokens starting at `starts`, as a batch.
///
/// # Errors
/// A window past the end of `tokens`, or a tensor that cannot be made.
pub fn batch_at(tokens: &[u32], starts: &[usize], context: usize) -> Result<Batch> {
    let (x, y) = corpus::windows(tokens, starts, context).map_err(msg)?;
    let shape = (starts.len(), context);
    Ok(Batch {
        x: Tensor::from_vec(x, shape, &Device::Cpu)?,
        y: Tensor::from_vec(y, shape, &Device::Cpu)?,
    })
}

/// `batch` windows of `context + 1` tokens at random positions of `tokens` (nanoGPT's sampling).
///
/// # Errors
/// `tokens` shorter than a window, or a tensor that cannot be made.
pub fn random_batch(
    tokens: &[u32],
    batch: usize,
    context: usize,
    rng: &mut SplitMix64,
) -> Result<Batch> {
    let starts = corpus::random_starts(tokens.len(), batch, context, rng).map_err(msg)?;
    batch_at(tokens, &starts, context)
}
