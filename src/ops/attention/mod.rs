//! Causal scaled-dot-product attention (PyTorch's
//! `F.scaled_dot_product_attention(q, k, v, is_causal=True)`) as one fused op:
//! O = softmax(mask(Q·Kᵀ·scale))·V per head (scale 1/√D unless given), with
//! its own backward kernel that reuses the saved attention probabilities P.
//! The general `scaled_dot_product_attention` (masks, L ≠ S, dropout) is in
//! `sdpa.rs` and comes back here for the causal case this op covers.
//!
//! On CUDA (kernels/attention.cu) the same steps run as plain kernels, one
//! block per score row for the softmax and one thread per output element for
//! each product; a fused flash-style kernel is the next rung of that ladder.

pub mod cpu;
pub(crate) mod cuda;
mod safe_softmax;
mod sdpa;

pub use sdpa::{AttentionDropout, AttentionMask, AttentionOptions};

use crate::autocast::{self, AutocastOp};
use crate::autograd::Backward;
use crate::error::{Error, Result};
use crate::float_slice;
use crate::half_float::{self, HalfFloat};
use crate::ops::layernorm::cuda::expect_cuda;
use crate::profile;
use crate::storage::{CpuStorage, Float, Storage};
use crate::tensor::{Device, Shape, Tensor, check_operands};
use rayon::prelude::*;

use cpu::{AttentionDims, AttentionLayout, AttentionSaved};

const OP: &str = "causal_attention";
const PACKED_OP: &str = "causal_self_attention";

/// The `T` values of `storage`; the operands were checked to share one dtype.
fn values_as<T: Float>(storage: &CpuStorage) -> Result<&[T]> {
    T::slice(storage).ok_or_else(|| Error::dtype_mismatch(OP, T::DTYPE, storage.dtype()))
}

impl Tensor {
    /// Causal scaled-dot-product attention: q, k, v [B, H, T, D] → [B, H, T, D].
    /// Position i attends to positions j ≤ i with weights
    /// softmax_j(qᵢ·kⱼ/√D), as PyTorch's
    /// `F.scaled_dot_product_attention(q, k, v, is_causal=True)`.
    pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        causal_attention_scaled(q, k, v, None)
    }
}

/// `causal_attention` with the scores multiplied by `scale` (None: 1/√D);
/// also `scaled_dot_product_attention`'s fused path.
pub(super) fn causal_attention_scaled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: Option<f64>,
) -> Result<Tensor> {
    let [q, k, v] = [q, k, v].map(|t| autocast::cast_input(AutocastOp::Attention, t));
    let (q, k, v) = (&q?, &k?, &v?);
    if q.device() == Device::Cpu && autocast::any_half(&[Some(q), Some(k), Some(v)]) {
        // Computed in f32 from widened copies, rounded back to q's dtype.
        // (The CUDA kernels read and write 16-bit values themselves.)
        let [wq, wk, wv] = [q, k, v].map(autocast::widened);
        return causal_attention_in_own_dtype(&wq?, &wk?, &wv?, scale)?.to_dtype(q.dtype());
    }
    causal_attention_in_own_dtype(q, k, v, scale)
}

/// `causal_attention` without autocast's cast, in the operands' dtype, with
/// the scores multiplied by `scale` (None: 1/√D).
fn causal_attention_in_own_dtype(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: Option<f64>,
) -> Result<Tensor> {
    let _profile = profile::op(OP, q.device());
    check_operands(OP, &[q, k, v])?;
    let &[batch, heads, seq, head_dim] = q.dims() else {
        return Err(Error::shape(
            OP,
            format!("expected q of shape [B, H, T, D], got {}", q.shape()),
        ));
    };
    if k.shape() != q.shape() || v.shape() != q.shape() {
        return Err(Error::shape(
            OP,
            format!(
                "q, k and v must share one shape [B, H, T, D], got q {}, k {}, v {}",
                q.shape(),
                k.shape(),
                v.shape()
            ),
        ));
    }
    if head_dim == 0 {
        return Err(Error::shape(
            OP,
            format!(
                "head dim D must be > 0 (the scale is 1/√D), got q {}",
                q.shape()
            ),
        ));
    }
    let dims = AttentionDims {
        scale: scale.unwrap_or_else(|| 1.0 / (head_dim as f64).sqrt()),
        ..AttentionDims::new(batch * heads, seq, head_dim)
    };
    let (out, probs) = match &*q.storage() {
        Storage::Cpu(qs) => float_slice!(OP, qs, |q| {
            let f = forward(q, k, v, dims)?;
            (
                Storage::Cpu(CpuStorage::from(f.out)),
                Storage::Cpu(CpuStorage::from(f.probs)),
            )
        }),
        Storage::Cuda(qs) => {
            let (out, probs) = cuda::attention_forward(
                qs,
                expect_cuda(&k.storage()),
                expect_cuda(&v.storage()),
                dims,
            )?;
            (Storage::Cuda(out), Storage::Cuda(probs))
        }
    };
    let probs_shape = Shape::new([batch, heads, seq, seq]);
    Ok(Tensor::from_op(out, q.shape().clone(), &[q, k, v], |_| {
        CausalAttentionBackward {
            dims,
            probs: Tensor::from_result(probs, probs_shape),
        }
    }))
}

