//! Adam's saved state with and without AMSGrad: a round trip through a
//! checkpoint file resumes bit for bit, and a state whose AMSGrad tensor does
//! not fit the optimizer's `amsgrad` is refused whole, naming the parameter.

use std::collections::{BTreeMap, HashMap};

use super::{Adam, AdamConfig, AdamW, Optimizer};
use crate::autograd::GradStore;
use crate::tensor::{DType, Device, Rng, Tensor};

fn params(seed: u64) -> Vec<(String, Tensor)> {
    let mut rng = Rng::seed(seed);
    [("w", vec![3, 4]), ("b", vec![5])]
        .into_iter()
        .map(|(name, dims)| {
            let t = Tensor::randn(dims, DType::F32, Device::Cpu, &mut rng).unwrap();
            (name.to_string(), t)
        })
        .collect()
}

/// A deep copy of each parameter, to restart from.
fn snapshot(params: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    params
        .iter()
        .map(|(name, p)| {
            let copy = Tensor::from_vec(p.to_vec::<f32>().unwrap(), p.dims()).unwrap();
            (name.clone(), copy)
        })
        .collect()
}

/// Gradients that shrink step by step, so that AMSGrad's max of the second
/// moment stays above the second moment itself.
fn steps(optimizer: &mut dyn Optimizer, params: &[(String, Tensor)], from: u64, to: u64) {
    for step in from..to {
        let mut grads = GradStore::default();
        let mut rng = Rng::seed(100 + step);
        for (_, p) in params {
            let g = Tensor::randn(p.dims(), DType::F32, Device::Cpu, &mut rng).unwrap();
            grads.insert(p, g.mul_scalar(1.0 / (1 + step * step) as f64).unwrap());
        }
        optimizer.step(&grads).unwrap();
    }
}

fn bits(t: &Tensor) -> Vec<u64> {
    t.to_f64_vec().into_iter().map(f64::to_bits).collect()
}

fn state_bits(optimizer: &dyn Optimizer) -> BTreeMap<String, Vec<u64>> {
    optimizer
        .state_dict()
        .into_iter()
        .map(|(name, t)| (name, bits(&t)))
        .collect()
}

fn amsgrad_config() -> AdamConfig {
    AdamConfig {
        lr: 0.05,
        betas: (0.9, 0.8),
        weight_decay: 0.1,
        amsgrad: true,
        maximize: true,
        ..AdamConfig::adam()
    }
}

#[test]
fn amsgrad_state_round_trips_through_a_checkpoint_bit_for_bit() {
    let dir = std::env::temp_dir().join(format!("kiln-amsgrad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("optim.safetensors");
    let config = amsgrad_config();

    let uninterrupted = params(1);
    let mut optimizer = AdamW::new(uninterrupted.clone(), config).unwrap();
    steps(&mut optimizer, &uninterrupted, 0, 3);
    let saved = optimizer.state_dict();
    for name in ["w", "b"] {
        let state: HashMap<_, _> = saved.iter().cloned().collect();
        let (v, v_max) = (
            &state[&format!("{name}.exp_avg_sq")],
            &state[&format!("{name}.max_exp_avg_sq")],
        );
        assert_ne!(bits(v), bits(v_max), "{name}: the max has fallen behind");
    }
    crate::checkpoint::save(&path, &saved, &BTreeMap::new()).unwrap();
    let restart = snapshot(&uninterrupted);
    steps(&mut optimizer, &uninterrupted, 3, 6);

    let mut resumed = AdamW::new(restart.clone(), config).unwrap();
    let loaded = crate::checkpoint::load(&path).unwrap().tensors;
    resumed.load_state_dict(&loaded).unwrap();
    steps(&mut resumed, &restart, 3, 6);
    std::fs::remove_dir_all(&dir).unwrap();

    for ((name, a), (_, b)) in uninterrupted.iter().zip(&restart) {
        assert_eq!(bits(a), bits(b), "{name}");
    }
    assert_eq!(state_bits(&optimizer), state_bits(&resumed));
}

/// Three steps of Adam with `amsgrad`, its state and parameters.
fn stepped(amsgrad: bool) -> (Adam, HashMap<String, Tensor>) {
    let config = AdamConfig {
        amsgrad,
        ..amsgrad_config()
    };
    let p = params(2);
    let mut optimizer = Adam::new(p.clone(), config).unwrap();
    steps(&mut optimizer, &p, 0, 3);
    let state = optimizer.state_dict().into_iter().collect();
    (optimizer, state)
}

#[test]
fn a_state_saved_without_amsgrad_is_refused_by_amsgrad_and_loads_without() {
    let (_, plain_state) = stepped(false);
    let (mut amsgrad, amsgrad_state) = stepped(true);
    let before = state_bits(&amsgrad);
    let err = amsgrad
        .load_state_dict(&plain_state)
        .unwrap_err()
        .to_string();
    for words in [
        "Adam",
        "w.max_exp_avg_sq is missing",
        "b.max_exp_avg_sq is missing",
        "amsgrad: false",
        "nothing was loaded",
    ] {
        assert!(err.contains(words), "{words:?} not in {err}");
    }
    assert_eq!(state_bits(&amsgrad), before, "nothing loaded");

    // The same state resumes an optimizer without AMSGrad, as before.
    let (mut plain, _) = stepped(false);
    plain.load_state_dict(&plain_state).unwrap();
    // An AMSGrad state whose max is missing for one parameter only is
    // refused the same way.
    let mut partial = amsgrad_state.clone();
    partial.remove("b.max_exp_avg_sq");
    let err = amsgrad.load_state_dict(&partial).unwrap_err().to_string();
    assert!(err.contains("b.max_exp_avg_sq is missing"), "{err}");
    assert!(!err.contains("w.max_exp_avg_sq"), "{err}");
}

#[test]
fn an_amsgrad_state_is_refused_by_an_optimizer_without_amsgrad() {
    let (_, amsgrad_state) = stepped(true);
    let (mut plain, _) = stepped(false);
    let before = state_bits(&plain);
    let err = plain
        .load_state_dict(&amsgrad_state)
        .unwrap_err()
        .to_string();
    for words in [
        "w.max_exp_avg_sq is AMSGrad state",
        "b.max_exp_avg_sq is AMSGrad state",
        "amsgrad: true",
        "nothing was loaded",
    ] {
        assert!(err.contains(words), "{words:?} not in {err}");
    }
    assert_eq!(state_bits(&plain), before, "nothing loaded");
    // A max of the wrong shape is named as such.
    let (mut amsgrad, _) = stepped(true);
    let mut bad = amsgrad_state.clone();
    bad.insert(
        "w.max_exp_avg_sq".into(),
        Tensor::zeros([4, 3], DType::F32, Device::Cpu).unwrap(),
    );
    let err = amsgrad.load_state_dict(&bad).unwrap_err().to_string();
    assert!(err.contains("w.max_exp_avg_sq has shape"), "{err}");
}
