//! Losses: mse, binary cross entropy on logits, cross entropy on class
//! targets, and the Gaussian KL term of a VAE, with PyTorch's reductions
//! (`Reduction::Mean`, `Sum`, or `None` for the unreduced losses). A plain
//! Mean or Sum is one fused op with its own backward kernel (no chain of
//! small ops) returning a rank-0 tensor; `None` and the options of PyTorch
//! (class weights, ignore_index, label smoothing, bce weights, a
//! broadcasting mse target) are composed of differentiable ops.

mod bce;
pub mod cpu;
mod cross_entropy;
pub(crate) mod cuda;

pub use bce::BceWithLogitsOptions;
pub use cross_entropy::CrossEntropyOptions;

use crate::autocast::{self, AutocastOp};
use crate::autograd::Backward;
use crate::cuda::CudaStorage;
use crate::error::{Error, Result};
use crate::ops::broadcast_shape;
use crate::profile;
use crate::storage::{CpuStorage, Storage};
use crate::tensor::{DType, Device, Shape, Tensor, check_operands};
use crate::{float_slice, float_slice2};
use cuda::{ElementwiseLoss, LossGradient};

/// How a loss combines its per-element (or per-row) terms, as PyTorch's
/// `reduction=` ('mean', 'sum', 'none').
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reduction {
    /// The average (over elements, rows or samples, as each loss documents).
    #[default]
    Mean,
    Sum,
    /// No reduction: the loss of each element, row or sample, as each loss
    /// documents.
    None,
}

impl Reduction {
    /// The factor a fused loss applies to its summed terms: 1/count for
    /// Mean, 1 for Sum. A mean over nothing is an error rather than NaN.
    /// The fused paths never see `None` (it keeps the terms unreduced).
    fn scale(self, op: &'static str, count: usize, what: &str, shape: &Shape) -> Result<f64> {
        match self {
            Reduction::Sum => Ok(1.0),
            Reduction::Mean if count == 0 => Err(mean_over_nothing(op, what, shape)),
            Reduction::Mean => Ok(1.0 / count as f64),
            Reduction::None => unreachable!("{op}: an unreduced loss takes no fused reduction"),
        }
    }
}

fn mean_over_nothing(op: &'static str, what: &str, shape: &Shape) -> Error {
    Error::shape(
        op,
        format!("the mean over {what} is undefined: shape {shape} has none"),
    )
}

/// Unreduced loss terms reduced as `reduction` says (a mean over no
/// element is an error, as for the fused losses).
fn reduce_terms(op: &'static str, terms: Tensor, reduction: Reduction) -> Result<Tensor> {
    match reduction {
        Reduction::None => Ok(terms),
        Reduction::Sum => terms.sum_all(),
        Reduction::Mean if terms.numel() == 0 => {
            Err(mean_over_nothing(op, "elements", terms.shape()))
        }
        Reduction::Mean => terms.mean_all(),
    }
}

/// Says once per process (as PyTorch's UserWarning) that mse_loss broadcast
/// a target of another shape against its input.
fn warn_broadcast_target(input: &Shape, target: &Shape) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        eprintln!(
            "warning: mse_loss: Using a target size ({target}) that is different to the input \
             size ({input}). This will likely lead to incorrect results due to broadcasting. \
             Please ensure they have the same size."
        );
    });
}

/// Checks that `target` has the shape of `input`.
fn check_same_shape(op: &'static str, input: &Tensor, target: &Tensor, role: &str) -> Result<()> {
    if input.shape() != target.shape() {
        return Err(Error::shape(
            op,
            format!(
                "{role} shape {} does not match input shape {}",
                target.shape(),
                input.shape()
            ),
        ));
    }
    Ok(())
}

/// dL/d(loss) × `scale`: the single factor every loss backward kernel takes.
fn upstream_scale(grad: &Tensor, scale: f64) -> Result<f64> {
    Ok(grad.item()? * scale)
}

/// The shape of every loss value: rank 0.
fn scalar_shape() -> Shape {
    Shape::new(Vec::new())
}

