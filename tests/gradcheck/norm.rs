//! Batch norm, layer norm, softmax, log-softmax and causal attention: their
//! backward against finite differences, batch norm's running statistics, and
//! the errors each op gives for bad inputs.

use kiln::{DType, Device, Tensor};
use proptest::prelude::*;

use crate::common::*;

/// The normalisation eps of these checks. Larger than PyTorch's 1e-5 so that
/// a random channel or row with two nearly equal values stays well
/// conditioned for central differences; the formulas do not depend on it.
const NORM_EPS: f64 = 1e-3;

/// A shape of rank 1..=3 with sizes 1..=4 (size-1 dims included).
fn small_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..=4, 1..=3)
}

/// Which optional affine parameters a check passes after x.
#[derive(Clone, Copy, Debug)]
struct Affine {
    weight: bool,
    bias: bool,
}

impl Affine {
    /// gradcheck's inputs: [x, weight?, bias?].
    fn inputs(self, x: Tensor, weight: Tensor, bias: Tensor) -> Vec<Tensor> {
        let weight = self.weight.then_some(weight);
        let bias = self.bias.then_some(bias);
        [Some(x), weight, bias].into_iter().flatten().collect()
    }

    /// weight and bias read back from those inputs.
    fn params(self, t: &[Tensor]) -> (Option<&Tensor>, Option<&Tensor>) {
        let weight = self.weight.then(|| &t[1]);
        let bias = self.bias.then(|| &t[1 + self.weight as usize]);
        (weight, bias)
    }
}

