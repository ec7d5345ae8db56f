//! Launch glue for kernels/embedding.cu. Forward kernels copy 32-bit words
//! (f32 values or u32 indices); the scatter-add backwards sum f32 gradients.

use crate::cuda::{CudaStorage, launch_1d, require_f32};
use crate::error::Result;
use crate::kernel_params;
use crate::ops::elementwise::cuda::Strides6;
use crate::ops::shape::cuda::{MAX_DIMS, require_32bit, require_rank};
use crate::storage::CpuStorage;
use crate::tensor::{DType, Shape};

kernel_params! {
    pub struct IndexCheckParams {
        indices: u64,
        error_flag: u64,
        n: i64,
        bound: i64,
    }
}

kernel_params! {
    pub struct IndexSelectParams {
        src: u64,
        indices: u64,
        out: u64,
        outer: i64,
        dim_size: i64,
        inner: i64,
        picked: i64,
    }
}

kernel_params! {
    pub struct IndexAddParams {
        dy: u64,
        indices: u64,
        dx: u64,
        outer: i64,
        dim_size: i64,
        inner: i64,
        picked: i64,
        skipped_index: i64,
    }
}

kernel_params! {
    pub struct GatherParams {
        src: u64,
        index: u64,
        out: u64,
        n: i64,
        dim: i64,
        layout: Strides6,
    }
}

kernel_params! {
    pub struct ScatterAddParams {
        dy: u64,
        index: u64,
        dx: u64,
        n: i64,
        dim: i64,
        layout: Strides6,
    }
}

// The .cu file static_asserts the same sizes.
const _: () = assert!(std::mem::size_of::<IndexCheckParams>() == 32);
const _: () = assert!(std::mem::size_of::<IndexSelectParams>() == 56);
const _: () = assert!(std::mem::size_of::<IndexAddParams>() == 64);
const _: () = assert!(std::mem::size_of::<GatherParams>() == 136);
const _: () = assert!(std::mem::size_of::<ScatterAddParams>() == 136);

/// True if some index is ≥ `bound`. A kernel sets a one-word device flag and
/// only that word comes back to the host (the ids stay on the device; the
/// caller copies them only to word the error once a bad one is known to exist).
pub(crate) fn any_index_out_of_range(indices: &CudaStorage, bound: usize) -> Result<bool> {
    debug_assert_eq!(indices.dtype(), DType::U32);
    let flag = CudaStorage::zeros(indices.device(), DType::U32, 1)?;
    let params = IndexCheckParams {
        indices: indices.ptr(),
        error_flag: flag.ptr(),
        n: indices.len() as i64,
        bound: bound as i64,
    };
    indices.device().launch(
        "embedding.cu",
        "check_index_range",
        launch_1d(indices.len()),
        params,
    )?;
    Ok(matches!(flag.to_cpu()?, CpuStorage::U32(v) if v[0] != 0))
}

/// out[o, j, i] = src[o, indices[j], i]; every index already checked < dim_size.
pub(crate) fn index_select(
    src: &CudaStorage,
    indices: &CudaStorage,
    outer: usize,
    dim_size: usize,
    inner: usize,
) -> Result<CudaStorage> {
    require_32bit("index_select", &[src])?;
    let picked = indices.len();
    let n = outer * picked * inner;
    let out = CudaStorage::alloc(src.device(), src.dtype(), n)?;
    let params = IndexSelectParams {
        src: src.ptr(),
        indices: indices.ptr(),
        out: out.ptr(),
        outer: outer as i64,
        dim_size: dim_size as i64,
        inner: inner as i64,
        picked: picked as i64,
    };
    src.device()
        .launch("embedding.cu", "index_select", launch_1d(n), params)?;
    Ok(out)
}

/// dx[o, indices[j], i] += dy[o, j, i] into zeros of `(outer, dim_size,
/// inner)`, for every j with indices[j] ≠ `skipped` (embedding's padding_idx).
pub(crate) fn index_add(
    op: &'static str,
    dy: &CudaStorage,
    indices: &CudaStorage,
    (outer, dim_size, inner): (usize, usize, usize),
    skipped: Option<u32>,
) -> Result<CudaStorage> {
    require_f32(op, &[dy])?;
    let picked = indices.len();
    let dx = CudaStorage::zeros(dy.device(), DType::F32, outer * dim_size * inner)?;
    let n = outer * picked * inner;
    let params = IndexAddParams {
        dy: dy.ptr(),
        indices: indices.ptr(),
        dx: dx.ptr(),
        outer: outer as i64,
        dim_size: dim_size as i64,
        inner: inner as i64,
        picked: picked as i64,
        // No u32 index equals −1.
        skipped_index: skipped.map_or(-1, i64::from),
    };
    dy.device()
        .launch("embedding.cu", "index_add", launch_1d(n), params)?;
    Ok(dx)
}

/// The index's dims and the source's strides, padded in front to 6 dims, and
/// `dim` in that padded numbering.
fn gather_layout(src_shape: &Shape, index_shape: &Shape, dim: usize) -> (Strides6, i64) {
    let mut layout = Strides6 {
        dims: [1; MAX_DIMS],
        strides: [0; MAX_DIMS],
    };
    let pad = MAX_DIMS - index_shape.rank();
    for (d, (&size, &stride)) in index_shape
        .dims()
        .iter()
        .zip(&src_shape.strides())
        .enumerate()
    {
        layout.dims[pad + d] = size as i64;
        layout.strides[pad + d] = stride as i64;
    }
    (layout, (pad + dim) as i64)
}

/// PyTorch's gather: out[k] = src[k's coordinates with index[k] along dim].
pub(crate) fn gather(
    src: &CudaStorage,
    src_shape: &Shape,
    index: &CudaStorage,
    index_shape: &Shape,
    dim: usize,
) -> Result<CudaStorage> {
    require_32bit("gather", &[src])?;
    require_rank("gather", src_shape)?;
    let (layout, padded_dim) = gather_layout(src_shape, index_shape, dim);
    let n = index.len();
    let out = CudaStorage::alloc(src.device(), src.dtype(), n)?;
    let params = GatherParams {
        src: src.ptr(),
        index: index.ptr(),
        out: out.ptr(),
        n: n as i64,
        dim: padded_dim,
        layout,
    };
    src.device()
        .launch("embedding.cu", "gather", launch_1d(n), params)?;
    Ok(out)
}

/// The backward of gather: dx[source(k)] += dy[k] into zeros of `src_shape`.
pub(crate) fn scatter_add(
    dy: &CudaStorage,
    index: &CudaStorage,
    src_shape: &Shape,
    index_shape: &Shape,
    dim: usize,
) -> Result<CudaStorage> {
    require_f32("gather", &[dy])?;
    require_rank("gather", src_shape)?;
    let (layout, padded_dim) = gather_layout(src_shape, index_shape, dim);
    let dx = CudaStorage::zeros(dy.device(), DType::F32, src_shape.numel())?;
    let n = index.len();
    let params = ScatterAddParams {
        dy: dy.ptr(),
        index: index.ptr(),
        dx: dx.ptr(),
        n: n as i64,
        dim: padded_dim,
        layout,
    };
    dy.device()
        .launch("embedding.cu", "scatter_add", launch_1d(n), params)?;
    Ok(dx)
}
