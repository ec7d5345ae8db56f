//! CPU kernels of the fused losses. Each forward reduces to one number
//! (accumulated in f64, so a large f32 batch loses no precision) and is
//! scaled by `scale` (1/count for a mean, 1 for a sum); each backward writes
//! dL/d(input) in one pass, with `scale` = dL/d(loss) / count.

use std::ops::Range;

use rayon::prelude::*;

use crate::ops::activation::sigmoid;
use crate::ops::elementwise::cpu::{map, zip_map};
use crate::per_isa;
use crate::simd::sum_f64;
use crate::storage::Float;

/// Below this many elements a kernel runs on one thread.
const PARALLEL_THRESHOLD: usize = 1 << 15;
const CHUNK: usize = 1 << 13;

/// Σ_i term(i) for i in 0..n, in f64. Large sums add fixed-size chunks on
/// rayon's threads, then the chunk totals in order: the result does not
/// depend on the number of threads.
fn sum_terms(n: usize, term: impl Fn(usize) -> f64 + Sync) -> f64 {
    sum_chunks(n, |range| range.map(&term).sum())
}

/// Σ of `chunk_sum(range)` over fixed-size ranges covering 0..n (one range
/// when n is small), the ranges on rayon's threads, their totals added in
/// order: the result does not depend on the number of threads.
fn sum_chunks(n: usize, chunk_sum: impl Fn(Range<usize>) -> f64 + Sync) -> f64 {
    if n < PARALLEL_THRESHOLD {
        return chunk_sum(0..n);
    }
    let chunk_totals: Vec<f64> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| chunk_sum(c * CHUNK..((c + 1) * CHUNK).min(n)))
        .collect();
    chunk_totals.iter().sum()
}

/// scale · Σ (x − y)².
pub fn mse<T: Float>(x: &[T], y: &[T], scale: f64) -> T {
    let total = sum_terms(x.len(), |i| {
        let d = (x[i] - y[i]).to_f64();
        d * d
    });
    T::from_f64(total * scale)
}

/// dL/dx = 2(x − y) · scale (and dL/dy is its negative).
pub fn mse_backward<T: Float>(x: &[T], y: &[T], scale: f64) -> Vec<T> {
    let two_scale = T::from_f64(2.0 * scale);
    zip_map(x, y, |x, y| (x - y) * two_scale)
}

/// scale · Σ [max(x, 0) − x·y + ln(1 + e^(−|x|))]: −[y ln σ(x) + (1 − y) ln(1 − σ(x))]
/// rearranged so that no exponential can overflow.
pub fn bce_with_logits<T: Float>(x: &[T], y: &[T], scale: f64) -> T {
    assert_eq!(x.len(), y.len(), "bce_with_logits: operand lengths");
    // Terms in T, summed in f64: for f32, the vectorised softplus of the
    // storage module instead of libm's f64 exp and log1p per element.
    let total = sum_chunks(x.len(), |range| bce_sum(&x[range.clone()], &y[range]));
    T::from_f64(total * scale)
}

per_isa! {
    /// Σ max(x, 0) − x·y + ln(1 + e^−|x|) over one chunk, in f64.
    fn bce_sum / bce_sum_with<T>(x: &[T], y: &[T]) -> f64 where [T: Float] {
        sum_f64(x, y, |x, y| {
            (x.max(T::ZERO) - x * y + (-x.abs()).ln_1p_exp_nonpositive()).to_f64()
        })
    }
}

/// dL/dx = (σ(x) − y) · scale.
pub fn bce_with_logits_backward_input<T: Float>(x: &[T], y: &[T], scale: f64) -> Vec<T> {
    let scale = T::from_f64(scale);
    zip_map(x, y, |x, y| (sigmoid(x) - y) * scale)
}

/// dL/dy = −x · scale.
pub fn bce_with_logits_backward_target<T: Float>(x: &[T], scale: f64) -> Vec<T> {
    let scale = T::from_f64(-scale);
    map(x, |x| x * scale)
}

