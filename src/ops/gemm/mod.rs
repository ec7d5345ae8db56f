//! Matrix products: `matmul` with PyTorch's batch broadcasting, and `gemm`,
//! which multiplies transposed operands without copying them (the backward
//! rules and `Linear` use it). Both operands need rank ≥ 2.
//!
//! On CUDA the product runs one rung of the kernel ladder in kernels/gemm.cu
//! ([`GemmKernel`]): the best one by default, any one on request.

pub mod cpu;
pub(crate) mod cuda;

use std::sync::atomic::{AtomicU8, Ordering};

use crate::autocast::{self, AutocastOp};
use crate::autograd::Backward;
use crate::error::{Error, Result};
use crate::float_or_half_slice2;
use crate::ops::broadcast_shape;
use crate::profile;
use crate::storage::{CpuStorage, Storage};
use crate::tensor::{DType, Shape, Tensor, check_operands};

use cpu::GemmDims;

/// The numbered CUDA GEMM kernels of kernels/gemm.cu, slowest to fastest.
/// Every rung computes the same product; they differ only in how they use
/// the memory hierarchy (see the header of kernels/gemm.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmKernel {
    /// `gemm_v1_naive`: one thread per output element, operands from global memory.
    V1Naive,
    /// `gemm_v2_smem_tiled`: 32×32 tiles of both operands staged in shared memory.
    V2SmemTiled,
    /// `gemm_v3_register_blocked`: 128×128 block tiles, an 8×8 register tile per thread, float4 loads.
    V3RegisterBlocked,
    /// `gemm_v4_tensor_core`: 16-bit operands (bf16 or f16) on tensor cores,
    /// `mma.sync.m16n8k16` with f32 accumulators, 64×64 block tiles. Every
    /// 16-bit CUDA product runs it, whatever rung is chosen; an f32 product
    /// asked for it runs v3 (tensor cores take no f32 here).
    V4TensorCore,
}

impl GemmKernel {
    /// Every rung, in ladder order (for parity tests and benchmarks).
    pub const ALL: [GemmKernel; 4] = [
        GemmKernel::V1Naive,
        GemmKernel::V2SmemTiled,
        GemmKernel::V3RegisterBlocked,
        GemmKernel::V4TensorCore,
    ];

    /// The rungs that take f32 operands.
    pub const F32: [GemmKernel; 3] = [
        GemmKernel::V1Naive,
        GemmKernel::V2SmemTiled,
        GemmKernel::V3RegisterBlocked,
    ];

    /// The rung the engine uses unless told otherwise.
    pub const BEST: GemmKernel = GemmKernel::V3RegisterBlocked;

    const fn index(self) -> u8 {
        match self {
            GemmKernel::V1Naive => 0,
            GemmKernel::V2SmemTiled => 1,
            GemmKernel::V3RegisterBlocked => 2,
            GemmKernel::V4TensorCore => 3,
        }
    }
}

/// The process-wide kernel choice (an index into `GemmKernel::ALL`).
static CUDA_GEMM_KERNEL: AtomicU8 = AtomicU8::new(GemmKernel::BEST.index());

/// Makes every later CUDA matmul (forward and backward, in any thread) run
/// `kernel`, so a whole model can be timed on one rung of the ladder.
pub fn set_cuda_gemm_kernel(kernel: GemmKernel) {
    CUDA_GEMM_KERNEL.store(kernel.index(), Ordering::Relaxed);
}

