//! Indexing: `index_select` (entries along a dim at given positions),
//! `embedding` (rows of a table picked by token ids — `index_select` along
//! dim 0 of the table) and PyTorch's `gather`. Their backward rules are
//! scatter-adds: an entry read k times receives the sum of k gradients.

pub mod cpu;
mod cuda;

use crate::any_slice;
use crate::autocast::{self, AutocastOp};
use crate::autograd::Backward;
use crate::cuda::CudaStorage;
use crate::error::{Error, Result};
use crate::float_slice;
use crate::ops::{Dim, check_dim, resolve_dim};
use crate::profile;
use crate::storage::{CpuStorage, Storage};
use crate::tensor::{DType, Shape, Tensor, check_operands, same_device};

/// Runs `f` on the values of an index tensor; any dtype but u32 is an error
/// naming the op and the argument's `role` ("ids", "indices", "targets"...).
pub(crate) fn with_indices<R>(
    op: &'static str,
    role: &str,
    indices: &Tensor,
    f: impl FnOnce(&[u32]) -> Result<R>,
) -> Result<R> {
    indices.with_cpu(|s| f(cpu_indices(op, role, s)?))
}

/// The error for an index tensor whose dtype is not u32.
fn index_dtype_error(op: &'static str, role: &str, dtype: DType) -> Error {
    Error::DType {
        op,
        msg: format!(
            "{role} must have dtype u32, got {dtype} (make them with Tensor::from_indices)"
        ),
    }
}

/// `check_index_range` for u32 `indices` on a CUDA device (`dtype_role`
/// names them in a dtype error, `role` one value in a range error). A kernel
/// checks the values where they are and only a one-word flag comes back; the
/// ids are copied to the host only once one is known to be bad, to word the
/// same error as the CPU path.
fn check_cuda_index_range(
    op: &'static str,
    (dtype_role, role): (&str, &str),
    indices: &CudaStorage,
    dims: &[usize],
    bound: usize,
    context: impl FnOnce() -> String,
) -> Result<()> {
    if indices.dtype() != DType::U32 {
        return Err(index_dtype_error(op, dtype_role, indices.dtype()));
    }
    if !cuda::any_index_out_of_range(indices, bound)? {
        return Ok(());
    }
    match indices.to_cpu()? {
        CpuStorage::U32(values) => check_index_range(op, role, &values, dims, bound, context),
        other => unreachable!("u32 device indices came back as {}", other.dtype()),
    }
}

/// The u32 values of CPU index storage, or the dtype error naming `role`.
fn cpu_indices<'a>(op: &'static str, role: &str, indices: &'a CpuStorage) -> Result<&'a [u32]> {
    match indices {
        CpuStorage::U32(values) => Ok(values),
        other => Err(index_dtype_error(op, role, other.dtype())),
    }
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
    check_index_range_skipping(op, role, indices, dims, bound, None, context)
}

