//! 2-D batch normalisation (PyTorch's `F.batch_norm` on [N, C, H, W]) as one
//! fused op: the forward kernel normalises each channel and applies the affine
//! map, and one backward kernel produces dx, dweight and dbias together.
//!
//! Training normalises with the batch's own mean and biased variance over
//! (N, H, W) and, when running statistics are given, blends the batch mean and
//! the *unbiased* variance into them in place. Eval normalises with the
//! running statistics, which are then constants of the computation.
//!
//! On CUDA (kernels/batchnorm.cu) the statistics never leave the device: one
//! block per channel reduces them and the running statistics are blended in
//! place in their own device buffers.

pub mod cpu;
pub(crate) mod cuda;

use crate::autocast;
use crate::autograd::Backward;
use crate::error::{Error, Result};
use crate::ops::layernorm::cuda::expect_cuda;
use crate::ops::normalization_grads;
use crate::profile;
use crate::storage::{CpuStorage, Storage};
use crate::tensor::{DType, Device, Shape, Tensor, check_operands, same_device};
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
        // A 16-bit x is normalised in its own dtype (as PyTorch's autocast
        // leaves batch norm): statistics, running statistics and the affine
        // parameters stay f32, every value is computed in f32, and only x
        // and y are 16-bit, so the activations the graph keeps are too.
        if autocast::any_half(&[running_mean, running_var]) {
            return Err(Error::DType {
                op: OP,
                msg: "running_mean and running_var are updated in place and must be f32 \
                      buffers; keep them in f32 (autocast does)"
                    .into(),
            });
        }
        let (weight, bias) = (
            autocast::widened_optional(weight)?,
            autocast::widened_optional(bias)?,
        );
        let (weight, bias) = (weight.as_ref(), bias.as_ref());
        let _profile = profile::op(OP, self.device());
        let params: Vec<&Tensor> = [running_mean, running_var, weight, bias]
            .into_iter()
            .flatten()
            .collect();
        let mut operands = vec![self];
        operands.extend(&params);
        if self.dtype().is_half() {
            same_device(OP, &operands)?;
            check_operands(OP, &[self])?;
            // The kernels read a 16-bit x's statistics and parameters as f32.
            if let Some(param) = params.iter().find(|p| p.dtype() != DType::F32) {
                return Err(Error::DType {
                    op: OP,
                    msg: format!(
                        "a {} x takes f32 running statistics, weight and bias, got {}",
                        self.dtype(),
                        param.dtype()
                    ),
                });
            }
        } else {
            check_operands(OP, &operands)?;
        }
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

        if training && dims.per_channel() <= 1 {
            return Err(Error::invalid(
                OP,
                format!(
                    "Expected more than 1 value per channel when training, got input of shape {}",
                    self.shape()
                ),
            ));
        }
        if !training && running.is_none() {
            return Err(Error::invalid(
                OP,
                format!(
                    "eval mode (training = false) normalises with the running statistics, \
                     but running_mean and running_var were not given (x {})",
                    self.shape()
                ),
            ));
        }
        let (mean, invstd) = match self.device() {
            Device::Cpu => cpu_statistics(self, dims, running, training, momentum, eps)?,
            Device::Cuda(_) => cuda_statistics(self, dims, running, training, momentum, eps)?,
        };
        let out = match &*self.storage() {
            Storage::Cpu(s) => Storage::Cpu(
                float_slice!(OP, &*s.widened(), |x| {
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
                })
                .into_dtype(self.dtype()),
            ),
            Storage::Cuda(s) => {
                let weight = weight.map(Tensor::storage);
                let bias = bias.map(Tensor::storage);
                Storage::Cuda(cuda::normalize(
                    s,
                    dims,
                    expect_cuda(&mean.storage()),
                    expect_cuda(&invstd.storage()),
                    weight.as_deref().map(expect_cuda),
                    bias.as_deref().map(expect_cuda),
                )?)
            }
        };
        let mut inputs = vec![self];
        inputs.extend(weight);
        inputs.extend(bias);
        Ok(Tensor::from_op(out, self.shape().clone(), &inputs, |_| {
            BatchNorm2dBackward {
                dims,
                mean,
                invstd,
                training,
                has_weight: weight.is_some(),
                has_bias: bias.is_some(),
            }
        }))
    }
}

/// The running statistics, when given, as (mean, var).
type RunningStats<'a> = Option<(&'a Tensor, &'a Tensor)>;