/// The kernel CUDA matmuls currently use (`GemmKernel::BEST` unless set).
pub fn cuda_gemm_kernel() -> GemmKernel {
    GemmKernel::ALL[usize::from(CUDA_GEMM_KERNEL.load(Ordering::Relaxed))]
}

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
    /// Matrix product as PyTorch's `matmul`: [..., M, K] @ [..., K, N] with
    /// batch broadcasting, and a 1-D operand taken as a vector: [K] @ [K] is
    /// the dot product (a scalar), [K] @ [..., K, N] gives [..., N], and
    /// [..., M, K] @ [K] gives [..., M] (the vector's dim is added for the
    /// product and removed from the result, gradients included).
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        match (self.rank(), rhs.rank()) {
            (1, 1) => self
                .unsqueeze(0)?
                .gemm(&rhs.unsqueeze(1)?, false, false)?
                .reshape(Shape::new(Vec::new())),
            (1, r) if r >= 2 => self.unsqueeze(0)?.gemm(rhs, false, false)?.squeeze(-2),
            (l, 1) if l >= 2 => self.gemm(&rhs.unsqueeze(1)?, false, false)?.squeeze(-1),
            _ => self.gemm(rhs, false, false),
        }
    }

    /// self @ rhsᵀ (transposing the last two dims of rhs without a copy), as in `Linear`.
    pub fn matmul_nt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.gemm(rhs, false, true)
    }

    /// op(self) @ op(rhs), where op transposes the last two dims when asked.
    /// On CUDA it runs the kernel chosen by [`set_cuda_gemm_kernel`].
    pub fn gemm(&self, rhs: &Tensor, trans_lhs: bool, trans_rhs: bool) -> Result<Tensor> {
        self.gemm_with(rhs, trans_lhs, trans_rhs, cuda_gemm_kernel())
    }

    /// `gemm` on CUDA with an explicit rung of the kernel ladder, used for its
    /// backward too (the CPU ignores `kernel`). For parity tests and benchmarks.
    pub fn gemm_with(
        &self,
        rhs: &Tensor,
        trans_lhs: bool,
        trans_rhs: bool,
        kernel: GemmKernel,
    ) -> Result<Tensor> {
        let _profile = profile::op("matmul", self.device());
        let lhs = &autocast::cast_input(AutocastOp::Matmul, self)?;
        let rhs = &autocast::cast_input(AutocastOp::Matmul, rhs)?;
        check_operands("matmul", &[lhs, rhs])?;
        let plan = plan(lhs, rhs, trans_lhs, trans_rhs)?;
        let lhs_data = match &plan.lhs_broadcast {
            Some(shape) => crate::no_grad_scope(|| lhs.broadcast_to(shape.clone()))?,
            None => lhs.clone(),
        };
        let rhs_data = match &plan.rhs_broadcast {
            Some(shape) => crate::no_grad_scope(|| rhs.broadcast_to(shape.clone()))?,
            None => rhs.clone(),
        };
        let out = match (&*lhs_data.storage(), &*rhs_data.storage()) {
            // 16-bit A of one product: its rows are widened a block at a time.
            (Storage::Cpu(a), Storage::Cpu(b))
                if a.dtype().is_half()
                    && b.dtype() == a.dtype()
                    && plan.dims.batch == 1
                    && !plan.dims.trans_a =>
            {
                let d = plan.dims;
                let b = b.converted(DType::F32);
                let CpuStorage::F32(b) = &b else {
                    unreachable!("converted to f32")
                };
                let b = cpu::Mat::op(b, d.k, d.n, d.trans_b);
                Storage::Cpu(half_rows_product(a, d.m, d.k, b, None))
            }
            // 16-bit Aᵀ·B of one product (a weight gradient): the depth is
            // widened a block of rows at a time.
            (Storage::Cpu(a), Storage::Cpu(b))
                if a.dtype().is_half()
                    && b.dtype() == a.dtype()
                    && plan.dims.batch == 1
                    && plan.dims.trans_a
                    && !plan.dims.trans_b =>
            {
                let d = plan.dims;
                Storage::Cpu(match (a, b) {
                    (CpuStorage::BF16(a), CpuStorage::BF16(b)) => {
                        CpuStorage::BF16(cpu::gemm_tn_half(d.k, d.m, d.n, a, b))
                    }
                    (CpuStorage::F16(a), CpuStorage::F16(b)) => {
                        CpuStorage::F16(cpu::gemm_tn_half(d.k, d.m, d.n, a, b))
                    }
                    _ => unreachable!("two 16-bit operands of one dtype"),
                })
            }
            (Storage::Cpu(a), Storage::Cpu(b)) => {
                Storage::Cpu(float_or_half_slice2!("matmul", a, b, |av, bv| {
                    CpuStorage::from(cpu::gemm(plan.dims, av, bv))
                }))
            }
            (Storage::Cuda(a), Storage::Cuda(b)) => {
                Storage::Cuda(cuda::gemm(kernel, plan.dims, a, b)?)
            }
            _ => unreachable!("check_operands put both operands on one device"),
        };
        Ok(Tensor::from_op(out, plan.out_shape, &[lhs, rhs], |_| {
            GemmBackward {
                trans_lhs,
                trans_rhs,
                kernel,
            }
        }))
    }
}

