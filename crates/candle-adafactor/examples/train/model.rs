//! The `train` example's model: a character-level GPT (token and position embeddings, pre-norm
//! blocks of causal multi-head self-attention and a GELU MLP, a final layer norm and an untied
//! head), as in nanoGPT without biases or dropout.
//!
//! Two candle-nn 0.11 functions pass no gradient back and are avoided: `ops::softmax_last_dim`
//! (this model uses `ops::softmax(.., D::Minus1)`) and the fused path of `LayerNorm::forward`
//! (this model has its own bias-free layer norm made of tensor ops).

use crate::rng::SplitMix64;
use candle_core::{DType, Device, Module, Result, Tensor, Var, D};
use candle_nn::{Embedding, Linear, VarBuilder, VarMap};

#[path = "gpt_config.rs"]
mod gpt_config;
pub use gpt_config::GptConfig;

fn msg(text: String) -> candle_core::Error {
    candle_core::Error::Msg(text)
}

/// Layer norm without bias, written with tensor ops so that its gradient flows (candle-nn's
/// fused path does not pass one back).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
}

impl LayerNorm {
    const EPS: f64 = 1e-5;

    fn new(width: usize, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(width, "weight", candle_nn::Init::Const(1.0))?,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        centred
            .broadcast_div(&(var + Self::EPS)?.sqrt()?)?
            .broadcast_mul(&self.weight)
    }
}

/// Causal multi-head self-attention: one projection to queries, keys and values, one back.
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
}

impl Attention {
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let hd = c / self.heads;
        let qkv = self.qkv.forward(x)?;
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, i * c, c)?
                .reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
        let weights = candle_nn::ops::softmax(&scores.broadcast_add(mask)?, D::Minus1)?;
        let y = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, c))?;
        self.proj.forward(&y)
    }
}

/// A pre-norm transformer block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
struct Block {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc: Linear,
    fc_proj: Linear,
}

impl Block {
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?, mask)?)?;
        let h = self.fc.forward(&self.ln2.forward(&x)?)?.gelu_erf()?;
        &x + self.fc_proj.forward(&h)?
    }
}

/// The GPT.
#[derive(Debug, Clone)]
pub struct Gpt {
    config: GptConfig,
    tok: Embedding,
    pos: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: Linear,
}

impl Gpt {
    /// The model's shape.
    pub fn config(&self) -> GptConfig {
        self.config
    }

    /// Logits `(batch, time, vocab)` for tokens `(batch, time)`, `time <= context`.
    ///
    /// # Errors
    /// A context longer than the model's, or a failed tensor operation.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (_, t) = tokens.dims2()?;
        if t > self.config.context {
            return Err(msg(format!(
                "a context of {t} tokens is longer than the model's {}",
                self.config.context
            )));
        }
        let positions = Tensor::arange(0u32, t as u32, tokens.device())?;
        let mut x = self
            .tok
            .forward(tokens)?
            .broadcast_add(&self.pos.forward(&positions)?)?;
        let mask = causal_mask(t, tokens.device())?;
        for block in &self.blocks {
            x = block.forward(&x, &mask)?;
        }
        self.head.forward(&self.ln_f.forward(&x)?)
    }

    /// Mean cross-entropy of predicting `targets` from `tokens`, both `(batch, time)`.
    ///
    /// # Errors
    /// As [`Gpt::forward`].
    pub fn loss(&self, tokens: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let logits = self.forward(tokens)?;
        let (b, t, v) = logits.dims3()?;
        candle_nn::loss::cross_entropy(&logits.reshape((b * t, v))?, &targets.reshape(b * t)?)
    }

    /// Continues `prompt` by `count` tokens sampled from the model's distribution (temperature
    /// 1), with at most `context` tokens of history.
    ///
    /// # Errors
    /// An empty prompt, or a failed tensor operation.
    pub fn generate(&self, prompt: &[u32], count: usize, rng: &mut SplitMix64) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(msg("generation needs a prompt of at least one token".into()));
        }
        let mut tokens = prompt.to_vec();
        for _ in 0..count {
            let start = tokens.len().saturating_sub(self.config.context);
            let window = Tensor::new(&tokens[start..], &Device::Cpu)?.unsqueeze(0)?;
            let logits = self.forward(&window)?;
            let last = logits.get(0)?.get(window.dim(1)? - 1)?;
            let probs: Vec<f32> = candle_nn::ops::softmax(&last, D::Minus1)?.to_vec1()?;
            let mut u = rng.next_f64() as f32;
            let mut next = probs.len() - 1;
            for (i, p) in probs.iter().enumerate() {
                if u < *p {
                    next = i;
                    break;
                }
                u -= p;
            }
            tokens.push(next as u32);
        }
        Ok(tokens[prompt.len()..].to_vec())
    }
}

