//! CPU kernels of causal scaled-dot-product attention, with q, k, v viewed as
//! `heads` = B·H independent [T, D] matrices. Each head is a few products
//! through the `gemm` crate (one thread per head, heads across rayon's
//! threads) around a row-wise masked softmax. `attention_reference` and
//! `attention_backward_reference` are the same math as direct loops.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::ops::softmax::cpu::{softmax_backward_row_in_place, softmax_row_in_place};
use crate::storage::Float;

/// Below this many multiply-adds per pass the heads run on one thread.
const PARALLEL_THRESHOLD: usize = 1 << 15;

/// `heads` = B·H matrices of `seq` = T rows and `head_dim` = D columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    pub heads: usize,
    pub seq: usize,
    pub head_dim: usize,
}

impl AttentionDims {
    /// The softmax temperature 1/√D.
    pub fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// Elements of one head's [T, D] matrix.
    fn head_len(&self) -> usize {
        self.seq * self.head_dim
    }

    /// Elements of one head's [T, T] score matrix.
    fn scores_len(&self) -> usize {
        self.seq * self.seq
    }

    fn is_empty(&self) -> bool {
        self.heads * self.seq * self.head_dim == 0
    }

    fn is_large(&self) -> bool {
        self.heads * self.scores_len() * self.head_dim >= PARALLEL_THRESHOLD
    }
}

/// The output and the attention probabilities P the backward needs.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionForward<T> {
    /// O = P·V, [heads, T, D].
    pub out: Vec<T>,
    /// P = softmax(mask(Q·Kᵀ·scale)), [heads, T, T], zero above the diagonal.
    pub probs: Vec<T>,
}

/// Gradients of attention with respect to q, k and v.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionGrads<T> {
    pub dq: Vec<T>,
    pub dk: Vec<T>,
    pub dv: Vec<T>,
}

/// c (m×n, overwritten) = scale · op(a) · op(b) on one thread, where op(a) is
/// m×k and op(b) is k×n, each row-major and read transposed when asked.
#[allow(clippy::too_many_arguments)]
fn product_into<T: Float>(
    c: &mut [T],
    (m, n, k): (usize, usize, usize),
    a: &[T],
    transpose_a: bool,
    b: &[T],
    transpose_b: bool,
    scale: T,
) {
    // (row stride, column stride) of op(a) and op(b) inside their row-major storage.
    let (a_rs, a_cs) = if transpose_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if transpose_b { (1, k) } else { (n, 1) };
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // SAFETY: the assert bounds every index the strides reach: op(a) is m×k,
    // op(b) is k×n and c is m×n, all row-major inside their slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::ZERO,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// One head: S = Q·Kᵀ·scale, P = softmax of each row i over columns 0..=i
/// (the causal mask), O = P·V.
fn head_forward<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    d: AttentionDims,
    probs: &mut [T],
    out: &mut [T],
) {
    let (t, dim) = (d.seq, d.head_dim);
    product_into(
        probs,
        (t, t, dim),
        q,
        false,
        k,
        true,
        T::from_f64(d.scale()),
    );
    for (i, row) in probs.chunks_mut(t).enumerate() {
        let (visible, future) = row.split_at_mut(i + 1);
        softmax_row_in_place(visible);
        future.fill(T::ZERO);
    }
    product_into(out, (t, dim, t), probs, false, v, false, T::ONE);
}

/// Causal attention of every head.
pub fn attention<T: Float>(q: &[T], k: &[T], v: &[T], d: AttentionDims) -> AttentionForward<T> {
    let mut out = vec![T::ZERO; d.heads * d.head_len()];
    let mut probs = vec![T::ZERO; d.heads * d.scores_len()];
    if d.is_empty() {
        return AttentionForward { out, probs };
    }
    let one_head = |(h, (probs, out)): (usize, (&mut [T], &mut [T]))| {
        let range = h * d.head_len()..(h + 1) * d.head_len();
        head_forward(
            &q[range.clone()],
            &k[range.clone()],
            &v[range],
            d,
            probs,
            out,
        );
    };
    if d.is_large() {
        probs
            .par_chunks_mut(d.scores_len())
            .zip(out.par_chunks_mut(d.head_len()))
            .enumerate()
            .for_each(one_head);
    } else {
        probs
            .chunks_mut(d.scores_len())
            .zip(out.chunks_mut(d.head_len()))
            .enumerate()
            .for_each(one_head);
    }
    AttentionForward { out, probs }
}

