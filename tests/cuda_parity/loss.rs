//! Losses on CUDA against the CPU reference (the optimizers are in
//! `optim.rs`).
//!
//! Loss values are sums of thousands of terms accumulated in double on both
//! devices, so they agree to f32 rounding: atol 1e-5 + rtol 1e-5. Gradients
//! are one f32 expression per element (expf, the logistic): same tolerance.

use kiln::{BceWithLogitsOptions, CrossEntropyOptions, Device, Reduction, Tensor};

use crate::common::{check_op, cuda_or_skip, randn, uniform};

const ATOL: f64 = 1e-5;
const RTOL: f64 = 1e-5;

const SHAPES: [[usize; 2]; 2] = [[37, 129], [1001, 84]];
const REDUCTIONS: [Reduction; 2] = [Reduction::Mean, Reduction::Sum];
const ALL_REDUCTIONS: [Reduction; 3] = [Reduction::Mean, Reduction::Sum, Reduction::None];

#[test]
fn mse_loss_and_grads_match_cpu() {
    let Some(dev) = cuda_or_skip("mse_loss") else {
        return;
    };
    for (k, shape) in SHAPES.iter().enumerate() {
        for reduction in REDUCTIONS {
            let x = randn(shape, 10 + k as u64);
            let y = randn(shape, 20 + k as u64);
            check_op(
                &format!("mse_loss {shape:?} {reduction:?}"),
                dev,
                &[x, y],
                |t| t[0].mse_loss(&t[1], reduction),
                ATOL,
                RTOL,
            );
        }
    }
}

#[test]
fn bce_with_logits_and_grads_match_cpu() {
    let Some(dev) = cuda_or_skip("bce_with_logits") else {
        return;
    };
    for (k, shape) in SHAPES.iter().enumerate() {
        for reduction in REDUCTIONS {
            let logits = randn(shape, 30 + k as u64).mul_scalar(3.0).unwrap();
            let targets = uniform(0.0, 1.0, shape, 40 + k as u64);
            check_op(
                &format!("bce_with_logits {shape:?} {reduction:?}"),
                dev,
                &[logits, targets],
                |t| t[0].bce_with_logits(&t[1], reduction),
                ATOL,
                RTOL,
            );
        }
    }
}

#[test]
fn bce_with_logits_takes_targets_outside_0_1_as_the_cpu_does() {
    let Some(dev) = cuda_or_skip("bce_with_logits real targets") else {
        return;
    };
    for reduction in ALL_REDUCTIONS {
        let logits = randn(&[37, 129], 50).mul_scalar(3.0).unwrap();
        let targets = uniform(-1.0, 2.0, &[37, 129], 51);
        check_op(
            &format!("bce_with_logits real targets {reduction:?}"),
            dev,
            &[logits, targets],
            |t| t[0].bce_with_logits(&t[1], reduction),
            ATOL,
            RTOL,
        );
    }
}

/// Class targets [rows] with values spread over [0, classes).
fn class_targets(rows: usize, classes: usize, seed: u64) -> Tensor {
    let values = uniform(0.0, classes as f64, &[rows], seed)
        .to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(|v| (v as u32).min(classes as u32 - 1))
        .collect();
    Tensor::from_indices(values, [rows]).unwrap()
}

#[test]
fn cross_entropy_and_grads_match_cpu() {
    let Some(dev) = cuda_or_skip("cross_entropy") else {
        return;
    };
    for (k, &[rows, classes]) in SHAPES.iter().enumerate() {
        for reduction in REDUCTIONS {
            let logits = randn(&[rows, classes], 60 + k as u64)
                .mul_scalar(4.0)
                .unwrap();
            let targets = class_targets(rows, classes, 70 + k as u64);
            let cuda_targets = targets.to_device(dev).unwrap();
            // check_op moves every input to the device; the targets must stay
            // u32, so each closure picks the copy on its logits' device.
            check_op(
                &format!("cross_entropy [{rows}, {classes}] {reduction:?}"),
                dev,
                &[logits],
                |t| {
                    let targets = match t[0].device() {
                        Device::Cpu => &targets,
                        Device::Cuda(_) => &cuda_targets,
                    };
                    t[0].cross_entropy(targets, reduction)
                },
                ATOL,
                RTOL,
            );
        }
    }
}