impl Tensor {
    /// x · weightᵀ + bias, as PyTorch's `F.linear`: x [..., in] or [in], weight
    /// [out, in], bias [out]. On the CPU the bias is written into the output
    /// first and the product accumulated onto it, so the output is written
    /// once instead of a matmul and then an add over it; elsewhere (CUDA, or a
    /// bias of another shape, which broadcasts) it is `matmul_nt` then `add`.
    pub fn linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if self.rank() == 1 {
            // One vector [in] gives [out], and the bias then broadcasts
            // against [out], as F.linear's matmul-then-add does.
            let out = self.unsqueeze(0)?.matmul_nt(weight)?.squeeze(0)?;
            return match bias {
                Some(bias) => out.add(bias),
                None => Ok(out),
            };
        }
        let (x, weight, bias) =
            autocast::cast_layer_operands(AutocastOp::Linear, self, weight, bias)?;
        let (x, weight) = (&x, &weight);
        let Some(bias) = &bias else {
            return x.matmul_nt(weight);
        };
        let composite = || x.matmul_nt(weight)?.add(bias);
        if bias.rank() != 1 || weight.rank() != 2 || bias.dims()[0] != weight.dims()[0] {
            return composite();
        }
        let _profile = profile::op("linear", x.device());
        check_operands("linear", &[x, weight, bias])?;
        let plan = plan(x, weight, false, true)?;
        let d = plan.dims;
        let out = match (&*x.storage(), &*weight.storage(), &*bias.storage()) {
            (
                Storage::Cpu(CpuStorage::F32(x)),
                Storage::Cpu(CpuStorage::F32(w)),
                Storage::Cpu(CpuStorage::F32(b)),
            ) => CpuStorage::from(cpu::linear(d.m, d.k, d.n, x, w, b)),
            (
                Storage::Cpu(CpuStorage::F64(x)),
                Storage::Cpu(CpuStorage::F64(w)),
                Storage::Cpu(CpuStorage::F64(b)),
            ) => CpuStorage::from(cpu::linear(d.m, d.k, d.n, x, w, b)),
            // 16-bit operands of one dtype: w and b widened, x and y a block
            // of rows at a time.
            (Storage::Cpu(x), Storage::Cpu(w), Storage::Cpu(b))
                if x.dtype().is_half() && w.dtype() == x.dtype() && b.dtype() == x.dtype() =>
            {
                let [w, b] = [w, b].map(|s| s.converted(DType::F32));
                let (CpuStorage::F32(w), CpuStorage::F32(b)) = (&w, &b) else {
                    unreachable!("converted to f32")
                };
                let w = cpu::Mat::op(w, d.k, d.n, true);
                half_rows_product(x, d.m, d.k, w, Some(b))
            }
            _ => return composite(),
        };
        Ok(Tensor::from_op(
            Storage::Cpu(out),
            plan.out_shape,
            &[x, weight, bias],
            |_| LinearBackward,
        ))
    }
}

/// [`cpu::gemm_rows_half`] on a 16-bit storage `a` (checked by the caller).
fn half_rows_product(
    a: &CpuStorage,
    m: usize,
    k: usize,
    b: cpu::Mat<f32>,
    bias: Option<&[f32]>,
) -> CpuStorage {
    match a {
        CpuStorage::F16(a) => CpuStorage::F16(cpu::gemm_rows_half(m, k, a, b, bias)),
        CpuStorage::BF16(a) => CpuStorage::BF16(cpu::gemm_rows_half(m, k, a, b, bias)),
        _ => unreachable!("a 16-bit operand"),
    }
}

struct LinearBackward;

impl Backward for LinearBackward {
    fn name(&self) -> &'static str {
        "linear"
    }

    // y = x·Wᵀ + b:  dx = dy·W,  dW = dyᵀ·x  (matmul_nt's rule),  db = Σ_rows dy
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let product = GemmBackward {
            trans_lhs: false,
            trans_rhs: true,
            kernel: GemmKernel::BEST,
        };
        let mut grads = product.backward(&inputs[..2], grad)?;
        let bias = &inputs[2];
        grads.push(
            bias.requires_grad()
                .then(|| grad.sum_to_shape(bias.shape()))
                .transpose()?,
        );
        Ok(grads)
    }
}

struct GemmBackward {
    trans_lhs: bool,
    trans_rhs: bool,
    /// The forward's CUDA kernel, so its gradients come from the same rung.
    kernel: GemmKernel,
}

