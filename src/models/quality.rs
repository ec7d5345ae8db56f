//! Sample-quality scores computed from a classifier's outputs, in f64:
//!
//! - [`frechet_distance`] between two sets of feature vectors, each
//!   summarised by a Gaussian N(μ, Σ) ([`FeatureStats`]):
//!   FD = |μ₁ − μ₂|² + tr(Σ₁ + Σ₂ − 2 (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}).
//!   With Inception-v3 features this is the FID of Heusel et al. (2017);
//!   kiln feeds it its own Fashion-MNIST classifier's features instead.
//! - [`class_histogram_entropy`]: the entropy of how often each class is
//!   predicted (mode coverage: ln C when every class comes equally often).
//! - [`mean_prediction_entropy`]: the mean entropy of each sample's class
//!   distribution (sharpness: 0 when the classifier is certain of every one).
//!
//! The matrix square roots come from [`symmetric_eigen`], a cyclic Jacobi
//! eigendecomposition: slow in O(d³) per sweep, but exact to rounding and
//! plenty fast for the 128-wide features used here.

use crate::error::{Error, Result};

/// Mean and covariance of a set of feature vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureStats {
    /// Feature width d.
    pub dim: usize,
    /// Vectors summarised.
    pub count: usize,
    /// μ, length d.
    pub mean: Vec<f64>,
    /// Σ, d×d row-major, with the unbiased 1/(n − 1) normalisation (as numpy's `cov`).
    pub covariance: Vec<f64>,
}

impl FeatureStats {
    /// The statistics of `rows` vectors of width `dim` stored one after the
    /// other in `features` (`features.len() == rows · dim`, rows ≥ 2).
    pub fn from_rows(features: &[f32], dim: usize) -> Result<FeatureStats> {
        if dim == 0 {
            return Err(Error::shape(
                "FeatureStats::from_rows",
                "feature vectors must have a width of at least 1",
            ));
        }
        let mut accumulator = FeatureAccumulator::new(dim);
        accumulator.add(features)?;
        accumulator.stats()
    }
}

/// Running sums of feature vectors fed batch by batch, so that the
/// statistics of any number of vectors take O(d²) memory. The sums are of
/// x − s, s the first vector seen (a shift that keeps the one-pass
/// covariance as accurate as a two-pass one for features far from 0):
/// μ = s + Σ(x − s)/n, Σ = (Σ(x − s)(x − s)ᵀ − n (μ − s)(μ − s)ᵀ)/(n − 1).
#[derive(Clone, Debug)]
pub struct FeatureAccumulator {
    dim: usize,
    count: usize,
    shift: Vec<f64>,
    sum: Vec<f64>,
    /// Upper triangle of Σ(x − s)(x − s)ᵀ, d×d row-major.
    outer: Vec<f64>,
}

impl FeatureAccumulator {
    pub fn new(dim: usize) -> FeatureAccumulator {
        FeatureAccumulator {
            dim,
            count: 0,
            shift: Vec::new(),
            sum: vec![0.0; dim],
            outer: vec![0.0; dim * dim],
        }
    }

    /// Vectors added so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Adds the vectors stored one after the other in `features`.
    pub fn add(&mut self, features: &[f32]) -> Result<()> {
        const OP: &str = "FeatureAccumulator::add";
        let dim = self.dim;
        if dim == 0 || !features.len().is_multiple_of(dim) {
            return Err(Error::shape(
                OP,
                format!(
                    "{} values do not split into vectors of width {dim}",
                    features.len()
                ),
            ));
        }
        if let Some(bad) = features.iter().find(|v| !v.is_finite()) {
            return Err(Error::invalid(
                OP,
                format!("the features hold a non-finite value ({bad})"),
            ));
        }
        let mut centred = vec![0.0; dim];
        for row in features.chunks_exact(dim) {
            if self.shift.is_empty() {
                self.shift = row.iter().map(|&v| v as f64).collect();
            }
            for ((c, &v), s) in centred.iter_mut().zip(row).zip(&self.shift) {
                *c = v as f64 - s;
            }
            for (total, c) in self.sum.iter_mut().zip(&centred) {
                *total += c;
            }
            for i in 0..dim {
                let ci = centred[i];
                let out = &mut self.outer[i * dim..(i + 1) * dim];
                for j in i..dim {
                    out[j] += ci * centred[j];
                }
            }
            self.count += 1;
        }
        Ok(())
    }