fn affine() -> impl Strategy<Value = Affine> {
    (any::<bool>(), any::<bool>()).prop_map(|(weight, bias)| Affine { weight, bias })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn batch_norm2d_training_grads_for_x_weight_bias(
        dims in (1usize..=3, 1usize..=3, 1usize..=3, 1usize..=3),
        affine in affine(),
        seed in any::<u64>(),
    ) {
        let (n, c, h, w) = dims;
        // Training needs more than one value per channel.
        prop_assume!(n * h * w > 1);
        let x = randn(&[n, c, h, w], seed).mul_scalar(2.0).unwrap().add_scalar(0.5).unwrap();
        let inputs = affine.inputs(x, uniform(0.5, 1.5, &[c], seed ^ 1), randn(&[c], seed ^ 2));
        check(
            |t| {
                let (weight, bias) = affine.params(t);
                t[0].batch_norm2d(None, None, weight, bias, true, 0.1, NORM_EPS)
            },
            &inputs,
        );
    }

    #[test]
    fn batch_norm2d_training_grads_are_unchanged_by_running_stats(
        dims in (1usize..=3, 1usize..=3, 1usize..=3, 1usize..=3),
        seed in any::<u64>(),
    ) {
        let (n, c, h, w) = dims;
        prop_assume!(n * h * w > 1);
        let x = randn(&[n, c, h, w], seed);
        let weight = uniform(0.5, 1.5, &[c], seed ^ 1);
        let bias = randn(&[c], seed ^ 2);
        let (running_mean, running_var) = (randn(&[c], seed ^ 3), uniform(0.5, 2.0, &[c], seed ^ 4));
        check(
            |t| t[0].batch_norm2d(
                Some(&running_mean),
                Some(&running_var),
                Some(&t[1]),
                Some(&t[2]),
                true,
                0.1,
                NORM_EPS,
            ),
            &[x, weight, bias],
        );
    }

    #[test]
    fn batch_norm2d_eval_grads_for_x_weight_bias(
        dims in (1usize..=3, 1usize..=3, 1usize..=3, 1usize..=3),
        affine in affine(),
        seed in any::<u64>(),
    ) {
        // Eval accepts one value per channel: the statistics are the running ones.
        let (n, c, h, w) = dims;
        let x = randn(&[n, c, h, w], seed);
        let running_mean = randn(&[c], seed ^ 3);
        let running_var = uniform(0.5, 2.0, &[c], seed ^ 4);
        let inputs = affine.inputs(x, uniform(0.5, 1.5, &[c], seed ^ 1), randn(&[c], seed ^ 2));
        check(
            |t| {
                let (weight, bias) = affine.params(t);
                t[0].batch_norm2d(Some(&running_mean), Some(&running_var), weight, bias, false, 0.1, 1e-5)
            },
            &inputs,
        );
    }

    #[test]
    fn layer_norm_grads_for_x_weight_bias(
        shape in small_shape(),
        affine in affine(),
        seed in any::<u64>(),
    ) {
        let width = *shape.last().unwrap();
        let x = randn(&shape, seed).mul_scalar(1.5).unwrap().add_scalar(0.3).unwrap();
        let inputs = affine.inputs(x, uniform(0.5, 1.5, &[width], seed ^ 1), randn(&[width], seed ^ 2));
        check(
            |t| {
                let (weight, bias) = affine.params(t);
                t[0].layer_norm(weight, bias, NORM_EPS)
            },
            &inputs,
        );
    }

    #[test]
    fn layer_norm_over_trailing_dims_grads_for_x_weight_bias(
        shape in prop::collection::vec(1usize..=3, 1..=4),
        pick in any::<u8>(),
        affine in affine(),
        seed in any::<u64>(),
    ) {
        // Normalise over the last k dims, k in 1..=rank.
        let k = 1 + pick as usize % shape.len();
        let normalized = shape[shape.len() - k..].to_vec();
        let x = randn(&shape, seed).mul_scalar(1.5).unwrap().add_scalar(0.3).unwrap();
        let weight = uniform(0.5, 1.5, &normalized, seed ^ 1);
        let inputs = affine.inputs(x, weight, randn(&normalized, seed ^ 2));
        check(
            |t| {
                let (weight, bias) = affine.params(t);
                t[0].layer_norm_over(&normalized, weight, bias, NORM_EPS)
            },
            &inputs,
        );
    }

    #[test]
    fn softmax_and_log_softmax_grads(
        shape in prop::collection::vec(1usize..=5, 1..=3),
        seed in any::<u64>(),
        pick in any::<u8>(),
    ) {
        let x = randn(&shape, seed).mul_scalar(2.0).unwrap();
        check(|t| t[0].softmax(-1), std::slice::from_ref(&x));
        check(|t| t[0].log_softmax(-1), std::slice::from_ref(&x));
        // Any other dim, named from the back.
        let dim = -1 - (pick as usize % shape.len()) as i64;
        check(|t| t[0].softmax(dim), std::slice::from_ref(&x));
        check(|t| t[0].log_softmax(dim), &[x]);
    }

    #[test]
    fn causal_attention_grads_for_q_k_v(
        dims in (1usize..=2, 1usize..=2, 1usize..=5, 1usize..=4),
        seed in any::<u64>(),
    ) {
        let (b, h, t, d) = dims;
        let shape = [b, h, t, d];
        check(
            |x| Tensor::causal_attention(&x[0], &x[1], &x[2]),
            &[randn(&shape, seed), randn(&shape, seed ^ 1), randn(&shape, seed ^ 2)],
        );
    }

    #[test]
    fn causal_self_attention_grads_for_packed_qkv(
        dims in (1usize..=2, 1usize..=5, 1usize..=3, 1usize..=3),
        seed in any::<u64>(),
    ) {
        let (b, t, h, d) = dims;
        check(
            |x| x[0].causal_self_attention(h),
            &[randn(&[b, t, 3 * h * d], seed)],
        );
    }

    #[test]
    fn causal_attention_grads_when_q_k_v_are_one_tensor(
        dims in (1usize..=2, 1usize..=5, 1usize..=4),
        seed in any::<u64>(),
    ) {
        // Self-attention of one tensor: the three gradients must add up.
        let (h, t, d) = dims;
        check(
            |x| Tensor::causal_attention(&x[0], &x[0], &x[0]),
            &[randn(&[1, h, t, d], seed)],
        );
    }
}

/// Per-channel mean and unbiased variance of x [N, C, H, W], by direct loops.
fn channel_mean_and_unbiased_var(x: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let (values, dims) = (x.to_f64_vec(), x.dims().to_vec());
    let (n, c, hw) = (dims[0], dims[1], dims[2] * dims[3]);
    let channel = |ch: usize| -> Vec<f64> {
        (0..n)
            .flat_map(|b| values[(b * c + ch) * hw..(b * c + ch + 1) * hw].to_vec())
            .collect()
    };
    (0..c)
        .map(|ch| {
            let v = channel(ch);
            let m = v.len() as f64;
            let mean = v.iter().sum::<f64>() / m;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (m - 1.0);
            (mean, var)
        })
        .unzip()
}

