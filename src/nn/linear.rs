//! `Linear`: y = x Wᵀ + b over the last dim, as `nn.Linear`.

use crate::error::{Error, Result};
use crate::nn::init::{Init, weight_and_bias};
use crate::nn::{Module, TensorRole, visit_weight_and_bias};
use crate::tensor::Tensor;

/// A fully connected layer: weight `[out, in]`, bias `[out]`.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    /// Weight and bias drawn from U(−1/√in, 1/√in), PyTorch's default.
    pub fn new(
        in_features: usize,
        out_features: usize,
        bias: bool,
        init: &mut Init,
    ) -> Result<Self> {
        let (weight, bias) = weight_and_bias(
            init,
            [out_features, in_features],
            out_features,
            in_features,
            bias,
        )?;
        Ok(Linear {
            weight,
            bias,
            in_features,
            out_features,
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }
}

impl Module for Linear {
    /// x `[..., in]` → `[..., out]`; a vector `[in]` gives a vector `[out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() == 0 || x.dims()[x.rank() - 1] != self.in_features {
            return Err(Error::shape(
                "Linear",
                format!(
                    "input of shape {} does not end in in_features = {}",
                    x.shape(),
                    self.in_features
                ),
            ));
        }
        let (rows, was_vector) = if x.rank() == 1 {
            (x.unsqueeze(0)?, true)
        } else {
            (x.clone(), false)
        };
        let y = rows.linear(&self.weight, self.bias.as_ref())?;
        if was_vector { y.squeeze(0) } else { Ok(y) }
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_weight_and_bias(prefix, &self.weight, self.bias.as_ref(), visitor);
    }
}
