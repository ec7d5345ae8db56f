//! Layer normalisation over the trailing dims (PyTorch's `F.layer_norm`) as
//! one fused op. x is viewed as rows, each row one normalised slice (the
//! trailing dims flattened); one forward kernel and one backward kernel
//! producing dx, dweight and dbias together. On CUDA
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
    /// `weight` and `bias` of shape [last dim]: `layer_norm_over` with
    /// `normalized_shape = [last dim]`.
    pub fn layer_norm(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        match self.dims().last() {
            Some(&width) if width > 0 => self.layer_norm_over(&[width], weight, bias, eps),
            _ => Err(Error::shape(
                OP,
                format!(
                    "needs rank >= 1 and a non-empty last dim to normalise over, got shape {}",
                    self.shape()
                ),
            )),
        }
    }

    /// PyTorch's `F.layer_norm(x, normalized_shape, weight, bias, eps)`: the
    /// trailing dims of x must equal `normalized_shape`, and each slice over
    /// those dims is normalised with the mean and biased variance of all its
    /// values together. `weight` and `bias`, when given, have shape
    /// `normalized_shape` and apply elementwise.
    pub fn layer_norm_over(
        &self,
        normalized_shape: &[usize],
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        if autocast::any_half(&[Some(self), weight, bias]) {
            let out = autocast::widened(self)?.layer_norm_over(
                normalized_shape,
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
        let width = check_normalized_shape(self.shape(), normalized_shape)?;
        for (name, param) in [("weight", weight), ("bias", bias)] {
            if let Some(param) = param
                && param.dims() != normalized_shape
            {
                return Err(Error::shape(
                    OP,
                    format!(
                        "expected {name} to be of same shape as normalized_shape, but got {name} \
                         of shape {} and normalized_shape = {:?} (the trailing dims of x {})",
                        param.shape(),
                        normalized_shape,
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
        // The fused kernels see x as rows of `width` values: the normalised
        // dims are the trailing, contiguous ones, so they flatten into one.
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
        let row_shape = Shape::new(&self.dims()[..self.rank() - normalized_shape.len()]);
        let mut inputs = vec![self];
        inputs.extend(weight);
        inputs.extend(bias);
        Ok(Tensor::from_op(out, self.shape().clone(), &inputs, |_| {
            LayerNormBackward {
                normalized_shape: Shape::new(normalized_shape),
                mean: Tensor::from_result(mean, row_shape.clone()),
                invstd: Tensor::from_result(invstd, row_shape),
                has_weight: weight.is_some(),
                has_bias: bias.is_some(),
            }
        }))
    }
}

/// The number of values each normalised slice holds, after checking (with
/// PyTorch's wording) that `normalized_shape` is non-empty and equals the
/// trailing dims of x.
fn check_normalized_shape(x: &Shape, normalized_shape: &[usize]) -> Result<usize> {
    if normalized_shape.is_empty() {
        return Err(Error::shape(
            OP,
            "expected normalized_shape to be at least 1-dimensional, i.e., containing at least \
             one element, but got normalized_shape = []; pass the trailing dims of x to \
             normalise over",
        ));
    }
    let dims = x.dims();
    if !dims.ends_with(normalized_shape) {
        return Err(Error::shape(
            OP,
            format!(
                "given normalized_shape={normalized_shape:?}, expected input with shape \
                 [*, {}], but got input of size {x}",
                normalized_shape
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let width: usize = normalized_shape.iter().product();
    if width == 0 {
        return Err(Error::shape(
            OP,
            format!(
                "normalized_shape {normalized_shape:?} holds no values, so x {x} has nothing \
                 to normalise over (unsupported; PyTorch returns the empty x unchanged in shape); \
                 skip the call for empty slices"
            ),
        ));
    }
    Ok(width)
}

struct LayerNormBackward {
    /// The normalised trailing dims, the shape of weight, bias and their gradients.
    normalized_shape: Shape,
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

    // x̂ = (x − μ)·invstd, dx̂ = dy·γ, D = values per normalised slice
    // (the product of normalized_shape), each slice one row:
    // dx = invstd/D · (D·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂)) per row;  dγ = Σ_rows dy·x̂;  dβ = Σ_rows dy
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = &inputs[0];
        let weight = self.has_weight.then(|| &inputs[1]);
        check_operands(OP, &[x, grad])?;
        let width = self.normalized_shape.numel();
        let (dx, dweight, dbias) = match (&*x.storage(), &*grad.storage()) {
            (Storage::Cpu(xs), Storage::Cpu(gs)) => float_slice2!(OP, xs, gs, |x, dy| {
                let weight = weight.map(Tensor::to_vec).transpose()?;
                let grads = cpu::layer_norm_backward(
                    x,
                    dy,
                    width,
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
                    width,
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
            self.normalized_shape.clone(),
            self.has_weight,
            self.has_bias,
        ))
    }
}
