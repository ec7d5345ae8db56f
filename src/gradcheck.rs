//! Numerical gradient checking: compares the gradients that `backward()`
//! computes with central finite differences, in f64.
//!
//! For a function f of tensors, kiln checks the scalar L = Σ f(x) · w for a
//! fixed random w (so every output element matters with a different weight):
//! dL/dx_i ≈ (L(x + ε·e_i) − L(x − ε·e_i)) / 2ε.

use crate::autograd::no_grad_scope;
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Rng, Tensor};

/// Tolerances of a gradient check: |analytic − numeric| ≤ atol + rtol·|numeric|.
#[derive(Clone, Copy, Debug)]
pub struct GradcheckOptions {
    pub eps: f64,
    pub atol: f64,
    pub rtol: f64,
    /// Seed of the random output weights w.
    pub seed: u64,
}

impl Default for GradcheckOptions {
    fn default() -> Self {
        GradcheckOptions {
            eps: 1e-6,
            atol: 1e-6,
            rtol: 1e-5,
            seed: 0,
        }
    }
}

/// Checks every input's gradient; `Err` describes the worst mismatch.
/// Inputs must be f64 CPU tensors; integer inputs (indices) belong inside `f`.
pub fn gradcheck(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    options: GradcheckOptions,
) -> Result<()> {
    for (i, x) in inputs.iter().enumerate() {
        if x.dtype() != DType::F64 {
            return Err(Error::invalid(
                "gradcheck",
                format!("input {i} has dtype {}; gradcheck needs f64", x.dtype()),
            ));
        }
    }
    let leaves: Vec<Tensor> = inputs.iter().map(|x| x.detach().requires_grad_()).collect();
    let out = f(&leaves)?;
    let mut rng = Rng::seed(options.seed);
    let weights = Tensor::randn(out.shape().clone(), DType::F64, Device::Cpu, &mut rng)?;
    let loss = |out: &Tensor| -> Result<Tensor> { out.mul(&weights)?.sum_all() };
    let grads = loss(&out)?.backward()?;

    for (i, leaf) in leaves.iter().enumerate() {
        let analytic = match grads.get(leaf) {
            Some(g) => g.to_f64_vec(),
            // No path from this input to the output: its gradient is zero.
            None => vec![0.0; leaf.numel()],
        };
        let base = leaf.to_f64_vec();
        for j in 0..base.len() {
            let loss_at = |delta: f64| -> Result<f64> {
                let mut values = base.clone();
                values[j] += delta;
                let mut perturbed: Vec<Tensor> = inputs.to_vec();
                perturbed[i] = Tensor::from_vec(values, leaf.shape().clone())?;
                no_grad_scope(|| loss(&f(&perturbed)?)?.item())
            };
            let numeric = (loss_at(options.eps)? - loss_at(-options.eps)?) / (2.0 * options.eps);
            let error = (analytic[j] - numeric).abs();
            if error.is_nan() || error > options.atol + options.rtol * numeric.abs() {
                return Err(Error::invalid(
                    "gradcheck",
                    format!(
                        "input {i} (shape {}), element {j}: analytic {} vs numeric {numeric} (|diff| {error:e})",
                        leaf.shape(),
                        analytic[j]
                    ),
                ));
            }
        }
    }
    Ok(())
}
