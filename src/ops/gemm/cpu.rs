//! CPU matrix multiply. `gemm_reference` is the plain triple loop anyone can
//! check by eye; `gemm` is the fast path through the `gemm` crate (packed,
//! SIMD micro-kernels for SSE, AVX2 and AVX-512, picked by the crate at run
//! time from what the CPU reports), split across the batch or inside one
//! product with rayon. Every CPU product of the engine, matmul and the
//! convolutions, goes through [`gemm_into`].

use std::mem::MaybeUninit;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::half_float::{self, HalfFloat};
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
    let (a_len, b_len, c_len) = (d.m * d.k, d.k * d.n, d.m * d.n);
    let product = |a: &[T], b: &[T], c: &mut [MaybeUninit<T>], parallel: bool| {
        let a = Mat::op(a, d.m, d.k, d.trans_a);
        let b = Mat::op(b, d.k, d.n, d.trans_b);
        gemm_into_uninit(c, a, b, parallel);
    };
    let mut c = Vec::with_capacity(d.batch * c_len);
    let out = &mut c.spare_capacity_mut()[..d.batch * c_len];
    // Many products: one per thread. One product: threads inside it.
    if d.batch > 1 && c_len > 0 {
        out.par_chunks_mut(c_len).enumerate().for_each(|(i, c)| {
            product(
                &a[i * a_len..(i + 1) * a_len],
                &b[i * b_len..(i + 1) * b_len],
                c,
                false,
            )
        });
    } else if d.batch == 1 {
        product(a, b, out, worth_all_threads(d.m * d.n * d.k));
    }
    // SAFETY: every product wrote all of its c_len outputs.
    unsafe { c.set_len(d.batch * c_len) };
    c
}

/// y [m, n] = x [m, k] · wᵀ + bias, with w stored [n, k] and the bias [n]
/// added to every row. Each thread takes a block of rows, writes its product
/// into uninitialised memory and adds the bias while the block is still in
/// its cache; a short wide product is split by columns instead, as every
/// product is. (The gemm crate's accumulating path, C += A·B onto rows of
/// bias, is 15–35% slower than its overwriting one at a transformer's shapes.)
pub fn linear<T: Float>(m: usize, k: usize, n: usize, x: &[T], w: &[T], bias: &[T]) -> Vec<T> {
    assert_eq!(bias.len(), n, "linear: bias length");
    assert!(x.len() >= m * k, "linear: input too short");
    let w = Mat::op(w, k, n, true);
    let mut y = Vec::with_capacity(m * n);
    let out = &mut y.spare_capacity_mut()[..m * n];
    if m == 0 || n == 0 {
        return y;
    }
    let block_product = |rows: &mut [MaybeUninit<T>], first_row: usize| {
        let count = rows.len() / n;
        let x = Mat::row_major(&x[first_row * k..], count, k);
        gemm_into_uninit(rows, x, w, false);
        // SAFETY: the product wrote every element of the block.
        add_bias_rows(unsafe { assume_written(rows) }, bias);
    };
    let threads = rayon::current_num_threads();
    let parallel = worth_all_threads(m * n * k) && threads > 1;
    if parallel && splits_by_rows(m, n, threads) && m >= threads * MIN_BLOCK {
        let block = m.div_ceil(threads).div_ceil(16) * 16;
        out.par_chunks_mut(block * n)
            .enumerate()
            .for_each(|(i, rows)| block_product(rows, i * block));
    } else if parallel {
        // A short wide product (the VAE's layers at batch 128): each thread
        // takes a block of columns, so that it packs only its share of w.
        gemm_into_uninit(out, Mat::row_major(x, m, k), w, true);
        // SAFETY: the product wrote all m·n outputs.
        add_bias_rows(unsafe { assume_written(out) }, bias);
    } else {
        block_product(out, 0);
    }
    // SAFETY: every element was written above.
    unsafe { y.set_len(m * n) };
    y
}