fn assert_all_close(what: &str, actual: &[f64], expected: &[f64]) {
    assert_eq!(actual.len(), expected.len(), "{what}");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() < 1e-12, "{what}[{i}]: {a} vs {e}");
    }
}

#[test]
fn batch_norm2d_training_updates_running_stats_in_place_with_unbiased_variance() {
    let x = randn(&[3, 2, 2, 3], 7).requires_grad_();
    let running_mean = randn(&[2], 8);
    let running_var = uniform(0.5, 1.5, &[2], 9);
    // Another handle on the same storage (as a module's buffer would be).
    let alias = running_mean.clone();
    let (old_mean, old_var) = (running_mean.to_f64_vec(), running_var.to_f64_vec());
    let momentum = 0.3;
    let y = x
        .batch_norm2d(
            Some(&running_mean),
            Some(&running_var),
            None,
            None,
            true,
            momentum,
            1e-5,
        )
        .unwrap();

    let (batch_mean, batch_var) = channel_mean_and_unbiased_var(&x);
    let blend = |old: &[f64], batch: &[f64]| -> Vec<f64> {
        old.iter()
            .zip(batch)
            .map(|(o, b)| (1.0 - momentum) * o + momentum * b)
            .collect()
    };
    assert_all_close(
        "running_mean",
        &running_mean.to_f64_vec(),
        &blend(&old_mean, &batch_mean),
    );
    assert_all_close(
        "running_var",
        &running_var.to_f64_vec(),
        &blend(&old_var, &batch_var),
    );
    assert_eq!(alias.to_f64_vec(), running_mean.to_f64_vec());

    // The update is not part of the graph: the statistics stay leaves that
    // need no gradient, and backward reaches only x.
    assert!(!running_mean.requires_grad() && running_mean.is_leaf());
    assert!(!running_var.requires_grad() && running_var.is_leaf());
    let grads = y
        .mul(&randn(&[3, 2, 2, 3], 10))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(&running_mean).is_none() && grads.get(&running_var).is_none());
    assert!(grads.get(&x).is_some());
    assert_eq!(grads.len(), 1);
}

#[test]
fn batch_norm2d_updates_running_stats_under_no_grad_and_not_in_eval() {
    let x = randn(&[2, 3, 2, 2], 11);
    let running_mean = Tensor::zeros([3], DType::F64, Device::Cpu).unwrap();
    let running_var = Tensor::ones([3], DType::F64, Device::Cpu).unwrap();
    let stats = (Some(&running_mean), Some(&running_var));
    {
        let _guard = kiln::no_grad();
        x.batch_norm2d(stats.0, stats.1, None, None, true, 0.1, 1e-5)
            .unwrap();
    }
    let (batch_mean, _) = channel_mean_and_unbiased_var(&x);
    let expected: Vec<f64> = batch_mean.iter().map(|m| 0.1 * m).collect();
    assert_all_close("running_mean", &running_mean.to_f64_vec(), &expected);
    let after_training = running_var.to_f64_vec();
    x.batch_norm2d(stats.0, stats.1, None, None, false, 0.1, 1e-5)
        .unwrap();
    assert_eq!(running_mean.to_f64_vec(), expected);
    assert_eq!(running_var.to_f64_vec(), after_training);
}

#[test]
fn batch_norm2d_eval_normalises_with_the_running_stats() {
    let x = randn(&[2, 2, 1, 3], 12);
    let running_mean = Tensor::from_vec(vec![0.5, -1.0], [2]).unwrap();
    let running_var = Tensor::from_vec(vec![4.0, 0.25], [2]).unwrap();
    let y = x
        .batch_norm2d(
            Some(&running_mean),
            Some(&running_var),
            None,
            None,
            false,
            0.1,
            0.0,
        )
        .unwrap();
    let (xs, ys) = (x.to_f64_vec(), y.to_f64_vec());
    for (i, (x, y)) in xs.iter().zip(&ys).enumerate() {
        let channel = (i / 3) % 2;
        let expected = [(x - 0.5) / 2.0, (x + 1.0) / 0.5][channel];
        assert!((y - expected).abs() < 1e-12, "[{i}]: {y} vs {expected}");
    }
}