#[test]
fn cross_entropy_rejects_a_target_out_of_range_with_the_cpu_message() {
    let Some(dev) = cuda_or_skip("cross_entropy target check") else {
        return;
    };
    let logits = randn(&[37, 129], 80);
    let mut values = class_targets(37, 129, 81).to_indices().unwrap();
    values[11] = 129;
    values[20] = 500;
    let targets = Tensor::from_indices(values, [37]).unwrap();
    let cpu_error = logits
        .cross_entropy(&targets, Reduction::Mean)
        .unwrap_err()
        .to_string();
    let cuda_error = logits
        .to_device(dev)
        .unwrap()
        .cross_entropy(&targets.to_device(dev).unwrap(), Reduction::Mean)
        .unwrap_err()
        .to_string();
    assert!(cpu_error.contains("129"), "{cpu_error}");
    assert_eq!(cuda_error, cpu_error);
}

#[test]
fn gaussian_kl_and_grads_match_cpu() {
    let Some(dev) = cuda_or_skip("gaussian_kl") else {
        return;
    };
    for (k, shape) in SHAPES.iter().enumerate() {
        for reduction in REDUCTIONS {
            let mu = randn(shape, 90 + k as u64);
            let logvar = uniform(-2.0, 2.0, shape, 100 + k as u64);
            check_op(
                &format!("gaussian_kl {shape:?} {reduction:?}"),
                dev,
                &[mu, logvar],
                |t| Tensor::gaussian_kl(&t[0], &t[1], reduction),
                ATOL,
                RTOL,
            );
        }
    }
}

// ----- loss options ----------------------------------------------------------------

/// The copy of `t` on the device of `like` (constants such as targets and
/// class weights, which check_op must not turn into leaves).
fn on_device_of<'a>(like: &Tensor, cpu: &'a Tensor, cuda: &'a Tensor) -> &'a Tensor {
    match like.device() {
        Device::Cpu => cpu,
        Device::Cuda(_) => cuda,
    }
}

#[test]
fn unreduced_and_broadcasting_mse_match_cpu() {
    let Some(dev) = cuda_or_skip("mse_loss options") else {
        return;
    };
    for target_shape in [&[37, 129][..], &[129], &[37, 1]] {
        for reduction in ALL_REDUCTIONS {
            let x = randn(&[37, 129], 110);
            let y = randn(target_shape, 111);
            check_op(
                &format!("mse_loss target {target_shape:?} {reduction:?}"),
                dev,
                &[x, y],
                |t| t[0].mse_loss(&t[1], reduction),
                ATOL,
                RTOL,
            );
        }
    }
}

#[test]
fn bce_with_logits_weights_match_cpu() {
    let Some(dev) = cuda_or_skip("bce_with_logits options") else {
        return;
    };
    let weight = uniform(0.5, 1.5, &[37, 1], 120);
    let pos_weight = uniform(0.2, 3.0, &[129], 121);
    let (cuda_weight, cuda_pos_weight) = (
        weight.to_device(dev).unwrap(),
        pos_weight.to_device(dev).unwrap(),
    );
    for (weighted, positive_weighted) in
        [(false, false), (true, false), (false, true), (true, true)]
    {
        for reduction in ALL_REDUCTIONS {
            let logits = randn(&[37, 129], 122).mul_scalar(3.0).unwrap();
            let targets = uniform(-0.5, 1.5, &[37, 129], 123);
            check_op(
                &format!(
                    "bce_with_logits weight {weighted} pos_weight {positive_weighted} {reduction:?}"
                ),
                dev,
                &[logits, targets],
                |t| {
                    let options = BceWithLogitsOptions {
                        reduction,
                        weight: weighted
                            .then(|| on_device_of(&t[0], &weight, &cuda_weight).clone()),
                        pos_weight: positive_weighted
                            .then(|| on_device_of(&t[0], &pos_weight, &cuda_pos_weight).clone()),
                    };
                    t[0].bce_with_logits_with(&t[1], &options)
                },
                ATOL,
                RTOL,
            );
        }
    }
}

/// Class targets of `dims` spread over [0, classes), every 5th from the second
/// replaced by `ignored` (an unbatched single target stays counted).
fn targets_with_ignored(dims: &[usize], classes: usize, ignored: u32, seed: u64) -> Tensor {
    let count: usize = dims.iter().product();
    let mut values = class_targets(count, classes, seed).to_indices().unwrap();
    for v in values.iter_mut().skip(1).step_by(5) {
        *v = ignored;
    }
    Tensor::from_indices(values, dims).unwrap()
}