/// Per-channel (mean, invstd) on the CPU, in x's dtype (f32 for a 16-bit
/// x); updates the running statistics when training. The statistics are
/// computed in f64 and stored in that dtype: the forward kernel and the
/// backward's recomputation of x̂ then see exactly the same values.
fn cpu_statistics(
    x: &Tensor,
    dims: BatchNormDims,
    running: RunningStats<'_>,
    training: bool,
    momentum: f64,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let (mean, invstd) = if training {
        let count = dims.per_channel();
        let stats = x.with_cpu(|s| -> Result<_> {
            Ok(float_slice!(OP, &*s.widened(), |x| cpu::channel_stats(
                x, dims
            )))
        })?;
        if let Some((running_mean, running_var)) = running {
            let bessel = count as f64 / (count - 1) as f64;
            let unbiased_var: Vec<f64> = stats.var.iter().map(|v| v * bessel).collect();
            update_running_stat(running_mean, &stats.mean, momentum)?;
            update_running_stat(running_var, &unbiased_var, momentum)?;
        }
        (stats.mean, inverse_std(&stats.var, eps))
    } else {
        let (running_mean, running_var) =
            running.expect("batch_norm2d checked that eval mode has running statistics");
        (
            running_mean.to_f64_vec(),
            inverse_std(&running_var.to_f64_vec(), eps),
        )
    };
    let dtype = if x.dtype().is_half() {
        DType::F32
    } else {
        x.dtype()
    };
    let per_channel = |values: Vec<f64>| -> Result<Tensor> {
        let storage = CpuStorage::from_f64_vec(values, dtype);
        Ok(Tensor::from_cpu(storage, Shape::new([dims.channels])))
    };
    Ok((per_channel(mean)?, per_channel(invstd)?))
}

/// Per-channel (mean, invstd) on the device, never leaving it; when training
/// with running statistics, blends them in place on their device buffers.
fn cuda_statistics(
    x: &Tensor,
    dims: BatchNormDims,
    running: RunningStats<'_>,
    training: bool,
    momentum: f64,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let per_channel =
        |storage| Tensor::from_result(Storage::Cuda(storage), Shape::new([dims.channels]));
    if training {
        // x's read lock is released before any running statistic is locked
        // for writing (they could share storage through a reshape).
        let stats = cuda::channel_stats(expect_cuda(&x.storage()), dims, eps)?;
        if let Some((running_mean, running_var)) = running {
            for (running, batch_stat) in [
                (running_mean, &stats.mean),
                (running_var, &stats.unbiased_var),
            ] {
                match &mut *running.storage_mut() {
                    Storage::Cuda(s) => cuda::update_running_stat(s, batch_stat, momentum)?,
                    Storage::Cpu(_) => {
                        unreachable!("check_operands put every operand on one device")
                    }
                }
            }
        }
        Ok((per_channel(stats.mean), per_channel(stats.invstd)))
    } else {
        let (running_mean, running_var) =
            running.expect("batch_norm2d checked that eval mode has running statistics");
        let (mean, invstd) = cuda::eval_stats(
            expect_cuda(&running_mean.storage()),
            expect_cuda(&running_var.storage()),
            eps,
        )?;
        Ok((per_channel(mean), per_channel(invstd)))
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
        check_operands(OP, &[x, grad])?;
        let x_dtype = x.dtype();
        let (dx, dweight, dbias) = match (&*x.storage(), &*grad.storage()) {
            (Storage::Cpu(xs), Storage::Cpu(gs)) => {
                float_slice2!(OP, &*xs.widened(), &*gs.widened(), |x, dy| {
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
                        // dx in x's dtype; the parameters' gradients in f32, theirs.
                        Storage::Cpu(CpuStorage::from(grads.dx).into_dtype(x_dtype)),
                        Storage::Cpu(CpuStorage::from(grads.dweight)),
                        Storage::Cpu(CpuStorage::from(grads.dbias)),
                    )
                })
            }
            (Storage::Cuda(xs), Storage::Cuda(gs)) => {
                let weight = weight.map(Tensor::storage);
                let grads = cuda::backward(
                    xs,
                    gs,
                    self.dims,
                    expect_cuda(&self.mean.storage()),
                    expect_cuda(&self.invstd.storage()),
                    weight.as_deref().map(expect_cuda),
                    self.training,
                )?;
                (
                    Storage::Cuda(grads.dx),
                    Storage::Cuda(grads.dweight),
                    Storage::Cuda(grads.dbias),
                )
            }
            _ => unreachable!("check_operands put both operands on one device"),
        };
        Ok(normalization_grads(
            (dx, dweight, dbias),
            x.shape(),
            Shape::new([self.dims.channels]),
            self.has_weight,
            self.has_bias,
        ))
    }
}
