//! Launch glue for kernels/shape.cu. Shape kernels copy elements of 4 bytes
//! (f32 values, u32 indices) or 2 (bf16, f16) unchanged; f64 is refused
//! (CUDA computes in f32). `convert_dtype` is to_dtype between f32 and 16-bit.

use crate::cuda::{CudaStorage, launch_1d};
use crate::error::{Error, Result};
use crate::kernel_params;
use crate::ops::elementwise::cuda::Strides6;
use crate::tensor::{DType, Shape};

pub(crate) const MAX_DIMS: usize = 6;

kernel_params! {
    pub struct StridedGatherParams {
        src: u64,
        out: u64,
        n: i64,
        index: Strides6,
        elem_bytes: u32,
        pad: u32,
    }
}

kernel_params! {
    pub struct SliceCopyParams {
        src: u64,
        dst: u64,
        outer: i64,
        len: i64,
        inner: i64,
        src_dim: i64,
        src_start: i64,
        dst_dim: i64,
        dst_start: i64,
        elem_bytes: u32,
        pad: u32,
    }
}

kernel_params! {
    pub struct ConvertParams {
        src: u64,
        out: u64,
        n: i64,
        kind: u32,
        narrow: u32,
    }
}

// The .cu file static_asserts the same sizes.
const _: () = assert!(std::mem::size_of::<StridedGatherParams>() == 128);
const _: () = assert!(std::mem::size_of::<SliceCopyParams>() == 80);
const _: () = assert!(std::mem::size_of::<ConvertParams>() == 32);

/// `src` converted to `dtype` on its device (`convert_dtype`), for f32 to
/// bf16/f16 (rounding to nearest even, as the CPU) and back (exact); `None`
/// for any other pair, which the caller converts through the host.
pub(crate) fn convert(src: &CudaStorage, dtype: DType) -> Option<Result<CudaStorage>> {
    let (half, narrow) = match (src.dtype(), dtype) {
        (DType::F32, half) if half.is_half() => (half, true),
        (half, DType::F32) if half.is_half() => (half, false),
        _ => return None,
    };
    Some((|| {
        let out = CudaStorage::alloc(src.device(), dtype, src.len())?;
        if src.is_empty() {
            return Ok(out);
        }
        let params = ConvertParams {
            src: src.ptr(),
            out: out.ptr(),
            n: src.len() as i64,
            kind: crate::cuda::half_kind("to_dtype", half)?,
            narrow: u32::from(narrow),
        };
        src.device()
            .launch("shape.cu", "convert_dtype", launch_1d(src.len()), params)?;
        Ok(out)
    })())
}

/// The element size shape kernels copy for `storages` (one dtype): 4 bytes
/// for f32 and u32, 2 for bf16 and f16; f64 is refused.
pub(crate) fn element_bytes(op: &'static str, storages: &[&CudaStorage]) -> Result<u32> {
    let dtype = storages[0].dtype();
    if let Some(other) = storages.iter().find(|s| s.dtype() != dtype) {
        return Err(Error::dtype_mismatch(op, dtype, other.dtype()));
    }
    match dtype {
        DType::F32 | DType::U32 | DType::F16 | DType::BF16 => Ok(dtype.size_in_bytes() as u32),
        DType::F64 => Err(Error::DType {
            op,
            msg: "CUDA tensors hold f32, bf16 or f16 values or u32 indices, got f64; \
                  convert with .to_dtype(DType::F32)"
                .into(),
        }),
    }
}

/// For kernels that move 4-byte words only (the embedding gathers): f32 and u32.
pub(crate) fn require_32bit(op: &'static str, storages: &[&CudaStorage]) -> Result<()> {
    match element_bytes(op, storages)? {
        4 => Ok(()),
        _ => Err(Error::DType {
            op,
            msg: format!(
                "this CUDA kernel takes f32 values or u32 indices, got {}; convert with .to_dtype(DType::F32)",
                storages[0].dtype()
            ),
        }),
    }
}

pub(crate) fn require_rank(op: &'static str, shape: &Shape) -> Result<()> {
    if shape.rank() > MAX_DIMS {
        return Err(Error::shape(
            op,
            format!("CUDA {op} supports rank <= {MAX_DIMS}, got {shape}"),
        ));
    }
    Ok(())
}

/// `out_dims` and `walk` with size-1 dims dropped and each pair of
/// neighbouring dims merged where the source is walked across them as one
/// (outer stride = inner stride · inner size; a broadcast run, stride 0
/// throughout, included): the same gather in as few dims as it takes.
fn coalesced(out_dims: &[usize], walk: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let (mut dims, mut strides): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    for (&size, &stride) in out_dims.iter().zip(walk) {
        if size == 1 {
            continue;
        }
        match (dims.last_mut(), strides.last_mut()) {
            (Some(outer), Some(outer_stride)) if *outer_stride == stride * size => {
                *outer *= size;
                *outer_stride = stride;
            }
            _ => {
                dims.push(size);
                strides.push(stride);
            }
        }
    }
    (dims, strides)
}