/// softplus(−x) = ln(1 + e^(−x)) = max(−x, 0) + ln(1 + e^(−|x|)): no exponential overflows.
fn softplus_of_negated<T: Float>(x: T) -> T {
    (-x).max(T::ZERO) + (-x.abs()).ln_1p_exp_nonpositive()
}

/// The unreduced terms (1 − y)·x + (1 + (pw − 1)·y)·softplus(−x), which is
/// −pw·y·ln σ(x) − (1 − y)·ln(1 − σ(x)) for any real y; `pos_weight` None is 1.
pub fn bce_with_logits_terms<T: Float>(x: &[T], y: &[T], pos_weight: Option<&[T]>) -> Vec<T> {
    (0..x.len())
        .map(|i| {
            let pw = pos_weight.map_or(T::ONE, |p| p[i]);
            (T::ONE - y[i]) * x[i] + (T::ONE + (pw - T::ONE) * y[i]) * softplus_of_negated(x[i])
        })
        .collect()
}

/// dL/dx = g·((1 + (pw − 1)·y)·σ(x) − pw·y) of the unreduced bce terms.
pub fn bce_with_logits_terms_backward_input<T: Float>(
    x: &[T],
    y: &[T],
    pos_weight: Option<&[T]>,
    upstream: &[T],
) -> Vec<T> {
    (0..x.len())
        .map(|i| {
            let pw = pos_weight.map_or(T::ONE, |p| p[i]);
            upstream[i] * ((T::ONE + (pw - T::ONE) * y[i]) * sigmoid(x[i]) - pw * y[i])
        })
        .collect()
}

/// dL/dy = g·((pw − 1)·softplus(−x) − x) of the unreduced bce terms.
pub fn bce_with_logits_terms_backward_target<T: Float>(
    x: &[T],
    pos_weight: Option<&[T]>,
    upstream: &[T],
) -> Vec<T> {
    (0..x.len())
        .map(|i| {
            let pw = pos_weight.map_or(T::ONE, |p| p[i]);
            upstream[i] * ((pw - T::ONE) * softplus_of_negated(x[i]) - x[i])
        })
        .collect()
}

/// log Σ_c e^(row[c]), shifted by the row's maximum so no exponential overflows.
fn log_sum_exp<T: Float>(row: &[T]) -> T {
    let max = row.iter().fold(row[0], |m, &v| m.max(v));
    let sum: f64 = row.iter().map(|&v| (v - max).exp().to_f64()).sum();
    max + T::from_f64(sum.ln())
}

/// Cross entropy of logits [rows, classes] against class targets:
/// returns scale · Σ_n (logsumexp(x_n) − x_n[t_n]) and each row's logsumexp,
/// which the backward reuses to form the softmax without another reduction.
pub fn cross_entropy<T: Float>(
    logits: &[T],
    targets: &[u32],
    classes: usize,
    scale: f64,
) -> (T, Vec<T>) {
    let rows = targets.len();
    let mut row_logsumexp = vec![T::ZERO; rows];
    let fill = |(n, lse): (usize, &mut T)| {
        *lse = log_sum_exp(&logits[n * classes..(n + 1) * classes]);
    };
    if logits.len() < PARALLEL_THRESHOLD {
        row_logsumexp.iter_mut().enumerate().for_each(fill);
    } else {
        row_logsumexp.par_iter_mut().enumerate().for_each(fill);
    }
    let total: f64 = (0..rows)
        .map(|n| (row_logsumexp[n] - logits[n * classes + targets[n] as usize]).to_f64())
        .sum();
    (T::from_f64(total * scale), row_logsumexp)
}

/// dL/dx[n, c] = (softmax(x_n)[c] − [c = t_n]) · scale, softmax(x_n)[c] = e^(x[n, c] − logsumexp(x_n)).
pub fn cross_entropy_backward<T: Float>(
    logits: &[T],
    targets: &[u32],
    row_logsumexp: &[T],
    classes: usize,
    scale: f64,
) -> Vec<T> {
    let scale = T::from_f64(scale);
    let mut dx = vec![T::ZERO; logits.len()];
    if classes == 0 {
        return dx;
    }
    let fill_row = |(n, dx_row): (usize, &mut [T])| {
        let row = &logits[n * classes..(n + 1) * classes];
        for (d, &v) in dx_row.iter_mut().zip(row) {
            *d = (v - row_logsumexp[n]).exp() * scale;
        }
        dx_row[targets[n] as usize] -= scale;
    };
    if logits.len() < PARALLEL_THRESHOLD {
        dx.chunks_mut(classes).enumerate().for_each(fill_row);
    } else {
        dx.par_chunks_mut(classes).enumerate().for_each(fill_row);
    }
    dx
}

