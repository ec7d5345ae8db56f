//! Batch norm, layer norm, softmax / log-softmax and causal attention on CUDA
//! against the CPU reference: forward, every input gradient, and the running
//! statistics a training step of batch norm leaves behind.
//!
//! Tolerance atol 1e-5 + rtol 1e-4: every op here is a reduction (over up to
//! ~1000 values) in f32 on the GPU, summed in a different order (tree
//! reductions) than the CPU reference (sequential, in f64 for the norms and
//! softmax), and the backward rules subtract nearly equal row or channel
//! means (dy − mean(dy) − x̂·mean(dy·x̂)), which turns a few f32 ulps of the
//! sums into ~1e-5 relative error of the result.

use kiln::nn::{BatchNorm2d, BatchNorm2dOptions, Init, Module};
use kiln::{DType, Device, Rng, Tensor};

use crate::common::{
    assert_close, check_op, check_op_16bit, check_op_16bit_frobenius_grads, cuda_or_skip,
    f32_sum_grads, randn, uniform,
};

const ATOL: f64 = 1e-5;
const RTOL: f64 = 1e-4;
const EPS: f64 = 1e-5;

/// x [5, 7, 9, 11] (m = 495 values per channel, far from any block size),
/// offset so that |mean| > std, as after a ReLU.
fn batch_norm_input() -> Tensor {
    randn(&[5, 7, 9, 11], 11)
        .mul_scalar(2.0)
        .unwrap()
        .add_scalar(3.0)
        .unwrap()
}

#[test]
fn batch_norm2d_training_matches_cpu_including_running_stats() {
    let Some(dev) = cuda_or_skip("batch_norm2d_training") else {
        return;
    };
    let (running_mean, running_var) = (randn(&[7], 12), uniform(0.5, 2.0, &[7], 13));
    let initial_mean = running_mean.to_f64_vec();
    let cpu_running = (running_mean.clone(), running_var.clone());
    let cuda_running = (
        running_mean.to_device(dev).unwrap(),
        running_var.to_device(dev).unwrap(),
    );
    check_op(
        "batch_norm2d training",
        dev,
        &[batch_norm_input(), randn(&[7], 14), randn(&[7], 15)],
        |t| {
            let (mean, var) = match t[0].device() {
                Device::Cpu => &cpu_running,
                Device::Cuda(_) => &cuda_running,
            };
            t[0].batch_norm2d(
                Some(mean),
                Some(var),
                Some(&t[1]),
                Some(&t[2]),
                true,
                0.1,
                EPS,
            )
        },
        ATOL,
        RTOL,
    );
    // One training step blended the batch mean and unbiased variance in.
    assert_close(
        "running_mean after a step",
        &cpu_running.0,
        &cuda_running.0,
        ATOL,
        RTOL,
    );
    assert_close(
        "running_var after a step",
        &cpu_running.1,
        &cuda_running.1,
        ATOL,
        RTOL,
    );
    assert!(
        (cpu_running.0.to_f64_vec()[0] - initial_mean[0]).abs() > 1e-3,
        "the running mean did not move, so the comparison above proves nothing"
    );
}

/// bf16/f16 x (and, here, 16-bit affine parameters, widened inside) in
/// training and eval: y and dx keep x's format, every value is computed in
/// f32, so the two devices agree to one 16-bit ulp (the atol covers dx
/// values that cancel to near zero).
#[test]
fn sixteen_bit_batch_norm2d_matches_cpu_in_training_and_eval() {
    let Some(dev) = cuda_or_skip("sixteen_bit_batch_norm2d") else {
        return;
    };
    for (dtype, rtol) in [(DType::BF16, 1.0 / 128.0), (DType::F16, 1.0 / 1024.0)] {
        for training in [true, false] {
            check_op_16bit(
                &format!("batch_norm2d training={training}"),
                dev,
                &[batch_norm_input(), randn(&[7], 32), randn(&[7], 33)],
                dtype,
                |t| {
                    // Fresh running statistics for each run, alike on both devices.
                    let mean = randn(&[7], 30).to_device(t[0].device())?;
                    let var = uniform(0.5, 2.0, &[7], 31).to_device(t[0].device())?;
                    t[0].batch_norm2d(
                        Some(&mean),
                        Some(&var),
                        Some(&t[1]),
                        Some(&t[2]),
                        training,
                        0.1,
                        EPS,
                    )
                },
                1e-3,
                rtol,
            );
        }
    }
}

