//! Elementwise, activation, reduction, shape and matmul ops.

use kiln::GeluApproximation;
use proptest::prelude::*;

use crate::common::{check, randn, uniform};

/// A shape of rank 1..=3 with sizes 1..=4 (size-1 dims included).
fn small_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..=4, 1..=3)
}

/// A pair of shapes that broadcast: the second drops leading dims and sets some to 1.
fn broadcast_pair() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    (small_shape(), any::<u8>(), 0usize..=2).prop_map(|(a, mask, drop)| {
        let drop = drop.min(a.len() - 1);
        let b = a[drop..]
            .iter()
            .enumerate()
            .map(|(i, &d)| if mask & (1 << i) != 0 { 1 } else { d })
            .collect();
        (a, b)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn broadcast_arithmetic((a, b) in broadcast_pair(), seed in any::<u64>(), swap in any::<bool>()) {
        let (a, b) = if swap { (b, a) } else { (a, b) };
        let x = randn(&a, seed);
        let y = randn(&b, seed ^ 1);
        check(|t| t[0].add(&t[1]), &[x.clone(), y.clone()]);
        check(|t| t[0].sub(&t[1]), &[x.clone(), y.clone()]);
        check(|t| t[0].mul(&t[1]), &[x.clone(), y.clone()]);
        // Keep the divisor away from zero.
        let y_pos = uniform(0.5, 2.0, &b, seed ^ 2);
        check(|t| t[0].div(&t[1]), &[x, y_pos]);
    }

    #[test]
    fn pointwise_maps(shape in small_shape(), seed in any::<u64>()) {
        let x = randn(&shape, seed);
        let positive = uniform(0.2, 3.0, &shape, seed ^ 3);
        check(|t| t[0].neg(), std::slice::from_ref(&x));
        check(|t| t[0].exp(), std::slice::from_ref(&x));
        check(|t| t[0].log(), std::slice::from_ref(&positive));
        check(|t| t[0].sqrt(), std::slice::from_ref(&positive));
        check(|t| t[0].powf(2.5), &[positive]);
        check(|t| t[0].add_scalar(1.5)?.mul_scalar(-0.7), std::slice::from_ref(&x));
        // Values exactly at the clamp bounds have no derivative; randn avoids them.
        check(|t| t[0].clamp(-0.5, 0.8), &[x]);
    }

    #[test]
    fn activations(shape in small_shape(), seed in any::<u64>()) {
        // Kinks at 0 (relu, leaky_relu) are never hit by continuous random values.
        let x = randn(&shape, seed).mul_scalar(2.0).unwrap();
        check(|t| t[0].relu(), std::slice::from_ref(&x));
        check(|t| t[0].leaky_relu(0.2), std::slice::from_ref(&x));
        check(|t| t[0].tanh(), std::slice::from_ref(&x));
        check(|t| t[0].sigmoid(), std::slice::from_ref(&x));
        check(|t| t[0].gelu(GeluApproximation::None), std::slice::from_ref(&x));
        check(|t| t[0].gelu(GeluApproximation::Tanh), &[x]);
    }

    #[test]
    fn reductions(shape in small_shape(), seed in any::<u64>(), keepdim in any::<bool>(), pick in any::<u8>()) {
        let x = randn(&shape, seed);
        let dim = pick as usize % shape.len();
        let dims: Vec<usize> = (0..shape.len()).filter(|d| pick & (1 << d) != 0).collect();
        check(|t| t[0].sum(&dims, keepdim), std::slice::from_ref(&x));
        check(|t| t[0].mean(&dims, keepdim), std::slice::from_ref(&x));
        check(|t| t[0].sum_all(), std::slice::from_ref(&x));
        check(|t| t[0].mean_all(), std::slice::from_ref(&x));
        // randn values are distinct, so the max is unique and differentiable.
        check(|t| t[0].max(dim, keepdim), &[x]);
    }

    #[test]
    fn shape_ops(shape in small_shape(), seed in any::<u64>(), pick in any::<u8>()) {
        let x = randn(&shape, seed);
        let rank = shape.len();
        let dim = pick as usize % rank;
        let numel: usize = shape.iter().product();
        check(|t| t[0].reshape([numel]), std::slice::from_ref(&x));
        let mut perm: Vec<usize> = (0..rank).collect();
        perm.rotate_left(pick as usize % rank);
        check(|t| t[0].permute(&perm), std::slice::from_ref(&x));
        check(|t| t[0].transpose(0, rank - 1), std::slice::from_ref(&x));
        let size = shape[dim];
        let start = pick as usize % size;
        check(|t| t[0].narrow(dim, start, size - start), std::slice::from_ref(&x));
        let y = randn(&shape, seed ^ 5);
        check(|t| kiln::Tensor::cat(&[&t[0], &t[1], &t[0]], dim), &[x.clone(), y.clone()]);
        check(|t| kiln::Tensor::stack(&[&t[0], &t[1]], dim), &[x.clone(), y]);
        let mut target = vec![3];
        target.extend(&shape);
        check(|t| t[0].broadcast_to(target.clone()), std::slice::from_ref(&x));
        check(|t| t[0].unsqueeze(dim)?.squeeze(dim), &[x]);
    }

    #[test]
    fn matmul_with_batches_and_transposes(
        m in 1usize..=4, k in 1usize..=4, n in 1usize..=4, batch in 1usize..=3,
        seed in any::<u64>(), ta in any::<bool>(), tb in any::<bool>(),
    ) {
        let mat = |rows: usize, cols: usize, t: bool| if t { vec![batch, cols, rows] } else { vec![batch, rows, cols] };
        let a = randn(&mat(m, k, ta), seed);
        let b = randn(&mat(k, n, tb), seed ^ 7);
        check(|t| t[0].gemm(&t[1], ta, tb), &[a.clone(), b.clone()]);
        // Batch broadcasting: [batch, M, K] @ [1, K, N].
        let b1 = randn(&[1, k, n], seed ^ 8);
        let a_plain = randn(&[batch, m, k], seed ^ 9);
        check(|t| t[0].matmul(&t[1]), &[a_plain.clone(), b1]);
        // The folded path: [batch, M, K] @ [K, N] and @ [N, K]ᵀ.
        let w = randn(&[k, n], seed ^ 10);
        check(|t| t[0].matmul(&t[1]), &[a_plain.clone(), w]);
        let w_t = randn(&[n, k], seed ^ 11);
        check(|t| t[0].matmul_nt(&t[1]), &[a_plain, w_t]);
    }

    #[test]
    fn linear_with_and_without_bias(
        m in 1usize..=4, k in 1usize..=4, n in 1usize..=4, batch in 1usize..=3,
        seed in any::<u64>(),
    ) {
        let x = randn(&[batch, m, k], seed);
        let w = randn(&[n, k], seed ^ 1);
        let b = randn(&[n], seed ^ 2);
        check(|t| t[0].linear(&t[1], Some(&t[2])), &[x.clone(), w.clone(), b]);
        check(|t| t[0].linear(&t[1], None), &[x, w]);
    }
}