/// Output rows per block of a 16-bit product: the block's f32 copies of its
/// rows of A and of its output stay in the cache (64 × 768 f32 is 192 KiB).
const HALF_ROW_BLOCK: usize = 256;

/// C [m, n] = A [m, k] · B (+ `bias` on every row) for a 16-bit A and C,
/// accumulated in f32: B arrives widened. Up to HALF_ROW_BLOCK rows, A is
/// widened whole and multiplied by the f32 path (which splits a short, wide
/// product by columns, so each thread packs only its half of B). Taller A
/// and C are converted a block of rows at a time, each block one
/// single-threaded f32 product on a thread of its own, so no f32 copy of A
/// or C is ever whole.
pub(crate) fn gemm_rows_half<H: HalfFloat>(
    m: usize,
    k: usize,
    a: &[H],
    b: Mat<f32>,
    bias: Option<&[f32]>,
) -> Vec<H> {
    let n = b.cols;
    assert!(a.len() >= m * k, "gemm_rows_half: A too short");
    if m <= HALF_ROW_BLOCK {
        let a = half_float::widen(&a[..m * k]);
        let mut product = Vec::with_capacity(m * n);
        gemm_into_uninit(
            &mut product.spare_capacity_mut()[..m * n],
            Mat::row_major(&a, m, k),
            b,
            worth_all_threads(m * k * n),
        );
        // SAFETY: the product wrote all m·n elements.
        unsafe { product.set_len(m * n) };
        if let Some(bias) = bias {
            add_bias_rows(&mut product, bias);
        }
        return half_float::narrow(&product);
    }
    let mut c = Vec::with_capacity(m * n);
    let out = &mut c.spare_capacity_mut()[..m * n];
    // A block per thread, of at most HALF_ROW_BLOCK rows.
    let threads = rayon::current_num_threads();
    let block_rows = m
        .div_ceil(threads)
        .div_ceil(16)
        .clamp(1, HALF_ROW_BLOCK / 16)
        * 16;
    if n > 0 {
        out.par_chunks_mut(block_rows * n)
            .enumerate()
            .for_each(|(i, block)| {
                let rows = block.len() / n;
                let first = i * block_rows * k;
                let a_rows = half_float::widen(&a[first..first + rows * k]);
                let mut product = Vec::with_capacity(rows * n);
                let spare = &mut product.spare_capacity_mut()[..rows * n];
                gemm_into_uninit(spare, Mat::row_major(&a_rows, rows, k), b, false);
                // SAFETY: the product wrote every element of the block.
                let written = unsafe { assume_written(spare) };
                if let Some(bias) = bias {
                    add_bias_rows(written, bias);
                }
                H::narrow_into(written, block);
            });
    }
    // SAFETY: every block of rows was narrowed into its part of c.
    unsafe { c.set_len(m * n) };
    c
}

/// Reduction rows per block of a 16-bit Aᵀ·B: a block of each operand is
/// widened at a time (512 rows of a 512-wide operand is 1 MiB of f32).
const HALF_DEPTH_BLOCK: usize = 512;