/// As autocast leaves it: a bf16 x with f32 running statistics and affine
/// parameters. The parameters' gradients and the running statistics stay f32.
#[test]
fn bf16_batch_norm2d_with_f32_parameters_matches_cpu() {
    let Some(dev) = cuda_or_skip("bf16_batch_norm2d_f32_parameters") else {
        return;
    };
    let x = batch_norm_input().to_dtype(DType::BF16).unwrap();
    let run = |on: Device| {
        let running = (
            randn(&[7], 40).to_device(on).unwrap(),
            uniform(0.5, 2.0, &[7], 41).to_device(on).unwrap(),
        );
        let leaves: Vec<Tensor> = [x.clone(), randn(&[7], 42), randn(&[7], 43)]
            .iter()
            .map(|t| t.to_device(on).unwrap().requires_grad_())
            .collect();
        let y = leaves[0]
            .batch_norm2d(
                Some(&running.0),
                Some(&running.1),
                Some(&leaves[1]),
                Some(&leaves[2]),
                true,
                0.1,
                EPS,
            )
            .unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let probe = randn(y.dims(), 44).to_dtype(DType::BF16).unwrap();
        let grads = f32_sum_grads(&y.mul(&probe.to_device(on).unwrap()).unwrap(), &leaves);
        assert_eq!(grads.len(), leaves.len());
        (y, grads, running)
    };
    let (cpu, cuda) = (run(Device::Cpu), run(dev));
    let rtol = 1.0 / 128.0;
    assert_close("bf16 batch_norm2d", &cpu.0, &cuda.0, 1e-3, rtol);
    for (i, (c, g)) in cpu.1.iter().zip(&cuda.1).enumerate() {
        let expected = if i == 0 { DType::BF16 } else { DType::F32 };
        assert_eq!(g.dtype(), expected, "gradient {i} dtype");
        assert_close(
            &format!("bf16 batch_norm2d grad {i}"),
            c,
            g,
            1e-3,
            2.0 * rtol,
        );
    }
    assert_eq!(cuda.2.0.dtype(), DType::F32);
    assert_close("running_mean", &cpu.2.0, &cuda.2.0, ATOL, RTOL);
    assert_close("running_var", &cpu.2.1, &cuda.2.1, ATOL, RTOL);
}

#[test]
fn batch_norm2d_training_without_affine_or_running_stats_matches_cpu() {
    let Some(dev) = cuda_or_skip("batch_norm2d_plain") else {
        return;
    };
    check_op(
        "batch_norm2d training, no affine",
        dev,
        &[batch_norm_input()],
        |t| t[0].batch_norm2d(None, None, None, None, true, 0.1, EPS),
        ATOL,
        RTOL,
    );
}

#[test]
fn batch_norm2d_eval_matches_cpu() {
    let Some(dev) = cuda_or_skip("batch_norm2d_eval") else {
        return;
    };
    let (running_mean, running_var) = (randn(&[7], 16), uniform(0.5, 2.0, &[7], 17));
    let cuda_running = (
        running_mean.to_device(dev).unwrap(),
        running_var.to_device(dev).unwrap(),
    );
    check_op(
        "batch_norm2d eval",
        dev,
        &[batch_norm_input(), randn(&[7], 18), randn(&[7], 19)],
        |t| {
            let (mean, var) = match t[0].device() {
                Device::Cpu => (&running_mean, &running_var),
                Device::Cuda(_) => (&cuda_running.0, &cuda_running.1),
            };
            t[0].batch_norm2d(
                Some(mean),
                Some(var),
                Some(&t[1]),
                Some(&t[2]),
                false,
                0.1,
                EPS,
            )
        },
        ATOL,
        RTOL,
    );
    // Eval leaves the running statistics alone.
    assert_close(
        "running_mean after eval",
        &running_mean,
        &cuda_running.0,
        0.0,
        0.0,
    );
}

