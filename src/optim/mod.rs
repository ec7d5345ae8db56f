//! Optimizers with exactly PyTorch's update rules: [`Sgd`] (momentum,
//! dampening, Nesterov, L2 weight decay, maximize), [`Adam`] (L2 weight decay
//! added to the gradient) and [`AdamW`] (decoupled weight decay), both with
//! PyTorch's `amsgrad` and `maximize`.
//!
//! Each optimizer has one fused CPU kernel (`sgd_update`, `adam_update`, and
//! `adam_amsgrad_update` for AMSGrad's third state tensor): a
//! plain generic function over `T: Float` that updates a parameter and its
//! state in place, element by element, with no allocation; the CUDA backend
//! mirrors it in `kernels/optim.cu`. State (momentum buffers, Adam moments)
//! is created on a parameter's first step and can be saved and restored
//! through `state_dict` / `load_state_dict`, so a resumed run continues
//! bit-identically. Under [`crate::profile`], a whole update is one scope
//! ("sgd step", "adam step", "adamw step"), as is `clip_grad_norm`.

//!
//! Split like `src/ops/`: the fused CPU kernels (`cpu`), their CUDA launch
//! glue (`cuda`), the per-parameter dispatch between the two (`dispatch`),
//! the checks and state (de)serialisation every optimizer shares
//! (`bookkeeping`), one file per optimizer (`sgd`, `adam`), and gradient
//! clipping (`clip`), loss scaling for f16 (`grad_scaler`), and the 16-bit
//! forward copies the updates can write beside the parameters (`forward_copy`).

mod adam;
#[cfg(test)]
mod adam_state_tests;
mod bookkeeping;
mod clip;
mod cpu;
mod cuda;
mod dispatch;
mod forward_copy;
mod grad_scaler;
mod sgd;

use std::collections::HashMap;

use crate::autograd::GradStore;
use crate::error::Result;
use crate::tensor::Tensor;

pub use adam::{Adam, AdamConfig, AdamW};
pub use clip::clip_grad_norm;
pub use cpu::{
    AdamScalars, SgdScalars, adam_amsgrad_update, adam_update, sgd_update, unscale_and_check_finite,
};
pub use forward_copy::{CopyRounding, ForwardCopies, round_bf16_stochastic};
pub use grad_scaler::{GradScaler, GradScalerConfig};
pub use sgd::{Sgd, SgdConfig};

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

    /// Keeps (or with `None`, stops keeping) a 16-bit copy of each
    /// parameter, written by every update in the same pass, that autocast's
    /// forward takes instead of converting the parameter (see
    /// [`ForwardCopies`]). Parameters already stepped get theirs at once.
    fn keep_forward_copies(&mut self, copies: Option<ForwardCopies>) -> Result<()>;
}
