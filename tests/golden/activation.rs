use crate::common::Golden;
use kiln::{GeluApproximation, Tensor};

/// Runs `f`, checks `out`, backpropagates the stored `grad_out`, checks `grad_x`.
fn check_pointwise(case: &str, f: impl Fn(&Tensor) -> kiln::Result<Tensor>) {
    let g = Golden::load(case);
    let x = g.tensor("x").requires_grad_();
    let out = f(&x).unwrap();
    g.assert_close("out", &out);
    let grads = out.backward_with(&g.tensor("grad_out")).unwrap();
    g.assert_close("grad_x", grads.get(&x).unwrap());
}

#[test]
fn leaky_relu_matches_pytorch() {
    let slope = Golden::load("leaky_relu").meta_f64("slope");
    check_pointwise("leaky_relu", |x| x.leaky_relu(slope));
}

#[test]
fn exact_gelu_matches_pytorch() {
    check_pointwise("gelu_none", |x| x.gelu(GeluApproximation::None));
}

#[test]
fn tanh_gelu_matches_pytorch() {
    check_pointwise("gelu_tanh", |x| x.gelu(GeluApproximation::Tanh));
}
