//! Adam (L2 weight decay added to the gradient) and AdamW (decoupled weight
//! decay), as `torch.optim.Adam` / `torch.optim.AdamW`, with their `amsgrad`
//! and `maximize` options.

use std::collections::HashMap;

use super::Optimizer;
use super::bookkeeping::{
    check_hyper, check_params, params_device, state_copy, state_load_error, step_count,
    unexpected_names,
};
use super::cpu::AdamScalars;
use super::dispatch::{AdamStateRefs, checked_grad, run_adam};
use super::forward_copy::{ForwardCopies, copy_buffer, refresh_copy};
use crate::autograd::GradStore;
use crate::error::{Error, Result};
use crate::profile;
use crate::tensor::Tensor;

/// Hyper-parameters of [`Adam`] and [`AdamW`].
#[derive(Clone, Copy, Debug)]
pub struct AdamConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// AMSGrad (PyTorch's `amsgrad`): divide by the running max of the
    /// second moment instead of the second moment itself, so the effective
    /// step size never grows. Keeps a third state tensor, `max_exp_avg_sq`.
    pub amsgrad: bool,
    /// Ascend the objective (PyTorch's `maximize`): the gradient is negated
    /// before everything else, L2 weight decay included.
    pub maximize: bool,
}

impl AdamConfig {
    /// PyTorch's `Adam` defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, no
    /// weight decay, no AMSGrad, minimising.
    pub fn adam() -> Self {
        AdamConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            maximize: false,
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
    /// AMSGrad's running max of `exp_avg_sq`; present exactly when amsgrad is on.
    max_exp_avg_sq: Option<Tensor>,
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
    forward_copies: Option<ForwardCopies>,
}

/// The state of every parameter, under PyTorch's names ...
pub(super) const ADAM_STATE: [&str; 3] = ["step", "exp_avg", "exp_avg_sq"];
/// ... and the one AMSGrad adds.
pub(super) const AMSGRAD_STATE: &str = "max_exp_avg_sq";

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
            forward_copies: None,
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
                    max_exp_avg_sq: if self.config.amsgrad {
                        Some(slot.param.zeros_like()?)
                    } else {
                        None
                    },
                });
            }
            let moments = slot.moments.as_mut().expect("created above");
            moments.step = moments.step.checked_add(1).ok_or_else(|| {
                Error::invalid("Adam", format!("{}: step count overflow", slot.name))
            })?;
            let scalars =
                AdamScalars::at_step(&self.config, self.decoupled_weight_decay, moments.step);
            let copy = match &self.forward_copies {
                Some(copies) => {
                    let format = copies.format_at(moments.step, &slot.name);
                    Some((copy_buffer(&slot.param, format.dtype())?, format))
                }
                None => None,
            };
            run_adam(
                &slot.name,
                &slot.param,
                &grad,
                AdamStateRefs {
                    exp_avg: &moments.exp_avg,
                    exp_avg_sq: &moments.exp_avg_sq,
                    max_exp_avg_sq: moments.max_exp_avg_sq.as_ref(),
                },
                &scalars,
                copy.as_ref().map(|(buffer, format)| (&**buffer, *format)),
            )?;
            if let Some((buffer, _)) = copy {
                slot.param.set_forward_copy(buffer);
            }
        }
        Ok(())
    }

    fn keep_forward_copies(
        &mut self,
        op: &'static str,
        copies: Option<ForwardCopies>,
    ) -> Result<()> {
        if let Some(copies) = &copies {
            copies.check(op)?;
        }
        self.forward_copies = copies;
        self.refresh_forward_copies()
    }

    /// Writes each stepped parameter's copy as its last update did (after a
    /// state load, or when copies are switched on mid-run).
    fn refresh_forward_copies(&self) -> Result<()> {
        let Some(copies) = &self.forward_copies else {
            return Ok(());
        };
        for slot in &self.slots {
            if let Some(moments) = &slot.moments {
                refresh_copy(&slot.param, copies.format_at(moments.step, &slot.name))?;
            }
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
            if let Some(max_exp_avg_sq) = &m.max_exp_avg_sq {
                let key = format!("{}.{AMSGRAD_STATE}", slot.name);
                out.push((key, max_exp_avg_sq.clone()));
            }
        }
        out
    }

    fn load_state_dict(
        &mut self,
        op: &'static str,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<()> {
        let amsgrad = self.config.amsgrad;
        let mut problems = Vec::new();
        // AMSGrad's tensor is known either way: with amsgrad off it gets the
        // mismatch message below instead of "unexpected".
        let unexpected = unexpected_names(
            tensors,
            self.slots.iter().map(|s| s.name.clone()),
            &[ADAM_STATE.as_slice(), &[AMSGRAD_STATE]].concat(),
        );
        if !unexpected.is_empty() {
            problems.push(format!("unexpected tensors: {}", unexpected.join(", ")));
        }
        let mut loaded = Vec::new();
        for slot in &self.slots {
            let keys = ADAM_STATE.map(|s| format!("{}.{s}", slot.name));
            let max_key = format!("{}.{AMSGRAD_STATE}", slot.name);
            let has_max = tensors.contains_key(&max_key);
            let present: Vec<&String> = keys.iter().filter(|k| tensors.contains_key(*k)).collect();
            if present.is_empty() && !has_max {
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
            if has_max != amsgrad {
                problems.push(amsgrad_mismatch(&slot.name, amsgrad));
                continue;
            }
            let step = step_count(tensors, &keys[0]);
            let exp_avg = state_copy(tensors, &keys[1], &slot.param);
            let exp_avg_sq = state_copy(tensors, &keys[2], &slot.param);
            let max_exp_avg_sq = state_copy(tensors, &max_key, &slot.param);
            match (step, exp_avg, exp_avg_sq, max_exp_avg_sq) {
                (Ok(step), Ok(Some(exp_avg)), Ok(Some(exp_avg_sq)), Ok(max_exp_avg_sq)) => loaded
                    .push(Some(AdamMoments {
                        step,
                        exp_avg,
                        exp_avg_sq,
                        max_exp_avg_sq,
                    })),
                (step, exp_avg, exp_avg_sq, max_exp_avg_sq) => {
                    problems.extend(step.err());
                    problems.extend(exp_avg.err());
                    problems.extend(exp_avg_sq.err());
                    problems.extend(max_exp_avg_sq.err());
                }
            }
        }
        if !problems.is_empty() {
            return Err(state_load_error(op, problems));
        }
        for (slot, moments) in self.slots.iter_mut().zip(loaded) {
            slot.moments = moments;
        }
        self.refresh_forward_copies()
    }
}

/// Why a parameter's saved state does not fit this optimizer's `amsgrad`:
/// AMSGrad's running max cannot be made up (zeros would let the step size
/// jump) nor dropped silently (the run would change algorithm).
fn amsgrad_mismatch(param: &str, amsgrad: bool) -> String {
    if amsgrad {
        format!(
            "{param}.{AMSGRAD_STATE} is missing: the state of {param} was saved with amsgrad \
             off; resume it with AdamConfig {{ amsgrad: false, .. }}"
        )
    } else {
        format!(
            "{param}.{AMSGRAD_STATE} is AMSGrad state but amsgrad is off; resume it with \
             AdamConfig {{ amsgrad: true, .. }}"
        )
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
            fn keep_forward_copies(&mut self, copies: Option<ForwardCopies>) -> Result<()> {
                self.0.keep_forward_copies(stringify!($name), copies)
            }
        }
    };
}

adam_optimizer!(Adam);
adam_optimizer!(AdamW);
