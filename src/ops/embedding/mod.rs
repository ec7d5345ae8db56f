//! Indexing: `index_select` (entries along a dim at given positions),
//! `embedding` (rows of a table picked by token ids — `index_select` along
//! dim 0 of the table) and PyTorch's `gather`. Their backward rules are
//! scatter-adds: an entry read k times receives the sum of k gradients.

pub mod cpu;

use crate::any_slice;
use crate::autograd::Backward;
use crate::error::{Error, Result};
use crate::float_slice;
use crate::ops::check_dim;
use crate::storage::{CpuStorage, Storage};
use crate::tensor::{Shape, Tensor, check_operands, same_device};

/// Runs `f` on the values of an index tensor; any dtype but u32 is an error
/// naming the op and the argument's `role` ("ids", "indices", "targets"...).
pub(crate) fn with_indices<R>(
    op: &'static str,
    role: &str,
    indices: &Tensor,
    f: impl FnOnce(&[u32]) -> Result<R>,
) -> Result<R> {
    indices.with_cpu(|s| match s {
        CpuStorage::U32(values) => f(values),
        other => Err(Error::DType {
            op,
            msg: format!(
                "{role} must have dtype u32, got {} (make them with Tensor::from_indices)",
                other.dtype()
            ),
        }),
    })
}

/// Checks that every index is below `bound`; the error names the first bad
/// value and its position (as a multi-index into `dims`), then `context`.
pub(crate) fn check_index_range(
    op: &'static str,
    role: &str,
    indices: &[u32],
    dims: &[usize],
    bound: usize,
    context: impl FnOnce() -> String,
) -> Result<()> {
    let Some(flat) = indices.iter().position(|&i| i as usize >= bound) else {
        return Ok(());
    };
    Err(Error::invalid(
        op,
        format!(
            "{role} value {} at position {:?} is out of range: {}",
            indices[flat],
            multi_index(flat, dims),
            context()
        ),
    ))
}

/// The row-major multi-index of flat position `flat` in a tensor of `dims`
/// (for error messages that point at one element).
pub(crate) fn multi_index(flat: usize, dims: &[usize]) -> Vec<usize> {
    let strides = Shape::new(dims.to_vec()).strides();
    dims.iter()
        .zip(&strides)
        .map(|(&size, &stride)| (flat / stride) % size)
        .collect()
}

/// `index_select` under the name `op` (so `embedding` reports its own errors).
fn select_along(op: &'static str, x: &Tensor, dim: usize, indices: &Tensor) -> Result<Tensor> {
    same_device(op, &[x, indices])?;
    check_dim(op, dim, x.shape())?;
    if indices.rank() != 1 {
        return Err(Error::shape(
            op,
            format!("indices must be 1-D, got shape {}", indices.shape()),
        ));
    }
    let (outer, dim_size, inner) = x.shape().split_at_dim(dim);
    let storage = with_indices(op, "indices", indices, |ids| {
        check_index_range(op, "index", ids, indices.dims(), dim_size, || {
            format!("dim {dim} of shape {} has size {dim_size}", x.shape())
        })?;
        Ok(x.with_cpu(|s| {
            any_slice!(s, |v| CpuStorage::from(cpu::index_select(
                v, outer, dim_size, inner, ids
            )))
        }))
    })?;
    let mut out_dims = x.dims().to_vec();
    out_dims[dim] = indices.numel();
    Ok(Tensor::from_op(
        Storage::Cpu(storage),
        Shape::new(out_dims),
        &[x, indices],
        |_| IndexSelectBackward { op, dim },
    ))
}

impl Tensor {
    /// Rows of `weight` [V, E] picked by the u32 `ids` (any shape S) → [S..., E].
    /// Backward scatter-adds into dweight (repeated ids accumulate); ids get no gradient.
    pub fn embedding(ids: &Tensor, weight: &Tensor) -> Result<Tensor> {
        const OP: &str = "embedding";
        check_operands(OP, &[weight])?;
        same_device(OP, &[weight, ids])?;
        if weight.rank() != 2 {
            return Err(Error::shape(
                OP,
                format!(
                    "weight must be 2-D [num_embeddings, dim], got shape {}",
                    weight.shape()
                ),
            ));
        }
        let vocab = weight.dims()[0];
        // Checked here (not by select_along) to name the position in the ids' own shape.
        with_indices(OP, "ids", ids, |values| {
            check_index_range(OP, "id", values, ids.dims(), vocab, || {
                format!("weight {} has {vocab} rows", weight.shape())
            })
        })?;
        let flat_ids = ids.reshape([ids.numel()])?;
        let rows = select_along(OP, weight, 0, &flat_ids)?;
        let mut out_dims = ids.dims().to_vec();
        out_dims.push(weight.dims()[1]);
        rows.reshape(out_dims)
    }

