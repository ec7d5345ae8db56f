//! Softmax over the last dim in which a row whose every score is −∞ (a
//! query that the mask lets see no key) gives weights of 0 instead of NaN.
//! PyTorch's `scaled_dot_product_attention` does the same (its
//! `_safe_softmax`), so a fully masked query row attends to nothing and
//! outputs 0, with zero gradients. Any other row is the plain softmax, and
//! so is the backward: on a row of zeros y ⊙ (dy − Σ dy ⊙ y) is zero too.

use crate::autograd::Backward;
use crate::error::Result;
use crate::float_slice;
use crate::float_slice2;
use crate::ops::softmax::{cpu as softmax_cpu, cuda as softmax_cuda};
use crate::storage::{CpuStorage, Float, Storage};
use crate::tensor::{Tensor, check_operands};
use rayon::prelude::*;

const OP: &str = "scaled_dot_product_attention";

/// Below this many elements the CPU kernel runs on one thread.
const PARALLEL_THRESHOLD: usize = 1 << 15;

/// Softmax of one row in place, or zeros when every value is −∞ (or the
/// row is empty, where there is nothing to write).
fn safe_softmax_row<T: Float>(row: &mut [T]) {
    let all_masked = row.iter().all(|&v| v.to_f64() == f64::NEG_INFINITY);
    if all_masked {
        row.fill(T::ZERO);
    } else {
        softmax_cpu::softmax_row_in_place(row);
    }
}

/// The CPU kernel: rows of `width` values of `x`.
pub fn safe_softmax<T: Float>(x: &[T], width: usize) -> Vec<T> {
    let mut out = x.to_vec();
    if width == 0 {
        return out;
    }
    if out.len() >= PARALLEL_THRESHOLD {
        out.par_chunks_mut(width).for_each(safe_softmax_row);
    } else {
        out.chunks_mut(width).for_each(safe_softmax_row);
    }
    out
}

/// The attention weights of `scores` [..., L, S]: softmax over S, with rows
/// of all −∞ giving zeros. f32 or f64 (16-bit scores are widened by the caller).
pub(crate) fn safe_softmax_last_dim(scores: &Tensor) -> Result<Tensor> {
    check_operands(OP, &[scores])?;
    let width = *scores
        .dims()
        .last()
        .expect("attention scores have rank >= 2");
    let out = match &*scores.storage() {
        Storage::Cpu(s) => Storage::Cpu(float_slice!(OP, s, |v| CpuStorage::from(safe_softmax(
            v, width
        )))),
        Storage::Cuda(s) => Storage::Cuda(softmax_cuda::masked_softmax_forward(OP, s, width)?),
    };
    Ok(Tensor::from_op(
        out,
        scores.shape().clone(),
        &[scores],
        |output| SafeSoftmaxBackward {
            output: output.clone(),
        },
    ))
}

struct SafeSoftmaxBackward {
    /// The weights y (detached).
    output: Tensor,
}

impl Backward for SafeSoftmaxBackward {
    fn name(&self) -> &'static str {
        "scaled_dot_product_attention (softmax)"
    }

    // dL/dx = y ⊙ (dL/dy − Σⱼ dL/dyⱼ · yⱼ); a fully masked row has y = 0, so dL/dx = 0 there.
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let shape = inputs[0].shape().clone();
        let width = *shape.dims().last().expect("rank >= 2");
        check_operands(OP, &[&self.output, grad])?;
        let dx = match (&*self.output.storage(), &*grad.storage()) {
            (Storage::Cpu(ys), Storage::Cpu(gs)) => {
                Storage::Cpu(float_slice2!(OP, ys, gs, |y, dy| CpuStorage::from(
                    softmax_cpu::softmax_backward(y, dy, width)
                )))
            }
            (Storage::Cuda(ys), Storage::Cuda(gs)) => {
                Storage::Cuda(softmax_cuda::softmax_backward(ys, gs, width, false)?)
            }
            _ => unreachable!("check_operands put both operands on one device"),
        };
        Ok(vec![Some(Tensor::from_result(dx, shape))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fully_masked_rows_are_zero_and_others_are_the_softmax() {
        let inf = f64::NEG_INFINITY;
        let x = [1.0, inf, 2.0, inf, inf, inf, 0.5, 0.5, 0.5];
        let y = safe_softmax(&x, 3);
        let e = (1.0f64).exp() + (2.0f64).exp();
        let expected = [
            1.0f64.exp() / e,
            0.0,
            2.0f64.exp() / e,
            0.0,
            0.0,
            0.0,
            1.0 / 3.0,
            1.0 / 3.0,
            1.0 / 3.0,
        ];
        for (a, b) in y.iter().zip(expected) {
            assert!((a - b).abs() < 1e-15, "{y:?}");
        }
    }
}
