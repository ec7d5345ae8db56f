//! `Conv2d` and `ConvTranspose2d` with PyTorch's weight layouts and default
//! initialisation.

use crate::error::{Error, Result};
use crate::nn::init::{Init, weight_and_bias};
use crate::nn::{Module, TensorRole, visit_weight_and_bias};
use crate::ops::conv::{Conv2dParams, ConvTranspose2dParams};
use crate::tensor::Tensor;

/// 2-D convolution: weight `[out_c, in_c/groups, kh, kw]`, bias `[out_c]`
/// (`groups` comes from `params`).
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub params: Conv2dParams,
}

impl Conv2d {
    /// Weight and bias from U(−1/√fan_in, 1/√fan_in), fan_in = in_c/groups · kh · kw
    /// (the inputs each output reads, as PyTorch computes it from the weight).
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: [usize; 2],
        params: Conv2dParams,
        bias: bool,
        init: &mut Init,
    ) -> Result<Self> {
        check_sizes("Conv2d", in_channels, out_channels, kernel, params.groups)?;
        let in_per_group = in_channels / params.groups;
        let fan_in = in_per_group * kernel[0] * kernel[1];
        let (weight, bias) = weight_and_bias(
            init,
            [out_channels, in_per_group, kernel[0], kernel[1]],
            out_channels,
            fan_in,
            bias,
        )?;
        Ok(Conv2d {
            weight,
            bias,
            params,
        })
    }
}

impl Module for Conv2d {
    /// x [N, in_c, H, W] → [N, out_c, H', W'].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.weight, self.bias.as_ref(), self.params)
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_weight_and_bias(prefix, &self.weight, self.bias.as_ref(), visitor);
    }
}

/// 2-D transposed convolution (the DCGAN generator's upsampling):
/// weight `[in_c, out_c/groups, kh, kw]`, bias `[out_c]` (`groups` comes from `params`).
pub struct ConvTranspose2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub params: ConvTranspose2dParams,
}

impl ConvTranspose2d {
    /// Weight and bias from U(−1/√fan_in, 1/√fan_in) where, as in PyTorch
    /// (which reads the fan from weight.size(1)), fan_in = out_c/groups · kh · kw.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: [usize; 2],
        params: ConvTranspose2dParams,
        bias: bool,
        init: &mut Init,
    ) -> Result<Self> {
        check_sizes(
            "ConvTranspose2d",
            in_channels,
            out_channels,
            kernel,
            params.groups,
        )?;
        let out_per_group = out_channels / params.groups;
        let fan_in = out_per_group * kernel[0] * kernel[1];
        let (weight, bias) = weight_and_bias(
            init,
            [in_channels, out_per_group, kernel[0], kernel[1]],
            out_channels,
            fan_in,
            bias,
        )?;
        Ok(ConvTranspose2d {
            weight,
            bias,
            params,
        })
    }
}

impl Module for ConvTranspose2d {
    /// x [N, in_c, H, W] → [N, out_c, H', W'].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv_transpose2d(&self.weight, self.bias.as_ref(), self.params)
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_weight_and_bias(prefix, &self.weight, self.bias.as_ref(), visitor);
    }
}

/// Positive sizes, and both channel counts divisible by `groups` (PyTorch's
/// module constructors check the same).
fn check_sizes(
    module: &'static str,
    in_channels: usize,
    out_channels: usize,
    kernel: [usize; 2],
    groups: usize,
) -> Result<()> {
    if in_channels == 0 || out_channels == 0 || kernel.contains(&0) || groups == 0 {
        return Err(Error::invalid(
            module,
            format!(
                "channels, kernel sizes and groups must be positive, got in {in_channels}, out {out_channels}, kernel {kernel:?}, groups {groups}"
            ),
        ));
    }
    for (what, channels) in [("in_channels", in_channels), ("out_channels", out_channels)] {
        if channels % groups != 0 {
            return Err(Error::invalid(
                module,
                format!(
                    "{what} = {channels} must be divisible by groups = {groups}; pick channel counts that are multiples of groups"
                ),
            ));
        }
    }
    Ok(())
}
