//! Layer normalisation over the last dim (PyTorch's `F.layer_norm` with
//! `normalized_shape = [last dim]`) as one fused op: one forward kernel and
//! one backward kernel producing dx, dweight and dbias together. On CUDA
//! (kernels/layernorm.cu) each row is one thread block, and dweight/dbias are
//! summed over rows in a fixed order, so results do not vary between runs.

pub mod cpu;
pub(crate) mod cuda;

use crate::autocast::{self, AutocastOp};
use crate::autograd::Backward;
use crate::error::{Error, Result};
use crate::ops::normalization_grads;
use crate::profile;
use crate::storage::{CpuStorage, Storage};
use crate::tensor::{Shape, Tensor, check_operands};
use crate::{float_slice, float_slice2};

const OP: &str = "layer_norm";

impl Tensor {
    /// Normalises each row of the last dim to zero mean and unit (biased)
    /// variance, y = (x − mean)/√(var + eps) · weight + bias, with optional
    /// `weight` and `bias` of shape [last dim].
    pub fn layer_norm(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        if autocast::any_half(&[Some(self), weight, bias]) {
            let out = autocast::widened(self)?.layer_norm(
                autocast::widened_optional(weight)?.as_ref(),
                autocast::widened_optional(bias)?.as_ref(),
                eps,
            )?;
            return autocast::finish_output(AutocastOp::LayerNorm, out, self.dtype());
        }
        let _profile = profile::op(OP, self.device());
        let mut operands = vec![self];
        operands.extend([weight, bias].into_iter().flatten());
        check_operands(OP, &operands)?;
        let width = match self.dims().last() {
            Some(&width) if width > 0 => width,
            _ => {
                return Err(Error::shape(
                    OP,
                    format!(
                        "needs rank >= 1 and a non-empty last dim to normalise over, got shape {}",
                        self.shape()
                    ),
                ));
            }
        };
        for (name, param) in [("weight", weight), ("bias", bias)] {
            if let Some(param) = param
                && param.dims() != [width]
            {
                return Err(Error::shape(
                    OP,
                    format!(
                        "{name} has shape {}, expected [{width}] (the last dim of x {})",
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
        let (out, mean, invstd) = match &*self.storage() {
            Storage::Cpu(s) => float_slice!(OP, s, |x| {
                let weight = weight.map(Tensor::to_vec).transpose()?;
                let bias = bias.map(Tensor::to_vec).transpose()?;
                let f = cpu::layer_norm(x, width, weight.as_deref(), bias.as_deref(), eps);
                (
                    Storage::Cpu(CpuStorage::from(f.out)),
                    Storage::Cpu(CpuStorage::from(f.mean)),
                    Storage::Cpu(CpuStorage::from(f.invstd)),
                )
            }),
            Storage::Cuda(s) => {
                let weight = weight.map(Tensor::storage);
                let bias = bias.map(Tensor::storage);
                let f = cuda::layer_norm_forward(
                    s,
                    width,
                    weight.as_deref().map(cuda::expect_cuda),
                    bias.as_deref().map(cuda::expect_cuda),
                    eps,
                )?;
                (
                    Storage::Cuda(f.out),
                    Storage::Cuda(f.mean),
                    Storage::Cuda(f.invstd),
                )
            }
        };
        let row_shape = Shape::new(&self.dims()[..self.rank() - 1]);
        let mut inputs = vec![self];
        inputs.extend(weight);
        inputs.extend(bias);
        Ok(Tensor::from_op(out, self.shape().clone(), &inputs, |_| {
            LayerNormBackward {
                width,
                mean: Tensor::from_result(mean, row_shape.clone()),
                invstd: Tensor::from_result(invstd, row_shape),
                has_weight: weight.is_some(),
                has_bias: bias.is_some(),
            }
        }))
    }
}

struct LayerNormBackward {
    width: usize,
    /// Per-row mean and 1/√(var + eps) from the forward (detached, x's leading dims).
    mean: Tensor,
    invstd: Tensor,
    /// Which optional inputs follow x in the recorded inputs (weight, then bias).
    has_weight: bool,
    has_bias: bool,
}

impl Backward for LayerNormBackward {
    fn name(&self) -> &'static str {
        OP
    }

    // x̂ = (x − μ)·invstd, dx̂ = dy·γ, D = last dim:
    // dx = invstd/D · (D·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂)) per row;  dγ = Σ_rows dy·x̂;  dβ = Σ_rows dy
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = &inputs[0];
        let weight = self.has_weight.then(|| &inputs[1]);
        check_operands(OP, &[x, grad])?;
        let (dx, dweight, dbias) = match (&*x.storage(), &*grad.storage()) {
            (Storage::Cpu(xs), Storage::Cpu(gs)) => float_slice2!(OP, xs, gs, |x, dy| {
                let weight = weight.map(Tensor::to_vec).transpose()?;
                let grads = cpu::layer_norm_backward(
                    x,
                    dy,
                    self.width,
                    &self.mean.to_vec()?,
                    &self.invstd.to_vec()?,
                    weight.as_deref(),
                );
                (
                    Storage::Cpu(CpuStorage::from(grads.dx)),
                    Storage::Cpu(CpuStorage::from(grads.dweight)),
                    Storage::Cpu(CpuStorage::from(grads.dbias)),
                )
            }),
            (Storage::Cuda(xs), Storage::Cuda(gs)) => {
                let weight = weight.map(Tensor::storage);
                let (mean, invstd) = (self.mean.storage(), self.invstd.storage());
                let grads = cuda::layer_norm_backward(
                    xs,
                    gs,
                    self.width,
                    cuda::expect_cuda(&mean),
                    cuda::expect_cuda(&invstd),
                    weight.as_deref().map(cuda::expect_cuda),
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
            Shape::new([self.width]),
            self.has_weight,
            self.has_bias,
        ))
    }
}
