//! `BatchNorm2d` (train/eval behaviour, running statistics as buffers) and
//! `LayerNorm` (over the last dim).

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::nn::init::{Init, buffer, constant};
use crate::nn::{Module, TensorRole, visit_tensor};
use crate::tensor::Tensor;

/// Batch normalisation over [N, C, H, W] per channel, as `nn.BatchNorm2d`.
/// Training: normalises with the batch statistics and updates the running
/// ones (the variance with the unbiased n/(n−1) estimate); eval: uses the
/// running statistics.
pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    /// How many training batches updated the running statistics (rank-0
    /// u32; PyTorch's state dicts hold it as int64). A host-side counter: it
    /// stays on the CPU whatever the module's device, so counting costs no
    /// device synchronisation.
    pub num_batches_tracked: Tensor,
    momentum: f64,
    eps: f64,
    training: AtomicBool,
}

impl BatchNorm2d {
    /// `channels` features, momentum 0.1, eps 1e-5; weight 1, bias 0,
    /// running mean 0, running variance 1.
    pub fn new(channels: usize, init: &mut Init) -> Result<Self> {
        if channels == 0 {
            return Err(Error::invalid("BatchNorm2d", "needs at least one channel"));
        }
        Ok(BatchNorm2d {
            weight: constant(init, [channels], 1.0)?,
            bias: constant(init, [channels], 0.0)?,
            running_mean: buffer(init, [channels], 0.0)?,
            running_var: buffer(init, [channels], 1.0)?,
            num_batches_tracked: Tensor::from_indices(vec![0], ())?,
            momentum: 0.1,
            eps: 1e-5,
            training: AtomicBool::new(true),
        })
    }

    /// Replaces the defaults: running = (1 − momentum)·running + momentum·batch.
    pub fn with_options(mut self, momentum: f64, eps: f64) -> Result<Self> {
        // eps must also be finite, as batch_norm2d requires of every forward.
        if !(0.0..=1.0).contains(&momentum) || !eps.is_finite() || eps <= 0.0 {
            return Err(Error::invalid(
                "BatchNorm2d",
                format!(
                    "momentum must lie in [0, 1] and eps be positive and finite, got {momentum} and {eps}"
                ),
            ));
        }
        self.momentum = momentum;
        self.eps = eps;
        Ok(self)
    }

    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }
}

impl Module for BatchNorm2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let training = self.is_training();
        let y = x.batch_norm2d(
            Some(&self.running_mean),
            Some(&self.running_var),
            Some(&self.weight),
            Some(&self.bias),
            training,
            self.momentum,
            self.eps,
        )?;
        if training {
            let tracked = self.num_batches_tracked.item()? as u32;
            let next = Tensor::from_indices(vec![tracked.saturating_add(1)], ())?;
            self.num_batches_tracked.assign(&next)?;
        }
        Ok(y)
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_tensor(
            prefix,
            "weight",
            &self.weight,
            TensorRole::Parameter,
            visitor,
        );
        visit_tensor(prefix, "bias", &self.bias, TensorRole::Parameter, visitor);
        visit_tensor(
            prefix,
            "running_mean",
            &self.running_mean,
            TensorRole::Buffer,
            visitor,
        );
        visit_tensor(
            prefix,
            "running_var",
            &self.running_var,
            TensorRole::Buffer,
            visitor,
        );
        visit_tensor(
            prefix,
            "num_batches_tracked",
            &self.num_batches_tracked,
            TensorRole::Buffer,
            visitor,
        );
    }

    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }
}

/// Layer normalisation over the last dim with a learned scale and shift, as
/// `nn.LayerNorm(dim)`.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Normalises a last dim of size `dim`; eps 1e-5, weight 1, bias 0.
    pub fn new(dim: usize, init: &mut Init) -> Result<Self> {
        if dim == 0 {
            return Err(Error::invalid("LayerNorm", "needs a dim of at least 1"));
        }
        Ok(LayerNorm {
            weight: constant(init, [dim], 1.0)?,
            bias: constant(init, [dim], 0.0)?,
            eps: 1e-5,
        })
    }

    /// Replaces the default eps.
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(Some(&self.weight), Some(&self.bias), self.eps)
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_tensor(
            prefix,
            "weight",
            &self.weight,
            TensorRole::Parameter,
            visitor,
        );
        visit_tensor(prefix, "bias", &self.bias, TensorRole::Parameter, visitor);
    }
}
