//! CPU kernels of layer normalisation, with x viewed as rows of `width`
//! values (one row per normalised slice), each row normalised on its own. Row sums accumulate in
//! f64; rows are split across rayon's threads when the input is large.

use rayon::prelude::*;

use crate::per_isa;
use crate::simd::sum_f64;
use crate::storage::Float;

/// Below this many elements a kernel runs on one thread (spawning costs more).
const PARALLEL_THRESHOLD: usize = 1 << 15;

/// Rows per block of the backward pass: each block sums its own partial
/// dweight/dbias, and the blocks are added in order, so the result does not
/// depend on the number of threads.
const ROWS_PER_BLOCK: usize = 64;

/// The forward result and the per-row statistics the backward needs.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNormForward<T> {
    pub out: Vec<T>,
    pub mean: Vec<T>,
    /// 1/√(var + eps), var being the biased variance of the row.
    pub invstd: Vec<T>,
}

/// y = (x − mean)·invstd·weight + bias for every row (weight = 1, bias = 0
/// when absent); `width` must be > 0.
pub fn layer_norm<T: Float>(
    x: &[T],
    width: usize,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
) -> LayerNormForward<T> {
    let rows = x.len() / width;
    let mut out = vec![T::ZERO; x.len()];
    let mut mean = vec![T::ZERO; rows];
    let mut invstd = vec![T::ZERO; rows];
    let one_row = |(row, ((y, mean), invstd)): (usize, ((&mut [T], &mut T), &mut T))| {
        let x = &x[row * width..(row + 1) * width];
        (*mean, *invstd) = normalize_row(x, weight, bias, eps, y);
    };
    if x.len() >= PARALLEL_THRESHOLD {
        let rows_per_task = (PARALLEL_THRESHOLD / 8 / width).max(1);
        out.par_chunks_mut(width)
            .zip(mean.par_iter_mut())
            .zip(invstd.par_iter_mut())
            .enumerate()
            .with_min_len(rows_per_task)
            .for_each(one_row);
    } else {
        out.chunks_mut(width)
            .zip(mean.iter_mut())
            .zip(invstd.iter_mut())
            .enumerate()
            .for_each(one_row);
    }
    LayerNormForward { out, mean, invstd }
}

/// Gradients of layer normalisation with respect to x, weight and bias.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNormGrads<T> {
    pub dx: Vec<T>,
    pub dweight: Vec<T>,
    pub dbias: Vec<T>,
}

/// The backward pass, with x̂ = (x − mean)·invstd recomputed from the saved
/// per-row statistics and dx̂ = dy·weight:
/// - dx = invstd · (dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) (means over the row);
/// - dweight = Σ_rows dy·x̂, dbias = Σ_rows dy.
pub fn layer_norm_backward<T: Float>(
    x: &[T],
    dy: &[T],
    width: usize,
    mean: &[T],
    invstd: &[T],
    weight: Option<&[T]>,
) -> LayerNormGrads<T> {
    let mut dx = vec![T::ZERO; x.len()];
    // Each block of rows writes its dx and returns its partial (Σ dy·x̂, Σ dy) per column.
    let one_block = |(block, dx): (usize, &mut [T])| {
        let mut partial_dweight = vec![0f64; width];
        let mut partial_dbias = vec![0f64; width];
        let mut dxhat = vec![T::ZERO; width];
        for (r, dx) in dx.chunks_mut(width).enumerate() {
            let row = block * ROWS_PER_BLOCK + r;
            let range = row * width..(row + 1) * width;
            let (x, dy) = (&x[range.clone()], &dy[range]);
            let row_grads = RowGrads {
                dx,
                dxhat: &mut dxhat,
                dweight: &mut partial_dweight,
                dbias: &mut partial_dbias,
            };
            normalize_row_backward(x, dy, mean[row], invstd[row], weight, row_grads);
        }
        (partial_dweight, partial_dbias)
    };
    let block_len = (ROWS_PER_BLOCK * width).max(1);
    let partials: Vec<(Vec<f64>, Vec<f64>)> = if x.len() >= PARALLEL_THRESHOLD {
        dx.par_chunks_mut(block_len)
            .enumerate()
            .map(one_block)
            .collect()
    } else {
        dx.chunks_mut(block_len)
            .enumerate()
            .map(one_block)
            .collect()
    };
    let mut dweight = vec![0f64; width];
    let mut dbias = vec![0f64; width];
    for (partial_dweight, partial_dbias) in partials {
        for (total, p) in dweight.iter_mut().zip(partial_dweight) {
            *total += p;
        }
        for (total, p) in dbias.iter_mut().zip(partial_dbias) {
            *total += p;
        }
    }
    LayerNormGrads {
        dx,
        dweight: dweight.into_iter().map(T::from_f64).collect(),
        dbias: dbias.into_iter().map(T::from_f64).collect(),
    }
}

