//! A character-level GPT: GPT-2-style decoder blocks (Radford et al.,
//! "Language Models are Unsupervised Multitask Learners", 2019) in the
//! layout of GPT-2's state dict (`wte`, `wpe`, `h.{i}.ln_1`, `h.{i}.attn.c_attn`,
//! `h.{i}.mlp.c_fc`, `ln_f`, `lm_head`):
//!
//! ```text
//! x = drop(wte[ids] + wpe[positions])           learned position embeddings
//! x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))   per block, pre-LayerNorm
//! logits = lm_head(ln_f(x))                     final LayerNorm, linear head
//! ```
//!
//! where attn is causal multi-head self-attention and mlp is
//! Linear(E→4E) → GELU(tanh) → Linear(4E→E) → dropout. The head has no bias
//! and is not tied to `wte` (each is a parameter of its own).

use crate::autocast::MixedPrecision;
use crate::autograd::no_grad;
use crate::error::{Error, Result};
use crate::nn::init::{Init, constant, normal};
use crate::nn::{
    CausalSelfAttention, Dropout, Embedding, Gelu, KvCache, LayerNorm, Linear, Module, TensorRole,
    visit_child,
};
use crate::ops::activation::GeluApproximation;
use crate::ops::loss::Reduction;
use crate::optim::{AdamConfig, AdamW, Optimizer, clip_grad_norm};
use crate::tensor::{DType, Rng, Tensor};

/// The training defaults of `kiln train gpt`. The gradient-norm clip is a
/// guard against rare spikes, not a constant brake: at batch 12 the norm
/// sits near 1.3–1.6 for the whole run, so nanoGPT's 1.0 shrank almost every
/// step, and the 2000-step Shakespeare run reached validation loss 1.8535
/// with (1.0, 0.1) against 1.8404 with (5.0, 0.01), PyTorch's AdamW decay.
pub const DEFAULT_GRAD_CLIP: f64 = 5.0;
pub const DEFAULT_WEIGHT_DECAY: f64 = 0.01;

/// Std of GPT-2's N(0, σ²) weight initialisation.
const INIT_STD: f64 = 0.02;

/// AdamW's β₂ of `kiln train gpt` (PyTorch's default). nanoGPT's 0.99 for
/// small character models reached 1.8404 with the rest of kiln's recipe;
/// see [`GptInit`] for the measurements.
pub const DEFAULT_BETA2: f64 = 0.999;

/// How a [`Gpt`]'s weights start.
///
/// The 4-layer, 128-wide Shakespeare model after 2000 steps at batch 12
/// (validation loss over the whole split, `kiln eval gpt --full`) reached
/// 1.8404 with GPT-2's initialisation, β₂ = 0.99 and a cosine decay of the
/// rate; 1.8467 with PyTorch's initialisation alone; 1.8342 with β₂ = 0.999
/// alone; 1.8275 with both; 1.7960 with both and a constant rate, kiln's
/// defaults now (the README gives the runs). GPT-2's N(0, 0.02²) was chosen for
/// 768-wide models: in a 128-wide one it starts the embeddings at a fiftieth
/// of the unit scale the LayerNorms work at, and the first hundreds of steps
/// go to growing them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GptInit {
    /// PyTorch's module defaults: embeddings N(0, 1), linear weights and
    /// biases U(±1/√fan_in), LayerNorms 1 and 0.
    #[default]
    PyTorch,
    /// GPT-2's: weights N(0, 0.02²), biases 0, LayerNorms 1 and 0, and the
    /// residual projections N(0, (0.02/√(2·n_layer))²) so that the residual
    /// stream's variance does not grow with depth.
    Gpt2,
}

/// Sizes and regularisation of a [`Gpt`].
#[derive(Clone, Debug)]
pub struct GptConfig {
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Embedding width E; must be a multiple of `n_head`.
    pub n_embd: usize,
    /// Longest context the model sees (the number of position embeddings).
    pub block_size: usize,
    /// Dropout probability after the embeddings, attention and MLP.
    pub dropout: f64,
}

