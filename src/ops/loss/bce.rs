//! Binary cross entropy on logits, as PyTorch's
//! `F.binary_cross_entropy_with_logits`: any real target, an element weight
//! and a positive-class weight. Without weights a Mean or Sum is one fused
//! reduction; otherwise the unreduced terms (one fused op with its own
//! backward) are weighted and reduced by ordinary differentiable ops.

use super::{
    BceWithLogitsBackward, Reduction, check_same_shape, cpu, cuda, elementwise_loss_value,
    reduce_terms, scalar_shape, upstream_on_device,
};
use crate::autocast::{self, AutocastOp};
use crate::autograd::{Backward, is_grad_enabled};
use crate::error::{Error, Result};
use crate::float_slice2;
use crate::ops::broadcast_shape;
use crate::profile;
use crate::storage::{CpuStorage, Float, Storage};
use crate::tensor::{Tensor, check_operands};
use cuda::ElementwiseLoss;

const OP: &str = "bce_with_logits";

/// The keywords of PyTorch's `F.binary_cross_entropy_with_logits`.
///
/// `Default` is PyTorch's default: Mean, no weight, no pos_weight. Neither
/// weight takes a gradient (PyTorch refuses one too).
#[derive(Clone, Debug, Default)]
pub struct BceWithLogitsOptions {
    /// Mean divides by the number of elements; None keeps one loss per
    /// element (the input's shape).
    pub reduction: Reduction,
    /// Rescales each element's loss; broadcasts to the input's shape.
    pub weight: Option<Tensor>,
    /// Weight of the positive (y·log σ(x)) part, broadcast against the
    /// input from its last dim (typically [C], one per class).
    pub pos_weight: Option<Tensor>,
}

impl Tensor {
    /// Binary cross entropy on logits, max(x, 0) − x·y + ln(1 + e^(−|x|)) per
    /// element (stable for any x), averaged over elements (Mean), summed, or
    /// kept per element (None). `target` has the input's shape and may hold
    /// any real value, as in PyTorch. The same as
    /// [`Tensor::bce_with_logits_with`] with only `reduction` set.
    pub fn bce_with_logits(&self, target: &Tensor, reduction: Reduction) -> Result<Tensor> {
        let options = BceWithLogitsOptions {
            reduction,
            ..BceWithLogitsOptions::default()
        };
        self.bce_with_logits_with(target, &options)
    }

    /// PyTorch's `F.binary_cross_entropy_with_logits(self, target, weight,
    /// reduction=…, pos_weight=…)`. Per element, with pw = pos_weight (1
    /// without one) and w = weight (1 without one):
    ///   ℓ = w·[(1 − y)·x + (1 + (pw − 1)·y)·softplus(−x)]
    ///     = −w·[pw·y·ln σ(x) + (1 − y)·ln(1 − σ(x))],
    /// computed so that no exponential overflows. The input and the target
    /// take gradients; weight and pos_weight must not require one.
    pub fn bce_with_logits_with(
        &self,
        target: &Tensor,
        options: &BceWithLogitsOptions,
    ) -> Result<Tensor> {
        let (weight, pos_weight) = (options.weight.as_ref(), options.pos_weight.as_ref());
        if autocast::any_half(&[Some(self), Some(target), weight, pos_weight]) {
            let widened = BceWithLogitsOptions {
                reduction: options.reduction,
                weight: autocast::widened_optional(weight)?,
                pos_weight: autocast::widened_optional(pos_weight)?,
            };
            let out = autocast::widened(self)?
                .bce_with_logits_with(&autocast::widened(target)?, &widened)?;
            return autocast::finish_output(AutocastOp::Loss, out, self.dtype());
        }
        let _profile = profile::op(OP, self.device());
        check_operands(OP, &[self, target])?;
        check_same_shape(OP, self, target, "target")?;
        check_constant_weight(self, "weight", weight)?;
        check_constant_weight(self, "pos_weight", pos_weight)?;
        if weight.is_none() && pos_weight.is_none() && options.reduction != Reduction::None {
            return fused_bce(self, target, options.reduction);
        }
        let pos_weight = pos_weight
            .map(|p| p.detach().broadcast_to(self.shape().clone()))
            .transpose()?;
        let mut terms = bce_terms(self, target, pos_weight)?;
        if let Some(weight) = weight {
            terms = terms.mul(&weight.detach())?;
        }
        reduce_terms(OP, terms, options.reduction)
    }
}

/// A weight of the input's dtype and device, broadcasting to the input's
/// shape (a larger result would not match the input, as PyTorch refuses
/// too), with no gradient.
fn check_constant_weight(input: &Tensor, role: &str, weight: Option<&Tensor>) -> Result<()> {
    let Some(weight) = weight else {
        return Ok(());
    };
    check_operands(OP, &[input, weight])?;
    let fits = broadcast_shape(OP, input.shape(), weight.shape())
        .is_ok_and(|joint| &joint == input.shape());
    if !fits {
        return Err(Error::shape(
            OP,
            format!(
                "{role} of shape {} does not broadcast to the input's shape {}",
                weight.shape(),
                input.shape()
            ),
        ));
    }
    if weight.requires_grad() && is_grad_enabled() {
        return Err(Error::invalid(
            OP,
            format!(
                "{role} takes no gradient (PyTorch does not differentiate it either): pass \
                 {role}.detach()"
            ),
        ));
    }
    Ok(())
}

