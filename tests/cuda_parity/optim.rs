//! Adam/AdamW's `amsgrad` and `maximize` and SGD's `maximize` on CUDA
//! against the CPU reference: parameters and every state tensor after five
//! steps (atol 1e-6 + rtol 1e-5, as the other optimizer tests: the device
//! may fuse a·b + c into one rounding), and the bf16 forward copies the
//! fused AMSGrad update writes.

use std::collections::HashMap;

use kiln::optim::{Adam, AdamConfig, AdamW, ForwardCopies, Optimizer, Sgd, SgdConfig};
use kiln::{DType, Device, GradStore, Tensor};

use crate::common::{assert_close, cuda_or_skip, randn};

const ATOL: f64 = 1e-6;
const RTOL: f64 = 1e-5;

/// One parameter longer than the CPU's update chunk (2¹⁴ elements), so the
/// chunked CPU update of the AMSGrad buffer is exercised across chunks.
const PARAM_SHAPES: [&[usize]; 3] = [&[37, 129], &[20011], &[3, 5, 7]];

fn params_on(device: Device, seed: u64) -> Vec<(String, Tensor)> {
    PARAM_SHAPES
        .iter()
        .enumerate()
        .map(|(k, shape)| {
            let p = randn(shape, seed + k as u64).to_device(device).unwrap();
            (format!("p{k}"), p.detach().requires_grad_())
        })
        .collect()
}

/// The gradients of step `step`, shrinking by 1/(1 + step): with β2 = 0.8,
/// exp_avg_sq then falls below its running max for many elements, so
/// AMSGrad's max is what divides the step.
fn shrinking_grads(params: &[(String, Tensor)], step: u64) -> GradStore {
    let mut grads = GradStore::default();
    for (k, (_, p)) in params.iter().enumerate() {
        let g = randn(p.dims(), 500 + 10 * step + k as u64)
            .mul_scalar(1.0 / (1 + step) as f64)
            .unwrap()
            .to_device(p.device())
            .unwrap();
        grads.insert(p, g);
    }
    grads
}

type Make = fn(Vec<(String, Tensor)>, AdamConfig) -> Box<dyn Optimizer>;

fn adam(params: Vec<(String, Tensor)>, config: AdamConfig) -> Box<dyn Optimizer> {
    Box::new(Adam::new(params, config).unwrap())
}

fn adamw(params: Vec<(String, Tensor)>, config: AdamConfig) -> Box<dyn Optimizer> {
    Box::new(AdamW::new(params, config).unwrap())
}

fn config(amsgrad: bool, maximize: bool) -> AdamConfig {
    AdamConfig {
        lr: 1e-2,
        betas: (0.9, 0.8),
        weight_decay: 0.1,
        amsgrad,
        maximize,
        ..AdamConfig::adam()
    }
}

/// Five steps on CPU and CUDA copies of the same parameters; compares the
/// parameters and the whole state, and returns the CPU state.
fn five_steps_match(
    what: &str,
    dev: Device,
    make: &dyn Fn(Vec<(String, Tensor)>) -> Box<dyn Optimizer>,
) -> HashMap<String, Tensor> {
    let cpu_params = params_on(Device::Cpu, 31);
    let cuda_params = params_on(dev, 31);
    let mut cpu_optimizer = make(cpu_params.clone());
    let mut cuda_optimizer = make(cuda_params.clone());
    for step in 0..5 {
        cpu_optimizer
            .step(&shrinking_grads(&cpu_params, step))
            .unwrap();
        cuda_optimizer
            .step(&shrinking_grads(&cuda_params, step))
            .unwrap();
    }
    for ((name, cpu), (_, cuda)) in cpu_params.iter().zip(&cuda_params) {
        assert_close(&format!("{what} {name}"), cpu, cuda, ATOL, RTOL);
    }
    let cpu_state: HashMap<String, Tensor> = cpu_optimizer.state_dict().into_iter().collect();
    let cuda_state: HashMap<String, Tensor> = cuda_optimizer.state_dict().into_iter().collect();
    let mut keys: Vec<&String> = cpu_state.keys().collect();
    keys.sort();
    let mut cuda_keys: Vec<&String> = cuda_state.keys().collect();
    cuda_keys.sort();
    assert_eq!(keys, cuda_keys, "{what}: state entries");
    for key in keys {
        let (cpu, cuda) = (&cpu_state[key], &cuda_state[key]);
        if key.ends_with(".step") {
            assert_eq!(cpu.item().unwrap(), cuda.item().unwrap(), "{what} {key}");
        } else {
            assert_close(&format!("{what} {key}"), cpu, cuda, ATOL, RTOL);
        }
    }
    cpu_state
}

/// Elements where AMSGrad's max differs from the second moment.
fn lagging(state: &HashMap<String, Tensor>, param: &str) -> usize {
    let v = state[&format!("{param}.exp_avg_sq")].to_f64_vec();
    let v_max = state[&format!("{param}.max_exp_avg_sq")].to_f64_vec();
    v.iter().zip(&v_max).filter(|(a, b)| a != b).count()
}

