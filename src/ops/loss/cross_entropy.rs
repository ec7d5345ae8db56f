//! Cross entropy on class-index targets, as PyTorch's `F.cross_entropy`:
//! logits [N, C] or [N, C, d1, …, dk] (classes along dim 1) or an unbatched
//! [C], per-class weights, ignore_index and label smoothing. The default
//! options on [N, C] with a Mean or Sum take one fused kernel; everything
//! else is composed of log_softmax, gather, mul and sums, so each device that
//! runs those ops runs it and the gradient follows from theirs.

use super::{Reduction, cpu, cuda, scalar_shape, u32_targets, upstream_on_device, upstream_scale};
use crate::autocast::{self, AutocastOp};
use crate::autograd::{Backward, is_grad_enabled};
use crate::error::{Error, Result};
use crate::ops::embedding::{check_index_range, check_index_range_skipping};
use crate::profile;
use crate::storage::{CpuStorage, Float, Storage};
use crate::tensor::{DType, Shape, Tensor, check_operands, same_device};
use crate::{float_slice, float_slice2};

const OP: &str = "cross_entropy";

/// The keywords of PyTorch's `F.cross_entropy` for class-index targets.
///
/// `Default` is PyTorch's default: Mean, no weight, nothing ignored, no
/// smoothing. PyTorch's default `ignore_index=-100` can never equal a u32
/// kiln target, so `None` here is the same thing.
#[derive(Clone, Debug, Default)]
pub struct CrossEntropyOptions {
    /// Mean divides by Σ weight[target] over the counted targets (their
    /// number when there is no weight); None keeps one loss per sample.
    pub reduction: Reduction,
    /// Per-class rescaling, shape [C], the logits' dtype and device. It takes
    /// no gradient (PyTorch refuses one too).
    pub weight: Option<Tensor>,
    /// Targets equal to this class count for nothing: zero loss, zero
    /// gradient, and left out of the mean's denominator. It may lie outside
    /// [0, C) (e.g. 255 for unlabelled pixels).
    pub ignore_index: Option<u32>,
    /// ε in [0, 1]: the target distribution is (1 − ε)·onehot + ε/C, with
    /// the class weights applied to the smoothing term as PyTorch does.
    pub label_smoothing: f64,
}

impl CrossEntropyOptions {
    /// No weight, nothing ignored, no smoothing: the fused kernel applies.
    fn are_plain(&self) -> bool {
        self.weight.is_none() && self.ignore_index.is_none() && self.label_smoothing == 0.0
    }
}

impl Tensor {
    /// Cross entropy of logits [N, C] against u32 class `targets` [N] in
    /// [0, C): −log softmax(x_n)[t_n] per row; Mean divides by N. The same as
    /// [`Tensor::cross_entropy_with`] with only `reduction` set, so the
    /// logits may also be [N, C, d1, …] or an unbatched [C].
    pub fn cross_entropy(&self, targets: &Tensor, reduction: Reduction) -> Result<Tensor> {
        let options = CrossEntropyOptions {
            reduction,
            ..CrossEntropyOptions::default()
        };
        self.cross_entropy_with(targets, &options)
    }

    /// PyTorch's `F.cross_entropy(self, targets, weight, ignore_index=…,
    /// reduction=…, label_smoothing=…)` with u32 class-index targets.
    ///
    /// Shapes: logits [N, C] with targets [N]; [N, C, d1, …, dk] with
    /// [N, d1, …, dk]; an unbatched [C] with a rank-0 target. Per sample,
    /// with w = weight (1 without one), logp = log_softmax over the classes,
    /// and kept = [t ≠ ignore_index]:
    ///   ℓ = kept · ((1 − ε)·w[t]·(−logp[t]) + (ε/C)·Σ_c w[c]·(−logp[c]))
    /// None returns ℓ (the targets' shape), Sum Σ ℓ, Mean Σ ℓ / Σ kept·w[t].
    /// A Mean with every target ignored (PyTorch's NaN, 0/0) is an error.
    /// Class-probability (float) targets are not supported.
    pub fn cross_entropy_with(
        &self,
        targets: &Tensor,
        options: &CrossEntropyOptions,
    ) -> Result<Tensor> {
        if autocast::any_half(&[Some(self), options.weight.as_ref()]) {
            let widened = CrossEntropyOptions {
                weight: autocast::widened_optional(options.weight.as_ref())?,
                ..options.clone()
            };
            return autocast::in_float32(AutocastOp::Loss, self, |x| {
                x.cross_entropy_with(targets, &widened)
            });
        }
        let _profile = profile::op(OP, self.device());
        check_operands(OP, &[self])?;
        same_device(OP, &[self, targets])?;
        require_class_targets(targets.dtype())?;
        check_target_shape(self, targets)?;
        let classes = self.dims()[if self.rank() == 1 { 0 } else { 1 }];
        check_options(self, classes, options)?;
        if self.rank() == 1 {
            // Unbatched: one sample [1, C] against targets [1], back to rank 0.
            let out = self
                .reshape([1, classes])?
                .cross_entropy_with(&targets.reshape([1])?, options)?;
            return out.reshape(Shape::new(Vec::new()));
        }
        if self.rank() == 2 && options.are_plain() && options.reduction != Reduction::None {
            return fused_cross_entropy(self, targets, options.reduction);
        }
        composed_cross_entropy(self, targets, classes, options)
    }
}

