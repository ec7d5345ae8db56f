//! `scaled_dot_product_attention`: its backward against finite differences
//! for each option (key length S ≠ query length L, value head size Ev ≠ E,
//! `is_causal` with L ≠ S, float and boolean masks, explicit scale with
//! broadcast batch dims, dropout with a fixed seed), the behaviour of its
//! edge cases as PyTorch 2.15 gives them, dropout's statistics, and the
//! errors for what it refuses.

use kiln::{AttentionDropout, AttentionMask, AttentionOptions, DType, Device, Tensor};
use proptest::prelude::*;

use crate::common::*;

fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, options: &AttentionOptions) -> kiln::Result<Tensor> {
    Tensor::scaled_dot_product_attention(q, k, v, options)
}

/// A u32 0/1 mask of `shape` with about half its entries 1, from `seed`.
fn bool_mask(shape: &[usize], seed: u64) -> Tensor {
    let bits = uniform(0.0, 1.0, shape, seed)
        .to_f64_vec()
        .into_iter()
        .map(|u| u32::from(u < 0.5))
        .collect();
    Tensor::from_indices(bits, shape).unwrap()
}

fn assert_all_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    for (i, (a, e)) in actual
        .to_f64_vec()
        .iter()
        .zip(expected.to_f64_vec())
        .enumerate()
    {
        assert!((a - e).abs() <= tol, "{what}[{i}]: {a} vs {e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn grads_with_other_key_length_and_value_head_size(
        dims in (1usize..=2, 1usize..=2, 1usize..=4, 1usize..=5, 1usize..=4, 1usize..=3),
        seed in any::<u64>(),
    ) {
        let (b, h, l, s, e, ev) = dims;
        check(
            |x| sdpa(&x[0], &x[1], &x[2], &AttentionOptions::default()),
            &[randn(&[b, h, l, e], seed), randn(&[b, h, s, e], seed ^ 1), randn(&[b, h, s, ev], seed ^ 2)],
        );
    }

    #[test]
    fn grads_of_causal_with_other_key_length(
        dims in (1usize..=2, 1usize..=5, 1usize..=5, 1usize..=3),
        seed in any::<u64>(),
    ) {
        let (h, l, s, e) = dims;
        check(
            |x| sdpa(&x[0], &x[1], &x[2], &AttentionOptions::causal()),
            &[randn(&[1, h, l, e], seed), randn(&[1, h, s, e], seed ^ 1), randn(&[1, h, s, 2], seed ^ 2)],
        );
    }

    #[test]
    fn grads_of_q_k_v_and_a_broadcast_float_mask(
        dims in (1usize..=2, 1usize..=2, 1usize..=4, 1usize..=4, 1usize..=3),
        per_batch in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let (b, h, l, s, e) = dims;
        // [B or 1, 1, L, S]: summed over the heads (and the batch) in the backward.
        let mask_batch = if per_batch { b } else { 1 };
        check(
            |x| {
                let options = AttentionOptions {
                    mask: Some(AttentionMask::Float(x[3].clone())),
                    ..AttentionOptions::default()
                };
                sdpa(&x[0], &x[1], &x[2], &options)
            },
            &[
                randn(&[b, h, l, e], seed),
                randn(&[b, h, s, e], seed ^ 1),
                randn(&[b, h, s, 2], seed ^ 2),
                randn(&[mask_batch, 1, l, s], seed ^ 3),
            ],
        );
    }

    #[test]
    fn grads_with_a_bool_mask_fully_masked_rows_included(
        dims in (1usize..=2, 1usize..=4, 1usize..=4, 1usize..=3),
        seed in any::<u64>(),
    ) {
        let (h, l, s, e) = dims;
        let mask = bool_mask(&[l, s], seed ^ 3);
        check(
            |x| {
                let options = AttentionOptions {
                    mask: Some(AttentionMask::Bool(mask.clone())),
                    ..AttentionOptions::default()
                };
                sdpa(&x[0], &x[1], &x[2], &options)
            },
            &[randn(&[2, h, l, e], seed), randn(&[2, h, s, e], seed ^ 1), randn(&[2, h, s, 3], seed ^ 2)],
        );
    }

    #[test]
    fn grads_with_explicit_scale_and_keys_shared_by_the_batch(
        dims in (1usize..=3, 1usize..=4, 1usize..=4, 1usize..=3),
        scale in -2.0f64..2.0,
        seed in any::<u64>(),
    ) {
        let (b, l, s, e) = dims;
        let options = AttentionOptions { scale: Some(scale), ..AttentionOptions::default() };
        check(
            |x| sdpa(&x[0], &x[1], &x[2], &options),
            &[randn(&[b, 2, l, e], seed), randn(&[1, 2, s, e], seed ^ 1), randn(&[2, s, 2], seed ^ 2)],
        );
    }

    #[test]
    fn grads_with_dropout_use_the_forward_mask(
        dims in (1usize..=2, 1usize..=4, 1usize..=5, 1usize..=3),
        causal in any::<bool>(),
        seed in any::<u64>(),
    ) {
        // A fixed seed is a fixed mask: the op is then a smooth function of
        // q, k, v, and its backward must drop the same weights.
        let (h, l, s, e) = dims;
        let options = AttentionOptions {
            is_causal: causal,
            dropout: Some(AttentionDropout { p: 0.4, seed }),
            ..AttentionOptions::default()
        };
        check(
            |x| sdpa(&x[0], &x[1], &x[2], &options),
            &[randn(&[1, h, l, e], seed), randn(&[1, h, s, e], seed ^ 1), randn(&[1, h, s, 2], seed ^ 2)],
        );
    }

    #[test]
    fn grads_of_rank_3_causal_self_attention_through_the_fused_op(
        dims in (1usize..=3, 1usize..=5, 1usize..=4),
        seed in any::<u64>(),
    ) {
        let (b, t, d) = dims;
        check(
            |x| sdpa(&x[0], &x[1], &x[2], &AttentionOptions::causal()),
            &[randn(&[b, t, d], seed), randn(&[b, t, d], seed ^ 1), randn(&[b, t, d], seed ^ 2)],
        );
    }
}

