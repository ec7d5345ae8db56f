//! Launch glue for kernels/gemm.cu: one parameter struct shared by every
//! rung of the GEMM ladder, and each rung's tile size and block shape.

use cudarc::driver::LaunchConfig;

use crate::cuda::{CudaStorage, half_kind, require_f32};
use crate::error::{Error, Result};
use crate::kernel_params;

use super::GemmKernel;
use super::cpu::GemmDims;

kernel_params! {
    pub struct GemmParams {
        a: u64,
        b: u64,
        c: u64,
        batch: i64,
        m: i64,
        n: i64,
        k: i64,
        trans_a: u32,
        trans_b: u32,
    }
}

// kernels/gemm.cu static_asserts the same size, so a field added on one side only fails to compile.
const _: () = assert!(std::mem::size_of::<GemmParams>() == 64);

/// The hardware limit on gridDim.y and gridDim.z; the kernels stride past it.
const MAX_GRID_YZ: usize = 65_535;

impl GemmKernel {
    /// The kernel's name in kernels/gemm.cu.
    pub(crate) fn cuda_name(self) -> &'static str {
        match self {
            GemmKernel::V1Naive => "gemm_v1_naive",
            GemmKernel::V2SmemTiled => "gemm_v2_smem_tiled",
            GemmKernel::V3RegisterBlocked => "gemm_v3_register_blocked",
            GemmKernel::V4TensorCore => "gemm_v4_tensor_core",
        }
    }

    /// (rows, columns) of C computed by one block, and the block's threads.
    fn tile_and_block(self) -> ((usize, usize), (u32, u32)) {
        match self {
            GemmKernel::V1Naive => ((16, 16), (16, 16)),
            GemmKernel::V2SmemTiled => ((32, 32), (32, 32)),
            GemmKernel::V3RegisterBlocked => ((128, 128), (256, 1)),
            GemmKernel::V4TensorCore => ((64, 64), (128, 1)),
        }
    }
}

/// C[b] = op(A[b]) · op(B[b]) for every batch item, with the chosen kernel.
pub(crate) fn gemm(
    kernel: GemmKernel,
    dims: GemmDims,
    a: &CudaStorage,
    b: &CudaStorage,
) -> Result<CudaStorage> {
    if a.dtype().is_half() {
        return gemm_half(dims, a, b);
    }
    // v4 takes 16-bit operands only; an f32 product runs the rung below it.
    let kernel = match kernel {
        GemmKernel::V4TensorCore => GemmKernel::V3RegisterBlocked,
        other => other,
    };
    require_f32("matmul", &[a, b])?;
    assert!(
        a.len() >= dims.batch * dims.m * dims.k && b.len() >= dims.batch * dims.k * dims.n,
        "gemm operands are smaller than {dims:?}"
    );
    let c_len = dims.batch * dims.m * dims.n;
    if c_len == 0 {
        return CudaStorage::alloc(a.device(), a.dtype(), 0);
    }
    let c = CudaStorage::alloc(a.device(), a.dtype(), c_len)?;
    let config = launch_config(kernel, dims);
    let params = GemmParams::new(dims, a, b, &c);
    a.device()
        .launch("gemm.cu", kernel.cuda_name(), config, params)?;
    Ok(c)
}

impl GemmParams {
    fn new(dims: GemmDims, a: &CudaStorage, b: &CudaStorage, c: &CudaStorage) -> Self {
        GemmParams {
            a: a.ptr(),
            b: b.ptr(),
            c: c.ptr(),
            batch: dims.batch as i64,
            m: dims.m as i64,
            n: dims.n as i64,
            k: dims.k as i64,
            trans_a: u32::from(dims.trans_a),
            trans_b: u32::from(dims.trans_b),
        }
    }
}

/// The grid of `kernel` over C: x over column tiles, y over row tiles, z
/// over the batch (y and z capped; the kernels stride past the cap).
fn launch_config(kernel: GemmKernel, dims: GemmDims) -> LaunchConfig {
    let ((tile_rows, tile_cols), (block_x, block_y)) = kernel.tile_and_block();
    LaunchConfig {
        grid_dim: (
            dims.n.div_ceil(tile_cols) as u32,
            dims.m.div_ceil(tile_rows).min(MAX_GRID_YZ) as u32,
            dims.batch.min(MAX_GRID_YZ) as u32,
        ),
        block_dim: (block_x, block_y, 1),
        shared_mem_bytes: 0,
    }
}

kernel_params! {
    pub struct GemmHalfParams {
        /// The product, its pointers to 16-bit values of `kind`.
        gemm: GemmParams,
        kind: u32,
        pad: u32,
    }
}

const _: () = assert!(std::mem::size_of::<GemmHalfParams>() == 72);

/// C[b] = op(A[b]) · op(B[b]) for 16-bit operands of one format on tensor
/// cores (`gemm_v4_tensor_core`), accumulated in f32, C in their format.
fn gemm_half(dims: GemmDims, a: &CudaStorage, b: &CudaStorage) -> Result<CudaStorage> {
    let kind = half_kind("matmul", a.dtype())?;
    if b.dtype() != a.dtype() {
        return Err(Error::dtype_mismatch("matmul", a.dtype(), b.dtype()));
    }
    let device = a.device();
    device.require_tensor_cores("matmul")?;
    let c_len = dims.batch * dims.m * dims.n;
    let c = CudaStorage::alloc(device, a.dtype(), c_len)?;
    if c_len == 0 {
        return Ok(c);
    }
    let kernel = GemmKernel::V4TensorCore;
    let params = GemmHalfParams {
        gemm: GemmParams::new(dims, a, b, &c),
        kind,
        pad: 0,
    };
    device.launch(
        "gemm.cu",
        kernel.cuda_name(),
        launch_config(kernel, dims),
        params,
    )?;
    Ok(c)
}
