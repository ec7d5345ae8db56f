//! Convolutions: `conv2d` and `conv_transpose2d`, with PyTorch's semantics,
//! `groups` and conv2d's `padding="same"` / `"valid"` included.
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
//! weight [Cin, Cout/groups, kh, kw] is exactly a conv2d weight
//! [out, in/groups, kh, kw] for that reversed problem — so no weight needs to
//! be transposed or copied.
//!
//! Groups: channels split into `groups` independent convolutions, group g
//! seeing input channels [g·C/G, (g+1)·C/G) and producing output channels
//! [g·O/G, (g+1)·O/G) with weight rows [g·O/G, (g+1)·O/G). An image
//! [N, G·Cg, H, W] is, in memory, [N·G, Cg, H, W], so every kernel treats
//! group g of image n as one more image whose weight is the g-th block.

pub mod cpu;
mod cpu_groups;
pub(crate) mod cuda;
mod geometry;
mod reference;

pub use geometry::{Conv2dPadding, Conv2dParams, ConvGeometry, ConvTranspose2dParams};

use crate::autocast::{self, AutocastOp};
use crate::autograd::Backward;
use crate::cuda::CudaStorage;
use crate::error::Result;
use crate::profile;
use crate::storage::{CpuStorage, Element, Storage, Stored};
use crate::tensor::{Shape, Tensor, check_operands};
use crate::{stored_slice, stored_slice2};
use geometry::check_bias;

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

/// Σ_n grid_n · im2col(image_n)ᵀ per group: a weight [out_channels, in_channels/groups, kh, kw].
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
    /// 2-D convolution (PyTorch's `F.conv2d`), as cross-correlation:
    /// x [N, C, H, W], weight [O, C/groups, kh, kw], bias [O] → [N, O, Ho, Wo] with
    /// Ho = ⌊(H + 2·padding − dilation·(kh − 1) − 1) / stride⌋ + 1, or Ho = H
    /// for [`Conv2dPadding::Same`].
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

    /// Transposed 2-D convolution (PyTorch's `F.conv_transpose2d`), the
    /// adjoint of conv2d: x [N, Cin, H, W], weight [Cin, Cout/groups, kh, kw],
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

    // dL/dx = col2im(Wᵀ · dL/dy), dL/dW = Σ_n dL/dy_n · im2col(x_n)ᵀ, dL/db = Σ_{n,h,w} dL/dy,
    // each product taken per group g (x_n's and dL/dy_n's channels of g, W's rows of g).
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

    // dL/dx = W · im2col(dL/dy) (conv2d of dL/dy), dL/dW = Σ_n x_n · im2col(dL/dy_n)ᵀ,
    // dL/db = Σ_{n,h,w} dL/dy, each product taken per group as in conv2d.
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
