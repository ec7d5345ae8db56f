//! Indexing (embedding, index_select, gather), dropout and the losses: their
//! gradients, dropout's statistics, and the errors they report.

use kiln::{DType, Device, Reduction, Tensor};
use proptest::prelude::*;

use crate::common::*;

const REDUCTIONS: [Reduction; 2] = [Reduction::Mean, Reduction::Sum];

/// A shape of rank 1..=3 with sizes 1..=4 (size-1 dims included).
fn small_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..=4, 1..=3)
}

/// `len` indices below `bound`; the last repeats the first (for len ≥ 2), so
/// the scatter-add of a repeated index is always exercised.
fn indices_with_repeat(bound: usize, len: usize) -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(0..bound as u32, len).prop_map(|mut ids| {
        if ids.len() >= 2 {
            let last = ids.len() - 1;
            ids[last] = ids[0];
        }
        ids
    })
}

/// (vocabulary V, embedding dim E, ids shape, ids).
fn embedding_case() -> impl Strategy<Value = (usize, usize, Vec<usize>, Vec<u32>)> {
    (1usize..=5, 1usize..=3, 1usize..=3, 1usize..=3).prop_flat_map(|(vocab, dim, rows, cols)| {
        let ids = indices_with_repeat(vocab, rows * cols);
        (Just(vocab), Just(dim), Just(vec![rows, cols]), ids)
    })
}

/// (input shape, dim, 1-D indices into that dim).
fn index_select_case() -> impl Strategy<Value = (Vec<usize>, usize, Vec<u32>)> {
    small_shape().prop_flat_map(|shape| {
        let rank = shape.len();
        (Just(shape), 0..rank, 1usize..=5).prop_flat_map(|(shape, dim, len)| {
            let picked = indices_with_repeat(shape[dim], len);
            (Just(shape), Just(dim), picked)
        })
    })
}

