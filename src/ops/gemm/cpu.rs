//! CPU matrix multiply. `gemm_reference` is the plain triple loop anyone can
//! check by eye; `gemm` is the fast path through the `gemm` crate (packed,
//! SIMD micro-kernels for SSE, AVX2 and AVX-512, picked by the crate at run
//! time from what the CPU reports), split across the batch or inside one
//! product with rayon. Every CPU product of the engine, matmul and the
//! convolutions, goes through [`gemm_into`].

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
    let product = |a: &[T], b: &[T], c: &mut [T], parallel: bool| {
        let a = Mat::op(a, d.m, d.k, d.trans_a);
        let b = Mat::op(b, d.k, d.n, d.trans_b);
        gemm_into(c, a, b, false, parallel);
    };
    // Many products: one per thread. One product: threads inside it.
    if d.batch > 1 {
        c.par_chunks_mut(c_len).enumerate().for_each(|(i, c)| {
            product(
                &a[i * a_len..(i + 1) * a_len],
                &b[i * b_len..(i + 1) * b_len],
                c,
                false,
            )
        });
    } else {
        product(a, b, &mut c, worth_all_threads(d.m * d.n * d.k));
    }
    c
}

/// Whether one product of `macs` multiply-adds is worth every thread
/// (below 2¹⁸ the threads' start-up costs more than they save).
pub(crate) fn worth_all_threads(macs: usize) -> bool {
    macs >= 1 << 18
}

/// A read-only matrix view: element (r, c) is data[r·row_stride + c·col_stride].
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> Mat<'a, T> {
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix view out of bounds");
        Mat {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// op(X) [rows, cols] of an operand stored row-major as [rows, cols],
    /// or, when `transposed`, as [cols, rows].
    pub fn op(data: &'a [T], rows: usize, cols: usize, transposed: bool) -> Self {
        if transposed {
            Mat::row_major(data, cols, rows).transposed()
        } else {
            Mat::row_major(data, rows, cols)
        }
    }

    /// The transpose, as a view (no copy).
    pub fn transposed(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// True if every element (r, c) lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// dst [m, n] (row-major) = a [m, k] · b [k, n], or dst += a · b with
/// `accumulate`; across every thread when `parallel`.
pub(crate) fn gemm_into<T: Float>(
    dst: &mut [T],
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && dst.len() >= m * n && a.in_bounds() && b.in_bounds(),
        "GEMM shapes do not line up"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::ZERO);
        }
        return;
    }
    let parallelism = if parallel {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: `in_bounds` checked that each view's largest index,
    // (rows − 1)·row_stride + (cols − 1)·col_stride, lies inside its slice,
    // and dst holds m·n elements with row stride n.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            T::ONE,
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