/// The saved inputs of one head's backward.
struct HeadInputs<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    probs: &'a [T],
    d_out: &'a [T],
}

/// One head's backward; `d_scores` is [T, T] scratch.
fn head_backward<T: Float>(
    h: HeadInputs<'_, T>,
    d: AttentionDims,
    d_scores: &mut [T],
    (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
) {
    let (t, dim) = (d.seq, d.head_dim);
    let scale = T::from_f64(d.scale());
    // dV = Pᵀ·dO
    product_into(dv, (t, dim, t), h.probs, true, h.d_out, false, T::ONE);
    // dP = dO·Vᵀ
    product_into(d_scores, (t, t, dim), h.d_out, false, h.v, true, T::ONE);
    // dS = P ⊙ (dP − rowsum(dP ⊙ P)) on the visible prefix; 0 where the mask hid S
    for (i, (d_row, p_row)) in d_scores.chunks_mut(t).zip(h.probs.chunks(t)).enumerate() {
        let (visible, future) = d_row.split_at_mut(i + 1);
        softmax_backward_row_in_place(&p_row[..=i], visible);
        future.fill(T::ZERO);
    }
    // dQ = dS·K·scale
    product_into(dq, (t, dim, t), d_scores, false, h.k, false, scale);
    // dK = dSᵀ·Q·scale
    product_into(dk, (t, dim, t), d_scores, true, h.q, false, scale);
}

/// One head's chunks of dq, dk and dv, nested as the zipped iterators yield them.
type HeadGradsMut<'a, T> = ((&'a mut [T], &'a mut [T]), &'a mut [T]);

/// Gradients of every head from the saved `probs` and dL/d(out).
pub fn attention_backward<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[T],
    d_out: &[T],
    d: AttentionDims,
) -> AttentionGrads<T> {
    let len = d.heads * d.head_len();
    let (mut dq, mut dk, mut dv) = (vec![T::ZERO; len], vec![T::ZERO; len], vec![T::ZERO; len]);
    if d.is_empty() {
        return AttentionGrads { dq, dk, dv };
    }
    let one_head = |d_scores: &mut Vec<T>, (h, ((dq, dk), dv)): (usize, HeadGradsMut<'_, T>)| {
        let range = h * d.head_len()..(h + 1) * d.head_len();
        let inputs = HeadInputs {
            q: &q[range.clone()],
            k: &k[range.clone()],
            v: &v[range.clone()],
            probs: &probs[h * d.scores_len()..(h + 1) * d.scores_len()],
            d_out: &d_out[range],
        };
        head_backward(inputs, d, d_scores, (dq, dk, dv));
    };
    let scratch = || vec![T::ZERO; d.scores_len()];
    if d.is_large() {
        dq.par_chunks_mut(d.head_len())
            .zip(dk.par_chunks_mut(d.head_len()))
            .zip(dv.par_chunks_mut(d.head_len()))
            .enumerate()
            .for_each_init(scratch, one_head);
    } else {
        let mut d_scores = scratch();
        dq.chunks_mut(d.head_len())
            .zip(dk.chunks_mut(d.head_len()))
            .zip(dv.chunks_mut(d.head_len()))
            .enumerate()
            .for_each(|item| one_head(&mut d_scores, item));
    }
    AttentionGrads { dq, dk, dv }
}

