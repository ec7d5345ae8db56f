//! CPU kernels of layer normalisation over the last dim, with x viewed as rows
//! of `width` values, each row normalised on its own. Row sums accumulate in
//! f64; rows are split across rayon's threads when the input is large.

use rayon::prelude::*;

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
        // Two passes (mean, then Σ(x − mean)²) stay accurate when |mean| ≫ std.
        let row_mean = x.iter().map(|v| v.to_f64()).sum::<f64>() / width as f64;
        let var = x
            .iter()
            .map(|v| (v.to_f64() - row_mean).powi(2))
            .sum::<f64>()
            / width as f64;
        *mean = T::from_f64(row_mean);
        *invstd = T::from_f64(1.0 / (var + eps).sqrt());
        for (j, (y, &x)) in y.iter_mut().zip(x).enumerate() {
            let xhat = (x - *mean) * *invstd;
            *y = xhat * weight.map_or(T::ONE, |w| w[j]) + bias.map_or(T::ZERO, |b| b[j]);
        }
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
        for (r, dx) in dx.chunks_mut(width).enumerate() {
            let row = block * ROWS_PER_BLOCK + r;
            let range = row * width..(row + 1) * width;
            let (x, dy) = (&x[range.clone()], &dy[range]);
            let (mean, invstd) = (mean[row], invstd[row]);
            let (mut sum_dxhat, mut sum_dxhat_xhat) = (0f64, 0f64);
            for (j, (&x, &dy)) in x.iter().zip(dy).enumerate() {
                let xhat = ((x - mean) * invstd).to_f64();
                let dxhat = (dy * weight.map_or(T::ONE, |w| w[j])).to_f64();
                sum_dxhat += dxhat;
                sum_dxhat_xhat += dxhat * xhat;
                partial_dweight[j] += dy.to_f64() * xhat;
                partial_dbias[j] += dy.to_f64();
            }
            let mean_dxhat = T::from_f64(sum_dxhat / width as f64);
            let mean_dxhat_xhat = T::from_f64(sum_dxhat_xhat / width as f64);
            for (j, ((dx, &x), &dy)) in dx.iter_mut().zip(x).zip(dy).enumerate() {
                let xhat = (x - mean) * invstd;
                let dxhat = dy * weight.map_or(T::ONE, |w| w[j]);
                *dx = invstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
            }
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
