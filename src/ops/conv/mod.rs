//! Convolutions: `conv2d` and `conv_transpose2d`, with PyTorch's semantics
//! (groups = 1).
//!
//! Both ops are built from the same three kernels, which see every problem
//! in conv2d terms through one [`ConvGeometry`]: a kernel slides over an
//! *input image* and produces one value per output channel at each position
//! of an *output grid*.
//!
//! | rule        | conv2d                          | conv_transpose2d                 |
//! |-------------|---------------------------------|----------------------------------|
//! | forward     | `conv2d_forward(x, W)`          | `conv2d_backward_data(x, W)`     |
//! | dL/dx       | `conv2d_backward_data(dy, W)`   | `conv2d_forward(dy, W)`          |
//! | dL/dW       | `conv2d_backward_weight(x, dy)` | `conv2d_backward_weight(dy, x)`  |
//! | dL/db       | `bias_grad(dy)`                 | `bias_grad(dy)`                  |
//!
//! conv_transpose2d is the adjoint of conv2d: its x plays the role of
//! conv2d's output grid and its y that of conv2d's input image, and its
//! weight [Cin, Cout, kh, kw] is exactly a conv2d weight [out, in, kh, kw]
//! for that reversed problem — so no weight needs to be transposed or copied.

pub mod cpu;
pub(crate) mod cuda;

use crate::autocast::{self, AutocastOp};
use crate::autograd::Backward;
use crate::cuda::CudaStorage;
use crate::error::{Error, Result};
use crate::profile;
use crate::storage::{CpuStorage, Element, Storage, Stored};
use crate::tensor::{Shape, Tensor, check_operands, checked_numel};
use crate::{stored_slice, stored_slice2};

/// Hyper-parameters of `conv2d`, each as (height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
}

impl Default for Conv2dParams {
    /// Stride 1, no padding, no dilation.
    fn default() -> Self {
        Conv2dParams {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
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
}

impl Default for ConvTranspose2dParams {
    /// Stride 1, no padding, no output padding, no dilation.
    fn default() -> Self {
        ConvTranspose2dParams {
            stride: [1, 1],
            padding: [0, 0],
            output_padding: [0, 0],
            dilation: [1, 1],
        }
    }
}

/// One convolution problem in conv2d terms: the kernel slides over an input
/// image [batch, in_channels, in_size] and yields an output grid [batch,
/// out_channels, out_size]; the weight is [out_channels, in_channels, kernel].
/// Output position (oh, ow) with kernel tap (i, j) reads input pixel
/// (oh·stride − padding + i·dilation, ow·stride − padding + j·dilation),
/// and pixels outside the image count as zero.
///
/// For conv_transpose2d the roles swap: its x is the output grid, its y the
/// input image. `out_size` is stored rather than derived, because with
/// `output_padding` the transposed op's y is larger than conv2d's formula
/// would give back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub in_size: [usize; 2],
    pub out_channels: usize,
    pub out_size: [usize; 2],
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
}

impl ConvGeometry {
    /// Validates conv2d's x [N, C, H, W] and weight [O, C, kh, kw] and
    /// computes Ho = ⌊(H + 2·padding − dilation·(kh − 1) − 1) / stride⌋ + 1 (same for Wo).
    pub fn for_conv2d(x: &Shape, weight: &Shape, params: Conv2dParams) -> Result<ConvGeometry> {
        let op = "conv2d";
        check_ranks(op, x, weight, "[out_channels, in_channels, kh, kw]")?;
        check_positive(op, "stride", params.stride)?;
        check_positive(op, "dilation", params.dilation)?;
        let (xd, wd) = (x.dims(), weight.dims());
        if xd[1] != wd[1] {
            return Err(Error::shape(
                op,
                format!(
                    "input {x} has {} channels but weight {weight} (out_channels, in_channels, kh, kw) expects {}",
                    xd[1], wd[1]
                ),
            ));
        }
        let in_size = [xd[2], xd[3]];
        let kernel = [wd[2], wd[3]];
        let mut out_size = [0; 2];
        for d in 0..2 {
            // check_ranks made every kernel dim at least 1.
            let reach = params.dilation[d]
                .checked_mul(kernel[d] - 1)
                .and_then(|r| r.checked_add(1));
            let padded = params.padding[d]
                .checked_mul(2)
                .and_then(|p| p.checked_add(in_size[d]));
            let (Some(reach), Some(padded)) = (reach, padded) else {
                return Err(Error::invalid(
                    op,
                    format!(
                        "input {x} with weight {weight}: padding {} and dilation {} are too large to compute the output size",
                        pair(params.padding),
                        pair(params.dilation)
                    ),
                ));
            };
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
                        pair(params.padding)
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
            padding: params.padding,
            dilation: params.dilation,
        };
        checked_numel(op, &geometry.output_shape())?;
        Ok(geometry)
    }

