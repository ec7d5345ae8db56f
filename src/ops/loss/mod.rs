//! Losses: mse, binary cross entropy on logits, cross entropy on class
//! targets, and the Gaussian KL term of a VAE. Each is one fused op with its
//! own backward kernel (no chain of small ops), returns a rank-0 tensor, and
//! reduces by [`Reduction::Mean`] or [`Reduction::Sum`].

pub mod cpu;

use crate::autograd::Backward;
use crate::error::{Error, Result};
use crate::ops::embedding::{check_index_range, multi_index, with_indices};
use crate::storage::{CpuStorage, Float, Storage};
use crate::tensor::{Shape, Tensor, check_operands, same_device};
use crate::{float_slice, float_slice2};

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

/// A rank-0 loss value built from kernel output.
fn scalar_storage(value: CpuStorage) -> (Storage, Shape) {
    (Storage::Cpu(value), Shape::new(Vec::new()))
}

impl Tensor {
    /// Mean (or sum) of (self − target)² over every element; target has the same shape.
    pub fn mse_loss(&self, target: &Tensor, reduction: Reduction) -> Result<Tensor> {
        const OP: &str = "mse_loss";
        check_operands(OP, &[self, target])?;
        check_same_shape(OP, self, target, "target")?;
        let scale = reduction.scale(OP, self.numel(), "elements", self.shape())?;
        let value = self.with_cpu(|x| {
            target.with_cpu(|y| -> Result<_> {
                Ok(float_slice2!(OP, x, y, |xv, yv| CpuStorage::from(vec![
                    cpu::mse(xv, yv, scale)
                ])))
            })
        })?;
        let (storage, shape) = scalar_storage(value);
        Ok(Tensor::from_op(storage, shape, &[self, target], |_| {
            MseBackward { scale }
        }))
    }

    /// Binary cross entropy on logits, max(x, 0) − x·y + ln(1 + e^(−|x|)) per
    /// element (stable for any x), averaged over elements (Mean) or summed.
    /// `target` has the same shape, with values in [0, 1].
    pub fn bce_with_logits(&self, target: &Tensor, reduction: Reduction) -> Result<Tensor> {
        const OP: &str = "bce_with_logits";
        check_operands(OP, &[self, target])?;
        check_same_shape(OP, self, target, "target")?;
        check_probabilities(OP, target)?;
        let scale = reduction.scale(OP, self.numel(), "elements", self.shape())?;
        let value = self.with_cpu(|x| {
            target.with_cpu(|y| -> Result<_> {
                Ok(float_slice2!(OP, x, y, |xv, yv| CpuStorage::from(vec![
                    cpu::bce_with_logits(xv, yv, scale)
                ])))
            })
        })?;
        let (storage, shape) = scalar_storage(value);
        Ok(Tensor::from_op(storage, shape, &[self, target], |_| {
            BceWithLogitsBackward { scale }
        }))
    }

    /// Cross entropy of logits [N, C] against u32 class `targets` [N] in
    /// [0, C): −log softmax(x_n)[t_n] per row; Mean divides by N.
    pub fn cross_entropy(&self, targets: &Tensor, reduction: Reduction) -> Result<Tensor> {
        const OP: &str = "cross_entropy";
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
        let (value, row_logsumexp) = with_indices(OP, "targets", targets, |t| {
            check_index_range(OP, "target", t, targets.dims(), classes, || {
                format!("logits {} have {classes} classes", self.shape())
            })?;
            self.with_cpu(|x| -> Result<_> {
                Ok(float_slice!(OP, x, |xv| {
                    let (loss, lse) = cpu::cross_entropy(xv, t, classes, scale);
                    (CpuStorage::from(vec![loss]), CpuStorage::from(lse))
                }))
            })
        })?;
        let (storage, shape) = scalar_storage(value);
        Ok(Tensor::from_op(storage, shape, &[self, targets], |_| {
            CrossEntropyBackward {
                scale,
                row_logsumexp: Tensor::from_cpu(row_logsumexp, Shape::new(vec![rows])),
            }
        }))
    }

