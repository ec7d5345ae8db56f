//! Optimizers with exactly PyTorch's update rules: [`Sgd`] (momentum,
//! dampening, Nesterov, L2 weight decay), [`Adam`] (L2 weight decay added to
//! the gradient) and [`AdamW`] (decoupled weight decay).
//!
//! Each optimizer has one fused CPU kernel (`sgd_update`, `adam_update`): a
//! plain generic function over `T: Float` that updates a parameter and its
//! state in place, element by element, with no allocation; the CUDA backend
//! mirrors it in `kernels/optim.cu`. State (momentum buffers, Adam moments)
//! is created on a parameter's first step and can be saved and restored
//! through `state_dict` / `load_state_dict`, so a resumed run continues
//! bit-identically. Under [`crate::profile`], a whole update is one scope
//! ("sgd step", "adam step", "adamw step"), as is `clip_grad_norm`.

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;

use crate::autograd::GradStore;
use crate::cuda::CudaStorage;
use crate::error::{Error, Result};
use crate::profile;
use crate::storage::{CpuStorage, Float, Storage};
use crate::tensor::{DType, Device, Tensor};

/// Elements per parallel task of a fused update (small enough to spread a
/// large parameter over every core, large enough to amortise scheduling).
const UPDATE_CHUNK: usize = 1 << 14;

/// Updates parameters from their gradients.
pub trait Optimizer {
    /// One update of every parameter that has a gradient in `grads`;
    /// parameters without one are skipped and their state is untouched.
    fn step(&mut self, grads: &GradStore) -> Result<()>;

    fn learning_rate(&self) -> f64;

    /// Changes the learning rate for the following steps (schedules, warm-up).
    fn set_learning_rate(&mut self, lr: f64);

    /// The per-parameter state, named "{param}.{buffer}". The handles are
    /// live: save or copy them before the next step.
    fn state_dict(&self) -> Vec<(String, Tensor)>;

