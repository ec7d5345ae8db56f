//! CPU reference reductions over one dim of a tensor viewed as [outer, n, inner].
//! Sums accumulate in f64 so that large f32 reductions (batch-norm statistics,
//! losses) stay accurate.

use rayon::prelude::*;

use crate::half_float::{self, CHUNK, HalfFloat};
use crate::per_isa;
use crate::simd;
use crate::storage::Float;

/// Below this many inputs a sum runs on the calling thread alone.
const PARALLEL_LEN: usize = 1 << 16;

/// Columns of one output row a task reduces when the output has fewer rows
/// than there are threads (a bias gradient sums [rows, features] down to
/// one row of features: split by columns, every thread gets a share).
const MIN_COLUMNS_PER_TASK: usize = 64;

/// out[o, i] = Σ_j x[o, j, i].
pub fn sum<T: Float>(x: &[T], outer: usize, n: usize, inner: usize) -> Vec<T> {
    assert_eq!(x.len(), outer * n * inner, "sum: input length");
    let mut out = vec![T::ZERO; outer * inner];
    if outer == 0 || inner == 0 {
        return out;
    }
    if inner == 1 {
        // Whole contiguous runs: eight f64 lanes each.
        let reduce_run = |(o, out): (usize, &mut T)| *out = sum_run(&x[o * n..(o + 1) * n]);
        if x.len() >= PARALLEL_LEN && outer > 1 {
            out.par_iter_mut().enumerate().for_each(reduce_run);
        } else {
            out.iter_mut().enumerate().for_each(reduce_run);
        }
        return out;
    }
    // One task per block of one output row's columns: Σ_j over rows of x.
    let threads = rayon::current_num_threads();
    let block = if outer >= threads {
        inner
    } else {
        inner
            .div_ceil(threads.div_ceil(outer))
            .max(MIN_COLUMNS_PER_TASK)
    };
    let reduce_block = |o: usize, first: usize, out: &mut [T]| {
        let mut acc = vec![0f64; out.len()];
        for j in 0..n {
            let start = (o * n + j) * inner + first;
            accumulate_f64(&mut acc, &x[start..start + out.len()]);
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = T::from_f64(a);
        }
    };
    if x.len() >= PARALLEL_LEN {
        out.par_chunks_mut(inner).enumerate().for_each(|(o, row)| {
            row.par_chunks_mut(block)
                .enumerate()
                .for_each(|(b, out)| reduce_block(o, b * block, out))
        });
    } else {
        for (o, row) in out.chunks_mut(inner).enumerate() {
            reduce_block(o, 0, row);
        }
    }
    out
}

/// Column sums of a 16-bit [rows, columns] matrix (rows = x.len() / columns),
/// in f64, rounded once to f32: each task widens a chunk of its rows at a
/// time (no f32 copy of the whole matrix) into a row of sums of its own.
pub fn column_sums_half<H: HalfFloat>(x: &[H], columns: usize) -> Vec<f32> {
    if columns == 0 {
        return Vec::new();
    }
    let rows = x.len() / columns;
    let chunk_rows = (CHUNK / columns).max(1);
    let tasks = if x.len() >= PARALLEL_LEN {
        rayon::current_num_threads().min(rows.max(1))
    } else {
        1
    };
    let rows_per_task = rows.div_ceil(tasks).max(1);
    let partial = |task: &[H]| {
        let mut acc = vec![0f64; columns];
        for chunk in task.chunks(chunk_rows * columns) {
            for row in half_float::widen(chunk).chunks_exact(columns) {
                accumulate_f64(&mut acc, row);
            }
        }
        acc
    };
    let partials: Vec<Vec<f64>> = x[..rows * columns]
        .par_chunks(rows_per_task * columns)
        .map(partial)
        .collect();
    let mut sums = vec![0f64; columns];
    for p in &partials {
        for (s, v) in sums.iter_mut().zip(p) {
            *s += v;
        }
    }
    sums.into_iter().map(|s| s as f32).collect()
}

per_isa! {
    /// Σ x in eight f64 lanes.
    fn sum_run / sum_run_with<T>(x: &[T]) -> T where [T: Float] {
        T::from_f64(simd::sum_f64(x, x, |v, _| v.to_f64()))
    }
}

per_isa! {
    /// acc[i] += x[i] in f64, vectorised for the CPU's widest unit.
    fn accumulate_f64 / accumulate_f64_with<T>(acc: &mut [f64], x: &[T]) where [T: Float] {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += v.to_f64();
        }
    }
}

/// Maximum over the middle dim and the index of its first occurrence.
pub fn max<T: Float>(x: &[T], outer: usize, n: usize, inner: usize) -> (Vec<T>, Vec<u32>) {
    let mut values = vec![T::ZERO; outer * inner];
    let mut indices = vec![0u32; outer * inner];
    for o in 0..outer {
        for i in 0..inner {
            let mut best = x[o * n * inner + i];
            let mut best_j = 0;
            for j in 1..n {
                let v = x[(o * n + j) * inner + i];
                // NaN propagates, as in PyTorch.
                if v > best || (v.is_nan() && !best.is_nan()) {
                    best = v;
                    best_j = j;
                }
            }
            values[o * inner + i] = best;
            indices[o * inner + i] = best_j as u32;
        }
    }
    (values, indices)
}

/// dx[o, argmax[o, i], i] = dy[o, i]; zero elsewhere.
pub fn max_backward<T: Float>(
    dy: &[T],
    argmax: &[u32],
    outer: usize,
    n: usize,
    inner: usize,
) -> Vec<T> {
    let mut dx = vec![T::ZERO; outer * n * inner];
    for o in 0..outer {
        for i in 0..inner {
            let j = argmax[o * inner + i] as usize;
            dx[(o * n + j) * inner + i] = dy[o * inner + i];
        }
    }
    dx
}

/// x · s (the mean is a scaled sum).
pub fn scale<T: Float>(x: &[T], s: f64) -> Vec<T> {
    let s = T::from_f64(s);
    x.iter().map(|&v| v * s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Σ_j x[o, j, i] the plain way, in f64.
    fn reference(x: &[f64], outer: usize, n: usize, inner: usize) -> Vec<f64> {
        let mut out = vec![0.0; outer * inner];
        for o in 0..outer {
            for j in 0..n {
                for i in 0..inner {
                    out[o * inner + i] += x[(o * n + j) * inner + i];
                }
            }
        }
        out
    }

    #[test]
    fn sums_match_the_plain_loop_for_every_split() {
        // Small (one thread), one output row split by columns across
        // threads, many rows, and whole contiguous runs (inner = 1).
        for (outer, n, inner) in [
            (1, 1, 1),
            (2, 3, 5),
            (1, 2048, 384),
            (1, 700, 100),
            (3, 900, 70),
            (40, 300, 1),
            (1, 100_000, 1),
            (5, 0, 4),
        ] {
            let x: Vec<f64> = (0..outer * n * inner)
                .map(|i| ((i * 7919 % 1013) as f64 - 506.0) / 97.0)
                .collect();
            let got = sum(&x, outer, n, inner);
            let want = reference(&x, outer, n, inner);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-9 * w.abs().max(1.0),
                    "[{outer}, {n}, {inner}]: {g} vs {w}"
                );
            }
        }
    }
}
