//! PyTorch's `F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p,
//! is_causal, scale)`: out = dropout(softmax(q·kᵀ·scale + mask))·v over the
//! last two dims, with any number of leading batch dims broadcast between
//! q, k and v.
//!
//! The causal case without dropout and with q, k, v of one shape is the
//! fused op of [`Tensor::causal_attention`] (at any scale). Everything else
//! is a composition of differentiable ops that run on the CPU and on CUDA
//! (a scaled product, the mask added, a softmax that gives fully masked rows
//! zero weight, the dropout op, a product), so gradients reach q, k, v and a
//! float mask through their own backward rules.

use crate::autocast::{self, AutocastOp};
use crate::error::{Error, Result};
use crate::ops::broadcast_shape;
use crate::tensor::{DType, Device, Shape, Tensor, same_device};

use super::causal_attention_scaled;
use super::safe_softmax::safe_softmax_last_dim;

const OP: &str = "scaled_dot_product_attention";

/// A mask over the attention scores [..., L, S], broadcastable to them (it
/// needs at least the two dims L and S; leading dims may be 1 or missing).
#[derive(Clone, Debug)]
pub enum AttentionMask {
    /// Added to the scores before the softmax (PyTorch's float `attn_mask`),
    /// of q's dtype: 0 keeps a score, −∞ hides it. Differentiable: if it
    /// requires grad it receives dL/dmask = dL/dscores, summed over the
    /// dims it was broadcast along.
    Float(Tensor),
    /// PyTorch's boolean `attn_mask`. kiln has no bool dtype, so this is a
    /// `u32` tensor read as booleans: nonzero (true) = the query may attend
    /// to that key, 0 (false) = hidden. No gradient.
    Bool(Tensor),
}

/// Dropout on the attention weights (after the softmax, before the product
/// with v): each weight is zeroed with probability `p` and the rest scaled
/// by 1/(1 − p). The mask is exactly `weights.dropout(p, seed)`'s for the
/// weights [..., L, S], so the same seed gives the same mask on every device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionDropout {
    /// In [0, 1]: 0 applies none, 1 drops every weight (the output is 0).
    pub p: f64,
    pub seed: u64,
}

/// The options of [`Tensor::scaled_dot_product_attention`], PyTorch's
/// keyword arguments. `AttentionOptions::default()` is PyTorch's defaults:
/// no mask, not causal, scale 1/√E, no dropout.
#[derive(Clone, Debug, Default)]
pub struct AttentionOptions {
    /// `attn_mask`; cannot be combined with `is_causal` (as in PyTorch).
    pub mask: Option<AttentionMask>,
    /// Query i sees keys j ≤ i: the top-left aligned lower triangle
    /// `ones(L, S).tril()`, also when L ≠ S (PyTorch's `is_causal`).
    pub is_causal: bool,
    /// Replaces the default 1/√E; any finite value (0 and negatives too).
    pub scale: Option<f64>,
    /// `dropout_p`, with the seed kiln's dropout needs. None: no dropout.
    pub dropout: Option<AttentionDropout>,
}

impl AttentionOptions {
    /// Only `is_causal` set.
    pub fn causal() -> Self {
        AttentionOptions {
            is_causal: true,
            ..AttentionOptions::default()
        }
    }
}

impl Tensor {
    /// Scaled dot-product attention as PyTorch's
    /// `F.scaled_dot_product_attention`: q [..., L, E], k [..., S, E],
    /// v [..., S, Ev] → [..., L, Ev], where the leading dims of q, k and v
    /// broadcast together (so [B, H, L, E] with [B, H, S, E], or a shared
    /// [1, H, S, E], or rank 2 or 3 operands). Weights are
    /// softmax(q·kᵀ·scale + mask) over S; a query row that the mask lets
    /// see no key gets weight 0 everywhere, so its output is 0 (PyTorch
    /// 2.5+ does the same on every backend). Differentiable in q, k, v and a
    /// float mask.
    pub fn scaled_dot_product_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        options: &AttentionOptions,
    ) -> Result<Tensor> {
        let [q, k, v] = [q, k, v].map(|t| autocast::cast_input(AutocastOp::Attention, t));
        let (q, k, v) = (&q?, &k?, &v?);
        let mask = match &options.mask {
            Some(AttentionMask::Float(m)) => Some(AttentionMask::Float(autocast::cast_input(
                AutocastOp::Attention,
                m,
            )?)),
            other => other.clone(),
        };
        let geometry = Geometry::check(q, k, v)?;
        if let Some(mask) = &mask {
            check_mask(mask, q, &geometry)?;
        }
        check_options(options)?;
        let scale = options
            .scale
            .unwrap_or_else(|| 1.0 / (geometry.head_dim as f64).sqrt());
        let dropout_p = options.dropout.map_or(0.0, |d| d.p);
        if can_use_fused_causal(q, k, v, options, dropout_p) {
            return fused_causal(q, k, v, options.scale);
        }
        // 16-bit operands are computed in f32 and the output rounded back.
        let mask = match mask {
            Some(AttentionMask::Float(m)) => Some(AttentionMask::Float(autocast::widened(&m)?)),
            other => other,
        };
        let out = attention_composed(
            &autocast::widened(q)?,
            &autocast::widened(k)?,
            &autocast::widened(v)?,
            mask.as_ref(),
            options,
            scale,
            &geometry,
        )?;
        out.to_dtype(q.dtype())
    }
}