#[test]
fn cross_entropy_options_match_cpu() {
    let Some(dev) = cuda_or_skip("cross_entropy options") else {
        return;
    };
    // [N, C], [N, C, d1, d2] and unbatched [C]; ignore_index 255 lies outside the classes.
    let shapes: [&[usize]; 3] = [&[37, 129], &[6, 11, 7, 5], &[129]];
    for shape in shapes {
        let classes = shape[if shape.len() == 1 { 0 } else { 1 }];
        let target_dims: Vec<usize> = match shape {
            [_] => Vec::new(),
            [n, _, rest @ ..] => std::iter::once(*n).chain(rest.iter().copied()).collect(),
            [] => unreachable!(),
        };
        let ignored = if shape.len() == 1 { 1000 } else { 255 };
        let count: usize = target_dims.iter().product();
        let plain = class_targets(count, classes, 130)
            .reshape(target_dims.clone())
            .unwrap();
        let with_ignored = targets_with_ignored(&target_dims, classes, ignored, 130);
        let weight = uniform(0.2, 2.0, &[classes], 131);
        let cuda_weight = weight.to_device(dev).unwrap();
        for (weighted, ignore, label_smoothing) in [
            (false, false, 0.0),
            (true, false, 0.0),
            (false, true, 0.0),
            (false, false, 0.2),
            (true, true, 0.3),
        ] {
            let targets = if ignore { &with_ignored } else { &plain };
            let cuda_targets = targets.to_device(dev).unwrap();
            for reduction in ALL_REDUCTIONS {
                let logits = randn(shape, 132).mul_scalar(4.0).unwrap();
                check_op(
                    &format!(
                        "cross_entropy {shape:?} weight {weighted} ignore {ignore} smoothing {label_smoothing} {reduction:?}"
                    ),
                    dev,
                    &[logits],
                    |t| {
                        let options = CrossEntropyOptions {
                            reduction,
                            weight: weighted
                                .then(|| on_device_of(&t[0], &weight, &cuda_weight).clone()),
                            ignore_index: ignore.then_some(ignored),
                            label_smoothing,
                        };
                        t[0].cross_entropy_with(
                            on_device_of(&t[0], targets, &cuda_targets),
                            &options,
                        )
                    },
                    ATOL,
                    RTOL,
                );
            }
        }
    }
}

#[test]
fn cross_entropy_options_errors_match_cpu() {
    let Some(dev) = cuda_or_skip("cross_entropy options errors") else {
        return;
    };
    let logits = randn(&[6, 4, 3], 140);
    let options = CrossEntropyOptions {
        ignore_index: Some(9),
        ..CrossEntropyOptions::default()
    };
    let errors = |targets: &Tensor| {
        let cpu = logits
            .cross_entropy_with(targets, &options)
            .unwrap_err()
            .to_string();
        let cuda = logits
            .to_device(dev)
            .unwrap()
            .cross_entropy_with(&targets.to_device(dev).unwrap(), &options)
            .unwrap_err()
            .to_string();
        (cpu, cuda)
    };
    // A counted target out of range (an ignored 9 is not).
    let mut values = vec![9; 18];
    values[7] = 4;
    let (cpu, cuda) = errors(&Tensor::from_indices(values, [6, 3]).unwrap());
    assert!(cpu.contains("value 4") && cpu.contains("[2, 1]"), "{cpu}");
    assert_eq!(cuda, cpu);
    // Every target ignored, with a Mean.
    let (cpu, cuda) = errors(&Tensor::from_indices(vec![9; 18], [6, 3]).unwrap());
    assert!(cpu.contains("ignore_index"), "{cpu}");
    assert_eq!(cuda, cpu);
}

#[test]
fn unreduced_gaussian_kl_matches_cpu() {
    let Some(dev) = cuda_or_skip("gaussian_kl none") else {
        return;
    };
    for shape in [&[37, 129][..], &[9, 5, 7], &[33]] {
        let mu = randn(shape, 150);
        let logvar = uniform(-2.0, 2.0, shape, 151);
        check_op(
            &format!("gaussian_kl {shape:?} None"),
            dev,
            &[mu, logvar],
            |t| Tensor::gaussian_kl(&t[0], &t[1], Reduction::None),
            ATOL,
            RTOL,
        );
    }
}
