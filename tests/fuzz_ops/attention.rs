use kiln::{AttentionDropout, AttentionMask, AttentionOptions, DType, Tensor};
use proptest::prelude::*;

use crate::convolutions::extent;
use crate::harness::{CaseResult, Expect, V, check};
use crate::matmuls::autocast_choice;
use crate::operands::{
    Partner, Spec, build, build_indices, paired, partner, related, scalar, spec,
};
use crate::oracles::{broadcast, cast_operands_v, device_v, float_v};

// ----- attention, indexing, losses -----------------------------------------

#[derive(Clone, Debug)]
pub(crate) struct AttentionCase {
    q: Spec,
    k: Partner,
    v: Partner,
    n_head: usize,
    autocast: Option<DType>,
}

pub(crate) fn attention_case() -> impl Strategy<Value = AttentionCase> {
    (
        spec(2..=5),
        partner(),
        partner(),
        0usize..4,
        autocast_choice(),
    )
        .prop_map(|(mut q, k, v, n_head, autocast)| {
            if q.seed % 4 != 0 {
                q.dims.resize(4, 2);
            }
            AttentionCase {
                q,
                k,
                v,
                n_head,
                autocast,
            }
        })
}

pub(crate) fn attention(case: AttentionCase) -> CaseResult {
    let q = build(&case.q)?;
    // Mostly q's shape: attention takes no broadcasting.
    let like_q = |(spec, relation, seed, dtype, device): Partner| {
        let relation = if (3..=5).contains(&relation) {
            0
        } else {
            relation
        };
        paired(&case.q, (spec, relation, seed, dtype, device))
    };
    let k = build(&like_q(case.k.clone()))?;
    let v = build(&like_q(case.v.clone()))?;
    let _autocast = case.autocast.map(kiln::autocast);
    let cast_v = if case.autocast.is_some() {
        V::Maybe
    } else {
        V::Valid
    };
    let fits = q.rank() == 4 && k.dims() == q.dims() && v.dims() == q.dims() && q.dims()[3] > 0;
    let operands = [&q, &k, &v];
    check(
        "causal_attention",
        Expect::new(
            fits.then(|| q.dims().to_vec()),
            cast_operands_v(&operands, case.autocast),
        ),
        &operands,
        || Tensor::causal_attention(&q, &k, &v),
    )?;

    // Packed qkv [B, T, 3E], E = n_head·D from q [B, n_head, T, D] (or
    // whatever q's dims give).
    let n_head = case.n_head;
    let qkv_dims = match q.dims() {
        &[b, h, t, d] if !case.q.seed.is_multiple_of(5) => vec![b, t, 3 * h * d],
        dims => dims.to_vec(),
    };
    let n_head = if !case.q.seed.is_multiple_of(5) {
        q.dims().get(1).copied().unwrap_or(n_head)
    } else {
        n_head
    };
    let qkv = build(&Spec {
        dims: qkv_dims,
        ..case.q.clone()
    })?;
    let shape = match qkv.dims() {
        &[b, t, width]
            if n_head > 0 && width > 0 && width % 3 == 0 && (width / 3) % n_head == 0 =>
        {
            Some(vec![b, t, width / 3])
        }
        _ => None,
    };
    check(
        "causal_self_attention",
        Expect::new(shape, float_v(&qkv).and(cast_v)),
        &[&qkv],
        || qkv.causal_self_attention(n_head),
    )?;
    Ok(())
}

/// PyTorch's `F.scaled_dot_product_attention`: q [..., L, E], k [..., S, E],
/// v [..., S, Ev] with broadcasting batch dims, a float or boolean mask,
/// is_causal, an explicit scale and dropout on the weights.
#[derive(Clone, Debug)]
pub(crate) struct SdpaCase {
    q: Spec,
    k: Partner,
    v: Partner,
    mask: Option<Partner>,
    /// [L, S, E, Ev]
    size: [usize; 4],
    mutation: u8,
    mask_kind: u8,
    is_causal: bool,
    scale: Option<f64>,
    dropout: Option<f64>,
}

pub(crate) fn sdpa_case() -> impl Strategy<Value = SdpaCase> {
    (
        spec(2..=5),
        partner(),
        partner(),
        prop::option::weighted(0.5, partner()),
        [extent(4), extent(4), extent(3), extent(3)],
        0u8..16,
        0u8..8,
        prop::bool::weighted(0.3),
        prop::option::weighted(0.3, scalar()),
        prop::option::weighted(
            0.2,
            prop_oneof![3 => Just(0.0f64), 3 => 0.0..1.0f64, 1 => Just(1.0), 1 => scalar()],
        ),
    )
        .prop_map(
            |(q, k, v, mask, size, mutation, mask_kind, is_causal, scale, dropout)| SdpaCase {
                q,
                k,
                v,
                mask,
                size,
                mutation,
                mask_kind,
                is_causal,
                scale,
                dropout,
            },
        )
}