#[test]
fn layer_norm_matches_cpu() {
    let Some(dev) = cuda_or_skip("layer_norm") else {
        return;
    };
    // [37, 129]: one chunk of rows for dweight/dbias; [3, 70, 33]: 210 rows,
    // four chunks of 64, so the two-stage parameter sums are exercised.
    for (shape, seed) in [(vec![37, 129], 21), (vec![3, 70, 33], 22)] {
        let width = *shape.last().unwrap();
        let x = randn(&shape, seed).add_scalar(0.5).unwrap();
        check_op(
            &format!("layer_norm {shape:?}"),
            dev,
            &[
                x.clone(),
                randn(&[width], seed + 1),
                randn(&[width], seed + 2),
            ],
            |t| t[0].layer_norm(Some(&t[1]), Some(&t[2]), EPS),
            ATOL,
            RTOL,
        );
        check_op(
            &format!("layer_norm {shape:?} without affine"),
            dev,
            &[x],
            |t| t[0].layer_norm(None, None, EPS),
            ATOL,
            RTOL,
        );
    }
}

/// Three training steps and an eval forward of a BatchNorm2d built with
/// `options` on each device: outputs, gradients and running statistics.
fn check_batch_norm_module(what: &str, dev: Device, options: BatchNorm2dOptions) {
    let build = |on: Device| {
        let mut rng = Rng::seed(70);
        let mut init = Init::new(&mut rng, on, DType::F32);
        BatchNorm2d::with_config(7, options, &mut init).unwrap()
    };
    let (cpu_bn, cuda_bn) = (build(Device::Cpu), build(dev));
    for step in 0..4 {
        if step == 3 {
            cpu_bn.eval();
            cuda_bn.eval();
        }
        let x = batch_norm_input().add_scalar(step as f64).unwrap();
        check_op(
            &format!("{what} step {step}"),
            dev,
            &[x],
            |t| match t[0].device() {
                Device::Cpu => cpu_bn.forward(&t[0]),
                Device::Cuda(_) => cuda_bn.forward(&t[0]),
            },
            ATOL,
            RTOL,
        );
        let running = [
            ("running_mean", &cpu_bn.running_mean, &cuda_bn.running_mean),
            ("running_var", &cpu_bn.running_var, &cuda_bn.running_var),
        ];
        for (name, cpu, cuda) in running {
            assert_eq!(cpu.is_some(), cuda.is_some(), "{what}: {name}");
            if let (Some(cpu), Some(cuda)) = (cpu, cuda) {
                assert_close(&format!("{what} {name} step {step}"), cpu, cuda, ATOL, RTOL);
            }
        }
    }
}

#[test]
fn batch_norm2d_module_options_match_cpu() {
    let Some(dev) = cuda_or_skip("batch_norm2d_module_options") else {
        return;
    };
    let defaults = BatchNorm2dOptions::default();
    let cumulative = BatchNorm2dOptions {
        momentum: None,
        ..defaults
    };
    check_batch_norm_module("BatchNorm2d momentum=None", dev, cumulative);
    let untracked = BatchNorm2dOptions {
        track_running_stats: false,
        ..defaults
    };
    check_batch_norm_module("BatchNorm2d untracked", dev, untracked);
    let plain = BatchNorm2dOptions {
        affine: false,
        ..defaults
    };
    check_batch_norm_module("BatchNorm2d affine=false", dev, plain);
}

#[test]
fn layer_norm_over_trailing_dims_matches_cpu() {
    let Some(dev) = cuda_or_skip("layer_norm_over") else {
        return;
    };
    // Slices of 693 values (several passes of a 256-thread block) and of
    // 33 values in 210 rows (four chunks of the parameter sums).
    for (shape, k, seed) in [(vec![3, 7, 9, 11], 3, 81), (vec![70, 3, 3, 11], 2, 84)] {
        let normalized = shape[shape.len() - k..].to_vec();
        let x = randn(&shape, seed).add_scalar(0.5).unwrap();
        let inputs = [
            x.clone(),
            randn(&normalized, seed + 1),
            randn(&normalized, seed + 2),
        ];
        let affine =
            |t: &[Tensor]| t[0].layer_norm_over(&normalized, Some(&t[1]), Some(&t[2]), EPS);
        let what = format!("layer_norm_over {shape:?} {normalized:?}");
        check_op(&what, dev, &inputs, affine, ATOL, RTOL);
        check_op(
            &format!("{what} without affine"),
            dev,
            &[x],
            |t| t[0].layer_norm_over(&normalized, None, None, EPS),
            ATOL,
            RTOL,
        );
        // 16-bit x and parameters: widened, normalised in f32, rounded back.
        for (dtype, rtol) in [(DType::BF16, 1.0 / 128.0), (DType::F16, 1.0 / 1024.0)] {
            check_op_16bit(&what, dev, &inputs, dtype, affine, 1e-3, rtol);
        }
    }
}

