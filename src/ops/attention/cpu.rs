//! CPU kernels of causal scaled-dot-product attention, with q, k, v viewed as
//! `heads` = B·H independent [T, D] matrices. Each head is a few products
//! through the `gemm` crate (one thread per head, heads across rayon's
//! threads) around a row-wise masked softmax. A [`HeadLayout`] says where
//! each head's rows lie, so the same kernels serve contiguous [B·H, T, D]
//! operands and GPT-2's packed [B, T, 3E] projections (read in place, the
//! output and gradients written in place, no split or permute copies).
//! `attention_reference` and `attention_backward_reference` are the same
//! math as direct loops.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::ops::softmax::cpu::{softmax_backward_row_in_place, softmax_row_in_place};
use crate::storage::Float;

/// Below this many multiply-adds per pass the heads run on one thread.
const PARALLEL_THRESHOLD: usize = 1 << 15;

/// `heads` = B·H matrices of `seq` = T rows and `head_dim` = D columns,
/// and the factor the scores Q·Kᵀ are multiplied by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionDims {
    pub heads: usize,
    pub seq: usize,
    pub head_dim: usize,
    /// 1/√D unless the caller chose another (PyTorch's `scale`).
    pub scale: f64,
}

impl AttentionDims {
    /// Dims with PyTorch's default scale 1/√D.
    pub fn new(heads: usize, seq: usize, head_dim: usize) -> Self {
        AttentionDims {
            heads,
            seq,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
        }
    }

    /// The softmax temperature the scores are multiplied by.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Elements of one head's [T, D] matrix.
    fn head_len(&self) -> usize {
        self.seq * self.head_dim
    }

    /// Elements of one head's [T, T] score matrix.
    pub(crate) fn scores_len(&self) -> usize {
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

/// Where each head's [T, D] matrix lies in its buffer. Head h of the B·H is
/// head `h % per_item` of batch item `h / per_item`; its row i starts at
/// `item·item_stride + head·head_stride + i·row_stride`, and the row's D
/// values are contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadLayout {
    pub per_item: usize,
    pub item_stride: usize,
    pub head_stride: usize,
    pub row_stride: usize,
}

impl HeadLayout {
    /// [B·H, T, D]: each head one contiguous block (`causal_attention`'s operands).
    pub fn contiguous(d: AttentionDims) -> Self {
        HeadLayout {
            per_item: 1,
            item_stride: d.head_len(),
            head_stride: 0,
            row_stride: d.head_dim,
        }
    }

    /// [B, T, width] with head j's D values at columns j·D.. of every row:
    /// q, k and v inside GPT-2's packed projection (width 3·H·D, k and v
    /// starting E and 2E values in), and the merged output [B, T, H·D].
    pub fn interleaved(heads_per_item: usize, d: AttentionDims, width: usize) -> Self {
        HeadLayout {
            per_item: heads_per_item,
            item_stride: d.seq * width,
            head_stride: d.head_dim,
            row_stride: width,
        }
    }

    /// Offset of head h's first row.
    fn start(&self, head: usize) -> usize {
        (head / self.per_item) * self.item_stride + (head % self.per_item) * self.head_stride
    }

    /// Head h's [T, D] matrix inside `data`.
    fn head<'a, T>(&self, data: &'a [T], head: usize, d: AttentionDims) -> MatRef<'a, T> {
        MatRef::new(
            &data[self.start(head)..],
            d.seq,
            d.head_dim,
            self.row_stride,
        )
    }

    /// Head h's [T, D] matrix inside the buffer `out` points at.
    fn head_out<T>(&self, out: SharedOut<T>, head: usize, d: AttentionDims) -> MatOut<T> {
        MatOut {
            // The callers check that every head's rows lie inside the buffer.
            ptr: out.ptr().wrapping_add(self.start(head)),
            rows: d.seq,
            cols: d.head_dim,
            row_stride: self.row_stride,
        }
    }

    /// Elements from the buffer's start to the end of the last head's last row.
    fn extent(&self, d: AttentionDims) -> usize {
        if d.is_empty() {
            0
        } else {
            self.start(d.heads - 1) + (d.seq - 1) * self.row_stride + d.head_dim
        }
    }
}

