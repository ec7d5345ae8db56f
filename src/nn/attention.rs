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