    /// Validates conv_transpose2d's x [N, Cin, H, W] and weight [Cin, Cout, kh, kw]
    /// and computes Ho = (H − 1)·stride − 2·padding + dilation·(kh − 1) + output_padding + 1.
    /// The geometry is the conv2d that maps y [N, Cout, Ho, Wo] back to x.
    pub fn for_conv_transpose2d(
        x: &Shape,
        weight: &Shape,
        params: ConvTranspose2dParams,
    ) -> Result<ConvGeometry> {
        let op = "conv_transpose2d";
        check_ranks(op, x, weight, "[in_channels, out_channels, kh, kw]")?;
        check_positive(op, "stride", params.stride)?;
        check_positive(op, "dilation", params.dilation)?;
        let (xd, wd) = (x.dims(), weight.dims());
        if xd[1] != wd[0] {
            return Err(Error::shape(
                op,
                format!(
                    "input {x} has {} channels but weight {weight} (in_channels, out_channels, kh, kw) expects {}",
                    xd[1], wd[0]
                ),
            ));
        }
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
            in_channels: wd[1],
            in_size: [image_size[0] as usize, image_size[1] as usize],
            out_channels: wd[0],
            out_size: grid_size,
            kernel,
            stride: params.stride,
            padding: params.padding,
            dilation: params.dilation,
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

    /// [out_channels, in_channels, kh, kw]: the weight of both ops.
    pub fn weight_shape(&self) -> Shape {
        Shape::new([
            self.out_channels,
            self.in_channels,
            self.kernel[0],
            self.kernel[1],
        ])
    }

    /// Rows of an im2col matrix: one per (input channel, kernel tap).
    pub fn col_rows(&self) -> usize {
        self.in_channels * self.kernel[0] * self.kernel[1]
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
fn check_bias(
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

/// The typed slice of an optional operand that shares `_like`'s dtype.
fn same_dtype_slice<'a, T: Element>(
    _like: &[T],
    storage: Option<&'a CpuStorage>,
) -> Option<&'a [T]> {
    storage.map(|s| T::slice(s).expect("check_operands gave every operand one dtype"))
}

/// The CPU half of an operand's storage (check_operands put all on one device).
fn cpu_part(storage: &Storage) -> &CpuStorage {
    match storage {
        Storage::Cpu(s) => s,
        Storage::Cuda(_) => unreachable!("check_operands put every operand on one device"),
    }
}

/// The CUDA half of an operand's storage (check_operands put all on one device).
fn cuda_part(storage: &Storage) -> &CudaStorage {
    match storage {
        Storage::Cuda(s) => s,
        Storage::Cpu(_) => unreachable!("check_operands put every operand on one device"),
    }
}

/// Runs `on_cpu` or `on_cuda` on the storages of two tensors and an optional
/// third, all on one device; the result is that device's storage.
fn dispatch(
    a: &Tensor,
    b: &Tensor,
    c: Option<&Tensor>,
    on_cpu: impl FnOnce(&CpuStorage, &CpuStorage, Option<&CpuStorage>) -> Result<CpuStorage>,
    on_cuda: impl FnOnce(&CudaStorage, &CudaStorage, Option<&CudaStorage>) -> Result<CudaStorage>,
) -> Result<Storage> {
    let (a, b) = (a.storage(), b.storage());
    let c = c.map(|c| c.storage());
    Ok(match &*a {
        Storage::Cpu(a) => Storage::Cpu(on_cpu(a, cpu_part(&b), c.as_deref().map(cpu_part))?),
        Storage::Cuda(a) => Storage::Cuda(on_cuda(a, cuda_part(&b), c.as_deref().map(cuda_part))?),
    })
}

/// The CUDA kernels for conv2d's forward, the ladder in kernels/conv.cu:
/// each is parity-tested against the CPU and can be timed on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conv2dForwardKernel {
    /// `conv2d_forward_direct`: one thread per output value (the definition),
    /// in any float format.
    Direct,
    /// `conv2d_forward_implicit_gemm`: shared-memory GEMM tiles with the
    /// im2col matrix gathered on the fly; the one the engine uses for f32.
    /// 16-bit operands asked for it run [`Self::TensorCore`].
    ImplicitGemm,
    /// `conv2d_forward_tensor_core`: the same implicit GEMM on tensor cores
    /// (mma.sync, bf16/f16 in, f32 accumulate); the one the engine uses for
    /// bf16 and f16. f32 operands asked for it run [`Self::ImplicitGemm`].
    TensorCore,
}

impl Conv2dForwardKernel {
    /// The kernel behind `Tensor::conv2d` and conv_transpose2d's dL/dx (the
    /// launch glue picks the tensor-core form for 16-bit operands).
    pub const ENGINE: Conv2dForwardKernel = Conv2dForwardKernel::ImplicitGemm;
}

// ----- kernel dispatch: one function per kernel ------------------------------

/// y = W · im2col(image) + b: the output grid [N, out_channels, out_size].
fn run_conv2d_forward(
    kernel: Conv2dForwardKernel,
    g: &ConvGeometry,
    image: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Storage> {
    let op = "conv2d";
    dispatch(
        image,
        weight,
        bias,
        |xs, ws, bs| {
            Ok(stored_slice2!(op, xs, ws, |x, w| {
                let bias = same_dtype_slice(x, bs).map(Stored::computed);
                CpuStorage::from(cpu::conv2d_forward(
                    g,
                    x,
                    &Stored::computed(w),
                    bias.as_deref(),
                ))
            }))
        },
        |xs, ws, bs| cuda::conv2d_forward(kernel, g, xs, ws, bs),
    )
}

/// col2im(Wᵀ · grid) + b: the input image [N, in_channels, in_size].
fn run_conv2d_backward_data(
    g: &ConvGeometry,
    grid: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Storage> {
    let op = "conv2d_backward_data";
    dispatch(
        grid,
        weight,
        bias,
        |gs, ws, bs| {
            Ok(stored_slice2!(op, gs, ws, |dy, w| {
                let bias = same_dtype_slice(dy, bs).map(Stored::computed);
                CpuStorage::from(cpu::conv2d_backward_data(
                    g,
                    dy,
                    &Stored::computed(w),
                    bias.as_deref(),
                ))
            }))
        },
        |gs, ws, bs| cuda::conv2d_backward_data(g, gs, ws, bs),
    )
}

/// Σ_n grid_n · im2col(image_n)ᵀ: a weight [out_channels, in_channels, kh, kw].
fn run_conv2d_backward_weight(g: &ConvGeometry, image: &Tensor, grid: &Tensor) -> Result<Storage> {
    let op = "conv2d_backward_weight";
    dispatch(
        image,
        grid,
        None,
        |xs, gs, _| {
            Ok(stored_slice2!(op, xs, gs, |x, dy| CpuStorage::from(
                cpu::conv2d_backward_weight(g, x, dy)
            )))
        },
        |xs, gs, _| cuda::conv2d_backward_weight(g, xs, gs),
    )
}

/// Σ over batch and pixels of an [N, C, H, W] gradient: [C].
fn run_bias_grad(grad: &Tensor) -> Result<Storage> {
    let dims = grad.dims();
    let (batch, channels, pixels) = (dims[0], dims[1], dims[2] * dims[3]);
    Ok(match &*grad.storage() {
        Storage::Cpu(s) => Storage::Cpu(stored_slice!("conv_bias_grad", s, |dy| {
            CpuStorage::from(cpu::bias_grad(dy, batch, channels, pixels))
        })),
        Storage::Cuda(s) => Storage::Cuda(cuda::bias_grad(s, batch, channels, pixels)?),
    })
}

/// conv2d's forward value with a chosen CUDA kernel (no graph is recorded):
/// how the parity tests and benchmarks reach each rung of the kernel ladder.
/// On the CPU the choice is ignored and the usual kernel runs.
pub fn conv2d_forward_with_kernel(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    params: Conv2dParams,
    kernel: Conv2dForwardKernel,
) -> Result<Tensor> {
    let _profile = profile::op("conv2d", x.device());
    let op = "conv2d";
    check_operands(op, &operand_list(x, weight, bias))?;
    let geometry = ConvGeometry::for_conv2d(x.shape(), weight.shape(), params)?;
    check_bias(op, bias, geometry.out_channels, weight)?;
    let out = run_conv2d_forward(kernel, &geometry, x, weight, bias)?;
    Ok(Tensor::from_result(out, geometry.output_shape()))
}

impl Tensor {
    /// 2-D convolution (PyTorch's `F.conv2d`, groups = 1), as cross-correlation:
    /// x [N, C, H, W], weight [O, C, kh, kw], bias [O] → [N, O, Ho, Wo] with
    /// Ho = ⌊(H + 2·padding − dilation·(kh − 1) − 1) / stride⌋ + 1.
    pub fn conv2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        params: Conv2dParams,
    ) -> Result<Tensor> {
        let _profile = profile::op("conv2d", self.device());
        let op = "conv2d";
        let (x, weight, bias) =
            autocast::cast_layer_operands(AutocastOp::Conv2d, self, weight, bias)?;
        let (x, weight, bias) = (&x, &weight, bias.as_ref());
        let inputs = operand_list(x, weight, bias);
        check_operands(op, &inputs)?;
        let geometry = ConvGeometry::for_conv2d(x.shape(), weight.shape(), params)?;
        check_bias(op, bias, geometry.out_channels, weight)?;
        let out = run_conv2d_forward(Conv2dForwardKernel::ENGINE, &geometry, x, weight, bias)?;
        Ok(Tensor::from_op(
            out,
            geometry.output_shape(),
            &inputs,
            |_| Conv2dBackward { geometry },
        ))
    }

    /// Transposed 2-D convolution (PyTorch's `F.conv_transpose2d`, groups = 1),
    /// the adjoint of conv2d: x [N, Cin, H, W], weight [Cin, Cout, kh, kw],
    /// bias [Cout] → [N, Cout, Ho, Wo] with
    /// Ho = (H − 1)·stride − 2·padding + dilation·(kh − 1) + output_padding + 1.
    pub fn conv_transpose2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        params: ConvTranspose2dParams,
    ) -> Result<Tensor> {
        let _profile = profile::op("conv_transpose2d", self.device());
        let op = "conv_transpose2d";
        let (x, weight, bias) =
            autocast::cast_layer_operands(AutocastOp::ConvTranspose2d, self, weight, bias)?;
        let (x, weight, bias) = (&x, &weight, bias.as_ref());
        let inputs = operand_list(x, weight, bias);
        check_operands(op, &inputs)?;
        let geometry = ConvGeometry::for_conv_transpose2d(x.shape(), weight.shape(), params)?;
        check_bias(op, bias, geometry.in_channels, weight)?;
        let out = run_conv2d_backward_data(&geometry, x, weight, bias)?;
        Ok(Tensor::from_op(
            out,
            geometry.input_shape(),
            &inputs,
            |_| ConvTranspose2dBackward { geometry },
        ))
    }
}

/// [x, weight] or [x, weight, bias]: the recorded inputs of both ops.
fn operand_list<'a>(
    x: &'a Tensor,
    weight: &'a Tensor,
    bias: Option<&'a Tensor>,
) -> Vec<&'a Tensor> {
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    inputs
}

