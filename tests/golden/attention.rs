//! `Tensor::scaled_dot_product_attention` against PyTorch's
//! `F.scaled_dot_product_attention`: query and key lengths that differ, a
//! value head size unlike the query's, `is_causal` with L < S and L > S,
//! float and boolean masks, an explicit scale with k and v broadcast over
//! the batch. Outputs and every gradient (q, k, v, and a float mask).

use kiln::{AttentionMask, AttentionOptions, Tensor};

use crate::common::Golden;

/// Runs one case with `options` (its mask taken from the file when
/// `mask` says how to read it), and compares out and the gradients of
/// q, k, v, plus the float mask's when it has one.
fn sdpa_case(case: &str, options: AttentionOptions, mask: Option<fn(Tensor) -> AttentionMask>) {
    let g = Golden::load(case);
    let q = g.tensor("q").requires_grad_();
    let k = g.tensor("k").requires_grad_();
    let v = g.tensor("v").requires_grad_();
    let mask_tensor = mask.map(|_| g.tensor("mask"));
    let mask_tensor = match (&mask_tensor, g.has("grad_mask")) {
        (Some(m), true) => Some(m.clone().requires_grad_()),
        (m, _) => m.clone(),
    };
    let options = AttentionOptions {
        mask: mask.zip(mask_tensor.clone()).map(|(wrap, m)| wrap(m)),
        ..options
    };
    let out = Tensor::scaled_dot_product_attention(&q, &k, &v, &options).unwrap();
    g.assert_close("out", &out);
    let grads = out.backward_with(&g.tensor("grad_out")).unwrap();
    let mut inputs = vec![("q", &q), ("k", &k), ("v", &v)];
    if g.has("grad_mask") {
        inputs.push(("mask", mask_tensor.as_ref().unwrap()));
    }
    for (name, input) in inputs {
        let grad = grads
            .get(input)
            .unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
        g.assert_close(&format!("grad_{name}"), grad);
    }
}

#[test]
fn cross_lengths_and_value_head_size_match_pytorch() {
    sdpa_case("sdpa_cross_lengths", AttentionOptions::default(), None);
}

#[test]
fn causal_with_fewer_queries_than_keys_matches_pytorch() {
    let g = Golden::load("sdpa_causal_short_query");
    assert_eq!(g.meta("is_causal"), "true");
    sdpa_case("sdpa_causal_short_query", AttentionOptions::causal(), None);
}

#[test]
fn causal_with_more_queries_than_keys_matches_pytorch() {
    sdpa_case("sdpa_causal_long_query", AttentionOptions::causal(), None);
}

#[test]
fn float_mask_and_its_gradient_match_pytorch() {
    sdpa_case(
        "sdpa_float_mask",
        AttentionOptions::default(),
        Some(AttentionMask::Float),
    );
}

#[test]
fn bool_mask_with_a_fully_masked_row_matches_pytorch() {
    // The file's i64 0/1 mask loads as u32, kiln's boolean representation.
    sdpa_case(
        "sdpa_bool_mask",
        AttentionOptions::default(),
        Some(AttentionMask::Bool),
    );
}

#[test]
fn explicit_scale_with_shared_keys_and_values_matches_pytorch() {
    let g = Golden::load("sdpa_scale_broadcast");
    let options = AttentionOptions {
        scale: Some(g.meta_f64("scale")),
        ..AttentionOptions::default()
    };
    sdpa_case("sdpa_scale_broadcast", options, None);
}

#[test]
fn causal_default_case_takes_pytorch_values_through_the_fused_op() {
    // q, k, v of one shape, default scale: the fused causal_attention path.
    sdpa_case("attention", AttentionOptions::causal(), None);
}
