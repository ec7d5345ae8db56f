//! Launch glue for kernels/batchnorm.cu. x, y, dy and dx are f32, bf16 or
//! f16; statistics, parameters and their gradients are f32.

use crate::cuda::{CudaStorage, float_format, launch_1d, require_f32};
use crate::error::Result;
use crate::kernel_params;
use crate::ops::layernorm::cuda::ptr_or_null;
use crate::ops::softmax::cuda::row_launch;
use crate::tensor::DType;

use super::OP;
use super::cpu::BatchNormDims;

const FILE: &str = "batchnorm.cu";

kernel_params! {
    pub struct BatchNormStatsParams {
        x: u64,
        mean: u64,
        invstd: u64,
        unbiased_var: u64,
        batch: i64,
        channels: i64,
        spatial: i64,
        eps: f32,
        format: u32,
    }
}

kernel_params! {
    pub struct RunningStatParams {
        running: u64,
        batch_stat: u64,
        channels: i64,
        momentum: f32,
        pad: u32,
    }
}

kernel_params! {
    pub struct BatchNormEvalStatsParams {
        running_mean: u64,
        running_var: u64,
        mean: u64,
        invstd: u64,
        channels: i64,
        eps: f32,
        pad: u32,
    }
}

kernel_params! {
    pub struct BatchNormForwardParams {
        x: u64,
        weight: u64,
        bias: u64,
        mean: u64,
        invstd: u64,
        out: u64,
        n: i64,
        channels: i64,
        spatial: i64,
        format: u32,
        pad: u32,
    }
}

kernel_params! {
    pub struct BatchNormBackwardParams {
        x: u64,
        dy: u64,
        weight: u64,
        mean: u64,
        invstd: u64,
        dx: u64,
        dweight: u64,
        dbias: u64,
        batch: i64,
        channels: i64,
        spatial: i64,
        training: u32,
        format: u32,
    }
}

// kernels/batchnorm.cu static_asserts the same sizes.
const _: () = assert!(std::mem::size_of::<BatchNormStatsParams>() == 64);
const _: () = assert!(std::mem::size_of::<RunningStatParams>() == 32);
const _: () = assert!(std::mem::size_of::<BatchNormEvalStatsParams>() == 48);
const _: () = assert!(std::mem::size_of::<BatchNormForwardParams>() == 80);
const _: () = assert!(std::mem::size_of::<BatchNormBackwardParams>() == 96);

/// Per-channel statistics, each [C] on the device.
pub(crate) struct ChannelStats {
    pub mean: CudaStorage,
    /// 1/√(biased var + eps), what the forward normalises with.
    pub invstd: CudaStorage,
    /// var·m/(m − 1), what the running variance is blended with.
    pub unbiased_var: CudaStorage,
}

/// One block per channel: mean, invstd and unbiased variance of the batch.
pub(crate) fn channel_stats(x: &CudaStorage, d: BatchNormDims, eps: f64) -> Result<ChannelStats> {
    let format = float_format(OP, &[x])?;
    let device = x.device();
    let stats = ChannelStats {
        mean: CudaStorage::alloc(device, DType::F32, d.channels)?,
        invstd: CudaStorage::alloc(device, DType::F32, d.channels)?,
        unbiased_var: CudaStorage::alloc(device, DType::F32, d.channels)?,
    };
    let params = BatchNormStatsParams {
        x: x.ptr(),
        mean: stats.mean.ptr(),
        invstd: stats.invstd.ptr(),
        unbiased_var: stats.unbiased_var.ptr(),
        batch: d.batch as i64,
        channels: d.channels as i64,
        spatial: d.spatial as i64,
        eps: eps as f32,
        format,
    };
    device.launch(
        FILE,
        "batch_norm_channel_stats",
        row_launch(d.channels, d.per_channel()),
        params,
    )?;
    Ok(stats)
}

/// running ← (1 − momentum)·running + momentum·batch_stat, in place on the
/// device (`&mut`: the caller holds the running tensor's write lock).
pub(crate) fn update_running_stat(
    running: &mut CudaStorage,
    batch_stat: &CudaStorage,
    momentum: f64,
) -> Result<()> {
    require_f32(OP, &[running, batch_stat])?;
    let params = RunningStatParams {
        running: running.ptr(),
        batch_stat: batch_stat.ptr(),
        channels: running.len() as i64,
        momentum: momentum as f32,
        pad: 0,
    };
    running.device().launch(
        FILE,
        "batch_norm_update_running_stat",
        launch_1d(running.len()),
        params,
    )
}