per_isa! {
    /// One row: y = (x − mean)·invstd·weight + bias; returns (mean, invstd).
    fn normalize_row / normalize_row_with<T>(
        x: &[T],
        weight: Option<&[T]>,
        bias: Option<&[T]>,
        eps: f64,
        y: &mut [T],
    ) -> (T, T) where [T: Float] {
        let width = x.len() as f64;
        // Two passes (mean, then Σ(x − mean)²) stay accurate when |mean| ≫ std.
        let row_mean = sum_f64(x, x, |v, _| v.to_f64()) / width;
        let var = sum_f64(x, x, |v, _| (v.to_f64() - row_mean).powi(2)) / width;
        let mean = T::from_f64(row_mean);
        let invstd = T::from_f64(1.0 / (var + eps).sqrt());
        let xhat = |x: T| (x - mean) * invstd;
        // An absent weight or bias is 1 or 0, applied as such (as PyTorch's
        // kernels do: x̂·1 + 0 turns −0 into +0).
        match (weight, bias) {
            (Some(w), Some(b)) => {
                for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                    *y = xhat(x) * w + b;
                }
            }
            (Some(w), None) => {
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = xhat(x) * w + T::ZERO;
                }
            }
            (None, Some(b)) => {
                for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                    *y = xhat(x) * T::ONE + b;
                }
            }
            (None, None) => {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = xhat(x) * T::ONE + T::ZERO;
                }
            }
        }
        (mean, invstd)
    }
}

/// Where one row's backward writes: its dx, a scratch row for dx̂, and the
/// block's running (Σ dy·x̂, Σ dy) per column.
struct RowGrads<'a, T> {
    dx: &'a mut [T],
    dxhat: &'a mut [T],
    dweight: &'a mut [f64],
    dbias: &'a mut [f64],
}

per_isa! {
    /// One row of the backward pass (see [`layer_norm_backward`]).
    fn normalize_row_backward / normalize_row_backward_with<T>(
        x: &[T],
        dy: &[T],
        mean: T,
        invstd: T,
        weight: Option<&[T]>,
        grads: RowGrads<'_, T>,
    ) where [T: Float] {
        let RowGrads { dx, dxhat, dweight, dbias } = grads;
        let xhat = |x: T| (x - mean) * invstd;
        match weight {
            Some(w) => dxhat.iter_mut().zip(dy).zip(w).for_each(|((d, &dy), &w)| *d = dy * w),
            None => dxhat.copy_from_slice(dy),
        }
        for (((dw, db), &x), &dy) in dweight.iter_mut().zip(dbias.iter_mut()).zip(x).zip(dy) {
            *dw += dy.to_f64() * xhat(x).to_f64();
            *db += dy.to_f64();
        }
        let width = x.len() as f64;
        let mean_dxhat = T::from_f64(sum_f64(dxhat, dxhat, |d, _| d.to_f64()) / width);
        let sum_dxhat_xhat = sum_f64(dxhat, x, |d, x| d.to_f64() * xhat(x).to_f64());
        let mean_dxhat_xhat = T::from_f64(sum_dxhat_xhat / width);
        for ((dx, &x), &d) in dx.iter_mut().zip(x).zip(dxhat.iter()) {
            *dx = invstd * (d - mean_dxhat - xhat(x) * mean_dxhat_xhat);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_gets_zero_mean_and_unit_variance() {
        let x = [1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 14.0];
        let f = layer_norm(&x, 4, None, None, 0.0);
        assert_eq!(f.mean, vec![2.5, 11.0]);
        for row in f.out.chunks(4) {
            let mean: f64 = row.iter().sum::<f64>() / 4.0;
            let var: f64 = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0;
            assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-12, "{row:?}");
        }
    }

    #[test]
    fn weight_and_bias_apply_per_column() {
        let f = layer_norm(&[-1.0, 1.0], 2, Some(&[2.0, 3.0]), Some(&[0.5, -0.5]), 0.0);
        assert_eq!(f.out, vec![-1.5, 2.5]);
    }

    #[test]
    fn backward_sums_parameter_grads_over_rows_the_same_with_any_block_split() {
        // 150 rows span three blocks; the sums must equal a plain loop's.
        let width = 3;
        let x: Vec<f64> = (0..150 * width)
            .map(|i| ((i * 37) % 11) as f64 - 5.0)
            .collect();
        let dy: Vec<f64> = (0..150 * width)
            .map(|i| ((i * 13) % 7) as f64 - 3.0)
            .collect();
        let f = layer_norm(&x, width, None, None, 1e-5);
        let grads = layer_norm_backward(&x, &dy, width, &f.mean, &f.invstd, None);
        let mut dbias = vec![0.0; width];
        let mut dweight = vec![0.0; width];
        for row in 0..150 {
            for j in 0..width {
                let i = row * width + j;
                dbias[j] += dy[i];
                dweight[j] += dy[i] * f.out[i];
            }
        }
        for j in 0..width {
            assert!((grads.dbias[j] - dbias[j]).abs() < 1e-9);
            assert!((grads.dweight[j] - dweight[j]).abs() < 1e-9);
        }
    }
}