    /// Restores state saved by `state_dict` (values are copied). Fails,
    /// loading nothing, if a tensor is unexpected, mis-shaped or incomplete.
    fn load_state_dict(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()>;
}

// ----- fused CPU kernels -------------------------------------------------

/// The scalars of one SGD step, as PyTorch's `torch.optim.SGD`.
#[derive(Clone, Copy, Debug)]
pub struct SgdScalars {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

/// One SGD step on one parameter, in place:
/// d = g + wd·p;
/// with momentum: buf = d on the first step, else buf = μ·buf + (1 − dampening)·d,
///   then d = d + μ·buf (Nesterov) or d = buf;
/// p = p − lr·d.
pub fn sgd_update<T: Float>(
    param: &mut [T],
    grad: &[T],
    momentum_buffer: Option<&mut [T]>,
    first_step: bool,
    s: &SgdScalars,
) {
    let lr = T::from_f64(s.lr);
    let weight_decay = T::from_f64(s.weight_decay);
    let momentum = T::from_f64(s.momentum);
    let one_minus_dampening = T::from_f64(1.0 - s.dampening);
    let decay = |p: T, g: T| {
        if s.weight_decay != 0.0 {
            g + weight_decay * p
        } else {
            g
        }
    };
    match momentum_buffer {
        None => {
            for (p, &g) in param.iter_mut().zip(grad) {
                let d = decay(*p, g);
                *p -= lr * d;
            }
        }
        Some(buffer) => {
            for ((p, &g), buf) in param.iter_mut().zip(grad).zip(buffer.iter_mut()) {
                let d = decay(*p, g);
                *buf = if first_step {
                    d
                } else {
                    *buf * momentum + one_minus_dampening * d
                };
                let direction = if s.nesterov {
                    d + momentum * *buf
                } else {
                    *buf
                };
                *p -= lr * direction;
            }
        }
    }
}

/// The scalars of one Adam/AdamW step for a parameter at step t (1-based).
#[derive(Clone, Copy, Debug)]
pub struct AdamScalars {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW: p ← p·(1 − lr·wd) before the step, instead of g ← g + wd·p.
    pub decoupled_weight_decay: bool,
    /// lr / (1 − β1ᵗ)
    pub step_size: f64,
    /// √(1 − β2ᵗ)
    pub bias_correction2_sqrt: f64,
}

impl AdamScalars {
    fn at_step(config: &AdamConfig, decoupled_weight_decay: bool, step: u32) -> Self {
        let t = step as i32;
        let bias_correction1 = 1.0 - config.betas.0.powi(t);
        let bias_correction2 = 1.0 - config.betas.1.powi(t);
        AdamScalars {
            lr: config.lr,
            beta1: config.betas.0,
            beta2: config.betas.1,
            eps: config.eps,
            weight_decay: config.weight_decay,
            decoupled_weight_decay,
            step_size: config.lr / bias_correction1,
            bias_correction2_sqrt: bias_correction2.sqrt(),
        }
    }
}

/// One Adam step on one parameter, in place, in PyTorch's operation order:
/// (Adam) g = g + wd·p, or (AdamW) p = p·(1 − lr·wd);
/// m = lerp(m, g, 1 − β1) = β1·m + (1 − β1)·g;
/// v = β2·v + (1 − β2)·g²;
/// p = p − step_size · m / (√v / √(1 − β2ᵗ) + eps).
pub fn adam_update<T: Float>(
    param: &mut [T],
    grad: &[T],
    exp_avg: &mut [T],
    exp_avg_sq: &mut [T],
    s: &AdamScalars,
) {
    let weight_decay = T::from_f64(s.weight_decay);
    let decay_factor = T::from_f64(1.0 - s.lr * s.weight_decay);
    let one_minus_beta1 = T::from_f64(1.0 - s.beta1);
    let beta2 = T::from_f64(s.beta2);
    let one_minus_beta2 = T::from_f64(1.0 - s.beta2);
    let neg_step_size = T::from_f64(-s.step_size);
    let bias_correction2_sqrt = T::from_f64(s.bias_correction2_sqrt);
    let eps = T::from_f64(s.eps);
    let half = T::from_f64(0.5);
    for (((p, &g), m), v) in param
        .iter_mut()
        .zip(grad)
        .zip(exp_avg.iter_mut())
        .zip(exp_avg_sq.iter_mut())
    {
        let mut g = g;
        if s.weight_decay != 0.0 {
            if s.decoupled_weight_decay {
                *p *= decay_factor;
            } else {
                g += weight_decay * *p;
            }
        }
        // PyTorch's lerp, which picks the form that is exact at its nearer end.
        *m = if one_minus_beta1 < half {
            *m + one_minus_beta1 * (g - *m)
        } else {
            g - (g - *m) * (T::ONE - one_minus_beta1)
        };
        *v = *v * beta2 + one_minus_beta2 * g * g;
        let denom = v.sqrt() / bias_correction2_sqrt + eps;
        *p += neg_step_size * *m / denom;
    }
}

// ----- dispatch ----------------------------------------------------------

/// The typed slice of a float storage, or an error naming the parameter.
fn typed_mut<'a, T: Float>(storage: &'a mut CpuStorage, name: &str) -> Result<&'a mut [T]> {
    let dtype = storage.dtype();
    T::slice_mut(storage).ok_or_else(|| dtype_error(name, dtype, T::DTYPE))
}

fn typed<'a, T: Float>(storage: &'a CpuStorage, name: &str) -> Result<&'a [T]> {
    T::slice(storage).ok_or_else(|| dtype_error(name, storage.dtype(), T::DTYPE))
}

