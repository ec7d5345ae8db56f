//! SGD (momentum, weight decay, maximize), Adam (L2 weight decay) and AdamW
//! (decoupled weight decay), with and without `amsgrad` and `maximize`,
//! against three steps of `torch.optim` on the same gradients.

use crate::common::Golden;
use kiln::optim::{Adam, AdamConfig, AdamW, Optimizer, Sgd, SgdConfig};
use kiln::{GradStore, Tensor};

/// A parameter with its own storage (the optimizer updates it in place, so
/// it must not share the golden file's tensor).
fn fresh_param(g: &Golden, name: &str) -> Tensor {
    let stored = g.tensor(name);
    Tensor::from_vec(stored.to_vec::<f32>().unwrap(), stored.dims())
        .unwrap()
        .requires_grad_()
}

/// Runs the stored three steps with `make` and checks both parameters after
/// each; returns the optimizer's final state by name.
fn run_three_steps(
    g: &Golden,
    make: impl FnOnce(Vec<(String, Tensor)>) -> Box<dyn Optimizer>,
) -> std::collections::HashMap<String, Tensor> {
    let a = fresh_param(g, "param_a");
    let b = fresh_param(g, "param_b");
    let mut optimizer = make(vec![("a".into(), a.clone()), ("b".into(), b.clone())]);
    for step in 1..=3 {
        let mut grads = GradStore::default();
        grads.insert(&a, g.tensor(&format!("grad_a_s{step}")));
        grads.insert(&b, g.tensor(&format!("grad_b_s{step}")));
        optimizer.step(&grads).unwrap();
        g.assert_close(&format!("param_a_s{step}"), &a);
        g.assert_close(&format!("param_b_s{step}"), &b);
    }
    optimizer.state_dict().into_iter().collect()
}

fn adam_config(g: &Golden) -> AdamConfig {
    AdamConfig {
        lr: g.meta_f64("lr"),
        betas: (g.meta_f64("beta1"), g.meta_f64("beta2")),
        eps: g.meta_f64("eps"),
        weight_decay: g.meta_f64("weight_decay"),
        ..AdamConfig::adam()
    }
}

/// A "true"/"false" metadata flag.
fn meta_flag(g: &Golden, key: &str) -> bool {
    match g.meta(key) {
        "true" => true,
        "false" => false,
        other => panic!("{key}: {other} is not a flag"),
    }
}

/// The config of a case that records `amsgrad` and `maximize`.
fn adam_options_config(g: &Golden) -> AdamConfig {
    AdamConfig {
        amsgrad: meta_flag(g, "amsgrad"),
        maximize: meta_flag(g, "maximize"),
        ..adam_config(g)
    }
}

/// The moments, and AMSGrad's running max exactly when the case stored one.
fn check_adam_state(g: &Golden, state: &std::collections::HashMap<String, Tensor>) {
    for p in ["a", "b"] {
        let max_key = format!("{p}.max_exp_avg_sq");
        if g.has(&format!("max_exp_avg_sq_{p}")) {
            g.assert_close(&format!("max_exp_avg_sq_{p}"), &state[&max_key]);
        } else {
            assert!(!state.contains_key(&max_key), "{max_key} without amsgrad");
        }
        g.assert_close(&format!("exp_avg_{p}"), &state[&format!("{p}.exp_avg")]);
        g.assert_close(
            &format!("exp_avg_sq_{p}"),
            &state[&format!("{p}.exp_avg_sq")],
        );
        assert_eq!(state[&format!("{p}.step")].item().unwrap(), 3.0);
    }
}

#[test]
fn adam_with_l2_weight_decay_matches_pytorch_over_three_steps() {
    let g = Golden::load("adam");
    let config = adam_config(&g);
    let state = run_three_steps(&g, |params| Box::new(Adam::new(params, config).unwrap()));
    check_adam_state(&g, &state);
}

#[test]
fn adamw_with_decoupled_weight_decay_matches_pytorch_over_three_steps() {
    let g = Golden::load("adamw");
    let config = adam_config(&g);
    let state = run_three_steps(&g, |params| Box::new(AdamW::new(params, config).unwrap()));
    check_adam_state(&g, &state);
}

#[test]
fn adam_with_amsgrad_matches_pytorch_over_three_steps() {
    let g = Golden::load("adam_amsgrad");
    let config = adam_options_config(&g);
    assert!(config.amsgrad && !config.maximize);
    let state = run_three_steps(&g, |params| Box::new(Adam::new(params, config).unwrap()));
    check_adam_state(&g, &state);
}

#[test]
fn adam_maximize_negates_the_gradient_before_l2_weight_decay_as_pytorch() {
    let g = Golden::load("adam_maximize");
    let config = adam_options_config(&g);
    assert!(!config.amsgrad && config.maximize);
    let state = run_three_steps(&g, |params| Box::new(Adam::new(params, config).unwrap()));
    check_adam_state(&g, &state);
}

#[test]
fn adamw_with_amsgrad_and_maximize_matches_pytorch_over_three_steps() {
    let g = Golden::load("adamw_amsgrad_maximize");
    let config = adam_options_config(&g);
    assert!(config.amsgrad && config.maximize);
    let state = run_three_steps(&g, |params| Box::new(AdamW::new(params, config).unwrap()));
    check_adam_state(&g, &state);
}

#[test]
fn sgd_with_momentum_and_weight_decay_matches_pytorch_over_three_steps() {
    let g = Golden::load("sgd_momentum");
    assert_eq!(g.meta("nesterov"), "false");
    let config = SgdConfig {
        momentum: g.meta_f64("momentum"),
        dampening: g.meta_f64("dampening"),
        weight_decay: g.meta_f64("weight_decay"),
        ..SgdConfig::new(g.meta_f64("lr"))
    };
    let state = run_three_steps(&g, |params| Box::new(Sgd::new(params, config).unwrap()));
    for p in ["a", "b"] {
        g.assert_close(
            &format!("momentum_buffer_{p}"),
            &state[&format!("{p}.momentum_buffer")],
        );
    }
}

#[test]
fn sgd_maximize_with_momentum_and_weight_decay_matches_pytorch_over_three_steps() {
    let g = Golden::load("sgd_maximize");
    assert_eq!(g.meta("nesterov"), "false");
    let config = SgdConfig {
        momentum: g.meta_f64("momentum"),
        dampening: g.meta_f64("dampening"),
        weight_decay: g.meta_f64("weight_decay"),
        maximize: meta_flag(&g, "maximize"),
        ..SgdConfig::new(g.meta_f64("lr"))
    };
    assert!(config.maximize);
    let state = run_three_steps(&g, |params| Box::new(Sgd::new(params, config).unwrap()));
    for p in ["a", "b"] {
        g.assert_close(
            &format!("momentum_buffer_{p}"),
            &state[&format!("{p}.momentum_buffer")],
        );
    }
}