/// The rank-0 value scale · Σ term(a, b) of an element-wise loss of two
/// operands on one device: `on_cpu` sums on the host; on CUDA the `kind`
/// partials kernel does.
fn elementwise_loss_value(
    a: &Tensor,
    b: &Tensor,
    kind: ElementwiseLoss,
    scale: f64,
    on_cpu: impl FnOnce(&CpuStorage, &CpuStorage) -> Result<CpuStorage>,
) -> Result<Storage> {
    Ok(match (&*a.storage(), &*b.storage()) {
        (Storage::Cpu(x), Storage::Cpu(y)) => Storage::Cpu(on_cpu(x, y)?),
        (Storage::Cuda(x), Storage::Cuda(y)) => {
            Storage::Cuda(cuda::elementwise_loss(kind, x, y, scale)?)
        }
        _ => unreachable!("check_operands put both operands on one device"),
    })
}

/// The upstream gradient of a loss on CUDA, as the device buffer the
/// backward kernels read it from.
fn upstream_on_device<'a>(
    op: &'static str,
    grad: &'a Storage,
    device: Device,
) -> Result<&'a CudaStorage> {
    match grad {
        Storage::Cuda(g) => Ok(g),
        Storage::Cpu(_) => Err(Error::DeviceMismatch {
            op,
            lhs: device,
            rhs: Device::Cpu,
        }),
    }
}

impl Tensor {
    /// (self − target)² per element: their mean (Mean), sum (Sum), or each
    /// of them (None, the broadcast shape), as PyTorch's `F.mse_loss`.
    ///
    /// A target of another shape is broadcast against the input (both, as
    /// `torch.broadcast_tensors`): Mean divides by the broadcast count, and
    /// each operand's gradient is summed back to its own shape. As PyTorch
    /// (a UserWarning), the first such call of the process prints a warning
    /// line to stderr, since a differing shape is usually a mistake ([N]
    /// against [N, 1] gives N² terms). Shapes that do not broadcast are an
    /// error naming both.
    pub fn mse_loss(&self, target: &Tensor, reduction: Reduction) -> Result<Tensor> {
        if autocast::any_half(&[Some(self), Some(target)]) {
            let out = autocast::widened(self)?.mse_loss(&autocast::widened(target)?, reduction)?;
            return autocast::finish_output(AutocastOp::Loss, out, self.dtype());
        }
        const OP: &str = "mse_loss";
        let _profile = profile::op(OP, self.device());
        check_operands(OP, &[self, target])?;
        if self.shape() != target.shape() {
            let joint = broadcast_shape(OP, self.shape(), target.shape()).map_err(|_| {
                Error::shape(
                    OP,
                    format!(
                        "target shape {} does not broadcast against input shape {}",
                        target.shape(),
                        self.shape()
                    ),
                )
            })?;
            warn_broadcast_target(self.shape(), target.shape());
            let (x, y) = (
                self.broadcast_to(joint.clone())?,
                target.broadcast_to(joint)?,
            );
            return x.mse_loss(&y, reduction);
        }
        if reduction == Reduction::None {
            // (x − y)² per element; the product rule gives dL/dx = 2(x − y)·g = −dL/dy.
            let difference = self.sub(target)?;
            return difference.mul(&difference);
        }
        let scale = reduction.scale(OP, self.numel(), "elements", self.shape())?;
        let value = elementwise_loss_value(self, target, ElementwiseLoss::Mse, scale, |x, y| {
            Ok(float_slice2!(OP, x, y, |xv, yv| CpuStorage::from(vec![
                cpu::mse(xv, yv, scale)
            ])))
        })?;
        Ok(Tensor::from_op(
            value,
            scalar_shape(),
            &[self, target],
            |_| MseBackward { scale },
        ))
    }

