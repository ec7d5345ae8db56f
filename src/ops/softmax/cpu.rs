//! CPU kernels of softmax and log-softmax over the last dim, with x viewed as
//! rows of `width` values. Each row subtracts its maximum before `exp` (so no
//! logit overflows) and sums in f64. The row kernels are public: causal
//! attention applies them to the visible prefix of each score row.

use rayon::prelude::*;

use crate::per_isa;
use crate::simd::sum_f64;
use crate::storage::Float;

/// Below this many elements a kernel runs on one thread (spawning costs more).
const PARALLEL_THRESHOLD: usize = 1 << 15;

/// Runs `f(row_index, row)` on every row of `out`, across threads when large.
fn for_each_row<T: Float>(out: &mut [T], width: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if out.is_empty() {
        return;
    }
    if out.len() >= PARALLEL_THRESHOLD {
        let rows_per_task = (PARALLEL_THRESHOLD / 8 / width).max(1);
        out.par_chunks_mut(width)
            .enumerate()
            .with_min_len(rows_per_task)
            .for_each(|(i, row)| f(i, row));
    } else {
        out.chunks_mut(width)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    }
}

/// The largest value of a row (NaN is skipped here; it still poisons the sum).
fn row_max<T: Float>(row: &[T]) -> T {
    row.iter()
        .fold(T::from_f64(f64::NEG_INFINITY), |m, &v| m.max(v))
}

per_isa! {
    /// Replaces logits by their softmax: yᵢ = exp(xᵢ − max x) / Σⱼ exp(xⱼ − max x).
    pub fn softmax_row_in_place / softmax_row_in_place_with<T>(row: &mut [T]) where [T: Float] {
        let max = row_max(row);
        for v in row.iter_mut() {
            *v = (*v - max).exp_nonpositive();
        }
        let inv_sum = T::from_f64(1.0 / sum_f64(row, row, |v, _| v.to_f64()));
        for v in row.iter_mut() {
            *v *= inv_sum;
        }
    }
}

per_isa! {
    /// Replaces logits by their log-softmax: yᵢ = xᵢ − max x − ln Σⱼ exp(xⱼ − max x).
    pub fn log_softmax_row_in_place / log_softmax_row_in_place_with<T>(row: &mut [T]) where [T: Float] {
        let max = row_max(row);
        let sum = sum_f64(row, row, |v, _| (v - max).exp_nonpositive().to_f64());
        let log_sum = T::from_f64(sum.ln());
        for v in row.iter_mut() {
            *v = *v - max - log_sum;
        }
    }
}

per_isa! {
    /// Turns dL/dy into dL/dx in place for one softmax row y:
    /// dxᵢ = yᵢ·(dyᵢ − Σⱼ dyⱼ·yⱼ).
    pub fn softmax_backward_row_in_place / softmax_backward_row_in_place_with<T>(
        y: &[T],
        grad: &mut [T],
    ) where [T: Float] {
        let dot = T::from_f64(sum_f64(y, grad, |y, g| (y * g).to_f64()));
        for (g, &y) in grad.iter_mut().zip(y) {
            *g = y * (*g - dot);
        }
    }
}

/// Turns dL/dy into dL/dx in place for one log-softmax row y:
/// dxᵢ = dyᵢ − exp(yᵢ)·Σⱼ dyⱼ (exp(y) is the softmax).
pub fn log_softmax_backward_row_in_place<T: Float>(y: &[T], grad: &mut [T]) {
    let sum = T::from_f64(grad.iter().map(|g| g.to_f64()).sum());
    for (g, &y) in grad.iter_mut().zip(y) {
        *g -= y.exp() * sum;
    }
}

/// Softmax of every row of `x`.
pub fn softmax<T: Float>(x: &[T], width: usize) -> Vec<T> {
    let mut out = x.to_vec();
    for_each_row(&mut out, width, |_, row| softmax_row_in_place(row));
    out
}

/// Log-softmax of every row of `x`.
pub fn log_softmax<T: Float>(x: &[T], width: usize) -> Vec<T> {
    let mut out = x.to_vec();
    for_each_row(&mut out, width, |_, row| log_softmax_row_in_place(row));
    out
}

/// dL/dx of softmax, from its output `y` and dL/dy.
pub fn softmax_backward<T: Float>(y: &[T], dy: &[T], width: usize) -> Vec<T> {
    let mut dx = dy.to_vec();
    for_each_row(&mut dx, width, |i, row| {
        softmax_backward_row_in_place(&y[i * width..(i + 1) * width], row)
    });
    dx
}

/// dL/dx of log-softmax, from its output `y` and dL/dy.
pub fn log_softmax_backward<T: Float>(y: &[T], dy: &[T], width: usize) -> Vec<T> {
    let mut dx = dy.to_vec();
    for_each_row(&mut dx, width, |i, row| {
        log_softmax_backward_row_in_place(&y[i * width..(i + 1) * width], row)
    });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_rows_sum_to_one_even_for_huge_logits() {
        let y = softmax(&[1000.0f32, 1001.0, 1002.0, -5.0, 0.0, 5.0], 3);
        assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
        for row in y.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        // Shifting a row does not change its softmax.
        let shifted = softmax(&[0.0f32, 1.0, 2.0], 3);
        assert!(
            y[..3]
                .iter()
                .zip(&shifted)
                .all(|(a, b)| (a - b).abs() < 1e-6)
        );
    }

    #[test]
    fn log_softmax_is_the_log_of_softmax() {
        let x = [0.3, -1.2, 2.5, 0.0, 7.0, -3.0];
        let y = softmax(&x, 2);
        let log_y = log_softmax(&x, 2);
        for (p, lp) in y.iter().zip(&log_y) {
            assert!((p.ln() - lp).abs() < 1e-12);
        }
    }

    #[test]
    fn backward_rows_of_a_uniform_gradient_vanish() {
        // Softmax outputs always sum to 1, so a constant dL/dy = c changes
        // nothing: dx = y·(c − c·Σy) = 0.
        let y = softmax(&[0.1, 0.7, -0.4], 3);
        let dx = softmax_backward(&y, &[2.0, 2.0, 2.0], 3);
        assert!(dx.iter().all(|v| v.abs() < 1e-15), "{dx:?}");
        // Log-softmax with dL/dy = p (the softmax): dx = p − p·Σp = 0.
        let log_y = log_softmax(&[0.1, 0.7, -0.4], 3);
        let dx = log_softmax_backward(&log_y, &y, 3);
        assert!(dx.iter().all(|v| v.abs() < 1e-15), "{dx:?}");
    }
}
