//! The hyper-parameters of conv2d and conv_transpose2d and the
//! [`ConvGeometry`] both are validated into: shapes, groups and padding are
//! checked here, with PyTorch's rules and errors, before any kernel runs.

use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor, checked_numel};

/// How `conv2d` pads its input: PyTorch's `padding=` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conv2dPadding {
    /// Zeros on both sides: (height, width) rows/columns at top and bottom,
    /// left and right. `[1, 1].into()` or `1.into()` build one.
    Explicit([usize; 2]),
    /// PyTorch's `padding="same"`: the output is as large as the input
    /// (stride 1 only). The total padding dilation·(k − 1) is split with
    /// ⌊total/2⌋ at the top/left and the rest, one more when it is odd, at
    /// the bottom/right.
    Same,
    /// PyTorch's `padding="valid"`: no padding, the same as `Explicit([0, 0])`.
    Valid,
}

impl From<[usize; 2]> for Conv2dPadding {
    fn from(padding: [usize; 2]) -> Self {
        Conv2dPadding::Explicit(padding)
    }
}

impl From<usize> for Conv2dPadding {
    /// The same padding on both spatial dims, like PyTorch's `padding=p`.
    fn from(padding: usize) -> Self {
        Conv2dPadding::Explicit([padding; 2])
    }
}

impl Default for Conv2dPadding {
    /// No padding.
    fn default() -> Self {
        Conv2dPadding::Explicit([0, 0])
    }
}

/// Hyper-parameters of `conv2d`, each pair as (height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: [usize; 2],
    pub padding: Conv2dPadding,
    pub dilation: [usize; 2],
    /// Independent channel groups: weight [O, C/groups, kh, kw], with C and
    /// O divisible by it (groups = C is a depthwise convolution).
    pub groups: usize,
}

impl Default for Conv2dParams {
    /// Stride 1, no padding, no dilation, one group.
    fn default() -> Self {
        Conv2dParams {
            stride: [1, 1],
            padding: Conv2dPadding::default(),
            dilation: [1, 1],
            groups: 1,
        }
    }
}

/// Hyper-parameters of `conv_transpose2d`, each as (height, width).
/// `padding` crops the output; `output_padding` adds rows/columns at its
/// bottom/right, to pick among the output sizes a strided conv2d maps to the
/// same input size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTranspose2dParams {
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub output_padding: [usize; 2],
    pub dilation: [usize; 2],
    /// Independent channel groups: weight [Cin, Cout/groups, kh, kw], with
    /// Cin and Cout divisible by it.
    pub groups: usize,
}

impl Default for ConvTranspose2dParams {
    /// Stride 1, no padding, no output padding, no dilation, one group.
    fn default() -> Self {
        ConvTranspose2dParams {
            stride: [1, 1],
            padding: [0, 0],
            output_padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
        }
    }
}

/// One convolution problem in conv2d terms: the kernel slides over an input
/// image [batch, in_channels, in_size] and yields an output grid [batch,
/// out_channels, out_size]; the weight is [out_channels, in_channels/groups,
/// kernel]. Output position (oh, ow) with kernel tap (i, j) reads input pixel
/// (oh·stride − padding + i·dilation, ow·stride − padding + j·dilation),
/// and pixels outside the image count as zero. Output channel o belongs to
/// group o / (out_channels/groups) and reads only that group's input channels.
///
/// For conv_transpose2d the roles swap: its x is the output grid, its y the
/// input image. `out_size` is stored rather than derived, because with
/// `output_padding` the transposed op's y is larger than conv2d's formula
/// would give back, and with `padding="same"` the bottom/right padding may
/// exceed the top/left `padding` stored here by one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub batch: usize,
    /// All input channels (every group's).
    pub in_channels: usize,
    pub in_size: [usize; 2],
    /// All output channels (every group's).
    pub out_channels: usize,
    pub out_size: [usize; 2],
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// Top/left padding (the bottom/right follows from `out_size`).
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    /// Independent channel groups; both channel counts are multiples of it.
    pub groups: usize,
}

