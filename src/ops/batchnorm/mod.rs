//! 2-D batch normalisation (PyTorch's `F.batch_norm` on [N, C, H, W]) as one
//! fused op: the forward kernel normalises each channel and applies the affine
//! map, and one backward kernel produces dx, dweight and dbias together.
//!
//! Training normalises with the batch's own mean and biased variance over
//! (N, H, W) and, when running statistics are given, blends the batch mean and
//! the *unbiased* variance into them in place. Eval normalises with the
//! running statistics, which are then constants of the computation.

pub mod cpu;

use crate::autograd::Backward;
use crate::error::{Error, Result};
use crate::storage::{CpuStorage, Storage};
use crate::tensor::{Shape, Tensor, check_operands};
use crate::{float_slice, float_slice2};

use cpu::BatchNormDims;

const OP: &str = "batch_norm2d";

impl Tensor {
    /// Batch normalisation of x [N, C, H, W] over (N, H, W), per channel.
    ///
    /// Training: normalises with the batch mean and biased variance; if
    /// running statistics are given, updates them in place (not recorded by
    /// autograd) as `running = (1 − momentum)·running + momentum·batch_stat`,
    /// with the unbiased variance (·m/(m−1), m = N·H·W) for `running_var`,
    /// exactly as PyTorch. Eval (`training = false`): normalises with the
    /// running statistics, which are then required. `weight` and `bias`, of
    /// shape `[C]`, are the optional affine parameters γ and β.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm2d(
        &self,
        running_mean: Option<&Tensor>,
        running_var: Option<&Tensor>,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        training: bool,
        momentum: f64,
        eps: f64,
    ) -> Result<Tensor> {
        let mut operands = vec![self];
        operands.extend(
            [running_mean, running_var, weight, bias]
                .into_iter()
                .flatten(),
        );
        check_operands(OP, &operands)?;
        let &[batch, channels, height, width] = self.dims() else {
            return Err(Error::shape(
                OP,
                format!("expected x of shape [N, C, H, W], got {}", self.shape()),
            ));
        };
        let dims = BatchNormDims {
            batch,
            channels,
            spatial: height * width,
        };
        for (name, param) in [
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("weight", weight),
            ("bias", bias),
        ] {
            if let Some(param) = param
                && param.dims() != [channels]
            {
                return Err(Error::shape(
                    OP,
                    format!(
                        "{name} has shape {}, expected [{channels}] (one value per channel of x {})",
                        param.shape(),
                        self.shape()
                    ),
                ));
            }
        }
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::invalid(
                OP,
                format!("eps must be finite and >= 0, got {eps}"),
            ));
        }
        if !momentum.is_finite() {
            return Err(Error::invalid(
                OP,
                format!("momentum must be finite, got {momentum}"),
            ));
        }
        let running = match (running_mean, running_var) {
            (Some(mean), Some(var)) => Some((mean, var)),
            (None, None) => None,
            _ => {
                return Err(Error::invalid(
                    OP,
                    "running_mean and running_var must be given together",
                ));
            }
        };

        let (mean, invstd) = if training {
            let count = dims.per_channel();
            if count <= 1 {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "Expected more than 1 value per channel when training, got input of shape {}",
                        self.shape()
                    ),
                ));
            }
            let stats = self.with_cpu(|s| -> Result<_> {
                Ok(float_slice!(OP, s, |x| cpu::channel_stats(x, dims)))
            })?;
            if let Some((running_mean, running_var)) = running {
                let bessel = count as f64 / (count - 1) as f64;
                let unbiased_var: Vec<f64> = stats.var.iter().map(|v| v * bessel).collect();
                update_running_stat(running_mean, &stats.mean, momentum)?;
                update_running_stat(running_var, &unbiased_var, momentum)?;
            }
            (stats.mean, inverse_std(&stats.var, eps))
        } else {
            let Some((running_mean, running_var)) = running else {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "eval mode (training = false) normalises with the running statistics, \
                         but running_mean and running_var were not given (x {})",
                        self.shape()
                    ),
                ));
            };
            (
                running_mean.to_f64_vec(),
                inverse_std(&running_var.to_f64_vec(), eps),
            )
        };
        // The statistics in x's dtype: the forward kernel and the backward's
        // recomputation of x̂ then see exactly the same values.
        let per_channel = |values: Vec<f64>| -> Result<Tensor> {
            let storage = CpuStorage::from_f64_vec(values, self.dtype())
                .ok_or_else(|| Error::unsupported_dtype(OP, self.dtype()))?;
            Ok(Tensor::from_cpu(storage, Shape::new([channels])))
        };
        let (mean, invstd) = (per_channel(mean)?, per_channel(invstd)?);

        let out = self.with_cpu(|s| -> Result<_> {
            Ok(float_slice!(OP, s, |x| {
                let weight = weight.map(Tensor::to_vec).transpose()?;
                let bias = bias.map(Tensor::to_vec).transpose()?;
                CpuStorage::from(cpu::normalize(
                    x,
                    dims,
                    &mean.to_vec()?,
                    &invstd.to_vec()?,
                    weight.as_deref(),
                    bias.as_deref(),
                ))
            }))
        })?;
        let mut inputs = vec![self];
        inputs.extend(weight);
        inputs.extend(bias);
        Ok(Tensor::from_op(
            Storage::Cpu(out),
            self.shape().clone(),
            &inputs,
            |_| BatchNorm2dBackward {
                dims,
                mean,
                invstd,
                training,
                has_weight: weight.is_some(),
                has_bias: bias.is_some(),
            },
        ))
    }
}

