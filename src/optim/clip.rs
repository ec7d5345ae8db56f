//! Gradient clipping by the joint L2 norm.

use super::bookkeeping::params_device;
use super::cuda;
use crate::autograd::GradStore;
use crate::error::{Error, Result};
use crate::profile;
use crate::storage::Float;
use crate::tensor::{Device, Tensor};

/// Scales the gradients of `params` so that their joint L2 norm is at most
/// `max_norm`, as `torch.nn.utils.clip_grad_norm_`: with
/// coef = max_norm / (norm + 1e-6), every gradient is multiplied by coef
/// when coef < 1. Returns the norm before clipping. Scaled gradients are
/// new tensors (a gradient may share storage with another one). CUDA
/// gradients are reduced on their device; only the total (one f64 per
/// device) comes back to the host, and the scaling runs on the device.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[Tensor], max_norm: f64) -> Result<f64> {
    let _profile = profile::op("clip_grad_norm", params_device(params.iter()));
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(Error::invalid(
            "clip_grad_norm",
            format!("max_norm must be a non-negative number, got {max_norm}"),
        ));
    }
    let mut sum_of_squares = 0.0f64;
    let mut cuda_grads = Vec::new();
    for param in params {
        let Some(grad) = grads.get(param) else {
            continue;
        };
        if let Device::Cuda(_) = grad.device() {
            cuda_grads.push(grad.clone());
            continue;
        }
        sum_of_squares += grad.with_cpu(|s| -> Result<f64> {
            Ok(crate::float_slice!("clip_grad_norm", s, |v| v
                .iter()
                .map(|x| {
                    let x = x.to_f64();
                    x * x
                })
                .sum::<f64>()))
        })?;
    }
    sum_of_squares += cuda::sum_of_squares(&cuda_grads)?;
    let norm = sum_of_squares.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        let _no_grad = crate::no_grad();
        for param in params {
            if let Some(grad) = grads.get(param) {
                let scaled = grad.mul_scalar(coef)?;
                grads.insert(param, scaled);
            }
        }
    }
    Ok(norm)
}
