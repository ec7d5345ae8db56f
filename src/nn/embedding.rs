//! `Embedding`: a lookup table from token ids to vectors.

use crate::error::{Error, Result};
use crate::nn::init::{Init, normal};
use crate::nn::{Module, TensorRole, visit_tensor};
use crate::ops::embedding::padding_row;
use crate::tensor::Tensor;

/// weight `[num_embeddings, dim]`, initialised N(0, 1) as `nn.Embedding`.
pub struct Embedding {
    pub weight: Tensor,
    /// The row that never gets a gradient (PyTorch's `padding_idx`,
    /// resolved to a row number); None for none.
    pub padding_idx: Option<usize>,
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
            padding_idx: None,
        })
    }

    /// `nn.Embedding(num_embeddings, dim, padding_idx)`: as `new`, with row
    /// `padding_idx` (negative counts from the end) initialised to zeros and
    /// never updated by a gradient, as PyTorch's. The ids may still name it:
    /// they read that row as it is.
    pub fn with_padding_idx(
        num_embeddings: usize,
        dim: usize,
        padding_idx: isize,
        init: &mut Init,
    ) -> Result<Self> {
        let mut embedding = Self::new(num_embeddings, dim, init)?;
        let row = padding_row("Embedding", padding_idx, embedding.weight.shape())? as usize;
        // PyTorch draws the whole table, then zeros the padding row in place.
        let weight = &embedding.weight;
        let mut values = weight.to_f64_vec();
        values[row * dim..(row + 1) * dim].fill(0.0);
        let zeroed = Tensor::from_vec(values, weight.shape().clone())?
            .to_dtype(weight.dtype())?
            .to_device(weight.device())?;
        weight.assign(&zeroed)?;
        embedding.padding_idx = Some(row);
        Ok(embedding)
    }
}

impl Module for Embedding {
    /// ids (u32, any shape) → [..ids shape, dim].
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let padding_idx = self.padding_idx.map(|row| row as isize);
        Tensor::embedding_with(ids, &self.weight, padding_idx)
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
