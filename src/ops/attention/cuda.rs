//! Launch glue for kernels/attention.cu: the straightforward kernels (the
//! full probability matrix P is kept for the backward); see the file's
//! header for the fused flash-style rung that would come next. q, k, v, O
//! and their gradients are f32, bf16 or f16; P and dS are f32.

use crate::cuda::{CudaStorage, float_format, launch_1d, require_f32};
use crate::error::Result;
use crate::kernel_params;
use crate::ops::softmax::cuda::row_launch;
use crate::tensor::DType;

use super::OP;
use super::cpu::AttentionDims;

const FILE: &str = "attention.cu";

kernel_params! {
    pub struct AttentionParams {
        q: u64,
        k: u64,
        v: u64,
        probs: u64,
        out: u64,
        d_out: u64,
        d_scores: u64,
        dq: u64,
        dk: u64,
        dv: u64,
        heads: i64,
        seq: i64,
        head_dim: i64,
        scale: f32,
        format: u32,
    }
}

// kernels/attention.cu static_asserts the same size.
const _: () = assert!(std::mem::size_of::<AttentionParams>() == 112);

impl AttentionParams {
    /// Sizes, scale and format of `d`, every pointer null.
    fn sized(d: AttentionDims, format: u32) -> Self {
        AttentionParams {
            q: 0,
            k: 0,
            v: 0,
            probs: 0,
            out: 0,
            d_out: 0,
            d_scores: 0,
            dq: 0,
            dk: 0,
            dv: 0,
            heads: d.heads as i64,
            seq: d.seq as i64,
            head_dim: d.head_dim as i64,
            scale: d.scale() as f32,
            format,
        }
    }
}

/// O [heads, T, D] and P [heads, T, T] (zero above the diagonal).
pub(crate) fn attention_forward(
    q: &CudaStorage,
    k: &CudaStorage,
    v: &CudaStorage,
    d: AttentionDims,
) -> Result<(CudaStorage, CudaStorage)> {
    let format = float_format(OP, &[q, k, v])?;
    let device = q.device();
    let rows = d.heads * d.seq;
    let out = CudaStorage::alloc(device, q.dtype(), rows * d.head_dim)?;
    let probs = CudaStorage::alloc(device, DType::F32, rows * d.seq)?;
    let params = AttentionParams {
        q: q.ptr(),
        k: k.ptr(),
        v: v.ptr(),
        probs: probs.ptr(),
        out: out.ptr(),
        ..AttentionParams::sized(d, format)
    };
    // Each row's probabilities: one block per query row (a row has T values).
    device.launch(FILE, "attention_probs", row_launch(rows, d.seq), params)?;
    device.launch(
        FILE,
        "attention_output",
        launch_1d(rows * d.head_dim),
        params,
    )?;
    Ok((out, probs))
}

/// Gradients (dq, dk, dv) from the saved P and dL/dO.
pub(crate) fn attention_backward(
    q: &CudaStorage,
    k: &CudaStorage,
    v: &CudaStorage,
    probs: &CudaStorage,
    d_out: &CudaStorage,
    d: AttentionDims,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    let format = float_format(OP, &[q, k, v, d_out])?;
    require_f32(OP, &[probs])?;
    let device = q.device();
    let rows = d.heads * d.seq;
    let len = rows * d.head_dim;
    let dq = CudaStorage::alloc(device, q.dtype(), len)?;
    let dk = CudaStorage::alloc(device, q.dtype(), len)?;
    let dv = CudaStorage::alloc(device, q.dtype(), len)?;
    // dS scratch; freed on return, which is safe because every later kernel
    // that could reuse the block runs after these on the same stream.
    let d_scores = CudaStorage::alloc(device, DType::F32, rows * d.seq)?;
    let params = AttentionParams {
        q: q.ptr(),
        k: k.ptr(),
        v: v.ptr(),
        probs: probs.ptr(),
        d_out: d_out.ptr(),
        d_scores: d_scores.ptr(),
        dq: dq.ptr(),
        dk: dk.ptr(),
        dv: dv.ptr(),
        ..AttentionParams::sized(d, format)
    };
    device.launch(
        FILE,
        "attention_score_grads",
        row_launch(rows, d.seq),
        params,
    )?;
    device.launch(FILE, "attention_query_grads", launch_1d(len), params)?;
    device.launch(FILE, "attention_key_value_grads", launch_1d(len), params)?;
    Ok((dq, dk, dv))
}