fn dtype_error(name: &str, found: DType, expected: DType) -> Error {
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
fn checked_grad(name: &str, param: &Tensor, grad: &Tensor) -> Result<Tensor> {
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
fn deep_copy(src: &Tensor) -> Result<Tensor> {
    let copy = src.zeros_like()?;
    copy.assign(src)?;
    Ok(copy)
}

fn run_sgd(
    name: &str,
    param: &Tensor,
    grad: &Tensor,
    momentum_buffer: Option<(&Tensor, bool)>,
    s: &SgdScalars,
) -> Result<()> {
    fn typed_update<T: Float>(
        name: &str,
        param: &mut CpuStorage,
        grad: &CpuStorage,
        buffer: Option<(&mut CpuStorage, bool)>,
        s: &SgdScalars,
    ) -> Result<()> {
        let param = typed_mut::<T>(param, name)?;
        let grad = typed::<T>(grad, name)?;
        match buffer {
            None => param
                .par_chunks_mut(UPDATE_CHUNK)
                .zip(grad.par_chunks(UPDATE_CHUNK))
                .for_each(|(p, g)| sgd_update(p, g, None, false, s)),
            Some((buffer, first_step)) => {
                let buffer = typed_mut::<T>(buffer, name)?;
                param
                    .par_chunks_mut(UPDATE_CHUNK)
                    .zip(grad.par_chunks(UPDATE_CHUNK))
                    .zip(buffer.par_chunks_mut(UPDATE_CHUNK))
                    .for_each(|((p, g), b)| sgd_update(p, g, Some(b), first_step, s));
            }
        }
        Ok(())
    }

    let mut param_guard = param.storage_mut();
    let grad_guard = grad.storage();
    let mut buffer_guard = momentum_buffer.map(|(b, first)| (b.storage_mut(), first));
    match (&mut *param_guard, &*grad_guard) {
        (Storage::Cpu(p), Storage::Cpu(g)) => {
            let buffer = match &mut buffer_guard {
                Some((guard, first)) => Some((cpu_state(name, guard)?, *first)),
                None => None,
            };
            match p.dtype() {
                DType::F32 => typed_update::<f32>(name, p, g, buffer, s),
                DType::F64 => typed_update::<f64>(name, p, g, buffer, s),
                other => Err(Error::unsupported_dtype("Sgd", other)),
            }
        }
        (Storage::Cuda(p), Storage::Cuda(g)) => {
            let buffer = match &mut buffer_guard {
                Some((guard, first)) => Some((&*cuda_state(name, guard)?, *first)),
                None => None,
            };
            cuda::sgd_update(p, g, buffer, s)
        }
        _ => unreachable!("checked_grad put the gradient on its parameter's device"),
    }
}

fn run_adam(
    name: &str,
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    s: &AdamScalars,
) -> Result<()> {
    fn typed_update<T: Float>(
        name: &str,
        param: &mut CpuStorage,
        grad: &CpuStorage,
        exp_avg: &mut CpuStorage,
        exp_avg_sq: &mut CpuStorage,
        s: &AdamScalars,
    ) -> Result<()> {
        let param = typed_mut::<T>(param, name)?;
        let grad = typed::<T>(grad, name)?;
        let exp_avg = typed_mut::<T>(exp_avg, name)?;
        let exp_avg_sq = typed_mut::<T>(exp_avg_sq, name)?;
        param
            .par_chunks_mut(UPDATE_CHUNK)
            .zip(grad.par_chunks(UPDATE_CHUNK))
            .zip(exp_avg.par_chunks_mut(UPDATE_CHUNK))
            .zip(exp_avg_sq.par_chunks_mut(UPDATE_CHUNK))
            .for_each(|(((p, g), m), v)| adam_update(p, g, m, v, s));
        Ok(())
    }

    let mut param_guard = param.storage_mut();
    let grad_guard = grad.storage();
    let mut exp_avg_guard = exp_avg.storage_mut();
    let mut exp_avg_sq_guard = exp_avg_sq.storage_mut();
    match (&mut *param_guard, &*grad_guard) {
        (Storage::Cpu(p), Storage::Cpu(g)) => {
            let m = cpu_state(name, &mut exp_avg_guard)?;
            let v = cpu_state(name, &mut exp_avg_sq_guard)?;
            match p.dtype() {
                DType::F32 => typed_update::<f32>(name, p, g, m, v, s),
                DType::F64 => typed_update::<f64>(name, p, g, m, v, s),
                other => Err(Error::unsupported_dtype("Adam", other)),
            }
        }
        (Storage::Cuda(p), Storage::Cuda(g)) => {
            let m = cuda_state(name, &mut exp_avg_guard)?;
            let v = cuda_state(name, &mut exp_avg_sq_guard)?;
            cuda::adam_update(p, g, m, v, s)
        }
        _ => unreachable!("checked_grad put the gradient on its parameter's device"),
    }
}

/// The host buffer of a state tensor of a CPU parameter.
fn cpu_state<'a>(name: &str, state: &'a mut Storage) -> Result<&'a mut CpuStorage> {
    match state {
        Storage::Cpu(s) => Ok(s),
        Storage::Cuda(_) => Err(state_device_error(name)),
    }
}

