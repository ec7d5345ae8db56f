//! One update of one parameter on its own device: the CPU kernel over
//! rayon chunks, or the CUDA kernel, with the gradient and state checked.

use rayon::iter::Either;
use rayon::prelude::*;

use super::cpu::{
    AdamScalars, SgdScalars, UPDATE_CHUNK, adam_amsgrad_update, adam_update, sgd_update,
};
use super::cuda;
use super::forward_copy::{CopyFormat, copy_bits, write_copy};
use crate::cuda::CudaStorage;
use crate::error::{Error, Result};
use crate::storage::{CpuStorage, Float, Storage};
use crate::tensor::{DType, SharedStorage, Tensor};

/// Where an update also writes its parameter's forward copy, and how.
pub(super) type CopyTarget<'a> = Option<(&'a SharedStorage, CopyFormat)>;

/// The copy's 16-bit patterns in update-sized chunks, or one `None` per
/// chunk when there is no copy, to zip beside the parameter's chunks.
fn copy_chunks(
    copy: Option<&mut [u16]>,
    chunks: usize,
) -> impl IndexedParallelIterator<Item = Option<&mut [u16]>> {
    match copy {
        Some(copy) => Either::Left(copy.par_chunks_mut(UPDATE_CHUNK).map(Some)),
        None => Either::Right((0..chunks).into_par_iter().map(|_| None)),
    }
}

/// Writes the copy of chunk `k` of a parameter just updated, while it is
/// still in cache.
fn write_chunk_copy<T: Float>(k: usize, param: &[T], copy: Option<&mut [u16]>, format: CopyFormat) {
    if let Some(copy) = copy {
        write_copy(param, copy, format, k * UPDATE_CHUNK);
    }
}

/// The typed slice of a float storage, or an error naming the parameter.
pub(super) fn typed_mut<'a, T: Float>(
    storage: &'a mut CpuStorage,
    name: &str,
) -> Result<&'a mut [T]> {
    let dtype = storage.dtype();
    T::slice_mut(storage).ok_or_else(|| dtype_error(name, dtype, T::DTYPE))
}

pub(super) fn typed<'a, T: Float>(storage: &'a CpuStorage, name: &str) -> Result<&'a [T]> {
    T::slice(storage).ok_or_else(|| dtype_error(name, storage.dtype(), T::DTYPE))
}

pub(super) fn dtype_error(name: &str, found: DType, expected: DType) -> Error {
    Error::DType {
        op: "optimizer step",
        msg: format!(
            "{name}: state or gradient of dtype {found} for a parameter of dtype {expected}"
        ),
    }
}

/// Checks that `grad` fits `param` and returns a handle that does not share
/// the parameter's storage (so the parameter can be written while the
/// gradient is read).
pub(super) fn checked_grad(name: &str, param: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if grad.shape() != param.shape() || grad.dtype() != param.dtype() {
        return Err(Error::shape(
            "optimizer step",
            format!(
                "{name}: gradient of shape {} ({}) for a parameter of shape {} ({})",
                grad.shape(),
                grad.dtype(),
                param.shape(),
                param.dtype()
            ),
        ));
    }
    if grad.device() != param.device() {
        return Err(Error::DeviceMismatch {
            op: "optimizer step",
            lhs: param.device(),
            rhs: grad.device(),
        });
    }
    if std::sync::Arc::ptr_eq(&grad.shared_storage(), &param.shared_storage()) {
        return deep_copy(grad);
    }
    Ok(grad.clone())
}

/// A tensor with its own storage holding `src`'s values.
pub(super) fn deep_copy(src: &Tensor) -> Result<Tensor> {
    let copy = src.zeros_like()?;
    copy.assign(src)?;
    Ok(copy)
}