/// C [m, n] = Aᵀ · B for a 16-bit A [depth, m] and B [depth, n] (a weight
/// gradient dYᵀ·X), accumulated in f32 and rounded once. A depth of one
/// block is one product across the threads; past that, each thread takes
/// a contiguous share of the depth and sums it into a C of its own, one
/// block of HALF_DEPTH_BLOCK rows at a time (widened, then one
/// single-threaded product), so no f32 copy of a whole operand is ever made
/// (in a backward pass dY and X are activation-sized) and the threads never
/// wait on each other; the partial Cs (weight-sized) are added at the end.
pub(crate) fn gemm_tn_half<H: HalfFloat>(
    depth: usize,
    m: usize,
    n: usize,
    a: &[H],
    b: &[H],
) -> Vec<H> {
    assert!(
        a.len() >= depth * m && b.len() >= depth * n,
        "gemm_tn_half: operands too short"
    );
    if depth <= HALF_DEPTH_BLOCK {
        // One block: one product, split across the threads by C's rows or columns.
        let (a_rows, b_rows) = (
            half_float::widen(&a[..depth * m]),
            half_float::widen(&b[..depth * n]),
        );
        let mut c = Vec::with_capacity(m * n);
        gemm_into_uninit(
            &mut c.spare_capacity_mut()[..m * n],
            Mat::row_major(&a_rows, depth, m).transposed(),
            Mat::row_major(&b_rows, depth, n),
            worth_all_threads(depth * m * n),
        );
        // SAFETY: the product wrote all m·n elements.
        unsafe { c.set_len(m * n) };
        return half_float::narrow(&c);
    }
    let tasks = if worth_all_threads(depth * m * n) {
        rayon::current_num_threads().min(depth.div_ceil(HALF_DEPTH_BLOCK))
    } else {
        1
    };
    let share = depth.div_ceil(tasks).max(1);
    let partial = |task: usize| {
        let mut c = vec![0f32; m * n];
        let rows = task * share..((task + 1) * share).min(depth);
        for start in rows.clone().step_by(HALF_DEPTH_BLOCK) {
            let len = HALF_DEPTH_BLOCK.min(rows.end - start);
            let a_rows = half_float::widen(&a[start * m..(start + len) * m]);
            let b_rows = half_float::widen(&b[start * n..(start + len) * n]);
            gemm_into(
                &mut c,
                Mat::row_major(&a_rows, len, m).transposed(),
                Mat::row_major(&b_rows, len, n),
                true,
                false,
            );
        }
        c
    };
    let mut partials: Vec<Vec<f32>> = (0..tasks).into_par_iter().map(partial).collect();
    let mut c = partials.swap_remove(0);
    for other in &partials {
        for (sum, value) in c.iter_mut().zip(other) {
            *sum += value;
        }
    }
    half_float::narrow(&c)
}