impl Tensor {
    /// Causal self-attention of packed projections, as GPT-2's attention
    /// block computes it: `self` is qkv [B, T, 3E] with q, k and v side by
    /// side on the last dim (the `c_attn` output), E = `n_head`·D. Returns
    /// [B, T, E] with the heads merged back, the same as
    ///
    /// ```text
    /// q, k, v = qkv.split(E, dim=2)
    /// q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in (q, k, v))
    /// y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    /// y.transpose(1, 2).reshape(B, T, E)
    /// ```
    ///
    /// On the CPU it is one op that reads each head straight out of qkv and
    /// writes it straight into its columns of the output (and likewise for
    /// the gradient): none of the three narrows, four permutes and their
    /// backward copies. On CUDA it is exactly the composition above.
    pub fn causal_self_attention(&self, n_head: usize) -> Result<Tensor> {
        let qkv = autocast::cast_input(AutocastOp::Attention, self)?;
        qkv.causal_self_attention_in_own_dtype(n_head)
    }

    /// `causal_self_attention` without autocast's cast; a 16-bit qkv is
    /// computed in f32 and its output and saved probabilities rounded back.
    fn causal_self_attention_in_own_dtype(&self, n_head: usize) -> Result<Tensor> {
        let &[batch, seq, width] = self.dims() else {
            return Err(Error::shape(
                PACKED_OP,
                format!("expected qkv of shape [B, T, 3E], got {}", self.shape()),
            ));
        };
        if n_head == 0 || width % 3 != 0 || (width / 3) % n_head != 0 || width == 0 {
            return Err(Error::shape(
                PACKED_OP,
                format!(
                    "qkv {} must end in 3E with E a non-zero multiple of n_head = {n_head}",
                    self.shape()
                ),
            ));
        }
        let embd = width / 3;
        let head_dim = embd / n_head;
        let Storage::Cpu(storage) = &*self.storage() else {
            return self.causal_self_attention_composite(n_head);
        };
        let _profile = profile::op(PACKED_OP, self.device());
        let dims = AttentionDims::new(batch * n_head, seq, head_dim);
        let item = AttentionDims {
            heads: n_head,
            ..dims
        };
        let (out, probs) = match storage {
            CpuStorage::BF16(qkv) => {
                let (out, probs) = packed_forward_half(qkv, n_head, item);
                (CpuStorage::BF16(out), CpuStorage::BF16(probs))
            }
            CpuStorage::F16(qkv) => {
                let (out, probs) = packed_forward_half(qkv, n_head, item);
                (CpuStorage::F16(out), CpuStorage::F16(probs))
            }
            _ => float_slice!(PACKED_OP, storage, |qkv| {
                let (q, k, v) = packed_views(qkv, embd);
                let f = cpu::attention_in(q, k, v, dims, AttentionLayout::packed(n_head, dims));
                (CpuStorage::from(f.out), CpuStorage::from(f.probs))
            }),
        };
        let probs = Tensor::from_result(Storage::Cpu(probs), Shape::new([batch, n_head, seq, seq]));
        Ok(Tensor::from_op(
            Storage::Cpu(out),
            Shape::new([batch, seq, embd]),
            &[self],
            |_| CausalSelfAttentionBackward {
                dims,
                n_head,
                probs,
            },
        ))
    }

    /// `causal_self_attention` as separate differentiable ops.
    fn causal_self_attention_composite(&self, n_head: usize) -> Result<Tensor> {
        let (b, t, e) = (self.dims()[0], self.dims()[1], self.dims()[2] / 3);
        // [B, T, E] → [B, T, H, D] → [B, H, T, D]
        let heads = |start: usize| -> Result<Tensor> {
            self.narrow(2, start, e)?
                .reshape([b, t, n_head, e / n_head])?
                .permute(&[0, 2, 1, 3])
        };
        Tensor::causal_attention(&heads(0)?, &heads(e)?, &heads(2 * e)?)?
            .permute(&[0, 2, 1, 3])?
            .reshape([b, t, e])
    }
}