#[test]
fn dropout_equals_the_undropped_formula_with_the_same_mask() {
    let (q, k, v) = (
        randn(&[2, 3, 5, 4], 1),
        randn(&[2, 3, 7, 4], 2),
        randn(&[2, 3, 7, 3], 3),
    );
    let (p, seed) = (0.3, 17);
    let options = AttentionOptions {
        dropout: Some(AttentionDropout { p, seed }),
        ..AttentionOptions::default()
    };
    let out = sdpa(&q, &k, &v, &options).unwrap();
    // The documented mask: Tensor::dropout's on the weights [B, H, L, S].
    let weights = q
        .mul_scalar(0.5)
        .unwrap()
        .matmul_nt(&k)
        .unwrap()
        .softmax(-1)
        .unwrap();
    let expected = weights.dropout(p, seed).unwrap().matmul(&v).unwrap();
    assert_all_close("dropped attention", &out, &expected, 1e-12);
    let undropped = sdpa(&q, &k, &v, &AttentionOptions::default()).unwrap();
    assert_all_close(
        "undropped attention",
        &undropped,
        &weights.matmul(&v).unwrap(),
        1e-12,
    );
    // And p = 0 is no dropout at all.
    let zero = AttentionOptions {
        dropout: Some(AttentionDropout { p: 0.0, seed }),
        ..AttentionOptions::default()
    };
    assert_all_close("p = 0", &sdpa(&q, &k, &v, &zero).unwrap(), &undropped, 0.0);
}

#[test]
fn dropout_drops_about_p_of_the_weights_and_keeps_their_mean() {
    // q = 0 gives uniform weights 1/S; v = I[S] makes the output the weights.
    let (heads, len, p) = (8usize, 64usize, 0.3);
    let q = Tensor::zeros([1, heads, len, 4], DType::F64, Device::Cpu).unwrap();
    let k = randn(&[1, heads, len, 4], 5);
    let identity: Vec<f64> = (0..len * len)
        .map(|i| f64::from(u8::from(i / len == i % len)))
        .collect();
    let v = Tensor::from_vec(identity, [len, len]).unwrap();
    let options = AttentionOptions {
        dropout: Some(AttentionDropout { p, seed: 3 }),
        ..AttentionOptions::default()
    };
    let weights = sdpa(&q, &k, &v, &options).unwrap().to_f64_vec();
    let dropped = weights.iter().filter(|&&w| w == 0.0).count() as f64 / weights.len() as f64;
    // 32 768 draws: the dropped fraction has a standard deviation of 0.0025.
    assert!((dropped - p).abs() < 0.02, "dropped {dropped}");
    let kept_value = 1.0 / len as f64 / (1.0 - p);
    assert!(
        weights
            .iter()
            .all(|&w| w == 0.0 || (w - kept_value).abs() < 1e-12)
    );
    let mean = weights.iter().sum::<f64>() / weights.len() as f64;
    assert!((mean * len as f64 - 1.0).abs() < 0.03, "mean {mean}");
    // Another seed, another mask.
    let other = AttentionOptions {
        dropout: Some(AttentionDropout { p, seed: 4 }),
        ..AttentionOptions::default()
    };
    assert_ne!(sdpa(&q, &k, &v, &other).unwrap().to_f64_vec(), weights);
}