/// The values of a buffer a GEMM has written in full.
///
/// # Safety
/// Every element must have been initialised.
unsafe fn assume_written<T>(values: &mut [MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: MaybeUninit<T> has T's layout; the caller vouches for the values.
    unsafe { &mut *(values as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// Adds `bias` to every row of `y` (rows of `bias.len()` elements).
fn add_bias_rows<T: Float>(y: &mut [T], bias: &[T]) {
    // No columns: y is empty too.
    if bias.is_empty() {
        return;
    }
    for row in y.chunks_exact_mut(bias.len()) {
        for (value, b) in row.iter_mut().zip(bias) {
            *value += *b;
        }
    }
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
    assert!(dst.len() >= a.rows * b.cols, "GEMM output too short");
    // SAFETY: dst is initialised and holds m·n elements.
    unsafe { gemm_raw(dst.as_mut_ptr(), a, b, accumulate, parallel) }
}

/// dst [m, n] = a · b into memory not yet initialised (a new tensor's
/// buffer): every element is written, none is read, so the buffer needs no
/// zero-fill first.
pub(crate) fn gemm_into_uninit<T: Float>(
    dst: &mut [MaybeUninit<T>],
    a: Mat<T>,
    b: Mat<T>,
    parallel: bool,
) {
    assert!(dst.len() >= a.rows * b.cols, "GEMM output too short");
    // SAFETY: dst holds m·n elements; with `accumulate` false none is read.
    unsafe { gemm_raw(dst.as_mut_ptr().cast(), a, b, false, parallel) }
}

/// # Safety
/// dst must point at a.rows·b.cols elements that nothing else accesses,
/// initialised if `accumulate`.
unsafe fn gemm_raw<T: Float>(dst: *mut T, a: Mat<T>, b: Mat<T>, accumulate: bool, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && a.in_bounds() && b.in_bounds(),
        "GEMM shapes do not line up"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            // SAFETY: (caller) dst holds m·n elements; 0.0 is all zero bits.
            unsafe { dst.write_bytes(0, m * n) };
        }
        return;
    }
    let threads = rayon::current_num_threads();
    // SAFETY (both arms): the views are in bounds (checked above) and dst
    // holds m·n elements with row stride n (the caller's contract).
    if parallel && threads > 1 {
        unsafe { split_across_threads(dst, a, b, accumulate, threads) };
    } else {
        let parallelism = if parallel {
            Parallelism::Rayon(0)
        } else {
            Parallelism::None
        };
        unsafe { gemm_block(dst, n, a, b, accumulate, parallelism) };
    }
}

/// Rows (or, for a short wide product, columns) of the output below which a
/// thread's share is too small to be worth its own product.
const MIN_BLOCK: usize = 32;

/// Whether an m×n output is shared out among threads by rows (else by columns).
fn splits_by_rows(m: usize, n: usize, threads: usize) -> bool {
    m >= n || n < threads * MIN_BLOCK
}

/// One single-threaded product per thread, each on its own block of output
/// rows (or columns). The gemm crate's own threading shares the packed panels
/// of one product between threads and synchronises on them; for the
/// short-depth products of a transformer or a convolution chunk, independent
/// blocks keep each thread busy without waiting on the other.
///
/// # Safety
/// As `gemm_raw`.
unsafe fn split_across_threads<T: Float>(
    dst: *mut T,
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
    threads: usize,
) {
    let (m, n) = (a.rows, b.cols);
    let by_rows = splits_by_rows(m, n, threads);
    let extent = if by_rows { m } else { n };
    if extent < threads * MIN_BLOCK {
        // SAFETY: as the caller's.
        unsafe { gemm_block(dst, n, a, b, accumulate, Parallelism::Rayon(0)) };
        return;
    }
    // Blocks a multiple of 16 long, so every block but the last fills whole
    // micro-kernel tiles.
    let block = extent.div_ceil(threads).div_ceil(16) * 16;
    let dst_addr = dst as usize;
    (0..extent.div_ceil(block)).into_par_iter().for_each(|i| {
        let start = i * block;
        let len = block.min(extent - start);
        let dst = dst_addr as *mut T;
        // SAFETY: block i writes output rows (or columns) start..start+len
        // only, which no other block touches; the offset views stay inside
        // the checked views.
        unsafe {
            if by_rows {
                let a = Mat {
                    data: &a.data[start * a.row_stride..],
                    rows: len,
                    ..a
                };
                gemm_block(dst.add(start * n), n, a, b, accumulate, Parallelism::None);
            } else {
                let b = Mat {
                    data: &b.data[start * b.col_stride..],
                    cols: len,
                    ..b
                };
                gemm_block(dst.add(start), n, a, b, accumulate, Parallelism::None);
            }
        }
    });
}

/// dst (row stride `dst_row_stride`) [a.rows, b.cols] = a · b, or += with
/// `accumulate`.
///
/// # Safety
/// `a` and `b` must be in bounds and dst must point at a.rows rows of
/// b.cols elements, `dst_row_stride` apart, that nothing else accesses.
unsafe fn gemm_block<T: Float>(
    dst: *mut T,
    dst_row_stride: usize,
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
    parallelism: Parallelism,
) {
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            dst,
            1,
            dst_row_stride as isize,
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
            (1, 130, 40, 90),
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

    #[test]
    fn accumulating_products_split_across_threads_add_onto_the_output() {
        // Split by rows (tall) and by columns (wide), both over 2¹⁸ MACs.
        for (m, n, k) in [(300, 40, 50), (20, 700, 40)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 - 6.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 - 3.0).collect();
            let start: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32).collect();
            let mut dst = start.clone();
            let (av, bv) = (Mat::row_major(&a, m, k), Mat::row_major(&b, k, n));
            assert!(worth_all_threads(m * n * k));
            gemm_into(&mut dst, av, bv, true, true);
            let d = GemmDims {
                batch: 1,
                m,
                n,
                k,
                trans_a: false,
                trans_b: false,
            };
            let product = gemm_reference(d, &a, &b);
            for i in 0..m * n {
                // Small integers: exact in f32.
                assert_eq!(dst[i], start[i] + product[i], "{m}x{n}x{k} at {i}");
            }
        }
    }
}