/// Sizes of one batch item of packed attention with `n_head` heads.
struct PackedItem {
    /// E = H·D.
    embd: usize,
    /// Values of qkv [T, 3E] (and of its gradient).
    input: usize,
    /// Values of the output [T, E] (and of dL/dO).
    output: usize,
    /// Values of P [H, T, T].
    probs: usize,
}

impl PackedItem {
    fn new(n_head: usize, item: AttentionDims) -> Self {
        let embd = n_head * item.head_dim;
        PackedItem {
            embd,
            input: 3 * item.seq * embd,
            output: item.seq * embd,
            probs: n_head * item.scores_len(),
        }
    }
}

/// Packed attention of a 16-bit qkv [B, T, 3E] one batch item at a time
/// (`item`: the dims of one): each item's rows are widened, computed in f32,
/// and its output and P rounded back, so no f32 copy of the whole qkv, P or
/// output exists (they would be among the largest buffers of a GPT step,
/// alive at its peak). Returns (out [B, T, E], P [B, H, T, T]).
fn packed_forward_half<H: HalfFloat>(
    qkv: &[H],
    n_head: usize,
    item: AttentionDims,
) -> (Vec<H>, Vec<H>) {
    let size = PackedItem::new(n_head, item);
    let batch = qkv.len().checked_div(size.input).unwrap_or(0);
    let mut out = Vec::with_capacity(batch * size.output);
    let mut probs = Vec::with_capacity(batch * size.probs);
    // (An empty qkv gives batch 0: chunk lengths are then never 0.)
    if batch > 0 {
        let layout = AttentionLayout::packed(n_head, item);
        out.spare_capacity_mut()[..batch * size.output]
            .par_chunks_mut(size.output)
            .zip(probs.spare_capacity_mut()[..batch * size.probs].par_chunks_mut(size.probs))
            .zip(qkv.par_chunks(size.input))
            .for_each(|((out, probs), qkv)| {
                let qkv = half_float::widen(qkv);
                let (q, k, v) = packed_views(&qkv, size.embd);
                let f = cpu::attention_in(q, k, v, item, layout);
                H::narrow_into(&f.out, out);
                H::narrow_into(&f.probs, probs);
            });
    }
    // SAFETY: every item's rows of both were narrowed into (none if empty).
    unsafe {
        out.set_len(batch * size.output);
        probs.set_len(batch * size.probs);
    }
    (out, probs)
}

/// The packed gradient dqkv [B, T, 3E] of a 16-bit qkv, one batch item at
/// a time as [`packed_forward_half`] (P and dL/dO in qkv's format).
fn packed_backward_half<H: HalfFloat>(
    qkv: &[H],
    probs: &[H],
    d_out: &[H],
    n_head: usize,
    item: AttentionDims,
) -> Vec<H> {
    let size = PackedItem::new(n_head, item);
    let batch = qkv.len().checked_div(size.input).unwrap_or(0);
    let mut dqkv = Vec::with_capacity(batch * size.input);
    // (An empty qkv gives batch 0: chunk lengths are then never 0.)
    if batch > 0 {
        dqkv.spare_capacity_mut()[..batch * size.input]
            .par_chunks_mut(size.input)
            .zip(qkv.par_chunks(size.input))
            .zip(
                probs
                    .par_chunks(size.probs)
                    .zip(d_out.par_chunks(size.output)),
            )
            .for_each(|((dqkv, qkv), (probs, d_out))| {
                let [qkv, probs, d_out] = [qkv, probs, d_out].map(half_float::widen);
                let (q, k, v) = packed_views(&qkv, size.embd);
                let saved = AttentionSaved {
                    q,
                    k,
                    v,
                    probs: &probs,
                    d_out: &d_out,
                };
                H::narrow_into(&cpu::attention_backward_packed(&saved, n_head, item), dqkv);
            });
    }
    // SAFETY: every item's rows were narrowed into (none if qkv is empty).
    unsafe { dqkv.set_len(batch * size.input) };
    dqkv
}

/// q, k and v of packed qkv [B, T, 3E]: the buffer from its first, E-th and
/// 2E-th value on (each read through the packed layout); all empty if it is.
fn packed_views<T>(qkv: &[T], embd: usize) -> (&[T], &[T], &[T]) {
    let from = |start: usize| qkv.get(start..).unwrap_or(&[]);
    (qkv, from(embd), from(2 * embd))
}

struct CausalSelfAttentionBackward {
    dims: AttentionDims,
    n_head: usize,
    /// P = softmax(mask(Q·Kᵀ·scale)) from the forward (detached, [B, H, T, T]).
    probs: Tensor,
}