/// [`check_index_range`] where the value `skipped` (cross entropy's
/// ignore_index) is exempt: it need name no row at all.
pub(crate) fn check_index_range_skipping(
    op: &'static str,
    role: &str,
    indices: &[u32],
    dims: &[usize],
    bound: usize,
    skipped: Option<u32>,
    context: impl FnOnce() -> String,
) -> Result<()> {
    let out_of_range = |i: u32| Some(i) != skipped && i as usize >= bound;
    let Some(flat) = indices.iter().position(|&i| out_of_range(i)) else {
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
/// Entries picked by the index `frozen_index` (embedding's padding_idx) get
/// no gradient.
fn select_along(
    op: &'static str,
    x: &Tensor,
    dim: usize,
    indices: &Tensor,
    frozen_index: Option<u32>,
) -> Result<Tensor> {
    same_device(op, &[x, indices])?;
    check_dim(op, dim, x.shape())?;
    if indices.rank() != 1 {
        return Err(Error::shape(
            op,
            format!("indices must be 1-D, got shape {}", indices.shape()),
        ));
    }
    let (outer, dim_size, inner) = x.shape().split_at_dim(dim);
    let context = || format!("dim {dim} of shape {} has size {dim_size}", x.shape());
    let storage = match (&*x.storage(), &*indices.storage()) {
        (Storage::Cpu(s), Storage::Cpu(ids)) => {
            let ids = cpu_indices(op, "indices", ids)?;
            check_index_range(op, "index", ids, indices.dims(), dim_size, context)?;
            Storage::Cpu(any_slice!(s, |v| CpuStorage::from(cpu::index_select(
                v, outer, dim_size, inner, ids
            ))))
        }
        (Storage::Cuda(s), Storage::Cuda(ids)) => {
            let roles = ("indices", "index");
            check_cuda_index_range(op, roles, ids, indices.dims(), dim_size, context)?;
            Storage::Cuda(cuda::index_select(s, ids, outer, dim_size, inner)?)
        }
        _ => unreachable!("same_device put both operands on one device"),
    };
    let mut out_dims = x.dims().to_vec();
    out_dims[dim] = indices.numel();
    Ok(Tensor::from_op(
        storage,
        Shape::new(out_dims),
        &[x, indices],
        |_| IndexSelectBackward {
            op,
            dim,
            frozen_index,
        },
    ))
}

impl Tensor {
    /// Rows of `weight` [V, E] picked by the u32 `ids` (any shape S) → [S..., E].
    /// Backward scatter-adds into dweight (repeated ids accumulate); ids get no gradient.
    pub fn embedding(ids: &Tensor, weight: &Tensor) -> Result<Tensor> {
        Tensor::embedding_with(ids, weight, None)
    }

    /// PyTorch's `F.embedding(ids, weight, padding_idx)`: the rows `embedding`
    /// picks, except that row `padding_idx` of weight never gets a gradient
    /// (ids equal to it still read the row as it is). A negative
    /// `padding_idx` counts from the end (−1 is the last row); it must lie in
    /// [−V, V). `None` is plain `embedding`.
    pub fn embedding_with(
        ids: &Tensor,
        weight: &Tensor,
        padding_idx: Option<isize>,
    ) -> Result<Tensor> {
        if weight.dtype().is_half() {
            return autocast::in_float32(AutocastOp::Embedding, weight, |w| {
                Tensor::embedding_with(ids, w, padding_idx)
            });
        }
        const OP: &str = "embedding";
        let _profile = profile::op(OP, weight.device());
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
        let padding_row = padding_idx
            .map(|index| padding_row(OP, index, weight.shape()))
            .transpose()?;
        // Checked here (not by select_along) to name the position in the ids' own shape.
        let context = || format!("weight {} has {vocab} rows", weight.shape());
        match &*ids.storage() {
            Storage::Cpu(values) => {
                let values = cpu_indices(OP, "ids", values)?;
                check_index_range(OP, "id", values, ids.dims(), vocab, context)?;
            }
            Storage::Cuda(values) => {
                check_cuda_index_range(OP, ("ids", "id"), values, ids.dims(), vocab, context)?;
            }
        }
        let flat_ids = ids.reshape([ids.numel()])?;
        let rows = select_along(OP, weight, 0, &flat_ids, padding_row)?;
        let mut out_dims = ids.dims().to_vec();
        out_dims.push(weight.dims()[1]);
        rows.reshape(out_dims)
    }

    /// Entries along `dim` at the u32 positions of the 1-D `indices` (PyTorch's
    /// `index_select`): the output has `indices.len()` entries along `dim`.
    pub fn index_select<D: Dim>(&self, dim: D, indices: &Tensor) -> Result<Tensor> {
        let dim = resolve_dim("index_select", dim, self.shape())?;
        if self.dtype().is_half() {
            return autocast::in_float32(AutocastOp::Embedding, self, |x| {
                x.index_select(dim, indices)
            });
        }
        let _profile = profile::op("index_select", self.device());
        select_along("index_select", self, dim, indices, None)
    }

    /// PyTorch's `gather`: out[i][j][k] = self[i][index[i][j][k]][k] for dim = 1
    /// (likewise for other dims). `index` is u32 of the same rank as `self`,
    /// no larger than `self` outside `dim`; the output has the shape of `index`.
    pub fn gather<D: Dim>(&self, dim: D, index: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather";
        let dim = resolve_dim(OP, dim, self.shape())?;
        if self.dtype().is_half() {
            return autocast::in_float32(AutocastOp::Embedding, self, |x| x.gather(dim, index));
        }
        let _profile = profile::op(OP, self.device());
        same_device(OP, &[self, index])?;
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
        let context = || format!("dim {dim} of shape {} has size {dim_size}", self.shape());
        let storage = match (&*self.storage(), &*index.storage()) {
            (Storage::Cpu(s), Storage::Cpu(values)) => {
                let values = cpu_indices(OP, "index", values)?;
                check_index_range(OP, "index", values, index.dims(), dim_size, context)?;
                let offsets = cpu::gather_source_offsets(self.dims(), index.dims(), values, dim);
                Storage::Cpu(any_slice!(s, |v| CpuStorage::from(cpu::gather(
                    v, &offsets
                ))))
            }
            (Storage::Cuda(s), Storage::Cuda(ids)) => {
                let roles = ("index", "index");
                check_cuda_index_range(OP, roles, ids, index.dims(), dim_size, context)?;
                Storage::Cuda(cuda::gather(s, self.shape(), ids, index.shape(), dim)?)
            }
            _ => unreachable!("same_device put both operands on one device"),
        };
        Ok(Tensor::from_op(
            storage,
            index.shape().clone(),
            &[self, index],
            |_| GatherBackward { dim },
        ))
    }
}

/// The row of an embedding table [V, E] that `padding_idx` names, as
/// PyTorch resolves it: in [0, V) as it is, in [−V, 0) counted from the end.
pub(crate) fn padding_row(op: &'static str, padding_idx: isize, weight: &Shape) -> Result<u32> {
    let vocab = weight.dims()[0];
    let row = if padding_idx < 0 {
        vocab.checked_sub(padding_idx.unsigned_abs())
    } else {
        Some(padding_idx.unsigned_abs()).filter(|&row| row < vocab)
    };
    match row.and_then(|row| u32::try_from(row).ok()) {
        Some(row) => Ok(row),
        None => Err(Error::invalid(
            op,
            format!(
                "padding_idx must be within num_embeddings: got {padding_idx} for weight {weight} \
                 of {vocab} rows; pass a row in [{}, {vocab}) (negative counts from the end)",
                -(vocab as i128)
            ),
        )),
    }
}

struct IndexSelectBackward {
    /// "index_select" or "embedding".
    op: &'static str,
    dim: usize,
    /// An index whose entries get no gradient (embedding's padding_idx).
    frozen_index: Option<u32>,
}

impl Backward for IndexSelectBackward {
    fn name(&self) -> &'static str {
        self.op
    }
    // dL/dx[.., indices[j], ..] += dL/dy[.., j, ..] for every j with
    // indices[j] ≠ frozen_index, so dL/dx[.., frozen_index, ..] = 0
    // (indices get no gradient)
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, indices) = (&inputs[0], &inputs[1]);
        check_operands(self.op, &[x, grad])?;
        let (outer, dim_size, inner) = x.shape().split_at_dim(self.dim);
        let dx = match &*grad.storage() {
            Storage::Cpu(g) => Storage::Cpu(with_indices(self.op, "indices", indices, |ids| {
                Ok(float_slice!(self.op, g, |gv| CpuStorage::from(
                    cpu::index_add_skipping(gv, outer, dim_size, inner, ids, self.frozen_index)
                )))
            })?),
            Storage::Cuda(g) => match &*indices.storage() {
                Storage::Cuda(ids) => {
                    let layout = (outer, dim_size, inner);
                    Storage::Cuda(cuda::index_add(self.op, g, ids, layout, self.frozen_index)?)
                }
                Storage::Cpu(_) => unreachable!("the forward put x and indices on one device"),
            },
        };
        Ok(vec![Some(Tensor::from_result(dx, x.shape().clone())), None])
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
        let dx = match (&*grad.storage(), &*index.storage()) {
            (Storage::Cpu(g), Storage::Cpu(values)) => {
                let values = cpu_indices("gather", "index", values)?;
                let offsets = cpu::gather_source_offsets(x.dims(), index.dims(), values, self.dim);
                Storage::Cpu(float_slice!("gather", g, |gv| CpuStorage::from(
                    cpu::scatter_add(gv, &offsets, x.numel())
                )))
            }
            (Storage::Cuda(g), Storage::Cuda(ids)) => Storage::Cuda(cuda::scatter_add(
                g,
                ids,
                x.shape(),
                index.shape(),
                self.dim,
            )?),
            _ => unreachable!("the forward put x and index on one device"),
        };
        Ok(vec![Some(Tensor::from_result(dx, x.shape().clone())), None])
    }
}