    /// Mean and covariance of the vectors added (at least 2).
    pub fn stats(&self) -> Result<FeatureStats> {
        let (dim, count) = (self.dim, self.count);
        if count < 2 {
            return Err(Error::invalid(
                "FeatureAccumulator::stats",
                format!("a covariance needs at least 2 vectors, got {count}"),
            ));
        }
        let n = count as f64;
        let offset: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let mean = self.shift.iter().zip(&offset).map(|(s, o)| s + o).collect();
        let mut covariance = vec![0.0; dim * dim];
        for i in 0..dim {
            for j in i..dim {
                let value = (self.outer[i * dim + j] - n * offset[i] * offset[j]) / (n - 1.0);
                covariance[i * dim + j] = value;
                covariance[j * dim + i] = value;
            }
        }
        Ok(FeatureStats {
            dim,
            count,
            mean,
            covariance,
        })
    }
}

/// The Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂):
/// |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}.
///
/// The last trace is Σᵢ √λᵢ over the eigenvalues of the symmetric PSD
/// matrix Σ₁^{1/2} Σ₂ Σ₁^{1/2}; eigenvalues that rounding pushes below
/// zero count as zero. The result is clamped at 0 for the same reason.
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> Result<f64> {
    if a.dim != b.dim {
        return Err(Error::shape(
            "frechet_distance",
            format!("feature widths differ: {} and {}", a.dim, b.dim),
        ));
    }
    let d = a.dim;
    let mean_term: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    let trace = |m: &[f64]| (0..d).map(|i| m[i * d + i]).sum::<f64>();
    let root_a = psd_sqrt(&a.covariance, d);
    let product = matmul(&matmul(&root_a, &b.covariance, d), &root_a, d);
    let (eigenvalues, _) = symmetric_eigen(&symmetrised(&product, d), d);
    let cross_trace: f64 = eigenvalues.iter().map(|&l| l.max(0.0).sqrt()).sum();
    Ok((mean_term + trace(&a.covariance) + trace(&b.covariance) - 2.0 * cross_trace).max(0.0))
}

/// The entropy (nats) of the histogram of predicted classes: with pᵢ the
/// fraction of samples whose most probable class is i, −Σ pᵢ ln pᵢ.
/// `probabilities` holds one row of `classes` values per sample.
pub fn class_histogram_entropy(probabilities: &[f32], classes: usize) -> f64 {
    let mut tally = ClassTally::new(classes);
    tally.add(probabilities);
    tally.histogram_entropy()
}

/// The mean over samples of −Σᵢ p(i | x) ln p(i | x) (nats).
pub fn mean_prediction_entropy(probabilities: &[f32], classes: usize) -> f64 {
    let mut tally = ClassTally::new(classes);
    tally.add(probabilities);
    tally.mean_prediction_entropy()
}

/// The class predictions of samples fed batch by batch: how often each
/// class is the most probable, and the sum of the predictions' entropies.
#[derive(Clone, Debug)]
pub struct ClassTally {
    counts: Vec<usize>,
    entropy_sum: f64,
    samples: usize,
}

impl ClassTally {
    pub fn new(classes: usize) -> ClassTally {
        ClassTally {
            counts: vec![0; classes],
            entropy_sum: 0.0,
            samples: 0,
        }
    }

    /// Adds one row of class probabilities per sample.
    pub fn add(&mut self, probabilities: &[f32]) {
        let classes = self.counts.len();
        if classes == 0 {
            return;
        }
        for row in probabilities.chunks_exact(classes) {
            let best = row
                .iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .map_or(0, |(i, _)| i);
            self.counts[best] += 1;
            self.entropy_sum += entropy(&row.iter().map(|&p| p as f64).collect::<Vec<_>>());
            self.samples += 1;
        }
    }

    /// The entropy of the histogram of most probable classes (mode coverage).
    pub fn histogram_entropy(&self) -> f64 {
        let fractions: Vec<f64> = self
            .counts
            .iter()
            .map(|&c| c as f64 / self.samples.max(1) as f64)
            .collect();
        entropy(&fractions)
    }

    /// The mean entropy of the samples' class distributions (sharpness).
    pub fn mean_prediction_entropy(&self) -> f64 {
        self.entropy_sum / self.samples.max(1) as f64
    }
}

/// −Σ p ln p, with 0 ln 0 = 0.
fn entropy(distribution: &[f64]) -> f64 {
    distribution
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| -p * p.ln())
        .sum()
}