impl GptConfig {
    /// Trainable parameters of the GPT these sizes build, computed without
    /// building it (to check that it fits before allocating).
    pub fn parameter_count(&self) -> u128 {
        let (v, t, e) = (
            self.vocab_size as u128,
            self.block_size as u128,
            self.n_embd as u128,
        );
        // Saturating: sizes from a damaged file may be absurd.
        let linear = |i: u128, o: u128| i.saturating_mul(o).saturating_add(o);
        let layer_norm = 2 * e;
        let block = [
            2 * layer_norm,
            linear(e, 3 * e),
            linear(e, e),
            linear(e, 4 * e),
            linear(4 * e, e),
        ]
        .into_iter()
        .fold(0u128, u128::saturating_add);
        [
            (v + t).saturating_mul(e),
            (self.n_layer as u128).saturating_mul(block),
            layer_norm,
            e.saturating_mul(v),
        ]
        .into_iter()
        .fold(0, u128::saturating_add)
    }

    fn validate(&self) -> Result<()> {
        super::check_positive(
            "Gpt",
            &[
                ("vocab_size", self.vocab_size),
                ("n_layer", self.n_layer),
                ("n_head", self.n_head),
                ("n_embd", self.n_embd),
                ("block_size", self.block_size),
            ],
        )?;
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Error::invalid(
                "Gpt",
                format!(
                    "n_embd = {} is not divisible by n_head = {}",
                    self.n_embd, self.n_head
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid(
                "Gpt",
                format!("dropout must lie in [0, 1), got {}", self.dropout),
            ));
        }
        Ok(())
    }
}

/// Overwrites a linear layer's initialisation (PyTorch's, from
/// `Linear::new`) with GPT-2's when asked: weight from N(0, std²), bias 0.
fn gpt2_init(layer: &mut Linear, std: f64, scheme: GptInit, init: &mut Init) -> Result<()> {
    if scheme != GptInit::Gpt2 {
        return Ok(());
    }
    layer.weight = normal(init, layer.weight.shape().clone(), 0.0, std)?;
    if let Some(bias) = &mut layer.bias {
        *bias = constant(init, bias.shape().clone(), 0.0)?;
    }
    Ok(())
}

/// The feed-forward half of a block: E → 4E → GELU(tanh) → E, then dropout.
pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
    dropout: Dropout,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = Gelu(GeluApproximation::Tanh).forward(&self.c_fc.forward(x)?)?;
        self.dropout.forward(&self.c_proj.forward(&h)?)
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_child(prefix, "c_fc", &self.c_fc, visitor);
        visit_child(prefix, "c_proj", &self.c_proj, visitor);
    }

    fn set_training(&self, training: bool) {
        self.dropout.set_training(training);
    }
}

/// One pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).
pub struct Block {
    pub ln_1: LayerNorm,
    pub attn: CausalSelfAttention,
    pub ln_2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    /// `residual_std` initialises the two projections that write into the
    /// residual stream (attn.c_proj, mlp.c_proj).
    fn new(
        cfg: &GptConfig,
        scheme: GptInit,
        residual_std: f64,
        seed: u64,
        init: &mut Init,
    ) -> Result<Self> {
        let e = cfg.n_embd;
        let ln_1 = LayerNorm::new(e, init)?;
        let mut attn = CausalSelfAttention::new(e, cfg.n_head, cfg.dropout, seed, init)?;
        gpt2_init(&mut attn.c_attn, INIT_STD, scheme, init)?;
        gpt2_init(&mut attn.c_proj, residual_std, scheme, init)?;
        let ln_2 = LayerNorm::new(e, init)?;
        let mut c_fc = Linear::new(e, 4 * e, true, init)?;
        gpt2_init(&mut c_fc, INIT_STD, scheme, init)?;
        let mut c_proj = Linear::new(4 * e, e, true, init)?;
        gpt2_init(&mut c_proj, residual_std, scheme, init)?;
        let mlp = Mlp {
            c_fc,
            c_proj,
            dropout: Dropout::new(cfg.dropout, seed.wrapping_add(1))?,
        };
        Ok(Block {
            ln_1,
            attn,
            ln_2,
            mlp,
        })
    }
}

