//! The loss options (PyTorch's reduction='none', cross entropy's weight,
//! ignore_index, label_smoothing and class dims, bce's weight, pos_weight
//! and real targets, mse's broadcasting target): gradients against finite
//! differences, forward identities, and the errors for what stays refused.

use kiln::{BceWithLogitsOptions, CrossEntropyOptions, Reduction, Tensor};
use proptest::prelude::*;

use crate::common::*;

const ALL_REDUCTIONS: [Reduction; 3] = [Reduction::Mean, Reduction::Sum, Reduction::None];

/// Logits shapes: [N, C], [N, C, d1], [N, C, d1, d2] and an unbatched [C].
const LOGITS_SHAPES: [&[usize]; 4] = [&[3, 4], &[2, 3, 2], &[2, 3, 2, 2], &[4]];

/// The targets' shape for `logits`: without the class dim.
fn target_dims(logits: &[usize]) -> Vec<usize> {
    match logits {
        [_] => Vec::new(),
        [n, _, rest @ ..] => std::iter::once(*n).chain(rest.iter().copied()).collect(),
        [] => unreachable!(),
    }
}

/// Class targets below `classes` spread by `seed`; the first is class 0
/// (so at least one target survives an ignore_index of 1).
fn class_targets(dims: &[usize], classes: usize, seed: u64) -> Tensor {
    let count: usize = dims.iter().product();
    let values = (0..count as u64)
        .map(|k| {
            if k == 0 {
                0
            } else {
                ((k * 7 + seed % 97) % classes as u64) as u32
            }
        })
        .collect();
    Tensor::from_indices(values, dims).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn cross_entropy_options_gradients(
        shape in prop::sample::select(LOGITS_SHAPES.to_vec()),
        seed in any::<u64>(),
        weighted in any::<bool>(),
        ignore in any::<bool>(),
        label_smoothing in prop::sample::select(vec![0.0, 0.3, 1.0]),
    ) {
        let classes = shape[if shape.len() == 1 { 0 } else { 1 }];
        let logits = randn(shape, seed).mul_scalar(2.0).unwrap();
        let targets = class_targets(&target_dims(shape), classes, seed);
        let options = |reduction| CrossEntropyOptions {
            reduction,
            weight: weighted.then(|| uniform(0.2, 2.0, &[classes], seed ^ 3)),
            // Unbatched, the one target (class 0) must count for a Mean.
            ignore_index: (ignore && shape.len() > 1).then_some(1),
            label_smoothing,
        };
        for reduction in ALL_REDUCTIONS {
            let options = options(reduction);
            check(
                |t| t[0].cross_entropy_with(&targets, &options),
                std::slice::from_ref(&logits),
            );
        }
    }

    #[test]
    fn bce_with_logits_options_gradients_for_input_and_real_targets(
        rows in 1usize..=3,
        cols in 1usize..=4,
        seed in any::<u64>(),
        weighted in any::<bool>(),
        positive_weighted in any::<bool>(),
    ) {
        let x = randn(&[rows, cols], seed).mul_scalar(2.0).unwrap();
        // Targets outside [0, 1] too: PyTorch computes the formula for any real y.
        let y = uniform(-0.5, 1.5, &[rows, cols], seed ^ 1);
        let options = |reduction| BceWithLogitsOptions {
            reduction,
            weight: weighted.then(|| uniform(0.5, 1.5, &[rows, 1], seed ^ 2)),
            pos_weight: positive_weighted.then(|| uniform(0.2, 3.0, &[cols], seed ^ 3)),
        };
        for reduction in ALL_REDUCTIONS {
            let options = options(reduction);
            check(|t| t[0].bce_with_logits_with(&t[1], &options), &[x.clone(), y.clone()]);
        }
    }

    #[test]
    fn mse_gradients_with_a_broadcasting_target(
        target_shape in prop::sample::select(vec![vec![3], vec![2, 1], vec![1, 3], vec![4, 2, 3]]),
        seed in any::<u64>(),
    ) {
        let x = randn(&[2, 3], seed);
        let y = randn(&target_shape, seed ^ 1);
        for reduction in ALL_REDUCTIONS {
            check(|t| t[0].mse_loss(&t[1], reduction), &[x.clone(), y.clone()]);
        }
    }

    #[test]
    fn unreduced_mse_bce_and_gaussian_kl_gradients(
        shape in prop::collection::vec(1usize..=4, 1..=3),
        seed in any::<u64>(),
    ) {
        let x = randn(&shape, seed);
        let y = randn(&shape, seed ^ 1);
        check(|t| t[0].mse_loss(&t[1], Reduction::None), &[x.clone(), y.clone()]);
        check(|t| t[0].bce_with_logits(&t[1], Reduction::None), &[x.clone(), y.clone()]);
        let logvar = y.mul_scalar(0.5).unwrap();
        check(|t| Tensor::gaussian_kl(&t[0], &t[1], Reduction::None), &[x, logvar]);
    }
}