impl ConvGeometry {
    /// Validates conv2d's x [N, C, H, W] and weight [O, C/groups, kh, kw] and
    /// computes Ho = ⌊(H + 2·padding − dilation·(kh − 1) − 1) / stride⌋ + 1
    /// (same for Wo), or Ho = H for `padding="same"`.
    pub fn for_conv2d(x: &Shape, weight: &Shape, params: Conv2dParams) -> Result<ConvGeometry> {
        let op = "conv2d";
        check_ranks(op, x, weight, "[out_channels, in_channels/groups, kh, kw]")?;
        check_positive(op, "stride", params.stride)?;
        check_positive(op, "dilation", params.dilation)?;
        let groups = params.groups;
        let (xd, wd) = (x.dims(), weight.dims());
        check_groups(op, groups, weight, 0)?;
        if Some(xd[1]) != wd[1].checked_mul(groups) {
            let expected = if groups == 1 {
                wd[1].to_string()
            } else {
                format!(
                    "{} ({} per group x groups={groups})",
                    wd[1].saturating_mul(groups),
                    wd[1]
                )
            };
            return Err(Error::shape(
                op,
                format!(
                    "input {x} has {} channels but weight {weight} (out_channels, in_channels/groups, kh, kw) expects {expected}",
                    xd[1]
                ),
            ));
        }
        let in_size = [xd[2], xd[3]];
        let kernel = [wd[2], wd[3]];
        let padding = resolve_padding(op, x, weight, params)?;
        let mut out_size = [0; 2];
        for d in 0..2 {
            // check_ranks made every kernel dim at least 1.
            let reach = params.dilation[d]
                .checked_mul(kernel[d] - 1)
                .and_then(|r| r.checked_add(1));
            let padded = padding[d]
                .checked_mul(2)
                .and_then(|p| p.checked_add(in_size[d]));
            let (Some(reach), Some(padded)) = (reach, padded) else {
                return Err(Error::invalid(
                    op,
                    format!(
                        "input {x} with weight {weight}: padding {} and dilation {} are too large to compute the output size",
                        pair(padding),
                        pair(params.dilation)
                    ),
                ));
            };
            if params.padding == Conv2dPadding::Same {
                // Stride 1, and the bottom/right padding makes up the rest.
                out_size[d] = in_size[d];
                continue;
            }
            if padded < reach {
                let dilation = if params.dilation == [1, 1] {
                    String::new()
                } else {
                    format!(", dilation {}", pair(params.dilation))
                };
                return Err(Error::shape(
                    op,
                    format!(
                        "input {x} with weight {weight}: input {}x{} with kernel {}{dilation} and padding {} gives an empty output",
                        in_size[0],
                        in_size[1],
                        pair(kernel),
                        pair(padding)
                    ),
                ));
            }
            out_size[d] = (padded - reach) / params.stride[d] + 1;
        }
        let geometry = ConvGeometry {
            batch: xd[0],
            in_channels: xd[1],
            in_size,
            out_channels: wd[0],
            out_size,
            kernel,
            stride: params.stride,
            padding,
            dilation: params.dilation,
            groups,
        };
        checked_numel(op, &geometry.output_shape())?;
        Ok(geometry)
    }

