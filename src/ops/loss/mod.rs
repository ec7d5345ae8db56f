//! Losses: mse, binary cross entropy on logits, cross entropy on class
//! targets, and the Gaussian KL term of a VAE. Each is one fused op with its
//! own backward kernel (no chain of small ops), returns a rank-0 tensor, and
//! reduces by [`Reduction::Mean`] or [`Reduction::Sum`].

pub mod cpu;
pub(crate) mod cuda;

use crate::autocast::{self, AutocastOp};
use crate::autograd::Backward;
use crate::cuda::CudaStorage;
use crate::error::{Error, Result};
use crate::ops::embedding::{check_index_range, multi_index};
use crate::profile;
use crate::storage::{CpuStorage, Float, Storage};
use crate::tensor::{DType, Device, Shape, Tensor, check_operands, same_device};
use crate::{float_slice, float_slice2};
use cuda::{ElementwiseLoss, LossGradient};

/// How a loss combines its per-element (or per-row) terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reduction {
    /// The average (over elements, rows or samples, as each loss documents).
    #[default]
    Mean,
    Sum,
}

impl Reduction {
    /// The factor applied to the summed terms: 1/count for Mean, 1 for Sum.
    /// A mean over nothing is an error rather than NaN.
    fn scale(self, op: &'static str, count: usize, what: &str, shape: &Shape) -> Result<f64> {
        match self {
            Reduction::Sum => Ok(1.0),
            Reduction::Mean if count == 0 => Err(Error::shape(
                op,
                format!("the mean over {what} is undefined: shape {shape} has none"),
            )),
            Reduction::Mean => Ok(1.0 / count as f64),
        }
    }
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
/// partials kernel does, and reports None when it flagged a bad target.
fn elementwise_loss_value(
    a: &Tensor,
    b: &Tensor,
    kind: ElementwiseLoss,
    scale: f64,
    on_cpu: impl FnOnce(&CpuStorage, &CpuStorage) -> Result<CpuStorage>,
) -> Result<Option<Storage>> {
    Ok(match (&*a.storage(), &*b.storage()) {
        (Storage::Cpu(x), Storage::Cpu(y)) => Some(Storage::Cpu(on_cpu(x, y)?)),
        (Storage::Cuda(x), Storage::Cuda(y)) => {
            cuda::elementwise_loss(kind, x, y, scale)?.map(Storage::Cuda)
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
    /// Mean (or sum) of (self − target)² over every element; target has the same shape.
    pub fn mse_loss(&self, target: &Tensor, reduction: Reduction) -> Result<Tensor> {
        if autocast::any_half(&[Some(self), Some(target)]) {
            let out = autocast::widened(self)?.mse_loss(&autocast::widened(target)?, reduction)?;
            return autocast::finish_output(AutocastOp::Loss, out, self.dtype());
        }
        const OP: &str = "mse_loss";
        let _profile = profile::op(OP, self.device());
        check_operands(OP, &[self, target])?;
        check_same_shape(OP, self, target, "target")?;
        let scale = reduction.scale(OP, self.numel(), "elements", self.shape())?;
        let value = elementwise_loss_value(self, target, ElementwiseLoss::Mse, scale, |x, y| {
            Ok(float_slice2!(OP, x, y, |xv, yv| CpuStorage::from(vec![
                cpu::mse(xv, yv, scale)
            ])))
        })?
        .expect("mse checks no target values");
        Ok(Tensor::from_op(
            value,
            scalar_shape(),
            &[self, target],
            |_| MseBackward { scale },
        ))
    }

    /// Binary cross entropy on logits, max(x, 0) − x·y + ln(1 + e^(−|x|)) per
    /// element (stable for any x), averaged over elements (Mean) or summed.
    /// `target` has the same shape, with values in [0, 1].
    pub fn bce_with_logits(&self, target: &Tensor, reduction: Reduction) -> Result<Tensor> {
        if autocast::any_half(&[Some(self), Some(target)]) {
            let out =
                autocast::widened(self)?.bce_with_logits(&autocast::widened(target)?, reduction)?;
            return autocast::finish_output(AutocastOp::Loss, out, self.dtype());
        }
        const OP: &str = "bce_with_logits";
        let _profile = profile::op(OP, self.device());
        check_operands(OP, &[self, target])?;
        check_same_shape(OP, self, target, "target")?;
        let scale = reduction.scale(OP, self.numel(), "elements", self.shape())?;
        let kind = ElementwiseLoss::BceWithLogits;
        let value = elementwise_loss_value(self, target, kind, scale, |x, y| {
            check_probabilities(OP, y, target.dims())?;
            Ok(float_slice2!(OP, x, y, |xv, yv| CpuStorage::from(vec![
                cpu::bce_with_logits(xv, yv, scale)
            ])))
        })?;
        // The CUDA kernel flags targets outside [0, 1]; only then are they
        // copied to the host, to name the first one as the CPU path does.
        let Some(value) = value else {
            check_probabilities(OP, &target.host_storage()?, target.dims())?;
            return Err(Error::invalid(OP, "a target value is not in [0, 1]"));
        };
        Ok(Tensor::from_op(
            value,
            scalar_shape(),
            &[self, target],
            |_| BceWithLogitsBackward { scale },
        ))
    }

    /// Cross entropy of logits [N, C] against u32 class `targets` [N] in
    /// [0, C): −log softmax(x_n)[t_n] per row; Mean divides by N.
    pub fn cross_entropy(&self, targets: &Tensor, reduction: Reduction) -> Result<Tensor> {
        if self.dtype().is_half() {
            return autocast::in_float32(AutocastOp::Loss, self, |x| {
                x.cross_entropy(targets, reduction)
            });
        }
        const OP: &str = "cross_entropy";
        let _profile = profile::op(OP, self.device());
        check_operands(OP, &[self])?;
        same_device(OP, &[self, targets])?;
        let [rows, classes] = *self.dims() else {
            return Err(Error::shape(
                OP,
                format!("logits must be 2-D [N, C], got shape {}", self.shape()),
            ));
        };
        if targets.dims() != [rows] {
            return Err(Error::shape(
                OP,
                format!(
                    "targets must have shape [{rows}] for logits {}, got {}",
                    self.shape(),
                    targets.shape()
                ),
            ));
        }
        let scale = reduction.scale(OP, rows, "rows", self.shape())?;
        let classes_context = || format!("logits {} have {classes} classes", self.shape());
        let (value, row_logsumexp) = match (&*self.storage(), &*targets.storage()) {
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
                require_u32_targets(OP, t.dtype())?;
                match cuda::cross_entropy(x, t, rows, classes, scale)? {
                    Some((loss, lse)) => (Storage::Cuda(loss), Storage::Cuda(lse)),
                    None => {
                        let host = t.to_cpu()?;
                        let t = u32_targets(OP, &host)?;
                        check_index_range(
                            OP,
                            "target",
                            t,
                            targets.dims(),
                            classes,
                            classes_context,
                        )?;
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
            &[self, targets],
            |_| CrossEntropyBackward {
                scale,
                row_logsumexp: Tensor::from_result(row_logsumexp, Shape::new(vec![rows])),
            },
        ))
    }

    /// KL(N(mu, e^logvar) ‖ N(0, 1)), the VAE's latent penalty: per row
    /// −½ Σ_j (1 + logvar − mu² − e^logvar) over all non-leading dims; Mean
    /// averages the rows (dim 0), Sum adds them. mu and logvar share a shape.
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
        let scale = reduction.scale(OP, rows, "rows", mu.shape())?;
        let kind = ElementwiseLoss::GaussianKl;
        let value = elementwise_loss_value(mu, logvar, kind, scale, |m, lv| {
            Ok(float_slice2!(OP, m, lv, |mv, lvv| CpuStorage::from(vec![
                cpu::gaussian_kl(mv, lvv, scale)
            ])))
        })?
        .expect("gaussian_kl checks no input values");
        Ok(Tensor::from_op(
            value,
            scalar_shape(),
            &[mu, logvar],
            |_| GaussianKlBackward { scale },
        ))
    }
}

/// Checks that every target of a binary loss (host values of shape `dims`)
/// is a probability in [0, 1] (this also catches logits passed as the
/// target by mistake).
fn check_probabilities(op: &'static str, target: &CpuStorage, dims: &[usize]) -> Result<()> {
    let outside = float_slice!(op, target, |v| v
        .iter()
        .position(|y| !(0.0..=1.0).contains(y))
        .map(|flat| (flat, v[flat].to_f64())));
    let Some((flat, value)) = outside else {
        return Ok(());
    };
    Err(Error::invalid(
        op,
        format!(
            "target value {value} at position {:?} is not in [0, 1]",
            multi_index(flat, dims)
        ),
    ))
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

struct CrossEntropyBackward {
    /// 1/N for Mean, 1 for Sum.
    scale: f64,
    /// log Σ_c e^(x[n, c]) per row, from the forward (detached, [N]).
    row_logsumexp: Tensor,
}

impl Backward for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    // dL/dx[n, c] = (softmax(x_n)[c] − [c = t_n]) · g · scale   (targets get no gradient)
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "cross_entropy";
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
