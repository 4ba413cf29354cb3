//! Tiny Shakespeare for the `train` example: the embedded corpus, its character tokenizer, the
//! 90/10 split, random context windows as batches, and the unigram baseline.

use crate::rng::SplitMix64;
use candle_core::{Device, Result, Tensor};

/// The corpus (see `examples/data/README.md`), embedded so the example needs no file at run time.
pub const CORPUS: &str = include_str!("../data/tinyshakespeare.txt");
/// Its length in characters.
pub const CORPUS_CHARS: usize = 1_115_394;
/// Fraction of the characters (the first ones) used for training, as in nanoGPT.
pub const TRAIN_FRACTION: f64 = 0.9;

fn msg(text: String) -> candle_core::Error {
    candle_core::Error::Msg(text)
}

/// A character-level tokenizer: the sorted distinct characters of a text.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenizer {
    chars: Vec<char>,
}

impl Tokenizer {
    /// The tokenizer of `text` (its distinct characters, sorted).
    pub fn from_text(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Tokenizer { chars }
    }

    /// Number of tokens.
    pub fn vocab_size(&self) -> usize {
        self.chars.len()
    }

    /// The token of each character of `text`.
    ///
    /// # Errors
    /// A character outside the vocabulary.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .map(|c| {
                self.chars
                    .binary_search(&c)
                    .map(|i| i as u32)
                    .map_err(|_| msg(format!("character {c:?} is not in the vocabulary")))
            })
            .collect()
    }

    /// The text of `tokens` (`?` for a token outside the vocabulary).
    pub fn decode(&self, tokens: &[u32]) -> String {
        tokens
            .iter()
            .map(|&t| self.chars.get(t as usize).copied().unwrap_or('?'))
            .collect()
    }
}

/// The tokenized corpus, split into training and validation parts.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The first 90% of the tokens.
    pub train: Vec<u32>,
    /// The last 10%.
    pub val: Vec<u32>,
}

impl Corpus {
    /// Tokenizes `text` and splits it: the first `TRAIN_FRACTION` of the characters for
    /// training, the rest for validation.
    ///
    /// # Errors
    /// A part shorter than two characters.
    pub fn from_text(text: &str) -> Result<Self> {
        let tokenizer = Tokenizer::from_text(text);
        let mut train = tokenizer.encode(text)?;
        let n_train = (train.len() as f64 * TRAIN_FRACTION) as usize;
        let val = train.split_off(n_train);
        if train.len() < 2 || val.len() < 2 {
            return Err(msg(format!(
                "a text of {} characters is too short to split into training and validation",
                train.len() + val.len()
            )));
        }
        Ok(Corpus {
            tokenizer,
            train,
            val,
        })
    }

    /// Tiny Shakespeare, after checking that the embedded copy is complete.
    ///
    /// # Errors
    /// The embedded text does not have the expected length.
    pub fn shakespeare() -> Result<Self> {
        let chars = CORPUS.chars().count();
        if chars != CORPUS_CHARS {
            return Err(msg(format!(
                "examples/data/tinyshakespeare.txt has {chars} characters, expected {CORPUS_CHARS}"
            )));
        }
        Self::from_text(CORPUS)
    }

    /// Cross-entropy (nats per character) on the validation part of predicting every character
    /// with its frequency in the training part: what a model that ignores context can reach.
    pub fn unigram_baseline(&self) -> f32 {
        let mut counts = vec![0usize; self.tokenizer.vocab_size()];
        self.train.iter().for_each(|&t| counts[t as usize] += 1);
        let n = self.train.len() as f64;
        let total: f64 = self
            .val
            .iter()
            // Add-one smoothing keeps a character unseen in training finite.
            .map(|&t| -((counts[t as usize] as f64 + 1.0) / (n + counts.len() as f64)).ln())
            .sum();
        (total / self.val.len() as f64) as f32
    }
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
    let mut x = Vec::with_capacity(starts.len() * context);
    let mut y = Vec::with_capacity(starts.len() * context);
    for &s in starts {
        let window = tokens.get(s..s + context + 1).ok_or_else(|| {
            msg(format!(
                "a window of {} tokens at {s} does not fit in {} tokens",
                context + 1,
                tokens.len()
            ))
        })?;
        x.extend_from_slice(&window[..context]);
        y.extend_from_slice(&window[1..]);
    }
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
    if tokens.len() <= context {
        return Err(msg(format!(
            "{} tokens cannot hold a window of {} tokens",
            tokens.len(),
            context + 1
        )));
    }
    let starts: Vec<usize> = (0..batch)
        .map(|_| rng.below(tokens.len() - context))
        .collect();
    batch_at(tokens, &starts, context)
}