/// A read-only matrix inside a slice: `rows` rows of `cols` contiguous
/// values, `row_stride` apart.
#[derive(Clone, Copy)]
struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    fn new(data: &'a [T], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * row_stride + cols <= data.len(),
            "attention: a head's rows run past its buffer"
        );
        MatRef {
            data,
            rows,
            cols,
            row_stride,
        }
    }

    fn contiguous(data: &'a [T], rows: usize, cols: usize) -> Self {
        MatRef::new(data, rows, cols, cols)
    }
}

/// A matrix to be written, as a raw pointer: the heads write disjoint rows
/// of one shared buffer from different threads.
#[derive(Clone, Copy)]
struct MatOut<T> {
    ptr: *mut T,
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<T> MatOut<T> {
    fn contiguous(data: &mut [T], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "attention: scratch too short");
        MatOut {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
            row_stride: cols,
        }
    }
}

/// An output buffer shared by the threads that each write their own heads.
#[derive(Clone, Copy)]
struct SharedOut<T>(*mut T);

// SAFETY: each thread writes only the rows of its own heads, which no other
// thread reads or writes (the layouts place heads in disjoint rows).
unsafe impl<T: Send> Send for SharedOut<T> {}
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// The pointer (a method, so that closures capture the whole Send wrapper).
    fn ptr(self) -> *mut T {
        self.0
    }
}

/// c (overwritten, never read) = scale · op(a) · op(b) on one thread, where
/// op transposes when asked and the shapes must line up with c's.
///
/// # Safety
/// c must point at c.rows rows of c.cols writable elements, c.row_stride
/// apart, that nothing else accesses during the call.
unsafe fn product<T: Float>(
    c: MatOut<T>,
    a: MatRef<T>,
    transpose_a: bool,
    b: MatRef<T>,
    transpose_b: bool,
    scale: T,
) {
    // (rows, cols, row stride, column stride) of op(x).
    let op = |x: MatRef<T>, transpose: bool| {
        if transpose {
            (x.cols, x.rows, 1, x.row_stride)
        } else {
            (x.rows, x.cols, x.row_stride, 1)
        }
    };
    let (m, k, a_rs, a_cs) = op(a, transpose_a);
    let (k2, n, b_rs, b_cs) = op(b, transpose_b);
    assert!(
        k == k2 && c.rows == m && c.cols == n,
        "attention: product shapes"
    );
    // SAFETY: a and b are in bounds (MatRef::new); c is the caller's.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.ptr,
            1,
            c.row_stride as isize,
            false,
            a.data.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.data.as_ptr(),
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

/// Runs `one_head(h, state)` for every head, across rayon's threads when
/// the work is large, with one `init()` state per thread.
fn for_each_head<S>(
    d: AttentionDims,
    init: impl Fn() -> S + Sync + Send,
    one_head: impl Fn(usize, &mut S) + Sync + Send,
) {
    if d.is_large() {
        (0..d.heads)
            .into_par_iter()
            .for_each_init(init, |state, h| one_head(h, state));
    } else {
        let mut state = init();
        (0..d.heads).for_each(|h| one_head(h, &mut state));
    }
}

/// How q, k, v (and their gradients) and the output (and its gradient) lie
/// in their buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionLayout {
    pub input: HeadLayout,
    pub output: HeadLayout,
}

impl AttentionLayout {
    /// Every operand [B·H, T, D].
    pub fn contiguous(d: AttentionDims) -> Self {
        AttentionLayout {
            input: HeadLayout::contiguous(d),
            output: HeadLayout::contiguous(d),
        }
    }

    /// q, k, v packed side by side in [B, T, 3E] and the output [B, T, E],
    /// with E = H·D (GPT-2's `c_attn` output and `c_proj` input).
    pub fn packed(heads_per_item: usize, d: AttentionDims) -> Self {
        let width = heads_per_item * d.head_dim;
        AttentionLayout {
            input: HeadLayout::interleaved(heads_per_item, d, 3 * width),
            output: HeadLayout::interleaved(heads_per_item, d, width),
        }
    }

    /// Checks that the output layout fills a buffer of d.heads·T·D elements
    /// exactly (so an output written head by head needs no zero-fill) and
    /// returns that length.
    fn dense_output_len(&self, d: AttentionDims) -> usize {
        let len = d.heads * d.head_len();
        assert_eq!(
            self.output.extent(d),
            len,
            "attention: the output layout must fill its buffer"
        );
        len
    }
}