/// Whether the logits hold any sample (for a zero-size batch, zero classes
/// is harmless: there is no target).
fn targets_exist(logits: &Tensor) -> bool {
    logits.rank() == 1 || (logits.dims()[0] > 0 && logits.dims()[2..].iter().all(|&d| d > 0))
}

/// Class targets must be u32 indices: a float target would be PyTorch's
/// class probabilities, which kiln does not take.
fn require_class_targets(dtype: DType) -> Result<()> {
    if dtype == DType::U32 {
        return Ok(());
    }
    Err(Error::DType {
        op: OP,
        msg: format!(
            "targets must have dtype u32 (class indices), got {dtype}; class-probability \
             targets are not supported: pass class indices (Tensor::from_indices), or compute \
             −(p · x.log_softmax(1)).sum over the classes yourself"
        ),
    })
}

/// targets = logits' shape without the class dim (dim 1, or dim 0 unbatched).
fn check_target_shape(logits: &Tensor, targets: &Tensor) -> Result<()> {
    let dims = logits.dims();
    if dims.is_empty() {
        return Err(Error::shape(
            OP,
            "logits must have a class dim: [C], [N, C] or [N, C, d1, …], got rank 0",
        ));
    }
    let expected: Vec<usize> = match dims {
        [_] => Vec::new(),
        [n, _, rest @ ..] => std::iter::once(*n).chain(rest.iter().copied()).collect(),
        [] => unreachable!("rank 0 was refused above"),
    };
    if targets.dims() != expected.as_slice() {
        return Err(Error::shape(
            OP,
            format!(
                "targets must have shape {} for logits {} (the logits' shape without the class \
                 dim {}), got {}",
                Shape::new(expected),
                logits.shape(),
                if dims.len() == 1 { 0 } else { 1 },
                targets.shape()
            ),
        ));
    }
    Ok(())
}

/// weight [C] of the logits' dtype and device with no gradient; ε in [0, 1].
fn check_options(logits: &Tensor, classes: usize, options: &CrossEntropyOptions) -> Result<()> {
    // No class for a target to name: PyTorch then refuses every counted
    // target as out of bounds and returns 0 (or NaN with label smoothing)
    // when all are ignored; kiln refuses the degenerate logits outright.
    if classes == 0 && targets_exist(logits) {
        return Err(Error::shape(
            OP,
            format!(
                "logits {} have no classes (dim {} is 0): there is nothing to predict",
                logits.shape(),
                if logits.rank() == 1 { 0 } else { 1 }
            ),
        ));
    }
    let smoothing = options.label_smoothing;
    if !(0.0..=1.0).contains(&smoothing) {
        return Err(Error::invalid(
            OP,
            format!("label_smoothing must be in [0, 1], got {smoothing}"),
        ));
    }
    let Some(weight) = &options.weight else {
        return Ok(());
    };
    check_operands(OP, &[logits, weight])?;
    if weight.dims() != [classes] {
        return Err(Error::shape(
            OP,
            format!(
                "weight must have shape [{classes}] (one per class of logits {}), got {}",
                logits.shape(),
                weight.shape()
            ),
        ));
    }
    if weight.requires_grad() && is_grad_enabled() {
        return Err(Error::invalid(
            OP,
            "weight takes no gradient (PyTorch does not differentiate it either): pass \
             weight.detach()",
        ));
    }
    Ok(())
}

