//! Losses and embedding against PyTorch: forward value and input gradient
//! for the stored upstream gradient (a rank-0 `grad_out` for the losses).

use crate::common::Golden;
use kiln::{Reduction, Tensor};

/// Runs a loss of `x` and the stored `target`, checks `out` and `grad_x`.
fn check_loss(case: &str, loss: impl Fn(&Tensor, &Tensor) -> kiln::Result<Tensor>) {
    let g = Golden::load(case);
    assert_eq!(g.meta("reduction"), "mean");
    let x = g.tensor("x").requires_grad_();
    let out = loss(&x, &g.tensor("target")).unwrap();
    assert_eq!(out.rank(), 0, "{case}: a loss is a rank-0 tensor");
    g.assert_close("out", &out);
    let grads = out.backward_with(&g.tensor("grad_out")).unwrap();
    g.assert_close("grad_x", grads.get(&x).unwrap());
}

#[test]
fn cross_entropy_matches_pytorch() {
    check_loss("cross_entropy", |x, t| x.cross_entropy(t, Reduction::Mean));
}

#[test]
fn bce_with_logits_matches_pytorch() {
    check_loss("bce_with_logits", |x, t| {
        x.bce_with_logits(t, Reduction::Mean)
    });
}

#[test]
fn mse_matches_pytorch() {
    check_loss("mse", |x, t| x.mse_loss(t, Reduction::Mean));
}

#[test]
fn embedding_with_repeated_ids_matches_pytorch() {
    let g = Golden::load("embedding");
    let weight = g.tensor("weight").requires_grad_();
    let ids = g.tensor("ids");
    assert_eq!(weight.dims(), [7, 5]);
    let out = Tensor::embedding(&ids, &weight).unwrap();
    g.assert_close("out", &out);
    let grads = out.backward_with(&g.tensor("grad_out")).unwrap();
    g.assert_close("grad_weight", grads.get(&weight).unwrap());
}