/// Causal attention of every head: S = Q·Kᵀ·scale, P = softmax of each row
/// i over columns 0..=i (the causal mask), O = P·V. q, k and v are read
/// through `layout.input` (they may be three views of one buffer), the
/// output is written through `layout.output`.
pub fn attention_in<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    d: AttentionDims,
    layout: AttentionLayout,
) -> AttentionForward<T> {
    let len = layout.dense_output_len(d);
    let mut probs = vec![T::ZERO; d.heads * d.scores_len()];
    if d.is_empty() {
        return AttentionForward {
            out: vec![T::ZERO; len],
            probs,
        };
    }
    let mut out: Vec<T> = Vec::with_capacity(len);
    let shared_out = SharedOut(out.as_mut_ptr());
    let shared_probs = SharedOut(probs.as_mut_ptr());
    let (t, input) = (d.seq, layout.input);
    for_each_head(
        d,
        || (),
        |h, _| {
            let (q, k, v) = (
                input.head(q, h, d),
                input.head(k, h, d),
                input.head(v, h, d),
            );
            // SAFETY: head h's block of probs and its rows of out are its own.
            let probs = unsafe {
                std::slice::from_raw_parts_mut(
                    shared_probs.ptr().add(h * d.scores_len()),
                    d.scores_len(),
                )
            };
            unsafe {
                product(
                    MatOut::contiguous(probs, t, t),
                    q,
                    false,
                    k,
                    true,
                    T::from_f64(d.scale()),
                );
            }
            for (i, row) in probs.chunks_mut(t).enumerate() {
                let (visible, future) = row.split_at_mut(i + 1);
                softmax_row_in_place(visible);
                future.fill(T::ZERO);
            }
            let out = layout.output.head_out(shared_out, h, d);
            // SAFETY: head h's rows of `out` lie inside its len elements
            // (dense_output_len) and no other head writes them.
            unsafe {
                product(
                    out,
                    MatRef::contiguous(probs, t, t),
                    false,
                    v,
                    false,
                    T::ONE,
                )
            };
        },
    );
    // SAFETY: the output layout is dense, so the heads wrote all len elements.
    unsafe { out.set_len(len) };
    AttentionForward { out, probs }
}

/// Causal attention of contiguous [B·H, T, D] operands.
pub fn attention<T: Float>(q: &[T], k: &[T], v: &[T], d: AttentionDims) -> AttentionForward<T> {
    attention_in(q, k, v, d, AttentionLayout::contiguous(d))
}

/// The saved inputs of the backward, each read through its layout.
pub struct AttentionSaved<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    /// P from the forward, [B·H, T, T].
    pub probs: &'a [T],
    /// dL/d(out), in the output's layout.
    pub d_out: &'a [T],
}

/// Gradients of every head, written into `dq`, `dk` and `dv` through
/// `layout.input` (one head's rows each):
/// dV = Pᵀ·dO; dP = dO·Vᵀ; dS = P ⊙ (dP − rowsum(dP ⊙ P)); dQ = dS·K·scale; dK = dSᵀ·Q·scale.
///
/// # Safety
/// `dq`, `dk` and `dv` must each point at a writable buffer of at least
/// `layout.input.extent(d)` elements that nothing else accesses; they may be
/// three offsets into one buffer if their heads' rows do not overlap.
unsafe fn attention_backward_into<T: Float>(
    saved: &AttentionSaved<'_, T>,
    d: AttentionDims,
    layout: AttentionLayout,
    (dq, dk, dv): (SharedOut<T>, SharedOut<T>, SharedOut<T>),
) {
    if d.is_empty() {
        return;
    }
    let (t, input, output) = (d.seq, layout.input, layout.output);
    let scale = T::from_f64(d.scale());
    for_each_head(
        d,
        || vec![T::ZERO; d.scores_len()],
        |h, d_scores| {
            let probs = MatRef::contiguous(&saved.probs[h * d.scores_len()..], t, t);
            let d_out = output.head(saved.d_out, h, d);
            let (q, k, v) = (
                input.head(saved.q, h, d),
                input.head(saved.k, h, d),
                input.head(saved.v, h, d),
            );
            let grad = |buffer| input.head_out(buffer, h, d);
            // SAFETY: d_scores is this thread's scratch; head h's rows of
            // dq, dk and dv are its own (the caller's contract).
            unsafe {
                // dV = Pᵀ·dO
                product(grad(dv), probs, true, d_out, false, T::ONE);
                // dP = dO·Vᵀ
                product(
                    MatOut::contiguous(d_scores, t, t),
                    d_out,
                    false,
                    v,
                    true,
                    T::ONE,
                );
            }
            // dS = P ⊙ (dP − rowsum(dP ⊙ P)) on the visible prefix; 0 where the mask hid S
            for (i, (d_row, p_row)) in d_scores.chunks_mut(t).zip(probs.data.chunks(t)).enumerate()
            {
                let (visible, future) = d_row.split_at_mut(i + 1);
                softmax_backward_row_in_place(&p_row[..=i], visible);
                future.fill(T::ZERO);
            }
            let d_scores = MatRef::contiguous(d_scores, t, t);
            unsafe {
                // dQ = dS·K·scale
                product(grad(dq), d_scores, false, k, false, scale);
                // dK = dSᵀ·Q·scale
                product(grad(dk), d_scores, true, q, false, scale);
            }
        },
    );
}

