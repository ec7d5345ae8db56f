//! Launches of kernels/optim.cu: the fused updates, in place on the
//! parameter and state buffers, and Σ g² for clipping.

use std::collections::BTreeMap;

use cudarc::driver::LaunchConfig;

use super::cpu::{AdamScalars, SgdScalars};
use super::forward_copy::CopyFormat;
use crate::cuda::{CudaStorage, launch_1d, require_f32};
use crate::error::Result;
use crate::kernel_params;
use crate::storage::{CpuStorage, Storage};
use crate::tensor::{DType, Device, Tensor};

const FILE: &str = "optim.cu";

kernel_params! {
    pub struct SgdParams {
        param: u64,
        grad: u64,
        momentum_buffer: u64,
        n: i64,
        lr: f32,
        weight_decay: f32,
        momentum: f32,
        one_minus_dampening: f32,
        apply_weight_decay: u32,
        first_step: u32,
        nesterov: u32,
        copy_mode: u32,
        copy: u64,
        copy_stream: u32,
        maximize: u32,
    }
}

kernel_params! {
    pub struct AdamParams {
        param: u64,
        grad: u64,
        exp_avg: u64,
        exp_avg_sq: u64,
        max_exp_avg_sq: u64,
        n: i64,
        weight_decay: f32,
        decay_factor: f32,
        one_minus_beta1: f32,
        beta2: f32,
        one_minus_beta2: f32,
        neg_step_size: f32,
        bias_correction2_sqrt: f32,
        eps: f32,
        apply_weight_decay: u32,
        decoupled_weight_decay: u32,
        copy: u64,
        copy_mode: u32,
        copy_stream: u32,
        maximize: u32,
        pad: u32,
    }
}

kernel_params! {
    pub struct SumOfSquaresParams {
        x: u64,
        partials: u64,
        n: i64,
    }
}

kernel_params! {
    pub struct FinishSumOfSquaresParams {
        partials: u64,
        total: u64,
        count: i64,
    }
}

// kernels/optim.cu static_asserts the same sizes.
const _: () = assert!(std::mem::size_of::<SgdParams>() == 80);
const _: () = assert!(std::mem::size_of::<AdamParams>() == 112);

/// The (buffer, mode, random stream) of a forward copy for the update
/// kernels: mode 0 and a null buffer when there is none.
fn copy_fields(copy: Option<(&CudaStorage, CopyFormat)>) -> Result<(u64, u32, u32)> {
    Ok(match copy {
        Some((buffer, format)) => {
            if buffer.dtype() != format.dtype() {
                return Err(crate::Error::invalid(
                    "optimizer step",
                    format!(
                        "a forward copy buffer of dtype {} for {} copies",
                        buffer.dtype(),
                        format.dtype()
                    ),
                ));
            }
            (buffer.ptr(), format.mode(), format.stream())
        }
        None => (0, 0, 0),
    })
}
const _: () = assert!(std::mem::size_of::<SumOfSquaresParams>() == 24);
const _: () = assert!(std::mem::size_of::<FinishSumOfSquaresParams>() == 24);

/// One SGD step in place; the scalars are rounded to f32 as the CPU
/// kernel rounds them with `T::from_f64`.
pub(super) fn sgd_update(
    param: &CudaStorage,
    grad: &CudaStorage,
    momentum_buffer: Option<(&CudaStorage, bool)>,
    s: &SgdScalars,
    copy: Option<(&CudaStorage, CopyFormat)>,
) -> Result<()> {
    require_f32("Sgd", &[param, grad])?;
    if let Some((buffer, _)) = momentum_buffer {
        require_f32("Sgd", &[buffer])?;
    }
    let n = param.len();
    let (copy, copy_mode, copy_stream) = copy_fields(copy)?;
    let params = SgdParams {
        param: param.ptr(),
        grad: grad.ptr(),
        momentum_buffer: momentum_buffer.map_or(0, |(b, _)| b.ptr()),
        n: n as i64,
        lr: s.lr as f32,
        weight_decay: s.weight_decay as f32,
        momentum: s.momentum as f32,
        one_minus_dampening: (1.0 - s.dampening) as f32,
        apply_weight_decay: u32::from(s.weight_decay != 0.0),
        first_step: u32::from(momentum_buffer.is_some_and(|(_, first)| first)),
        nesterov: u32::from(s.nesterov),
        copy_mode,
        copy,
        copy_stream,
        maximize: u32::from(s.maximize),
    };
    param
        .device()
        .launch(FILE, "sgd_update", launch_1d(n), params)
}

/// One Adam/AdamW step in place, scalars rounded to f32 as on the CPU;
/// AMSGrad's when `max_exp_avg_sq` is given.
pub(super) fn adam_update(
    param: &CudaStorage,
    grad: &CudaStorage,
    exp_avg: &CudaStorage,
    exp_avg_sq: &CudaStorage,
    max_exp_avg_sq: Option<&CudaStorage>,
    s: &AdamScalars,
    copy: Option<(&CudaStorage, CopyFormat)>,
) -> Result<()> {
    require_f32("Adam", &[param, grad, exp_avg, exp_avg_sq])?;
    if let Some(max_exp_avg_sq) = max_exp_avg_sq {
        require_f32("Adam", &[max_exp_avg_sq])?;
    }
    let n = param.len();
    let (copy, copy_mode, copy_stream) = copy_fields(copy)?;
    let params = AdamParams {
        param: param.ptr(),
        grad: grad.ptr(),
        exp_avg: exp_avg.ptr(),
        exp_avg_sq: exp_avg_sq.ptr(),
        max_exp_avg_sq: max_exp_avg_sq.map_or(0, CudaStorage::ptr),
        n: n as i64,
        weight_decay: s.weight_decay as f32,
        decay_factor: (1.0 - s.lr * s.weight_decay) as f32,
        one_minus_beta1: (1.0 - s.beta1) as f32,
        beta2: s.beta2 as f32,
        one_minus_beta2: (1.0 - s.beta2) as f32,
        neg_step_size: (-s.step_size) as f32,
        bias_correction2_sqrt: s.bias_correction2_sqrt as f32,
        eps: s.eps as f32,
        apply_weight_decay: u32::from(s.weight_decay != 0.0),
        decoupled_weight_decay: u32::from(s.decoupled_weight_decay),
        copy,
        copy_mode,
        copy_stream,
        maximize: u32::from(s.maximize),
        pad: 0,
    };
    param
        .device()
        .launch(FILE, "adam_update", launch_1d(n), params)
}

