//! Tiny Shakespeare for the training examples, in plain Rust (no tensor library): the embedded
//! corpus, its character tokenizer, the 90/10 split, the unigram baseline and the positions of
//! the windows a batch is made of. The candle examples (through `data.rs`) and the burn adapter's
//! `train` example include this file.

use crate::rng::SplitMix64;

/// The corpus (see `examples/data/README.md`), embedded so the example needs no file at run time.
pub const CORPUS: &str = include_str!("../data/tinyshakespeare.txt");
/// Its length in characters.
pub const CORPUS_CHARS: usize = 1_115_394;
/// Fraction of the characters (the first ones) used for training, as in nanoGPT.
pub const TRAIN_FRACTION: f64 = 0.9;

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
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        text.chars()
            .map(|c| {
                self.chars
                    .binary_search(&c)
                    .map(|i| i as u32)
                    .map_err(|_| format!("character {c:?} is not in the vocabulary"))
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
    pub fn from_text(text: &str) -> Result<Self, String> {
        let tokenizer = Tokenizer::from_text(text);
        let mut train = tokenizer.encode(text)?;
        let n_train = (train.len() as f64 * TRAIN_FRACTION) as usize;
        let val = train.split_off(n_train);
        if train.len() < 2 || val.len() < 2 {
            return Err(format!(
                "a text of {} characters is too short to split into training and validation",
                train.len() + val.len()
            ));
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
    pub fn shakespeare() -> Result<Self, String> {
        let chars = CORPUS.chars().count();
        if chars != CORPUS_CHARS {
            return Err(format!(
                "examples/data/tinyshakespeare.txt has {chars} characters, expected {CORPUS_CHARS}"
            ));
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

/// Inputs and next-character targets of the windows of `context + 1` tokens starting at
/// `starts`, each `starts.len() * context` tokens long, row after row.
///
/// # Errors
/// A window past the end of `tokens`.
pub fn windows(
    tokens: &[u32],
    starts: &[usize],
    context: usize,
) -> Result<(Vec<u32>, Vec<u32>), String> {
    let mut x = Vec::with_capacity(starts.len() * context);
    let mut y = Vec::with_capacity(starts.len() * context);
    for &s in starts {
        let window = tokens.get(s..s + context + 1).ok_or_else(|| {
            format!(
                "a window of {} tokens at {s} does not fit in {} tokens",
                context + 1,
                tokens.len()
            )
        })?;
        x.extend_from_slice(&window[..context]);
        y.extend_from_slice(&window[1..]);
    }
    Ok((x, y))
}

/// The starts of `batch` windows of `context + 1` tokens at random positions of `len` tokens
/// (nanoGPT's sampling).
///
/// # Errors
/// `len` tokens cannot hold a window.
pub fn random_starts(
    len: usize,
    batch: usize,
    context: usize,
    rng: &mut SplitMix64,
) -> Result<Vec<usize>, String> {
    if len <= context {
        return Err(format!(
            "{len} tokens cannot hold a window of {} tokens",
            context + 1
        ));
    }
    Ok((0..batch).map(|_| rng.below(len - context)).collect())
}

/// The starts of consecutive windows of `context` tokens over `len` tokens (the whole
/// validation split: every character but the first of each window is predicted once).
pub fn consecutive_starts(len: usize, context: usize) -> Vec<usize> {
    (0..len.saturating_sub(1) / context.max(1))
        .map(|i| i * context)
        .collect()
}