impl Module for Block {
    /// x [B, T, E] → [B, T, E].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.add(&self.attn.forward(&self.ln_1.forward(x)?)?)?;
        x.add(&self.mlp.forward(&self.ln_2.forward(&x)?)?)
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_child(prefix, "ln_1", &self.ln_1, visitor);
        visit_child(prefix, "attn", &self.attn, visitor);
        visit_child(prefix, "ln_2", &self.ln_2, visitor);
        visit_child(prefix, "mlp", &self.mlp, visitor);
    }

    fn set_training(&self, training: bool) {
        self.attn.set_training(training);
        self.mlp.set_training(training);
    }
}

/// The whole model; `forward` maps token ids u32 [B, T] to logits [B, T, V].
pub struct Gpt {
    pub wte: Embedding,
    pub wpe: Embedding,
    pub h: Vec<Block>,
    pub ln_f: LayerNorm,
    pub lm_head: Linear,
    drop: Dropout,
    config: GptConfig,
}

impl Gpt {
    /// A GPT with PyTorch's initialisation ([`GptInit::PyTorch`]); `seed`
    /// is the base of the dropout masks.
    pub fn new(cfg: &GptConfig, seed: u64, init: &mut Init) -> Result<Self> {
        Gpt::with_init(cfg, GptInit::default(), seed, init)
    }

