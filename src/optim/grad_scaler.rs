//! Loss scaling for f16 training, as PyTorch's `torch.amp.GradScaler`.
//!
//! f16 has a smallest normal of 6.1e-5: many gradients of a 16-bit forward
//! would flush to zero. The scaler multiplies the loss by a large `scale`
//! before `backward()`, so the gradients flowing through the 16-bit ops are
//! that much larger, and divides them back (`unscale`) before the optimizer
//! sees them. If any unscaled gradient is Inf or NaN the scale was too large:
//! the step is skipped (parameters and optimizer state untouched) and the
//! scale halves. After `growth_interval` clean steps in a row it doubles.
//!
//! ```no_run
//! # use kiln::{Tensor, optim::{GradScaler, Optimizer}};
//! # fn step(loss: &Tensor, optimizer: &mut dyn Optimizer, scaler: &mut GradScaler) -> kiln::Result<()> {
//! let mut grads = scaler.scale(loss)?.backward()?;
//! if scaler.unscale(&mut grads)? {
//!     optimizer.step(&grads)?; // skipped when a gradient overflowed
//! }
//! scaler.update();
//! # Ok(()) }
//! ```

use std::collections::HashMap;

use super::cpu;
use super::cuda;
use crate::autograd::GradStore;
use crate::error::{Error, Result};
use crate::profile;
use crate::storage::{CpuStorage, Float};
use crate::tensor::{DType, Device, Tensor};

/// The scaler's constants, PyTorch's defaults by `Default`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradScalerConfig {
    /// The scale of the first step (2¹⁶).
    pub init_scale: f64,
    /// Multiplies the scale after `growth_interval` clean steps (2).
    pub growth_factor: f64,
    /// Multiplies the scale after a step with a non-finite gradient (0.5).
    pub backoff_factor: f64,
    /// Clean steps in a row before the scale grows (2000).
    pub growth_interval: u64,
}

