//! Launch glue for kernels/attention.cu: the straightforward kernels (the
//! full probability matrix P is kept for the backward); see the file's
//! header for the fused flash-style rung that would come next.

use crate::cuda::{CudaStorage, launch_1d, require_f32};
use crate::error::Result;
use crate::kernel_params;
use crate::ops::softmax::cuda::row_launch;

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
        pad: u32,
    }
}

// kernels/attention.cu static_asserts the same size.
const _: () = assert!(std::mem::size_of::<AttentionParams>() == 112);

impl AttentionParams {
    /// Sizes and scale of `d`, every pointer null.
    fn sized(d: AttentionDims) -> Self {
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
            pad: 0,
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
    require_f32(OP, &[q, k, v])?;
    let device = q.device();
    let rows = d.heads * d.seq;
    let out = CudaStorage::alloc(device, q.dtype(), rows * d.head_dim)?;
    let probs = CudaStorage::alloc(device, q.dtype(), rows * d.seq)?;
    let params = AttentionParams {
        q: q.ptr(),
        k: k.ptr(),
        v: v.ptr(),
        probs: probs.ptr(),
        out: out.ptr(),
        ..AttentionParams::sized(d)
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
    require_f32(OP, &[q, k, v, probs, d_out])?;
    let device = q.device();
    let rows = d.heads * d.seq;
    let len = rows * d.head_dim;
    let dq = CudaStorage::alloc(device, q.dtype(), len)?;
    let dk = CudaStorage::alloc(device, q.dtype(), len)?;
    let dv = CudaStorage::alloc(device, q.dtype(), len)?;
    // dS scratch; freed on return, which is safe because every later kernel
    // that could reuse the block runs after these on the same stream.
    let d_scores = CudaStorage::alloc(device, q.dtype(), rows * d.seq)?;
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
        ..AttentionParams::sized(d)
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
