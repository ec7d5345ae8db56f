//! Shape ops: reshape (free: it shares storage), and the copying ones —
//! permute/transpose, narrow, cat, stack, broadcast_to.

mod cpu;
pub(crate) mod cuda;

use crate::any_slice;
use crate::autograd::Backward;
use crate::cuda::CudaStorage;
use crate::error::{Error, Result};
use crate::ops::{Dim, broadcast_shape, resolve_dim, resolve_dim_in};
use crate::profile;
use crate::storage::{CpuStorage, Element, Storage, bf16, f16};
use crate::tensor::{DType, Device, Shape, Tensor, checked_numel, same_device};

pub(crate) use cpu::contiguous_strides;

impl Tensor {
    /// The same values with a new shape of equal element count (no copy:
    /// storage is contiguous, so only the shape changes).
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let _profile = profile::op("reshape", self.device());
        let shape = shape.into();
        if checked_numel("reshape", &shape)? != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!(
                    "cannot reshape {} ({} elements) into {shape} ({} elements)",
                    self.shape(),
                    self.numel(),
                    shape.numel()
                ),
            ));
        }
        let input_shape = self.shape().clone();
        Ok(Tensor::from_op_shared(
            self.shared_storage(),
            shape,
            &[self],
            |_| ReshapeBackward { input_shape },
        ))
    }

    /// Merges dims `start..=end` into one (negative dims count from the back).
    pub fn flatten<D: Dim>(&self, start: D, end: D) -> Result<Tensor> {
        let _profile = profile::op("flatten", self.device());
        let (start, end) = (
            resolve_dim("flatten", start, self.shape())?,
            resolve_dim("flatten", end, self.shape())?,
        );
        if start > end {
            return Err(Error::invalid(
                "flatten",
                format!("dims {start}..={end} invalid for shape {}", self.shape()),
            ));
        }
        let dims = self.dims();
        let mut new_dims = dims[..start].to_vec();
        new_dims.push(dims[start..=end].iter().product());
        new_dims.extend_from_slice(&dims[end + 1..]);
        self.reshape(new_dims)
    }

    /// Inserts a size-1 dim so that it becomes dim `dim` of the result
    /// (0..=rank, or from the back as in PyTorch: -1 appends).
    pub fn unsqueeze<D: Dim>(&self, dim: D) -> Result<Tensor> {
        let _profile = profile::op("unsqueeze", self.device());
        let dim = resolve_dim_in(
            "unsqueeze",
            dim,
            self.rank() + 1,
            &format!("the result of unsqueezing shape {}", self.shape()),
        )?;
        let mut dims = self.dims().to_vec();
        dims.insert(dim, 1);
        self.reshape(dims)
    }

    /// Removes dim `dim` if its size is 1; any other size leaves the tensor
    /// as it is, as PyTorch's `squeeze(dim)`.
    pub fn squeeze<D: Dim>(&self, dim: D) -> Result<Tensor> {
        let _profile = profile::op("squeeze", self.device());
        let dim = resolve_dim("squeeze", dim, self.shape())?;
        if self.dims()[dim] != 1 {
            return Ok(self.clone());
        }
        let mut dims = self.dims().to_vec();
        dims.remove(dim);
        self.reshape(dims)
    }

    /// Reorders dims: output dim `d` is input dim `perm[d]` (a copy).
    pub fn permute<D: Dim>(&self, perm: &[D]) -> Result<Tensor> {
        let _profile = profile::op("permute", self.device());
        let rank = self.rank();
        let resolved: Vec<Option<usize>> = perm.iter().map(|&p| p.in_rank(rank)).collect();
        let mut seen = vec![false; rank];
        let valid = perm.len() == rank
            && resolved
                .iter()
                .all(|p| p.is_some_and(|p| !std::mem::replace(&mut seen[p], true)));
        if !valid {
            let listed: Vec<String> = perm.iter().map(|p| p.to_string()).collect();
            return Err(Error::invalid(
                "permute",
                format!(
                    "[{}] is not a permutation of the dims of shape {}",
                    listed.join(", "),
                    self.shape()
                ),
            ));
        }
        let perm: Vec<usize> = resolved.into_iter().flatten().collect();
        let perm = perm.as_slice();
        let out_shape = Shape::new(perm.iter().map(|&p| self.dims()[p]).collect::<Vec<_>>());
        let storage = match &*self.storage() {
            Storage::Cpu(s) => Storage::Cpu(any_slice!(s, |v| CpuStorage::from(cpu::permute(
                v,
                self.dims(),
                perm
            )))),
            Storage::Cuda(s) => Storage::Cuda(cuda::permute(s, self.shape(), perm)?),
        };
        let perm = perm.to_vec();
        Ok(Tensor::from_op(storage, out_shape, &[self], |_| {
            PermuteBackward { perm }
        }))
    }

    /// Swaps two dims (a copy).
    pub fn transpose<D: Dim>(&self, dim0: D, dim1: D) -> Result<Tensor> {
        let _profile = profile::op("transpose", self.device());
        let dim0 = resolve_dim("transpose", dim0, self.shape())?;
        let dim1 = resolve_dim("transpose", dim1, self.shape())?;
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        perm.swap(dim0, dim1);
        self.permute(&perm)
    }

    /// The slice `start..start + len` along `dim` (a copy).
    pub fn narrow<D: Dim>(&self, dim: D, start: usize, len: usize) -> Result<Tensor> {
        let _profile = profile::op("narrow", self.device());
        let dim = resolve_dim("narrow", dim, self.shape())?;
        let size = self.dims()[dim];
        // Widened: start + len may not fit a usize.
        let end = start as u128 + len as u128;
        if end > size as u128 {
            return Err(Error::invalid(
                "narrow",
                format!(
                    "range {start}..{end} exceeds dim {dim} of shape {}",
                    self.shape()
                ),
            ));
        }
        let (outer, dim_size, inner) = self.shape().split_at_dim(dim);
        let storage = match &*self.storage() {
            Storage::Cpu(s) => Storage::Cpu(any_slice!(s, |v| CpuStorage::from(cpu::narrow(
                v, outer, dim_size, inner, start, len
            )))),
            Storage::Cuda(s) => Storage::Cuda(cuda::narrow(s, outer, dim_size, inner, start, len)?),
        };
        let mut dims = self.dims().to_vec();
        dims[dim] = len;
        Ok(Tensor::from_op(storage, Shape::new(dims), &[self], |_| {
            NarrowBackward { dim, start, size }
        }))
    }

    /// Joins tensors along an existing dim; all other dims must match.
    pub fn cat<D: Dim>(tensors: &[&Tensor], dim: D) -> Result<Tensor> {
        let _profile = profile::op("cat", tensors.first().map_or(Device::Cpu, |t| t.device()));
        let first = tensors
            .first()
            .ok_or_else(|| Error::invalid("cat", "needs at least one tensor"))?;
        let dim = resolve_dim("cat", dim, first.shape())?;
        same_device("cat", tensors)?;
        for t in tensors {
            let compatible = t.rank() == first.rank()
                && t.dims()
                    .iter()
                    .zip(first.dims())
                    .enumerate()
                    .all(|(d, (a, b))| d == dim || a == b);
            if !compatible {
                return Err(Error::shape(
                    "cat",
                    format!(
                        "shape {} does not match {} outside dim {dim}",
                        t.shape(),
                        first.shape()
                    ),
                ));
            }
            if t.dtype() != first.dtype() {
                return Err(Error::dtype_mismatch("cat", first.dtype(), t.dtype()));
            }
        }
        let (outer, _, inner) = first.shape().split_at_dim(dim);
        let guards: Vec<_> = tensors.iter().map(|t| t.storage()).collect();
        let sizes: Vec<usize> = tensors.iter().map(|t| t.dims()[dim]).collect();
        let storage = if let Storage::Cuda(_) = &*guards[0] {
            let parts: Vec<(&CudaStorage, usize)> = guards
                .iter()
                .zip(&sizes)
                .map(|(g, &size)| match &**g {
                    Storage::Cuda(s) => (s, size),
                    Storage::Cpu(_) => unreachable!("same_device put every part on one device"),
                })
                .collect();
            Storage::Cuda(cuda::cat(&parts, outer, inner)?)
        } else {
            let parts: Vec<(&CpuStorage, usize)> = guards
                .iter()
                .zip(&sizes)
                .map(|(g, &size)| match &**g {
                    Storage::Cpu(s) => (s, size),
                    Storage::Cuda(_) => unreachable!("same_device put every part on one device"),
                })
                .collect();
            Storage::Cpu(match first.dtype() {
                DType::F32 => cat_typed::<f32>(&parts, outer, inner),
                DType::F64 => cat_typed::<f64>(&parts, outer, inner),
                DType::F16 => cat_typed::<f16>(&parts, outer, inner),
                DType::BF16 => cat_typed::<bf16>(&parts, outer, inner),
                DType::U32 => cat_typed::<u32>(&parts, outer, inner),
            })
        };
        drop(guards);
        let mut dims = first.dims().to_vec();
        dims[dim] = sizes.iter().sum();
        Ok(Tensor::from_op(storage, Shape::new(dims), tensors, |_| {
            CatBackward { dim, sizes }
        }))
    }

    /// Joins equally-shaped tensors along a new dim (negative: from the
    /// back of the result, as in PyTorch).
    pub fn stack<D: Dim>(tensors: &[&Tensor], dim: D) -> Result<Tensor> {
        let _profile = profile::op("stack", tensors.first().map_or(Device::Cpu, |t| t.device()));
        let rank = tensors.first().map_or(0, |t| t.rank());
        let dim = resolve_dim_in("stack", dim, rank + 1, &"the stacked result")?;
        let unsqueezed = tensors
            .iter()
            .map(|t| t.unsqueeze(dim))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Tensor> = unsqueezed.iter().collect();
        Tensor::cat(&refs, dim)
    }

    /// Repeats size-1 (and missing leading) dims to reach `shape` (a copy).
    pub fn broadcast_to(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let _profile = profile::op("broadcast_to", self.device());
        let shape = shape.into();
        checked_numel("broadcast_to", &shape)?;
        let joint = broadcast_shape("broadcast_to", self.shape(), &shape)?;
        if joint != shape {
            return Err(Error::shape(
                "broadcast_to",
                format!("cannot broadcast {} to {shape}", self.shape()),
            ));
        }
        if &shape == self.shape() {
            return Ok(self.clone());
        }
        let storage =
            match &*self.storage() {
                Storage::Cpu(s) => Storage::Cpu(any_slice!(s, |v| CpuStorage::from(
                    cpu::broadcast(v, self.dims(), shape.dims())
                ))),
                Storage::Cuda(s) => Storage::Cuda(cuda::broadcast(s, self.shape(), &shape)?),
            };
        let input_shape = self.shape().clone();
        Ok(Tensor::from_op(storage, shape, &[self], |_| {
            BroadcastBackward { input_shape }
        }))
    }
}

