//! Inverted dropout: each element is zeroed with probability p and the
//! survivors are scaled by 1/(1 − p), so the expected value is unchanged and
//! evaluation needs no rescaling. The mask is a pure function of a seed and
//! the element's position (see `cpu.rs`): nothing is stored for backward, and
//! the CUDA kernel can draw the very same mask.

pub mod cpu;
mod cuda;

use crate::autograd::Backward;
use crate::error::{Error, Result};
use crate::float_or_half_slice;
use crate::profile;
use crate::storage::{CpuStorage, Storage};
use crate::tensor::{Tensor, check_operands};

/// Applies the dropout map (seeded mask, 1/(1 − p) scale) to `x`, on its device.
fn apply_mask(op: &'static str, x: &Tensor, p: f64, seed: u64) -> Result<Storage> {
    Ok(match &*x.storage() {
        Storage::Cpu(s) => Storage::Cpu(float_or_half_slice!(op, s, |v| CpuStorage::from(
            cpu::dropout(v, p, seed)
        ))),
        Storage::Cuda(s) => Storage::Cuda(cuda::dropout(op, s, p, seed)?),
    })
}

impl Tensor {
    /// Inverted dropout: zeroes each element with probability `p` and scales
    /// the survivors by 1/(1 − p). The mask depends only on (`seed`, element
    /// index), so the same seed gives the same mask. `p = 0` returns the input
    /// unchanged, and `p = 1` is x·0 as PyTorch's (zeros, NaN where x is NaN
    /// or infinite); `p` must be in [0, 1].
    pub fn dropout(&self, p: f64, seed: u64) -> Result<Tensor> {
        let _profile = profile::op("dropout", self.device());
        check_operands("dropout", &[self])?;
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::invalid(
                "dropout",
                format!("probability p must be in [0, 1], got {p}"),
            ));
        }
        if p == 0.0 {
            return Ok(self.clone());
        }
        if p == 1.0 {
            return self.mul_scalar(0.0);
        }
        let storage = apply_mask("dropout", self, p, seed)?;
        Ok(Tensor::from_op(
            storage,
            self.shape().clone(),
            &[self],
            |_| DropoutBackward { p, seed },
        ))
    }
}

/// Keeps only (p, seed): the mask is recomputed rather than stored.
struct DropoutBackward {
    p: f64,
    seed: u64,
}

impl Backward for DropoutBackward {
    fn name(&self) -> &'static str {
        "dropout"
    }
    // dL/dx = dL/dy · mask / (1 − p)   (the forward map itself, applied to dL/dy)
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let dx = apply_mask("dropout_backward", grad, self.p, self.seed)?;
        Ok(vec![Some(Tensor::from_result(
            dx,
            inputs[0].shape().clone(),
        ))])
    }
}