    /// Validates conv_transpose2d's x [N, Cin, H, W] and weight [Cin, Cout/groups, kh, kw]
    /// and computes Ho = (H − 1)·stride − 2·padding + dilation·(kh − 1) + output_padding + 1.
    /// The geometry is the conv2d that maps y [N, Cout, Ho, Wo] back to x.
    pub fn for_conv_transpose2d(
        x: &Shape,
        weight: &Shape,
        params: ConvTranspose2dParams,
    ) -> Result<ConvGeometry> {
        let op = "conv_transpose2d";
        check_ranks(op, x, weight, "[in_channels, out_channels/groups, kh, kw]")?;
        check_positive(op, "stride", params.stride)?;
        check_positive(op, "dilation", params.dilation)?;
        let groups = params.groups;
        let (xd, wd) = (x.dims(), weight.dims());
        check_groups(op, groups, weight, 0)?;
        if xd[1] != wd[0] {
            return Err(Error::shape(
                op,
                format!(
                    "input {x} has {} channels but weight {weight} (in_channels, out_channels/groups, kh, kw) expects {}",
                    xd[1], wd[0]
                ),
            ));
        }
        let Some(out_channels) = wd[1].checked_mul(groups) else {
            return Err(Error::invalid(
                op,
                format!(
                    "weight {weight} with groups={groups}: out_channels = {} x {groups} is too large",
                    wd[1]
                ),
            ));
        };
        for d in 0..2 {
            let op_d = params.output_padding[d];
            if op_d >= params.stride[d] && op_d >= params.dilation[d] {
                return Err(Error::invalid(
                    op,
                    format!(
                        "output_padding {:?} must be smaller than either stride {:?} or dilation {:?} in each dim",
                        params.output_padding, params.stride, params.dilation
                    ),
                ));
            }
        }
        let grid_size = [xd[2], xd[3]];
        let kernel = [wd[2], wd[3]];
        let mut image_size = [0i128; 2];
        for d in 0..2 {
            let Some(size) = transposed_size(grid_size[d], kernel[d], params, d) else {
                return Err(Error::invalid(
                    op,
                    format!(
                        "input {x} with weight {weight}: stride {}, padding {} and dilation {} are too large to compute the output size",
                        pair(params.stride),
                        pair(params.padding),
                        pair(params.dilation)
                    ),
                ));
            };
            image_size[d] = size;
        }
        if image_size.iter().any(|&s| s <= 0) {
            return Err(Error::shape(
                op,
                format!(
                    "input {x} with weight {weight}: input {}x{} with kernel {}, stride {}, padding {} and dilation {} gives an empty output ({}x{})",
                    grid_size[0],
                    grid_size[1],
                    pair(kernel),
                    pair(params.stride),
                    pair(params.padding),
                    pair(params.dilation),
                    image_size[0],
                    image_size[1]
                ),
            ));
        }
        let geometry = ConvGeometry {
            batch: xd[0],
            in_channels: out_channels,
            in_size: [image_size[0] as usize, image_size[1] as usize],
            out_channels: wd[0],
            out_size: grid_size,
            kernel,
            stride: params.stride,
            padding: params.padding,
            dilation: params.dilation,
            groups,
        };
        checked_numel(op, &geometry.input_shape())?;
        Ok(geometry)
    }

    /// [batch, in_channels, in_h, in_w]: conv2d's x, conv_transpose2d's y.
    pub fn input_shape(&self) -> Shape {
        Shape::new([
            self.batch,
            self.in_channels,
            self.in_size[0],
            self.in_size[1],
        ])
    }

    /// [batch, out_channels, out_h, out_w]: conv2d's y, conv_transpose2d's x.
    pub fn output_shape(&self) -> Shape {
        Shape::new([
            self.batch,
            self.out_channels,
            self.out_size[0],
            self.out_size[1],
        ])
    }

    /// [out_channels, in_channels/groups, kh, kw]: the weight of both ops.
    pub fn weight_shape(&self) -> Shape {
        Shape::new([
            self.out_channels,
            self.in_channels_per_group(),
            self.kernel[0],
            self.kernel[1],
        ])
    }

    /// Input channels each output channel reads: those of its group.
    pub fn in_channels_per_group(&self) -> usize {
        self.in_channels / self.groups
    }

    /// Output channels each group produces.
    pub fn out_channels_per_group(&self) -> usize {
        self.out_channels / self.groups
    }

    /// The problem of one group on its own: groups = 1 with that group's
    /// channels (the weight is the group's block of rows).
    pub fn single_group(&self) -> ConvGeometry {
        ConvGeometry {
            in_channels: self.in_channels_per_group(),
            out_channels: self.out_channels_per_group(),
            groups: 1,
            ..*self
        }
    }

    /// Rows of one group's im2col matrix: one per (input channel of the
    /// group, kernel tap); also the length of one weight row.
    pub fn col_rows(&self) -> usize {
        self.in_channels_per_group() * self.kernel[0] * self.kernel[1]
    }

    /// Positions of the output grid: the columns of an im2col matrix.
    pub fn out_positions(&self) -> usize {
        self.out_size[0] * self.out_size[1]
    }

    /// Pixels of one input channel plane.
    pub fn in_pixels(&self) -> usize {
        self.in_size[0] * self.in_size[1]
    }
}

/// conv_transpose2d's output size along `d`, (H − 1)·stride − 2·padding +
/// dilation·(kh − 1) + output_padding + 1 (negative when the padding crops
/// everything); None when the extent before cropping does not fit a usize,
/// as the kernels index within it. H and kh are at least 1 (see
/// `check_ranks`).
fn transposed_size(
    grid: usize,
    kernel: usize,
    params: ConvTranspose2dParams,
    d: usize,
) -> Option<i128> {
    let extent = (grid - 1)
        .checked_mul(params.stride[d])?
        .checked_add((kernel - 1).checked_mul(params.dilation[d])?)?
        .checked_add(params.output_padding[d])?
        .checked_add(1)?;
    Some(extent as i128 - 2 * params.padding[d] as i128)
}

