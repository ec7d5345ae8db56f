//! Launch glue for kernels/loss.cu. A forward returns the rank-0 loss (and
//! for cross entropy each row's logsumexp); a backward reads dL/d(loss) from
//! the device, so no value crosses to the host except the one-word target
//! check of cross entropy. The options paths add the unreduced bce terms and
//! the preparation of class targets.

use cudarc::driver::LaunchConfig;

use crate::cuda::{CudaStorage, launch_1d, require_f32};
use crate::error::{Error, Result};
use crate::kernel_params;
use crate::storage::CpuStorage;
use crate::tensor::DType;

const FILE: &str = "loss.cu";

/// Threads of every reduction block (a multiple of 32, as block sums need).
const REDUCE_THREADS: u32 = 256;
/// At most this many partial sums: enough blocks to fill a GPU, few enough
/// that one block adds them quickly.
const MAX_PARTIALS: usize = 1024;

kernel_params! {
    pub struct LossPartialsParams {
        x: u64,
        y: u64,
        partials: u64,
        n: i64,
    }
}

kernel_params! {
    pub struct CrossEntropyForwardParams {
        logits: u64,
        targets: u64,
        row_logsumexp: u64,
        row_loss: u64,
        error_flag: u64,
        rows: i64,
        classes: i64,
    }
}

kernel_params! {
    pub struct FinishSumParams {
        partials: u64,
        out: u64,
        count: i64,
        scale: f64,
    }
}

kernel_params! {
    pub struct LossBackwardParams {
        x: u64,
        y: u64,
        upstream: u64,
        out: u64,
        n: i64,
        scale: f64,
    }
}

kernel_params! {
    pub struct CrossEntropyBackwardParams {
        logits: u64,
        targets: u64,
        row_logsumexp: u64,
        upstream: u64,
        dx: u64,
        rows: i64,
        classes: i64,
        scale: f64,
    }
}

kernel_params! {
    pub struct BceTermsParams {
        x: u64,
        y: u64,
        pos_weight: u64,
        upstream: u64,
        out: u64,
        out_target: u64,
        n: i64,
    }
}

kernel_params! {
    pub struct ClassTargetsParams {
        targets: u64,
        safe_targets: u64,
        kept: u64,
        flags: u64,
        n: i64,
        classes: i64,
        ignore_index: i64,
    }
}

// kernels/loss.cu static_asserts the same sizes.
const _: () = assert!(std::mem::size_of::<LossPartialsParams>() == 32);
const _: () = assert!(std::mem::size_of::<BceTermsParams>() == 56);
const _: () = assert!(std::mem::size_of::<ClassTargetsParams>() == 56);
const _: () = assert!(std::mem::size_of::<CrossEntropyForwardParams>() == 56);
const _: () = assert!(std::mem::size_of::<FinishSumParams>() == 32);
const _: () = assert!(std::mem::size_of::<LossBackwardParams>() == 48);
const _: () = assert!(std::mem::size_of::<CrossEntropyBackwardParams>() == 64);

/// The elementwise losses, each a partial-sum kernel and its backward kernels.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ElementwiseLoss {
    Mse,
    BceWithLogits,
    GaussianKl,
}

impl ElementwiseLoss {
    fn partials_kernel(self) -> &'static str {
        match self {
            ElementwiseLoss::Mse => "mse_partials",
            ElementwiseLoss::BceWithLogits => "bce_with_logits_partials",
            ElementwiseLoss::GaussianKl => "gaussian_kl_partials",
        }
    }
}

/// The backward kernels of the elementwise losses (one per input gradient).
#[derive(Clone, Copy, Debug)]
pub(crate) enum LossGradient {
    /// dL/dx = 2(x − y)·g·scale (x, y).
    Mse,
    /// dL/dx = (σ(x) − y)·g·scale (x, y).
    BceInput,
    /// dL/dy = −x·g·scale (x only).
    BceTarget,
    /// dL/dmu = mu·g·scale (mu only).
    KlMu,
    /// dL/dlogvar = ½(e^logvar − 1)·g·scale (logvar only).
    KlLogvar,
}

impl LossGradient {
    fn kernel(self) -> &'static str {
        match self {
            LossGradient::Mse => "mse_backward",
            LossGradient::BceInput => "bce_with_logits_backward_input",
            LossGradient::BceTarget => "bce_with_logits_backward_target",
            LossGradient::KlMu => "gaussian_kl_backward_mu",
            LossGradient::KlLogvar => "gaussian_kl_backward_logvar",
        }
    }
}