/// `(t, t)` additive mask: 0 on and below the diagonal, minus infinity above.
fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(values, (t, t), device)
}

/// Builds the GPT in a fresh `VarMap` and sets its weights from `seed` with candle-nn's default
/// distributions: embeddings normal(0, 1), linear weights Kaiming-normal (standard deviation
/// `sqrt(2 / fan_in)`), layer-norm weights one. Values are drawn in variable-name order, so
/// every model built with the same seed starts from the same weights.
///
/// # Errors
/// `heads` does not divide `width`, a zero dimension, or a tensor that cannot be made.
pub fn build_gpt(config: GptConfig, seed: u64) -> Result<(VarMap, Gpt)> {
    let GptConfig {
        vocab_size,
        context,
        layers,
        heads,
        width,
    } = config;
    if [vocab_size, context, layers, heads, width].contains(&0) || width % heads != 0 {
        return Err(msg(format!(
            "invalid GPT shape {config:?}: every size must be >= 1 and heads must divide width"
        )));
    }
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let linear = |i, o, vb: VarBuilder| candle_nn::linear_no_bias(i, o, vb);
    let blocks = (0..layers)
        .map(|l| {
            let vb = vb.pp(format!("block{l}"));
            Ok(Block {
                ln1: LayerNorm::new(width, vb.pp("ln1"))?,
                attn: Attention {
                    qkv: linear(width, 3 * width, vb.pp("attn.qkv"))?,
                    proj: linear(width, width, vb.pp("attn.proj"))?,
                    heads,
                },
                ln2: LayerNorm::new(width, vb.pp("ln2"))?,
                fc: linear(width, 4 * width, vb.pp("mlp.fc"))?,
                fc_proj: linear(4 * width, width, vb.pp("mlp.proj"))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let model = Gpt {
        config,
        tok: candle_nn::embedding(vocab_size, width, vb.pp("tok"))?,
        pos: candle_nn::embedding(context, width, vb.pp("pos"))?,
        blocks,
        ln_f: LayerNorm::new(width, vb.pp("ln_f"))?,
        head: linear(width, vocab_size, vb.pp("head"))?,
    };
    let mut rng = SplitMix64::new(seed ^ 0x69_7074_5EED);
    for (name, var) in named_vars(&varmap)? {
        let std = if name.starts_with("tok.") || name.starts_with("pos.") {
            1.0
        } else if name.contains("ln") {
            continue;
        } else {
            // Linear weight (out, in): Kaiming normal with ReLU gain over fan_in.
            let fan_in = var.dims().last().copied().unwrap_or(1);
            (2.0 / fan_in as f64).sqrt()
        };
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| (rng.normal() * std) as f32)
            .collect();
        var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
    }
    Ok((varmap, model))
}

/// The variables of `varmap`, sorted by name.
///
/// # Errors
/// The `VarMap`'s lock is poisoned.
pub fn named_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| msg("the VarMap's lock is poisoned".into()))?;
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}