/// scale · Σ −½(1 + logvar − mu² − e^logvar): KL(N(mu, e^logvar) ‖ N(0, 1)) summed over every element.
pub fn gaussian_kl<T: Float>(mu: &[T], logvar: &[T], scale: f64) -> T {
    let total = sum_terms(mu.len(), |i| {
        let (m, lv) = (mu[i].to_f64(), logvar[i].to_f64());
        -0.5 * (1.0 + lv - m * m - lv.exp())
    });
    T::from_f64(total * scale)
}

/// dL/dmu = mu · scale.
pub fn gaussian_kl_backward_mu<T: Float>(mu: &[T], scale: f64) -> Vec<T> {
    let scale = T::from_f64(scale);
    map(mu, |m| m * scale)
}

/// dL/dlogvar = ½(e^logvar − 1) · scale.
pub fn gaussian_kl_backward_logvar<T: Float>(logvar: &[T], scale: f64) -> Vec<T> {
    let half_scale = T::from_f64(0.5 * scale);
    map(logvar, |lv| (lv.exp() - T::ONE) * half_scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_matches_the_textbook_formula_serial_and_parallel() {
        // −log(e^x_t / Σ_c e^x_c), computed directly (values small enough not to overflow).
        for &(rows, classes) in &[(3, 4), (700, 67)] {
            let logits: Vec<f64> = (0..rows * classes)
                .map(|k| ((k * 31) % 17) as f64 / 4.0 - 2.0)
                .collect();
            let targets: Vec<u32> = (0..rows).map(|n| ((n * 3) % classes) as u32).collect();
            let expected: f64 = (0..rows)
                .map(|n| {
                    let row = &logits[n * classes..(n + 1) * classes];
                    let denominator: f64 = row.iter().map(|v| v.exp()).sum();
                    -(row[targets[n] as usize].exp() / denominator).ln()
                })
                .sum();
            let (loss, _) = cross_entropy(&logits, &targets, classes, 1.0);
            assert!(
                (loss - expected).abs() < 1e-9 * expected,
                "{loss} vs {expected}"
            );
        }
    }

    #[test]
    fn cross_entropy_gradient_rows_sum_to_zero() {
        // Σ_c (softmax_c − onehot_c) = 1 − 1 = 0 for every row.
        let (rows, classes) = (5, 7);
        let logits: Vec<f64> = (0..rows * classes)
            .map(|k| (k as f64).sin() * 3.0)
            .collect();
        let targets = [0, 6, 3, 3, 1];
        let (_, lse) = cross_entropy(&logits, &targets, classes, 1.0);
        let dx = cross_entropy_backward(&logits, &targets, &lse, classes, 1.0);
        for row in dx.chunks(classes) {
            assert!(row.iter().sum::<f64>().abs() < 1e-12);
        }
    }

    #[test]
    fn chunked_sum_equals_plain_sum() {
        let n = PARALLEL_THRESHOLD * 2 + 5;
        let plain: f64 = (0..n).map(|i| (i % 10) as f64).sum();
        assert_eq!(sum_terms(n, |i| (i % 10) as f64), plain);
    }

    #[test]
    fn bce_with_logits_is_stable_for_large_logits() {
        // x = ±1000 would overflow e^x in the naive form.
        let loss: f64 = bce_with_logits(&[1000.0, -1000.0], &[1.0, 0.0], 1.0);
        assert!(loss.abs() < 1e-12);
        let loss: f64 = bce_with_logits(&[1000.0], &[0.0], 1.0);
        assert!((loss - 1000.0).abs() < 1e-9);
    }
}
