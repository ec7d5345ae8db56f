//! Launch glue for kernels/elementwise.cu and kernels/activation.cu: every
//! kernel takes f32, bf16 or f16 data (one format per launch).

use crate::cuda::{CudaStorage, float_format, launch_1d};
use crate::error::Result;
use crate::kernel_params;
use crate::tensor::Shape;

use super::BinaryOp;

const MAX_DIMS: usize = 6;

kernel_params! {
    /// Output dims (leading dims padded with 1) and an input's strides, 0 on broadcast dims.
    pub struct Strides6 {
        dims: [i64; MAX_DIMS],
        strides: [i64; MAX_DIMS],
    }
}

kernel_params! {
    pub struct BinaryParams {
        a: u64,
        b: u64,
        out: u64,
        n: i64,
        op: u32,
        same_shape: u32,
        a_index: Strides6,
        b_index: Strides6,
        format: u32,
        pad: u32,
    }
}

kernel_params! {
    pub struct PointwiseParams {
        x: u64,
        dy: u64,
        out: u64,
        n: i64,
        op: u32,
        a: f32,
        b: f32,
        format: u32,
    }
}

// The .cu files static_assert the same sizes, so a field added on one side only fails to compile.
const _: () = assert!(std::mem::size_of::<BinaryParams>() == 240);
const _: () = assert!(std::mem::size_of::<PointwiseParams>() == 48);

/// Which kernel file and op code evaluate a pointwise function on CUDA.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CudaPointwise {
    pub file: &'static str,
    pub forward: &'static str,
    pub backward: &'static str,
    pub op: u32,
    pub a: f32,
    pub b: f32,
}

/// The broadcast index of `input` inside `out` (both rank ≤ 6).
pub(crate) fn strides6(input: &Shape, out: &Shape) -> Strides6 {
    let mut index = Strides6 {
        dims: [1; MAX_DIMS],
        strides: [0; MAX_DIMS],
    };
    let pad_out = MAX_DIMS - out.rank();
    let pad_in = out.rank() - input.rank();
    let input_strides = input.strides();
    for d in 0..out.rank() {
        index.dims[pad_out + d] = out.dims()[d] as i64;
        if d >= pad_in && input.dims()[d - pad_in] != 1 {
            index.strides[pad_out + d] = input_strides[d - pad_in] as i64;
        }
    }
    index
}

pub(crate) fn binary(
    op: BinaryOp,
    a: &CudaStorage,
    a_shape: &Shape,
    b: &CudaStorage,
    b_shape: &Shape,
    out_shape: &Shape,
) -> Result<CudaStorage> {
    let format = float_format(op.name(), &[a, b])?;
    if out_shape.rank() > MAX_DIMS {
        return Err(crate::Error::shape(
            op.name(),
            format!("CUDA broadcasting supports rank <= {MAX_DIMS}, got {out_shape}"),
        ));
    }
    let n = out_shape.numel();
    let out = CudaStorage::alloc(a.device(), a.dtype(), n)?;
    let params = BinaryParams {
        a: a.ptr(),
        b: b.ptr(),
        out: out.ptr(),
        n: n as i64,
        op: op as u32,
        same_shape: u32::from(a_shape == out_shape && b_shape == out_shape),
        a_index: strides6(a_shape, out_shape),
        b_index: strides6(b_shape, out_shape),
        format,
        pad: 0,
    };
    a.device()
        .launch("elementwise.cu", "binary_forward", launch_1d(n), params)?;
    Ok(out)
}

/// y = f(x).
pub(crate) fn pointwise_forward(kernel: CudaPointwise, x: &CudaStorage) -> Result<CudaStorage> {
    let format = float_format(kernel.forward, &[x])?;
    let out = CudaStorage::alloc(x.device(), x.dtype(), x.len())?;
    let params = PointwiseParams {
        x: x.ptr(),
        dy: 0,
        out: out.ptr(),
        n: x.len() as i64,
        op: kernel.op,
        a: kernel.a,
        b: kernel.b,
        format,
    };
    x.device()
        .launch(kernel.file, kernel.forward, launch_1d(x.len()), params)?;
    Ok(out)
}

/// dx = dy · f'(x).
pub(crate) fn pointwise_backward(
    kernel: CudaPointwise,
    x: &CudaStorage,
    dy: &CudaStorage,
) -> Result<CudaStorage> {
    let format = float_format(kernel.backward, &[x, dy])?;
    let out = CudaStorage::alloc(x.device(), x.dtype(), x.len())?;
    let params = PointwiseParams {
        x: x.ptr(),
        dy: dy.ptr(),
        out: out.ptr(),
        n: x.len() as i64,
        op: kernel.op,
        a: kernel.a,
        b: kernel.b,
        format,
    };
    x.device()
        .launch(kernel.file, kernel.backward, launch_1d(x.len()), params)?;
    Ok(out)
}