/// No weights, reduced: one fused reduction, one fused backward.
fn fused_bce(x: &Tensor, target: &Tensor, reduction: Reduction) -> Result<Tensor> {
    let scale = reduction.scale(OP, x.numel(), "elements", x.shape())?;
    let kind = ElementwiseLoss::BceWithLogits;
    let value = elementwise_loss_value(x, target, kind, scale, |xs, ys| {
        Ok(float_slice2!(OP, xs, ys, |xv, yv| CpuStorage::from(vec![
            cpu::bce_with_logits(xv, yv, scale)
        ])))
    })?;
    Ok(Tensor::from_op(value, scalar_shape(), &[x, target], |_| {
        BceWithLogitsBackward { scale }
    }))
}

/// The unreduced terms (1 − y)·x + (1 + (pw − 1)·y)·softplus(−x) of `x` and
/// `y`, with `pos_weight` (detached, already of their shape) or 1.
fn bce_terms(x: &Tensor, y: &Tensor, pos_weight: Option<Tensor>) -> Result<Tensor> {
    let pw_guard = pos_weight.as_ref().map(|p| p.storage());
    let storage = match (&*x.storage(), &*y.storage(), pw_guard.as_deref()) {
        (Storage::Cpu(xs), Storage::Cpu(ys), pw) => {
            let pw = pw.map(cpu_storage);
            Storage::Cpu(float_slice2!(OP, xs, ys, |xv, yv| CpuStorage::from(
                cpu::bce_with_logits_terms(xv, yv, typed_like(xv, pw))
            )))
        }
        (Storage::Cuda(xs), Storage::Cuda(ys), pw) => {
            let pw = pw.map(cuda_storage);
            Storage::Cuda(cuda::bce_with_logits_terms(xs, ys, pw)?)
        }
        _ => unreachable!("check_operands put every operand on one device"),
    };
    drop(pw_guard);
    Ok(Tensor::from_op(storage, x.shape().clone(), &[x, y], |_| {
        BceTermsBackward { pos_weight }
    }))
}

/// The host storage of an operand that check_operands put on the CPU.
fn cpu_storage(s: &Storage) -> &CpuStorage {
    match s {
        Storage::Cpu(s) => s,
        Storage::Cuda(_) => unreachable!("check_operands put every operand on one device"),
    }
}

/// The device storage of an operand that check_operands put on CUDA.
fn cuda_storage(s: &Storage) -> &crate::cuda::CudaStorage {
    match s {
        Storage::Cuda(s) => s,
        Storage::Cpu(_) => unreachable!("check_operands put every operand on one device"),
    }
}

/// `storage` as a slice of the element type of `_like` (check_operands gave
/// every operand one float dtype).
fn typed_like<'a, T: Float>(_like: &[T], storage: Option<&'a CpuStorage>) -> Option<&'a [T]> {
    storage.map(|s| T::slice(s).expect("check_operands gave every operand one dtype"))
}

struct BceTermsBackward {
    /// pos_weight broadcast to the input's shape (no gradient), or None for 1.
    pos_weight: Option<Tensor>,
}

impl Backward for BceTermsBackward {
    fn name(&self) -> &'static str {
        OP
    }
    // ℓ = (1 − y)·x + (1 + (pw − 1)·y)·softplus(−x), softplus′(−x) = −σ(−x) = σ(x) − 1:
    // dL/dx = g·((1 + (pw − 1)·y)·σ(x) − pw·y),  dL/dy = g·((pw − 1)·softplus(−x) − x)
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, y) = (&inputs[0], &inputs[1]);
        let target_grad = y.requires_grad();
        let pw_guard = self.pos_weight.as_ref().map(|p| p.storage());
        let grad_guard = grad.storage();
        let (dx, dy) = match (&*x.storage(), &*y.storage(), pw_guard.as_deref()) {
            (Storage::Cpu(xs), Storage::Cpu(ys), pw) => {
                let (pw, gs) = (pw.map(cpu_storage), cpu_storage(&grad_guard));
                let (dx, dy) = float_slice2!(OP, xs, ys, |xv, yv| {
                    let (pw, g) = (typed_like(xv, pw), typed_like(xv, Some(gs)).unwrap());
                    let dx = cpu::bce_with_logits_terms_backward_input(xv, yv, pw, g);
                    let dy =
                        target_grad.then(|| cpu::bce_with_logits_terms_backward_target(xv, pw, g));
                    (CpuStorage::from(dx), dy.map(CpuStorage::from))
                });
                (Storage::Cpu(dx), dy.map(Storage::Cpu))
            }
            (Storage::Cuda(xs), Storage::Cuda(ys), pw) => {
                let pw = pw.map(cuda_storage);
                let g = upstream_on_device(OP, &grad_guard, x.device())?;
                let (dx, dy) = cuda::bce_with_logits_terms_backward(xs, ys, pw, g, target_grad)?;
                (Storage::Cuda(dx), dy.map(Storage::Cuda))
            }
            _ => unreachable!("the forward checked that every operand shares one device"),
        };
        let dy = dy.map(|d| Tensor::from_result(d, y.shape().clone()));
        Ok(vec![Some(Tensor::from_result(dx, x.shape().clone())), dy])
    }
}