    /// A GPT initialised as `scheme` says.
    pub fn with_init(cfg: &GptConfig, scheme: GptInit, seed: u64, init: &mut Init) -> Result<Self> {
        cfg.validate()?;
        let e = cfg.n_embd;
        let embedding_std = match scheme {
            GptInit::PyTorch => 1.0,
            GptInit::Gpt2 => INIT_STD,
        };
        let wte = Embedding {
            weight: normal(init, [cfg.vocab_size, e], 0.0, embedding_std)?,
            padding_idx: None,
        };
        let wpe = Embedding {
            weight: normal(init, [cfg.block_size, e], 0.0, embedding_std)?,
            padding_idx: None,
        };
        let residual_std = INIT_STD / (2.0 * cfg.n_layer as f64).sqrt();
        // Each dropout gets its own base seed: 0 for the embeddings, then two per block.
        let h = (0..cfg.n_layer)
            .map(|i| {
                let block_seed = seed.wrapping_add(1 + 2 * i as u64);
                Block::new(cfg, scheme, residual_std, block_seed, init)
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(e, init)?;
        let mut lm_head = Linear::new(e, cfg.vocab_size, false, init)?;
        gpt2_init(&mut lm_head, INIT_STD, scheme, init)?;
        Ok(Gpt {
            wte,
            wpe,
            h,
            ln_f,
            lm_head,
            drop: Dropout::new(cfg.dropout, seed)?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// Starts mask stream `stream` in every dropout of the model (see
    /// [`Dropout::restart_stream`]). `kiln train gpt` starts stream k
    /// before step k, so a run resumed at step k draws the masks that a run
    /// that never stopped draws.
    pub fn restart_dropout_streams(&self, stream: u64) {
        self.drop.restart_stream(stream);
        for block in &self.h {
            block.attn.resid_dropout.restart_stream(stream);
            block.mlp.dropout.restart_stream(stream);
        }
    }

    /// Mean cross entropy of the next-token predictions over all B·T
    /// positions: x, y are u32 [B, T], y[b, t] the token that follows x[b, t].
    pub fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        if y.dims() != x.dims() {
            return Err(Error::shape(
                "Gpt::loss",
                format!(
                    "targets {} must have the shape of the inputs {}",
                    y.shape(),
                    x.shape()
                ),
            ));
        }
        let logits = self.forward(x)?;
        let rows = x.numel();
        let targets = y.reshape([rows])?.to_device(logits.device())?;
        logits
            .reshape([rows, self.config.vocab_size])?
            .cross_entropy(&targets, Reduction::Mean)
    }

    /// Samples `max_new_tokens` tokens after `prompt` and returns them (the
    /// prompt is not repeated). Each step feeds the last `block_size` tokens,
    /// divides the last position's logits by `temperature` (below 1 sharpens
    /// the distribution, above 1 flattens it), keeps only the `top_k` largest
    /// if given (`Some(1)` is greedy decoding), and draws from their softmax
    /// with `rng`. Runs without a graph and in eval mode (no dropout); the
    /// model's train/eval mode is restored afterwards.
    ///
    /// Each layer's keys and values are kept between tokens (a KV cache), so
    /// that while the text fits in `block_size` a new token costs one
    /// position's work instead of the whole window's. Past `block_size` the
    /// window slides: every token then sits at a new position, and with
    /// learned position embeddings its keys and values change, so each step
    /// recomputes the window, as without the cache. [`Gpt::generate_with`]
    /// can turn the cache off; the tokens are the same either way (up to the
    /// last bits of the logits, which an exact tie could show).
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        temperature: f64,
        top_k: Option<usize>,
        rng: &mut Rng,
    ) -> Result<Vec<u32>> {
        self.generate_with(prompt, max_new_tokens, temperature, top_k, true, rng)
    }

    /// [`Gpt::generate`], with the KV cache on or off (`kv_cache`).
    pub fn generate_with(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        temperature: f64,
        top_k: Option<usize>,
        kv_cache: bool,
        rng: &mut Rng,
    ) -> Result<Vec<u32>> {
        let mut tokens = Vec::with_capacity(max_new_tokens);
        let how = Sampling {
            temperature,
            top_k,
            kv_cache,
        };
        self.generate_streaming(prompt, max_new_tokens, &how, rng, &mut |token| {
            tokens.push(token);
            Ok(())
        })?;
        Ok(tokens)
    }

    /// [`Gpt::generate_with`] that hands each token to `on_token` as it is
    /// drawn instead of collecting them: memory stays that of one window
    /// however many tokens are asked for. An error from `on_token` stops
    /// the generation.
    pub fn generate_streaming(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        how: &Sampling,
        rng: &mut Rng,
        on_token: &mut dyn FnMut(u32) -> Result<()>,
    ) -> Result<()> {
        const OP: &str = "Gpt::generate";
        let Sampling {
            temperature, top_k, ..
        } = *how;
        let vocab = self.config.vocab_size;
        if prompt.is_empty() {
            return Err(Error::invalid(OP, "the prompt needs at least one token"));
        }
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::invalid(
                OP,
                format!("prompt token {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(Error::invalid(
                OP,
                format!("temperature must be positive and finite, got {temperature}"),
            ));
        }
        if top_k == Some(0) {
            return Err(Error::invalid(OP, "top_k must be at least 1"));
        }
        let was_training = self.drop.is_training();
        self.eval();
        let _no_grad = no_grad();
        let sampled = self.sample_tokens(prompt, max_new_tokens, how, rng, on_token);
        self.set_training(was_training);
        sampled
    }

    fn sample_tokens(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        how: &Sampling,
        rng: &mut Rng,
        on_token: &mut dyn FnMut(u32) -> Result<()>,
    ) -> Result<()> {
        let kv_cache = how.kv_cache;
        let block = self.config.block_size;
        // The text's tail: at least the window, at most two.
        let mut tokens = prompt.to_vec();
        let mut cache: Option<Vec<KvCache>> = None;
        for step in 0..max_new_tokens {
            // The whole text so far, head included.
            let length = prompt.len() + step;
            let window = &tokens[tokens.len().saturating_sub(block)..];
            // The last position's logits [V], on the host: one small row.
            let last_row = match &mut cache {
                // The cache holds every position of the window but the last.
                Some(layers) if kv_cache && layers[0].len() + 1 == window.len() => {
                    let newest = &window[window.len() - 1..];
                    self.last_logits_cached(newest, layers)?
                }
                _ if kv_cache && length <= block => {
                    let mut layers: Vec<KvCache> =
                        self.h.iter().map(|_| KvCache::default()).collect();
                    let logits = self.last_logits_cached(window, &mut layers)?;
                    cache = Some(layers);
                    logits
                }
                // No cache, or a sliding window: the whole window.
                _ => {
                    let t = window.len();
                    let ids = Tensor::from_indices(window.to_vec(), [1, t])?;
                    self.forward(&ids)?.narrow(1, t - 1, 1)?.to_f64_vec()
                }
            };
            let scaled: Vec<f64> = last_row.iter().map(|l| l / how.temperature).collect();
            let next = sample_from_logits(&keep_top_k(scaled, how.top_k), rng);
            tokens.push(next);
            on_token(next)?;
            if tokens.len() >= 2 * block {
                tokens.drain(..tokens.len() - block);
            }
        }
        Ok(())
    }

    /// The logits [V] of the last of `new` tokens, which follow the
    /// positions already in `layers` (one cache per block), adding theirs.
    fn last_logits_cached(&self, new: &[u32], layers: &mut [KvCache]) -> Result<Vec<f64>> {
        let (past, n) = (layers[0].len(), new.len());
        let device = self.wte.weight.device();
        let ids = Tensor::from_indices(new.to_vec(), [1, n])?.to_device(device)?;
        let positions = Tensor::arange(past as f64, (past + n) as f64, 1.0, DType::U32, device)?;
        let mut x = self
            .wte
            .forward(&ids)?
            .add(&self.wpe.forward(&positions)?)?;
        for (block, cache) in self.h.iter().zip(layers.iter_mut()) {
            x = x.add(&block.attn.forward_cached(&block.ln_1.forward(&x)?, cache)?)?;
            x = x.add(&block.mlp.forward(&block.ln_2.forward(&x)?)?)?;
        }
        // Only the last position's logits are needed.
        let last = x.narrow(1, n - 1, 1)?;
        Ok(self
            .lm_head
            .forward(&self.ln_f.forward(&last)?)?
            .to_f64_vec())
    }
}

/// How [`Gpt::generate_streaming`] draws each token (checked when it starts).
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// Divides the logits: below 1 sharpens the distribution, above 1 flattens it.
    pub temperature: f64,
    /// Keep only the k most likely tokens (`Some(1)`: greedy decoding).
    pub top_k: Option<usize>,
    /// Keep each layer's keys and values between tokens.
    pub kv_cache: bool,
}

/// Sets every logit below the k-th largest to −∞ (ties with it are kept, as
/// in PyTorch's `logits[logits < topk.values[-1]] = -inf`).
fn keep_top_k(mut logits: Vec<f64>, top_k: Option<usize>) -> Vec<f64> {
    let Some(k) = top_k.filter(|&k| k < logits.len()) else {
        return logits;
    };
    let mut sorted = logits.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth_largest = sorted[k - 1];
    for l in &mut logits {
        if *l < kth_largest {
            *l = f64::NEG_INFINITY;
        }
    }
    logits
}

/// Draws an index with probability softmax(logits)ᵢ by inverting the
/// cumulative distribution at one uniform number from `rng`.
fn sample_from_logits(logits: &[f64], rng: &mut Rng) -> u32 {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    // 53 random bits → uniform in [0, 1)
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut threshold = u * total;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 && threshold < w {
            return i as u32;
        }
        threshold -= w;
    }
    // Rounding left the threshold past the end: take the last token with any weight.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
}