/// Concatenates typed parts (their dtype was checked to be `T`'s).
fn cat_typed<T: Element>(parts: &[(&CpuStorage, usize)], outer: usize, inner: usize) -> CpuStorage {
    let typed: Vec<(&[T], usize)> = parts
        .iter()
        .map(|(s, n)| (T::slice(s).expect("cat operands share a dtype"), *n))
        .collect();
    T::wrap(cpu::cat(&typed, outer, inner))
}

struct ReshapeBackward {
    input_shape: Shape,
}

impl Backward for ReshapeBackward {
    fn name(&self) -> &'static str {
        "reshape"
    }
    // Reads only the gradient: the inputs' values can go.
    fn reads_input_values(&self) -> bool {
        false
    }

    // dL/dx = reshape(dL/dy, shape(x))
    fn backward(&self, _inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.reshape(self.input_shape.clone())?)])
    }
}

struct PermuteBackward {
    perm: Vec<usize>,
}

impl Backward for PermuteBackward {
    fn name(&self) -> &'static str {
        "permute"
    }
    // Reads only the gradient: the inputs' values can go.
    fn reads_input_values(&self) -> bool {
        false
    }

    // dL/dx = permute(dL/dy, perm⁻¹)
    fn backward(&self, _inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut inverse = vec![0; self.perm.len()];
        for (d, &p) in self.perm.iter().enumerate() {
            inverse[p] = d;
        }
        Ok(vec![Some(grad.permute(&inverse)?)])
    }
}