#[test]
fn batch_norm2d_rejects_bad_shapes_and_missing_stats() {
    let x = randn(&[2, 3, 4, 4], 1);
    let stat = randn(&[3], 2);
    let wrong = randn(&[4], 3);
    assert_error_mentions(
        randn(&[2, 3, 4], 0).batch_norm2d(None, None, None, None, true, 0.1, 1e-5),
        &["batch_norm2d", "[2, 3, 4]"],
    );
    assert_error_mentions(
        x.batch_norm2d(None, None, Some(&wrong), None, true, 0.1, 1e-5),
        &["batch_norm2d", "weight", "[4]", "[2, 3, 4, 4]"],
    );
    assert_error_mentions(
        x.batch_norm2d(None, None, None, Some(&wrong), true, 0.1, 1e-5),
        &["batch_norm2d", "bias", "[4]"],
    );
    assert_error_mentions(
        x.batch_norm2d(Some(&wrong), Some(&stat), None, None, true, 0.1, 1e-5),
        &["batch_norm2d", "running_mean", "[4]"],
    );
    assert_error_mentions(
        x.batch_norm2d(None, None, None, None, false, 0.1, 1e-5),
        &["batch_norm2d", "eval", "running"],
    );
    assert_error_mentions(
        x.batch_norm2d(Some(&stat), None, None, None, true, 0.1, 1e-5),
        &["batch_norm2d", "together"],
    );
    assert_error_mentions(
        randn(&[1, 3, 1, 1], 4).batch_norm2d(None, None, None, None, true, 0.1, 1e-5),
        &[
            "batch_norm2d",
            "Expected more than 1 value per channel when training",
            "[1, 3, 1, 1]",
        ],
    );
    assert_error_mentions(
        x.batch_norm2d(None, None, None, None, true, 0.1, -1.0),
        &["batch_norm2d", "eps"],
    );
    let f32_weight = stat.to_dtype(DType::F32).unwrap();
    assert_error_mentions(
        x.batch_norm2d(None, None, Some(&f32_weight), None, true, 0.1, 1e-5),
        &["batch_norm2d", "f32"],
    );
}

#[test]
fn layer_norm_rejects_bad_shapes() {
    let x = randn(&[2, 5], 1);
    assert_error_mentions(
        x.layer_norm(Some(&randn(&[2], 2)), None, 1e-5),
        &["layer_norm", "weight", "[2]", "[2, 5]"],
    );
    assert_error_mentions(
        x.layer_norm(None, Some(&randn(&[5, 1], 3)), 1e-5),
        &["layer_norm", "bias", "[5, 1]"],
    );
    assert_error_mentions(
        Tensor::scalar(1.0f64).layer_norm(None, None, 1e-5),
        &["layer_norm", "[]"],
    );
    assert_error_mentions(
        Tensor::zeros([3, 0], DType::F64, Device::Cpu)
            .unwrap()
            .layer_norm(None, None, 1e-5),
        &["layer_norm", "[3, 0]"],
    );
}

#[test]
fn layer_norm_over_equals_layer_norm_of_the_flattened_trailing_dims() {
    // Statistics over all normalised dims together: the same as the last-dim
    // op on x with those dims flattened, values and gradients alike.
    let x = randn(&[2, 3, 4, 5], 3).requires_grad_();
    let weight = uniform(0.5, 1.5, &[4, 5], 4).requires_grad_();
    let bias = randn(&[4, 5], 5).requires_grad_();
    let over = x
        .layer_norm_over(&[4, 5], Some(&weight), Some(&bias), 1e-5)
        .unwrap();
    let flat = x
        .reshape([2, 3, 20])
        .unwrap()
        .layer_norm(
            Some(&weight.reshape([20]).unwrap()),
            Some(&bias.reshape([20]).unwrap()),
            1e-5,
        )
        .unwrap()
        .reshape([2, 3, 4, 5])
        .unwrap();
    assert_eq!(over.dims(), [2, 3, 4, 5]);
    assert_all_close("forward", &over.to_f64_vec(), &flat.to_f64_vec());
    let probe = randn(&[2, 3, 4, 5], 6);
    let over_grads = over.backward_with(&probe).unwrap();
    let flat_grads = flat.backward_with(&probe).unwrap();
    for (name, t) in [("x", &x), ("weight", &weight), ("bias", &bias)] {
        let (a, b) = (over_grads.get(t).unwrap(), flat_grads.get(t).unwrap());
        assert_eq!(a.dims(), t.dims(), "grad of {name}: shape");
        assert_all_close(name, &a.to_f64_vec(), &b.to_f64_vec());
    }
}

