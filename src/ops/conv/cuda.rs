//! Launch glue for kernels/conv.cu. Each function takes the problem as a
//! [`ConvGeometry`] in conv2d terms, exactly like the CPU kernels, so
//! conv_transpose2d reaches the same launches with the roles swapped.
//! Every kernel handles groups itself (the tiled forwards take the group
//! from blockIdx.z), so grouped problems need no copies on the device.

use cudarc::driver::LaunchConfig;

use crate::cuda::{CudaStorage, FORMAT_F32, float_format, launch_1d};
use crate::error::{Error, Result};
use crate::kernel_params;

use super::{Conv2dForwardKernel, ConvGeometry};

const FILE: &str = "conv.cu";

/// Tile of `conv2d_forward_implicit_gemm` and of `conv2d_forward_tensor_core`:
/// output positions × output channels per block (IG_TILE_* in conv.cu and
/// TC_BM/TC_BN in tensor_core.cuh), and their threads.
const IMPLICIT_GEMM_TILE: [usize; 2] = [64, 64];
const IMPLICIT_GEMM_THREADS: u32 = 256;
const TENSOR_CORE_THREADS: u32 = 128;

/// Threads of the block reductions (backward-weight, bias-grad): a multiple of 32.
const REDUCTION_THREADS: usize = 256;

/// The block-stride loops of the reductions cover any count with this many blocks.
const MAX_REDUCTION_BLOCKS: usize = 1 << 20;

/// The hardware limit on gridDim.z: the tiled forwards stride over groups past it.
const MAX_GROUP_BLOCKS: usize = 65_535;

kernel_params! {
    /// A [`ConvGeometry`] as the kernels read it.
    pub struct ConvShape {
        batch: i64,
        in_channels: i64,
        in_h: i64,
        in_w: i64,
        out_channels: i64,
        out_h: i64,
        out_w: i64,
        kernel_h: i64,
        kernel_w: i64,
        stride_h: i64,
        stride_w: i64,
        pad_h: i64,
        pad_w: i64,
        dilation_h: i64,
        dilation_w: i64,
        groups: i64,
    }
}

kernel_params! {
    /// Each kernel reads two of image / weight / grid (0 for the unused one)
    /// and writes `out`, all in `format` (see `float_format`); `bias` is 0
    /// when there is none.
    pub struct ConvParams {
        image: u64,
        weight: u64,
        grid: u64,
        bias: u64,
        out: u64,
        geometry: ConvShape,
        format: u32,
        pad: u32,
    }
}

kernel_params! {
    pub struct BiasGradParams {
        grad: u64,
        out: u64,
        batch: i64,
        channels: i64,
        pixels: i64,
        format: u32,
        pad: u32,
    }
}

// conv.cu static_asserts the same sizes, so a field added on one side only fails to compile.
const _: () = assert!(std::mem::size_of::<ConvShape>() == 128);
const _: () = assert!(std::mem::size_of::<ConvParams>() == 176);
const _: () = assert!(std::mem::size_of::<BiasGradParams>() == 48);

fn conv_shape(g: &ConvGeometry) -> ConvShape {
    ConvShape {
        batch: g.batch as i64,
        in_channels: g.in_channels as i64,
        in_h: g.in_size[0] as i64,
        in_w: g.in_size[1] as i64,
        out_channels: g.out_channels as i64,
        out_h: g.out_size[0] as i64,
        out_w: g.out_size[1] as i64,
        kernel_h: g.kernel[0] as i64,
        kernel_w: g.kernel[1] as i64,
        stride_h: g.stride[0] as i64,
        stride_w: g.stride[1] as i64,
        pad_h: g.padding[0] as i64,
        pad_w: g.padding[1] as i64,
        dilation_h: g.dilation[0] as i64,
        dilation_w: g.dilation[1] as i64,
        groups: g.groups as i64,
    }
}

/// The device pointer of an optional operand, 0 (null in C) for none.
fn ptr_or_null(storage: Option<&CudaStorage>) -> u64 {
    storage.map_or(0, CudaStorage::ptr)
}

/// The formats of a convolution's operands: image/grid, weight, and the
/// optional bias must share one (f32, bf16 or f16).
fn operands_format(
    op: &'static str,
    data: &CudaStorage,
    weight: &CudaStorage,
    bias: Option<&CudaStorage>,
) -> Result<u32> {
    let mut operands = vec![data, weight];
    operands.extend(bias);
    float_format(op, &operands)
}

