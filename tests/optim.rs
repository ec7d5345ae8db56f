//! Optimizers on a small training problem, their bookkeeping (parameters
//! without gradients, wrong gradient shapes, learning-rate changes, updates
//! across parallel chunks) and gradient clipping. The update rules
//! themselves are pinned to torch.optim by the golden tests.

use std::collections::HashMap;

use kiln::nn::{Init, Linear, Module, Sequential, Tanh};
use kiln::optim::{Adam, AdamConfig, Optimizer, Sgd, SgdConfig, clip_grad_norm};
use kiln::{DType, Device, GradStore, Reduction, Rng, Tensor};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

// ----- training -----------------------------------------------------------------

#[test]
fn mlp_fits_sine_with_adam_below_1e_3_mse() {
    let mut rng = Rng::seed(0);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let model = Sequential::new()
        .with(Linear::new(1, 32, true, &mut init).unwrap())
        .with(Tanh)
        .with(Linear::new(32, 1, true, &mut init).unwrap());
    let points = 64;
    let xs: Vec<f32> = (0..points)
        .map(|i| -1.0 + 2.0 * i as f32 / (points - 1) as f32)
        .collect();
    let ys: Vec<f32> = xs.iter().map(|x| (3.0 * x).sin()).collect();
    let x = Tensor::from_vec(xs, [points, 1]).unwrap();
    let y = Tensor::from_vec(ys, [points, 1]).unwrap();
    let config = AdamConfig {
        lr: 0.05,
        ..AdamConfig::adam()
    };
    let mut optimizer = Adam::new(model.named_parameters(), config).unwrap();
    let mut mse = f64::INFINITY;
    let mut steps = 0;
    while steps < 500 && mse >= 1e-3 {
        let loss = model
            .forward(&x)
            .unwrap()
            .mse_loss(&y, Reduction::Mean)
            .unwrap();
        mse = loss.item().unwrap();
        if steps % 25 == 0 {
            println!("step {steps:4}  mse {mse:.6}");
        }
        let grads = loss.backward().unwrap();
        optimizer.step(&grads).unwrap();
        steps += 1;
    }
    println!("step {steps:4}  mse {mse:.6} (done)");
    assert!(mse < 1e-3, "MSE {mse} after {steps} steps");
}

// ----- optimizer behaviour ------------------------------------------------------

#[test]
fn optimizer_skips_parameters_without_gradient_and_leaves_their_state_alone() {
    let a = Tensor::from_vec(vec![1.0f32, 2.0], [2])
        .unwrap()
        .requires_grad_();
    let b = Tensor::from_vec(vec![3.0f32], [1])
        .unwrap()
        .requires_grad_();
    let mut adam = Adam::new(
        vec![("a".into(), a.clone()), ("b".into(), b.clone())],
        AdamConfig::adam(),
    )
    .unwrap();
    let mut grads = GradStore::default();
    grads.insert(&a, Tensor::from_vec(vec![0.5f32, -0.5], [2]).unwrap());
    adam.step(&grads).unwrap();
    adam.step(&grads).unwrap();
    assert_eq!(b.to_f64_vec(), [3.0]);
    let state: HashMap<String, Tensor> = adam.state_dict().into_iter().collect();
    let mut keys: Vec<&str> = state.keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["a.exp_avg", "a.exp_avg_sq", "a.step"]);
    assert_eq!(state["a.step"].item().unwrap(), 2.0);
    // Adam's first step moves every coordinate by lr against the gradient sign.
    let moved = a.to_f64_vec();
    assert!(moved[0] < 1.0 && moved[1] > 2.0);
}

#[test]
fn sgd_nesterov_matches_hand_computed_steps() {
    let p = Tensor::from_vec(vec![1.0f64], [1])
        .unwrap()
        .requires_grad_();
    let config = SgdConfig {
        momentum: 0.9,
        nesterov: true,
        ..SgdConfig::new(0.1)
    };
    let mut sgd = Sgd::new(vec![("p".into(), p.clone())], config).unwrap();
    let mut grads = GradStore::default();
    grads.insert(&p, Tensor::from_vec(vec![0.5f64], [1]).unwrap());
    // buf = 0.5, d = 0.5 + 0.9·0.5 = 0.95, p = 1 − 0.095
    sgd.step(&grads).unwrap();
    assert!(close(p.item().unwrap(), 0.905, 1e-15));
    // buf = 0.9·0.5 + 0.5 = 0.95, d = 0.5 + 0.9·0.95 = 1.355, p = 0.905 − 0.1355
    sgd.step(&grads).unwrap();
    assert!(close(p.item().unwrap(), 0.7695, 1e-15));
    let nesterov_without_momentum = SgdConfig {
        nesterov: true,
        ..SgdConfig::new(0.1)
    };
    assert!(Sgd::new(vec![("p".into(), p)], nesterov_without_momentum).is_err());
}