// ----- forward values --------------------------------------------------------

fn f64_tensor(values: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape).unwrap()
}

fn value(t: &Tensor) -> f64 {
    t.item().unwrap()
}

#[test]
fn unreduced_losses_have_pytorchs_shapes_and_sum_to_the_sum() {
    let x = randn(&[3, 4], 0);
    let y = uniform(0.0, 1.0, &[3, 4], 1);
    let targets = indices(&[0, 3, 1], &[3]);
    type Loss = fn(&Tensor, &Tensor, Reduction) -> kiln::Result<Tensor>;
    let cases: [(Loss, &Tensor, &[usize]); 4] = [
        (|x, y, r| x.mse_loss(y, r), &y, &[3, 4]),
        (|x, y, r| x.bce_with_logits(y, r), &y, &[3, 4]),
        (|x, t, r| x.cross_entropy(t, r), &targets, &[3]),
        (|x, y, r| Tensor::gaussian_kl(x, y, r), &y, &[3]),
    ];
    for (loss, second, shape) in cases {
        let none = loss(&x, second, Reduction::None).unwrap();
        assert_eq!(none.dims(), shape);
        let sum = value(&loss(&x, second, Reduction::Sum).unwrap());
        assert!((value(&none.sum_all().unwrap()) - sum).abs() < 1e-12 * sum.abs().max(1.0));
    }
    let logits = randn(&[2, 4, 3, 5], 2);
    let targets = class_targets(&[2, 3, 5], 4, 3);
    let none = logits.cross_entropy(&targets, Reduction::None).unwrap();
    assert_eq!(none.dims(), [2, 3, 5]);
}

#[test]
fn cross_entropy_composed_path_agrees_with_the_fused_kernel() {
    // A weight of ones, an ignore_index no target uses and zero smoothing
    // change nothing, but send the loss down the composed path.
    let logits = randn(&[5, 4], 0).mul_scalar(3.0).unwrap();
    let targets = indices(&[0, 3, 1, 3, 2], &[5]);
    for reduction in [Reduction::Mean, Reduction::Sum] {
        let fused = value(&logits.cross_entropy(&targets, reduction).unwrap());
        let options = CrossEntropyOptions {
            reduction,
            weight: Some(f64_tensor(&[1.0; 4], &[4])),
            ignore_index: Some(9),
            label_smoothing: 0.0,
        };
        let composed = value(&logits.cross_entropy_with(&targets, &options).unwrap());
        assert!((fused - composed).abs() < 1e-12, "{fused} vs {composed}");
    }
}

#[test]
fn ignored_targets_contribute_nothing_and_may_lie_outside_the_classes() {
    // 255 marks unlabelled pixels in segmentation: ignored, never range-checked.
    let logits = randn(&[4, 3], 0).requires_grad_();
    let targets = indices(&[2, 255, 0, 255], &[4]);
    let options = CrossEntropyOptions {
        reduction: Reduction::None,
        ignore_index: Some(255),
        ..CrossEntropyOptions::default()
    };
    let losses = logits.cross_entropy_with(&targets, &options).unwrap();
    let per_sample = losses.to_f64_vec();
    assert_eq!((per_sample[1], per_sample[3]), (0.0, 0.0));
    let grads = losses.sum_all().unwrap().backward().unwrap();
    let dx = grads.get(&logits).unwrap().to_f64_vec();
    assert!(dx[3..6].iter().chain(&dx[9..12]).all(|&d| d == 0.0));
    // The mean divides by the two counted targets.
    let mean = logits
        .cross_entropy_with(
            &targets,
            &CrossEntropyOptions {
                reduction: Reduction::Mean,
                ..options
            },
        )
        .unwrap();
    assert!((value(&mean) - (per_sample[0] + per_sample[2]) / 2.0).abs() < 1e-12);
}