impl Module for Gpt {
    /// ids u32 [B, T] with 1 ≤ T ≤ block_size → logits [B, T, vocab_size].
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let block = self.config.block_size;
        let (t, valid) = match ids.dims() {
            [b, t] => (*t, *b > 0 && (1..=block).contains(t)),
            _ => (0, false),
        };
        if !valid || ids.dtype() != DType::U32 {
            return Err(Error::shape(
                "Gpt",
                format!(
                    "expected u32 token ids [B, T] with B > 0 and 1 <= T <= block_size = {block}, got {} {}",
                    ids.dtype(),
                    ids.shape()
                ),
            ));
        }
        let device = self.wte.weight.device();
        let ids = ids.to_device(device)?;
        let positions = Tensor::arange(0.0, t as f64, 1.0, DType::U32, device)?;
        // [B, T, E] + [T, E] broadcast over the batch
        let tokens = self.wte.forward(&ids)?;
        let mut x = self
            .drop
            .forward(&tokens.add(&self.wpe.forward(&positions)?)?)?;
        for (i, block) in self.h.iter().enumerate() {
            // Names the block's ops for `kiln graph` (one box per block).
            let _scope = crate::autograd::module_scope(&format!("h.{i}"));
            x = block.forward(&x)?;
        }
        self.lm_head.forward(&self.ln_f.forward(&x)?)
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_child(prefix, "wte", &self.wte, visitor);
        visit_child(prefix, "wpe", &self.wpe, visitor);
        for (i, block) in self.h.iter().enumerate() {
            visit_child(prefix, &format!("h.{i}"), block, visitor);
        }
        visit_child(prefix, "ln_f", &self.ln_f, visitor);
        visit_child(prefix, "lm_head", &self.lm_head, visitor);
    }

    fn set_training(&self, training: bool) {
        self.drop.set_training(training);
        for block in &self.h {
            block.set_training(training);
        }
    }
}