#[test]
fn layer_norm_over_rejects_shapes_pytorch_rejects() {
    let x = randn(&[2, 3, 4], 1);
    assert_error_mentions(
        x.layer_norm_over(&[4, 5], None, None, 1e-5),
        &[
            "layer_norm",
            "normalized_shape=[4, 5]",
            "[*, 4, 5]",
            "[2, 3, 4]",
        ],
    );
    assert_error_mentions(
        randn(&[4], 2).layer_norm_over(&[2, 4], None, None, 1e-5),
        &["layer_norm", "[*, 2, 4]", "size [4]"],
    );
    assert_error_mentions(
        x.layer_norm_over(&[], None, None, 1e-5),
        &[
            "layer_norm",
            "at least 1-dimensional",
            "normalized_shape = []",
        ],
    );
    assert_error_mentions(
        x.layer_norm_over(&[3, 4], Some(&randn(&[4], 3)), None, 1e-5),
        &[
            "layer_norm",
            "weight of shape [4]",
            "normalized_shape = [3, 4]",
        ],
    );
    assert_error_mentions(
        x.layer_norm_over(&[3, 4], None, Some(&randn(&[12], 4)), 1e-5),
        &[
            "layer_norm",
            "bias of shape [12]",
            "normalized_shape = [3, 4]",
        ],
    );
    assert_error_mentions(
        Tensor::zeros([2, 0, 3], DType::F64, Device::Cpu)
            .unwrap()
            .layer_norm_over(&[0, 3], None, None, 1e-5),
        &["layer_norm", "[0, 3]", "no values", "unsupported"],
    );
    assert_error_mentions(
        x.layer_norm_over(&[3, 4], None, None, f64::NAN),
        &["layer_norm", "eps"],
    );
}

#[test]
fn softmax_and_log_softmax_of_a_scalar_are_1_and_0_as_pytorch() {
    // torch.softmax(torch.tensor(2.), 0) is 1 and log_softmax 0; a 0-d
    // tensor takes dim 0 or -1 and no other.
    let scalar = Tensor::scalar(2.0f64);
    for (dim, op) in [(0, "softmax"), (-1, "log_softmax")] {
        let out = if op == "softmax" {
            scalar.softmax(dim)
        } else {
            scalar.log_softmax(dim)
        }
        .unwrap();
        assert_eq!(out.dims(), [0usize; 0], "{op}");
        assert_eq!(out.item().unwrap(), if op == "softmax" { 1.0 } else { 0.0 });
    }
    assert_error_mentions(scalar.softmax(1), &["softmax", "out of range", "0-d"]);
    assert_error_mentions(
        scalar.log_softmax(-2),
        &["log_softmax", "out of range", "0-d"],
    );
    let indices = Tensor::from_indices(vec![1, 2], [2]).unwrap();
    assert_error_mentions(indices.softmax(-1), &["softmax", "u32"]);
}

#[test]
fn causal_attention_rejects_mismatched_or_non_4d_inputs() {
    let q = randn(&[1, 2, 3, 4], 1);
    assert_error_mentions(
        Tensor::causal_attention(&q, &randn(&[1, 2, 4, 4], 2), &q),
        &["causal_attention", "[1, 2, 3, 4]", "[1, 2, 4, 4]"],
    );
    assert_error_mentions(
        Tensor::causal_attention(&q, &q, &randn(&[1, 2, 3, 5], 3)),
        &["causal_attention", "[1, 2, 3, 5]"],
    );
    let q3 = randn(&[2, 3, 4], 4);
    assert_error_mentions(
        Tensor::causal_attention(&q3, &q3, &q3),
        &["causal_attention", "[B, H, T, D]", "[2, 3, 4]"],
    );
    let empty_head = Tensor::zeros([1, 1, 2, 0], DType::F64, Device::Cpu).unwrap();
    assert_error_mentions(
        Tensor::causal_attention(&empty_head, &empty_head, &empty_head),
        &["causal_attention", "[1, 1, 2, 0]"],
    );
}

