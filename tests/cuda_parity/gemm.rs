//! Every rung of the CUDA GEMM ladder (kernels/gemm.cu) against the CPU
//! gemm, for every transpose and shapes that are multiples of no tile size.
//! Tolerance atol 1e-4 + rtol 1e-4: both sides add K f32 products of N(0, 1)
//! values in different orders (tiles, FMA), so results differ by a few ulps
//! of the partial sums, which reach about √K ≈ 16 for K = 255.

use kiln::ops::gemm::{GemmKernel, cuda_gemm_kernel};
use kiln::{DType, Tensor};

use crate::common::{assert_close, check_op, cuda_or_skip, randn};

const ATOL: f64 = 1e-4;
const RTOL: f64 = 1e-4;

/// (batch, m, n, k): ragged against 16, 32 and 128 tiles and the K-slices
/// of 8 and 32, a 1×1×1 product, and dims that are ≡ 0 mod 4 (float4 path)
/// beside dims that are not (scalar fallback).
const SHAPES: [(usize, usize, usize, usize); 5] = [
    (3, 37, 129, 65),
    (1, 1, 1, 1),
    (2, 130, 67, 255),
    (1, 132, 260, 12),
    (2, 5, 3, 0),
];

/// A stored as [batch, K, M] when transposed, [batch, M, K] otherwise (B likewise).
fn operands(
    (batch, m, n, k): (usize, usize, usize, usize),
    trans_a: bool,
    trans_b: bool,
    seed: u64,
) -> (Tensor, Tensor) {
    let a_dims = if trans_a {
        [batch, k, m]
    } else {
        [batch, m, k]
    };
    let b_dims = if trans_b {
        [batch, n, k]
    } else {
        [batch, k, n]
    };
    (randn(&a_dims, seed), randn(&b_dims, seed + 1))
}

#[test]
fn every_gemm_kernel_matches_cpu_for_every_transpose_and_ragged_shape() {
    let Some(dev) = cuda_or_skip("every_gemm_kernel_matches_cpu") else {
        return;
    };
    for kernel in GemmKernel::ALL {
        for (s, &shape) in SHAPES.iter().enumerate() {
            for trans_a in [false, true] {
                for trans_b in [false, true] {
                    let (a, b) = operands(shape, trans_a, trans_b, 10 * s as u64);
                    let cpu = a.gemm(&b, trans_a, trans_b).unwrap();
                    let (a_dev, b_dev) = (a.to_device(dev).unwrap(), b.to_device(dev).unwrap());
                    let cuda = a_dev.gemm_with(&b_dev, trans_a, trans_b, kernel).unwrap();
                    assert_close(
                        &format!("{kernel:?} {shape:?} trans_a={trans_a} trans_b={trans_b}"),
                        &cpu,
                        &cuda,
                        ATOL,
                        RTOL,
                    );
                }
            }
        }
    }
}

/// 16-bit operands run v4 on tensor cores whatever rung is chosen, against
/// the CPU's 16-bit product: both accumulate in f32 and round C once, in
/// different orders, so an element may land one 16-bit ulp away (2⁻⁷ of its
/// size for bf16, 2⁻¹⁰ for f16).
#[test]
fn sixteen_bit_products_run_on_tensor_cores_and_match_cpu_for_every_transpose() {
    let Some(dev) = cuda_or_skip("sixteen_bit_products_on_tensor_cores") else {
        return;
    };
    for (dtype, rtol) in [(DType::BF16, 2f64.powi(-7)), (DType::F16, 2f64.powi(-10))] {
        for (s, &shape) in SHAPES.iter().enumerate() {
            for trans_a in [false, true] {
                for trans_b in [false, true] {
                    let (a, b) = operands(shape, trans_a, trans_b, 40 + 10 * s as u64);
                    let (a, b) = (a.to_dtype(dtype).unwrap(), b.to_dtype(dtype).unwrap());
                    let cpu = a.gemm(&b, trans_a, trans_b).unwrap();
                    let (a_dev, b_dev) = (a.to_device(dev).unwrap(), b.to_device(dev).unwrap());
                    // Asked for v1: a 16-bit product still runs v4.
                    let cuda = a_dev
                        .gemm_with(&b_dev, trans_a, trans_b, GemmKernel::V1Naive)
                        .unwrap();
                    assert_eq!(cuda.dtype(), dtype);
                    assert_close(
                        &format!("v4 {dtype} {shape:?} trans_a={trans_a} trans_b={trans_b}"),
                        &cpu,
                        &cuda,
                        1e-3,
                        rtol,
                    );
                }
            }
        }
    }
}

