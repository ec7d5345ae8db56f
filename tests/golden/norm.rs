//! Batch norm (train and eval, and `nn.BatchNorm2d`'s options), layer norm
//! (over the last dim and over several trailing dims), softmax, log-softmax
//! and causal attention against PyTorch.

use crate::common::Golden;
use kiln::nn::{BatchNorm2d, BatchNorm2dOptions, Init, Module};
use kiln::{DType, Device, Rng, Tensor};

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
fn layer_norm_over_trailing_dims_matches_pytorch() {
    // F.layer_norm(x, (4, 5), weight, bias) and F.layer_norm(x, (3, 4, 5)) of
    // one x [2, 3, 4, 5]; grad_x holds both outputs' contributions.
    let g = Golden::load("layer_norm_trailing_dims");
    let x = g.tensor("x").requires_grad_();
    let weight = g.tensor("weight").requires_grad_();
    let bias = g.tensor("bias").requires_grad_();
    let eps = g.meta_f64("eps");
    let out = x
        .layer_norm_over(&[4, 5], Some(&weight), Some(&bias), eps)
        .unwrap();
    let out_plain = x.layer_norm_over(&[3, 4, 5], None, None, eps).unwrap();
    g.assert_close("out", &out);
    g.assert_close("out_plain", &out_plain);
    let total = out
        .mul(&g.tensor("grad_out"))
        .unwrap()
        .sum_all()
        .unwrap()
        .add(
            &out_plain
                .mul(&g.tensor("grad_out_plain"))
                .unwrap()
                .sum_all()
                .unwrap(),
        )
        .unwrap();
    let grads = total.backward().unwrap();
    for (name, input) in [("x", &x), ("weight", &weight), ("bias", &bias)] {
        g.assert_close(&format!("grad_{name}"), grads.get(input).unwrap());
    }
}

/// A BatchNorm2d of 3 channels in f32 on the CPU, its weight and bias (when
/// affine) set to the case's.
fn batch_norm_module(g: &Golden, options: BatchNorm2dOptions) -> BatchNorm2d {
    let mut rng = Rng::seed(0);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let bn = BatchNorm2d::with_config(3, options, &mut init).unwrap();
    for (name, param) in [("weight", &bn.weight), ("bias", &bn.bias)] {
        if let Some(param) = param {
            param.assign(&g.tensor(name)).unwrap();
        }
    }
    bn
}

/// One forward of `bn` on the case's `x_<suffix>`: checks `out_<suffix>`
/// and the gradients `grad_{x,weight,bias}_<suffix>` (the last two when
/// affine) for the stored `grad_out_<suffix>`.
fn batch_norm_module_step(g: &Golden, bn: &BatchNorm2d, suffix: &str) {
    let x = g.tensor(&format!("x_{suffix}")).requires_grad_();
    let out = bn.forward(&x).unwrap();
    g.assert_close(&format!("out_{suffix}"), &out);
    let grads = out
        .backward_with(&g.tensor(&format!("grad_out_{suffix}")))
        .unwrap();
    g.assert_close(&format!("grad_x_{suffix}"), grads.get(&x).unwrap());
    for (name, param) in [("weight", &bn.weight), ("bias", &bn.bias)] {
        if let Some(param) = param {
            let grad = grads.get(param).unwrap();
            g.assert_close(&format!("grad_{name}_{suffix}"), grad);
        }
    }
}

#[test]
fn batch_norm2d_with_momentum_none_keeps_a_cumulative_average_as_pytorch() {
    // nn.BatchNorm2d(3, momentum=None): three training steps, then eval.
    let g = Golden::load("batch_norm2d_momentum_none");
    let options = BatchNorm2dOptions {
        momentum: None,
        ..BatchNorm2dOptions::default()
    };
    let bn = batch_norm_module(&g, options);
    for step in 1..=3 {
        batch_norm_module_step(&g, &bn, &format!("s{step}"));
        let running = [("mean", &bn.running_mean), ("var", &bn.running_var)];
        for (name, stat) in running {
            let stat = stat.as_ref().unwrap();
            g.assert_close(&format!("running_{name}_s{step}"), stat);
        }
    }
    let tracked = bn.num_batches_tracked.as_ref().unwrap();
    assert_eq!(
        tracked.item().unwrap(),
        g.tensor("num_batches_tracked").item().unwrap()
    );
    bn.eval();
    batch_norm_module_step(&g, &bn, "eval");
    g.assert_close("running_mean_s3", bn.running_mean.as_ref().unwrap());
}

#[test]
fn batch_norm2d_without_running_stats_or_affine_matches_pytorch() {
    let g = Golden::load("batch_norm2d_untracked");
    // track_running_stats=False: batch statistics in training and in eval.
    let untracked = BatchNorm2dOptions {
        track_running_stats: false,
        ..BatchNorm2dOptions::default()
    };
    let bn = batch_norm_module(&g, untracked);
    batch_norm_module_step(&g, &bn, "train");
    bn.eval();
    batch_norm_module_step(&g, &bn, "eval");
    // affine=False, momentum 0.3: one training step, then eval with the
    // running statistics it left.
    let plain = BatchNorm2dOptions {
        momentum: Some(g.meta_f64("momentum_plain")),
        affine: false,
        ..BatchNorm2dOptions::default()
    };
    let bn = batch_norm_module(&g, plain);
    batch_norm_module_step(&g, &bn, "plain_train");
    bn.eval();
    batch_norm_module_step(&g, &bn, "plain_eval");
    g.assert_close("running_mean_plain", bn.running_mean.as_ref().unwrap());
    g.assert_close("running_var_plain", bn.running_var.as_ref().unwrap());
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
