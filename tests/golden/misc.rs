//! Losses, embedding and matmul with vector operands against PyTorch: forward value and input gradient
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

#[test]
fn matmul_with_vectors_matches_pytorch() {
    // torch.matmul(v, batch), torch.matmul(mats, w) and torch.matmul(v, w).
    let g = Golden::load("matmul_vectors");
    let leaf = |name: &str| g.tensor(name).requires_grad_();
    let (v, w, batch, mats) = (leaf("v"), leaf("w"), leaf("batch"), leaf("mats"));
    let outs = [
        ("vec_mat", v.matmul(&batch).unwrap()),
        ("mat_vec", mats.matmul(&w).unwrap()),
        ("dot", v.matmul(&w).unwrap()),
    ];
    let mut total: Option<Tensor> = None;
    for (name, out) in &outs {
        g.assert_close(name, out);
        let term = out
            .mul(&g.tensor(&format!("g_{name}")))
            .unwrap()
            .sum_all()
            .unwrap();
        total = Some(match total {
            Some(t) => t.add(&term).unwrap(),
            None => term,
        });
    }
    let grads = total.unwrap().backward().unwrap();
    for (name, input) in [("v", &v), ("w", &w), ("batch", &batch), ("mats", &mats)] {
        g.assert_close(&format!("grad_{name}"), grads.get(input).unwrap());
    }
}