/// nanoGPT's optimizer layout: AdamW (β₁ 0.9, eps 1e-8, β₂ as given:
/// [`DEFAULT_BETA2`] in `kiln train gpt`) in two parameter groups, so that
/// weight decay shrinks the matrices (embeddings and linear weights) but
/// not the biases and LayerNorm parameters.
pub struct GptOptimizers {
    /// The matrices, with weight decay.
    pub decay: AdamW,
    /// Biases and LayerNorm scales and shifts, without.
    pub no_decay: AdamW,
}

impl GptOptimizers {
    pub fn new(gpt: &Gpt, lr: f64, weight_decay: f64, beta2: f64) -> Result<Self> {
        let (matrices, vectors): (Vec<_>, Vec<_>) = gpt
            .named_parameters()
            .into_iter()
            .partition(|(_, p)| p.rank() >= 2);
        let config = AdamConfig {
            lr,
            betas: (0.9, beta2),
            eps: 1e-8,
            weight_decay,
            ..AdamConfig::adamw()
        };
        Ok(GptOptimizers {
            decay: AdamW::new(matrices, config)?,
            no_decay: AdamW::new(
                vectors,
                AdamConfig {
                    weight_decay: 0.0,
                    ..config
                },
            )?,
        })
    }

    /// Sets both groups' learning rate (the schedule is the caller's).
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.decay.set_learning_rate(lr);
        self.no_decay.set_learning_rate(lr);
    }
}

/// What one GPT training step leaves behind.
pub struct GptStep {
    /// The batch's mean cross entropy (rank 0, detached).
    pub loss: Tensor,
    /// The gradients' joint L2 norm before clipping; None when not clipped.
    pub grad_norm: Option<f64>,
}

/// One training step on token ids `x` and next-token targets `y` (u32
/// [B, T]): the loss, its gradients, clipping of their joint norm to
/// `grad_clip` (none if `grad_clip` is 0), and one update of both AdamW
/// groups at their current learning rate. The same call serves
/// `kiln train gpt` and the benchmarks.
pub fn train_step(
    gpt: &Gpt,
    optimizers: &mut GptOptimizers,
    x: &Tensor,
    y: &Tensor,
    grad_clip: f64,
    amp: &mut MixedPrecision,
) -> Result<GptStep> {
    let loss = {
        let _autocast = amp.autocast();
        gpt.loss(x, y)?
    };
    let (mut grads, finite) = amp.backward(&loss)?;
    let grad_norm = if grad_clip > 0.0 && finite {
        Some(clip_grad_norm(&mut grads, &gpt.parameters(), grad_clip)?)
    } else {
        None
    };
    // A step whose f16 gradients overflowed is skipped (the scale backs off).
    if finite {
        optimizers.decay.step(&grads)?;
        optimizers.no_decay.step(&grads)?;
    }
    amp.end_step();
    Ok(GptStep {
        loss: loss.detach(),
        grad_norm,
    })
}