    /// Entries along `dim` at the u32 positions of the 1-D `indices` (PyTorch's
    /// `index_select`): the output has `indices.len()` entries along `dim`.
    pub fn index_select(&self, dim: usize, indices: &Tensor) -> Result<Tensor> {
        select_along("index_select", self, dim, indices)
    }

    /// PyTorch's `gather`: out[i][j][k] = self[i][index[i][j][k]][k] for dim = 1
    /// (likewise for other dims). `index` is u32 of the same rank as `self`,
    /// no larger than `self` outside `dim`; the output has the shape of `index`.
    pub fn gather(&self, dim: usize, index: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather";
        same_device(OP, &[self, index])?;
        check_dim(OP, dim, self.shape())?;
        let fits = index.rank() == self.rank()
            && (0..self.rank()).all(|d| d == dim || index.dims()[d] <= self.dims()[d]);
        if !fits {
            return Err(Error::shape(
                OP,
                format!(
                    "index of shape {} does not fit input of shape {} (same rank, no larger outside dim {dim})",
                    index.shape(),
                    self.shape()
                ),
            ));
        }
        let dim_size = self.dims()[dim];
        let offsets = with_indices(OP, "index", index, |values| {
            check_index_range(OP, "index", values, index.dims(), dim_size, || {
                format!("dim {dim} of shape {} has size {dim_size}", self.shape())
            })?;
            Ok(cpu::gather_source_offsets(
                self.dims(),
                index.dims(),
                values,
                dim,
            ))
        })?;
        let storage =
            self.with_cpu(|s| any_slice!(s, |v| CpuStorage::from(cpu::gather(v, &offsets))));
        Ok(Tensor::from_op(
            Storage::Cpu(storage),
            index.shape().clone(),
            &[self, index],
            |_| GatherBackward { dim },
        ))
    }
}

struct IndexSelectBackward {
    /// "index_select" or "embedding".
    op: &'static str,
    dim: usize,
}

impl Backward for IndexSelectBackward {
    fn name(&self) -> &'static str {
        self.op
    }
    // dL/dx[.., indices[j], ..] += dL/dy[.., j, ..]   (indices get no gradient)
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, indices) = (&inputs[0], &inputs[1]);
        check_operands(self.op, &[x, grad])?;
        let (outer, dim_size, inner) = x.shape().split_at_dim(self.dim);
        let dx = with_indices(self.op, "indices", indices, |ids| {
            grad.with_cpu(|g| -> Result<_> {
                Ok(float_slice!(self.op, g, |gv| CpuStorage::from(
                    cpu::index_add(gv, outer, dim_size, inner, ids)
                )))
            })
        })?;
        Ok(vec![Some(Tensor::from_cpu(dx, x.shape().clone())), None])
    }
}

struct GatherBackward {
    dim: usize,
}

impl Backward for GatherBackward {
    fn name(&self) -> &'static str {
        "gather"
    }
    // dL/dx[src(k)] += dL/dy[k], src(k) = k's coordinates with index[k] along dim
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, index) = (&inputs[0], &inputs[1]);
        check_operands("gather", &[x, grad])?;
        let offsets = with_indices("gather", "index", index, |values| {
            Ok(cpu::gather_source_offsets(
                x.dims(),
                index.dims(),
                values,
                self.dim,
            ))
        })?;
        let dx = grad.with_cpu(|g| -> Result<_> {
            Ok(float_slice!("gather", g, |gv| CpuStorage::from(
                cpu::scatter_add(gv, &offsets, x.numel())
            )))
        })?;
        Ok(vec![Some(Tensor::from_cpu(dx, x.shape().clone())), None])
    }
}