/// Eigenvalues and eigenvectors of the symmetric d×d row-major `matrix`,
/// by cyclic Jacobi: sweep over every off-diagonal pair (p, q), zeroing it
/// with the rotation J that makes Jᵀ A J's (p, q) entry 0, until the
/// off-diagonal mass is negligible. Returns (λ, V) with A = V diag(λ) Vᵀ;
/// column k of V (row-major) is the eigenvector of λₖ.
pub fn symmetric_eigen(matrix: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    const MAX_SWEEPS: usize = 100;
    let mut a = matrix.to_vec();
    let mut v = identity(d);
    let scale: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    for _ in 0..MAX_SWEEPS {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j].powi(2))
            .sum::<f64>()
            .sqrt();
        if off <= f64::EPSILON * scale || off == 0.0 {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq == 0.0 {
                    continue;
                }
                // θ with cot 2θ = (a_qq − a_pp) / (2 a_pq); t = tan θ, the
                // smaller root of t² + 2t·cot 2θ − 1 = 0 (a stable rotation).
                let tau = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = tau.signum() / (tau.abs() + (1.0 + tau * tau).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = t * c;
                // A ← Jᵀ A J: rows p and q, then columns p and q.
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                // V ← V J accumulates the eigenvectors.
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

/// The symmetric PSD square root V diag(√max(λ, 0)) Vᵀ of a symmetric matrix.
fn psd_sqrt(matrix: &[f64], d: usize) -> Vec<f64> {
    let (eigenvalues, v) = symmetric_eigen(&symmetrised(matrix, d), d);
    let roots: Vec<f64> = eigenvalues.iter().map(|&l| l.max(0.0).sqrt()).collect();
    let mut out = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            out[i * d + j] = (0..d).map(|k| v[i * d + k] * roots[k] * v[j * d + k]).sum();
        }
    }
    out
}

/// (M + Mᵀ)/2: removes the rounding asymmetry of a product that is
/// symmetric in exact arithmetic.
fn symmetrised(m: &[f64], d: usize) -> Vec<f64> {
    let mut out = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            out[i * d + j] = 0.5 * (m[i * d + j] + m[j * d + i]);
        }
    }
    out
}

fn identity(d: usize) -> Vec<f64> {
    let mut out = vec![0.0; d * d];
    for i in 0..d {
        out[i * d + i] = 1.0;
    }
    out
}