/// out[i] = src[Σ_d coord_d(i) · walk[d]] over an output of `out_dims`;
/// any rank whose dims coalesce to at most MAX_DIMS.
fn strided_gather(
    op: &'static str,
    src: &CudaStorage,
    out_dims: &[usize],
    walk: &[usize],
) -> Result<CudaStorage> {
    let (merged_dims, merged_walk) = coalesced(out_dims, walk);
    if merged_dims.len() > MAX_DIMS {
        return Err(Error::shape(
            op,
            format!(
                "CUDA {op} supports rank <= {MAX_DIMS} (after merging dims it copies as one), got {}",
                Shape::new(out_dims)
            ),
        ));
    }
    let (out_dims, walk) = (&merged_dims, &merged_walk);
    let elem_bytes = element_bytes(op, &[src])?;
    let mut index = Strides6 {
        dims: [1; MAX_DIMS],
        strides: [0; MAX_DIMS],
    };
    let pad = MAX_DIMS - out_dims.len();
    for (d, (&size, &stride)) in out_dims.iter().zip(walk).enumerate() {
        index.dims[pad + d] = size as i64;
        index.strides[pad + d] = stride as i64;
    }
    let n: usize = out_dims.iter().product();
    let out = CudaStorage::alloc(src.device(), src.dtype(), n)?;
    let params = StridedGatherParams {
        src: src.ptr(),
        out: out.ptr(),
        n: n as i64,
        index,
        elem_bytes,
        pad: 0,
    };
    src.device()
        .launch("shape.cu", "strided_gather", launch_1d(n), params)?;
    Ok(out)
}

/// Output dim d is source dim perm[d] (a copy).
pub(crate) fn permute(src: &CudaStorage, src_shape: &Shape, perm: &[usize]) -> Result<CudaStorage> {
    let src_strides = src_shape.strides();
    let out_dims: Vec<usize> = perm.iter().map(|&p| src_shape.dims()[p]).collect();
    // Stride in the source for a step along each output dim.
    let walk: Vec<usize> = perm.iter().map(|&p| src_strides[p]).collect();
    strided_gather("permute", src, &out_dims, &walk)
}

/// Repeats size-1 (and missing leading) dims of `src_shape` to `out_shape`.
pub(crate) fn broadcast(
    src: &CudaStorage,
    src_shape: &Shape,
    out_shape: &Shape,
) -> Result<CudaStorage> {
    let pad = out_shape.rank() - src_shape.rank();
    let src_strides = src_shape.strides();
    // A broadcast dim is walked with stride 0.
    let walk: Vec<usize> = (0..out_shape.rank())
        .map(|d| {
            if d < pad || src_shape.dims()[d - pad] == 1 {
                0
            } else {
                src_strides[d - pad]
            }
        })
        .collect();
    strided_gather("broadcast_to", src, out_shape.dims(), &walk)
}

/// Entries `start..start + len` of the middle dim of [outer, dim, inner].
pub(crate) fn narrow(
    src: &CudaStorage,
    outer: usize,
    dim: usize,
    inner: usize,
    start: usize,
    len: usize,
) -> Result<CudaStorage> {
    let elem_bytes = element_bytes("narrow", &[src])?;
    let n = outer * len * inner;
    let out = CudaStorage::alloc(src.device(), src.dtype(), n)?;
    let params = SliceCopyParams {
        src: src.ptr(),
        dst: out.ptr(),
        outer: outer as i64,
        len: len as i64,
        inner: inner as i64,
        src_dim: dim as i64,
        src_start: start as i64,
        dst_dim: len as i64,
        dst_start: 0,
        elem_bytes,
        pad: 0,
    };
    src.device()
        .launch("shape.cu", "slice_copy", launch_1d(n), params)?;
    Ok(out)
}

/// Concatenation along the middle dim of parts viewed as [outer, size_i, inner]:
/// one launch per part, each writing its slab of the output.
pub(crate) fn cat(
    parts: &[(&CudaStorage, usize)],
    outer: usize,
    inner: usize,
) -> Result<CudaStorage> {
    let storages: Vec<&CudaStorage> = parts.iter().map(|(s, _)| *s).collect();
    let elem_bytes = element_bytes("cat", &storages)?;
    let first = storages[0];
    let total: usize = parts.iter().map(|(_, size)| size).sum();
    let out = CudaStorage::alloc(first.device(), first.dtype(), outer * total * inner)?;
    let mut offset = 0;
    for &(part, size) in parts {
        let n = outer * size * inner;
        let params = SliceCopyParams {
            src: part.ptr(),
            dst: out.ptr(),
            outer: outer as i64,
            len: size as i64,
            inner: inner as i64,
            src_dim: size as i64,
            src_start: 0,
            dst_dim: total as i64,
            dst_start: offset as i64,
            elem_bytes,
            pad: 0,
        };
        first
            .device()
            .launch("shape.cu", "slice_copy", launch_1d(n), params)?;
        offset += size;
    }
    Ok(out)
}