pub(super) fn run_sgd(
    name: &str,
    param: &Tensor,
    grad: &Tensor,
    momentum_buffer: Option<(&Tensor, bool)>,
    s: &SgdScalars,
    copy: CopyTarget,
) -> Result<()> {
    fn typed_update<T: Float>(
        name: &str,
        param: &mut CpuStorage,
        grad: &CpuStorage,
        buffer: Option<(&mut CpuStorage, bool)>,
        s: &SgdScalars,
        copy: Option<(&mut [u16], CopyFormat)>,
    ) -> Result<()> {
        let param = typed_mut::<T>(param, name)?;
        let grad = typed::<T>(grad, name)?;
        let chunks = param.len().div_ceil(UPDATE_CHUNK);
        let (copy, format) = copy.map_or((None, CopyFormat::Bf16Nearest), |(c, f)| (Some(c), f));
        match buffer {
            None => param
                .par_chunks_mut(UPDATE_CHUNK)
                .zip(grad.par_chunks(UPDATE_CHUNK))
                .zip(copy_chunks(copy, chunks))
                .enumerate()
                .for_each(|(k, ((p, g), c))| {
                    sgd_update(p, g, None, false, s);
                    write_chunk_copy(k, p, c, format);
                }),
            Some((buffer, first_step)) => {
                let buffer = typed_mut::<T>(buffer, name)?;
                param
                    .par_chunks_mut(UPDATE_CHUNK)
                    .zip(grad.par_chunks(UPDATE_CHUNK))
                    .zip(buffer.par_chunks_mut(UPDATE_CHUNK))
                    .zip(copy_chunks(copy, chunks))
                    .enumerate()
                    .for_each(|(k, (((p, g), b), c))| {
                        sgd_update(p, g, Some(b), first_step, s);
                        write_chunk_copy(k, p, c, format);
                    });
            }
        }
        Ok(())
    }

    let mut param_guard = param.storage_mut();
    let grad_guard = grad.storage();
    let mut buffer_guard = momentum_buffer.map(|(b, first)| (b.storage_mut(), first));
    let mut copy_guard = copy.map(|(buffer, format)| (buffer.write(), format));
    match (&mut *param_guard, &*grad_guard) {
        (Storage::Cpu(p), Storage::Cpu(g)) => {
            let buffer = match &mut buffer_guard {
                Some((guard, first)) => Some((cpu_state(name, guard)?, *first)),
                None => None,
            };
            let copy = match &mut copy_guard {
                Some((guard, format)) => Some((copy_bits(cpu_state(name, guard)?), *format)),
                None => None,
            };
            match p.dtype() {
                DType::F32 => typed_update::<f32>(name, p, g, buffer, s, copy),
                DType::F64 => typed_update::<f64>(name, p, g, buffer, s, copy),
                other => Err(Error::unsupported_dtype("Sgd", other)),
            }
        }
        (Storage::Cuda(p), Storage::Cuda(g)) => {
            let buffer = match &mut buffer_guard {
                Some((guard, first)) => Some((&*cuda_state(name, guard)?, *first)),
                None => None,
            };
            let copy = match &mut copy_guard {
                Some((guard, format)) => Some((&*cuda_state(name, guard)?, *format)),
                None => None,
            };
            cuda::sgd_update(p, g, buffer, s, copy)
        }
        _ => unreachable!("checked_grad put the gradient on its parameter's device"),
    }
}

/// Adam's state tensors of one parameter: the moments, and AMSGrad's
/// running max of the second moment when amsgrad is on.
pub(super) struct AdamStateRefs<'a> {
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
    pub max_exp_avg_sq: Option<&'a Tensor>,
}