    /// KL(N(mu, e^logvar) ‖ N(0, 1)), the VAE's latent penalty: per row
    /// −½ Σ_j (1 + logvar − mu² − e^logvar) over all non-leading dims; Mean
    /// averages the rows (dim 0), Sum adds them. mu and logvar share a shape.
    pub fn gaussian_kl(mu: &Tensor, logvar: &Tensor, reduction: Reduction) -> Result<Tensor> {
        const OP: &str = "gaussian_kl";
        check_operands(OP, &[mu, logvar])?;
        check_same_shape(OP, mu, logvar, "logvar")?;
        let Some(&rows) = mu.dims().first() else {
            return Err(Error::shape(
                OP,
                "mu and logvar must have a leading (row) dim, got rank 0",
            ));
        };
        let scale = reduction.scale(OP, rows, "rows", mu.shape())?;
        let value = mu.with_cpu(|m| {
            logvar.with_cpu(|lv| -> Result<_> {
                Ok(float_slice2!(OP, m, lv, |mv, lvv| CpuStorage::from(vec![
                    cpu::gaussian_kl(mv, lvv, scale)
                ])))
            })
        })?;
        let (storage, shape) = scalar_storage(value);
        Ok(Tensor::from_op(storage, shape, &[mu, logvar], |_| {
            GaussianKlBackward { scale }
        }))
    }
}

/// Checks that every target of a binary loss is a probability in [0, 1]
/// (this also catches logits passed as the target by mistake).
fn check_probabilities(op: &'static str, target: &Tensor) -> Result<()> {
    let outside = target.with_cpu(|s| -> Result<_> {
        Ok(float_slice!(op, s, |v| v
            .iter()
            .position(|y| !(0.0..=1.0).contains(y))
            .map(|flat| (flat, v[flat].to_f64()))))
    })?;
    let Some((flat, value)) = outside else {
        return Ok(());
    };
    Err(Error::invalid(
        op,
        format!(
            "target value {value} at position {:?} is not in [0, 1]",
            multi_index(flat, target.dims())
        ),
    ))
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
        let (x, y) = (&inputs[0], &inputs[1]);
        let scale = upstream_scale(grad, self.scale)?;
        let dx = x.with_cpu(|xs| {
            y.with_cpu(|ys| -> Result<_> {
                Ok(float_slice2!(
                    "mse_loss",
                    xs,
                    ys,
                    |xv, yv| CpuStorage::from(cpu::mse_backward(xv, yv, scale))
                ))
            })
        })?;
        let dx = Tensor::from_cpu(dx, x.shape().clone());
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
        let scale = upstream_scale(grad, self.scale)?;
        let dx = x.with_cpu(|xs| {
            y.with_cpu(|ys| -> Result<_> {
                Ok(float_slice2!(OP, xs, ys, |xv, yv| CpuStorage::from(
                    cpu::bce_with_logits_backward_input(xv, yv, scale)
                )))
            })
        })?;
        let dy = if y.requires_grad() {
            let dy = x.with_cpu(|xs| -> Result<_> {
                Ok(float_slice!(OP, xs, |xv| CpuStorage::from(
                    cpu::bce_with_logits_backward_target(xv, scale)
                )))
            })?;
            Some(Tensor::from_cpu(dy, y.shape().clone()))
        } else {
            None
        };
        Ok(vec![Some(Tensor::from_cpu(dx, x.shape().clone())), dy])
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
        let scale = upstream_scale(grad, self.scale)?;
        let dx = with_indices(OP, "targets", targets, |t| {
            x.with_cpu(|xs| {
                self.row_logsumexp.with_cpu(|ls| -> Result<_> {
                    Ok(float_slice2!(OP, xs, ls, |xv, lv| CpuStorage::from(
                        cpu::cross_entropy_backward(xv, t, lv, classes, scale)
                    )))
                })
            })
        })?;
        Ok(vec![Some(Tensor::from_cpu(dx, x.shape().clone())), None])
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
        const OP: &str = "gaussian_kl";
        let (mu, logvar) = (&inputs[0], &inputs[1]);
        let scale = upstream_scale(grad, self.scale)?;
        let dmu = mu
            .requires_grad()
            .then(|| {
                mu.with_cpu(|s| -> Result<_> {
                    Ok(float_slice!(OP, s, |v| CpuStorage::from(
                        cpu::gaussian_kl_backward_mu(v, scale)
                    )))
                })
                .map(|d| Tensor::from_cpu(d, mu.shape().clone()))
            })
            .transpose()?;
        let dlogvar = logvar
            .requires_grad()
            .then(|| {
                logvar
                    .with_cpu(|s| -> Result<_> {
                        Ok(float_slice!(OP, s, |v| CpuStorage::from(
                            cpu::gaussian_kl_backward_logvar(v, scale)
                        )))
                    })
                    .map(|d| Tensor::from_cpu(d, logvar.shape().clone()))
            })
            .transpose()?;
        Ok(vec![dmu, dlogvar])
    }
}
