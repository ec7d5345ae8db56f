//! Launch glue for kernels/reduce.cu.

use cudarc::driver::LaunchConfig;

use crate::cuda::{CudaStorage, launch_1d, require_f32};
use crate::error::Result;
use crate::kernel_params;
use crate::tensor::DType;

kernel_params! {
    pub struct SumParams {
        x: u64,
        out: u64,
        outer: i64,
        n: i64,
        inner: i64,
        scale: f32,
        pad: u32,
    }
}

kernel_params! {
    pub struct MaxParams {
        x: u64,
        values: u64,
        indices: u64,
        outer: i64,
        n: i64,
        inner: i64,
    }
}

kernel_params! {
    pub struct MaxBackwardParams {
        dy: u64,
        argmax: u64,
        dx: u64,
        outer: i64,
        n: i64,
        inner: i64,
    }
}

// The .cu file static_asserts the same sizes.
const _: () = assert!(std::mem::size_of::<SumParams>() == 48);
const _: () = assert!(std::mem::size_of::<MaxParams>() == 48);
const _: () = assert!(std::mem::size_of::<MaxBackwardParams>() == 48);

/// Threads per block of `sum_rows_v2_block` (a multiple of 32, as block_sum needs).
const ROW_BLOCK: u32 = 256;

/// The two sum kernels of reduce.cu, both checked by the parity tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SumKernel {
    /// One thread per output walks the reduced dim (any inner).
    V1ThreadPerOutput,
    /// One block per row with a shuffle reduction (inner == 1 only).
    V2BlockPerRow,
}

impl SumKernel {
    /// v2 for row sums long enough to fill a block, v1 otherwise.
    pub(crate) fn pick(n: usize, inner: usize) -> Self {
        if inner == 1 && n >= ROW_BLOCK as usize {
            SumKernel::V2BlockPerRow
        } else {
            SumKernel::V1ThreadPerOutput
        }
    }
}

/// out[o, i] = scale · Σ_j x[o, j, i], with the kernel `SumKernel::pick` chooses.
pub(crate) fn sum(
    x: &CudaStorage,
    outer: usize,
    n: usize,
    inner: usize,
    scale: f32,
) -> Result<CudaStorage> {
    sum_with(SumKernel::pick(n, inner), x, outer, n, inner, scale)
}

/// `sum` with an explicit kernel (v2 requires inner == 1).
pub(crate) fn sum_with(
    kernel: SumKernel,
    x: &CudaStorage,
    outer: usize,
    n: usize,
    inner: usize,
    scale: f32,
) -> Result<CudaStorage> {
    require_f32("sum", &[x])?;
    assert_eq!(
        x.len(),
        outer * n * inner,
        "sum: storage does not fit [outer, n, inner]"
    );
    let out = CudaStorage::alloc(x.device(), DType::F32, outer * inner)?;
    let params = SumParams {
        x: x.ptr(),
        out: out.ptr(),
        outer: outer as i64,
        n: n as i64,
        inner: inner as i64,
        scale,
        pad: 0,
    };
    match kernel {
        SumKernel::V1ThreadPerOutput => x.device().launch(
            "reduce.cu",
            "sum_dim_v1_thread_per_output",
            launch_1d(outer * inner),
            params,
        )?,
        SumKernel::V2BlockPerRow => {
            assert_eq!(inner, 1, "sum_rows_v2_block reduces rows (inner == 1)");
            let config = LaunchConfig {
                grid_dim: (outer.clamp(1, 65_535 * 8) as u32, 1, 1),
                block_dim: (ROW_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            x.device()
                .launch("reduce.cu", "sum_rows_v2_block", config, params)?
        }
    }
    Ok(out)
}

/// Maximum over the middle dim and the u32 index of its first occurrence.
pub(crate) fn max(
    x: &CudaStorage,
    outer: usize,
    n: usize,
    inner: usize,
) -> Result<(CudaStorage, CudaStorage)> {
    require_f32("max", &[x])?;
    let values = CudaStorage::alloc(x.device(), DType::F32, outer * inner)?;
    let indices = CudaStorage::alloc(x.device(), DType::U32, outer * inner)?;
    let params = MaxParams {
        x: x.ptr(),
        values: values.ptr(),
        indices: indices.ptr(),
        outer: outer as i64,
        n: n as i64,
        inner: inner as i64,
    };
    x.device()
        .launch("reduce.cu", "max_dim", launch_1d(outer * inner), params)?;
    Ok((values, indices))
}

/// dx[o, argmax[o, i], i] = dy[o, i]; zero elsewhere.
pub(crate) fn max_backward(
    dy: &CudaStorage,
    argmax: &CudaStorage,
    outer: usize,
    n: usize,
    inner: usize,
) -> Result<CudaStorage> {
    require_f32("max_backward", &[dy])?;
    assert_eq!(argmax.dtype(), DType::U32, "max_backward: argmax is u32");
    let dx = CudaStorage::alloc(dy.device(), DType::F32, outer * n * inner)?;
    let params = MaxBackwardParams {
        dy: dy.ptr(),
        argmax: argmax.ptr(),
        dx: dx.ptr(),
        outer: outer as i64,
        n: n as i64,
        inner: inner as i64,
    };
    dy.device().launch(
        "reduce.cu",
        "max_backward",
        launch_1d(outer * n * inner),
        params,
    )?;
    Ok(dx)
}