pub(crate) fn sdpa(case: SdpaCase) -> CaseResult {
    let [l, s, e, ev] = case.size;
    // q's batch dims (0 to 3 of them), and k's and v's related to them.
    let batch = case.q.dims[..case.q.dims.len() - 2].to_vec();
    let batch_of = |(spec, relation, seed, same_dtype, same_device): &Partner| {
        // Mostly broadcastable: a mismatched batch (relations 6, 7) one time in three.
        let relation = if *relation >= 6 && seed % 3 != 0 {
            0
        } else {
            *relation
        };
        let dims = related(&batch, &spec.dims, relation, *seed);
        // Relation 7 draws dims of any rank: keep at most 3 as batch dims.
        let dims = dims[..dims.len().min(3)].to_vec();
        Spec {
            dims,
            dtype: if *same_dtype {
                case.q.dtype
            } else {
                spec.dtype
            },
            cuda: if *same_device { case.q.cuda } else { spec.cuda },
            ..spec.clone()
        }
    };
    let with_tail = |mut spec: Spec, tail: &[usize]| {
        spec.dims.extend(tail);
        spec
    };
    let m = case.mutation;
    let q = build(&with_tail(
        Spec {
            dims: batch.clone(),
            ..case.q.clone()
        },
        &[l, e],
    ))?;
    let k_tail: &[usize] = match m {
        0 => &[s, e + 1],
        1 => &[e],
        _ => &[s, e],
    };
    let k = build(&with_tail(batch_of(&case.k), k_tail))?;
    let v_tail: &[usize] = match m {
        2 => &[s + 1, ev],
        _ => &[s, ev],
    };
    let v = build(&with_tail(batch_of(&case.v), v_tail))?;
    // The oracle reads the sizes off the operands as built.
    let ranks_fit = k.rank() >= 2 && v.rank() >= 2;
    let last2 = |t: &Tensor| {
        let d = t.dims();
        (
            d[..d.len().max(2) - 2].to_vec(),
            d[d.len().max(2) - 2],
            d[d.len() - 1],
        )
    };
    let (q_batch, _, _) = last2(&q);
    let weights = ranks_fit
        .then(|| {
            let ((k_batch, key_len, key_dim), (v_batch, value_len, _)) = (last2(&k), last2(&v));
            let joint = broadcast(&q_batch, &k_batch)?;
            broadcast(&joint, &v_batch)?;
            (key_dim == e && value_len == key_len).then(|| {
                let mut w = joint;
                w.extend([l, key_len]);
                w
            })
        })
        .flatten();
    let out_shape = weights.as_ref().map(|w| {
        let (v_batch, _, value_dim) = last2(&v);
        let mut out = broadcast(&w[..w.len() - 2], &v_batch).expect("checked above");
        out.extend([l, value_dim]);
        out
    });
    // One float dtype for q, k and v (no promotion) and one device.
    let same_dtype = [&k, &v].iter().all(|t| t.dtype() == q.dtype());
    let qkv_v = device_v(&[&q, &k, &v])
        .and(V::from(same_dtype))
        .and(float_v(&q));

    // The mask: the weights' shape, a broadcast partner of it, [L, S] or
    // something else; a float one mostly of q's dtype, a boolean one u32.
    let mask = match &case.mask {
        None => None,
        Some((spec, relation, seed, same_dtype, same_device)) => {
            let w = weights.clone().unwrap_or_else(|| vec![l, s]);
            let s = w[w.len() - 1];
            let dims = match case.mask_kind {
                0 => vec![l, s],
                1 => vec![s],
                2 => {
                    // A batch dim beyond the weights'.
                    let mut d = vec![2];
                    d.extend(&w);
                    d
                }
                _ => related(&w, &spec.dims, *relation, *seed),
            };
            let boolean = seed % 3 == 0;
            let dtype = match (boolean, *same_dtype) {
                (true, true) => DType::U32,
                (false, true) => case.q.dtype,
                _ => spec.dtype,
            };
            let spec = Spec {
                dims,
                dtype,
                cuda: if *same_device { case.q.cuda } else { spec.cuda },
                ..spec.clone()
            };
            let t = build_indices(&spec, 2)?;
            let fits = t.rank() >= 2
                && weights
                    .as_ref()
                    .is_some_and(|w| broadcast(w, t.dims()).as_ref() == Some(w));
            let kind_v = if boolean {
                V::from(t.dtype() == DType::U32)
            } else {
                V::from(t.dtype() == q.dtype())
            };
            let mask_v = kind_v
                .and(V::from(fits))
                .and(V::from(t.device() == q.device()));
            Some((
                if boolean {
                    AttentionMask::Bool(t.clone())
                } else {
                    AttentionMask::Float(t.clone())
                },
                t,
                mask_v,
            ))
        }
    };
    let options_v = V::from(
        !(case.is_causal && mask.is_some())
            && case.scale.is_none_or(f64::is_finite)
            && case.dropout.is_none_or(|p| (0.0..=1.0).contains(&p)),
    );
    let options = AttentionOptions {
        mask: mask.as_ref().map(|(m, _, _)| m.clone()),
        is_causal: case.is_causal,
        scale: case.scale,
        dropout: case.dropout.map(|p| AttentionDropout {
            p,
            seed: case.q.seed,
        }),
    };
    let mut leaves = vec![&q, &k, &v];
    let mut v_all = qkv_v.and(options_v);
    if let Some((_, t, mask_v)) = &mask {
        leaves.push(t);
        v_all = v_all.and(*mask_v);
    }
    check(
        "scaled_dot_product_attention",
        Expect::new(out_shape, v_all),
        &leaves,
        || Tensor::scaled_dot_product_attention(&q, &k, &v, &options),
    )?;
    Ok(())
}