/// Rank 4 for both operands, and no empty channel, spatial or kernel dim.
fn check_ranks(op: &'static str, x: &Shape, weight: &Shape, weight_layout: &str) -> Result<()> {
    if x.rank() != 4 {
        return Err(Error::shape(
            op,
            format!(
                "input must be [N, C, H, W] (rank 4), got shape {x} (rank {})",
                x.rank()
            ),
        ));
    }
    if weight.rank() != 4 {
        return Err(Error::shape(
            op,
            format!(
                "weight must be {weight_layout} (rank 4), got shape {weight} (rank {})",
                weight.rank()
            ),
        ));
    }
    if x.dims()[1..].contains(&0) {
        return Err(Error::shape(
            op,
            format!("input {x} has an empty channel or spatial dim"),
        ));
    }
    if weight.dims().contains(&0) {
        return Err(Error::shape(
            op,
            format!("weight {weight} has an empty dim"),
        ));
    }
    Ok(())
}

/// groups ≥ 1, and the weight's dim `dim` (its output channels for conv2d,
/// its input channels for conv_transpose2d) a multiple of it, as PyTorch checks.
fn check_groups(op: &'static str, groups: usize, weight: &Shape, dim: usize) -> Result<()> {
    if groups == 0 {
        return Err(Error::invalid(
            op,
            "groups must be at least 1, got 0 (use groups=1 for an ordinary convolution)",
        ));
    }
    let channels = weight.dims()[dim];
    if !channels.is_multiple_of(groups) {
        return Err(Error::shape(
            op,
            format!(
                "weight {weight} has {channels} channels in dim {dim}, not divisible by groups={groups}: every group needs the same number of channels"
            ),
        ));
    }
    Ok(())
}

/// The top/left padding of conv2d: the explicit pair, 0 for `Valid`, and for
/// `Same` ⌊dilation·(k − 1) / 2⌋ (PyTorch puts the odd extra row/column at the
/// bottom/right), which needs stride 1.
fn resolve_padding(
    op: &'static str,
    x: &Shape,
    weight: &Shape,
    params: Conv2dParams,
) -> Result<[usize; 2]> {
    match params.padding {
        Conv2dPadding::Explicit(padding) => Ok(padding),
        Conv2dPadding::Valid => Ok([0, 0]),
        Conv2dPadding::Same => {
            if params.stride != [1, 1] {
                return Err(Error::invalid(
                    op,
                    format!(
                        "padding=\"same\" is not supported for strided convolutions (stride {}); use stride 1, or an explicit padding",
                        pair(params.stride)
                    ),
                ));
            }
            let wd = weight.dims();
            let mut padding = [0; 2];
            for d in 0..2 {
                let Some(total) = params.dilation[d].checked_mul(wd[2 + d] - 1) else {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "input {x} with weight {weight}: dilation {} is too large to compute the padding",
                            pair(params.dilation)
                        ),
                    ));
                };
                padding[d] = total / 2;
            }
            Ok(padding)
        }
    }
}

fn check_positive(op: &'static str, what: &str, values: [usize; 2]) -> Result<()> {
    if values.contains(&0) {
        return Err(Error::invalid(
            op,
            format!("{what} must be at least 1 in each dim, got {values:?}"),
        ));
    }
    Ok(())
}

/// The bias, if any, must be [channels]: one value per output channel.
pub(super) fn check_bias(
    op: &'static str,
    bias: Option<&Tensor>,
    channels: usize,
    weight: &Tensor,
) -> Result<()> {
    match bias {
        Some(b) if b.dims() != [channels] => Err(Error::shape(
            op,
            format!(
                "bias must have shape [{channels}] (one value per output channel of weight {}), got {}",
                weight.shape(),
                b.shape()
            ),
        )),
        _ => Ok(()),
    }
}

/// "5" for a square pair, "5x2" otherwise (for error messages).
fn pair(values: [usize; 2]) -> String {
    if values[0] == values[1] {
        values[0].to_string()
    } else {
        format!("{}x{}", values[0], values[1])
    }
}