impl Default for GradScalerConfig {
    fn default() -> Self {
        GradScalerConfig {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// Dynamic loss scaling; see the module documentation. A disabled scaler
/// (for f32 and bf16, whose range needs none) passes everything through.
#[derive(Clone, Debug)]
pub struct GradScaler {
    config: GradScalerConfig,
    enabled: bool,
    scale: f64,
    /// Clean steps since the scale last changed.
    growth_tracker: u64,
    /// Whether an `unscale` since the last `update` met Inf or NaN.
    found_non_finite: bool,
}

impl GradScaler {
    /// A scaler with `config`, checked for sense.
    pub fn new(config: GradScalerConfig) -> Result<Self> {
        let invalid = |msg: String| Err(Error::invalid("GradScaler", msg));
        if !(config.init_scale.is_finite() && config.init_scale > 0.0) {
            return invalid(format!(
                "init_scale must be positive, got {}",
                config.init_scale
            ));
        }
        if !(config.growth_factor.is_finite() && config.growth_factor > 1.0) {
            return invalid(format!(
                "growth_factor must be > 1, got {}",
                config.growth_factor
            ));
        }
        if !(config.backoff_factor > 0.0 && config.backoff_factor < 1.0) {
            return invalid(format!(
                "backoff_factor must be in (0, 1), got {}",
                config.backoff_factor
            ));
        }
        if config.growth_interval == 0 {
            return invalid("growth_interval must be at least 1".into());
        }
        Ok(GradScaler {
            config,
            enabled: true,
            scale: config.init_scale,
            growth_tracker: 0,
            found_non_finite: false,
        })
    }

    /// A scaler that scales by 1 and never skips a step.
    pub fn disabled() -> Self {
        GradScaler {
            enabled: false,
            scale: 1.0,
            ..GradScaler::new(GradScalerConfig::default()).expect("the defaults are valid")
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The current scale.
    pub fn scale_factor(&self) -> f64 {
        self.scale
    }

    /// loss · scale, to call `backward()` on.
    pub fn scale(&self, loss: &Tensor) -> Result<Tensor> {
        if !self.enabled {
            return Ok(loss.clone());
        }
        loss.mul_scalar(self.scale)
    }

    /// Divides every gradient in `grads` by the scale (one fused pass per
    /// gradient that also checks for Inf/NaN) and returns whether all are
    /// finite: step the optimizer only if so. The unscaled gradients are new
    /// tensors (two entries of a store may share one).
    pub fn unscale(&mut self, grads: &mut GradStore) -> Result<bool> {
        if !self.enabled {
            return Ok(true);
        }
        let device = grads.iter().next().map_or(Device::Cpu, |(_, g)| g.device());
        let _profile = profile::op("grad_scaler unscale", device);
        // f32 as PyTorch: the reciprocal of a power of two is exact.
        let inv_scale = (1.0 / self.scale) as f32;
        let mut finite = true;
        let mut on_cuda = Vec::new();
        for (_, grad) in grads.iter_mut() {
            if let Device::Cuda(_) = grad.device() {
                on_cuda.push(grad);
                continue;
            }
            let (unscaled, grad_finite) = grad.with_cpu(|s| -> Result<(CpuStorage, bool)> {
                Ok(crate::float_slice!("GradScaler::unscale", s, |v| {
                    let (out, ok) =
                        cpu::unscale_and_check_finite(v, Float::from_f64(inv_scale as f64));
                    (CpuStorage::from(out), ok)
                }))
            })?;
            finite &= grad_finite;
            *grad = Tensor::from_cpu(unscaled, grad.shape().clone());
        }
        if !on_cuda.is_empty() {
            let sources: Vec<Tensor> = on_cuda.iter().map(|g| (**g).clone()).collect();
            let (unscaled, cuda_finite) = cuda::unscale_and_check_finite(&sources, inv_scale)?;
            finite &= cuda_finite;
            for (slot, value) in on_cuda.into_iter().zip(unscaled) {
                *slot = value;
            }
        }
        self.found_non_finite |= !finite;
        Ok(finite)
    }

    /// Ends a step: halves the scale (and restarts the count) if an
    /// `unscale` since the last update found Inf or NaN, doubles it after
    /// `growth_interval` clean steps in a row.
    pub fn update(&mut self) {
        if !self.enabled {
            return;
        }
        if self.found_non_finite {
            self.scale *= self.config.backoff_factor;
            self.growth_tracker = 0;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == self.config.growth_interval {
                self.scale *= self.config.growth_factor;
                self.growth_tracker = 0;
            }
        }
        self.found_non_finite = false;
    }

    /// The scale and the clean-step count, for checkpoints.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        if !self.enabled {
            return Vec::new();
        }
        let scalar = |v: f64| Tensor::from_cpu(CpuStorage::F64(vec![v]), [1].into());
        vec![
            ("scale".to_string(), scalar(self.scale)),
            (
                "growth_tracker".to_string(),
                scalar(self.growth_tracker as f64),
            ),
        ]
    }

    /// Restores what `state_dict` saved.
    pub fn load_state_dict(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let value = |name: &str| -> Result<f64> {
            let t = tensors.get(name).ok_or_else(|| {
                Error::invalid(
                    "GradScaler::load_state_dict",
                    format!(
                        "no \"{name}\" tensor: the checkpoint was not written with loss scaling"
                    ),
                )
            })?;
            match (t.dtype(), t.to_f64_vec().as_slice()) {
                (DType::F64, &[v]) => Ok(v),
                _ => Err(Error::invalid(
                    "GradScaler::load_state_dict",
                    format!(
                        "\"{name}\" must be one f64, got {} of shape {}",
                        t.dtype(),
                        t.shape()
                    ),
                )),
            }
        };
        let (scale, tracker) = (value("scale")?, value("growth_tracker")?);
        if !(scale.is_finite() && scale > 0.0) || tracker < 0.0 || tracker.fract() != 0.0 {
            return Err(Error::invalid(
                "GradScaler::load_state_dict",
                format!("corrupt state: scale {scale}, growth_tracker {tracker}"),
            ));
        }
        self.scale = scale;
        self.growth_tracker = tracker as u64;
        self.found_non_finite = false;
        Ok(())
    }
}
