//! Matrix products: `matmul` with PyTorch's batch broadcasting, and `gemm`,
//! which multiplies transposed operands without copying them (the backward
//! rules and `Linear` use it). Both operands need rank ≥ 2.

pub mod cpu;

use crate::autograd::Backward;
use crate::error::{Error, Result};
use crate::float_slice2;
use crate::ops::broadcast_shape;
use crate::storage::{CpuStorage, Storage};
use crate::tensor::{Shape, Tensor, check_operands};

use cpu::GemmDims;

/// How the operands of one `gemm` call line up.
struct Plan {
    dims: GemmDims,
    out_shape: Shape,
    /// Batch dims to which each operand must first be broadcast (None: use as is).
    lhs_broadcast: Option<Shape>,
    rhs_broadcast: Option<Shape>,
}

fn plan(lhs: &Tensor, rhs: &Tensor, trans_lhs: bool, trans_rhs: bool) -> Result<Plan> {
    let op = "matmul";
    if lhs.rank() < 2 || rhs.rank() < 2 {
        return Err(Error::shape(
            op,
            format!(
                "both operands need rank >= 2, got {} and {} (unsqueeze a vector first)",
                lhs.shape(),
                rhs.shape()
            ),
        ));
    }
    let (lr, rr) = (lhs.rank(), rhs.rank());
    let (l0, l1) = (lhs.dims()[lr - 2], lhs.dims()[lr - 1]);
    let (r0, r1) = (rhs.dims()[rr - 2], rhs.dims()[rr - 1]);
    let (m, k) = if trans_lhs { (l1, l0) } else { (l0, l1) };
    let (k2, n) = if trans_rhs { (r1, r0) } else { (r0, r1) };
    if k != k2 {
        return Err(Error::shape(
            op,
            format!(
                "inner dims differ: {}{} @ {}{} needs {k} == {k2}",
                lhs.shape(),
                if trans_lhs { "ᵀ" } else { "" },
                rhs.shape(),
                if trans_rhs { "ᵀ" } else { "" },
            ),
        ));
    }
    let lhs_batch = Shape::new(&lhs.dims()[..lr - 2]);
    let rhs_batch = Shape::new(&rhs.dims()[..rr - 2]);
    // [..., M, K] @ [K, N]: fold the batch into M, no copy.
    if rr == 2 && !trans_lhs {
        let rows = lhs_batch.numel() * m;
        let mut out = lhs_batch.dims().to_vec();
        out.extend([m, n]);
        return Ok(Plan {
            dims: GemmDims {
                batch: 1,
                m: rows,
                n,
                k,
                trans_a: false,
                trans_b: trans_rhs,
            },
            out_shape: Shape::new(out),
            lhs_broadcast: None,
            rhs_broadcast: None,
        });
    }
    let batch = broadcast_shape(op, &lhs_batch, &rhs_batch)?;
    let with_mats = |b: &Shape, r: usize, c: usize| {
        let mut dims = b.dims().to_vec();
        dims.extend([r, c]);
        Shape::new(dims)
    };
    let mut out = batch.dims().to_vec();
    out.extend([m, n]);
    Ok(Plan {
        dims: GemmDims {
            batch: batch.numel(),
            m,
            n,
            k,
            trans_a: trans_lhs,
            trans_b: trans_rhs,
        },
        out_shape: Shape::new(out),
        lhs_broadcast: (lhs_batch != batch).then(|| with_mats(&batch, l0, l1)),
        rhs_broadcast: (rhs_batch != batch).then(|| with_mats(&batch, r0, r1)),
    })
}

impl Tensor {
    /// Matrix product with batch broadcasting: [..., M, K] @ [..., K, N].
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.gemm(rhs, false, false)
    }

    /// self @ rhsᵀ (transposing the last two dims of rhs without a copy), as in `Linear`.
    pub fn matmul_nt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.gemm(rhs, false, true)
    }

    /// op(self) @ op(rhs), where op transposes the last two dims when asked.
    pub fn gemm(&self, rhs: &Tensor, trans_lhs: bool, trans_rhs: bool) -> Result<Tensor> {
        check_operands("matmul", &[self, rhs])?;
        let plan = plan(self, rhs, trans_lhs, trans_rhs)?;
        let lhs_data = match &plan.lhs_broadcast {
            Some(shape) => crate::no_grad_scope(|| self.broadcast_to(shape.clone()))?,
            None => self.clone(),
        };
        let rhs_data = match &plan.rhs_broadcast {
            Some(shape) => crate::no_grad_scope(|| rhs.broadcast_to(shape.clone()))?,
            None => rhs.clone(),
        };
        let out = lhs_data.with_cpu(|a| {
            rhs_data.with_cpu(|b| -> Result<_> {
                Ok(float_slice2!("matmul", a, b, |av, bv| CpuStorage::from(
                    cpu::gemm(plan.dims, av, bv)
                )))
            })
        })?;
        Ok(Tensor::from_op(
            Storage::Cpu(out),
            plan.out_shape,
            &[self, rhs],
            |_| GemmBackward {
                trans_lhs,
                trans_rhs,
            },
        ))
    }
}

struct GemmBackward {
    trans_lhs: bool,
    trans_rhs: bool,
}

impl Backward for GemmBackward {
    fn name(&self) -> &'static str {
        "matmul"
    }

    // C = op(A)·op(B):  dA = dC·op(B)ᵀ (transposed back if op(A) = Aᵀ),  dB = op(A)ᵀ·dC (likewise)
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (a, b) = (&inputs[0], &inputs[1]);
        // The folded case ([..., M, K] @ [K, N]) is differentiated as one 2-D product.
        let folded = b.rank() == 2 && a.rank() > 2 && !self.trans_lhs;
        let (a2, g2) = if folded {
            let k = a.dims()[a.rank() - 1];
            let n = grad.dims()[grad.rank() - 1];
            (
                a.reshape([a.numel() / k, k])?,
                grad.reshape([grad.numel() / n, n])?,
            )
        } else {
            (a.clone(), grad.clone())
        };
        let da = match (self.trans_lhs, self.trans_rhs) {
            (false, false) => g2.gemm(b, false, true)?, // dA = dC Bᵀ
            (false, true) => g2.gemm(b, false, false)?, // dA = dC B
            (true, false) => b.gemm(&g2, false, true)?, // dA = B dCᵀ
            (true, true) => b.gemm(&g2, true, true)?,   // dA = Bᵀ dCᵀ
        };
        let db = match (self.trans_lhs, self.trans_rhs) {
            (false, false) => a2.gemm(&g2, true, false)?, // dB = Aᵀ dC
            (false, true) => g2.gemm(&a2, true, false)?,  // dB = dCᵀ A
            (true, false) => a2.gemm(&g2, false, false)?, // dB = A dC
            (true, true) => g2.gemm(&a2, true, true)?,    // dB = dCᵀ Aᵀ
        };
        let da = if folded {
            da.reshape(a.shape().clone())?
        } else {
            da.sum_to_shape(a.shape())?
        };
        let db = db.sum_to_shape(b.shape())?;
        Ok(vec![Some(da), Some(db)])
    }
}