#[test]
fn softmax_and_log_softmax_match_cpu() {
    let Some(dev) = cuda_or_skip("softmax") else {
        return;
    };
    // Rows of 1 (softmax is exactly 1), 31 (under one warp), 1001 (several
    // passes of a 256-thread block); logits scaled up to stress the max shift.
    for (shape, seed) in [(vec![7, 1], 31), (vec![5, 31], 32), (vec![3, 1001], 33)] {
        let x = randn(&shape, seed).mul_scalar(4.0).unwrap();
        let one = std::slice::from_ref(&x);
        check_op(
            &format!("softmax {shape:?}"),
            dev,
            one,
            |t| t[0].softmax(-1),
            ATOL,
            RTOL,
        );
        check_op(
            &format!("log_softmax {shape:?}"),
            dev,
            one,
            |t| t[0].log_softmax(-1),
            ATOL,
            RTOL,
        );
    }
}

#[test]
fn causal_self_attention_matches_cpu() {
    let Some(dev) = cuda_or_skip("causal_self_attention") else {
        return;
    };
    // The CPU's fused op against CUDA's split, attend and merge: an odd
    // shape and the GPT's own.
    for (dims, heads, seed) in [([2, 37, 3 * 48], 3, 51), ([4, 64, 3 * 128], 4, 53)] {
        check_op(
            &format!("causal_self_attention {dims:?} {heads} heads"),
            dev,
            &[randn(&dims, seed)],
            |t| t[0].causal_self_attention(heads),
            ATOL,
            RTOL,
        );
    }
}

#[test]
fn causal_attention_matches_cpu() {
    let Some(dev) = cuda_or_skip("causal_attention") else {
        return;
    };
    // An odd shape, the GPT's own shape, and a single position.
    for (shape, seed) in [
        (vec![2, 3, 37, 16], 41),
        (vec![4, 4, 64, 32], 44),
        (vec![1, 2, 1, 8], 47),
    ] {
        check_op(
            &format!("causal_attention {shape:?}"),
            dev,
            &[
                randn(&shape, seed),
                randn(&shape, seed + 1),
                randn(&shape, seed + 2),
            ],
            |t| Tensor::causal_attention(&t[0], &t[1], &t[2]),
            ATOL,
            RTOL,
        );
    }
}

/// bf16/f16 attention: the device reads and writes q, k, v, O and their
/// gradients in 16 bits and keeps P in f32; the CPU widens, computes in f32
/// and rounds once. The packed op's CPU form keeps P rounded to the 16-bit
/// format for its backward (half the memory), so its gradients are compared
/// by relative Frobenius error, at the bounds for 16-bit products
/// (1e-2 bf16, 2e-3 f16).
#[test]
fn sixteen_bit_attention_matches_cpu() {
    let Some(dev) = cuda_or_skip("sixteen_bit_attention") else {
        return;
    };
    for (dtype, rtol, frobenius) in [
        (DType::BF16, 1.0 / 128.0, 1e-2),
        (DType::F16, 1.0 / 1024.0, 2e-3),
    ] {
        let shape = [2, 3, 37, 16];
        check_op_16bit(
            &format!("causal_attention {shape:?}"),
            dev,
            &[randn(&shape, 61), randn(&shape, 62), randn(&shape, 63)],
            dtype,
            |t| Tensor::causal_attention(&t[0], &t[1], &t[2]),
            1e-3,
            rtol,
        );
        check_op_16bit_frobenius_grads(
            "causal_self_attention [2, 37, 144] 3 heads",
            dev,
            &[randn(&[2, 37, 3 * 48], 64)],
            dtype,
            |t| t[0].causal_self_attention(3),
            (1e-3, rtol),
            frobenius,
        );
    }
}
