//! CPU kernels of 2-D batch normalisation, with x viewed as [N, C, HW]: each
//! channel is N planes of HW contiguous values. Per-channel sums accumulate in
//! f64 (a channel of a DCGAN batch holds tens of thousands of values), and the
//! work is split across rayon's threads when it is large.

use rayon::prelude::*;

use crate::per_isa;
use crate::simd::LaneSums;
use crate::storage::Float;

/// Below this many elements a kernel runs on one thread (spawning costs more).
const PARALLEL_THRESHOLD: usize = 1 << 15;

/// The layout of x: `batch` planes per channel, `spatial` = H·W values per plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchNormDims {
    pub batch: usize,
    pub channels: usize,
    pub spatial: usize,
}

impl BatchNormDims {
    /// m = N·H·W, the number of values each channel's statistics are taken over.
    pub fn per_channel(&self) -> usize {
        self.batch * self.spatial
    }

    fn numel(&self) -> usize {
        self.batch * self.channels * self.spatial
    }

    /// The N planes of channel `c`.
    fn planes<'a, T>(&self, x: &'a [T], c: usize) -> impl Iterator<Item = &'a [T]> + use<'a, T> {
        let (channels, spatial) = (self.channels, self.spatial);
        (0..self.batch).map(move |n| {
            let start = (n * channels + c) * spatial;
            &x[start..start + spatial]
        })
    }
}

/// Per-channel statistics of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelStats {
    pub mean: Vec<f64>,
    /// The biased variance (divided by m), which normalisation uses.
    pub var: Vec<f64>,
}

/// Mean and biased variance of each channel over (N, H, W), in two passes
/// (mean first, then Σ(x − mean)²), which stays accurate when |mean| ≫ std.
pub fn channel_stats<T: Float>(x: &[T], d: BatchNormDims) -> ChannelStats {
    let one_channel = |c: usize| channel_moments(x, d, c);
    let stats: Vec<(f64, f64)> = if d.numel() >= PARALLEL_THRESHOLD {
        (0..d.channels).into_par_iter().map(one_channel).collect()
    } else {
        (0..d.channels).map(one_channel).collect()
    };
    let (mean, var) = stats.into_iter().unzip();
    ChannelStats { mean, var }
}

per_isa! {
    /// (mean, biased variance) of channel c, each sum in eight f64 lanes.
    fn channel_moments / channel_moments_with<T>(x: &[T], d: BatchNormDims, c: usize) -> (f64, f64)
    where [T: Float] {
        let count = d.per_channel() as f64;
        let mut sum = LaneSums::default();
        for plane in d.planes(x, c) {
            sum.add(plane, plane, |v, _| v.to_f64());
        }
        let mean = sum.total() / count;
        let mut squares = LaneSums::default();
        for plane in d.planes(x, c) {
            squares.add(plane, plane, |v, _| (v.to_f64() - mean).powi(2));
        }
        (mean, squares.total() / count)
    }
}

per_isa! {
    /// (Σ dy, Σ dy·x̂) of channel c, with x̂ = (x − mean)·invstd, in f64 lanes.
    fn channel_grad_sums / channel_grad_sums_with<T>(
        x: &[T],
        dy: &[T],
        d: BatchNormDims,
        c: usize,
        mean: T,
        invstd: T,
    ) -> (f64, f64) where [T: Float] {
        let (mut sum_dy, mut sum_dy_xhat) = (LaneSums::default(), LaneSums::default());
        for (x, dy) in d.planes(x, c).zip(d.planes(dy, c)) {
            sum_dy.add(dy, dy, |g, _| g.to_f64());
            sum_dy_xhat.add(x, dy, |x, g| g.to_f64() * ((x - mean) * invstd).to_f64());
        }
        (sum_dy.total(), sum_dy_xhat.total())
    }
}

