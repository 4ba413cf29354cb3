//! The `train` example's model, with burn's own layers: a character-level GPT (token and
//! position `Embedding`s, pre-norm blocks of causal multi-head self-attention and a GELU MLP, a
//! final `LayerNorm` and an untied head), as in nanoGPT and the candle example: no biases, no
//! dropout.

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{
    Embedding, EmbeddingConfig, Gelu, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

/// Held by whoever seeds or draws from burn's process-wide random generator (see
/// [`Gpt::new`]).
pub static DEVICE_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[path = "../../../candle-adafactor/examples/train/gpt_config.rs"]
mod gpt_config;
pub use gpt_config::GptConfig;

/// Causal multi-head self-attention: one projection to queries, keys and values, one back.
#[derive(Module, Debug)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
}

impl Attention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, c] = x.dims();
        let hd = c / self.heads;
        let qkv = self.qkv.forward(x);
        let split = |i: usize| {
            qkv.clone()
                .narrow(2, i * c, c)
                .reshape([b, t, self.heads, hd])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (hd as f64).sqrt());
        // True above the diagonal: a position never attends to a later one.
        let future = generate_autoregressive_mask(b, t, &scores.device()).unsqueeze_dim::<4>(1);
        let weights = softmax(scores.mask_fill(future, f32::NEG_INFINITY), 3);
        let y = weights.matmul(v).swap_dims(1, 2).reshape([b, t, c]);
        self.proj.forward(y)
    }
}

/// A pre-norm transformer block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Module, Debug)]
pub struct Block {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc: Linear,
    fc_proj: Linear,
    gelu: Gelu,
}

impl Block {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(self.ln1.forward(x));
        let h = self
            .gelu
            .forward(self.fc.forward(self.ln2.forward(x.clone())));
        x + self.fc_proj.forward(h)
    }
}

/// The GPT.
#[derive(Module, Debug)]
pub struct Gpt {
    tok: Embedding,
    pos: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: Linear,
    context: usize,
}

/// Counts the parameters and materialises burn's lazily initialised ones.
struct Materialise {
    count: usize,
}

impl ModuleVisitor for Materialise {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.count += param.val().shape().num_elements();
    }
}

impl Gpt {
    /// A GPT of shape `config` on `device`, its weights drawn from `seed` with the candle
    /// example's distributions: embeddings normal(0, 1), linear weights Kaiming-normal
    /// (standard deviation `sqrt(2 / fan_in)`), layer-norm weights one. Every model built with
    /// the same seed starts from the same weights.
    ///
    /// # Errors
    /// `heads` does not divide `width`, or a zero dimension.
    pub fn new(config: GptConfig, seed: u64, device: &Device) -> Result<Gpt, String> {
        let GptConfig {
            vocab_size,
            context,
            layers,
            heads,
            width,
        } = config;
        if [vocab_size, context, layers, heads, width].contains(&0) || width % heads != 0 {
            return Err(format!(
                "invalid GPT shape {config:?}: every size must be >= 1 and heads must divide width"
            ));
        }
        // burn's random generator is shared by the whole process: hold it from the seed to
        // the last draw, so that models built on other threads at the same time (the tests run
        // in parallel) cannot take values from this one's sequence.
        let _rng = DEVICE_RNG.lock().unwrap_or_else(|e| e.into_inner());
        device.seed(seed);
        let linear = |i: usize, o: usize| {
            LinearConfig::new(i, o)
                .with_bias(false)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: (2.0 / i as f64).sqrt(),
                })
                .init(device)
        };
        let norm = || LayerNormConfig::new(width).with_bias(false).init(device);
        let model = Gpt {
            tok: EmbeddingConfig::new(vocab_size, width).init(device),
            pos: EmbeddingConfig::new(context, width).init(device),
            blocks: (0..layers)
                .map(|_| Block {
                    ln1: norm(),
                    attn: Attention {
                        qkv: linear(width, 3 * width),
                        proj: linear(width, width),
                        heads,
                    },
                    ln2: norm(),
                    fc: linear(width, 4 * width),
                    fc_proj: linear(4 * width, width),
                    gelu: Gelu::new(),
                })
                .collect(),
            ln_f: norm(),
            head: linear(width, vocab_size),
            context,
        };
        // burn draws a parameter's values when it is first read: read them all now, in field
        // order, so that they come from `seed` and not from whatever ran before.
        model.visit(&mut Materialise { count: 0 });
        Ok(model)
    }

    /// Trainable parameters.
    pub fn num_params(&self) -> usize {
        let mut m = Materialise { count: 0 };
        self.visit(&mut m);
        m.count
    }

    /// Logits `[batch, time, vocab]` for tokens `[batch, time]`, `time <= context`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [_, t] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<1, Int>::arange(0..t as i64, &device).reshape([1, t]);
        let mut x = self.tok.forward(tokens) + self.pos.forward(positions);
        for block in &self.blocks {
            x = block.forward(x);
        }
        self.head.forward(self.ln_f.forward(x))
    }

    /// Mean cross-entropy (nats per character) of predicting `targets` from `tokens`, both
    /// `[batch, time]`.
    pub fn loss(&self, tokens: Tensor<2, Int>, targets: Tensor<2, Int>) -> Tensor<1> {
        let device = tokens.device();
        let [b, t] = tokens.dims();
        let logits = self.forward(tokens);
        let vocab = logits.dims()[2];
        CrossEntropyLossConfig::new()
            .init(&device)
            .forward(logits.reshape([b * t, vocab]), targets.reshape([b * t]))
    }

    /// The longest context.
    pub fn context(&self) -> usize {
        self.context
    }
}

/// Tokens `[rows, len]` as a burn integer tensor on `device`.
pub fn int_tensor(tokens: Vec<u32>, rows: usize, len: usize, device: &Device) -> Tensor<2, Int> {
    let values: Vec<i64> = tokens.into_iter().map(i64::from).collect();
    Tensor::from_data(TensorData::new(values, [rows, len]), device)
}