/// (input shape, dim, index shape no larger outside dim, index values).
fn gather_case() -> impl Strategy<Value = (Vec<usize>, usize, Vec<usize>, Vec<u32>)> {
    small_shape().prop_flat_map(|shape| {
        let rank = shape.len();
        (Just(shape), 0..rank).prop_flat_map(|(shape, dim)| {
            let index_dims: Vec<BoxedStrategy<usize>> = shape
                .iter()
                .enumerate()
                .map(|(d, &size)| {
                    if d == dim {
                        (1usize..=4).boxed()
                    } else {
                        (1..=size).boxed()
                    }
                })
                .collect();
            (Just(shape), Just(dim), index_dims).prop_flat_map(|(shape, dim, index_dims)| {
                let numel: usize = index_dims.iter().product();
                let values = prop::collection::vec(0..shape[dim] as u32, numel);
                (Just(shape), Just(dim), Just(index_dims), values)
            })
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn embedding_weight_gradient_accumulates_repeated_ids(
        (vocab, dim, ids_shape, ids) in embedding_case(), seed in any::<u64>()
    ) {
        let ids = indices(&ids, &ids_shape);
        let weight = randn(&[vocab, dim], seed);
        check(|t| Tensor::embedding(&ids, &t[0]), &[weight]);
    }

    #[test]
    fn index_select_gradient_scatter_adds((shape, dim, picked) in index_select_case(), seed in any::<u64>()) {
        let picked = indices(&picked, &[picked.len()]);
        check(|t| t[0].index_select(dim, &picked), &[randn(&shape, seed)]);
    }

    #[test]
    fn gather_gradient_scatter_adds(
        (shape, dim, index_shape, values) in gather_case(), seed in any::<u64>()
    ) {
        let index = indices(&values, &index_shape);
        check(|t| t[0].gather(dim, &index), &[randn(&shape, seed)]);
    }

    #[test]
    fn dropout_gradient_uses_the_forward_mask(
        shape in small_shape(), seed in any::<u64>(), p in prop::sample::select(vec![0.2, 0.5, 0.8])
    ) {
        check(|t| t[0].dropout(p, seed), &[randn(&shape, seed ^ 1)]);
    }

    #[test]
    fn mse_gradients_for_input_and_target(shape in small_shape(), seed in any::<u64>()) {
        let x = randn(&shape, seed);
        let y = randn(&shape, seed ^ 1);
        for reduction in REDUCTIONS {
            check(|t| t[0].mse_loss(&t[1], reduction), &[x.clone(), y.clone()]);
        }
    }

    #[test]
    fn bce_with_logits_gradients_for_input_and_target(shape in small_shape(), seed in any::<u64>()) {
        let x = randn(&shape, seed).mul_scalar(2.0).unwrap();
        // Probabilities here; tests/gradcheck/loss.rs covers real targets outside [0, 1].
        let y = uniform(0.05, 0.95, &shape, seed ^ 1);
        for reduction in REDUCTIONS {
            check(|t| t[0].bce_with_logits(&t[1], reduction), &[x.clone(), y.clone()]);
        }
    }

    #[test]
    fn cross_entropy_gradient_is_softmax_minus_onehot(
        (rows, classes, targets) in (1usize..=4, 1usize..=5)
            .prop_flat_map(|(n, c)| (Just(n), Just(c), prop::collection::vec(0..c as u32, n))),
        seed in any::<u64>()
    ) {
        let targets = indices(&targets, &[rows]);
        let logits = randn(&[rows, classes], seed).mul_scalar(2.0).unwrap();
        for reduction in REDUCTIONS {
            check(|t| t[0].cross_entropy(&targets, reduction), std::slice::from_ref(&logits));
        }
    }

    #[test]
    fn gaussian_kl_gradients_for_mu_and_logvar(shape in small_shape(), seed in any::<u64>()) {
        let mu = randn(&shape, seed);
        let logvar = randn(&shape, seed ^ 1).mul_scalar(0.5).unwrap();
        for reduction in REDUCTIONS {
            check(|t| Tensor::gaussian_kl(&t[0], &t[1], reduction), &[mu.clone(), logvar.clone()]);
        }
    }
}

// ----- forward values ------------------------------------------------------

fn f64_tensor(values: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape).unwrap()
}

#[test]
fn index_select_picks_entries_along_the_middle_dim() {
    // x[i][j][k] = 100i + 10j + k, shape [2, 3, 2]; pick j = 2, 0, 2.
    let values: Vec<f64> = (0..2)
        .flat_map(|i| (0..3).flat_map(move |j| (0..2).map(move |k| (100 * i + 10 * j + k) as f64)))
        .collect();
    let x = f64_tensor(&values, &[2, 3, 2]);
    let out = x.index_select(1, &indices(&[2, 0, 2], &[3])).unwrap();
    assert_eq!(out.dims(), [2, 3, 2]);
    assert_eq!(
        out.to_vec::<f64>().unwrap(),
        vec![
            20., 21., 0., 1., 20., 21., 120., 121., 100., 101., 120., 121.
        ]
    );
}

#[test]
fn index_select_works_on_u32_tensors() {
    // Useful for shuffling labels with a permutation.
    let labels = indices(&[7, 8, 9], &[3]);
    let shuffled = labels.index_select(0, &indices(&[2, 0, 1], &[3])).unwrap();
    assert_eq!(shuffled.to_indices().unwrap(), vec![9, 7, 8]);
}

#[test]
fn gather_follows_pytorch_definition_along_dim_1() {
    // torch.gather([[1, 2], [3, 4]], 1, [[0, 0], [1, 0]]) = [[1, 1], [4, 3]]
    let x = f64_tensor(&[1., 2., 3., 4.], &[2, 2]);
    let out = x.gather(1, &indices(&[0, 0, 1, 0], &[2, 2])).unwrap();
    assert_eq!(out.to_vec::<f64>().unwrap(), vec![1., 1., 4., 3.]);
}

#[test]
fn embedding_output_has_ids_shape_then_embedding_dim() {
    let weight = f64_tensor(&[0., 1., 10., 11., 20., 21.], &[3, 2]);
    let out = Tensor::embedding(&indices(&[2, 0, 2, 1], &[2, 2]), &weight).unwrap();
    assert_eq!(out.dims(), [2, 2, 2]);
    assert_eq!(
        out.to_vec::<f64>().unwrap(),
        vec![20., 21., 0., 1., 20., 21., 10., 11.]
    );
}

#[test]
fn gaussian_kl_matches_closed_form_per_row() {
    // Row 0: mu = 0, logvar = 0 → KL 0. Row 1: mu = [1, 2], logvar = [ln 2, 0]
    // → −½[(1 + ln2 − 1 − 2) + (1 + 0 − 4 − 1)] = ½(2 − ln 2) + 2.
    let ln2 = std::f64::consts::LN_2;
    let mu = f64_tensor(&[0., 0., 1., 2.], &[2, 2]);
    let logvar = f64_tensor(&[0., 0., ln2, 0.], &[2, 2]);
    let row1 = 0.5 * (2.0 - ln2) + 2.0;
    let sum = Tensor::gaussian_kl(&mu, &logvar, Reduction::Sum).unwrap();
    let mean = Tensor::gaussian_kl(&mu, &logvar, Reduction::Mean).unwrap();
    assert_eq!(sum.rank(), 0);
    assert!((sum.item().unwrap() - row1).abs() < 1e-12);
    assert!((mean.item().unwrap() - row1 / 2.0).abs() < 1e-12);
}

#[test]
fn losses_return_rank_0_tensors_and_sum_is_count_times_mean() {
    let x = randn(&[3, 4], 1);
    let y = uniform(0.0, 1.0, &[3, 4], 2);
    let targets = indices(&[0, 3, 1], &[3]);
    type Loss = fn(&Tensor, &Tensor, Reduction) -> kiln::Result<Tensor>;
    let cases: [(Loss, &Tensor, f64); 4] = [
        (|x, y, r| x.mse_loss(y, r), &y, 12.0),
        (|x, y, r| x.bce_with_logits(y, r), &y, 12.0),
        (|x, t, r| x.cross_entropy(t, r), &targets, 3.0),
        (|x, y, r| Tensor::gaussian_kl(x, y, r), &y, 3.0),
    ];
    for (loss, second, count) in cases {
        let mean = loss(&x, second, Reduction::Mean).unwrap();
        let sum = loss(&x, second, Reduction::Sum).unwrap();
        assert_eq!(mean.rank(), 0);
        assert!((sum.item().unwrap() - count * mean.item().unwrap()).abs() < 1e-12);
    }
}

// ----- dropout statistics and determinism ---------------------------------

fn ones(n: usize) -> Tensor {
    Tensor::ones([n], DType::F32, Device::Cpu).unwrap()
}

#[test]
fn dropout_zeroes_about_p_and_preserves_the_mean() {
    let (n, p) = (100_000, 0.3);
    let out = ones(n).dropout(p, 1234).unwrap().to_vec::<f32>().unwrap();
    let zero_fraction = out.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
    let mean = out.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    assert!(
        (zero_fraction - p).abs() < 0.01,
        "zero fraction {zero_fraction}"
    );
    assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
    // Survivors are scaled by exactly 1/(1 − p).
    let scale = (1.0 / (1.0 - p)) as f32;
    assert!(out.iter().all(|&v| v == 0.0 || v == scale));
}

#[test]
fn dropout_mask_is_a_function_of_the_seed() {
    let x = ones(10_000);
    let a = x.dropout(0.5, 7).unwrap().to_vec::<f32>().unwrap();
    let again = x.dropout(0.5, 7).unwrap().to_vec::<f32>().unwrap();
    let other = x.dropout(0.5, 8).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(a, again, "same seed, same mask");
    let differing = a.iter().zip(&other).filter(|(u, v)| u != v).count();
    // Independent masks differ in about half the positions.
    assert!(
        differing > 4_000,
        "only {differing} of 10000 positions differ"
    );
}

#[test]
fn dropout_with_p_0_returns_the_input_unchanged() {
    let x = randn(&[5, 3], 3);
    let out = x.dropout(0.0, 99).unwrap();
    assert_eq!(out.to_vec::<f64>().unwrap(), x.to_vec::<f64>().unwrap());
}

#[test]
fn dropout_gradient_is_zero_exactly_where_the_output_is_zero() {
    let x = uniform(1.0, 2.0, &[50_000], 4).requires_grad_();
    let out = x.dropout(0.4, 11).unwrap();
    let grads = out.sum_all().unwrap().backward().unwrap();
    let dx = grads.get(&x).unwrap().to_vec::<f64>().unwrap();
    for (o, d) in out.to_vec::<f64>().unwrap().iter().zip(&dx) {
        assert_eq!(*o == 0.0, *d == 0.0);
        assert!(*d == 0.0 || (d - 1.0 / 0.6).abs() < 1e-12);
    }
}

// ----- errors --------------------------------------------------------------

#[test]
fn out_of_range_id_names_value_and_position() {
    let weight = randn(&[7, 3], 0);
    let ids = indices(&[1, 2, 3, 9, 0, 0], &[2, 3]);
    let msg = message(Tensor::embedding(&ids, &weight));
    assert!(
        msg.starts_with("embedding:")
            && msg.contains("9")
            && msg.contains("[1, 0]")
            && msg.contains("7 rows"),
        "{msg}"
    );
}

#[test]
fn out_of_range_indices_of_index_select_and_gather_are_named() {
    let x = randn(&[2, 3], 0);
    let msg = message(x.index_select(1, &indices(&[0, 3], &[2])));
    assert!(
        msg.starts_with("index_select:") && msg.contains("value 3") && msg.contains("[1]"),
        "{msg}"
    );
    let msg = message(x.gather(0, &indices(&[0, 1, 2], &[1, 3])));
    assert!(
        msg.starts_with("gather:") && msg.contains("value 2") && msg.contains("[0, 2]"),
        "{msg}"
    );
}

#[test]
fn out_of_range_target_names_value_and_position() {
    let logits = randn(&[3, 4], 0);
    let msg = message(logits.cross_entropy(&indices(&[0, 4, 1], &[3]), Reduction::Mean));
    assert!(
        msg.starts_with("cross_entropy:")
            && msg.contains("value 4")
            && msg.contains("[1]")
            && msg.contains("4 classes"),
        "{msg}"
    );
}

#[test]
fn wrong_target_shapes_are_named() {
    let logits = randn(&[3, 4], 0);
    let msg = message(logits.cross_entropy(&indices(&[0, 1], &[2]), Reduction::Mean));
    assert!(
        msg.starts_with("cross_entropy:") && msg.contains("[3]") && msg.contains("[2]"),
        "{msg}"
    );
    // Unbatched logits [C] take a rank-0 target.
    let msg = message(randn(&[4], 0).cross_entropy(&indices(&[0], &[1]), Reduction::Mean));
    assert!(msg.contains("shape []"), "{msg}");
    let msg = message(logits.mse_loss(&randn(&[4, 3], 1), Reduction::Mean));
    assert!(
        msg.starts_with("mse_loss:") && msg.contains("[4, 3]") && msg.contains("[3, 4]"),
        "{msg}"
    );
    let msg = message(logits.bce_with_logits(&uniform(0.0, 1.0, &[3], 1), Reduction::Sum));
    assert!(
        msg.starts_with("bce_with_logits:") && msg.contains("[3]"),
        "{msg}"
    );
    let msg = message(Tensor::gaussian_kl(
        &logits,
        &randn(&[3, 5], 1),
        Reduction::Mean,
    ));
    assert!(
        msg.starts_with("gaussian_kl:") && msg.contains("[3, 5]"),
        "{msg}"
    );
}

#[test]
fn non_u32_indices_are_rejected_saying_u32() {
    let x = randn(&[4, 3], 0);
    let float_ids = f64_tensor(&[0., 1.], &[2]);
    for msg in [
        message(Tensor::embedding(&float_ids, &x)),
        message(x.index_select(0, &float_ids)),
        message(x.gather(0, &f64_tensor(&[0.; 12], &[4, 3]))),
        message(x.cross_entropy(&f64_tensor(&[0.; 4], &[4]), Reduction::Mean)),
    ] {
        assert!(msg.contains("u32") && msg.contains("f64"), "{msg}");
    }
}

#[test]
fn dropout_probability_outside_0_1_is_rejected() {
    let x = randn(&[3], 0);
    for p in [-0.1, 1.5, f64::NAN] {
        let msg = message(x.dropout(p, 0));
        assert!(
            msg.starts_with("dropout:") && msg.contains("[0, 1]"),
            "{msg}"
        );
    }
}

#[test]
fn dropout_with_p_1_is_x_times_0_as_pytorch() {
    // torch.nn.functional.dropout(x, 1.0) is x·0: zeros, and NaN where x is
    // NaN or infinite; its gradient is zero.
    let x = f64_tensor(&[f64::NAN, -1.0, 2.0, f64::INFINITY], &[4]).requires_grad_();
    let y = x.dropout(1.0, 7).unwrap();
    let values = y.to_f64_vec();
    assert!(values[0].is_nan() && values[3].is_nan(), "{values:?}");
    assert_eq!(&values[1..3], &[0.0, 0.0]);
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(grads.get(&x).unwrap().to_f64_vec(), vec![0.0; 4]);
}

#[test]
fn mean_over_nothing_is_an_error_not_nan() {
    let empty = Tensor::zeros([0, 3], DType::F64, Device::Cpu).unwrap();
    let msg = message(empty.mse_loss(&empty, Reduction::Mean));
    assert!(
        msg.starts_with("mse_loss:") && msg.contains("[0, 3]"),
        "{msg}"
    );
    assert_eq!(
        empty
            .mse_loss(&empty, Reduction::Sum)
            .unwrap()
            .item()
            .unwrap(),
        0.0
    );
    let no_targets = indices(&[], &[0]);
    assert!(empty.cross_entropy(&no_targets, Reduction::Mean).is_err());
}

#[test]
fn index_shape_errors_are_named() {
    let x = randn(&[2, 3], 0);
    let msg = message(x.index_select(0, &indices(&[0, 1], &[1, 2])));
    assert!(msg.contains("1-D") && msg.contains("[1, 2]"), "{msg}");
    let msg = message(x.gather(1, &indices(&[0; 3], &[3, 1])));
    assert!(msg.contains("[3, 1]") && msg.contains("[2, 3]"), "{msg}");
    let msg = message(Tensor::embedding(&indices(&[0], &[1]), &randn(&[4], 0)));
    assert!(msg.contains("2-D") && msg.contains("[4]"), "{msg}");
}
