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
//! bit-identically.

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;

use crate::autograd::GradStore;
use crate::error::{Error, Result};
use crate::storage::{CpuStorage, Float, Storage};
use crate::tensor::{DType, Tensor};

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
    let Storage::Cpu(p) = &mut *param_guard else {
        return Err(no_cuda_update());
    };
    let Storage::Cpu(g) = &*grad_guard else {
        return Err(no_cuda_update());
    };
    let buffer = match &mut buffer_guard {
        Some((guard, first)) => {
            let Storage::Cpu(b) = &mut **guard else {
                return Err(no_cuda_update());
            };
            Some((b, *first))
        }
        None => None,
    };
    match p.dtype() {
        DType::F32 => typed_update::<f32>(name, p, g, buffer, s),
        DType::F64 => typed_update::<f64>(name, p, g, buffer, s),
        other => Err(Error::unsupported_dtype("Sgd", other)),
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
    let Storage::Cpu(p) = &mut *param_guard else {
        return Err(no_cuda_update());
    };
    let Storage::Cpu(g) = &*grad_guard else {
        return Err(no_cuda_update());
    };
    let Storage::Cpu(m) = &mut *exp_avg_guard else {
        return Err(no_cuda_update());
    };
    let Storage::Cpu(v) = &mut *exp_avg_sq_guard else {
        return Err(no_cuda_update());
    };
    match p.dtype() {
        DType::F32 => typed_update::<f32>(name, p, g, m, v, s),
        DType::F64 => typed_update::<f64>(name, p, g, m, v, s),
        other => Err(Error::unsupported_dtype("Adam", other)),
    }
}

// ----- shared bookkeeping --------------------------------------------------

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

impl Optimizer for Adam {
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
        self.0.load_state_dict("Adam", tensors)
    }
}

impl Optimizer for AdamW {
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
        self.0.load_state_dict("AdamW", tensors)
    }
}

// ----- gradient clipping ---------------------------------------------------

/// Scales the gradients of `params` so that their joint L2 norm is at most
/// `max_norm`, as `torch.nn.utils.clip_grad_norm_`: with
/// coef = max_norm / (norm + 1e-6), every gradient is multiplied by coef
/// when coef < 1. Returns the norm before clipping. Scaled gradients are
/// new tensors (a gradient may share storage with another one).
pub fn clip_grad_norm(grads: &mut GradStore, params: &[Tensor], max_norm: f64) -> Result<f64> {
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(Error::invalid(
            "clip_grad_norm",
            format!("max_norm must be a non-negative number, got {max_norm}"),
        ));
    }
    let mut sum_of_squares = 0.0f64;
    for param in params {
        let Some(grad) = grads.get(param) else {
            continue;
        };
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

/// Optimizer updates on CUDA tensors arrive with the fused kernels of kernels/optim.cu.
fn no_cuda_update() -> Error {
    Error::Cuda {
        op: "optimizer step",
        msg: "parameters on a CUDA device are not supported by this optimizer yet; keep them on the CPU".into(),
    }
}