#[test]
fn adam_amsgrad_and_maximize_five_steps_match_cpu() {
    let Some(dev) = cuda_or_skip("adam amsgrad/maximize") else {
        return;
    };
    let cases: [(&str, Make, bool, bool); 4] = [
        ("adam amsgrad", adam, true, false),
        ("adam maximize", adam, false, true),
        ("adamw maximize", adamw, false, true),
        ("adamw amsgrad maximize", adamw, true, true),
    ];
    for (what, make, amsgrad, maximize) in cases {
        let state = five_steps_match(what, dev, &|params| make(params, config(amsgrad, maximize)));
        for (name, _) in params_on(Device::Cpu, 0) {
            let key = format!("{name}.max_exp_avg_sq");
            assert_eq!(state.contains_key(&key), amsgrad, "{what} {key}");
            if amsgrad {
                // The test only checks the max if the max matters.
                assert!(lagging(&state, &name) > 0, "{what} {name}: max never lags");
            }
        }
    }
}

#[test]
fn sgd_maximize_five_steps_match_cpu() {
    let Some(dev) = cuda_or_skip("sgd maximize") else {
        return;
    };
    let config = SgdConfig {
        momentum: 0.9,
        weight_decay: 1e-2,
        maximize: true,
        ..SgdConfig::new(0.05)
    };
    five_steps_match("sgd maximize", dev, &|params| {
        Box::new(Sgd::new(params, config).unwrap())
    });
}

/// The bits of a tensor's values, widened to f64 (exact for every float dtype).
fn value_bits(t: &Tensor) -> Vec<u64> {
    t.to_f64_vec().into_iter().map(f64::to_bits).collect()
}

/// The fused AMSGrad update writes the bf16 forward copy of its f32 master
/// weights on CUDA as on the CPU, to nearest even or stochastically.
#[test]
fn amsgrad_writes_bf16_forward_copies_as_the_cpu_does() {
    let Some(dev) = cuda_or_skip("amsgrad forward copies") else {
        return;
    };
    for copies in [
        ForwardCopies::nearest_even(DType::BF16),
        ForwardCopies::stochastic_bf16(5),
    ] {
        let what = format!("adamw amsgrad maximize {copies:?}");
        let cpu_params = params_on(Device::Cpu, 41);
        let cuda_params = params_on(dev, 41);
        let mut cpu_optimizer = adamw(cpu_params.clone(), config(true, true));
        let mut cuda_optimizer = adamw(cuda_params.clone(), config(true, true));
        for optimizer in [&mut cpu_optimizer, &mut cuda_optimizer] {
            optimizer.keep_forward_copies(Some(copies)).unwrap();
        }
        for step in 0..3 {
            cpu_optimizer
                .step(&shrinking_grads(&cpu_params, step))
                .unwrap();
            cuda_optimizer
                .step(&shrinking_grads(&cuda_params, step))
                .unwrap();
        }
        for ((name, cpu), (_, cuda)) in cpu_params.iter().zip(&cuda_params) {
            assert_close(&format!("{what} {name}"), cpu, cuda, ATOL, RTOL);
            let cuda_copy = cuda.forward_copy().expect("a copy on CUDA");
            assert_eq!(cuda_copy.device(), dev, "{what} {name}");
            assert_eq!(cuda_copy.dtype(), DType::BF16, "{what} {name}");
            let cuda_copy = value_bits(&cuda_copy);
            let cpu_copy = value_bits(&cpu.forward_copy().expect("a copy on the CPU"));
            let (cpu_values, cuda_values) = (value_bits(cpu), value_bits(cuda));
            let mut compared = 0;
            for i in 0..cpu_values.len() {
                if cpu_values[i] == cuda_values[i] {
                    assert_eq!(cpu_copy[i], cuda_copy[i], "{what} {name}[{i}]");
                    compared += 1;
                }
            }
            assert!(
                compared * 10 >= cpu_values.len() * 9,
                "{what} {name}: only {compared} of {} values agree",
                cpu_values.len()
            );
            if copies == ForwardCopies::nearest_even(DType::BF16) {
                let nearest = value_bits(&cuda.to_dtype(DType::BF16).unwrap());
                assert_eq!(cuda_copy, nearest, "{what} {name}: rounded to nearest even");
            }
        }
    }
}

/// A NaN second moment stays in AMSGrad's max on both devices, as
/// `torch.maximum` propagates NaN (a plain max would keep the old value).
#[test]
fn amsgrad_max_keeps_a_nan_second_moment_as_torch_maximum_does() {
    let Some(dev) = cuda_or_skip("amsgrad nan") else {
        return;
    };
    for device in [Device::Cpu, dev] {
        let p = Tensor::from_vec(vec![0.5f32, -0.5], [2])
            .unwrap()
            .to_device(device)
            .unwrap()
            .requires_grad_();
        let mut optimizer = adam(vec![("p".into(), p.clone())], config(true, false));
        for g in [[f32::NAN, 1.0], [1.0, 1.0]] {
            let mut grads = GradStore::default();
            let g = Tensor::from_vec(g.to_vec(), [2]).unwrap();
            grads.insert(&p, g.to_device(device).unwrap());
            optimizer.step(&grads).unwrap();
        }
        let state: HashMap<String, Tensor> = optimizer.state_dict().into_iter().collect();
        let v = state["p.exp_avg_sq"].to_f64_vec();
        let v_max = state["p.max_exp_avg_sq"].to_f64_vec();
        assert!(v[0].is_nan() && v_max[0].is_nan(), "{device:?}: {v_max:?}");
        assert_eq!(v[1], v_max[1], "{device:?}");
    }
}
