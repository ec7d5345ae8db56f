//! SGD with momentum, dampening, Nesterov and L2 weight decay, as
//! `torch.optim.SGD`.

use std::collections::HashMap;

use super::Optimizer;
use super::bookkeeping::{
    check_hyper, check_params, params_device, state_copy, state_load_error, unexpected_names,
};
use super::cpu::SgdScalars;
use super::dispatch::{checked_grad, run_sgd};
use super::forward_copy::{CopyRounding, ForwardCopies, copy_buffer};
use crate::autograd::GradStore;
use crate::error::{Error, Result};
use crate::profile;
use crate::tensor::Tensor;

/// Hyper-parameters of [`Sgd`]. The learning rate has no default (as in
/// PyTorch): start from `SgdConfig::new(lr)` and set the rest by field.
#[derive(Clone, Copy, Debug)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    /// Ascend the objective (PyTorch's `maximize`): the gradient is negated
    /// before everything else, weight decay included.
    pub maximize: bool,
}

impl SgdConfig {
    /// Plain SGD: no momentum, no dampening, no weight decay, minimising.
    pub fn new(lr: f64) -> Self {
        SgdConfig {
            lr,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
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
    forward_copies: Option<ForwardCopies>,
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
        Ok(Sgd {
            config,
            slots,
            forward_copies: None,
        })
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
            maximize: c.maximize,
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
            let copy = match &self.forward_copies {
                Some(copies) => {
                    // Round to nearest even only (keep_forward_copies): no step enters.
                    let format = copies.format_at(0, &slot.name);
                    Some((copy_buffer(&slot.param, format.dtype())?, format))
                }
                None => None,
            };
            let target = copy.as_ref().map(|(buffer, format)| (&**buffer, *format));
            run_sgd(&slot.name, &slot.param, &grad, buffer, &scalars, target)?;
            if let Some((buffer, _)) = copy {
                slot.param.set_forward_copy(buffer);
            }
        }
        Ok(())
    }

    /// Copies rounded to nearest even only: SGD keeps no step count for
    /// stochastic rounding to draw its bits from (and a resumed run could
    /// not recreate them). Such copies hold what autocast would compute, so
    /// a parameter without one yet (before its first step, or after a
    /// resume) loses nothing.
    fn keep_forward_copies(&mut self, copies: Option<ForwardCopies>) -> Result<()> {
        if let Some(copies) = &copies {
            copies.check("Sgd")?;
            if copies.rounding != CopyRounding::NearestEven {
                return Err(Error::invalid(
                    "Sgd",
                    "stochastic rounding of forward copies needs a step count, which Sgd \
                     does not keep; use CopyRounding::NearestEven (or Adam/AdamW)",
                ));
            }
        }
        self.forward_copies = copies;
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
