//! Softmax and log-softmax along any dim, each one fused op over the last
//! dim whose backward works from the saved output alone (no recomputation
//! of exp); another dim is transposed to the back and back again.
//! On CUDA (kernels/softmax.cu) each row is one thread block.

pub mod cpu;
pub(crate) mod cuda;

use crate::autocast::{self, AutocastOp};
use crate::autograd::Backward;
use crate::error::{Error, Result};
use crate::ops::{Dim, resolve_dim, resolve_dim_in};
use crate::profile;
use crate::storage::{CpuStorage, Storage};
use crate::tensor::{Tensor, check_operands};
use crate::{float_slice, float_slice2};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SoftmaxKind {
    Softmax,
    LogSoftmax,
}

impl SoftmaxKind {
    fn name(self) -> &'static str {
        match self {
            SoftmaxKind::Softmax => "softmax",
            SoftmaxKind::LogSoftmax => "log_softmax",
        }
    }

    fn is_log(self) -> bool {
        self == SoftmaxKind::LogSoftmax
    }
}

impl Tensor {
    /// softmax(x)ᵢ = exp(xᵢ) / Σⱼ exp(xⱼ) along `dim` (PyTorch's
    /// `softmax(dim)`; `-1` is the last dim), computed with the maximum
    /// subtracted so that large logits do not overflow.
    pub fn softmax<D: Dim>(&self, dim: D) -> Result<Tensor> {
        along_dim("softmax", self, dim, |x| {
            autocast::in_float32(AutocastOp::Softmax, x, |x| {
                softmax_op(x, SoftmaxKind::Softmax)
            })
        })
    }

    /// log(softmax(x)) along `dim`, as xᵢ − max − ln Σⱼ exp(xⱼ − max):
    /// accurate where taking the log of a tiny softmax would underflow.
    pub fn log_softmax<D: Dim>(&self, dim: D) -> Result<Tensor> {
        along_dim("log_softmax", self, dim, |x| {
            autocast::in_float32(AutocastOp::LogSoftmax, x, |x| {
                softmax_op(x, SoftmaxKind::LogSoftmax)
            })
        })
    }
}

/// Runs `last_dim_op` (which works along the last dim) along `dim`: the
/// fused kernels see rows, so another dim is swapped to the back and the
/// result swapped back (two copies, and their gradients, through transpose).
fn along_dim<D: Dim>(
    op: &'static str,
    x: &Tensor,
    dim: D,
    last_dim_op: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if x.rank() == 0 {
        // A 0-d tensor takes dim 0 or -1 as one of size 1, as PyTorch's
        // (softmax gives 1, log_softmax 0).
        let what = format!("shape {} (a 0-d tensor takes dim 0 or -1)", x.shape());
        resolve_dim_in(op, dim, 1, &what)?;
        return last_dim_op(&x.reshape([1])?)?.reshape(Vec::<usize>::new());
    }
    let dim = resolve_dim(op, dim, x.shape())?;
    let last = x.rank() - 1;
    if dim == last {
        return last_dim_op(x);
    }
    last_dim_op(&x.transpose(dim, last)?)?.transpose(dim, last)
}

fn softmax_op(x: &Tensor, kind: SoftmaxKind) -> Result<Tensor> {
    let op = kind.name();
    let _profile = profile::op(op, x.device());
    check_operands(op, &[x])?;
    let Some(&width) = x.dims().last() else {
        return Err(Error::shape(
            op,
            format!(
                "needs rank >= 1 (it works over the last dim), got shape {}",
                x.shape()
            ),
        ));
    };
    let out = match &*x.storage() {
        Storage::Cpu(s) => Storage::Cpu(float_slice!(op, s, |v| CpuStorage::from(match kind {
            SoftmaxKind::Softmax => cpu::softmax(v, width),
            SoftmaxKind::LogSoftmax => cpu::log_softmax(v, width),
        }))),
        Storage::Cuda(s) => Storage::Cuda(cuda::softmax_forward(s, width, kind.is_log())?),
    };
    Ok(Tensor::from_op(out, x.shape().clone(), &[x], |output| {
        SoftmaxBackward {
            kind,
            output: output.clone(),
        }
    }))
}

struct SoftmaxBackward {
    kind: SoftmaxKind,
    /// The op's own output y (detached).
    output: Tensor,
}

impl Backward for SoftmaxBackward {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    // softmax:     dL/dx = y ⊙ (dL/dy − Σ dL/dy ⊙ y)
    // log_softmax: dL/dx = dL/dy − exp(y) · Σ dL/dy       (exp(y) = softmax(x))
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let op = self.kind.name();
        let width = inputs[0].dims()[inputs[0].rank() - 1];
        check_operands(op, &[&self.output, grad])?;
        let dx = match (&*self.output.storage(), &*grad.storage()) {
            (Storage::Cpu(ys), Storage::Cpu(gs)) => {
                Storage::Cpu(float_slice2!(op, ys, gs, |y, dy| CpuStorage::from(
                    match self.kind {
                        SoftmaxKind::Softmax => cpu::softmax_backward(y, dy, width),
                        SoftmaxKind::LogSoftmax => cpu::log_softmax_backward(y, dy, width),
                    }
                )))
            }
            (Storage::Cuda(ys), Storage::Cuda(gs)) => {
                Storage::Cuda(cuda::softmax_backward(ys, gs, width, self.kind.is_log())?)
            }
            _ => unreachable!("check_operands put both operands on one device"),
        };
        Ok(vec![Some(Tensor::from_result(
            dx,
            inputs[0].shape().clone(),
        ))])
    }
}
