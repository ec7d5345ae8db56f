//! # kiln: tensors and reverse-mode automatic differentiation
//!
//! kiln is a small tensor library whose gradients you can follow from
//! `loss.backward()` to the one rule of each op. This page is the tour.
//!
//! ## 1. Tensors
//!
//! A [`Tensor`] is a cheap-to-clone handle to contiguous, row-major numbers
//! with a [`Shape`], a [`DType`] (`f32` to work in, `f64` for checking
//! gradients, `u32` for indices) and a [`Device`]. There are no strided views:
//! `permute`, `narrow` and friends copy, so every op is one kernel with a cost
//! you can read off.
//!
//! ## 2. Building a graph
//!
//! Mark the leaves you want gradients for with [`Tensor::requires_grad_`].
//! Every op on such tensors returns a tensor that remembers a *node*: the op's
//! inputs and a [`Backward`] rule — a struct in the op's module (for example
//! `ops::activation`) whose `backward` maps dL/d(output) to dL/d(input), with
//! the math written beside it. Ops on tensors that need no gradient record
//! nothing, and neither does anything inside a [`no_grad`] scope.
//!
//! ## 3. Walking it backwards
//!
//! [`Tensor::backward`] starts from a scalar loss with dL/dL = 1 and visits the
//! graph in reverse topological order (an explicit stack, not recursion, so a
//! deep network cannot overflow the call stack). At each node it calls the
//! rule, and when a tensor feeds several ops, the gradients arriving from each
//! are summed — the multivariable chain rule. The gradients of the leaves come
//! back in a [`GradStore`], keyed by tensor id; optimizers read them from there.
//!
//! ```
//! use kiln::Tensor;
//!
//! // f(x, w) = Σ tanh(x · w)
//! let x = Tensor::from_vec(vec![0.5f64, -1.0, 2.0], [3])?.requires_grad_();
//! let w = Tensor::from_vec(vec![1.5f64], [1])?.requires_grad_();
//! let loss = x.mul(&w)?.tanh()?.sum_all()?;
//! let grads = loss.backward()?;
//!
//! // df/dx_i = w · (1 − tanh²(x_i·w)); df/dw = Σ x_i · (1 − tanh²(x_i·w))
//! let dx = grads.get(&x).unwrap().to_vec::<f64>()?;
//! let expected: Vec<f64> = [0.5f64, -1.0, 2.0]
//!     .iter()
//!     .map(|&xi| 1.5 * (1.0 - (xi * 1.5f64).tanh().powi(2)))
//!     .collect();
//! assert!(dx.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-12));
//! # Ok::<(), kiln::Error>(())
//! ```
//!
//! ## 4. Trusting the rules
//!
//! Every rule is checked by [`gradcheck::gradcheck`] against central finite
//! differences in `f64`, and every op's semantics against PyTorch's output
//! (`tests/golden`).
//!
//! ## 5. Seeing it
//!
//! - [`autograd::graph()`] returns the graph `backward()` would walk (ops,
//!   leaves with their parameter names, edges the way gradients flow) and
//!   renders it as Graphviz DOT; [`autograd::module_scope`] groups a
//!   module's ops so that repeated blocks collapse into boxes. From the
//!   command line: `kiln graph gan|vae|gpt --out graph.svg [--depth 1]`.
//! - [`autograd::trace()`] records a backward pass rule by rule: the shapes and
//!   norms of the gradient each rule received and returned, as a table.
//! - [`profile`] times each op and each backward rule of a training step;
//!   `kiln train ... --profile N` prints that table for N steps and writes
//!   `profile.md` and `profile.json`.
//! - [`models::gpt::Gpt::generate`] keeps each layer's keys and values
//!   between tokens ([`nn::KvCache`]); `kiln generate --no-kv-cache` turns
//!   the cache off to compare.

pub mod atomic_file;
pub mod autocast;
pub mod autograd;
pub mod checkpoint;
pub mod cli;
pub mod cuda;
pub mod data;
pub mod error;
pub mod gradcheck;
pub mod half_float;
pub mod host_memory;
pub mod kernels;
pub mod models;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod profile;
pub mod simd;
pub mod storage;
pub mod tensor;

pub use autocast::{
    AutocastGuard, MixedPrecision, Precision, autocast, autocast_dtype, try_autocast,
};
pub use autograd::{Backward, GradStore, is_grad_enabled, no_grad, no_grad_scope};
pub use error::{Error, Result};
pub use ops::activation::GeluApproximation;
pub use ops::attention::{AttentionDropout, AttentionMask, AttentionOptions};
pub use ops::conv::{Conv2dPadding, Conv2dParams, ConvTranspose2dParams};
pub use ops::loss::{BceWithLogitsOptions, CrossEntropyOptions, Reduction};
pub use storage::{bf16, f16};
pub use tensor::{DType, Device, Rng, Shape, Tensor, TensorId};

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
