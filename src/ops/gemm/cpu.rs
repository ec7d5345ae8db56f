//! CPU matrix multiply. `gemm_reference` is the plain triple loop anyone can
//! check by eye; `gemm` is the fast path through the `gemm` crate (packed,
//! SIMD micro-kernels), split across the batch or inside one product with rayon.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::storage::Float;

/// One (possibly batched) product C[b] = op(A[b]) · op(B[b]) with op = transpose or identity.
/// A is [batch, M, K] (or [batch, K, M] if `trans_a`), B is [batch, K, N] (or [batch, N, K]).
#[derive(Clone, Copy, Debug)]
pub struct GemmDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl GemmDims {
    /// (row stride, column stride) of op(A) inside one batch item.
    fn a_strides(&self) -> (usize, usize) {
        if self.trans_a {
            (1, self.m)
        } else {
            (self.k, 1)
        }
    }

    fn b_strides(&self) -> (usize, usize) {
        if self.trans_b {
            (1, self.k)
        } else {
            (self.n, 1)
        }
    }
}

/// C[b, i, j] = Σ_p op(A)[b, i, p] · op(B)[b, p, j], the definition itself.
pub fn gemm_reference<T: Float>(d: GemmDims, a: &[T], b: &[T]) -> Vec<T> {
    let (a_rs, a_cs) = d.a_strides();
    let (b_rs, b_cs) = d.b_strides();
    let mut c = vec![T::ZERO; d.batch * d.m * d.n];
    for batch in 0..d.batch {
        let a = &a[batch * d.m * d.k..];
        let b = &b[batch * d.k * d.n..];
        for i in 0..d.m {
            for j in 0..d.n {
                let mut acc = T::ZERO;
                for p in 0..d.k {
                    acc += a[i * a_rs + p * a_cs] * b[p * b_rs + j * b_cs];
                }
                c[(batch * d.m + i) * d.n + j] = acc;
            }
        }
    }
    c
}

/// The fast path: same result as `gemm_reference` up to rounding.
pub fn gemm<T: Float>(d: GemmDims, a: &[T], b: &[T]) -> Vec<T> {
    let mut c = vec![T::ZERO; d.batch * d.m * d.n];
    if d.m == 0 || d.n == 0 {
        return c;
    }
    let (a_len, b_len, c_len) = (d.m * d.k, d.k * d.n, d.m * d.n);
    // Many products: one per thread. One product: threads inside it.
    if d.batch > 1 {
        c.par_chunks_mut(c_len).enumerate().for_each(|(i, c)| {
            gemm_one(
                d,
                &a[i * a_len..(i + 1) * a_len],
                &b[i * b_len..(i + 1) * b_len],
                c,
                Parallelism::None,
            )
        });
    } else {
        let threads = if d.m * d.n * d.k >= 1 << 18 {
            Parallelism::Rayon(0)
        } else {
            Parallelism::None
        };
        gemm_one(d, a, b, &mut c, threads);
    }
    c
}

fn gemm_one<T: Float>(d: GemmDims, a: &[T], b: &[T], c: &mut [T], parallelism: Parallelism) {
    let (a_rs, a_cs) = d.a_strides();
    let (b_rs, b_cs) = d.b_strides();
    assert!(a.len() >= d.m * d.k && b.len() >= d.k * d.n && c.len() >= d.m * d.n);
    // SAFETY: the asserts above bound every index the strides can reach:
    // op(A) is m×k, op(B) is k×n, C is m×n row-major, all inside their slices.
    unsafe {
        gemm::gemm(
            d.m,
            d.n,
            d.k,
            c.as_mut_ptr(),
            1,
            d.n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::ZERO,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    #[test]
    fn fast_path_matches_the_reference_for_every_transpose() {
        let mut rng = StdRng::seed_from_u64(3);
        // Sizes that are not multiples of any micro-kernel tile, and one large
        // enough to take the multi-threaded path.
        for &(batch, m, n, k) in &[
            (1, 1, 1, 1),
            (3, 7, 5, 9),
            (1, 33, 17, 65),
            (2, 1, 13, 4),
            (1, 70, 80, 90),
        ] {
            for trans_a in [false, true] {
                for trans_b in [false, true] {
                    let d = GemmDims {
                        batch,
                        m,
                        n,
                        k,
                        trans_a,
                        trans_b,
                    };
                    let a: Vec<f64> = (0..batch * m * k)
                        .map(|_| rng.random_range(-1.0..1.0))
                        .collect();
                    let b: Vec<f64> = (0..batch * k * n)
                        .map(|_| rng.random_range(-1.0..1.0))
                        .collect();
                    let fast = gemm(d, &a, &b);
                    let reference = gemm_reference(d, &a, &b);
                    for (x, y) in fast.iter().zip(&reference) {
                        assert!((x - y).abs() < 1e-12, "{d:?}: {x} vs {y}");
                    }
                }
            }
        }
    }
}