/// The definition as direct loops, for checking `attention`: for each query
/// i, pᵢⱼ = softmax over j ≤ i of (qᵢ·kⱼ)·scale, and oᵢ = Σⱼ pᵢⱼ·vⱼ.
pub fn attention_reference<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    d: AttentionDims,
) -> AttentionForward<T> {
    let (t, dim) = (d.seq, d.head_dim);
    let mut out = vec![T::ZERO; d.heads * d.head_len()];
    let mut probs = vec![T::ZERO; d.heads * d.scores_len()];
    for h in 0..d.heads {
        let row = |i: usize| (h * t + i) * dim..(h * t + i + 1) * dim;
        for i in 0..t {
            let scores: Vec<f64> = (0..=i)
                .map(|j| {
                    let dot: f64 = q[row(i)]
                        .iter()
                        .zip(&k[row(j)])
                        .map(|(&a, &b)| a.to_f64() * b.to_f64())
                        .sum();
                    dot * d.scale()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for (j, s) in scores.iter().enumerate() {
                let p = (s - max).exp() / total;
                probs[(h * t + i) * t + j] = T::from_f64(p);
                for c in 0..dim {
                    let o = &mut out[(h * t + i) * dim + c];
                    *o += T::from_f64(p * v[(h * t + j) * dim + c].to_f64());
                }
            }
        }
    }
    AttentionForward { out, probs }
}

/// The backward as direct loops over the scalar chain rule, for checking
/// `attention_backward`: with gᵢⱼ = Σ_c dOᵢc·vⱼc and sᵢⱼ = pᵢⱼ·(gᵢⱼ − Σₗ pᵢₗ·gᵢₗ),
/// dvⱼ = Σᵢ pᵢⱼ·dOᵢ, dqᵢ = scale·Σⱼ sᵢⱼ·kⱼ, dkⱼ = scale·Σᵢ sᵢⱼ·qᵢ.
pub fn attention_backward_reference<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    d_out: &[T],
    d: AttentionDims,
) -> AttentionGrads<T> {
    let (t, dim) = (d.seq, d.head_dim);
    let probs = attention_reference(q, k, v, d).probs;
    let at = |m: &[T], h: usize, i: usize, c: usize| m[(h * t + i) * dim + c].to_f64();
    let len = d.heads * d.head_len();
    let (mut dq, mut dk, mut dv) = (vec![0f64; len], vec![0f64; len], vec![0f64; len]);
    for h in 0..d.heads {
        for i in 0..t {
            let p = |j: usize| probs[(h * t + i) * t + j].to_f64();
            let g: Vec<f64> = (0..=i)
                .map(|j| (0..dim).map(|c| at(d_out, h, i, c) * at(v, h, j, c)).sum())
                .collect();
            let weighted: f64 = (0..=i).map(|j| p(j) * g[j]).sum();
            for j in 0..=i {
                let s = p(j) * (g[j] - weighted);
                for c in 0..dim {
                    dv[(h * t + j) * dim + c] += p(j) * at(d_out, h, i, c);
                    dq[(h * t + i) * dim + c] += d.scale() * s * at(k, h, j, c);
                    dk[(h * t + j) * dim + c] += d.scale() * s * at(q, h, i, c);
                }
            }
        }
    }
    let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect();
    AttentionGrads {
        dq: cast(dq),
        dk: cast(dk),
        dv: cast(dv),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) from a linear congruential sequence.
    fn values(len: usize, seed: u64) -> Vec<f64> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect()
    }

    fn assert_close(what: &str, a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-12, "{what}[{i}]: {x} vs {y}");
        }
    }

    #[test]
    fn fast_forward_and_backward_match_the_direct_loops() {
        // Small (one thread) and large (rayon across heads) shapes.
        for d in [
            AttentionDims {
                heads: 3,
                seq: 5,
                head_dim: 3,
            },
            AttentionDims {
                heads: 6,
                seq: 33,
                head_dim: 17,
            },
        ] {
            let len = d.heads * d.head_len();
            let (q, k, v, d_out) = (
                values(len, 1),
                values(len, 2),
                values(len, 3),
                values(len, 4),
            );
            let fast = attention(&q, &k, &v, d);
            let reference = attention_reference(&q, &k, &v, d);
            assert_close("out", &fast.out, &reference.out);
            assert_close("probs", &fast.probs, &reference.probs);
            let fast = attention_backward(&q, &k, &v, &fast.probs, &d_out, d);
            let reference = attention_backward_reference(&q, &k, &v, &d_out, d);
            assert_close("dq", &fast.dq, &reference.dq);
            assert_close("dk", &fast.dk, &reference.dk);
            assert_close("dv", &fast.dv, &reference.dv);
        }
    }

    #[test]
    fn first_position_sees_only_itself() {
        let d = AttentionDims {
            heads: 1,
            seq: 3,
            head_dim: 2,
        };
        let (q, k) = (values(6, 5), values(6, 6));
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let f = attention(&q, &k, &v, d);
        assert_eq!(&f.out[..2], &[1.0, 2.0]);
        assert_eq!(&f.probs[..3], &[1.0, 0.0, 0.0]);
    }
}