#[test]
fn dropout_of_one_zeroes_the_output_and_its_gradients() {
    // PyTorch accepts dropout_p = 1: every weight dropped.
    let (q, k, v) = (
        randn(&[1, 2, 3, 4], 1).requires_grad_(),
        randn(&[1, 2, 5, 4], 2).requires_grad_(),
        randn(&[1, 2, 5, 3], 3).requires_grad_(),
    );
    let options = AttentionOptions {
        dropout: Some(AttentionDropout { p: 1.0, seed: 0 }),
        ..AttentionOptions::default()
    };
    let out = sdpa(&q, &k, &v, &options).unwrap();
    assert!(out.to_f64_vec().iter().all(|&x| x == 0.0));
    let grads = out.sum_all().unwrap().backward().unwrap();
    for t in [&q, &k, &v] {
        assert!(grads.get(t).unwrap().to_f64_vec().iter().all(|&g| g == 0.0));
    }
}

#[test]
fn fully_masked_rows_give_zero_output_and_gradients_like_pytorch() {
    // PyTorch 2.15's CPU math path: a query row that sees no key outputs 0
    // (not NaN) and passes no gradient, for a -inf float mask and a bool mask.
    let (q, k, v) = (
        randn(&[1, 1, 3, 4], 1).requires_grad_(),
        randn(&[1, 1, 5, 4], 2).requires_grad_(),
        randn(&[1, 1, 5, 2], 3).requires_grad_(),
    );
    let inf = f64::NEG_INFINITY;
    let float_mask = Tensor::from_vec(
        vec![
            0.0, inf, 0.0, 0.0, inf, inf, inf, inf, inf, inf, 0.0, 0.0, 0.0, 0.0, 0.0,
        ],
        [3, 5],
    )
    .unwrap()
    .requires_grad_();
    let bools =
        Tensor::from_indices(vec![1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1], [3, 5]).unwrap();
    let run = |mask: AttentionMask| {
        let options = AttentionOptions {
            mask: Some(mask),
            ..AttentionOptions::default()
        };
        let out = sdpa(&q, &k, &v, &options).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        (out, grads)
    };
    let (out, grads) = run(AttentionMask::Float(float_mask.clone()));
    let values = out.to_f64_vec();
    assert_eq!(&values[2..4], &[0.0, 0.0], "row 1 sees no key");
    assert!(values.iter().all(|x| x.is_finite()));
    assert_eq!(&grads.get(&q).unwrap().to_f64_vec()[4..8], &[0.0; 4]);
    let mask_grad = grads.get(&float_mask).unwrap().to_f64_vec();
    assert!(mask_grad.iter().all(|g| g.is_finite()));
    assert_eq!(&mask_grad[5..10], &[0.0; 5]);
    let (bool_out, bool_grads) = run(AttentionMask::Bool(bools));
    assert_all_close("bool vs -inf mask", &bool_out, &out, 0.0);
    for t in [&q, &k, &v] {
        assert_all_close(
            "bool vs -inf mask gradient",
            bool_grads.get(t).unwrap(),
            grads.get(t).unwrap(),
            0.0,
        );
    }
}

#[test]
fn causal_is_the_top_left_lower_triangle_mask() {
    for (l, s) in [(3, 6), (6, 3), (4, 4)] {
        let (q, k, v) = (
            randn(&[2, 2, l, 4], 1),
            randn(&[2, 2, s, 4], 2),
            randn(&[2, 2, s, 3], 3),
        );
        let tril = (0..l * s).map(|i| u32::from(i % s <= i / s)).collect();
        let masked = AttentionOptions {
            mask: Some(AttentionMask::Bool(
                Tensor::from_indices(tril, [l, s]).unwrap(),
            )),
            ..AttentionOptions::default()
        };
        assert_all_close(
            &format!("causal L {l} S {s}"),
            &sdpa(&q, &k, &v, &AttentionOptions::causal()).unwrap(),
            &sdpa(&q, &k, &v, &masked).unwrap(),
            1e-12,
        );
    }
}