/// The sizes read off q [..., L, E], k [..., S, E] and v [..., S, Ev].
struct Geometry {
    query_len: usize,
    key_len: usize,
    head_dim: usize,
    /// Shape of the weights q·kᵀ: broadcast(q, k batch dims) + [L, S].
    weights: Shape,
}

impl Geometry {
    fn check(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Geometry> {
        check_float_operands(&[q, k, v])?;
        let shapes = || {
            format!(
                "q {}, k {}, v {} (expected q [..., L, E], k [..., S, E], v [..., S, Ev])",
                q.shape(),
                k.shape(),
                v.shape()
            )
        };
        if q.rank() < 2 || k.rank() < 2 || v.rank() < 2 {
            return Err(Error::shape(
                OP,
                format!(
                    "q, k and v need at least 2 dims each, got {}; add the missing dims with unsqueeze",
                    shapes()
                ),
            ));
        }
        let last2 = |t: &Tensor| (t.dims()[t.rank() - 2], t.dims()[t.rank() - 1]);
        let ((query_len, head_dim), (key_len, key_dim), (value_len, _)) =
            (last2(q), last2(k), last2(v));
        if key_dim != head_dim {
            return Err(Error::shape(
                OP,
                format!("q and k must share the head size E, got {}", shapes()),
            ));
        }
        if value_len != key_len {
            return Err(Error::shape(
                OP,
                format!("k and v must share the key length S, got {}", shapes()),
            ));
        }
        let batch = |t: &Tensor| Shape::new(t.dims()[..t.rank() - 2].to_vec());
        let batch_error = |_| {
            Error::shape(
                OP,
                format!(
                    "the leading (batch) dims of q, k and v must broadcast together, got {}",
                    shapes()
                ),
            )
        };
        let query_key = broadcast_shape(OP, &batch(q), &batch(k)).map_err(batch_error)?;
        broadcast_shape(OP, &query_key, &batch(v)).map_err(batch_error)?;
        let mut weights = query_key.dims().to_vec();
        weights.extend([query_len, key_len]);
        Ok(Geometry {
            query_len,
            key_len,
            head_dim,
            weights: Shape::new(weights),
        })
    }
}

/// One device and one float dtype for q, k, v (and a float mask); 16-bit
/// operands are accepted on every device, as they are computed in f32.
fn check_float_operands(tensors: &[&Tensor]) -> Result<()> {
    same_device(OP, tensors)?;
    let dtype = tensors[0].dtype();
    if !dtype.is_float() {
        return Err(Error::unsupported_dtype(OP, dtype));
    }
    match tensors.iter().find(|t| t.dtype() != dtype) {
        Some(other) => Err(Error::dtype_mismatch(OP, dtype, other.dtype())),
        None => Ok(()),
    }
}

/// A mask must be of the right kind and dtype, on q's device, and
/// broadcastable to the weights [..., L, S] without growing them (PyTorch
/// refuses a mask with more or larger batch dims than q·kᵀ).
fn check_mask(mask: &AttentionMask, q: &Tensor, geometry: &Geometry) -> Result<()> {
    let m = match mask {
        AttentionMask::Float(m) => {
            if m.dtype() == DType::U32 {
                return Err(Error::invalid(
                    OP,
                    "a u32 mask is a boolean mask (nonzero = may attend): pass it as AttentionMask::Bool",
                ));
            }
            check_float_operands(&[q, m]).map_err(|_| {
                Error::invalid(
                    OP,
                    format!(
                        "a float mask must have q's dtype and device ({}, {:?}), got {}, {:?}; \
                         convert it with .to_dtype() / .to_device()",
                        q.dtype(),
                        q.device(),
                        m.dtype(),
                        m.device()
                    ),
                )
            })?;
            m
        }
        AttentionMask::Bool(m) => {
            if m.dtype() != DType::U32 {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "AttentionMask::Bool takes a u32 tensor (nonzero = may attend, 0 = hidden), \
                         got {}; pass an additive float mask as AttentionMask::Float",
                        m.dtype()
                    ),
                ));
            }
            if m.device() != q.device() {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "the mask is on {:?} but q is on {:?}; move it with .to_device()",
                        m.device(),
                        q.device()
                    ),
                ));
            }
            m
        }
    };
    let fits = m.rank() >= 2
        && broadcast_shape(OP, &geometry.weights, m.shape()).is_ok_and(|s| s == geometry.weights);
    if !fits {
        return Err(Error::shape(
            OP,
            format!(
                "mask {} must broadcast to the attention weights [..., L, S] = {} \
                 (at least 2 dims, each 1 or equal, none beyond the weights')",
                m.shape(),
                geometry.weights
            ),
        ));
    }
    Ok(())
}

