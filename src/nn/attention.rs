//! `CausalSelfAttention` in GPT-2's layout (`c_attn`, `c_proj`,
//! `resid_dropout`), so GPT-2-style state dicts keep their names.

use crate::error::{Error, Result};
use crate::nn::init::Init;
use crate::nn::{Dropout, Linear, Module, TensorRole, visit_child};
use crate::tensor::Tensor;

/// Multi-head self-attention where each position sees only itself and the
/// positions before it.
pub struct CausalSelfAttention {
    /// E → 3E: queries, keys and values in one product.
    pub c_attn: Linear,
    /// E → E: mixes the heads' outputs.
    pub c_proj: Linear,
    pub resid_dropout: Dropout,
    embd: usize,
    n_head: usize,
}

impl CausalSelfAttention {
    pub fn new(
        embd: usize,
        n_head: usize,
        dropout_p: f64,
        seed: u64,
        init: &mut Init,
    ) -> Result<Self> {
        if n_head == 0 || !embd.is_multiple_of(n_head) {
            return Err(Error::invalid(
                "CausalSelfAttention",
                format!("embedding size {embd} is not divisible by n_head = {n_head}"),
            ));
        }
        Ok(CausalSelfAttention {
            c_attn: Linear::new(embd, 3 * embd, true, init)?,
            c_proj: Linear::new(embd, embd, true, init)?,
            resid_dropout: Dropout::new(dropout_p, seed)?,
            embd,
            n_head,
        })
    }

    pub fn n_head(&self) -> usize {
        self.n_head
    }
}

/// One layer's keys and values for generation, [B, H, T, D] each, for the
/// positions seen so far.
#[derive(Default)]
pub struct KvCache {
    keys: Option<Tensor>,
    values: Option<Tensor>,
}

impl KvCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CausalSelfAttention {
    /// The forward of new positions x [B, n, E] that follow the ones in
    /// `cache` (for generation, outside the graph): their keys and values
    /// join the cache, and each new query attends to every cached position
    /// and to the new ones up to its own. An empty cache takes a whole
    /// prompt through the fused causal attention, as `forward` does; one
    /// new position then attends to all T cached keys with one product per
    /// head (softmax(q·Kᵀ/√D)·V), instead of the whole window being
    /// recomputed.
    pub fn forward_cached(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let e = self.embd;
        let (b, n) = match x.dims() {
            [b, n, width] if *width == e => (*b, *n),
            _ => {
                return Err(Error::shape(
                    "CausalSelfAttention",
                    format!("expected input [B, T, {e}], got {}", x.shape()),
                ));
            }
        };
        if !cache.is_empty() && n != 1 {
            return Err(Error::invalid(
                "CausalSelfAttention",
                format!("a filled cache takes one new position at a time, got {n}"),
            ));
        }
        let (h, d) = (self.n_head, e / self.n_head);
        let qkv = self.c_attn.forward(x)?;
        // [B, n, E] → [B, H, n, D]
        let heads = |part: usize| {
            qkv.narrow(2, part * e, e)?
                .reshape([b, n, h, d])?
                .permute(&[0, 2, 1, 3])
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let y = match (&cache.keys, &cache.values) {
            (Some(keys), Some(values)) => {
                let keys = Tensor::cat(&[keys, &k], 2)?;
                let values = Tensor::cat(&[values, &v], 2)?;
                // The one new query sees every position: no mask.
                let weights = q
                    .matmul_nt(&keys)?
                    .mul_scalar(1.0 / (d as f64).sqrt())?
                    .softmax(-1)?;
                let y = weights.matmul(&values)?;
                (cache.keys, cache.values) = (Some(keys), Some(values));
                y
            }
            _ => {
                let y = Tensor::causal_attention(&q, &k, &v)?;
                (cache.keys, cache.values) = (Some(k), Some(v));
                y
            }
        };
        let y = y.permute(&[0, 2, 1, 3])?.reshape([b, n, e])?;
        self.resid_dropout.forward(&self.c_proj.forward(&y)?)
    }
}

impl Module for CausalSelfAttention {
    /// x [B, T, E] → [B, T, E].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let e = self.embd;
        if x.rank() != 3 || x.dims()[2] != e {
            return Err(Error::shape(
                "CausalSelfAttention",
                format!("expected input [B, T, {e}], got {}", x.shape()),
            ));
        }
        // q, k, v side by side in [B, T, 3E]; heads split and merged inside the op.
        let y = self.c_attn.forward(x)?.causal_self_attention(self.n_head)?;
        self.resid_dropout.forward(&self.c_proj.forward(&y)?)
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_child(prefix, "c_attn", &self.c_attn, visitor);
        visit_child(prefix, "c_proj", &self.c_proj, visitor);
        visit_child(prefix, "resid_dropout", &self.resid_dropout, visitor);
    }

    fn set_training(&self, training: bool) {
        self.resid_dropout.set_training(training);
    }
}
