//! Reductions: sum, mean and max over dims, with or without keepdim.

mod cpu;
mod cuda;

use crate::autocast::{self, AutocastOp};
use crate::autograd::Backward;
use crate::error::{Error, Result};
use crate::float_slice;
use crate::ops::{Dim, resolve_dim, resolve_dim_in};
use crate::profile;
use crate::storage::{CpuStorage, Storage};
use crate::tensor::{Shape, Tensor, check_operands};

/// The shape after reducing `dims` (kept as size 1 with `keepdim`).
fn reduced_shape(shape: &Shape, dims: &[usize], keepdim: bool) -> Shape {
    let mut out = Vec::with_capacity(shape.rank());
    for (d, &size) in shape.dims().iter().enumerate() {
        if !dims.contains(&d) {
            out.push(size);
        } else if keepdim {
            out.push(1);
        }
    }
    Shape::new(out)
}

/// The dims a reduction runs over, sorted and range-checked, with
/// PyTorch's meaning: an empty list means every dim, and a dim listed twice
/// is an error (PyTorch refuses it too; summing it "twice" has no meaning).
fn check_dims<D: Dim>(op: &'static str, dims: &[D], shape: &Shape) -> Result<Vec<usize>> {
    if dims.is_empty() {
        return Ok((0..shape.rank()).collect());
    }
    // A 0-d tensor takes dim 0 (or -1) as PyTorch does, as one dim of size
    // 1 that is reduced away: the result is the value itself.
    let (rank, what) = match shape.rank() {
        0 => (1, format!("shape {shape} (a 0-d tensor takes dim 0 or -1)")),
        rank => (rank, format!("shape {shape}")),
    };
    let mut sorted = dims
        .iter()
        .map(|&d| resolve_dim_in(op, d, rank, &what))
        .collect::<Result<Vec<_>>>()?;
    sorted.sort_unstable();
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
        let listed: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
        return Err(Error::invalid(
            op,
            format!(
                "dim {} appears more than once in the dims [{}]",
                pair[0],
                listed.join(", ")
            ),
        ));
    }
    if shape.rank() == 0 {
        sorted.clear();
    }
    Ok(sorted)
}

/// Sums `dims` of `x`, keeping them as size 1, then multiplies by `scale`
/// (1 for sum, 1/count for mean), on the device `x` lives on. One kernel per
/// run of neighbouring reduced dims; on CUDA the scale rides along with the last one (with no dim
/// reduced the count is 1, so the scale is too).
fn sum_keepdim(x: &Tensor, dims: &[usize], scale: f64) -> Result<Storage> {
    let mut current_dims = x.dims().to_vec();
    let input = x.storage();
    let mut reduced: Option<Storage> = None;
    let runs = adjacent_runs(dims);
    for (step, run) in runs.iter().enumerate() {
        // A run of neighbouring dims is one reduction over their product:
        // [outer, n₁·n₂, inner] in one pass instead of two.
        let outer: usize = current_dims[..run.start].iter().product();
        let n: usize = current_dims[run.clone()].iter().product();
        let inner: usize = current_dims[run.end..].iter().product();
        let next = match reduced.as_ref().unwrap_or(&*input) {
            Storage::Cpu(s) => Storage::Cpu(float_slice!("sum", s, |v| CpuStorage::from(
                cpu::sum(v, outer, n, inner)
            ))),
            Storage::Cuda(s) => {
                let last = step + 1 == runs.len();
                let step_scale = if last { scale as f32 } else { 1.0 };
                Storage::Cuda(cuda::sum(s, outer, n, inner, step_scale)?)
            }
        };
        reduced = Some(next);
        current_dims[run.clone()].fill(1);
    }
    let values = match reduced {
        Some(values) => values,
        None => input.try_clone()?,
    };
    drop(input);
    Ok(match values {
        Storage::Cpu(s) if scale != 1.0 => {
            Storage::Cpu(float_slice!("mean", &s, |v| CpuStorage::from(cpu::scale(
                v, scale
            ))))
        }
        other => other,
    })
}

/// Sorted dims grouped into runs of neighbours: [0, 1, 3] → [0..2, 3..4].
fn adjacent_runs(dims: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for &d in dims {
        match runs.last_mut() {
            Some(run) if run.end == d => run.end += 1,
            _ => runs.push(d..d + 1),
        }
    }
    runs
}