/// Eval statistics: a copy of the running mean and 1/√(running var + eps).
pub(crate) fn eval_stats(
    running_mean: &CudaStorage,
    running_var: &CudaStorage,
    eps: f64,
) -> Result<(CudaStorage, CudaStorage)> {
    require_f32(OP, &[running_mean, running_var])?;
    let device = running_mean.device();
    let channels = running_mean.len();
    let mean = CudaStorage::alloc(device, running_mean.dtype(), channels)?;
    let invstd = CudaStorage::alloc(device, running_mean.dtype(), channels)?;
    let params = BatchNormEvalStatsParams {
        running_mean: running_mean.ptr(),
        running_var: running_var.ptr(),
        mean: mean.ptr(),
        invstd: invstd.ptr(),
        channels: channels as i64,
        eps: eps as f32,
        pad: 0,
    };
    device.launch(FILE, "batch_norm_eval_stats", launch_1d(channels), params)?;
    Ok((mean, invstd))
}

/// y = (x − mean_c)·invstd_c·weight_c + bias_c.
pub(crate) fn normalize(
    x: &CudaStorage,
    d: BatchNormDims,
    mean: &CudaStorage,
    invstd: &CudaStorage,
    weight: Option<&CudaStorage>,
    bias: Option<&CudaStorage>,
) -> Result<CudaStorage> {
    let format = float_format(OP, &[x])?;
    require_f32(OP, &[mean, invstd])?;
    require_f32(OP, &weight.into_iter().chain(bias).collect::<Vec<_>>())?;
    let out = CudaStorage::alloc(x.device(), x.dtype(), x.len())?;
    let params = BatchNormForwardParams {
        x: x.ptr(),
        weight: ptr_or_null(weight),
        bias: ptr_or_null(bias),
        mean: mean.ptr(),
        invstd: invstd.ptr(),
        out: out.ptr(),
        n: x.len() as i64,
        channels: d.channels as i64,
        spatial: d.spatial as i64,
        format,
        pad: 0,
    };
    x.device()
        .launch(FILE, "batch_norm_forward", launch_1d(x.len()), params)?;
    Ok(out)
}

/// Gradients with respect to x, weight and bias.
pub(crate) struct BatchNormGrads {
    pub dx: CudaStorage,
    pub dweight: CudaStorage,
    pub dbias: CudaStorage,
}

/// Per-channel Σdy and Σdy·x̂ (one block per channel), then dx elementwise.
pub(crate) fn backward(
    x: &CudaStorage,
    dy: &CudaStorage,
    d: BatchNormDims,
    mean: &CudaStorage,
    invstd: &CudaStorage,
    weight: Option<&CudaStorage>,
    training: bool,
) -> Result<BatchNormGrads> {
    let format = float_format(OP, &[x, dy])?;
    require_f32(OP, &[mean, invstd])?;
    require_f32(OP, &weight.into_iter().collect::<Vec<_>>())?;
    let device = x.device();
    let grads = BatchNormGrads {
        dx: CudaStorage::alloc(device, x.dtype(), x.len())?,
        dweight: CudaStorage::alloc(device, DType::F32, d.channels)?,
        dbias: CudaStorage::alloc(device, DType::F32, d.channels)?,
    };
    let params = BatchNormBackwardParams {
        x: x.ptr(),
        dy: dy.ptr(),
        weight: ptr_or_null(weight),
        mean: mean.ptr(),
        invstd: invstd.ptr(),
        dx: grads.dx.ptr(),
        dweight: grads.dweight.ptr(),
        dbias: grads.dbias.ptr(),
        batch: d.batch as i64,
        channels: d.channels as i64,
        spatial: d.spatial as i64,
        training: u32::from(training),
        format,
    };
    device.launch(
        FILE,
        "batch_norm_backward_channel_sums",
        row_launch(d.channels, d.per_channel()),
        params,
    )?;
    device.launch(FILE, "batch_norm_backward_dx", launch_1d(x.len()), params)?;
    Ok(grads)
}