    /// KL(N(mu, e^logvar) ‖ N(0, 1)), the VAE's latent penalty: per row
    /// −½ Σ_j (1 + logvar − mu² − e^logvar) over all non-leading dims; Mean
    /// averages the rows (dim 0), Sum adds them, None keeps them ([rows]).
    /// mu and logvar share a shape.
    pub fn gaussian_kl(mu: &Tensor, logvar: &Tensor, reduction: Reduction) -> Result<Tensor> {
        if autocast::any_half(&[Some(mu), Some(logvar)]) {
            let (wide_mu, wide_logvar) = (autocast::widened(mu)?, autocast::widened(logvar)?);
            let out = Tensor::gaussian_kl(&wide_mu, &wide_logvar, reduction)?;
            return autocast::finish_output(AutocastOp::Loss, out, mu.dtype());
        }
        const OP: &str = "gaussian_kl";
        let _profile = profile::op(OP, mu.device());
        check_operands(OP, &[mu, logvar])?;
        check_same_shape(OP, mu, logvar, "logvar")?;
        let Some(&rows) = mu.dims().first() else {
            return Err(Error::shape(
                OP,
                "mu and logvar must have a leading (row) dim, got rank 0",
            ));
        };
        if reduction == Reduction::None {
            // ½ Σ_j (mu² + e^logvar − logvar − 1) per row; its gradients
            // (mu·g and ½(e^logvar − 1)·g) follow from the composed ops.
            let terms = mu
                .mul(mu)?
                .add(&logvar.exp()?)?
                .sub(logvar)?
                .add_scalar(-1.0)?
                .mul_scalar(0.5)?;
            let per_row: usize = mu.dims()[1..].iter().product();
            return terms.reshape([rows, per_row])?.sum(&[1], false);
        }
        let scale = reduction.scale(OP, rows, "rows", mu.shape())?;
        let kind = ElementwiseLoss::GaussianKl;
        let value = elementwise_loss_value(mu, logvar, kind, scale, |m, lv| {
            Ok(float_slice2!(OP, m, lv, |mv, lvv| CpuStorage::from(vec![
                cpu::gaussian_kl(mv, lvv, scale)
            ])))
        })?;
        Ok(Tensor::from_op(
            value,
            scalar_shape(),
            &[mu, logvar],
            |_| GaussianKlBackward { scale },
        ))
    }
}

/// The values of u32 class targets on the host.
fn u32_targets<'a>(op: &'static str, targets: &'a CpuStorage) -> Result<&'a [u32]> {
    require_u32_targets(op, targets.dtype())?;
    match targets {
        CpuStorage::U32(t) => Ok(t),
        _ => unreachable!("the dtype was checked to be u32"),
    }
}

/// Class targets must be u32 (the same message as the other index ops).
fn require_u32_targets(op: &'static str, dtype: DType) -> Result<()> {
    if dtype == DType::U32 {
        return Ok(());
    }
    Err(Error::DType {
        op,
        msg: format!(
            "targets must have dtype u32, got {dtype} (make them with Tensor::from_indices)"
        ),
    })
}

struct MseBackward {
    /// 1/numel for Mean, 1 for Sum.
    scale: f64,
}

impl Backward for MseBackward {
    fn name(&self) -> &'static str {
        "mse_loss"
    }
    // dL/dx = 2(x − y) · g · scale,  dL/dy = −dL/dx
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "mse_loss";
        let (x, y) = (&inputs[0], &inputs[1]);
        let dx = match (&*x.storage(), &*y.storage()) {
            (Storage::Cpu(xs), Storage::Cpu(ys)) => {
                let scale = upstream_scale(grad, self.scale)?;
                Storage::Cpu(float_slice2!(OP, xs, ys, |xv, yv| CpuStorage::from(
                    cpu::mse_backward(xv, yv, scale)
                )))
            }
            (Storage::Cuda(xs), Storage::Cuda(ys)) => {
                let grad_storage = grad.storage();
                let g = upstream_on_device(OP, &grad_storage, x.device())?;
                Storage::Cuda(cuda::elementwise_loss_backward(
                    LossGradient::Mse,
                    xs,
                    Some(ys),
                    g,
                    self.scale,
                )?)
            }
            _ => unreachable!("the forward checked that both operands share one device"),
        };
        let dx = Tensor::from_result(dx, x.shape().clone());
        let dy = y.requires_grad().then(|| dx.neg()).transpose()?;
        Ok(vec![Some(dx), dy])
    }
}

