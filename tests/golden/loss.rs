//! Loss options against PyTorch: reduction='none', cross entropy's weight,
//! ignore_index, label_smoothing and class dims, bce's weight, pos_weight and
//! targets outside [0, 1], mse with a broadcasting target. Each checks the
//! forward value and the gradient of every differentiated input for the
//! stored upstream gradient.

use crate::common::Golden;
use kiln::{BceWithLogitsOptions, CrossEntropyOptions, Reduction, Tensor};

/// PyTorch's `reduction=` string as kiln's.
fn reduction(g: &Golden) -> Reduction {
    match g.meta("reduction") {
        "mean" => Reduction::Mean,
        "sum" => Reduction::Sum,
        "none" => Reduction::None,
        other => panic!("{}: unknown reduction {other}", g.case),
    }
}

/// A loss of two differentiated operands (`first`, `second`): checks `out`
/// and both gradients.
fn check_pair(
    case: &str,
    (first, second): (&str, &str),
    loss: impl Fn(&Golden, &Tensor, &Tensor) -> kiln::Result<Tensor>,
) {
    let g = Golden::load(case);
    let a = g.tensor(first).requires_grad_();
    let b = g.tensor(second).requires_grad_();
    let out = loss(&g, &a, &b).unwrap();
    g.assert_close("out", &out);
    let grads = out.backward_with(&g.tensor("grad_out")).unwrap();
    g.assert_close(&format!("grad_{first}"), grads.get(&a).unwrap());
    g.assert_close(&format!("grad_{second}"), grads.get(&b).unwrap());
}

#[test]
fn mse_none_matches_pytorch() {
    check_pair("mse_none", ("x", "target"), |g, x, t| {
        x.mse_loss(t, reduction(g))
    });
}

#[test]
fn mse_with_a_broadcasting_target_matches_pytorch() {
    check_pair("mse_broadcast_target", ("x", "target"), |g, x, t| {
        assert_ne!(x.dims(), t.dims(), "the case broadcasts the target");
        x.mse_loss(t, reduction(g))
    });
}

/// bce with the case's optional `weight` and `pos_weight`.
fn bce_options(g: &Golden) -> BceWithLogitsOptions {
    BceWithLogitsOptions {
        reduction: reduction(g),
        weight: g.has("weight").then(|| g.tensor("weight")),
        pos_weight: g.has("pos_weight").then(|| g.tensor("pos_weight")),
    }
}

#[test]
fn bce_with_logits_none_matches_pytorch() {
    check_pair("bce_with_logits_none", ("x", "target"), |g, x, t| {
        x.bce_with_logits(t, reduction(g))
    });
}

#[test]
fn bce_with_logits_weight_pos_weight_and_targets_outside_0_1_match_pytorch() {
    check_pair("bce_with_logits_weights", ("x", "target"), |g, x, t| {
        let values = t.to_f64_vec();
        assert!(values.iter().any(|&v| !(0.0..=1.0).contains(&v)));
        x.bce_with_logits_with(t, &bce_options(g))
    });
}

#[test]
fn bce_with_logits_pos_weight_unreduced_matches_pytorch() {
    check_pair(
        "bce_with_logits_pos_weight_none",
        ("x", "target"),
        |g, x, t| x.bce_with_logits_with(t, &bce_options(g)),
    );
}

/// Runs the case's cross entropy (options from its metadata and tensors),
/// checks `out` and `grad_x`.
fn check_cross_entropy(case: &str) {
    let g = Golden::load(case);
    let options = CrossEntropyOptions {
        reduction: reduction(&g),
        weight: g.has("weight").then(|| g.tensor("weight")),
        ignore_index: match g.meta("ignore_index") {
            "none" => None,
            class => Some(class.parse().unwrap()),
        },
        label_smoothing: g.meta_f64("label_smoothing"),
    };
    let x = g.tensor("x").requires_grad_();
    let out = x.cross_entropy_with(&g.tensor("target"), &options).unwrap();
    g.assert_close("out", &out);
    let grads = out.backward_with(&g.tensor("grad_out")).unwrap();
    g.assert_close("grad_x", grads.get(&x).unwrap());
}

#[test]
fn cross_entropy_none_matches_pytorch() {
    check_cross_entropy("cross_entropy_none");
}

#[test]
fn cross_entropy_with_class_dims_matches_pytorch() {
    check_cross_entropy("cross_entropy_class_dims");
}

#[test]
fn cross_entropy_with_class_weights_matches_pytorch() {
    check_cross_entropy("cross_entropy_weight");
}

#[test]
fn cross_entropy_with_ignore_index_matches_pytorch() {
    check_cross_entropy("cross_entropy_ignore_index");
}

#[test]
fn cross_entropy_with_label_smoothing_matches_pytorch() {
    check_cross_entropy("cross_entropy_label_smoothing");
}

#[test]
fn cross_entropy_with_every_option_matches_pytorch() {
    check_cross_entropy("cross_entropy_all_options");
}

#[test]
fn cross_entropy_with_every_option_unreduced_matches_pytorch() {
    check_cross_entropy("cross_entropy_all_options_none");
}

#[test]
fn cross_entropy_of_unbatched_logits_matches_pytorch() {
    check_cross_entropy("cross_entropy_unbatched");
}

#[test]
fn gaussian_kl_none_matches_the_per_row_formula() {
    check_pair("gaussian_kl_none", ("mu", "logvar"), |g, mu, logvar| {
        Tensor::gaussian_kl(mu, logvar, reduction(g))
    });
}