#[test]
fn every_target_ignored_sums_to_zero_with_zero_gradient() {
    let logits = randn(&[3, 4], 0).requires_grad_();
    let targets = indices(&[1, 1, 1], &[3]);
    let options = CrossEntropyOptions {
        reduction: Reduction::Sum,
        ignore_index: Some(1),
        label_smoothing: 0.2,
        ..CrossEntropyOptions::default()
    };
    let loss = logits.cross_entropy_with(&targets, &options).unwrap();
    assert_eq!(value(&loss), 0.0);
    let grads = loss.backward().unwrap();
    assert!(
        grads
            .get(&logits)
            .unwrap()
            .to_f64_vec()
            .iter()
            .all(|&d| d == 0.0)
    );
}

#[test]
fn full_label_smoothing_is_the_mean_negative_log_probability() {
    // ε = 1: the target is uniform, ℓ = −(1/C) Σ_c logp[c] whatever the class.
    let logits = randn(&[2, 5], 0);
    let options = CrossEntropyOptions {
        reduction: Reduction::None,
        label_smoothing: 1.0,
        ..CrossEntropyOptions::default()
    };
    let a = logits
        .cross_entropy_with(&indices(&[0, 1], &[2]), &options)
        .unwrap();
    let b = logits
        .cross_entropy_with(&indices(&[4, 3], &[2]), &options)
        .unwrap();
    let expected = logits
        .log_softmax(1)
        .unwrap()
        .mean(&[1], false)
        .unwrap()
        .neg()
        .unwrap()
        .to_f64_vec();
    for (got, want) in a.to_f64_vec().iter().zip(&expected) {
        assert!((got - want).abs() < 1e-12);
    }
    assert_eq!(a.to_f64_vec(), b.to_f64_vec());
}

#[test]
fn bce_pos_weight_scales_only_the_positive_term() {
    // y = 1: ℓ = pw·softplus(−x); y = 0: ℓ = softplus(x), pw plays no part.
    let x = f64_tensor(&[0.7, -1.2], &[2]);
    let options = BceWithLogitsOptions {
        reduction: Reduction::None,
        pos_weight: Some(f64_tensor(&[3.0], &[1])),
        ..BceWithLogitsOptions::default()
    };
    let softplus = |v: f64| v.exp().ln_1p();
    let ones = x
        .bce_with_logits_with(&f64_tensor(&[1.0, 1.0], &[2]), &options)
        .unwrap();
    let zeros = x
        .bce_with_logits_with(&f64_tensor(&[0.0, 0.0], &[2]), &options)
        .unwrap();
    for (k, &v) in [0.7, -1.2].iter().enumerate() {
        assert!((ones.to_f64_vec()[k] - 3.0 * softplus(-v)).abs() < 1e-12);
        assert!((zeros.to_f64_vec()[k] - softplus(v)).abs() < 1e-12);
    }
}

#[test]
fn bce_takes_targets_outside_0_1_as_pytorch_does() {
    let x = f64_tensor(&[0.5, -2.0, 1.0, 3.0], &[2, 2]);
    let y = f64_tensor(&[0.5, 1.0, 0.0, 1.5], &[2, 2]);
    let loss = x.bce_with_logits(&y, Reduction::Sum).unwrap();
    // max(x, 0) − x·y + ln(1 + e^−|x|), summed.
    let expected: f64 = [(0.5, 0.5), (-2.0, 1.0), (1.0, 0.0), (3.0, 1.5)]
        .iter()
        .map(|&(x, y): &(f64, f64)| x.max(0.0) - x * y + (-x.abs()).exp().ln_1p())
        .sum();
    assert!((value(&loss) - expected).abs() < 1e-12);
    let unreduced = x.bce_with_logits(&y, Reduction::None).unwrap();
    assert!((value(&unreduced.sum_all().unwrap()) - expected).abs() < 1e-12);
}

#[test]
fn bce_gradient_at_a_zero_logit_is_exact() {
    // At x = 0: dℓ/dx = (1 + (pw − 1)·y)·½ − pw·y, with no kink from |x| or max.
    let x = f64_tensor(&[0.0, 0.0], &[2]).requires_grad_();
    let y = f64_tensor(&[0.0, 1.0], &[2]);
    let options = BceWithLogitsOptions {
        reduction: Reduction::Sum,
        pos_weight: Some(f64_tensor(&[2.0, 2.0], &[2])),
        ..BceWithLogitsOptions::default()
    };
    let grads = x
        .bce_with_logits_with(&y, &options)
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(grads.get(&x).unwrap().to_f64_vec(), [0.5, -1.0]);
}