/// y = conv2d(image, W) + b: the output grid [N, out_channels, out_size].
/// 16-bit operands run the tensor-core kernel unless `Direct` is asked for;
/// f32 operands asked for the tensor-core kernel run the implicit GEMM.
pub(crate) fn conv2d_forward(
    kernel: Conv2dForwardKernel,
    g: &ConvGeometry,
    image: &CudaStorage,
    weight: &CudaStorage,
    bias: Option<&CudaStorage>,
) -> Result<CudaStorage> {
    let op = "conv2d";
    let format = operands_format(op, image, weight, bias)?;
    let len = g.output_shape().numel();
    let out = CudaStorage::alloc(image.device(), image.dtype(), len)?;
    let params = ConvParams {
        image: image.ptr(),
        weight: weight.ptr(),
        grid: 0,
        bias: ptr_or_null(bias),
        out: out.ptr(),
        geometry: conv_shape(g),
        format,
        pad: 0,
    };
    let device = image.device();
    let (name, threads) = match (kernel, format == FORMAT_F32) {
        (Conv2dForwardKernel::Direct, _) => {
            device.launch(FILE, "conv2d_forward_direct", launch_1d(len), params)?;
            return Ok(out);
        }
        (_, true) => ("conv2d_forward_implicit_gemm", IMPLICIT_GEMM_THREADS),
        (_, false) => {
            device.require_tensor_cores(op)?;
            ("conv2d_forward_tensor_core", TENSOR_CORE_THREADS)
        }
    };
    // The tiled kernels index the reduction dim (channel, tap) with 32-bit ints.
    if g.col_rows() > i32::MAX as usize {
        return Err(Error::invalid(
            op,
            format!(
                "in_channels/groups·kh·kw = {} exceeds the CUDA kernel's 32-bit reduction index",
                g.col_rows()
            ),
        ));
    }
    // One grid layer per group (blockIdx.z): each tile multiplies one
    // group's columns by that group's block of weight rows.
    let [tile_m, tile_n] = IMPLICIT_GEMM_TILE;
    let position_tiles = (g.batch * g.out_positions()).div_ceil(tile_m);
    let channel_tiles = g.out_channels_per_group().div_ceil(tile_n);
    let (Ok(grid_x), Ok(grid_y)) = (u32::try_from(position_tiles), u16::try_from(channel_tiles))
    else {
        return Err(Error::invalid(
            op,
            format!(
                "output {} is too large for one implicit-GEMM launch",
                g.output_shape()
            ),
        ));
    };
    let config = LaunchConfig {
        grid_dim: (
            grid_x,
            u32::from(grid_y),
            g.groups.min(MAX_GROUP_BLOCKS) as u32,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    device.launch(FILE, name, config, params)?;
    Ok(out)
}

/// dx = conv2d's adjoint applied to `grid`, plus b: the input image
/// [N, in_channels, in_size]. conv2d's dL/dx and conv_transpose2d's forward.
pub(crate) fn conv2d_backward_data(
    g: &ConvGeometry,
    grid: &CudaStorage,
    weight: &CudaStorage,
    bias: Option<&CudaStorage>,
) -> Result<CudaStorage> {
    let format = operands_format("conv2d_backward_data", grid, weight, bias)?;
    let len = g.input_shape().numel();
    let out = CudaStorage::alloc(grid.device(), grid.dtype(), len)?;
    let params = ConvParams {
        image: 0,
        weight: weight.ptr(),
        grid: grid.ptr(),
        bias: ptr_or_null(bias),
        out: out.ptr(),
        geometry: conv_shape(g),
        format,
        pad: 0,
    };
    grid.device()
        .launch(FILE, "conv2d_backward_data", launch_1d(len), params)?;
    Ok(out)
}

/// dW = Σ_{n, positions} grid · image at each tap: [out_channels, in_channels/groups, kh, kw].
pub(crate) fn conv2d_backward_weight(
    g: &ConvGeometry,
    image: &CudaStorage,
    grid: &CudaStorage,
) -> Result<CudaStorage> {
    let format = float_format("conv2d_backward_weight", &[image, grid])?;
    let len = g.weight_shape().numel();
    let out = CudaStorage::alloc(image.device(), image.dtype(), len)?;
    let params = ConvParams {
        image: image.ptr(),
        weight: 0,
        grid: grid.ptr(),
        bias: 0,
        out: out.ptr(),
        geometry: conv_shape(g),
        format,
        pad: 0,
    };
    let config = reduction_launch(len, g.batch * g.out_positions());
    image
        .device()
        .launch(FILE, "conv2d_backward_weight", config, params)?;
    Ok(out)
}

/// dL/db[c] = Σ over batch and pixels of grad [batch, channels, pixels].
pub(crate) fn bias_grad(
    grad: &CudaStorage,
    batch: usize,
    channels: usize,
    pixels: usize,
) -> Result<CudaStorage> {
    let format = float_format("conv_bias_grad", &[grad])?;
    let out = CudaStorage::alloc(grad.device(), grad.dtype(), channels)?;
    let params = BiasGradParams {
        grad: grad.ptr(),
        out: out.ptr(),
        batch: batch as i64,
        channels: channels as i64,
        pixels: pixels as i64,
        format,
        pad: 0,
    };
    let config = reduction_launch(channels, batch * pixels);
    grad.device().launch(FILE, "bias_grad", config, params)?;
    Ok(out)
}

/// One block per reduced value (block-stride beyond the cap), with no more
/// threads than the reduction has terms, rounded up to whole warps.
fn reduction_launch(values: usize, terms: usize) -> LaunchConfig {
    let threads = terms.next_multiple_of(32).clamp(32, REDUCTION_THREADS);
    LaunchConfig {
        grid_dim: (values.min(MAX_REDUCTION_BLOCKS) as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}
