//! Optimizer updates on CUDA against the CPU reference: SGD (momentum,
//! Nesterov, maximize), Adam and AdamW (weight decay, amsgrad, maximize),
//! their bf16/f16 forward copies, gradient clipping and the loss scaler.
//!
//! Parameters and state after 5 steps: atol 1e-6 + rtol 1e-5 (the device
//! may fuse a·b + c into one rounding, so the last bit can differ).

use std::collections::HashMap;

use kiln::optim::{
    Adam, AdamConfig, AdamW, ForwardCopies, GradScaler, GradScalerConfig, Optimizer, Sgd,
    SgdConfig, clip_grad_norm,
};
use kiln::{DType, Device, GradStore, Tensor};

use crate::common::{assert_close, cuda_or_skip, randn};

const ATOL: f64 = 1e-6;
const RTOL: f64 = 1e-5;

/// One parameter longer than the CPU's update chunk (2¹⁴ elements), so the
/// chunked CPU updates are exercised across chunks.
const PARAM_SHAPES: [&[usize]; 3] = [&[37, 129], &[20011], &[3, 5, 7]];

/// Named parameters on `device`: the same values for the same seed.
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

/// The gradients of step `step` (the same values on every device),
/// shrinking by 1/(1 + step): with β2 = 0.8, exp_avg_sq then falls below
/// its running max for many elements, so AMSGrad's max is what divides the
/// step.
fn grads_for(params: &[(String, Tensor)], step: u64) -> GradStore {
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

fn sgd(params: Vec<(String, Tensor)>, config: SgdConfig) -> Box<dyn Optimizer> {
    Box::new(Sgd::new(params, config).unwrap())
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
        cpu_optimizer.step(&grads_for(&cpu_params, step)).unwrap();
        cuda_optimizer.step(&grads_for(&cuda_params, step)).unwrap();
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

#[test]
fn adam_with_l2_weight_decay_five_steps_match_cpu() {
    let Some(dev) = cuda_or_skip("adam") else {
        return;
    };
    let config = AdamConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        ..AdamConfig::adam()
    };
    five_steps_match("adam", dev, &|params| adam(params, config));
}

#[test]
fn adamw_with_decoupled_weight_decay_five_steps_match_cpu() {
    let Some(dev) = cuda_or_skip("adamw") else {
        return;
    };
    let config = AdamConfig {
        lr: 1e-2,
        ..AdamConfig::adamw()
    };
    five_steps_match("adamw", dev, &|params| adamw(params, config));
}

#[test]
fn sgd_with_momentum_five_steps_match_cpu() {
    let Some(dev) = cuda_or_skip("sgd momentum") else {
        return;
    };
    let config = SgdConfig {
        momentum: 0.9,
        dampening: 0.1,
        weight_decay: 1e-2,
        ..SgdConfig::new(0.05)
    };
    five_steps_match("sgd momentum", dev, &|params| sgd(params, config));
    let nesterov = SgdConfig {
        momentum: 0.9,
        nesterov: true,
        ..SgdConfig::new(0.05)
    };
    five_steps_match("sgd nesterov", dev, &|params| sgd(params, nesterov));
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
    five_steps_match("sgd maximize", dev, &|params| sgd(params, config));
}

/// The bits of a tensor's values, widened to f64 (exact for every float dtype).
fn value_bits(t: &Tensor) -> Vec<u64> {
    t.to_f64_vec().into_iter().map(f64::to_bits).collect()
}

/// The fused updates (AMSGrad's included) write each parameter's forward
/// copy on CUDA as on the CPU: to nearest even (bf16 and f16), or
/// stochastically with the same random bits, so wherever the two devices'
/// updated values agree (all but the last-bit differences of fused
/// multiply-adds) their copies agree too.
#[test]
fn fused_updates_write_forward_copies_as_the_cpu_does() {
    let Some(dev) = cuda_or_skip("forward copies") else {
        return;
    };
    type MakeWithCopies = fn(Vec<(String, Tensor)>) -> Box<dyn Optimizer>;
    let plain_adamw: MakeWithCopies = |params| adamw(params, AdamConfig::adamw());
    let amsgrad_adamw: MakeWithCopies = |params| adamw(params, config(true, true));
    let momentum_sgd: MakeWithCopies = |params| {
        let config = SgdConfig {
            momentum: 0.9,
            ..SgdConfig::new(0.05)
        };
        sgd(params, config)
    };
    let cases = [
        (
            "adamw bf16",
            plain_adamw,
            ForwardCopies::nearest_even(DType::BF16),
        ),
        (
            "adamw f16",
            plain_adamw,
            ForwardCopies::nearest_even(DType::F16),
        ),
        (
            "adamw stochastic",
            plain_adamw,
            ForwardCopies::stochastic_bf16(9),
        ),
        (
            "adamw amsgrad maximize bf16",
            amsgrad_adamw,
            ForwardCopies::nearest_even(DType::BF16),
        ),
        (
            "adamw amsgrad maximize stochastic",
            amsgrad_adamw,
            ForwardCopies::stochastic_bf16(5),
        ),
        (
            "sgd bf16",
            momentum_sgd,
            ForwardCopies::nearest_even(DType::BF16),
        ),
    ];
    for (what, make, copies) in cases {
        let cpu_params = params_on(Device::Cpu, 13);
        let cuda_params = params_on(dev, 13);
        let mut cpu_optimizer = make(cpu_params.clone());
        let mut cuda_optimizer = make(cuda_params.clone());
        for optimizer in [&mut cpu_optimizer, &mut cuda_optimizer] {
            optimizer.keep_forward_copies(Some(copies)).unwrap();
        }
        for step in 0..3 {
            cpu_optimizer.step(&grads_for(&cpu_params, step)).unwrap();
            cuda_optimizer.step(&grads_for(&cuda_params, step)).unwrap();
        }
        for ((name, cpu), (_, cuda)) in cpu_params.iter().zip(&cuda_params) {
            assert_close(&format!("{what} {name}"), cpu, cuda, ATOL, RTOL);
            let cuda_copy = cuda.forward_copy().expect("a copy on CUDA");
            assert_eq!(cuda_copy.device(), dev, "{what} {name}");
            assert_eq!(cuda_copy.dtype(), copies.dtype, "{what} {name}");
            let (cpu_copy, cuda_copy) = (
                value_bits(&cpu.forward_copy().expect("a copy on the CPU")),
                value_bits(&cuda_copy),
            );
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
            if copies == ForwardCopies::nearest_even(copies.dtype) {
                let nearest = value_bits(&cuda.to_dtype(copies.dtype).unwrap());
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

#[test]
fn clip_grad_norm_matches_cpu_norm_and_scaled_grads() {
    let Some(dev) = cuda_or_skip("clip_grad_norm") else {
        return;
    };
    let cpu_params = params_on(Device::Cpu, 11);
    let cuda_params = params_on(dev, 11);
    let cpu_tensors: Vec<Tensor> = cpu_params.iter().map(|(_, p)| p.clone()).collect();
    let cuda_tensors: Vec<Tensor> = cuda_params.iter().map(|(_, p)| p.clone()).collect();
    // max_norm 1 clips (the norm of ~25,000 N(0, 1) values is ~158); 1e6 does not.
    for max_norm in [1.0, 1e6] {
        let mut cpu_grads = grads_for(&cpu_params, 0);
        let mut cuda_grads = grads_for(&cuda_params, 0);
        let cpu_norm = clip_grad_norm(&mut cpu_grads, &cpu_tensors, max_norm).unwrap();
        let cuda_norm = clip_grad_norm(&mut cuda_grads, &cuda_tensors, max_norm).unwrap();
        // Both sum the squares in f64: only the order of the additions differs.
        assert!(
            (cpu_norm - cuda_norm).abs() <= 1e-9 * cpu_norm,
            "norm: cuda {cuda_norm} vs cpu {cpu_norm}"
        );
        for (cpu, cuda) in cpu_tensors.iter().zip(&cuda_tensors) {
            assert_close(
                &format!("clipped grad, max_norm {max_norm}"),
                cpu_grads.get(cpu).unwrap(),
                cuda_grads.get(cuda).unwrap(),
                ATOL,
                RTOL,
            );
        }
    }
}

#[test]
fn grad_scaler_unscale_matches_cpu_and_finds_an_inf_on_the_device() {
    let Some(dev) = cuda_or_skip("GradScaler::unscale") else {
        return;
    };
    let cpu_params = params_on(Device::Cpu, 12);
    let cuda_params = params_on(dev, 12);
    let scaler = || GradScaler::new(GradScalerConfig::default()).unwrap();
    let (mut cpu_scaler, mut cuda_scaler) = (scaler(), scaler());
    let mut cpu_grads = grads_for(&cpu_params, 0);
    let mut cuda_grads = grads_for(&cuda_params, 0);
    assert!(cpu_scaler.unscale(&mut cpu_grads).unwrap());
    assert!(cuda_scaler.unscale(&mut cuda_grads).unwrap());
    for ((_, cpu), (_, cuda)) in cpu_params.iter().zip(&cuda_params) {
        // A product by a power of two: exact on both devices.
        let (a, b) = (cpu_grads.get(cpu).unwrap(), cuda_grads.get(cuda).unwrap());
        assert_eq!(a.to_f64_vec(), b.to_f64_vec(), "unscaled gradient");
    }
    // One Inf in the last element of the last gradient is found.
    let mut cuda_grads = grads_for(&cuda_params, 1);
    let (_, last) = cuda_params.last().unwrap();
    let mut values = cuda_grads.get(last).unwrap().to_vec::<f32>().unwrap();
    *values.last_mut().unwrap() = f32::INFINITY;
    let poisoned = Tensor::from_vec(values, last.dims())
        .unwrap()
        .to_device(dev)
        .unwrap();
    cuda_grads.insert(last, poisoned);
    assert!(!cuda_scaler.unscale(&mut cuda_grads).unwrap());
}
