//! Batch norm (train and eval), layer norm, softmax, log-softmax and causal
//! attention against PyTorch.

use crate::common::Golden;
use kiln::Tensor;

/// Backpropagates the stored `grad_out` through `out` and checks `grad_<name>`
/// for each of `inputs`.
fn check_grads(g: &Golden, out: &Tensor, inputs: &[(&str, &Tensor)]) {
    let grads = out.backward_with(&g.tensor("grad_out")).unwrap();
    for (name, input) in inputs {
        let grad = grads
            .get(input)
            .unwrap_or_else(|| panic!("{}: no gradient for {name}", g.case));
        g.assert_close(&format!("grad_{name}"), grad);
    }
}

/// Runs one batch-norm case: forward, gradients, and the running statistics
/// the call leaves behind.
fn batch_norm_case(case: &str) {
    let g = Golden::load(case);
    let training = g.meta("training") == "true";
    let x = g.tensor("x").requires_grad_();
    let weight = g.tensor("weight").requires_grad_();
    let bias = g.tensor("bias").requires_grad_();
    // Fresh storage, so that the in-place update cannot touch the loaded tensors.
    let running_mean =
        Tensor::from_vec(g.tensor("running_mean").to_vec::<f32>().unwrap(), [3]).unwrap();
    let running_var =
        Tensor::from_vec(g.tensor("running_var").to_vec::<f32>().unwrap(), [3]).unwrap();
    let out = x
        .batch_norm2d(
            Some(&running_mean),
            Some(&running_var),
            Some(&weight),
            Some(&bias),
            training,
            g.meta_f64("momentum"),
            g.meta_f64("eps"),
        )
        .unwrap();
    g.assert_close("out", &out);
    check_grads(&g, &out, &[("x", &x), ("weight", &weight), ("bias", &bias)]);
    if training {
        g.assert_close("running_mean_after", &running_mean);
        g.assert_close("running_var_after", &running_var);
    } else {
        g.assert_close("running_mean", &running_mean);
        g.assert_close("running_var", &running_var);
    }
}

#[test]
fn batch_norm2d_training_matches_pytorch_incl_running_stats() {
    batch_norm_case("batch_norm2d_train");
}

#[test]
fn batch_norm2d_eval_matches_pytorch_and_keeps_running_stats() {
    batch_norm_case("batch_norm2d_eval");
}

#[test]
fn layer_norm_matches_pytorch() {
    let g = Golden::load("layer_norm");
    let x = g.tensor("x").requires_grad_();
    let weight = g.tensor("weight").requires_grad_();
    let bias = g.tensor("bias").requires_grad_();
    let out = x
        .layer_norm(Some(&weight), Some(&bias), g.meta_f64("eps"))
        .unwrap();
    g.assert_close("out", &out);
    check_grads(&g, &out, &[("x", &x), ("weight", &weight), ("bias", &bias)]);
}

#[test]
fn softmax_matches_pytorch() {
    let g = Golden::load("softmax");
    let x = g.tensor("x").requires_grad_();
    let out = x.softmax(-1).unwrap();
    g.assert_close("out", &out);
    check_grads(&g, &out, &[("x", &x)]);
}

#[test]
fn log_softmax_matches_pytorch() {
    let g = Golden::load("log_softmax");
    let x = g.tensor("x").requires_grad_();
    let out = x.log_softmax(-1).unwrap();
    g.assert_close("out", &out);
    check_grads(&g, &out, &[("x", &x)]);
}

#[test]
fn softmax_and_log_softmax_along_other_dims_match_pytorch() {
    // F.softmax(x, dim=0) and F.log_softmax(x, dim=-2) of a [3, 4, 5] x.
    let g = Golden::load("softmax_dim0");
    let x = g.tensor("x").requires_grad_();
    let out = x.softmax(0).unwrap();
    g.assert_close("out", &out);
    check_grads(&g, &out, &[("x", &x)]);
    let g = Golden::load("log_softmax_dim1");
    let x = g.tensor("x").requires_grad_();
    let out = x.log_softmax(-2).unwrap();
    g.assert_close("out", &out);
    check_grads(&g, &out, &[("x", &x)]);
}

#[test]
fn causal_attention_matches_pytorch() {
    let g = Golden::load("attention");
    let q = g.tensor("q").requires_grad_();
    let k = g.tensor("k").requires_grad_();
    let v = g.tensor("v").requires_grad_();
    // kiln's scale is fixed at 1/√D; the case must have been made with it.
    let head_dim = q.dims()[3] as f64;
    assert_eq!(g.meta_f64("scale"), 1.0 / head_dim.sqrt());
    let out = Tensor::causal_attention(&q, &k, &v).unwrap();
    g.assert_close("out", &out);
    check_grads(&g, &out, &[("q", &q), ("k", &k), ("v", &v)]);
}