/// The device buffer of a state tensor of a CUDA parameter.
fn cuda_state<'a>(name: &str, state: &'a mut Storage) -> Result<&'a mut CudaStorage> {
    match state {
        Storage::Cuda(s) => Ok(s),
        Storage::Cpu(_) => Err(state_device_error(name)),
    }
}

/// State is created and loaded on its parameter's device, so this only
/// fires if a parameter's storage was moved under the optimizer.
fn state_device_error(name: &str) -> Error {
    Error::invalid(
        "optimizer step",
        format!("{name}: optimizer state lives on another device than its parameter"),
    )
}

// ----- shared bookkeeping --------------------------------------------------

/// The device a profiling scope of an update synchronises: the first
/// parameter's (parameters share one device in kiln's models).
fn params_device<'a>(mut params: impl Iterator<Item = &'a Tensor>) -> Device {
    params.next().map_or(Device::Cpu, Tensor::device)
}

/// Checks the parameter list: unique names, each tensor once (it would
/// otherwise be updated twice per step), float tensors.
fn check_params(optimizer: &'static str, params: &[(String, Tensor)]) -> Result<()> {
    let mut seen_names = HashSet::new();
    let mut seen_tensors = HashSet::new();
    for (name, tensor) in params {
        if !seen_names.insert(name.as_str()) {
            return Err(Error::invalid(
                optimizer,
                format!("parameter name {name} appears twice"),
            ));
        }
        if !seen_tensors.insert(tensor.id()) {
            return Err(Error::invalid(
                optimizer,
                format!("parameter {name} is a tensor already listed under another name"),
            ));
        }
        if !matches!(tensor.dtype(), DType::F32 | DType::F64) {
            return Err(Error::invalid(
                optimizer,
                format!(
                    "parameter {name} has dtype {}, not a float dtype",
                    tensor.dtype()
                ),
            ));
        }
    }
    Ok(())
}

fn check_hyper(optimizer: &'static str, what: &str, value: f64, ok: bool) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            optimizer,
            format!("invalid {what}: {value}"),
        ))
    }
}

/// Names in `tensors` that no parameter's state could have, sorted.
fn unexpected_names(
    tensors: &HashMap<String, Tensor>,
    params: impl Iterator<Item = String>,
    suffixes: &[&str],
) -> Vec<String> {
    let known: HashSet<String> = params
        .flat_map(|p| suffixes.iter().map(move |s| format!("{p}.{s}")))
        .collect();
    let mut unexpected: Vec<String> = tensors
        .keys()
        .filter(|k| !known.contains(*k))
        .cloned()
        .collect();
    unexpected.sort();
    unexpected
}

/// A copy of state tensor `key` converted to `param`'s dtype and device, or
/// a description of what is wrong with it.
fn state_copy(
    tensors: &HashMap<String, Tensor>,
    key: &str,
    param: &Tensor,
) -> std::result::Result<Option<Tensor>, String> {
    let Some(src) = tensors.get(key) else {
        return Ok(None);
    };
    if src.shape() != param.shape() {
        return Err(format!(
            "{key} has shape {}, its parameter {}",
            src.shape(),
            param.shape()
        ));
    }
    src.to_dtype(param.dtype())
        .and_then(|t| t.to_device(param.device()))
        .and_then(|t| deep_copy(&t))
        .map(Some)
        .map_err(|e| format!("{key}: {e}"))
}