fn check_options(options: &AttentionOptions) -> Result<()> {
    if options.is_causal && options.mask.is_some() {
        return Err(Error::invalid(
            OP,
            "is_causal and an explicit mask cannot be combined (PyTorch refuses them too); \
             put the causal triangle into the mask and leave is_causal false",
        ));
    }
    if let Some(scale) = options.scale
        && !scale.is_finite()
    {
        return Err(Error::invalid(
            OP,
            format!("scale must be finite, got {scale}; pass a finite factor or None for 1/√E"),
        ));
    }
    if let Some(dropout) = options.dropout
        && !(0.0..=1.0).contains(&dropout.p)
    {
        return Err(Error::invalid(
            OP,
            format!(
                "dropout probability p must be in [0, 1], got {}; use None or p = 0 for no dropout",
                dropout.p
            ),
        ));
    }
    Ok(())
}

/// The fused op covers the causal case without dropout and with q, k, v of
/// one shape (L = S, E = Ev > 0, no broadcasting), at any scale.
fn can_use_fused_causal(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    options: &AttentionOptions,
    dropout_p: f64,
) -> bool {
    options.is_causal
        && options.mask.is_none()
        && dropout_p == 0.0
        && q.dims()[q.rank() - 1] > 0
        && k.shape() == q.shape()
        && v.shape() == q.shape()
}

/// The fused causal attention on q, k, v of one shape [..., T, D], the
/// leading dims flattened into its heads.
fn fused_causal(q: &Tensor, k: &Tensor, v: &Tensor, scale: Option<f64>) -> Result<Tensor> {
    if q.rank() == 4 {
        return causal_attention_scaled(q, k, v, scale);
    }
    let dims = q.dims();
    let (seq, head_dim) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let heads: usize = dims[..dims.len() - 2].iter().product();
    let as_heads = |t: &Tensor| t.reshape([1, heads, seq, head_dim]);
    causal_attention_scaled(&as_heads(q)?, &as_heads(k)?, &as_heads(v)?, scale)?
        .reshape(q.shape().clone())
}

/// PyTorch's `is_causal` mask as additive values: 0 where j ≤ i, −∞ above,
/// [L, S] (top-left aligned when L ≠ S).
fn causal_mask(rows: usize, cols: usize, dtype: DType, device: Device) -> Result<Tensor> {
    let values: Vec<f64> = (0..rows)
        .flat_map(|i| (0..cols).map(move |j| if j <= i { 0.0 } else { f64::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(values, [rows, cols])?
        .to_dtype(dtype)?
        .to_device(device)
}

/// A boolean (u32) mask as additive values of `dtype`: ln(min(m, 1)) is 0
/// where m is nonzero and −∞ where it is 0.
fn additive_from_bool(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    mask.to_dtype(dtype)?.clamp(0.0, 1.0)?.log()
}

/// dropout(safe_softmax(q·scale·kᵀ + mask))·v on f32 or f64 operands.
fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&AttentionMask>,
    options: &AttentionOptions,
    scale: f64,
    geometry: &Geometry,
) -> Result<Tensor> {
    // q is scaled before the product (as PyTorch scales q and k), so an empty
    // head (E = 0) gives scores of 0 rather than 0·∞.
    let scores = q.mul_scalar(scale)?.matmul_nt(k)?;
    let additive = match mask {
        Some(AttentionMask::Float(m)) => Some(m.clone()),
        Some(AttentionMask::Bool(m)) => Some(additive_from_bool(m, q.dtype())?),
        None if options.is_causal => Some(causal_mask(
            geometry.query_len,
            geometry.key_len,
            q.dtype(),
            q.device(),
        )?),
        None => None,
    };
    let scores = match additive {
        Some(m) => scores.add(&m)?,
        None => scores,
    };
    let weights = safe_softmax_last_dim(&scores)?;
    // p = 1 is weights·0 inside `dropout`, as torch's.
    let weights = match options.dropout {
        Some(AttentionDropout { p, seed }) => weights.dropout(p, seed)?,
        None => weights,
    };
    weights.matmul(v)
}