/// `causal_self_attention` spelled out as PyTorch's GPT-2 block does it:
/// split qkv, view as heads, attend, merge the heads back.
fn self_attention_composite(qkv: &Tensor, heads: usize) -> kiln::Result<Tensor> {
    let (b, t, e) = (qkv.dims()[0], qkv.dims()[1], qkv.dims()[2] / 3);
    let split = |start: usize| -> kiln::Result<Tensor> {
        qkv.narrow(2, start, e)?
            .reshape([b, t, heads, e / heads])?
            .permute(&[0, 2, 1, 3])
    };
    Tensor::causal_attention(&split(0)?, &split(e)?, &split(2 * e)?)?
        .permute(&[0, 2, 1, 3])?
        .reshape([b, t, e])
}

#[test]
fn causal_self_attention_equals_split_attend_merge_forward_and_backward() {
    // Small (one thread) and large enough for the heads to run on every
    // thread; f64 to 1e-12, and the f32 models' dtype to f32 rounding.
    for (dims, heads, dtype) in [
        ([2, 5, 12], 2, DType::F64),
        ([3, 37, 3 * 48], 3, DType::F64),
        ([4, 64, 3 * 128], 4, DType::F32),
    ] {
        let qkv = randn(&dims, 7).to_dtype(dtype).unwrap().requires_grad_();
        let fused = qkv.causal_self_attention(heads).unwrap();
        let composite = self_attention_composite(&qkv, heads).unwrap();
        let weights = randn(fused.dims(), 8).to_dtype(dtype).unwrap();
        let fused_grad = fused.backward_with(&weights).unwrap();
        let composite_grad = composite.backward_with(&weights).unwrap();
        let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        for (what, a, e) in [
            ("forward", fused.clone(), composite.clone()),
            (
                "grad",
                fused_grad.get(&qkv).unwrap().clone(),
                composite_grad.get(&qkv).unwrap().clone(),
            ),
        ] {
            assert_eq!(a.dims(), e.dims(), "{what} {dims:?}");
            for (i, (x, y)) in a.to_f64_vec().iter().zip(e.to_f64_vec()).enumerate() {
                assert!(
                    (x - y).abs() <= tolerance * y.abs().max(1.0),
                    "{what} {dims:?}[{i}]: fused {x} vs composite {y}"
                );
            }
        }
    }
}

#[test]
fn causal_self_attention_rejects_unpackable_shapes() {
    let qkv = randn(&[2, 3, 12], 1);
    assert_error_mentions(
        randn(&[3, 12], 2).causal_self_attention(2),
        &["causal_self_attention", "[B, T, 3E]", "[3, 12]"],
    );
    assert_error_mentions(
        randn(&[2, 3, 10], 3).causal_self_attention(2),
        &["causal_self_attention", "[2, 3, 10]", "n_head = 2"],
    );
    // E = 4 does not split into 3 heads, and 0 heads is no split at all.
    assert_error_mentions(qkv.causal_self_attention(3), &["n_head = 3"]);
    assert_error_mentions(qkv.causal_self_attention(0), &["n_head = 0"]);
    let indices = Tensor::from_indices(vec![0; 12], [1, 2, 6]).unwrap();
    assert_error_mentions(
        indices.causal_self_attention(1),
        &["causal_self_attention", "u32"],
    );
}

#[test]
fn empty_batches_give_empty_outputs() {
    let empty = |dims: &[usize]| Tensor::zeros(dims, DType::F64, Device::Cpu).unwrap();
    let (mean, var) = (randn(&[3], 1), uniform(0.5, 1.5, &[3], 2));
    let y = empty(&[0, 3, 2, 2])
        .batch_norm2d(Some(&mean), Some(&var), None, None, false, 0.1, 1e-5)
        .unwrap();
    assert_eq!(y.dims(), &[0, 3, 2, 2]);
    assert_eq!(empty(&[0, 4]).softmax(-1).unwrap().dims(), &[0, 4]);
    assert_eq!(empty(&[2, 0]).log_softmax(-1).unwrap().dims(), &[2, 0]);
    assert_eq!(
        empty(&[0, 4]).layer_norm(None, None, 1e-5).unwrap().dims(),
        &[0, 4]
    );
    assert_eq!(
        empty(&[0, 4, 6]).causal_self_attention(2).unwrap().dims(),
        &[0, 4, 2]
    );
    let q = empty(&[2, 1, 0, 3]);
    assert_eq!(
        Tensor::causal_attention(&q, &q, &q).unwrap().dims(),
        &[2, 1, 0, 3]
    );
}