#[test]
fn mse_broadcast_mean_divides_by_the_broadcast_count() {
    let x = f64_tensor(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let y = f64_tensor(&[0.0, 1.0], &[2]);
    // (1, 1, 9, 9): mean 5 over 4 broadcast elements.
    assert_eq!(value(&x.mse_loss(&y, Reduction::Mean).unwrap()), 5.0);
    let column = f64_tensor(&[0.0, 1.0, 2.0], &[3, 1]);
    let none = f64_tensor(&[1.0, 2.0], &[2])
        .mse_loss(&column, Reduction::None)
        .unwrap();
    assert_eq!(none.dims(), [3, 2]);
    assert_eq!(none.to_f64_vec(), [1.0, 4.0, 0.0, 1.0, 1.0, 0.0]);
}

// ----- errors ----------------------------------------------------------------

#[test]
fn cross_entropy_refuses_class_probability_targets() {
    let logits = randn(&[2, 3], 0);
    let probabilities = uniform(0.0, 1.0, &[2, 3], 1);
    let msg = message(logits.cross_entropy(&probabilities, Reduction::Mean));
    assert_mentions(&msg, &["cross_entropy:", "u32", "f64", "class-probability"]);
}

#[test]
fn cross_entropy_mean_with_every_target_ignored_is_an_error() {
    let logits = randn(&[3, 4], 0);
    let options = CrossEntropyOptions {
        ignore_index: Some(2),
        ..CrossEntropyOptions::default()
    };
    let msg = message(logits.cross_entropy_with(&indices(&[2, 2, 2], &[3]), &options));
    assert_mentions(
        &msg,
        &["cross_entropy:", "ignore_index", "NaN", "Reduction::Sum"],
    );
}

#[test]
fn cross_entropy_of_logits_with_no_classes_is_an_error_even_if_every_target_is_ignored() {
    // PyTorch returns 0 (NaN with label smoothing) when every target is
    // ignored; kiln refuses logits with nothing to predict. An ignored
    // target is otherwise never range-checked (it may name no class).
    let options = CrossEntropyOptions {
        reduction: Reduction::Sum,
        ignore_index: Some(5),
        ..CrossEntropyOptions::default()
    };
    let empty = Tensor::zeros([2, 0], kiln::DType::F64, kiln::Device::Cpu).unwrap();
    let msg = message(empty.cross_entropy_with(&indices(&[5, 5], &[2]), &options));
    assert_mentions(&msg, &["cross_entropy:", "[2, 0]", "no classes"]);
    let logits = randn(&[2, 3], 1);
    let loss = logits
        .cross_entropy_with(&indices(&[5, 1], &[2]), &options)
        .unwrap();
    let only_row_1 = logits
        .narrow(0, 1, 1)
        .unwrap()
        .cross_entropy(&indices(&[1], &[1]), Reduction::Sum)
        .unwrap();
    assert_eq!(loss.item().unwrap(), only_row_1.item().unwrap());
}

#[test]
fn cross_entropy_option_errors_name_the_option() {
    let logits = randn(&[2, 3], 0);
    let targets = indices(&[0, 2], &[2]);
    let with =
        |options: CrossEntropyOptions| message(logits.cross_entropy_with(&targets, &options));
    for smoothing in [-0.1, 1.5, f64::NAN] {
        let msg = with(CrossEntropyOptions {
            label_smoothing: smoothing,
            ..CrossEntropyOptions::default()
        });
        assert_mentions(&msg, &["cross_entropy:", "label_smoothing", "[0, 1]"]);
    }
    let msg = with(CrossEntropyOptions {
        weight: Some(uniform(0.5, 1.0, &[4], 1)),
        ..CrossEntropyOptions::default()
    });
    assert_mentions(&msg, &["cross_entropy:", "weight", "[3]", "[4]"]);
    let msg = with(CrossEntropyOptions {
        weight: Some(uniform(0.5, 1.0, &[3], 1).requires_grad_()),
        ..CrossEntropyOptions::default()
    });
    assert_mentions(&msg, &["cross_entropy:", "weight", "no gradient", "detach"]);
    // A counted target out of range is named even when another is ignored.
    let msg = message(logits.cross_entropy_with(
        &indices(&[0, 3], &[2]),
        &CrossEntropyOptions {
            ignore_index: Some(0),
            ..CrossEntropyOptions::default()
        },
    ));
    assert_mentions(&msg, &["cross_entropy:", "value 3", "[1]", "3 classes"]);
}

#[test]
fn cross_entropy_target_shapes_follow_pytorchs_class_dim() {
    let msg =
        message(randn(&[2, 4, 3], 0).cross_entropy(&indices(&[0; 8], &[2, 4]), Reduction::Mean));
    assert_mentions(&msg, &["cross_entropy:", "[2, 3]", "[2, 4]", "class dim 1"]);
    let msg = message(randn(&[4], 0).cross_entropy(&indices(&[0], &[1]), Reduction::Mean));
    assert_mentions(&msg, &["cross_entropy:", "[]", "[1]", "class dim 0"]);
    let msg = message(f64_tensor(&[1.0], &[]).cross_entropy(&indices(&[0], &[]), Reduction::Mean));
    assert_mentions(&msg, &["cross_entropy:", "class dim", "rank 0"]);
}

#[test]
fn bce_weight_errors_name_the_weight() {
    let x = randn(&[2, 3], 0);
    let y = uniform(0.0, 1.0, &[2, 3], 1);
    let with = |options: BceWithLogitsOptions| message(x.bce_with_logits_with(&y, &options));
    let msg = with(BceWithLogitsOptions {
        weight: Some(uniform(0.5, 1.0, &[4, 2, 3], 2)),
        ..BceWithLogitsOptions::default()
    });
    assert_mentions(&msg, &["bce_with_logits:", "weight", "[4, 2, 3]", "[2, 3]"]);
    let msg = with(BceWithLogitsOptions {
        pos_weight: Some(uniform(0.5, 1.0, &[2], 2)),
        ..BceWithLogitsOptions::default()
    });
    assert_mentions(&msg, &["bce_with_logits:", "pos_weight", "[2]", "[2, 3]"]);
    for (weight, pos_weight) in [(true, false), (false, true)] {
        let w = uniform(0.5, 1.0, &[3], 3).requires_grad_();
        let msg = with(BceWithLogitsOptions {
            weight: weight.then(|| w.clone()),
            pos_weight: pos_weight.then(|| w.clone()),
            ..BceWithLogitsOptions::default()
        });
        let role = if weight { "weight" } else { "pos_weight" };
        assert_mentions(&msg, &["bce_with_logits:", role, "no gradient", "detach"]);
    }
}

#[test]
fn mse_target_that_does_not_broadcast_names_both_shapes() {
    let msg = message(randn(&[2, 3], 0).mse_loss(&randn(&[4], 1), Reduction::Mean));
    assert_mentions(&msg, &["mse_loss:", "[4]", "[2, 3]", "broadcast"]);
}

#[test]
fn sixteen_bit_operands_run_the_options_in_f32() {
    // bf16 logits and weights are widened: the result is the f32 loss of the
    // rounded values, returned in the logits' dtype.
    use kiln::DType;
    let bf16 = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let logits = bf16(randn(&[4, 3, 2], 0));
    let weight = bf16(uniform(0.5, 1.5, &[3], 1));
    let targets = class_targets(&[4, 2], 3, 2);
    let options = |weight: &Tensor| CrossEntropyOptions {
        weight: Some(weight.clone()),
        ignore_index: Some(1),
        label_smoothing: 0.1,
        ..CrossEntropyOptions::default()
    };
    let half = logits
        .cross_entropy_with(&targets, &options(&weight))
        .unwrap();
    let full = f32(&logits)
        .cross_entropy_with(&targets, &options(&f32(&weight)))
        .unwrap();
    assert_eq!(half.dtype(), DType::BF16);
    assert!((value(&half) - value(&full)).abs() <= 1e-2 * value(&full).abs());
    let y = bf16(uniform(-0.5, 1.5, &[4, 3, 2], 3));
    let bce_options = |pos_weight: Tensor| BceWithLogitsOptions {
        pos_weight: Some(pos_weight),
        ..BceWithLogitsOptions::default()
    };
    let pos_weight = bf16(uniform(0.5, 2.0, &[2], 4));
    let half = logits
        .bce_with_logits_with(&y, &bce_options(pos_weight.clone()))
        .unwrap();
    let full = f32(&logits)
        .bce_with_logits_with(&f32(&y), &bce_options(f32(&pos_weight)))
        .unwrap();
    assert_eq!(half.dtype(), DType::BF16);
    assert!((value(&half) - value(&full)).abs() <= 1e-2 * value(&full).abs());
}