#[test]
fn optimizer_rejects_a_gradient_of_the_wrong_shape_naming_the_parameter() {
    let w = Tensor::zeros([2, 3], DType::F32, Device::Cpu)
        .unwrap()
        .requires_grad_();
    let mut sgd = Sgd::new(
        vec![("layer.weight".into(), w.clone())],
        SgdConfig::new(0.1),
    )
    .unwrap();
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::zeros([3, 2], DType::F32, Device::Cpu).unwrap());
    let err = sgd.step(&grads).unwrap_err().to_string();
    assert!(
        err.contains("layer.weight") && err.contains("[3, 2]"),
        "{err}"
    );
}

#[test]
fn learning_rate_can_be_changed_between_steps() {
    let p = Tensor::from_vec(vec![0.0f64], [1])
        .unwrap()
        .requires_grad_();
    let mut sgd = Sgd::new(vec![("p".into(), p.clone())], SgdConfig::new(1.0)).unwrap();
    let mut grads = GradStore::default();
    grads.insert(&p, Tensor::from_vec(vec![1.0f64], [1]).unwrap());
    sgd.set_learning_rate(0.25);
    assert_eq!(sgd.learning_rate(), 0.25);
    sgd.step(&grads).unwrap();
    assert_eq!(p.item().unwrap(), -0.25);
}

// ----- gradient clipping --------------------------------------------------------

#[test]
fn clip_grad_norm_scales_all_gradients_to_max_norm_and_returns_the_old_norm() {
    let a = Tensor::zeros([2], DType::F64, Device::Cpu)
        .unwrap()
        .requires_grad_();
    let b = Tensor::zeros([1], DType::F64, Device::Cpu)
        .unwrap()
        .requires_grad_();
    let other = Tensor::zeros([1], DType::F64, Device::Cpu)
        .unwrap()
        .requires_grad_();
    let mut grads = GradStore::default();
    grads.insert(&a, Tensor::from_vec(vec![3.0f64, 4.0], [2]).unwrap());
    grads.insert(&b, Tensor::from_vec(vec![12.0f64], [1]).unwrap());
    grads.insert(&other, Tensor::from_vec(vec![100.0f64], [1]).unwrap());

    // Joint norm √(9 + 16 + 144) = 13; `other` is not among the clipped params.
    let norm = clip_grad_norm(&mut grads, &[a.clone(), b.clone()], 6.5).unwrap();
    assert_eq!(norm, 13.0);
    let coef = 6.5 / (13.0 + 1e-6);
    let ga = grads.get(&a).unwrap().to_f64_vec();
    let gb = grads.get(&b).unwrap().to_f64_vec();
    assert!(close(ga[0], 3.0 * coef, 1e-12) && close(ga[1], 4.0 * coef, 1e-12));
    assert!(close(gb[0], 12.0 * coef, 1e-12));
    assert_eq!(grads.get(&other).unwrap().to_f64_vec(), [100.0]);
    let clipped = (ga[0] * ga[0] + ga[1] * ga[1] + gb[0] * gb[0]).sqrt();
    assert!(close(clipped, 6.5, 1e-6));

    // Under the limit: nothing changes.
    let norm = clip_grad_norm(&mut grads, &[a.clone(), b.clone()], 100.0).unwrap();
    assert!(close(norm, 6.5, 1e-6));
    assert_eq!(grads.get(&a).unwrap().to_f64_vec(), ga);
    assert!(clip_grad_norm(&mut grads, &[a], -1.0).is_err());
}

#[test]
fn updates_reach_every_element_of_a_parameter_larger_than_one_parallel_chunk() {
    let n = 50_001;
    let p = Tensor::zeros([n], DType::F32, Device::Cpu)
        .unwrap()
        .requires_grad_();
    let grad: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
    let mut grads = GradStore::default();
    grads.insert(&p, Tensor::from_vec(grad.clone(), [n]).unwrap());
    let mut adam = Adam::new(vec![("p".into(), p.clone())], AdamConfig::adam()).unwrap();
    adam.step(&grads).unwrap();
    // First Adam step: p = −lr · g / (|g| + eps), i.e. −lr · sign(g).
    for (i, (v, g)) in p.to_vec::<f32>().unwrap().iter().zip(&grad).enumerate() {
        let want = if *g == 0.0 { 0.0 } else { -1e-3 * g.signum() };
        assert!(close(*v as f64, want as f64, 1e-8), "element {i}: {v}");
    }
}