impl Tensor {
    /// Σ over `dims`. As in PyTorch, an empty list reduces every dim (like
    /// [`Tensor::sum_all`], with `keepdim` keeping them all as size 1), and
    /// listing a dim twice is an error.
    pub fn sum<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor> {
        let dims = check_dims("sum", dims, self.shape())?;
        if self.dtype().is_half() {
            if let Some(out) = leading_dims_sum_half(self, &dims, keepdim)? {
                return Ok(out);
            }
            return autocast::in_float32(AutocastOp::Sum, self, |x| x.sum(&dims, keepdim));
        }
        let _profile = profile::op("sum", self.device());
        check_operands("sum", &[self])?;
        let storage = sum_keepdim(self, &dims, 1.0)?;
        let out_shape = reduced_shape(self.shape(), &dims, keepdim);
        let input_shape = self.shape().clone();
        let kept_shape = reduced_shape(self.shape(), &dims, true);
        Ok(Tensor::from_op(storage, out_shape, &[self], |_| {
            SumBackward {
                input_shape,
                kept_shape,
                scale: 1.0,
            }
        }))
    }

    /// Sum of every element, as a rank-0 tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        let dims: Vec<usize> = (0..self.rank()).collect();
        self.sum(&dims, false)
    }

    /// Mean over `dims`, with [`Tensor::sum`]'s meaning of the list.
    pub fn mean<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor> {
        let dims = check_dims("mean", dims, self.shape())?;
        if self.dtype().is_half() {
            return autocast::in_float32(AutocastOp::Mean, self, |x| x.mean(&dims, keepdim));
        }
        let _profile = profile::op("mean", self.device());
        check_operands("mean", &[self])?;
        let count: usize = dims.iter().map(|&d| self.dims()[d]).product();
        if count == 0 {
            return Err(Error::shape(
                "mean",
                format!(
                    "the mean over an empty dim of shape {} is undefined (PyTorch returns NaN); \
                     check the shape, or take the sum",
                    self.shape()
                ),
            ));
        }
        let scale = 1.0 / count as f64;
        let storage = sum_keepdim(self, &dims, scale)?;
        let out_shape = reduced_shape(self.shape(), &dims, keepdim);
        let input_shape = self.shape().clone();
        let kept_shape = reduced_shape(self.shape(), &dims, true);
        Ok(Tensor::from_op(storage, out_shape, &[self], |_| {
            SumBackward {
                input_shape,
                kept_shape,
                scale,
            }
        }))
    }

    /// Mean of every element, as a rank-0 tensor.
    pub fn mean_all(&self) -> Result<Tensor> {
        let dims: Vec<usize> = (0..self.rank()).collect();
        self.mean(&dims, false)
    }

    /// Maximum over `dim`; the gradient flows to the first maximal element.
    pub fn max<D: Dim>(&self, dim: D, keepdim: bool) -> Result<Tensor> {
        Ok(self.max_with_indices(dim, keepdim)?.0)
    }

    /// Maximum over `dim` and the (u32) index of the first maximal element.
    pub fn max_with_indices<D: Dim>(&self, dim: D, keepdim: bool) -> Result<(Tensor, Tensor)> {
        if self.rank() == 0 {
            // A 0-d tensor takes dim 0 or -1 as one of size 1, as PyTorch's:
            // the value itself, at index 0.
            let what = format!("shape {} (a 0-d tensor takes dim 0 or -1)", self.shape());
            resolve_dim_in("max", dim, 1, &what)?;
            let (values, indices) = self.reshape([1])?.max_with_indices(0, false)?;
            return Ok((values, indices));
        }
        let dim = resolve_dim("max", dim, self.shape())?;
        if self.dtype().is_half() {
            let (values, indices) = autocast::widened(self)?.max_with_indices(dim, keepdim)?;
            let values = autocast::finish_output(AutocastOp::Max, values, self.dtype())?;
            return Ok((values, indices));
        }
        let _profile = profile::op("max", self.device());
        check_operands("max", &[self])?;
        let (outer, n, inner) = self.shape().split_at_dim(dim);
        if n == 0 {
            return Err(Error::shape(
                "max",
                format!("max over an empty dim of shape {}", self.shape()),
            ));
        }
        let (values, indices) = match &*self.storage() {
            Storage::Cpu(s) => {
                let (values, indices) = float_slice!("max", s, |v| {
                    let (values, indices) = cpu::max(v, outer, n, inner);
                    (CpuStorage::from(values), indices)
                });
                (Storage::Cpu(values), Storage::Cpu(CpuStorage::U32(indices)))
            }
            Storage::Cuda(s) => {
                let (values, indices) = cuda::max(s, outer, n, inner)?;
                (Storage::Cuda(values), Storage::Cuda(indices))
            }
        };
        let out_shape = reduced_shape(self.shape(), &[dim], keepdim);
        let argmax = Tensor::from_result(indices, out_shape.clone());
        let saved = argmax.clone();
        let out = Tensor::from_op(values, out_shape, &[self], |_| MaxBackward {
            dim,
            argmax: saved,
        });
        Ok((out, argmax))
    }

    /// Sums a broadcast gradient back to `shape` (the inverse of broadcasting:
    /// leading extra dims and dims where `shape` has 1 are summed).
    pub fn sum_to_shape(&self, shape: &Shape) -> Result<Tensor> {
        let _profile = profile::op("sum_to_shape", self.device());
        if self.shape() == shape {
            return Ok(self.clone());
        }
        let rank = self.rank();
        let pad = rank.checked_sub(shape.rank()).ok_or_else(|| {
            Error::shape(
                "sum_to_shape",
                format!("cannot sum {} down to {shape}", self.shape()),
            )
        })?;
        let mut dims = Vec::new();
        for d in 0..rank {
            let target = if d < pad { 1 } else { shape.dims()[d - pad] };
            if d < pad || (target == 1 && self.dims()[d] != 1) {
                dims.push(d);
            } else if target != self.dims()[d] {
                return Err(Error::shape(
                    "sum_to_shape",
                    format!("cannot sum {} down to {shape}", self.shape()),
                ));
            }
        }
        // Equal shapes returned above, so some dim is summed (an empty list
        // would mean every dim).
        debug_assert!(!dims.is_empty());
        self.sum(&dims, true)?.reshape(shape.clone())
    }
}