#[test]
fn every_gemm_kernel_gradients_match_cpu() {
    let Some(dev) = cuda_or_skip("every_gemm_kernel_gradients") else {
        return;
    };
    for kernel in GemmKernel::ALL {
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                let (a, b) = operands((3, 37, 129, 65), trans_a, trans_b, 7);
                check_op(
                    &format!("{kernel:?} gemm trans_a={trans_a} trans_b={trans_b}"),
                    dev,
                    &[a, b],
                    |t| t[0].gemm_with(&t[1], trans_a, trans_b, kernel),
                    ATOL,
                    RTOL,
                );
            }
        }
    }
}

#[test]
fn default_matmul_folded_and_broadcast_batches_match_cpu_with_gradients() {
    let Some(dev) = cuda_or_skip("default_matmul_folded_and_broadcast") else {
        return;
    };
    assert_eq!(cuda_gemm_kernel(), GemmKernel::BEST);
    // [..., M, K] @ [K, N]: the batch folds into M (one 2-D product).
    check_op(
        "matmul folded",
        dev,
        &[randn(&[2, 3, 37, 65], 20), randn(&[65, 129], 21)],
        |t| t[0].matmul(&t[1]),
        ATOL,
        RTOL,
    );
    // Batch dims broadcast against each other: operands are copied to [4, 3, ...].
    check_op(
        "matmul broadcast",
        dev,
        &[randn(&[4, 1, 37, 65], 22), randn(&[3, 65, 33], 23)],
        |t| t[0].matmul(&t[1]),
        ATOL,
        RTOL,
    );
    // Linear's x @ Wᵀ.
    check_op(
        "matmul_nt",
        dev,
        &[randn(&[37, 65], 24), randn(&[129, 65], 25)],
        |t| t[0].matmul_nt(&t[1]),
        ATOL,
        RTOL,
    );
}

/// Under autocast an f32 matmul casts its operands to bf16 on the device,
/// runs v4, and sends f32 gradients back through the casts, like the CPU.
#[test]
fn autocast_matmul_on_the_device_matches_cpu_with_f32_gradients() {
    let Some(dev) = cuda_or_skip("autocast_matmul") else {
        return;
    };
    let (a, b) = operands((2, 37, 29, 53), false, false, 70);
    let probe = randn(&[2, 37, 29], 72);
    let run = |device: kiln::Device| {
        let leaves = [&a, &b].map(|t| t.to_device(device).unwrap().requires_grad_());
        let out = {
            let _scope = kiln::autocast(DType::BF16);
            leaves[0].matmul(&leaves[1]).unwrap()
        };
        assert_eq!(out.dtype(), DType::BF16);
        let loss = out
            .mul(&probe.to_device(device).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let [da, db] = [&leaves[0], &leaves[1]].map(|l| grads.get(l).unwrap().clone());
        assert_eq!(da.dtype(), DType::F32);
        (out, da, db)
    };
    let (cpu, cuda) = (run(kiln::Device::Cpu), run(dev));
    let rtol = 2f64.powi(-7);
    assert_close("autocast matmul", &cpu.0, &cuda.0, 1e-3, rtol);
    assert_close("autocast matmul dA", &cpu.1, &cuda.1, 1e-2, rtol);
    assert_close("autocast matmul dB", &cpu.2, &cuda.2, 1e-2, rtol);
}