/// Default options on logits [N, C], reduced: one fused kernel each way.
fn fused_cross_entropy(logits: &Tensor, targets: &Tensor, reduction: Reduction) -> Result<Tensor> {
    let [rows, classes] = *logits.dims() else {
        unreachable!("the fused path takes 2-D logits");
    };
    let scale = reduction.scale(OP, rows, "rows", logits.shape())?;
    let classes_context = || format!("logits {} have {classes} classes", logits.shape());
    let (value, row_logsumexp) = match (&*logits.storage(), &*targets.storage()) {
        (Storage::Cpu(x), Storage::Cpu(t)) => {
            let t = u32_targets(OP, t)?;
            check_index_range(OP, "target", t, targets.dims(), classes, classes_context)?;
            float_slice!(OP, x, |xv| {
                let (loss, lse) = cpu::cross_entropy(xv, t, classes, scale);
                (
                    Storage::Cpu(CpuStorage::from(vec![loss])),
                    Storage::Cpu(CpuStorage::from(lse)),
                )
            })
        }
        // The kernel flags targets ≥ C; only then are they copied to the
        // host, to name the first one as the CPU path does.
        (Storage::Cuda(x), Storage::Cuda(t)) => {
            match cuda::cross_entropy(x, t, rows, classes, scale)? {
                Some((loss, lse)) => (Storage::Cuda(loss), Storage::Cuda(lse)),
                None => {
                    let host = t.to_cpu()?;
                    let t = u32_targets(OP, &host)?;
                    check_index_range(OP, "target", t, targets.dims(), classes, classes_context)?;
                    return Err(Error::invalid(
                        OP,
                        format!("a target is out of range: {}", classes_context()),
                    ));
                }
            }
        }
        _ => unreachable!("same_device put logits and targets on one device"),
    };
    Ok(Tensor::from_op(
        value,
        scalar_shape(),
        &[logits, targets],
        |_| CrossEntropyBackward {
            scale,
            row_logsumexp: Tensor::from_result(row_logsumexp, Shape::new(vec![rows])),
        },
    ))
}

/// The class targets ready for a gather: `safe` (u32, ignored ones replaced
/// by class 0) and `kept` (1 where a target counts, 0 where it is ignored,
/// in the logits' dtype), both of the targets' shape and with no gradient.
struct PreparedTargets {
    safe: Tensor,
    kept: Tensor,
}

/// Masks the ignored targets and checks the others against `classes`; the
/// error names the first bad value and its position.
fn prepare_targets(
    logits: &Tensor,
    targets: &Tensor,
    classes: usize,
    options: &CrossEntropyOptions,
) -> Result<PreparedTargets> {
    let ignore = options.ignore_index;
    let context = || format!("logits {} have {classes} classes", logits.shape());
    // Ignored targets are skipped by the range check, as PyTorch's nll_loss
    // skips them: they may name no class at all (even with C = 0).
    let check_on_host = |t: &[u32]| -> Result<()> {
        check_index_range_skipping(OP, "target", t, targets.dims(), classes, ignore, context)
    };
    let (safe, kept, any_kept) = match &*targets.storage() {
        Storage::Cpu(t) => {
            let t = u32_targets(OP, t)?;
            check_on_host(t)?;
            let counted = |v: u32| Some(v) != ignore;
            let safe: Vec<u32> = t.iter().map(|&v| if counted(v) { v } else { 0 }).collect();
            let kept = match logits.dtype() {
                DType::F64 => CpuStorage::from(kept_mask::<f64>(t, ignore)),
                _ => CpuStorage::from(kept_mask::<f32>(t, ignore)),
            };
            let any_kept = t.iter().any(|&v| counted(v));
            (
                Storage::Cpu(CpuStorage::from(safe)),
                Storage::Cpu(kept),
                any_kept,
            )
        }
        Storage::Cuda(t) => {
            let prepared = cuda::class_targets(t, classes, ignore)?;
            if prepared.out_of_range {
                check_on_host(u32_targets(OP, &t.to_cpu()?)?)?;
                return Err(Error::invalid(
                    OP,
                    format!("a target is out of range: {}", context()),
                ));
            }
            (
                Storage::Cuda(prepared.safe_targets),
                Storage::Cuda(prepared.kept),
                prepared.any_kept,
            )
        }
    };
    if options.reduction == Reduction::Mean && !any_kept {
        let why = if targets.numel() == 0 {
            format!("targets of shape {} hold none", targets.shape())
        } else {
            format!(
                "all {} targets equal ignore_index (PyTorch returns NaN, 0/0)",
                targets.numel()
            )
        };
        return Err(Error::invalid(
            OP,
            format!(
                "the mean over the counted targets is undefined: {why}; use Reduction::Sum or \
                 Reduction::None, or skip this batch"
            ),
        ));
    }
    Ok(PreparedTargets {
        safe: Tensor::from_result(safe, targets.shape().clone()),
        kept: Tensor::from_result(kept, targets.shape().clone()),
    })
}

