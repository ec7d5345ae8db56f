//! Launch glue for kernels/softmax.cu, and the one-block-per-row launch shape
//! the row-wise kernels of the norm and attention families share.

use cudarc::driver::LaunchConfig;

use crate::cuda::{CudaStorage, require_f32};
use crate::error::Result;
use crate::kernel_params;

kernel_params! {
    pub struct SoftmaxParams {
        x: u64,
        dy: u64,
        out: u64,
        rows: i64,
        width: i64,
        log: u32,
        /// Forward softmax only: a row of all −∞ gives zeros, not NaN.
        masked_rows_to_zero: u32,
    }
}

// kernels/softmax.cu static_asserts the same size.
const _: () = assert!(std::mem::size_of::<SoftmaxParams>() == 48);

/// One block per row (blocks loop over rows past 65 535 · 8), with a block
/// of `width` rounded up to a whole number of warps, between 32 and 256
/// threads: block_sum needs whole warps, and short rows should not leave
/// most of a 256-thread block idle.
pub(crate) fn row_launch(rows: usize, width: usize) -> LaunchConfig {
    let threads = width.next_multiple_of(32).clamp(32, 256);
    LaunchConfig {
        grid_dim: (rows.min(65_535 * 8) as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rows of `width` values in a tensor of `len` elements (none when width is 0).
fn rows_of(len: usize, width: usize) -> usize {
    len.checked_div(width).unwrap_or(0)
}

/// Softmax (`log` false) or log-softmax (`log` true) of every row.
pub(crate) fn softmax_forward(x: &CudaStorage, width: usize, log: bool) -> Result<CudaStorage> {
    let op = if log { "log_softmax" } else { "softmax" };
    launch_forward(op, x, width, log, false)
}

/// Softmax of every row, except that a row of all −∞ (a query that an
/// attention mask lets see no key) gives zeros instead of NaN.
pub(crate) fn masked_softmax_forward(
    op: &'static str,
    x: &CudaStorage,
    width: usize,
) -> Result<CudaStorage> {
    launch_forward(op, x, width, false, true)
}

fn launch_forward(
    op: &'static str,
    x: &CudaStorage,
    width: usize,
    log: bool,
    masked_rows_to_zero: bool,
) -> Result<CudaStorage> {
    require_f32(op, &[x])?;
    let out = CudaStorage::alloc(x.device(), x.dtype(), x.len())?;
    let rows = rows_of(x.len(), width);
    let params = SoftmaxParams {
        x: x.ptr(),
        dy: 0,
        out: out.ptr(),
        rows: rows as i64,
        width: width as i64,
        log: u32::from(log),
        masked_rows_to_zero: u32::from(masked_rows_to_zero),
    };
    x.device().launch(
        "softmax.cu",
        "softmax_forward",
        row_launch(rows, width),
        params,
    )?;
    Ok(out)
}

/// dL/dx from the forward's output `y` and dL/dy.
pub(crate) fn softmax_backward(
    y: &CudaStorage,
    dy: &CudaStorage,
    width: usize,
    log: bool,
) -> Result<CudaStorage> {
    let op = if log { "log_softmax" } else { "softmax" };
    require_f32(op, &[y, dy])?;
    let dx = CudaStorage::alloc(y.device(), y.dtype(), y.len())?;
    let rows = rows_of(y.len(), width);
    let params = SoftmaxParams {
        x: y.ptr(),
        dy: dy.ptr(),
        out: dx.ptr(),
        rows: rows as i64,
        width: width as i64,
        log: u32::from(log),
        masked_rows_to_zero: 0,
    };
    y.device().launch(
        "softmax.cu",
        "softmax_backward",
        row_launch(rows, width),
        params,
    )?;
    Ok(dx)
}