#[test]
fn causal_defaults_are_causal_attention_at_any_rank() {
    let shape = [2, 3, 5, 4];
    let (q, k, v) = (randn(&shape, 1), randn(&shape, 2), randn(&shape, 3));
    let fused = Tensor::causal_attention(&q, &k, &v).unwrap();
    let out = sdpa(&q, &k, &v, &AttentionOptions::causal()).unwrap();
    assert_eq!(out.to_f64_vec(), fused.to_f64_vec());
    // [B·H, T, D] and [T, D] operands: the same heads.
    let as_rank3 = |t: &Tensor| t.reshape([6, 5, 4]).unwrap();
    let out3 = sdpa(
        &as_rank3(&q),
        &as_rank3(&k),
        &as_rank3(&v),
        &AttentionOptions::causal(),
    )
    .unwrap();
    assert_eq!(out3.dims(), &[6, 5, 4]);
    assert_eq!(out3.to_f64_vec(), fused.to_f64_vec());
    let head = |t: &Tensor| {
        t.narrow(0, 0, 1)
            .unwrap()
            .reshape([3, 5, 4])
            .unwrap()
            .narrow(0, 0, 1)
            .unwrap()
            .reshape([5, 4])
            .unwrap()
    };
    let out2 = sdpa(&head(&q), &head(&k), &head(&v), &AttentionOptions::causal()).unwrap();
    assert_eq!(out2.dims(), &[5, 4]);
    assert_eq!(out2.to_f64_vec(), fused.to_f64_vec()[..20].to_vec());
}

#[test]
fn empty_dims_behave_as_in_pytorch() {
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F64, Device::Cpu).unwrap();
    // E = 0: every score is 0, so each query averages the values.
    let v = randn(&[1, 1, 4, 2], 3);
    let out = sdpa(
        &zeros(&[1, 1, 3, 0]),
        &zeros(&[1, 1, 4, 0]),
        &v,
        &AttentionOptions::default(),
    )
    .unwrap();
    let mean = v
        .mean(&[2], true)
        .unwrap()
        .broadcast_to([1, 1, 3, 2])
        .unwrap();
    assert_all_close("E = 0", &out, &mean, 1e-12);
    // S = 0: no key to attend to, the output is 0 (also causal).
    for options in [AttentionOptions::default(), AttentionOptions::causal()] {
        let out = sdpa(
            &randn(&[2, 1, 3, 4], 1),
            &zeros(&[2, 1, 0, 4]),
            &zeros(&[2, 1, 0, 2]),
            &options,
        )
        .unwrap();
        assert_all_close("S = 0", &out, &zeros(&[2, 1, 3, 2]), 0.0);
    }
    // L = 0: an empty output.
    let out = sdpa(
        &zeros(&[2, 1, 0, 4]),
        &randn(&[2, 1, 3, 4], 2),
        &randn(&[2, 1, 3, 2], 3),
        &AttentionOptions::default(),
    )
    .unwrap();
    assert_eq!(out.dims(), &[2, 1, 0, 2]);
}

const OP: &str = "scaled_dot_product_attention";

#[test]
fn rejects_shapes_that_do_not_line_up() {
    let q = randn(&[2, 3, 4, 5], 1);
    let default = AttentionOptions::default();
    assert_error_mentions(
        sdpa(
            &q,
            &randn(&[2, 3, 6, 4], 2),
            &randn(&[2, 3, 6, 2], 3),
            &default,
        ),
        &[OP, "head size E", "[2, 3, 4, 5]", "[2, 3, 6, 4]"],
    );
    assert_error_mentions(
        sdpa(
            &q,
            &randn(&[2, 3, 6, 5], 2),
            &randn(&[2, 3, 7, 2], 3),
            &default,
        ),
        &[OP, "key length S", "[2, 3, 6, 5]", "[2, 3, 7, 2]"],
    );
    assert_error_mentions(
        sdpa(
            &q,
            &randn(&[2, 2, 6, 5], 2),
            &randn(&[2, 2, 6, 2], 3),
            &default,
        ),
        &[OP, "broadcast", "[2, 3, 4, 5]", "[2, 2, 6, 5]"],
    );
    let vector = randn(&[5], 4);
    assert_error_mentions(
        sdpa(&vector, &vector, &vector, &default),
        &[OP, "at least 2 dims", "[5]"],
    );
    assert_error_mentions(
        sdpa(&q, &q.to_dtype(DType::F32).unwrap(), &q, &default),
        &[OP, "f64", "f32"],
    );
}