/// Threads of a reduction block, and the most blocks one gradient gets.
const REDUCE_THREADS: usize = 256;
const MAX_BLOCKS_PER_GRAD: usize = 256;

fn reduce_config(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (REDUCE_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Σ g² over every element of the CUDA gradients `grads`, in double:
/// per device, every gradient writes its block partials into one shared
/// buffer, one block adds them in order, and one f64 is read back.
pub(super) fn sum_of_squares(grads: &[Tensor]) -> Result<f64> {
    const OP: &str = "clip_grad_norm";
    let mut by_device: BTreeMap<usize, Vec<&Tensor>> = BTreeMap::new();
    for grad in grads {
        if let Device::Cuda(ordinal) = grad.device() {
            by_device.entry(ordinal).or_default().push(grad);
        }
    }
    let mut total = 0.0;
    for (ordinal, grads) in by_device {
        let device = crate::cuda::device(ordinal)?;
        let guards: Vec<_> = grads.iter().map(|g| g.storage()).collect();
        let storages: Vec<&CudaStorage> = guards
            .iter()
            .map(|guard| match &**guard {
                Storage::Cuda(s) => s,
                Storage::Cpu(_) => unreachable!("grouped as a CUDA tensor"),
            })
            .collect();
        require_f32(OP, &storages)?;
        let blocks: Vec<usize> = storages
            .iter()
            .map(|s| {
                s.len()
                    .div_ceil(REDUCE_THREADS)
                    .clamp(1, MAX_BLOCKS_PER_GRAD)
            })
            .collect();
        let count: usize = blocks.iter().sum();
        let partials = CudaStorage::alloc(&device, DType::F64, count)?;
        let mut offset = 0;
        for (storage, &grad_blocks) in storages.iter().zip(&blocks) {
            let params = SumOfSquaresParams {
                x: storage.ptr(),
                partials: partials.ptr() + (offset * std::mem::size_of::<f64>()) as u64,
                n: storage.len() as i64,
            };
            device.launch(
                FILE,
                "sum_of_squares_partials",
                reduce_config(grad_blocks),
                params,
            )?;
            offset += grad_blocks;
        }
        let sum = CudaStorage::alloc(&device, DType::F64, 1)?;
        let params = FinishSumOfSquaresParams {
            partials: partials.ptr(),
            total: sum.ptr(),
            count: count as i64,
        };
        device.launch(FILE, "finish_sum_of_squares", reduce_config(1), params)?;
        match sum.to_cpu()? {
            CpuStorage::F64(v) => total += v[0],
            _ => unreachable!("the sum buffer is allocated as f64"),
        }
    }
    Ok(total)
}

kernel_params! {
    pub struct UnscaleParams {
        grad: u64,
        out: u64,
        found_non_finite: u64,
        n: i64,
        inv_scale: f32,
        pad: u32,
    }
}

/// `grads` multiplied by `inv_scale` into new tensors, and whether any
/// result is Inf or NaN: one `unscale_and_check_finite` launch per gradient,
/// all setting one flag per device, which is read back once.
pub(super) fn unscale_and_check_finite(
    grads: &[Tensor],
    inv_scale: f32,
) -> Result<(Vec<Tensor>, bool)> {
    const OP: &str = "GradScaler::unscale";
    let mut flags: BTreeMap<usize, CudaStorage> = BTreeMap::new();
    let mut unscaled = Vec::with_capacity(grads.len());
    for grad in grads {
        let Device::Cuda(ordinal) = grad.device() else {
            unreachable!("only CUDA gradients come here")
        };
        let device = crate::cuda::device(ordinal)?;
        let storage = grad.storage();
        let Storage::Cuda(storage) = &*storage else {
            unreachable!("a CUDA tensor has CUDA storage")
        };
        require_f32(OP, &[storage])?;
        let flag = match flags.entry(ordinal) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(CudaStorage::from_cpu(&device, &CpuStorage::U32(vec![0]))?)
            }
        };
        let out = CudaStorage::alloc(&device, DType::F32, storage.len())?;
        let params = UnscaleParams {
            grad: storage.ptr(),
            out: out.ptr(),
            found_non_finite: flag.ptr(),
            n: storage.len() as i64,
            inv_scale,
            pad: 0,
        };
        device.launch(
            FILE,
            "unscale_and_check_finite",
            launch_1d(storage.len()),
            params,
        )?;
        unscaled.push(Tensor::from_result(
            Storage::Cuda(out),
            grad.shape().clone(),
        ));
    }
    let mut finite = true;
    for flag in flags.values() {
        match flag.to_cpu()? {
            CpuStorage::U32(v) => finite &= v[0] == 0,
            _ => unreachable!("the flag is allocated as u32"),
        }
    }
    Ok((unscaled, finite))
}