struct BceWithLogitsBackward {
    /// 1/numel for Mean, 1 for Sum.
    scale: f64,
}

impl Backward for BceWithLogitsBackward {
    fn name(&self) -> &'static str {
        "bce_with_logits"
    }
    // dL/dx = (σ(x) − y) · g · scale,  dL/dy = −x · g · scale
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "bce_with_logits";
        let (x, y) = (&inputs[0], &inputs[1]);
        let (dx, dy) = match (&*x.storage(), &*y.storage()) {
            (Storage::Cpu(xs), Storage::Cpu(ys)) => {
                let scale = upstream_scale(grad, self.scale)?;
                let dx = float_slice2!(OP, xs, ys, |xv, yv| CpuStorage::from(
                    cpu::bce_with_logits_backward_input(xv, yv, scale)
                ));
                let dy = if y.requires_grad() {
                    Some(float_slice!(OP, xs, |xv| CpuStorage::from(
                        cpu::bce_with_logits_backward_target(xv, scale)
                    )))
                } else {
                    None
                };
                (Storage::Cpu(dx), dy.map(Storage::Cpu))
            }
            (Storage::Cuda(xs), Storage::Cuda(ys)) => {
                let grad_storage = grad.storage();
                let g = upstream_on_device(OP, &grad_storage, x.device())?;
                let dx = cuda::elementwise_loss_backward(
                    LossGradient::BceInput,
                    xs,
                    Some(ys),
                    g,
                    self.scale,
                )?;
                let dy = y
                    .requires_grad()
                    .then(|| {
                        cuda::elementwise_loss_backward(
                            LossGradient::BceTarget,
                            xs,
                            None,
                            g,
                            self.scale,
                        )
                    })
                    .transpose()?;
                (Storage::Cuda(dx), dy.map(Storage::Cuda))
            }
            _ => unreachable!("the forward checked that both operands share one device"),
        };
        let dy = dy.map(|d| Tensor::from_result(d, y.shape().clone()));
        Ok(vec![Some(Tensor::from_result(dx, x.shape().clone())), dy])
    }
}

struct GaussianKlBackward {
    /// 1/rows for Mean, 1 for Sum.
    scale: f64,
}

impl Backward for GaussianKlBackward {
    fn name(&self) -> &'static str {
        "gaussian_kl"
    }
    // dL/dmu = mu · g · scale,  dL/dlogvar = ½(e^logvar − 1) · g · scale
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (mu, logvar) = (&inputs[0], &inputs[1]);
        let dmu = gaussian_kl_gradient(mu, grad, self.scale, LossGradient::KlMu)?;
        let dlogvar = gaussian_kl_gradient(logvar, grad, self.scale, LossGradient::KlLogvar)?;
        Ok(vec![dmu, dlogvar])
    }
}

/// dL/dmu (`KlMu`) or dL/dlogvar (`KlLogvar`) of the Gaussian KL, on the
/// input's device; None if the input takes no gradient.
fn gaussian_kl_gradient(
    input: &Tensor,
    grad: &Tensor,
    scale: f64,
    gradient: LossGradient,
) -> Result<Option<Tensor>> {
    const OP: &str = "gaussian_kl";
    if !input.requires_grad() {
        return Ok(None);
    }
    let d = match &*input.storage() {
        Storage::Cpu(s) => {
            let scale = upstream_scale(grad, scale)?;
            Storage::Cpu(float_slice!(OP, s, |v| CpuStorage::from(match gradient {
                LossGradient::KlMu => cpu::gaussian_kl_backward_mu(v, scale),
                LossGradient::KlLogvar => cpu::gaussian_kl_backward_logvar(v, scale),
                other => unreachable!("{other:?} is not a gaussian_kl gradient"),
            })))
        }
        Storage::Cuda(s) => {
            let grad_storage = grad.storage();
            let g = upstream_on_device(OP, &grad_storage, input.device())?;
            Storage::Cuda(cuda::elementwise_loss_backward(
                gradient, s, None, g, scale,
            )?)
        }
    };
    Ok(Some(Tensor::from_result(d, input.shape().clone())))
}
