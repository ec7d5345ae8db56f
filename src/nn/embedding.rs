//! `Embedding`: a lookup table from token ids to vectors.

use crate::error::{Error, Result};
use crate::nn::init::{Init, normal};
use crate::nn::{Module, TensorRole, visit_tensor};
use crate::tensor::Tensor;

/// weight `[num_embeddings, dim]`, initialised N(0, 1) as `nn.Embedding`.
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(num_embeddings: usize, dim: usize, init: &mut Init) -> Result<Self> {
        if num_embeddings == 0 || dim == 0 {
            return Err(Error::invalid(
                "Embedding",
                format!("sizes must be positive, got {num_embeddings} x {dim}"),
            ));
        }
        Ok(Embedding {
            weight: normal(init, [num_embeddings, dim], 0.0, 1.0)?,
        })
    }
}

impl Module for Embedding {
    /// ids (u32, any shape) → [..ids shape, dim].
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Tensor::embedding(ids, &self.weight)
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_tensor(
            prefix,
            "weight",
            &self.weight,
            TensorRole::Parameter,
            visitor,
        );
    }
}
