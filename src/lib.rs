//! # kiln
//!
//! A tensor library with reverse-mode automatic differentiation.
//!
//! (The crate docs are the autodiff tutorial; see README.md for the tour.)

pub mod autograd;
pub mod error;
pub mod gradcheck;
pub mod kernels;
pub mod ops;
pub mod storage;
pub mod tensor;

pub use autograd::{Backward, GradStore, is_grad_enabled, no_grad, no_grad_scope};
pub use error::{Error, Result};
pub use ops::activation::GeluApproximation;
pub use tensor::{DType, Device, Rng, Shape, Tensor, TensorId};