/// y = (x − mean_c) · invstd_c · weight_c + bias_c for each channel c, with
/// weight = 1 and bias = 0 when absent.
pub fn normalize<T: Float>(
    x: &[T],
    d: BatchNormDims,
    mean: &[T],
    invstd: &[T],
    weight: Option<&[T]>,
    bias: Option<&[T]>,
) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    if out.is_empty() {
        return out;
    }
    let one_plane = |(plane, y): (usize, &mut [T])| {
        let c = plane % d.channels;
        let scale = invstd[c] * weight.map_or(T::ONE, |w| w[c]);
        let shift = bias.map_or(T::ZERO, |b| b[c]);
        let x = &x[plane * d.spatial..(plane + 1) * d.spatial];
        for (y, &x) in y.iter_mut().zip(x) {
            *y = (x - mean[c]) * scale + shift;
        }
    };
    if x.len() >= PARALLEL_THRESHOLD {
        let planes_per_task = (PARALLEL_THRESHOLD / 8 / d.spatial).max(1);
        out.par_chunks_mut(d.spatial)
            .enumerate()
            .with_min_len(planes_per_task)
            .for_each(one_plane);
    } else {
        out.chunks_mut(d.spatial).enumerate().for_each(one_plane);
    }
    out
}

/// Gradients of batch normalisation with respect to x, weight and bias.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormGrads<T> {
    pub dx: Vec<T>,
    pub dweight: Vec<T>,
    pub dbias: Vec<T>,
}

/// The backward pass, with x̂ = (x − mean)·invstd recomputed from the saved
/// per-channel `mean` and `invstd`, and m = N·H·W:
/// - dweight_c = Σ dy·x̂, dbias_c = Σ dy (sums over channel c);
/// - training (the statistics depend on x), with dx̂ = dy·γ:
///   dx = invstd/m · (m·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂)) = γ·invstd · (dy − Σdy/m − x̂·Σ(dy·x̂)/m);
/// - eval (the statistics are constants): dx = dy·γ·invstd.
pub fn batch_norm_backward<T: Float>(
    x: &[T],
    dy: &[T],
    d: BatchNormDims,
    mean: &[T],
    invstd: &[T],
    weight: Option<&[T]>,
    training: bool,
) -> BatchNormGrads<T> {
    // Per channel: (Σ dy, Σ dy·x̂) in f64.
    let channel_sums = |c: usize| channel_grad_sums(x, dy, d, c, mean[c], invstd[c]);
    let sums: Vec<(f64, f64)> = if d.numel() >= PARALLEL_THRESHOLD {
        (0..d.channels).into_par_iter().map(channel_sums).collect()
    } else {
        (0..d.channels).map(channel_sums).collect()
    };
    let dbias: Vec<T> = sums.iter().map(|&(s, _)| T::from_f64(s)).collect();
    let dweight: Vec<T> = sums.iter().map(|&(_, s)| T::from_f64(s)).collect();

    let count = d.per_channel() as f64;
    let mut dx = vec![T::ZERO; x.len()];
    if dx.is_empty() {
        return BatchNormGrads { dx, dweight, dbias };
    }
    let one_plane = |(plane, dx): (usize, &mut [T])| {
        let c = plane % d.channels;
        let scale = invstd[c] * weight.map_or(T::ONE, |w| w[c]);
        let range = plane * d.spatial..(plane + 1) * d.spatial;
        let (x, dy) = (&x[range.clone()], &dy[range]);
        if training {
            let mean_dy = T::from_f64(sums[c].0 / count);
            let mean_dy_xhat = T::from_f64(sums[c].1 / count);
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                let xhat = (x - mean[c]) * invstd[c];
                *dx = scale * (dy - mean_dy - xhat * mean_dy_xhat);
            }
        } else {
            for (dx, &dy) in dx.iter_mut().zip(dy) {
                *dx = scale * dy;
            }
        }
    };
    if x.len() >= PARALLEL_THRESHOLD {
        let planes_per_task = (PARALLEL_THRESHOLD / 8 / d.spatial).max(1);
        dx.par_chunks_mut(d.spatial)
            .enumerate()
            .with_min_len(planes_per_task)
            .for_each(one_plane);
    } else {
        dx.chunks_mut(d.spatial).enumerate().for_each(one_plane);
    }
    BatchNormGrads { dx, dweight, dbias }
}

