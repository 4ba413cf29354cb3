//! The GPT's shape, shared by the candle and burn training examples (plain Rust, no framework).

/// The shape of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptConfig {
    /// Number of tokens.
    pub vocab_size: usize,
    /// Longest context (the position embedding's length).
    pub context: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads per block (must divide `width`).
    pub heads: usize,
    /// Width of the residual stream.
    pub width: usize,
}

impl GptConfig {
    /// nanoGPT's published CPU setup for tiny Shakespeare: 4 layers, 4 heads, 128 wide,
    /// context 64.
    pub fn reference(vocab_size: usize) -> Self {
        GptConfig {
            vocab_size,
            context: 64,
            layers: 4,
            heads: 4,
            width: 128,
        }
    }
}
