//! `BatchNorm2d` (train/eval behaviour, running statistics as buffers, the
//! options of `nn.BatchNorm2d`) and `LayerNorm` (over the trailing dims).

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::nn::init::{Init, buffer, constant};
use crate::nn::{Module, TensorRole, visit_tensor};
use crate::tensor::Tensor;

/// The options of `nn.BatchNorm2d(C, eps, momentum, affine,
/// track_running_stats)`; `Default` gives PyTorch's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNorm2dOptions {
    /// Added to the variance before the square root (1e-5); positive and finite.
    pub eps: f64,
    /// `Some(m)` (0.1): running = (1 − m)·running + m·batch statistic.
    /// `None`: the running statistics are the cumulative (equal-weight)
    /// average of every training batch's: the blend factor is
    /// 1/num_batches_tracked, counting the current batch.
    pub momentum: Option<f64>,
    /// Whether to learn a per-channel weight (1) and bias (0) (true).
    pub affine: bool,
    /// Whether to keep running statistics (true). Without them the module
    /// has no running_mean, running_var or num_batches_tracked, and
    /// normalises with the batch statistics in training and eval alike.
    pub track_running_stats: bool,
}

impl Default for BatchNorm2dOptions {
    fn default() -> Self {
        BatchNorm2dOptions {
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
        }
    }
}

/// Batch normalisation over [N, C, H, W] per channel, as `nn.BatchNorm2d`.
/// Training: normalises with the batch statistics and updates the running
/// ones (the variance with the unbiased n/(n−1) estimate); eval: uses the
/// running statistics, or the batch ones when none are kept.
pub struct BatchNorm2d {
    /// The affine parameters, [C]; None without `affine` (as PyTorch's).
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    /// The running statistics, [C]; None without `track_running_stats`.
    pub running_mean: Option<Tensor>,
    pub running_var: Option<Tensor>,
    /// How many training batches updated the running statistics (rank-0
    /// u32; PyTorch's state dicts hold it as int64). A host-side counter: it
    /// stays on the CPU whatever the module's device, so counting costs no
    /// device synchronisation. None without `track_running_stats`.
    pub num_batches_tracked: Option<Tensor>,
    momentum: Option<f64>,
    eps: f64,
    training: AtomicBool,
}

impl BatchNorm2d {
    /// `channels` features with PyTorch's defaults (momentum 0.1, eps 1e-5,
    /// affine, running statistics tracked); weight 1, bias 0, running mean
    /// 0, running variance 1.
    pub fn new(channels: usize, init: &mut Init) -> Result<Self> {
        Self::with_config(channels, BatchNorm2dOptions::default(), init)
    }

    /// `nn.BatchNorm2d(channels, eps, momentum, affine, track_running_stats)`.
    pub fn with_config(
        channels: usize,
        options: BatchNorm2dOptions,
        init: &mut Init,
    ) -> Result<Self> {
        if channels == 0 {
            return Err(Error::invalid("BatchNorm2d", "needs at least one channel"));
        }
        check_momentum_and_eps(options.momentum, options.eps)?;
        let (weight, bias) = if options.affine {
            (
                Some(constant(init, [channels], 1.0)?),
                Some(constant(init, [channels], 0.0)?),
            )
        } else {
            (None, None)
        };
        let (running_mean, running_var, num_batches_tracked) = if options.track_running_stats {
            (
                Some(buffer(init, [channels], 0.0)?),
                Some(buffer(init, [channels], 1.0)?),
                Some(Tensor::from_indices(vec![0], ())?),
            )
        } else {
            (None, None, None)
        };
        Ok(BatchNorm2d {
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            momentum: options.momentum,
            eps: options.eps,
            training: AtomicBool::new(true),
        })
    }

    /// Replaces the defaults: running = (1 − momentum)·running + momentum·batch.
    pub fn with_options(mut self, momentum: f64, eps: f64) -> Result<Self> {
        check_momentum_and_eps(Some(momentum), eps)?;
        self.momentum = Some(momentum);
        self.eps = eps;
        Ok(self)
    }

    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// The factor the next training batch blends into the running
    /// statistics with: the momentum, or 1/num_batches_tracked counting
    /// this batch (a cumulative average) when the momentum is None.
    fn blend_factor(&self, tracked: u32) -> f64 {
        match self.momentum {
            Some(momentum) => momentum,
            None => 1.0 / (f64::from(tracked) + 1.0),
        }
    }
}