impl Backward for CausalSelfAttentionBackward {
    fn name(&self) -> &'static str {
        PACKED_OP
    }

    // causal_attention's rule per head, read from and written into the packed
    // layout: dV = Pᵀ·dO;  dS = P ⊙ (dO·Vᵀ − rowsum(dO·Vᵀ ⊙ P));  dQ = dS·K·scale;  dK = dSᵀ·Q·scale
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let qkv = &inputs[0];
        check_operands(PACKED_OP, &[qkv, grad])?;
        let embd = self.n_head * self.dims.head_dim;
        let item = AttentionDims {
            heads: self.n_head,
            ..self.dims
        };
        let dqkv = qkv.with_cpu(|qs| {
            grad.with_cpu(|gs| {
                self.probs.with_cpu(|ps| -> Result<CpuStorage> {
                    match (qs, ps, gs) {
                        (CpuStorage::BF16(q), CpuStorage::BF16(p), CpuStorage::BF16(g)) => {
                            return Ok(CpuStorage::BF16(packed_backward_half(
                                q,
                                p,
                                g,
                                self.n_head,
                                item,
                            )));
                        }
                        (CpuStorage::F16(q), CpuStorage::F16(p), CpuStorage::F16(g)) => {
                            return Ok(CpuStorage::F16(packed_backward_half(
                                q,
                                p,
                                g,
                                self.n_head,
                                item,
                            )));
                        }
                        _ => {}
                    }
                    Ok(float_slice!(PACKED_OP, qs, |qkv| {
                        let (q, k, v) = packed_views(qkv, embd);
                        let saved = AttentionSaved {
                            q,
                            k,
                            v,
                            probs: values_as(ps)?,
                            d_out: values_as(gs)?,
                        };
                        CpuStorage::from(cpu::attention_backward_packed(
                            &saved,
                            self.n_head,
                            self.dims,
                        ))
                    }))
                })
            })
        })?;
        Ok(vec![Some(Tensor::from_result(
            Storage::Cpu(dqkv),
            qkv.shape().clone(),
        ))])
    }
}

fn forward<T: Float>(
    q: &[T],
    k: &Tensor,
    v: &Tensor,
    dims: AttentionDims,
) -> Result<cpu::AttentionForward<T>> {
    k.with_cpu(|ks| v.with_cpu(|vs| Ok(cpu::attention(q, values_as(ks)?, values_as(vs)?, dims))))
}

struct CausalAttentionBackward {
    dims: AttentionDims,
    /// P = softmax(mask(Q·Kᵀ·scale)) from the forward (detached, [B, H, T, T]).
    probs: Tensor,
}

impl CausalAttentionBackward {
    fn grads<T: Float>(&self, d_out: &[T], inputs: &[Tensor]) -> Result<cpu::AttentionGrads<T>> {
        let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
        q.with_cpu(|qs| {
            k.with_cpu(|ks| {
                v.with_cpu(|vs| {
                    self.probs.with_cpu(|ps| {
                        Ok(cpu::attention_backward(
                            values_as(qs)?,
                            values_as(ks)?,
                            values_as(vs)?,
                            values_as(ps)?,
                            d_out,
                            self.dims,
                        ))
                    })
                })
            })
        })
    }
}

impl Backward for CausalAttentionBackward {
    fn name(&self) -> &'static str {
        OP
    }

    // dV = Pᵀ·dO;  dP = dO·Vᵀ;  dS = P ⊙ (dP − rowsum(dP ⊙ P));  dQ = dS·K·scale;  dK = dSᵀ·Q·scale
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        check_operands(OP, &[&inputs[0], grad])?;
        let (dq, dk, dv) = match &*grad.storage() {
            Storage::Cpu(gs) => float_slice!(OP, gs, |d_out| {
                let g = self.grads(d_out, inputs)?;
                (
                    Storage::Cpu(CpuStorage::from(g.dq)),
                    Storage::Cpu(CpuStorage::from(g.dk)),
                    Storage::Cpu(CpuStorage::from(g.dv)),
                )
            }),
            Storage::Cuda(gs) => {
                let (dq, dk, dv) = cuda::attention_backward(
                    expect_cuda(&inputs[0].storage()),
                    expect_cuda(&inputs[1].storage()),
                    expect_cuda(&inputs[2].storage()),
                    expect_cuda(&self.probs.storage()),
                    gs,
                    self.dims,
                )?;
                (Storage::Cuda(dq), Storage::Cuda(dk), Storage::Cuda(dv))
            }
        };
        let shape = inputs[0].shape().clone();
        Ok(vec![
            Some(Tensor::from_result(dq, shape.clone())),
            Some(Tensor::from_result(dk, shape.clone())),
            Some(Tensor::from_result(dv, shape)),
        ])
    }
}