/// 1 where a target counts, 0 where it equals `ignore`.
fn kept_mask<T: Float>(targets: &[u32], ignore: Option<u32>) -> Vec<T> {
    targets
        .iter()
        .map(|&v| if Some(v) == ignore { T::ZERO } else { T::ONE })
        .collect()
}

/// Any options on logits [N, C, d1, …] (rank ≥ 2), composed of
/// differentiable ops; the gradient with respect to the logits follows
/// from theirs (targets, weight and the mask take none).
fn composed_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    classes: usize,
    options: &CrossEntropyOptions,
) -> Result<Tensor> {
    let prepared = prepare_targets(logits, targets, classes, options)?;
    let log_probs = logits.log_softmax(1)?;
    // The targets as [N, 1, d1, …] pick one log-probability per sample.
    let mut index_dims = targets.dims().to_vec();
    index_dims.insert(1, 1);
    let picked = log_probs
        .gather(1, &prepared.safe.reshape(index_dims)?)?
        .reshape(targets.shape().clone())?;
    // kept · w[t]: the weight of each sample, and the mean's denominator.
    let sample_weight = match &options.weight {
        Some(weight) => {
            let flat = prepared.safe.reshape([targets.numel()])?;
            let picked_weight = weight.detach().index_select(0, &flat)?;
            picked_weight
                .reshape(targets.shape().clone())?
                .mul(&prepared.kept)?
        }
        None => prepared.kept.clone(),
    };
    let smoothing = options.label_smoothing;
    let mut losses = picked.mul(&sample_weight)?.mul_scalar(-(1.0 - smoothing))?;
    if smoothing > 0.0 {
        // −Σ_c w[c]·logp[c] per sample, weighted by the classes (not the
        // target) and zero where the target is ignored, as PyTorch's.
        let weighted = match &options.weight {
            Some(weight) => {
                let mut view = vec![1; logits.rank()];
                view[1] = classes;
                log_probs.mul(&weight.detach().reshape(view)?)?
            }
            None => log_probs,
        };
        let uniform_term = weighted.sum(&[1], false)?.mul(&prepared.kept)?;
        losses = losses.add(&uniform_term.mul_scalar(-smoothing / classes as f64)?)?;
    }
    match options.reduction {
        Reduction::None => Ok(losses),
        Reduction::Sum => losses.sum_all(),
        Reduction::Mean => losses.sum_all()?.div(&sample_weight.sum_all()?),
    }
}

struct CrossEntropyBackward {
    /// 1/N for Mean, 1 for Sum.
    scale: f64,
    /// log Σ_c e^(x[n, c]) per row, from the forward (detached, [N]).
    row_logsumexp: Tensor,
}

impl Backward for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        OP
    }
    // dL/dx[n, c] = (softmax(x_n)[c] − [c = t_n]) · g · scale   (targets get no gradient)
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, targets) = (&inputs[0], &inputs[1]);
        let classes = x.dims()[1];
        let storages = (
            &*x.storage(),
            &*targets.storage(),
            &*self.row_logsumexp.storage(),
        );
        let dx = match storages {
            (Storage::Cpu(xs), Storage::Cpu(ts), Storage::Cpu(ls)) => {
                let scale = upstream_scale(grad, self.scale)?;
                let t = u32_targets(OP, ts)?;
                Storage::Cpu(float_slice2!(OP, xs, ls, |xv, lv| CpuStorage::from(
                    cpu::cross_entropy_backward(xv, t, lv, classes, scale)
                )))
            }
            (Storage::Cuda(xs), Storage::Cuda(ts), Storage::Cuda(ls)) => {
                let grad_storage = grad.storage();
                let g = upstream_on_device(OP, &grad_storage, x.device())?;
                Storage::Cuda(cuda::cross_entropy_backward(
                    xs, ts, ls, g, classes, self.scale,
                )?)
            }
            _ => unreachable!("the forward put logits, targets and logsumexp on one device"),
        };
        Ok(vec![Some(Tensor::from_result(dx, x.shape().clone())), None])
    }
}