pub(super) fn run_adam(
    name: &str,
    param: &Tensor,
    grad: &Tensor,
    state: AdamStateRefs,
    s: &AdamScalars,
    copy: CopyTarget,
) -> Result<()> {
    #[allow(clippy::too_many_arguments)]
    fn typed_update<T: Float>(
        name: &str,
        param: &mut CpuStorage,
        grad: &CpuStorage,
        exp_avg: &mut CpuStorage,
        exp_avg_sq: &mut CpuStorage,
        max_exp_avg_sq: Option<&mut CpuStorage>,
        s: &AdamScalars,
        copy: Option<(&mut [u16], CopyFormat)>,
    ) -> Result<()> {
        let param = typed_mut::<T>(param, name)?;
        let grad = typed::<T>(grad, name)?;
        let exp_avg = typed_mut::<T>(exp_avg, name)?;
        let exp_avg_sq = typed_mut::<T>(exp_avg_sq, name)?;
        let chunks = param.len().div_ceil(UPDATE_CHUNK);
        let (copy, format) = copy.map_or((None, CopyFormat::Bf16Nearest), |(c, f)| (Some(c), f));
        let moments = param
            .par_chunks_mut(UPDATE_CHUNK)
            .zip(grad.par_chunks(UPDATE_CHUNK))
            .zip(exp_avg.par_chunks_mut(UPDATE_CHUNK))
            .zip(exp_avg_sq.par_chunks_mut(UPDATE_CHUNK));
        match max_exp_avg_sq {
            None => moments.zip(copy_chunks(copy, chunks)).enumerate().for_each(
                |(k, ((((p, g), m), v), c))| {
                    adam_update(p, g, m, v, s);
                    write_chunk_copy(k, p, c, format);
                },
            ),
            Some(max_exp_avg_sq) => {
                let max_exp_avg_sq = typed_mut::<T>(max_exp_avg_sq, name)?;
                moments
                    .zip(max_exp_avg_sq.par_chunks_mut(UPDATE_CHUNK))
                    .zip(copy_chunks(copy, chunks))
                    .enumerate()
                    .for_each(|(k, (((((p, g), m), v), v_max), c))| {
                        adam_amsgrad_update(p, g, m, v, v_max, s);
                        write_chunk_copy(k, p, c, format);
                    })
            }
        }
        Ok(())
    }

    let mut param_guard = param.storage_mut();
    let grad_guard = grad.storage();
    let mut exp_avg_guard = state.exp_avg.storage_mut();
    let mut exp_avg_sq_guard = state.exp_avg_sq.storage_mut();
    let mut max_guard = state.max_exp_avg_sq.map(Tensor::storage_mut);
    let mut copy_guard = copy.map(|(buffer, format)| (buffer.write(), format));
    match (&mut *param_guard, &*grad_guard) {
        (Storage::Cpu(p), Storage::Cpu(g)) => {
            let m = cpu_state(name, &mut exp_avg_guard)?;
            let v = cpu_state(name, &mut exp_avg_sq_guard)?;
            let v_max = match &mut max_guard {
                Some(guard) => Some(cpu_state(name, guard)?),
                None => None,
            };
            let copy = match &mut copy_guard {
                Some((guard, format)) => Some((copy_bits(cpu_state(name, guard)?), *format)),
                None => None,
            };
            match p.dtype() {
                DType::F32 => typed_update::<f32>(name, p, g, m, v, v_max, s, copy),
                DType::F64 => typed_update::<f64>(name, p, g, m, v, v_max, s, copy),
                other => Err(Error::unsupported_dtype("Adam", other)),
            }
        }
        (Storage::Cuda(p), Storage::Cuda(g)) => {
            let m = cuda_state(name, &mut exp_avg_guard)?;
            let v = cuda_state(name, &mut exp_avg_sq_guard)?;
            let v_max = match &mut max_guard {
                Some(guard) => Some(&*cuda_state(name, guard)?),
                None => None,
            };
            let copy = match &mut copy_guard {
                Some((guard, format)) => Some((&*cuda_state(name, guard)?, *format)),
                None => None,
            };
            cuda::adam_update(p, g, m, v, v_max, s, copy)
        }
        _ => unreachable!("checked_grad put the gradient on its parameter's device"),
    }
}

/// The host buffer of a state tensor of a CPU parameter.
pub(super) fn cpu_state<'a>(name: &str, state: &'a mut Storage) -> Result<&'a mut CpuStorage> {
    match state {
        Storage::Cpu(s) => Ok(s),
        Storage::Cuda(_) => Err(state_device_error(name)),
    }
}

/// The device buffer of a state tensor of a CUDA parameter.
pub(super) fn cuda_state<'a>(name: &str, state: &'a mut Storage) -> Result<&'a mut CudaStorage> {
    match state {
        Storage::Cuda(s) => Ok(s),
        Storage::Cpu(_) => Err(state_device_error(name)),
    }
}

/// State is created and loaded on its parameter's device, so this only
/// fires if a parameter's storage was moved under the optimizer.
pub(super) fn state_device_error(name: &str) -> Error {
    Error::invalid(
        "optimizer step",
        format!("{name}: optimizer state lives on another device than its parameter"),
    )
}