impl Backward for GemmBackward {
    fn name(&self) -> &'static str {
        "matmul"
    }

    // C = op(A)·op(B):  dA = dC·op(B)ᵀ (transposed back if op(A) = Aᵀ),  dB = op(A)ᵀ·dC (likewise)
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (a, b) = (&inputs[0], &inputs[1]);
        let kernel = self.kernel;
        // The folded case ([..., M, K] @ [K, N]) is differentiated as one 2-D product.
        let folded = b.rank() == 2 && a.rank() > 2 && !self.trans_lhs;
        let (a2, g2) = if folded {
            // [..., M, K] → [rows, K] with rows the product of the leading
            // dims (numel / K is undefined for K = 0).
            let as_rows = |t: &Tensor| {
                let (leading, last) = t.dims().split_at(t.rank() - 1);
                t.reshape([leading.iter().product(), last[0]])
            };
            (as_rows(a)?, as_rows(grad)?)
        } else {
            (a.clone(), grad.clone())
        };
        // Only the operands that need a gradient get one (a model's input
        // batch does not: skipping its dA saves a third of that layer's backward).
        let da = a.requires_grad().then(|| -> Result<Tensor> {
            let da = match (self.trans_lhs, self.trans_rhs) {
                (false, false) => g2.gemm_with(b, false, true, kernel)?, // dA = dC Bᵀ
                (false, true) => g2.gemm_with(b, false, false, kernel)?, // dA = dC B
                (true, false) => b.gemm_with(&g2, false, true, kernel)?, // dA = B dCᵀ
                (true, true) => b.gemm_with(&g2, true, true, kernel)?,   // dA = Bᵀ dCᵀ
            };
            if folded {
                da.reshape(a.shape().clone())
            } else {
                da.sum_to_shape(a.shape())
            }
        });
        let db = b.requires_grad().then(|| -> Result<Tensor> {
            let db = match (self.trans_lhs, self.trans_rhs) {
                (false, false) => a2.gemm_with(&g2, true, false, kernel)?, // dB = Aᵀ dC
                (false, true) => g2.gemm_with(&a2, true, false, kernel)?,  // dB = dCᵀ A
                (true, false) => a2.gemm_with(&g2, false, false, kernel)?, // dB = A dC
                (true, true) => g2.gemm_with(&a2, true, true, kernel)?,    // dB = dCᵀ Aᵀ
            };
            db.sum_to_shape(b.shape())
        });
        Ok(vec![da.transpose()?, db.transpose()?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chosen_cuda_kernel_reads_back_for_every_rung_and_defaults_to_best() {
        assert_eq!(cuda_gemm_kernel(), GemmKernel::BEST);
        for kernel in GemmKernel::ALL {
            set_cuda_gemm_kernel(kernel);
            assert_eq!(cuda_gemm_kernel(), kernel);
        }
        set_cuda_gemm_kernel(GemmKernel::BEST);
    }

    fn ramp(len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * scale)
            .collect()
    }

    #[test]
    fn fused_linear_matches_matmul_then_add() {
        // Depths on both sides of the GEMM's depth blocking; one thread, and
        // every thread on blocks of rows or (short and wide) of columns.
        for (rows, k, n) in [(3, 5, 7), (200, 130, 96), (64, 700, 40), (40, 90, 300)] {
            let x = Tensor::from_vec(ramp(rows * k, 0.01), [1, rows, k]).unwrap();
            let w = Tensor::from_vec(ramp(n * k, 0.02), [n, k]).unwrap();
            let b = Tensor::from_vec(ramp(n, 0.1), [n]).unwrap();
            let fused = x.linear(&w, Some(&b)).unwrap();
            let composite = x.matmul_nt(&w).unwrap().add(&b).unwrap();
            assert_eq!(fused.dims(), &[1, rows, n]);
            let (f, c) = (
                fused.to_vec::<f32>().unwrap(),
                composite.to_vec::<f32>().unwrap(),
            );
            for (a, e) in f.iter().zip(&c) {
                assert!(
                    (a - e).abs() <= 1e-5 * e.abs().max(1.0),
                    "{rows}x{k}x{n}: {a} vs {e}"
                );
            }
        }
    }

    #[test]
    fn linear_with_a_broadcast_bias_or_bad_shapes_behaves_like_matmul_then_add() {
        let x = Tensor::from_vec(ramp(12, 0.1), [4, 3]).unwrap();
        let w = Tensor::from_vec(ramp(6, 0.1), [2, 3]).unwrap();
        let scalar_bias = Tensor::from_vec(vec![0.5f32], [1]).unwrap();
        let y = x.linear(&w, Some(&scalar_bias)).unwrap();
        let expected = x.matmul_nt(&w).unwrap().add(&scalar_bias).unwrap();
        assert_eq!(
            y.to_vec::<f32>().unwrap(),
            expected.to_vec::<f32>().unwrap()
        );

        let long_bias = Tensor::from_vec(vec![0.0f32; 3], [3]).unwrap();
        let err = x.linear(&w, Some(&long_bias)).unwrap_err().to_string();
        assert!(err.contains("add"), "{err}");
        let wrong_depth = Tensor::from_vec(ramp(8, 0.1), [2, 4]).unwrap();
        let err = x.linear(&wrong_depth, None).unwrap_err().to_string();
        assert!(err.contains("inner dims differ"), "{err}");
        let f64_bias = Tensor::from_vec(vec![0.0f64; 2], [2]).unwrap();
        assert!(x.linear(&w, Some(&f64_bias)).is_err());
    }
}