/// Gradients of every head for contiguous [B·H, T, D] operands.
pub fn attention_backward<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[T],
    d_out: &[T],
    d: AttentionDims,
) -> AttentionGrads<T> {
    let len = d.heads * d.head_len();
    if d.is_empty() {
        return AttentionGrads {
            dq: vec![T::ZERO; len],
            dk: vec![T::ZERO; len],
            dv: vec![T::ZERO; len],
        };
    }
    // Every head writes all of its rows of each gradient: no zero-fill first.
    let uninit = || Vec::<T>::with_capacity(len);
    let (mut dq, mut dk, mut dv) = (uninit(), uninit(), uninit());
    let saved = AttentionSaved {
        q,
        k,
        v,
        probs,
        d_out,
    };
    let buffers = (
        SharedOut(dq.as_mut_ptr()),
        SharedOut(dk.as_mut_ptr()),
        SharedOut(dv.as_mut_ptr()),
    );
    // SAFETY: three separate buffers of len = extent elements each, which the
    // contiguous layout's heads tile exactly.
    unsafe {
        attention_backward_into(&saved, d, AttentionLayout::contiguous(d), buffers);
        dq.set_len(len);
        dk.set_len(len);
        dv.set_len(len);
    }
    AttentionGrads { dq, dk, dv }
}

/// Gradient of packed q, k, v ([B, T, 3E], `AttentionLayout::packed`) from
/// saved values read through that layout and dL/d(out) [B, T, E]: one
/// [B, T, 3E] buffer, every element written once (no zero-fill).
pub fn attention_backward_packed<T: Float>(
    saved: &AttentionSaved<'_, T>,
    heads_per_item: usize,
    d: AttentionDims,
) -> Vec<T> {
    let layout = AttentionLayout::packed(heads_per_item, d);
    let width = heads_per_item * d.head_dim;
    let len = 3 * d.heads * d.head_len();
    if d.is_empty() {
        return vec![T::ZERO; len];
    }
    assert_eq!(
        layout.input.extent(d) + 2 * width,
        len,
        "attention: packed gradient size"
    );
    let mut dqkv: Vec<T> = Vec::with_capacity(len);
    let base = dqkv.as_mut_ptr();
    // q, k and v sit 0, E and 2E values into each row.
    let buffers = (
        SharedOut(base),
        SharedOut(base.wrapping_add(width)),
        SharedOut(base.wrapping_add(2 * width)),
    );
    // SAFETY: each of the three starts leaves extent(d) elements of the
    // buffer (asserted above), and the three sets of heads' rows tile it.
    unsafe {
        attention_backward_into(saved, d, layout, buffers);
        dqkv.set_len(len);
    }
    dqkv
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
            AttentionDims::new(3, 5, 3),
            AttentionDims::new(6, 33, 17),
            // An explicit scale, negative to tell it from any 1/√D.
            AttentionDims {
                scale: -0.4,
                ..AttentionDims::new(2, 7, 4)
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
        let d = AttentionDims::new(1, 3, 2);
        let (q, k) = (values(6, 5), values(6, 6));
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let f = attention(&q, &k, &v, d);
        assert_eq!(&f.out[..2], &[1.0, 2.0]);
        assert_eq!(&f.probs[..3], &[1.0, 0.0, 0.0]);
    }
}