/// invstd = 1/√(var + eps).
fn inverse_std(var: &[f64], eps: f64) -> Vec<f64> {
    var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
}

/// Blends `batch_stat` into `running` in place; statistics are not
/// parameters, so no graph records this.
fn update_running_stat(running: &Tensor, batch_stat: &[f64], momentum: f64) -> Result<()> {
    let updated = running.with_cpu(|s| -> Result<_> {
        Ok(float_slice!(OP, s, |values| CpuStorage::from(
            cpu::update_running_stat(values, batch_stat, momentum)
        )))
    })?;
    running.assign(&Tensor::from_cpu(updated, running.shape().clone()))
}

struct BatchNorm2dBackward {
    dims: BatchNormDims,
    /// Per-channel mean and 1/√(var + eps) the forward normalised with (detached, [C]).
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    /// Which optional inputs follow x in the recorded inputs (weight, then bias).
    has_weight: bool,
    has_bias: bool,
}

impl Backward for BatchNorm2dBackward {
    fn name(&self) -> &'static str {
        OP
    }

    // x̂ = (x − μ)·invstd, m = N·H·W, dx̂ = dy·γ:
    // training: dx = invstd/m · (m·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂));  eval: dx = dy·γ·invstd;
    // dγ = Σ dy·x̂;  dβ = Σ dy  (sums over N, H, W)
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = &inputs[0];
        let weight = self.has_weight.then(|| &inputs[1]);
        let (dx, dweight, dbias) = x.with_cpu(|xs| {
            grad.with_cpu(|gs| -> Result<_> {
                Ok(float_slice2!(OP, xs, gs, |x, dy| {
                    let weight = weight.map(Tensor::to_vec).transpose()?;
                    let grads = cpu::batch_norm_backward(
                        x,
                        dy,
                        self.dims,
                        &self.mean.to_vec()?,
                        &self.invstd.to_vec()?,
                        weight.as_deref(),
                        self.training,
                    );
                    (
                        CpuStorage::from(grads.dx),
                        CpuStorage::from(grads.dweight),
                        CpuStorage::from(grads.dbias),
                    )
                }))
            })
        })?;
        let per_channel = Shape::new([self.dims.channels]);
        let mut grads = vec![Some(Tensor::from_cpu(dx, x.shape().clone()))];
        if self.has_weight {
            grads.push(Some(Tensor::from_cpu(dweight, per_channel.clone())));
        }
        if self.has_bias {
            grads.push(Some(Tensor::from_cpu(dbias, per_channel)));
        }
        Ok(grads)
    }
}
