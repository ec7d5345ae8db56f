//! CPU reference reductions over one dim of a tensor viewed as [outer, n, inner].
//! Sums accumulate in f64 so that large f32 reductions (batch-norm statistics,
//! losses) stay accurate.

use rayon::prelude::*;

use crate::storage::Float;

/// out[o, i] = Σ_j x[o, j, i].
pub fn sum<T: Float>(x: &[T], outer: usize, n: usize, inner: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; outer * inner];
    let reduce_one = |(o, out_row): (usize, &mut [T])| {
        let mut acc = vec![0f64; inner];
        for j in 0..n {
            let row = &x[(o * n + j) * inner..(o * n + j + 1) * inner];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v.to_f64();
            }
        }
        for (o, a) in out_row.iter_mut().zip(acc) {
            *o = T::from_f64(a);
        }
    };
    if x.len() >= 1 << 16 && outer > 1 {
        out.par_chunks_mut(inner).enumerate().for_each(reduce_one);
    } else {
        out.chunks_mut(inner).enumerate().for_each(reduce_one);
    }
    out
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