struct NarrowBackward {
    dim: usize,
    start: usize,
    size: usize,
}

impl Backward for NarrowBackward {
    fn name(&self) -> &'static str {
        "narrow"
    }
    // Reads only the gradient: the inputs' values can go.
    fn reads_input_values(&self) -> bool {
        false
    }

    // dL/dx = [0 … 0, dL/dy, 0 … 0] along dim (zeros outside the slice)
    fn backward(&self, _inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let len = grad.dims()[self.dim];
        let zeros_of = |n: usize| {
            let mut dims = grad.dims().to_vec();
            dims[self.dim] = n;
            Tensor::zeros(dims, grad.dtype(), grad.device())
        };
        let before = zeros_of(self.start)?;
        let after = zeros_of(self.size - self.start - len)?;
        Ok(vec![Some(Tensor::cat(&[&before, grad, &after], self.dim)?)])
    }
    fn slice_of_input(&self) -> Option<(usize, usize)> {
        Some((self.dim, self.start))
    }
}

struct CatBackward {
    dim: usize,
    sizes: Vec<usize>,
}

impl Backward for CatBackward {
    fn name(&self) -> &'static str {
        "cat"
    }
    // Reads only the gradient: the inputs' values can go.
    fn reads_input_values(&self) -> bool {
        false
    }

    // dL/dx_i = narrow(dL/dy, dim, offset_i, size_i)
    fn backward(&self, _inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut offset = 0;
        let mut grads = Vec::with_capacity(self.sizes.len());
        for &size in &self.sizes {
            grads.push(Some(grad.narrow(self.dim, offset, size)?));
            offset += size;
        }
        Ok(grads)
    }
}

struct BroadcastBackward {
    input_shape: Shape,
}

impl Backward for BroadcastBackward {
    fn name(&self) -> &'static str {
        "broadcast_to"
    }
    // Reads only the gradient: the inputs' values can go.
    fn reads_input_values(&self) -> bool {
        false
    }

    // dL/dx = sum of dL/dy over every broadcast dim
    fn backward(&self, _inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.sum_to_shape(&self.input_shape)?)])
    }
}