/// `with_config` and `with_options` accept a momentum in [0, 1] (or None)
/// and a positive, finite eps (batch_norm2d requires it of every forward).
fn check_momentum_and_eps(momentum: Option<f64>, eps: f64) -> Result<()> {
    let momentum_ok = momentum.is_none_or(|m| (0.0..=1.0).contains(&m));
    if !momentum_ok || !eps.is_finite() || eps <= 0.0 {
        return Err(Error::invalid(
            "BatchNorm2d",
            format!(
                "momentum must lie in [0, 1] (or be None for a cumulative average) and eps be \
                 positive and finite, got {momentum:?} and {eps}"
            ),
        ));
    }
    Ok(())
}

impl Module for BatchNorm2d {
    // As PyTorch's `_BatchNorm.forward`: batch statistics in training, and
    // in eval too when no running statistics are kept; the running ones
    // (when kept) are updated only in training.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let training = self.is_training();
        // Only a training step counts, and only it blends (so needs the count).
        let tracked = match &self.num_batches_tracked {
            Some(count) if training => count.item()? as u32,
            _ => 0,
        };
        let use_batch_stats = training || self.running_mean.is_none();
        let y = x.batch_norm2d(
            self.running_mean.as_ref(),
            self.running_var.as_ref(),
            self.weight.as_ref(),
            self.bias.as_ref(),
            use_batch_stats,
            self.blend_factor(tracked),
            self.eps,
        )?;
        if training && let Some(count) = &self.num_batches_tracked {
            let next = Tensor::from_indices(vec![tracked.saturating_add(1)], ())?;
            count.assign(&next)?;
        }
        Ok(y)
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        let tensors = [
            ("weight", &self.weight, TensorRole::Parameter),
            ("bias", &self.bias, TensorRole::Parameter),
            ("running_mean", &self.running_mean, TensorRole::Buffer),
            ("running_var", &self.running_var, TensorRole::Buffer),
            (
                "num_batches_tracked",
                &self.num_batches_tracked,
                TensorRole::Buffer,
            ),
        ];
        for (name, tensor, role) in tensors {
            if let Some(tensor) = tensor {
                visit_tensor(prefix, name, tensor, role, visitor);
            }
        }
    }

    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }
}

/// Layer normalisation over the trailing dims with a learned elementwise
/// scale and shift, as `nn.LayerNorm(normalized_shape)`.
pub struct LayerNorm {
    /// Shape `normalized_shape`, as PyTorch's state dicts hold it.
    pub weight: Tensor,
    pub bias: Tensor,
    normalized_shape: Vec<usize>,
    eps: f64,
}

impl LayerNorm {
    /// Normalises a last dim of size `dim`; eps 1e-5, weight 1, bias 0.
    pub fn new(dim: usize, init: &mut Init) -> Result<Self> {
        if dim == 0 {
            return Err(Error::invalid("LayerNorm", "needs a dim of at least 1"));
        }
        Self::with_normalized_shape(&[dim], init)
    }

    /// `nn.LayerNorm(normalized_shape)`: normalises over the trailing dims
    /// of x, which must equal `normalized_shape`, with weight (1) and bias
    /// (0) of that shape; eps 1e-5.
    pub fn with_normalized_shape(normalized_shape: &[usize], init: &mut Init) -> Result<Self> {
        if normalized_shape.is_empty() || normalized_shape.contains(&0) {
            return Err(Error::invalid(
                "LayerNorm",
                format!(
                    "normalized_shape must have at least one dim and no zero-sized dim, \
                     got {normalized_shape:?}"
                ),
            ));
        }
        Ok(LayerNorm {
            weight: constant(init, normalized_shape, 1.0)?,
            bias: constant(init, normalized_shape, 0.0)?,
            normalized_shape: normalized_shape.to_vec(),
            eps: 1e-5,
        })
    }

    /// Replaces the default eps.
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// The trailing dims this layer normalises over.
    pub fn normalized_shape(&self) -> &[usize] {
        &self.normalized_shape
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm_over(
            &self.normalized_shape,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
        )
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
