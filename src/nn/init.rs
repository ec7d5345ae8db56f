//! Parameter initialisation with PyTorch's defaults. Values are drawn on the
//! CPU from the caller's [`Rng`] (so a seed reproduces a model exactly),
//! then moved to the target device and marked as requiring grad.

use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Rng, Shape, Tensor};

/// Where and how a module's parameters are created: the random source,
/// the device and the dtype.
pub struct Init<'a> {
    pub rng: &'a mut Rng,
    pub device: Device,
    pub dtype: DType,
}

impl<'a> Init<'a> {
    pub fn new(rng: &'a mut Rng, device: Device, dtype: DType) -> Self {
        Init { rng, device, dtype }
    }
}

/// A CPU tensor moved to `init.device` and turned into a trainable leaf.
fn into_parameter(cpu_values: Tensor, init: &Init) -> Result<Tensor> {
    // Gradients exist for floats only: a u32 parameter could never train.
    if !cpu_values.dtype().is_float() {
        return Err(Error::unsupported_dtype("init", cpu_values.dtype()));
    }
    Ok(cpu_values.to_device(init.device)?.requires_grad_())
}

/// A parameter drawn from U(−bound, bound).
pub fn uniform(init: &mut Init, shape: impl Into<Shape>, bound: f64) -> Result<Tensor> {
    let values = Tensor::rand(-bound, bound, shape, init.dtype, Device::Cpu, init.rng)?;
    into_parameter(values, init)
}

/// A parameter drawn from N(mean, std²).
pub fn normal(init: &mut Init, shape: impl Into<Shape>, mean: f64, std: f64) -> Result<Tensor> {
    let values = Tensor::randn(shape, init.dtype, Device::Cpu, init.rng)?
        .mul_scalar(std)?
        .add_scalar(mean)?;
    into_parameter(values, init)
}

/// PyTorch's `kaiming_uniform_(w, a)` for leaky-ReLU slope `a`:
/// bound = gain · √(3 / fan_in) with gain = √(2 / (1 + a²)).
/// With a = √5 (what `nn.Linear` and `nn.Conv2d` use) the bound is 1/√fan_in.
pub fn kaiming_uniform(
    init: &mut Init,
    shape: impl Into<Shape>,
    fan_in: usize,
    a: f64,
) -> Result<Tensor> {
    let gain = (2.0 / (1.0 + a * a)).sqrt();
    let bound = gain * (3.0 / fan_in.max(1) as f64).sqrt();
    uniform(init, shape, bound)
}

/// A parameter filled with `value` (norm layers' weight 1 and bias 0).
pub fn constant(init: &mut Init, shape: impl Into<Shape>, value: f64) -> Result<Tensor> {
    let values = Tensor::full(value, shape, init.dtype, Device::Cpu)?;
    into_parameter(values, init)
}

/// A buffer (not trained) filled with `value`.
pub fn buffer(init: &Init, shape: impl Into<Shape>, value: f64) -> Result<Tensor> {
    Tensor::full(value, shape, init.dtype, Device::Cpu)?.to_device(init.device)
}

/// The weight and optional bias of `nn.Linear` / `nn.Conv2d`: both
/// U(−1/√fan_in, 1/√fan_in), as PyTorch's `reset_parameters`.
pub(crate) fn weight_and_bias(
    init: &mut Init,
    weight_shape: impl Into<Shape>,
    bias_len: usize,
    fan_in: usize,
    bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let weight = kaiming_uniform(init, weight_shape, fan_in, 5f64.sqrt())?;
    let bias = if bias {
        let bound = if fan_in > 0 {
            1.0 / (fan_in as f64).sqrt()
        } else {
            0.0
        };
        Some(if bound > 0.0 {
            uniform(init, [bias_len], bound)?
        } else {
            constant(init, [bias_len], 0.0)?
        })
    } else {
        None
    };
    Ok((weight, bias))
}