#[test]
fn rejects_bad_masks() {
    let (q, k, v) = (
        randn(&[2, 3, 4, 5], 1),
        randn(&[2, 3, 6, 5], 2),
        randn(&[2, 3, 6, 2], 3),
    );
    let with = |mask: AttentionMask, is_causal: bool| AttentionOptions {
        mask: Some(mask),
        is_causal,
        ..AttentionOptions::default()
    };
    let float = |shape: &[usize]| AttentionMask::Float(randn(shape, 9));
    assert_error_mentions(
        sdpa(&q, &k, &v, &with(float(&[4, 6]), true)),
        &[OP, "is_causal", "mask"],
    );
    for shape in [&[4, 5][..], &[6], &[3, 2, 3, 4, 6], &[2, 3, 1, 4, 6]] {
        assert_error_mentions(
            sdpa(&q, &k, &v, &with(float(shape), false)),
            &[OP, "mask", &format!("{:?}", shape), "[2, 3, 4, 6]"],
        );
    }
    let indices = Tensor::from_indices(vec![1; 24], [4, 6]).unwrap();
    assert_error_mentions(
        sdpa(&q, &k, &v, &with(AttentionMask::Float(indices), false)),
        &[OP, "u32", "AttentionMask::Bool"],
    );
    assert_error_mentions(
        sdpa(
            &q,
            &k,
            &v,
            &with(AttentionMask::Bool(randn(&[4, 6], 5)), false),
        ),
        &[
            OP,
            "AttentionMask::Bool",
            "u32",
            "f64",
            "AttentionMask::Float",
        ],
    );
    let f32_mask = randn(&[4, 6], 5).to_dtype(DType::F32).unwrap();
    assert_error_mentions(
        sdpa(&q, &k, &v, &with(AttentionMask::Float(f32_mask), false)),
        &[OP, "float mask", "f64", "f32", "to_dtype"],
    );
}

#[test]
fn rejects_bad_dropout_probabilities_and_scales() {
    let q = randn(&[1, 2, 3, 4], 1);
    for p in [-0.1, 1.5, f64::NAN] {
        let options = AttentionOptions {
            dropout: Some(AttentionDropout { p, seed: 0 }),
            ..AttentionOptions::default()
        };
        assert_error_mentions(
            sdpa(&q, &q, &q, &options),
            &[OP, "dropout", "[0, 1]", &format!("{p}")],
        );
    }
    for scale in [f64::NAN, f64::INFINITY] {
        let options = AttentionOptions {
            scale: Some(scale),
            ..AttentionOptions::default()
        };
        assert_error_mentions(
            sdpa(&q, &q, &q, &options),
            &[OP, "scale", "finite", &format!("{scale}")],
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn grads_of_causal_with_explicit_scale_through_the_fused_op(
        dims in (1usize..=2, 1usize..=2, 1usize..=5, 1usize..=4),
        scale in -2.0f64..2.0,
        seed in any::<u64>(),
    ) {
        let (b, h, t, d) = dims;
        let shape = [b, h, t, d];
        let options = AttentionOptions { scale: Some(scale), ..AttentionOptions::causal() };
        check(
            |x| sdpa(&x[0], &x[1], &x[2], &options),
            &[randn(&shape, seed), randn(&shape, seed ^ 1), randn(&shape, seed ^ 2)],
        );
    }
}

#[test]
fn fused_causal_with_a_scale_equals_the_general_path() {
    // The general path's causal triangle as a bool mask, against the fused op.
    let shape = [2, 3, 6, 4];
    let (q, k, v) = (randn(&shape, 1), randn(&shape, 2), randn(&shape, 3));
    let tril = (0..36).map(|i| u32::from(i % 6 <= i / 6)).collect();
    let scale = Some(0.9);
    let fused = AttentionOptions {
        scale,
        ..AttentionOptions::causal()
    };
    let general = AttentionOptions {
        scale,
        mask: Some(AttentionMask::Bool(
            Tensor::from_indices(tril, [6, 6]).unwrap(),
        )),
        ..AttentionOptions::default()
    };
    assert_all_close(
        "fused vs general causal, scale 0.9",
        &sdpa(&q, &k, &v, &fused).unwrap(),
        &sdpa(&q, &k, &v, &general).unwrap(),
        1e-12,
    );
}
