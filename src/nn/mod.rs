//! Neural-network building blocks with PyTorch's semantics and state-dict
//! names, so that a `state_dict()` written by PyTorch loads into the kiln
//! model of the same structure and the other way round.
//!
//! A [`Module`] holds its parameters and buffers as [`Tensor`] handles and
//! exposes them through one method, [`Module::visit`]; everything else
//! (`named_parameters`, `state_dict`, `load_state_dict`, ...) is derived from
//! it. Modules are used through `&self` (they are shared between threads and
//! by optimizers), so the little state that changes — the train/eval flag,
//! dropout's call counter — lives in atomics, and running statistics are
//! updated in place with [`Tensor::assign`].

mod activation;
mod attention;
mod container;
mod conv;
mod dropout;
mod embedding;
pub mod init;
mod linear;
mod norm;

use std::collections::{HashMap, HashSet};

pub use activation::{Flatten, Gelu, LeakyRelu, Relu, Sigmoid, Tanh};
pub use attention::{CausalSelfAttention, KvCache};
pub use container::Sequential;
pub use conv::{Conv2d, ConvTranspose2d};
pub use dropout::Dropout;
pub use embedding::Embedding;
pub use init::Init;
pub use linear::Linear;
pub use norm::{BatchNorm2d, BatchNorm2dOptions, LayerNorm};

use crate::error::{Error, Result};
use crate::tensor::{Tensor, TensorId};

/// What a module's tensor is for: parameters are trained (they require
/// grad and optimizers update them); buffers are state that is saved but not
/// trained (BatchNorm's running statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    Parameter,
    Buffer,
}

/// A layer or a model: a forward function plus the tensors it owns.
pub trait Module: Send + Sync {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// Calls `visitor(name, tensor, role)` for every parameter and buffer,
    /// names prefixed by `prefix` ("" at the top; children get
    /// "prefix.child", see [`child_prefix`]), in registration order.
    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole));

    /// Switches train/eval behaviour (BatchNorm, Dropout); containers recurse.
    fn set_training(&self, training: bool) {
        let _ = training;
    }

    /// Training mode (PyTorch's `model.train()`), the mode modules start in.
    fn train(&self) {
        self.set_training(true);
    }

    /// Evaluation mode: BatchNorm uses its running statistics, Dropout is the identity.
    fn eval(&self) {
        self.set_training(false);
    }

    /// Parameters with their state-dict names. A tensor registered under two
    /// names (tied weights) is listed once, under the first.
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut seen: HashSet<TensorId> = HashSet::new();
        let mut out = Vec::new();
        self.visit("", &mut |name, tensor, role| {
            if role == TensorRole::Parameter && seen.insert(tensor.id()) {
                out.push((name.to_string(), tensor.clone()));
            }
        });
        out
    }

    /// Parameters in registration order (what an optimizer takes).
    fn parameters(&self) -> Vec<Tensor> {
        self.named_parameters()
            .into_iter()
            .map(|(_, t)| t)
            .collect()
    }

    /// Buffers with their state-dict names.
    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        self.visit("", &mut |name, tensor, role| {
            if role == TensorRole::Buffer {
                out.push((name.to_string(), tensor.clone()));
            }
        });
        out
    }

    /// Every parameter and buffer, by name, in registration order. The
    /// handles are live: they see later updates of the model.
    fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        self.visit("", &mut |name, tensor, _| {
            out.push((name.to_string(), tensor.clone()));
        });
        out
    }

    /// Copies `tensors` into the module's parameters and buffers, in place
    /// (every handle to them, e.g. an optimizer's, sees the new values),
    /// converting dtype where needed. Every name must match: if any tensor
    /// is missing, unexpected or of the wrong shape the error lists all of
    /// them and nothing is loaded.
    fn load_state_dict(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mut targets: Vec<(String, Tensor)> = Vec::new();
        self.visit("", &mut |name, tensor, _| {
            targets.push((name.to_string(), tensor.clone()));
        });
        let expected: HashSet<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();

        let mut missing = Vec::new();
        let mut mis_shaped = Vec::new();
        let mut failed = Vec::new();
        let mut ready: Vec<(&Tensor, Tensor)> = Vec::new();
        for (name, target) in &targets {
            let Some(source) = tensors.get(name) else {
                missing.push(name.clone());
                continue;
            };
            if source.shape() != target.shape() {
                mis_shaped.push(format!(
                    "{name} (checkpoint {}, model {})",
                    source.shape(),
                    target.shape()
                ));
                continue;
            }
            match source
                .to_dtype(target.dtype())
                .and_then(|t| t.to_device(target.device()))
            {
                Ok(converted) => ready.push((target, converted)),
                Err(e) => failed.push(format!("{name} ({e})")),
            }
        }
        let mut unexpected: Vec<String> = tensors
            .keys()
            .filter(|k| !expected.contains(k.as_str()))
            .cloned()
            .collect();
        unexpected.sort();

        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!("missing tensors: {}", missing.join(", ")));
        }
        if !unexpected.is_empty() {
            problems.push(format!("unexpected tensors: {}", unexpected.join(", ")));
        }
        if !mis_shaped.is_empty() {
            problems.push(format!("shape mismatches: {}", mis_shaped.join(", ")));
        }
        if !failed.is_empty() {
            problems.push(format!("cannot convert: {}", failed.join(", ")));
        }
        if !problems.is_empty() {
            return Err(Error::invalid(
                "load_state_dict",
                format!(
                    "{}; nothing was loaded (does the checkpoint come from the same model architecture?)",
                    problems.join("; ")
                ),
            ));
        }
        for (target, value) in ready {
            target.assign(&value)?;
        }
        Ok(())
    }

    /// Total number of trainable values.
    fn num_parameters(&self) -> usize {
        self.named_parameters().iter().map(|(_, t)| t.numel()).sum()
    }
}

/// The name prefix of child `name` under `prefix` ("" at the top level).
pub fn child_prefix(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Visits `child`'s tensors under `prefix.name` (for `Module::visit` of a
/// module built from named children).
pub fn visit_child(
    prefix: &str,
    name: &str,
    child: &dyn Module,
    visitor: &mut dyn FnMut(&str, &Tensor, TensorRole),
) {
    child.visit(&child_prefix(prefix, name), visitor);
}

/// Visits one of a module's own tensors, named `prefix.name`.
pub(crate) fn visit_tensor(
    prefix: &str,
    name: &str,
    tensor: &Tensor,
    role: TensorRole,
    visitor: &mut dyn FnMut(&str, &Tensor, TensorRole),
) {
    visitor(&child_prefix(prefix, name), tensor, role);
}

/// Visits the usual `weight` and optional `bias` parameters of a layer.
pub(crate) fn visit_weight_and_bias(
    prefix: &str,
    weight: &Tensor,
    bias: Option<&Tensor>,
    visitor: &mut dyn FnMut(&str, &Tensor, TensorRole),
) {
    visit_tensor(prefix, "weight", weight, TensorRole::Parameter, visitor);
    if let Some(bias) = bias {
        visit_tensor(prefix, "bias", bias, TensorRole::Parameter, visitor);
    }
}