/// The step count stored under `key` (a one-element tensor of any dtype).
fn step_count(tensors: &HashMap<String, Tensor>, key: &str) -> std::result::Result<u32, String> {
    let value = tensors
        .get(key)
        .ok_or_else(|| format!("{key} is missing"))?
        .item()
        .map_err(|e| format!("{key}: {e}"))?;
    if value.fract() != 0.0 || !(1.0..=u32::MAX as f64).contains(&value) {
        return Err(format!("{key} = {value} is not a valid step count"));
    }
    Ok(value as u32)
}

fn state_load_error(optimizer: &'static str, problems: Vec<String>) -> Error {
    Error::invalid(
        optimizer,
        format!(
            "cannot load optimizer state: {}; nothing was loaded",
            problems.join("; ")
        ),
    )
}

// ----- SGD -----------------------------------------------------------------

/// Hyper-parameters of [`Sgd`]. The learning rate has no default (as in
/// PyTorch): start from `SgdConfig::new(lr)` and set the rest by field.
#[derive(Clone, Copy, Debug)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl SgdConfig {
    /// Plain SGD: no momentum, no dampening, no weight decay.
    pub fn new(lr: f64) -> Self {
        SgdConfig {
            lr,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

struct SgdSlot {
    name: String,
    param: Tensor,
    momentum_buffer: Option<Tensor>,
}

/// Stochastic gradient descent with optional momentum, as `torch.optim.SGD`.
pub struct Sgd {
    config: SgdConfig,
    slots: Vec<SgdSlot>,
}

impl Sgd {
    pub fn new(params: Vec<(String, Tensor)>, config: SgdConfig) -> Result<Self> {
        const OP: &str = "Sgd";
        check_params(OP, &params)?;
        check_hyper(OP, "learning rate", config.lr, config.lr >= 0.0)?;
        check_hyper(OP, "momentum", config.momentum, config.momentum >= 0.0)?;
        check_hyper(
            OP,
            "weight_decay",
            config.weight_decay,
            config.weight_decay >= 0.0,
        )?;
        if config.nesterov && (config.momentum <= 0.0 || config.dampening != 0.0) {
            return Err(Error::invalid(
                OP,
                "Nesterov momentum requires a momentum > 0 and zero dampening",
            ));
        }
        let slots = params
            .into_iter()
            .map(|(name, param)| SgdSlot {
                name,
                param,
                momentum_buffer: None,
            })
            .collect();
        Ok(Sgd { config, slots })
    }

    pub fn config(&self) -> &SgdConfig {
        &self.config
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let _profile = profile::op(
            "sgd step",
            params_device(self.slots.iter().map(|s| &s.param)),
        );
        let c = self.config;
        let scalars = SgdScalars {
            lr: c.lr,
            momentum: c.momentum,
            dampening: c.dampening,
            weight_decay: c.weight_decay,
            nesterov: c.nesterov,
        };
        for slot in &mut self.slots {
            let Some(grad) = grads.get(&slot.param) else {
                continue;
            };
            let grad = checked_grad(&slot.name, &slot.param, grad)?;
            let buffer = if c.momentum != 0.0 {
                let first_step = slot.momentum_buffer.is_none();
                if first_step {
                    slot.momentum_buffer = Some(slot.param.zeros_like()?);
                }
                slot.momentum_buffer.as_ref().map(|b| (b, first_step))
            } else {
                None
            };
            run_sgd(&slot.name, &slot.param, &grad, buffer, &scalars)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .filter_map(|slot| {
                let buffer = slot.momentum_buffer.as_ref()?;
                Some((format!("{}.momentum_buffer", slot.name), buffer.clone()))
            })
            .collect()
    }

    fn load_state_dict(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mut problems = Vec::new();
        let unexpected = unexpected_names(
            tensors,
            self.slots.iter().map(|s| s.name.clone()),
            &["momentum_buffer"],
        );
        if !unexpected.is_empty() {
            problems.push(format!("unexpected tensors: {}", unexpected.join(", ")));
        }
        let mut buffers = Vec::new();
        for slot in &self.slots {
            let key = format!("{}.momentum_buffer", slot.name);
            match state_copy(tensors, &key, &slot.param) {
                Ok(buffer) => buffers.push(buffer),
                Err(problem) => problems.push(problem),
            }
        }
        if !problems.is_empty() {
            return Err(state_load_error("Sgd", problems));
        }
        for (slot, buffer) in self.slots.iter_mut().zip(buffers) {
            slot.momentum_buffer = buffer;
        }
        Ok(())
    }
}

// ----- Adam / AdamW --------------------------------------------------------

/// Hyper-parameters of [`Adam`] and [`AdamW`].
#[derive(Clone, Copy, Debug)]
pub struct AdamConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamConfig {
    /// PyTorch's `Adam` defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay.
    pub fn adam() -> Self {
        AdamConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// PyTorch's `AdamW` defaults: as Adam with weight decay 0.01.
    pub fn adamw() -> Self {
        AdamConfig {
            weight_decay: 0.01,
            ..Self::adam()
        }
    }
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self::adam()
    }
}

/// A parameter's Adam state: created on its first step.
struct AdamMoments {
    /// Steps taken by this parameter (t in the bias corrections).
    step: u32,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

struct AdamSlot {
    name: String,
    param: Tensor,
    moments: Option<AdamMoments>,
}

/// What Adam and AdamW share; they differ only in how weight decay applies.
struct AdamCore {
    config: AdamConfig,
    decoupled_weight_decay: bool,
    slots: Vec<AdamSlot>,
}

const ADAM_STATE: [&str; 3] = ["step", "exp_avg", "exp_avg_sq"];

impl AdamCore {
    fn new(
        op: &'static str,
        params: Vec<(String, Tensor)>,
        config: AdamConfig,
        decoupled_weight_decay: bool,
    ) -> Result<Self> {
        check_params(op, &params)?;
        let (beta1, beta2) = config.betas;
        check_hyper(op, "learning rate", config.lr, config.lr >= 0.0)?;
        check_hyper(op, "eps", config.eps, config.eps >= 0.0)?;
        check_hyper(op, "beta1", beta1, (0.0..1.0).contains(&beta1))?;
        check_hyper(op, "beta2", beta2, (0.0..1.0).contains(&beta2))?;
        check_hyper(
            op,
            "weight_decay",
            config.weight_decay,
            config.weight_decay >= 0.0,
        )?;
        let slots = params
            .into_iter()
            .map(|(name, param)| AdamSlot {
                name,
                param,
                moments: None,
            })
            .collect();
        Ok(AdamCore {
            config,
            decoupled_weight_decay,
            slots,
        })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let name = if self.decoupled_weight_decay {
            "adamw step"
        } else {
            "adam step"
        };
        let _profile = profile::op(name, params_device(self.slots.iter().map(|s| &s.param)));
        for slot in &mut self.slots {
            let Some(grad) = grads.get(&slot.param) else {
                continue;
            };
            let grad = checked_grad(&slot.name, &slot.param, grad)?;
            if slot.moments.is_none() {
                slot.moments = Some(AdamMoments {
                    step: 0,
                    exp_avg: slot.param.zeros_like()?,
                    exp_avg_sq: slot.param.zeros_like()?,
                });
            }
            let moments = slot.moments.as_mut().expect("created above");
            moments.step = moments.step.checked_add(1).ok_or_else(|| {
                Error::invalid("Adam", format!("{}: step count overflow", slot.name))
            })?;
            let scalars =
                AdamScalars::at_step(&self.config, self.decoupled_weight_decay, moments.step);
            run_adam(
                &slot.name,
                &slot.param,
                &grad,
                &moments.exp_avg,
                &moments.exp_avg_sq,
                &scalars,
            )?;
        }
        Ok(())
    }

    fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for slot in &self.slots {
            let Some(m) = &slot.moments else { continue };
            let step = Tensor::from_indices(vec![m.step], ()).expect("one value fills a scalar");
            out.push((format!("{}.step", slot.name), step));
            out.push((format!("{}.exp_avg", slot.name), m.exp_avg.clone()));
            out.push((format!("{}.exp_avg_sq", slot.name), m.exp_avg_sq.clone()));
        }
        out
    }

    fn load_state_dict(
        &mut self,
        op: &'static str,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<()> {
        let mut problems = Vec::new();
        let unexpected = unexpected_names(
            tensors,
            self.slots.iter().map(|s| s.name.clone()),
            &ADAM_STATE,
        );
        if !unexpected.is_empty() {
            problems.push(format!("unexpected tensors: {}", unexpected.join(", ")));
        }
        let mut loaded = Vec::new();
        for slot in &self.slots {
            let keys = ADAM_STATE.map(|s| format!("{}.{s}", slot.name));
            let present: Vec<&String> = keys.iter().filter(|k| tensors.contains_key(*k)).collect();
            if present.is_empty() {
                loaded.push(None);
                continue;
            }
            if present.len() != keys.len() {
                let missing: Vec<&str> = keys
                    .iter()
                    .filter(|k| !tensors.contains_key(*k))
                    .map(|k| k.as_str())
                    .collect();
                problems.push(format!("incomplete state, missing {}", missing.join(", ")));
                continue;
            }
            let step = step_count(tensors, &keys[0]);
            let exp_avg = state_copy(tensors, &keys[1], &slot.param);
            let exp_avg_sq = state_copy(tensors, &keys[2], &slot.param);
            match (step, exp_avg, exp_avg_sq) {
                (Ok(step), Ok(Some(exp_avg)), Ok(Some(exp_avg_sq))) => {
                    loaded.push(Some(AdamMoments {
                        step,
                        exp_avg,
                        exp_avg_sq,
                    }))
                }
                (step, exp_avg, exp_avg_sq) => {
                    problems.extend(step.err());
                    problems.extend(exp_avg.err());
                    problems.extend(exp_avg_sq.err());
                }
            }
        }
        if !problems.is_empty() {
            return Err(state_load_error(op, problems));
        }
        for (slot, moments) in self.slots.iter_mut().zip(loaded) {
            slot.moments = moments;
        }
        Ok(())
    }
}

/// Adam with L2 weight decay (g ← g + wd·p), as `torch.optim.Adam`.
pub struct Adam(AdamCore);

impl Adam {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamConfig) -> Result<Self> {
        Ok(Adam(AdamCore::new("Adam", params, config, false)?))
    }

    pub fn config(&self) -> &AdamConfig {
        &self.0.config
    }
}

/// Adam with decoupled weight decay (p ← p·(1 − lr·wd) before the Adam
/// step), as `torch.optim.AdamW`.
pub struct AdamW(AdamCore);

impl AdamW {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamConfig) -> Result<Self> {
        Ok(AdamW(AdamCore::new("AdamW", params, config, true)?))
    }

    pub fn config(&self) -> &AdamConfig {
        &self.0.config
    }
}

/// Adam and AdamW differ only in how AdamCore applies weight decay; both
/// expose it through the same Optimizer implementation.
macro_rules! adam_optimizer {
    ($name:ident) => {
        impl Optimizer for $name {
            fn step(&mut self, grads: &GradStore) -> Result<()> {
                self.0.step(grads)
            }
            fn learning_rate(&self) -> f64 {
                self.0.config.lr
            }
            fn set_learning_rate(&mut self, lr: f64) {
                self.0.config.lr = lr;
            }
            fn state_dict(&self) -> Vec<(String, Tensor)> {
                self.0.state_dict()
            }
            fn load_state_dict(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
                self.0.load_state_dict(stringify!($name), tensors)
            }
        }
    };
}

adam_optimizer!(Adam);
adam_optimizer!(AdamW);

// ----- gradient clipping ---------------------------------------------------

/// Scales the gradients of `params` so that their joint L2 norm is at most
/// `max_norm`, as `torch.nn.utils.clip_grad_norm_`: with
/// coef = max_norm / (norm + 1e-6), every gradient is multiplied by coef
/// when coef < 1. Returns the norm before clipping. Scaled gradients are
/// new tensors (a gradient may share storage with another one). CUDA
/// gradients are reduced on their device; only the total (one f64 per
/// device) comes back to the host, and the scaling runs on the device.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[Tensor], max_norm: f64) -> Result<f64> {
    let _profile = profile::op("clip_grad_norm", params_device(params.iter()));
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(Error::invalid(
            "clip_grad_norm",
            format!("max_norm must be a non-negative number, got {max_norm}"),
        ));
    }
    let mut sum_of_squares = 0.0f64;
    let mut cuda_grads = Vec::new();
    for param in params {
        let Some(grad) = grads.get(param) else {
            continue;
        };
        if let Device::Cuda(_) = grad.device() {
            cuda_grads.push(grad.clone());
            continue;
        }
        sum_of_squares += grad.with_cpu(|s| -> Result<f64> {
            Ok(crate::float_slice!("clip_grad_norm", s, |v| v
                .iter()
                .map(|x| {
                    let x = x.to_f64();
                    x * x
                })
                .sum::<f64>()))
        })?;
    }
    sum_of_squares += cuda::sum_of_squares(&cuda_grads)?;
    let norm = sum_of_squares.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        let _no_grad = crate::no_grad();
        for param in params {
            if let Some(grad) = grads.get(param) {
                let scaled = grad.mul_scalar(coef)?;
                grads.insert(param, scaled);
            }
        }
    }
    Ok(norm)
}

