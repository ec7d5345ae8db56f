//! Launch glue for kernels/layernorm.cu.

use crate::cuda::{CudaStorage, launch_1d, require_f32};
use crate::error::Result;
use crate::kernel_params;
use crate::ops::softmax::cuda::row_launch;
use crate::storage::Storage;

use super::OP;

/// Rows per partial sum of dweight/dbias; LN_ROWS_PER_CHUNK in the .cu file.
const ROWS_PER_CHUNK: usize = 64;

kernel_params! {
    pub struct LayerNormParams {
        x: u64,
        weight: u64,
        bias: u64,
        out: u64,
        mean: u64,
        invstd: u64,
        rows: i64,
        width: i64,
        eps: f32,
        pad: u32,
    }
}

kernel_params! {
    pub struct LayerNormBackwardParams {
        x: u64,
        dy: u64,
        weight: u64,
        mean: u64,
        invstd: u64,
        dx: u64,
        partial_dweight: u64,
        partial_dbias: u64,
        dweight: u64,
        dbias: u64,
        rows: i64,
        width: i64,
        row_chunks: i64,
    }
}

// kernels/layernorm.cu static_asserts the same sizes.
const _: () = assert!(std::mem::size_of::<LayerNormParams>() == 72);
const _: () = assert!(std::mem::size_of::<LayerNormBackwardParams>() == 104);

/// The device address of an optional parameter; null tells the kernel it is absent.
pub(crate) fn ptr_or_null(storage: Option<&CudaStorage>) -> u64 {
    storage.map_or(0, CudaStorage::ptr)
}

/// The forward output and the per-row statistics the backward needs.
pub(crate) struct LayerNormForward {
    pub out: CudaStorage,
    pub mean: CudaStorage,
    pub invstd: CudaStorage,
}

/// y = (x − mean)·invstd·weight + bias for every row of `width` (> 0) values.
pub(crate) fn layer_norm_forward(
    x: &CudaStorage,
    width: usize,
    weight: Option<&CudaStorage>,
    bias: Option<&CudaStorage>,
    eps: f64,
) -> Result<LayerNormForward> {
    require_f32(OP, &[x])?;
    require_f32(OP, &weight.into_iter().chain(bias).collect::<Vec<_>>())?;
    let rows = x.len() / width;
    let device = x.device();
    let out = CudaStorage::alloc(device, x.dtype(), x.len())?;
    let mean = CudaStorage::alloc(device, x.dtype(), rows)?;
    let invstd = CudaStorage::alloc(device, x.dtype(), rows)?;
    let params = LayerNormParams {
        x: x.ptr(),
        weight: ptr_or_null(weight),
        bias: ptr_or_null(bias),
        out: out.ptr(),
        mean: mean.ptr(),
        invstd: invstd.ptr(),
        rows: rows as i64,
        width: width as i64,
        eps: eps as f32,
        pad: 0,
    };
    device.launch(
        "layernorm.cu",
        "layer_norm_forward",
        row_launch(rows, width),
        params,
    )?;
    Ok(LayerNormForward { out, mean, invstd })
}

/// Gradients with respect to x, weight and bias.
pub(crate) struct LayerNormGrads {
    pub dx: CudaStorage,
    pub dweight: CudaStorage,
    pub dbias: CudaStorage,
}

/// dx per row, then dweight/dbias as deterministic sums over rows (per-chunk
/// partials, then the partials of each column in order).
pub(crate) fn layer_norm_backward(
    x: &CudaStorage,
    dy: &CudaStorage,
    width: usize,
    mean: &CudaStorage,
    invstd: &CudaStorage,
    weight: Option<&CudaStorage>,
) -> Result<LayerNormGrads> {
    require_f32(OP, &[x, dy, mean, invstd])?;
    require_f32(OP, &weight.into_iter().collect::<Vec<_>>())?;
    let rows = x.len() / width;
    let row_chunks = rows.div_ceil(ROWS_PER_CHUNK);
    let device = x.device();
    let dx = CudaStorage::alloc(device, x.dtype(), x.len())?;
    let dweight = CudaStorage::alloc(device, x.dtype(), width)?;
    let dbias = CudaStorage::alloc(device, x.dtype(), width)?;
    // Scratch; all launches share one stream, so freeing it at the end of
    // this function cannot hand it to a later kernel before these finish.
    let partial_dweight = CudaStorage::alloc(device, x.dtype(), row_chunks * width)?;
    let partial_dbias = CudaStorage::alloc(device, x.dtype(), row_chunks * width)?;
    let params = LayerNormBackwardParams {
        x: x.ptr(),
        dy: dy.ptr(),
        weight: ptr_or_null(weight),
        mean: mean.ptr(),
        invstd: invstd.ptr(),
        dx: dx.ptr(),
        partial_dweight: partial_dweight.ptr(),
        partial_dbias: partial_dbias.ptr(),
        dweight: dweight.ptr(),
        dbias: dbias.ptr(),
        rows: rows as i64,
        width: width as i64,
        row_chunks: row_chunks as i64,
    };
    let file = "layernorm.cu";
    device.launch(
        file,
        "layer_norm_backward_dx",
        row_launch(rows, width),
        params,
    )?;
    device.launch(
        file,
        "layer_norm_backward_param_partials",
        launch_1d(row_chunks * width),
        params,
    )?;
    device.launch(
        file,
        "layer_norm_backward_param_sums",
        launch_1d(width),
        params,
    )?;
    Ok(LayerNormGrads { dx, dweight, dbias })
}

/// The device storage of an operand that check_operands put on a CUDA device.
pub(crate) fn expect_cuda(storage: &Storage) -> &CudaStorage {
    match storage {
        Storage::Cuda(s) => s,
        Storage::Cpu(_) => unreachable!("check_operands put every operand on one device"),
    }
}
