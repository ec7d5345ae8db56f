//! Launch glue for kernels/dropout.cu.

use crate::cuda::{CudaStorage, float_format, launch_1d};
use crate::error::Result;
use crate::kernel_params;

use super::cpu::{keep_threshold, stream_key};

kernel_params! {
    pub struct DropoutParams {
        x: u64,
        out: u64,
        n: i64,
        key: u64,
        threshold: u64,
        scale: f32,
        format: u32,
    }
}

// The .cu file static_asserts the same size.
const _: () = assert!(std::mem::size_of::<DropoutParams>() == 48);

/// out[i] = x[i] / (1 − p) where element i is kept, else 0: the CPU's mask,
/// from the same host-computed key and integer threshold. Also the backward
/// (applied to dL/dy).
pub(crate) fn dropout(op: &'static str, x: &CudaStorage, p: f64, seed: u64) -> Result<CudaStorage> {
    let format = float_format(op, &[x])?;
    let out = CudaStorage::alloc(x.device(), x.dtype(), x.len())?;
    let params = DropoutParams {
        x: x.ptr(),
        out: out.ptr(),
        n: x.len() as i64,
        key: stream_key(seed),
        threshold: keep_threshold(p),
        // Rounded to f32 exactly as the CPU kernel's T::from_f64(1 / (1 − p)).
        scale: (1.0 / (1.0 - p)) as f32,
        format,
    };
    x.device()
        .launch("dropout.cu", "dropout_apply", launch_1d(x.len()), params)?;
    Ok(out)
}
