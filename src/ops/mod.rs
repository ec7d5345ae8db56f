//! Every op kiln differentiates, one module per op family. Each family has
//! the public API with its shape checks and `Backward` rules in `mod.rs`, the
//! plain CPU reference in `cpu.rs`, and (with the CUDA backend) the launch
//! glue in `cuda.rs`, next to `kernels/<family>.cu`.

pub mod activation;
pub mod attention;
pub mod batchnorm;
pub mod conv;
pub mod dropout;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod layernorm;
pub mod loss;
pub mod reduce;
pub mod shape;
pub mod softmax;

use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::tensor::{Shape, Tensor};

/// NumPy/PyTorch broadcasting: align trailing dims; each pair must be equal or contain a 1.
pub(crate) fn broadcast_shape(op: &'static str, lhs: &Shape, rhs: &Shape) -> Result<Shape> {
    let rank = lhs.rank().max(rhs.rank());
    let mut dims = vec![0; rank];
    for (i, out) in dims.iter_mut().enumerate() {
        let l = dim_from_end(lhs, rank - 1 - i);
        let r = dim_from_end(rhs, rank - 1 - i);
        *out = match (l, r) {
            (a, b) if a == b => a,
            (1, b) => b,
            (a, 1) => a,
            _ => {
                return Err(Error::shape(
                    op,
                    format!("shapes {lhs} and {rhs} cannot be broadcast together"),
                ));
            }
        };
    }
    Ok(Shape::new(dims))
}

/// Size of the dim `k` places from the end, 1 beyond the rank (broadcast padding).
fn dim_from_end(shape: &Shape, k: usize) -> usize {
    let dims = shape.dims();
    if k < dims.len() {
        dims[dims.len() - 1 - k]
    } else {
        1
    }
}

/// A dim index as PyTorch takes one: `0..rank` from the front, or negative
/// from the back (`-1` is the last dim). Implemented for `usize` and the
/// signed integers, so `x.sum(&[-1], false)` and `x.narrow(d, ..)` with a
/// `usize` d both work; an empty literal list needs its type spelled
/// (`x.sum::<usize>(&[], false)`).
pub trait Dim: Copy + std::fmt::Display {
    /// The dim among `rank` dims that this names, or None when out of range.
    fn in_rank(self, rank: usize) -> Option<usize>;
}

impl Dim for usize {
    fn in_rank(self, rank: usize) -> Option<usize> {
        (self < rank).then_some(self)
    }
}

macro_rules! signed_dim {
    ($($t:ty),*) => {$(
        impl Dim for $t {
            fn in_rank(self, rank: usize) -> Option<usize> {
                let index = if self < 0 {
                    rank.checked_sub(self.unsigned_abs() as usize)?
                } else {
                    self as usize
                };
                (index < rank).then_some(index)
            }
        }
    )*};
}
signed_dim!(i32, i64, isize);

/// The index `dim` names among `rank` dims, or an error naming `op`,
/// `what` the dims are of, and the accepted range.
pub(crate) fn resolve_dim_in<D: Dim>(
    op: &'static str,
    dim: D,
    rank: usize,
    what: &dyn std::fmt::Display,
) -> Result<usize> {
    dim.in_rank(rank).ok_or_else(|| {
        Error::invalid(
            op,
            format!(
                "dim {dim} is out of range for {what} (rank {rank}: 0..{rank} from the front, -{rank}..-1 from the back)"
            ),
        )
    })
}

/// The index `dim` names among the dims of `shape`, or an error naming `op`.
pub(crate) fn resolve_dim<D: Dim>(op: &'static str, dim: D, shape: &Shape) -> Result<usize> {
    resolve_dim_in(op, dim, shape.rank(), &format!("shape {shape}"))
}

/// Checks a dim index against a rank.
pub(crate) fn check_dim(op: &'static str, dim: usize, shape: &Shape) -> Result<()> {
    if dim >= shape.rank() {
        return Err(Error::invalid(
            op,
            format!(
                "dim {dim} is out of range for shape {shape} (rank {})",
                shape.rank()
            ),
        ));
    }
    Ok(())
}

/// The gradients of a normalisation op's recorded inputs (x, then the
/// optional affine weight and bias, in that order): dx always, dweight and
/// dbias only for the parameters the op was given.
pub(crate) fn normalization_grads(
    (dx, dweight, dbias): (Storage, Storage, Storage),
    x_shape: &Shape,
    param_shape: Shape,
    has_weight: bool,
    has_bias: bool,
) -> Vec<Option<Tensor>> {
    let mut grads = vec![Some(Tensor::from_result(dx, x_shape.clone()))];
    if has_weight {
        grads.push(Some(Tensor::from_result(dweight, param_shape.clone())));
    }
    if has_bias {
        grads.push(Some(Tensor::from_result(dbias, param_shape)));
    }
    grads
}