/// The sum of a 16-bit CPU tensor over its leading dims (a bias gradient:
/// Σ over the rows of dY), outside the graph: the rows are widened a chunk
/// at a time and summed in f64, so no f32 copy of the whole tensor is made.
/// The output's dtype is `in_float32`'s. None where this does not apply
/// (other dims, CUDA, or a graph to record).
fn leading_dims_sum_half(x: &Tensor, dims: &[usize], keepdim: bool) -> Result<Option<Tensor>> {
    let leading =
        !dims.is_empty() && dims.len() < x.rank() && dims.iter().enumerate().all(|(i, &d)| d == i);
    if !leading || (x.requires_grad() && crate::autograd::is_grad_enabled()) {
        return Ok(None);
    }
    let columns: usize = x.dims()[dims.len()..].iter().product();
    let sums = match &*x.storage() {
        Storage::Cpu(CpuStorage::BF16(v)) => cpu::column_sums_half(v, columns),
        Storage::Cpu(CpuStorage::F16(v)) => cpu::column_sums_half(v, columns),
        _ => return Ok(None),
    };
    let shape = reduced_shape(x.shape(), dims, keepdim);
    let out = Tensor::from_cpu(CpuStorage::F32(sums), shape);
    autocast::finish_output(AutocastOp::Sum, out, x.dtype()).map(Some)
}

struct SumBackward {
    input_shape: Shape,
    /// The output shape with reduced dims kept as 1, to broadcast from.
    kept_shape: Shape,
    /// 1 for sum, 1/count for mean.
    scale: f64,
}

impl Backward for SumBackward {
    fn name(&self) -> &'static str {
        if self.scale == 1.0 { "sum" } else { "mean" }
    }
    // Reads only the gradient: the inputs' values can go.
    fn reads_input_values(&self) -> bool {
        false
    }

    // dL/dx = broadcast(dL/dy) · scale   (scale = 1 for sum, 1/count for mean)
    fn backward(&self, _inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut g = grad
            .reshape(self.kept_shape.clone())?
            .broadcast_to(self.input_shape.clone())?;
        if self.scale != 1.0 {
            g = g.mul_scalar(self.scale)?;
        }
        Ok(vec![Some(g)])
    }
}

struct MaxBackward {
    dim: usize,
    argmax: Tensor,
}

impl Backward for MaxBackward {
    fn name(&self) -> &'static str {
        "max"
    }
    // dL/dx[argmax] = dL/dy, 0 elsewhere
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = &inputs[0];
        let (outer, n, inner) = x.shape().split_at_dim(self.dim);
        let dx = match (&*grad.storage(), &*self.argmax.storage()) {
            (Storage::Cpu(g), Storage::Cpu(CpuStorage::U32(argmax))) => {
                Storage::Cpu(float_slice!("max_backward", g, |gv| CpuStorage::from(
                    cpu::max_backward(gv, argmax, outer, n, inner)
                )))
            }
            (Storage::Cuda(g), Storage::Cuda(argmax)) => {
                Storage::Cuda(cuda::max_backward(g, argmax, outer, n, inner)?)
            }
            _ => unreachable!("max saved u32 indices on the device of its input"),
        };
        Ok(vec![Some(Tensor::from_result(dx, x.shape().clone()))])
    }
}