/// running ← (1 − momentum)·running + momentum·batch_stat, as PyTorch.
pub fn update_running_stat<T: Float>(running: &[T], batch_stat: &[f64], momentum: f64) -> Vec<T> {
    running
        .iter()
        .zip(batch_stat)
        .map(|(&r, &b)| T::from_f64((1.0 - momentum) * r.to_f64() + momentum * b))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIMS: BatchNormDims = BatchNormDims {
        batch: 2,
        channels: 3,
        spatial: 2,
    };

    /// x[n, c, s] = 10·c + n·2 + s: channel c holds 10c + {0, 1, 2, 3}.
    fn ramp() -> Vec<f64> {
        let mut x = Vec::new();
        for n in 0..2 {
            for c in 0..3 {
                for s in 0..2 {
                    x.push(10.0 * c as f64 + (n * 2 + s) as f64);
                }
            }
        }
        x
    }

    #[test]
    fn channel_stats_are_per_channel_mean_and_biased_variance() {
        let stats = channel_stats(&ramp(), DIMS);
        assert_eq!(stats.mean, vec![1.5, 11.5, 21.5]);
        // Var of {0, 1, 2, 3} divided by m = 4: (2.25 + 0.25 + 0.25 + 2.25) / 4.
        assert_eq!(stats.var, vec![1.25; 3]);
    }

    #[test]
    fn normalize_applies_each_channels_affine_map() {
        let x = ramp();
        let y = normalize(
            &x,
            DIMS,
            &[1.5, 11.5, 21.5],
            &[2.0, 2.0, 2.0],
            Some(&[1.0, -1.0, 0.5]),
            Some(&[0.0, 1.0, 2.0]),
        );
        // Channel 1 of batch item 1 (plane 4): x = 12, 13 → -(x − 11.5)·2 + 1.
        assert_eq!(&y[8..10], &[0.0, -2.0]);
        // Channel 2 of batch item 0 (plane 2): x = 20, 21 → (x − 21.5)·2·0.5 + 2.
        assert_eq!(&y[4..6], &[0.5, 1.5]);
    }

    #[test]
    fn eval_backward_scales_dy_by_weight_times_invstd() {
        let x = ramp();
        let dy = vec![1.0; 12];
        let grads = batch_norm_backward(
            &x,
            &dy,
            DIMS,
            &[1.5, 11.5, 21.5],
            &[0.5, 0.5, 0.5],
            Some(&[2.0, 4.0, 6.0]),
            false,
        );
        assert_eq!(&grads.dx[0..6], &[1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        assert_eq!(grads.dbias, vec![4.0; 3]);
        // Σ x̂ over a channel = 0 when the mean is the batch mean.
        assert_eq!(grads.dweight, vec![0.0; 3]);
    }

    #[test]
    fn training_backward_of_a_constant_gradient_is_zero() {
        // y is shifted by the batch mean, so a uniform dy cannot change the loss through x.
        let x = ramp();
        let stats = channel_stats(&x, DIMS);
        let invstd: Vec<f64> = stats.var.iter().map(|v| 1.0 / v.sqrt()).collect();
        let grads = batch_norm_backward(&x, &[0.3; 12], DIMS, &stats.mean, &invstd, None, true);
        assert!(grads.dx.iter().all(|v| v.abs() < 1e-12), "{:?}", grads.dx);
    }

    #[test]
    fn running_update_blends_with_momentum() {
        let updated = update_running_stat(&[1.0f32, 2.0], &[3.0, 0.0], 0.25);
        assert_eq!(updated, vec![1.5, 1.5]);
    }
}