// ----- CUDA launch glue ------------------------------------------------------

/// Launches of kernels/optim.cu: the fused updates, in place on the
/// parameter and state buffers, and Σ g² for clipping.
mod cuda {
    use std::collections::BTreeMap;

    use cudarc::driver::LaunchConfig;

    use super::{AdamScalars, SgdScalars};
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
            pad: u32,
        }
    }

    kernel_params! {
        pub struct AdamParams {
            param: u64,
            grad: u64,
            exp_avg: u64,
            exp_avg_sq: u64,
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
    const _: () = assert!(std::mem::size_of::<SgdParams>() == 64);
    const _: () = assert!(std::mem::size_of::<AdamParams>() == 80);
    const _: () = assert!(std::mem::size_of::<SumOfSquaresParams>() == 24);
    const _: () = assert!(std::mem::size_of::<FinishSumOfSquaresParams>() == 24);

    /// One SGD step in place; the scalars are rounded to f32 as the CPU
    /// kernel rounds them with `T::from_f64`.
    pub(super) fn sgd_update(
        param: &CudaStorage,
        grad: &CudaStorage,
        momentum_buffer: Option<(&CudaStorage, bool)>,
        s: &SgdScalars,
    ) -> Result<()> {
        require_f32("Sgd", &[param, grad])?;
        if let Some((buffer, _)) = momentum_buffer {
            require_f32("Sgd", &[buffer])?;
        }
        let n = param.len();
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
            pad: 0,
        };
        param
            .device()
            .launch(FILE, "sgd_update", launch_1d(n), params)
    }

    /// One Adam/AdamW step in place, scalars rounded to f32 as on the CPU.
    pub(super) fn adam_update(
        param: &CudaStorage,
        grad: &CudaStorage,
        exp_avg: &CudaStorage,
        exp_avg_sq: &CudaStorage,
        s: &AdamScalars,
    ) -> Result<()> {
        require_f32("Adam", &[param, grad, exp_avg, exp_avg_sq])?;
        let n = param.len();
        let params = AdamParams {
            param: param.ptr(),
            grad: grad.ptr(),
            exp_avg: exp_avg.ptr(),
            exp_avg_sq: exp_avg_sq.ptr(),
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
}