/// A grid of `blocks` reduction blocks.
fn reduce_config(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A zeroed one-word flag buffer that a kernel raises on bad input.
fn error_flag(like: &CudaStorage) -> Result<CudaStorage> {
    CudaStorage::zeros(like.device(), DType::U32, 1)
}

/// Reads a flag buffer back (waits for the kernels before it).
fn flag_raised(flag: &CudaStorage) -> Result<bool> {
    Ok(flag_bits(flag)? != 0)
}

/// The word of a flag buffer (waits for the kernels before it).
fn flag_bits(flag: &CudaStorage) -> Result<u32> {
    match flag.to_cpu()? {
        CpuStorage::U32(v) => Ok(v[0]),
        _ => unreachable!("the flag buffer is allocated as u32"),
    }
}

/// scale · Σ partials[..count] into a new rank-0 f32 buffer.
fn finish_sum(partials: &CudaStorage, count: usize, scale: f64) -> Result<CudaStorage> {
    let out = CudaStorage::alloc(partials.device(), DType::F32, 1)?;
    let params = FinishSumParams {
        partials: partials.ptr(),
        out: out.ptr(),
        count: count as i64,
        scale,
    };
    partials
        .device()
        .launch(FILE, "finish_sum", reduce_config(1), params)?;
    Ok(out)
}

/// The loss of `x` against `y` (target, or logvar for the KL), reduced to a
/// rank-0 tensor.
pub(crate) fn elementwise_loss(
    loss: ElementwiseLoss,
    x: &CudaStorage,
    y: &CudaStorage,
    scale: f64,
) -> Result<CudaStorage> {
    let kernel = loss.partials_kernel();
    require_f32(kernel, &[x, y])?;
    let n = x.len();
    let blocks = n.div_ceil(REDUCE_THREADS as usize).clamp(1, MAX_PARTIALS);
    let partials = CudaStorage::alloc(x.device(), DType::F64, blocks)?;
    let params = LossPartialsParams {
        x: x.ptr(),
        y: y.ptr(),
        partials: partials.ptr(),
        n: n as i64,
    };
    x.device()
        .launch(FILE, kernel, reduce_config(blocks), params)?;
    finish_sum(&partials, blocks, scale)
}

/// Cross entropy of `logits` [rows, classes] against u32 `targets` [rows]:
/// the rank-0 loss and each row's logsumexp, or Ok(None) if a target is ≥
/// classes (the caller finds and reports it).
pub(crate) fn cross_entropy(
    logits: &CudaStorage,
    targets: &CudaStorage,
    rows: usize,
    classes: usize,
    scale: f64,
) -> Result<Option<(CudaStorage, CudaStorage)>> {
    const OP: &str = "cross_entropy";
    require_f32(OP, &[logits])?;
    // One block per row: the grid's x dimension holds at most 2³¹ − 1 blocks.
    const MAX_ROWS: usize = i32::MAX as usize;
    if rows > MAX_ROWS {
        return Err(Error::shape(
            OP,
            format!("CUDA cross entropy supports at most {MAX_ROWS} rows, got {rows}"),
        ));
    }
    let device = logits.device();
    let row_logsumexp = CudaStorage::alloc(device, DType::F32, rows)?;
    let row_loss = CudaStorage::alloc(device, DType::F64, rows)?;
    let flag = error_flag(logits)?;
    let params = CrossEntropyForwardParams {
        logits: logits.ptr(),
        targets: targets.ptr(),
        row_logsumexp: row_logsumexp.ptr(),
        row_loss: row_loss.ptr(),
        error_flag: flag.ptr(),
        rows: rows as i64,
        classes: classes as i64,
    };
    // One block per row, as many threads as the row has classes (in whole warps, up to 256).
    let threads = classes.div_ceil(32).clamp(1, REDUCE_THREADS as usize / 32) * 32;
    let config = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    device.launch(FILE, "cross_entropy_rows", config, params)?;
    let loss = finish_sum(&row_loss, rows, scale)?;
    if flag_raised(&flag)? {
        return Ok(None);
    }
    Ok(Some((loss, row_logsumexp)))
}

/// One input gradient of an elementwise loss; `y` is ignored by the kernels
/// of one input. `upstream` is dL/d(loss), rank 0 on the device.
pub(crate) fn elementwise_loss_backward(
    gradient: LossGradient,
    x: &CudaStorage,
    y: Option<&CudaStorage>,
    upstream: &CudaStorage,
    scale: f64,
) -> Result<CudaStorage> {
    let kernel = gradient.kernel();
    require_f32(kernel, &[x, upstream])?;
    if let Some(y) = y {
        require_f32(kernel, &[y])?;
    }
    let n = x.len();
    let out = CudaStorage::alloc(x.device(), DType::F32, n)?;
    let params = LossBackwardParams {
        x: x.ptr(),
        y: y.map_or(0, CudaStorage::ptr),
        upstream: upstream.ptr(),
        out: out.ptr(),
        n: n as i64,
        scale,
    };
    x.device().launch(FILE, kernel, launch_1d(n), params)?;
    Ok(out)
}

/// dL/dlogits of cross entropy from the forward's row logsumexp.
pub(crate) fn cross_entropy_backward(
    logits: &CudaStorage,
    targets: &CudaStorage,
    row_logsumexp: &CudaStorage,
    upstream: &CudaStorage,
    classes: usize,
    scale: f64,
) -> Result<CudaStorage> {
    const KERNEL: &str = "cross_entropy_backward";
    require_f32(KERNEL, &[logits, row_logsumexp, upstream])?;
    let n = logits.len();
    let dx = CudaStorage::alloc(logits.device(), DType::F32, n)?;
    let params = CrossEntropyBackwardParams {
        logits: logits.ptr(),
        targets: targets.ptr(),
        row_logsumexp: row_logsumexp.ptr(),
        upstream: upstream.ptr(),
        dx: dx.ptr(),
        rows: targets.len() as i64,
        classes: classes as i64,
        scale,
    };
    logits.device().launch(FILE, KERNEL, launch_1d(n), params)?;
    Ok(dx)
}

/// The unreduced bce terms (1 − y)·x + (1 + (pw − 1)·y)·softplus(−x) of
/// same-length `x`, `y` and `pos_weight` (None: 1).
pub(crate) fn bce_with_logits_terms(
    x: &CudaStorage,
    y: &CudaStorage,
    pos_weight: Option<&CudaStorage>,
) -> Result<CudaStorage> {
    const KERNEL: &str = "bce_with_logits_terms";
    require_f32(KERNEL, &[x, y])?;
    if let Some(pw) = pos_weight {
        require_f32(KERNEL, &[pw])?;
    }
    let n = x.len();
    let out = CudaStorage::alloc(x.device(), DType::F32, n)?;
    let params = BceTermsParams {
        x: x.ptr(),
        y: y.ptr(),
        pos_weight: pos_weight.map_or(0, CudaStorage::ptr),
        upstream: 0,
        out: out.ptr(),
        out_target: 0,
        n: n as i64,
    };
    x.device().launch(FILE, KERNEL, launch_1d(n), params)?;
    Ok(out)
}

/// dL/dx and (if `target_grad`) dL/dy of the unreduced bce terms, from the
/// per-element upstream gradient.
pub(crate) fn bce_with_logits_terms_backward(
    x: &CudaStorage,
    y: &CudaStorage,
    pos_weight: Option<&CudaStorage>,
    upstream: &CudaStorage,
    target_grad: bool,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    const KERNEL: &str = "bce_with_logits_terms_backward";
    require_f32(KERNEL, &[x, y, upstream])?;
    if let Some(pw) = pos_weight {
        require_f32(KERNEL, &[pw])?;
    }
    let n = x.len();
    let dx = CudaStorage::alloc(x.device(), DType::F32, n)?;
    let dy = target_grad
        .then(|| CudaStorage::alloc(x.device(), DType::F32, n))
        .transpose()?;
    let params = BceTermsParams {
        x: x.ptr(),
        y: y.ptr(),
        pos_weight: pos_weight.map_or(0, CudaStorage::ptr),
        upstream: upstream.ptr(),
        out: dx.ptr(),
        out_target: dy.as_ref().map_or(0, CudaStorage::ptr),
        n: n as i64,
    };
    x.device().launch(FILE, KERNEL, launch_1d(n), params)?;
    Ok((dx, dy))
}

/// What `cross_entropy_class_targets` found besides its two outputs.
pub(crate) struct ClassTargets {
    /// The targets with ignored ones replaced by class 0 (u32).
    pub safe_targets: CudaStorage,
    /// 1 where a target counts, 0 where it equals ignore_index (f32).
    pub kept: CudaStorage,
    /// A counted target is ≥ classes (the caller finds and reports it).
    pub out_of_range: bool,
    /// At least one target counts.
    pub any_kept: bool,
}

/// Masks the u32 class `targets` equal to `ignore_index` and checks the
/// others against `classes`, in one launch and one word read back.
pub(crate) fn class_targets(
    targets: &CudaStorage,
    classes: usize,
    ignore_index: Option<u32>,
) -> Result<ClassTargets> {
    const KERNEL: &str = "cross_entropy_class_targets";
    let n = targets.len();
    let device = targets.device();
    let safe_targets = CudaStorage::alloc(device, DType::U32, n)?;
    let kept = CudaStorage::alloc(device, DType::F32, n)?;
    let flags = error_flag(targets)?;
    let params = ClassTargetsParams {
        targets: targets.ptr(),
        safe_targets: safe_targets.ptr(),
        kept: kept.ptr(),
        flags: flags.ptr(),
        n: n as i64,
        classes: classes as i64,
        ignore_index: ignore_index.map_or(-1, i64::from),
    };
    device.launch(FILE, KERNEL, launch_1d(n), params)?;
    let bits = flag_bits(&flags)?;
    Ok(ClassTargets {
        safe_targets,
        kept,
        out_of_range: bits & 1 != 0,
        any_kept: bits & 2 != 0,
    })
}