/// Gradients of the inputs that need one (`inputs` is [x, weight] or [x, weight, bias]).
/// Each closure runs only if its input requires grad: the first layer of a
/// network, for example, needs no dL/dx. The bias gradient is the same rule
/// for conv2d and conv_transpose2d, dL/db = Σ_{n,h,w} dL/dy, one value per
/// channel of `grad` [N, C, H, W].
fn input_grads(
    inputs: &[Tensor],
    grad: &Tensor,
    dx: impl FnOnce() -> Result<Tensor>,
    dweight: impl FnOnce() -> Result<Tensor>,
) -> Result<Vec<Option<Tensor>>> {
    let mut grads = vec![
        inputs[0].requires_grad().then(dx).transpose()?,
        inputs[1].requires_grad().then(dweight).transpose()?,
    ];
    if let Some(bias) = inputs.get(2) {
        let dbias = || -> Result<Tensor> {
            let channels = Shape::new([grad.dims()[1]]);
            Ok(Tensor::from_result(run_bias_grad(grad)?, channels))
        };
        grads.push(bias.requires_grad().then(dbias).transpose()?);
    }
    Ok(grads)
}

struct Conv2dBackward {
    geometry: ConvGeometry,
}

impl Backward for Conv2dBackward {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    // dL/dx = col2im(Wᵀ · dL/dy), dL/dW = Σ_n dL/dy_n · im2col(x_n)ᵀ, dL/db = Σ_{n,h,w} dL/dy
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = &self.geometry;
        let (x, weight) = (&inputs[0], &inputs[1]);
        input_grads(
            inputs,
            grad,
            || {
                let dx = run_conv2d_backward_data(g, grad, weight, None)?;
                Ok(Tensor::from_result(dx, g.input_shape()))
            },
            || {
                let dw = run_conv2d_backward_weight(g, x, grad)?;
                Ok(Tensor::from_result(dw, g.weight_shape()))
            },
        )
    }
}

struct ConvTranspose2dBackward {
    /// The conv2d that maps this op's y back to its x.
    geometry: ConvGeometry,
}

impl Backward for ConvTranspose2dBackward {
    fn name(&self) -> &'static str {
        "conv_transpose2d"
    }

    // dL/dx = W · im2col(dL/dy) (conv2d of dL/dy), dL/dW = Σ_n x_n · im2col(dL/dy_n)ᵀ, dL/db = Σ_{n,h,w} dL/dy
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = &self.geometry;
        let (x, weight) = (&inputs[0], &inputs[1]);
        input_grads(
            inputs,
            grad,
            || {
                let dx = run_conv2d_forward(Conv2dForwardKernel::ENGINE, g, grad, weight, None)?;
                Ok(Tensor::from_result(dx, g.output_shape()))
            },
            || {
                let dw = run_conv2d_backward_weight(g, grad, x)?;
                Ok(Tensor::from_result(dw, g.weight_shape()))
            },
        )
    }
}
