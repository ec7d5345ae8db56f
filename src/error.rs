//! kiln's error type: every public operation returns `Result<T>`, and each
//! error names the operation and the offending shapes, dtypes or devices.

use crate::tensor::{DType, Device, Shape};

/// Every failure kiln reports to its caller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shapes that do not fit the operation.
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },

    /// A dtype the operation does not support, or two that do not match.
    #[error("{op}: {msg}")]
    DType { op: &'static str, msg: String },

    /// Operands living on different devices.
    #[error(
        "{op}: operands are on different devices ({lhs} and {rhs}); move them with .to_device() first"
    )]
    DeviceMismatch {
        op: &'static str,
        lhs: Device,
        rhs: Device,
    },

    /// An argument outside its valid range (a negative probability, a dim out of range...).
    #[error("{op}: {msg}")]
    InvalidArgument { op: &'static str, msg: String },

    /// A problem with the autodiff graph (backward on a non-scalar, on a tensor that needs no grad...).
    #[error("backward: {0}")]
    Autograd(String),

    /// A checkpoint that cannot be read or does not match the model.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },

    /// The CUDA backend is unavailable or failed.
    #[error("{op}: {msg}")]
    Cuda { op: &'static str, msg: String },

    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }

    pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            msg: msg.into(),
        }
    }

    pub(crate) fn unsupported_dtype(op: &'static str, dtype: DType) -> Self {
        let msg = match dtype {
            DType::F16 | DType::BF16 => format!(
                "no {dtype} path for this op on CUDA yet (its kernels take f32; the CPU \
                 computes 16-bit tensors in f32): convert with .to_dtype(DType::F32) first"
            ),
            _ => format!("dtype {dtype} is not supported (expected a float tensor: f32 or f64)"),
        };
        Error::DType { op, msg }
    }

    pub(crate) fn dtype_mismatch(op: &'static str, lhs: DType, rhs: DType) -> Self {
        Error::DType {
            op,
            msg: format!("dtypes differ ({lhs} and {rhs}); convert one with .to_dtype()"),
        }
    }

    pub(crate) fn shape_mismatch(op: &'static str, lhs: &Shape, rhs: &Shape) -> Self {
        Error::shape(op, format!("shapes {lhs} and {rhs} do not match"))
    }
}