/// The d×d product x·y of row-major matrices.
fn matmul(x: &[f64], y: &[f64], d: usize) -> Vec<f64> {
    let mut out = vec![0.0; d * d];
    for i in 0..d {
        for k in 0..d {
            let xik = x[i * d + k];
            if xik == 0.0 {
                continue;
            }
            for j in 0..d {
                out[i * d + j] += xik * y[k * d + j];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_statistics_of_features_far_from_zero_match_a_two_pass_computation() {
        // 300 vectors of width 3 around 1e4: a naive one-pass Σx² − n μ²
        // would lose most digits of the covariance to cancellation.
        let rows: Vec<[f64; 3]> = (0..300)
            .map(|i| {
                let t = i as f64;
                [
                    1e4 + (t * 0.37).sin(),
                    1e4 - (t * 0.11).cos(),
                    5.0 + 0.01 * t,
                ]
            })
            .collect();
        let flat: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
        let widened: Vec<[f64; 3]> = flat
            .chunks_exact(3)
            .map(|r| [r[0] as f64, r[1] as f64, r[2] as f64])
            .collect();
        let n = widened.len() as f64;
        let mean: Vec<f64> = (0..3)
            .map(|k| widened.iter().map(|r| r[k]).sum::<f64>() / n)
            .collect();
        let mut accumulator = FeatureAccumulator::new(3);
        for batch in flat.chunks(3 * 7) {
            accumulator.add(batch).unwrap();
        }
        let streamed = accumulator.stats().unwrap();
        assert_eq!(streamed.count, 300);
        for i in 0..3 {
            assert!((streamed.mean[i] - mean[i]).abs() < 1e-9 * mean[i].abs().max(1.0));
            for j in 0..3 {
                let two_pass = widened
                    .iter()
                    .map(|r| (r[i] - mean[i]) * (r[j] - mean[j]))
                    .sum::<f64>()
                    / (n - 1.0);
                let got = streamed.covariance[i * 3 + j];
                assert!(
                    (got - two_pass).abs() < 1e-9,
                    "Σ[{i}][{j}]: {got} vs {two_pass}"
                );
            }
        }
        assert_eq!(FeatureStats::from_rows(&flat, 3).unwrap(), streamed);
    }

    fn stats(mean: Vec<f64>, covariance: Vec<f64>) -> FeatureStats {
        FeatureStats {
            dim: mean.len(),
            count: 100,
            mean,
            covariance,
        }
    }

    fn diagonal(values: &[f64]) -> Vec<f64> {
        let d = values.len();
        let mut out = vec![0.0; d * d];
        for (i, v) in values.iter().enumerate() {
            out[i * d + i] = *v;
        }
        out
    }

    #[test]
    fn jacobi_reconstructs_a_symmetric_matrix_from_orthonormal_eigenvectors() {
        let d = 4;
        let m = vec![
            4.0, 1.0, -2.0, 0.5, //
            1.0, 3.0, 0.0, 1.5, //
            -2.0, 0.0, 5.0, -1.0, //
            0.5, 1.5, -1.0, 2.0,
        ];
        let (values, v) = symmetric_eigen(&m, d);
        for i in 0..d {
            for j in 0..d {
                let rebuilt: f64 = (0..d)
                    .map(|k| v[i * d + k] * values[k] * v[j * d + k])
                    .sum();
                assert!(
                    (rebuilt - m[i * d + j]).abs() < 1e-12,
                    "A = V Λ Vᵀ at ({i}, {j})"
                );
                let dot: f64 = (0..d).map(|k| v[k * d + i] * v[k * d + j]).sum();
                let expected = if i == j { 1.0 } else { 0.0 };
                assert!((dot - expected).abs() < 1e-12, "VᵀV = I at ({i}, {j})");
            }
        }
        // The trace is the sum of the eigenvalues.
        assert!((values.iter().sum::<f64>() - 14.0).abs() < 1e-12);
    }

    #[test]
    fn jacobi_finds_the_eigenvalues_of_a_2x2_matrix() {
        // [[2, 1], [1, 2]] has eigenvalues 1 and 3.
        let (mut values, _) = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2);
        values.sort_by(f64::total_cmp);
        assert!((values[0] - 1.0).abs() < 1e-14 && (values[1] - 3.0).abs() < 1e-14);
    }

    #[test]
    fn distance_of_a_distribution_to_itself_is_zero() {
        let cov = vec![2.0, 0.3, 0.1, 0.3, 1.0, -0.2, 0.1, -0.2, 0.5];
        let a = stats(vec![1.0, -2.0, 0.5], cov);
        assert!(frechet_distance(&a, &a).unwrap() < 1e-12);
    }

    #[test]
    fn distance_between_diagonal_gaussians_matches_the_closed_form() {
        // Diagonal Σ commute, so the trace term is Σᵢ (√aᵢ − √bᵢ)²:
        // FD = |μ₁ − μ₂|² + Σᵢ (√aᵢ − √bᵢ)².
        let a = stats(vec![0.0, 1.0, 2.0], diagonal(&[1.0, 4.0, 9.0]));
        let b = stats(vec![1.0, 1.0, 0.0], diagonal(&[4.0, 1.0, 9.0]));
        let expected = (1.0 + 0.0 + 4.0) + (1.0 + 1.0 + 0.0);
        let fd = frechet_distance(&a, &b).unwrap();
        assert!((fd - expected).abs() < 1e-12, "{fd} vs {expected}");
        // Symmetric in its arguments.
        assert!((frechet_distance(&b, &a).unwrap() - expected).abs() < 1e-12);
    }

    #[test]
    fn distance_of_shifted_means_with_equal_covariance_is_the_squared_shift() {
        let cov = vec![1.0, 0.5, 0.5, 2.0];
        let a = stats(vec![0.0, 0.0], cov.clone());
        let b = stats(vec![3.0, 4.0], cov);
        assert!((frechet_distance(&a, &b).unwrap() - 25.0).abs() < 1e-10);
    }

    #[test]
    fn feature_stats_are_the_sample_mean_and_unbiased_covariance() {
        // Rows (0, 0), (2, 2), (4, -2): mean (2, 0); deviations (−2, 0),
        // (0, 2), (2, −2) → Σ = [[8, −4], [−4, 8]] / 2.
        let s = FeatureStats::from_rows(&[0.0, 0.0, 2.0, 2.0, 4.0, -2.0], 2).unwrap();
        assert_eq!(s.mean, vec![2.0, 0.0]);
        assert_eq!(s.covariance, vec![4.0, -2.0, -2.0, 4.0]);
        assert!(FeatureStats::from_rows(&[1.0, 2.0], 2).is_err(), "one row");
        assert!(
            FeatureStats::from_rows(&[1.0, 2.0, 3.0], 2).is_err(),
            "ragged"
        );
    }

    #[test]
    fn entropies_of_histograms_and_predictions() {
        // Four certain predictions, one per class of four: ln 4 and 0.
        let certain = [
            1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0,
        ];
        assert!((class_histogram_entropy(&certain, 4) - 4f64.ln()).abs() < 1e-12);
        assert_eq!(mean_prediction_entropy(&certain, 4), 0.0);
        // Every sample uniform over two classes: one class wins every argmax
        // (histogram entropy 0), and each sample carries ln 2.
        let unsure = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5];
        assert_eq!(class_histogram_entropy(&unsure, 2), 0.0);
        assert!((mean_prediction_entropy(&unsure, 2) - 2f64.ln()).abs() < 1e-7);
    }
}
