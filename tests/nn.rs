//! Modules: state-dict names, default initialisation, train/eval behaviour
//! and the options of the norm and embedding layers (the optimizers are in
//! `optim.rs`).

use kiln::nn::{
    BatchNorm2d, BatchNorm2dOptions, CausalSelfAttention, Conv2d, ConvTranspose2d, Dropout,
    Embedding, Flatten, Init, LayerNorm, Linear, Module, Relu, Sequential, Tanh, TensorRole,
};
use kiln::ops::conv::{Conv2dParams, ConvTranspose2dParams};
use kiln::optim::{Sgd, SgdConfig};
use kiln::{DType, Device, Rng, Tensor};

fn names(pairs: &[(String, Tensor)]) -> Vec<&str> {
    pairs.iter().map(|(n, _)| n.as_str()).collect()
}

fn shapes(pairs: &[(String, Tensor)]) -> Vec<Vec<usize>> {
    pairs.iter().map(|(_, t)| t.dims().to_vec()).collect()
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_f64_vec().iter().fold(0.0, |m, v| m.max(v.abs()))
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

// ----- state-dict names ------------------------------------------------------

#[test]
fn sequential_names_children_by_position_like_pytorch() {
    let mut rng = Rng::seed(0);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let inner = Sequential::new()
        .with(Linear::new(8, 8, false, &mut init).unwrap())
        .with(Tanh);
    let model = Sequential::new()
        .with(Conv2d::new(1, 2, [3, 3], Conv2dParams::default(), true, &mut init).unwrap())
        .with(BatchNorm2d::new(2, &mut init).unwrap())
        .with(Relu)
        .with(Flatten)
        .with(Linear::new(4, 8, true, &mut init).unwrap())
        .with(inner);
    let state = model.state_dict();
    assert_eq!(
        names(&state),
        [
            "0.weight",
            "0.bias",
            "1.weight",
            "1.bias",
            "1.running_mean",
            "1.running_var",
            "1.num_batches_tracked",
            "4.weight",
            "4.bias",
            "5.0.weight",
        ]
    );
    assert_eq!(
        names(&model.named_parameters()),
        [
            "0.weight",
            "0.bias",
            "1.weight",
            "1.bias",
            "4.weight",
            "4.bias",
            "5.0.weight"
        ]
    );
    assert_eq!(
        names(&model.named_buffers()),
        ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    );
    assert_eq!(
        model.num_parameters(),
        2 * 9 + 2 + 2 + 2 + 8 * 4 + 8 + 8 * 8
    );
    assert!(model.parameters().iter().all(|p| p.requires_grad()));
    assert!(
        model
            .named_buffers()
            .iter()
            .all(|(_, b)| !b.requires_grad())
    );
    let counter = &state[6].1;
    assert_eq!((counter.dtype(), counter.rank()), (DType::U32, 0));
}

#[test]
fn causal_self_attention_uses_gpt2_names_and_shapes() {
    let mut rng = Rng::seed(0);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let attention = CausalSelfAttention::new(12, 3, 0.0, 1, &mut init).unwrap();
    let state = attention.state_dict();
    assert_eq!(
        names(&state),
        [
            "c_attn.weight",
            "c_attn.bias",
            "c_proj.weight",
            "c_proj.bias"
        ]
    );
    assert_eq!(
        shapes(&state),
        [vec![36, 12], vec![36], vec![12, 12], vec![12]]
    );
    let err = CausalSelfAttention::new(10, 3, 0.0, 1, &mut init)
        .err()
        .expect("10 is not divisible by 3");
    assert!(err.to_string().contains("not divisible"), "{err}");
}

#[test]
fn causal_self_attention_output_ignores_later_positions() {
    let mut rng = Rng::seed(3);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F64);
    let attention = CausalSelfAttention::new(8, 2, 0.0, 1, &mut init).unwrap();
    let (b, t, e) = (2, 5, 8);
    let x = Tensor::randn([b, t, e], DType::F64, Device::Cpu, &mut rng).unwrap();
    let y = attention.forward(&x).unwrap();
    assert_eq!(y.dims(), [b, t, e]);
    // Change only the last position: the first t−1 outputs must not move.
    let mut changed = x.to_vec::<f64>().unwrap();
    for batch in 0..b {
        for c in 0..e {
            changed[(batch * t + t - 1) * e + c] += 1.0;
        }
    }
    let y2 = attention
        .forward(&Tensor::from_vec(changed, [b, t, e]).unwrap())
        .unwrap();
    let (before, after) = (y.to_vec::<f64>().unwrap(), y2.to_vec::<f64>().unwrap());
    for batch in 0..b {
        for pos in 0..t {
            let row = (batch * t + pos) * e;
            let moved = (0..e).any(|c| before[row + c] != after[row + c]);
            assert_eq!(moved, pos == t - 1, "batch {batch}, position {pos}");
        }
    }
}

// ----- initialisation ---------------------------------------------------------

/// Every value lies in [−bound, bound] and the extremes come close to it (so
/// a narrower or wider distribution would fail), with mean near 0.
fn assert_uniform_with_bound(what: &str, t: &Tensor, bound: f64) {
    let values = t.to_f64_vec();
    let largest = max_abs(t);
    assert!(largest <= bound, "{what}: {largest} exceeds bound {bound}");
    assert!(
        largest >= 0.95 * bound,
        "{what}: {largest} far below bound {bound}"
    );
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    assert!(mean.abs() < 0.1 * bound, "{what}: mean {mean}");
}

#[test]
fn default_initialisation_matches_pytorch_bounds() {
    let mut rng = Rng::seed(11);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);

    let linear = Linear::new(200, 30, true, &mut init).unwrap();
    let bound = 1.0 / 200f64.sqrt();
    assert_uniform_with_bound("Linear.weight", &linear.weight, bound);
    assert_eq!(linear.weight.dims(), [30, 200]);
    let bias = linear.bias.as_ref().unwrap();
    assert!(max_abs(bias) <= bound && max_abs(bias) > 0.5 * bound);

    let conv = Conv2d::new(3, 64, [3, 3], Conv2dParams::default(), true, &mut init).unwrap();
    assert_uniform_with_bound("Conv2d.weight", &conv.weight, 1.0 / 27f64.sqrt());

    // PyTorch takes the transposed conv's fan from weight.size(1) = out channels.
    let deconv = ConvTranspose2d::new(
        64,
        3,
        [4, 4],
        ConvTranspose2dParams::default(),
        true,
        &mut init,
    )
    .unwrap();
    assert_eq!(deconv.weight.dims(), [64, 3, 4, 4]);
    assert_uniform_with_bound("ConvTranspose2d.weight", &deconv.weight, 1.0 / 48f64.sqrt());

    let embedding = Embedding::new(100, 40, &mut init).unwrap();
    let values = embedding.weight.to_f64_vec();
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
    assert!(
        mean.abs() < 0.06 && (var - 1.0).abs() < 0.08,
        "N(0,1)? mean {mean}, var {var}"
    );

    let bn = BatchNorm2d::new(5, &mut init).unwrap();
    assert_eq!(bn.weight.as_ref().unwrap().to_f64_vec(), [1.0; 5]);
    assert_eq!(bn.bias.as_ref().unwrap().to_f64_vec(), [0.0; 5]);
    assert_eq!(bn.running_mean.as_ref().unwrap().to_f64_vec(), [0.0; 5]);
    assert_eq!(bn.running_var.as_ref().unwrap().to_f64_vec(), [1.0; 5]);
    let ln = LayerNorm::new(6, &mut init).unwrap();
    assert_eq!(ln.weight.to_f64_vec(), [1.0; 6]);
    assert_eq!(ln.bias.to_f64_vec(), [0.0; 6]);
}

#[test]
fn same_seed_builds_the_same_model() {
    let build = || {
        let mut rng = Rng::seed(5);
        let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
        Linear::new(7, 3, true, &mut init)
            .unwrap()
            .weight
            .to_f64_vec()
    };
    assert_eq!(build(), build());
}

#[test]
fn linear_accepts_any_leading_dims_and_rejects_wrong_width() {
    let mut rng = Rng::seed(2);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F64);
    let linear = Linear::new(3, 2, true, &mut init).unwrap();
    let x = Tensor::randn([2, 4, 3], DType::F64, Device::Cpu, &mut rng).unwrap();
    let y = linear.forward(&x).unwrap();
    assert_eq!(y.dims(), [2, 4, 2]);
    let (w, b) = (
        linear.weight.to_f64_vec(),
        linear.bias.as_ref().unwrap().to_f64_vec(),
    );
    let (xv, yv) = (x.to_f64_vec(), y.to_f64_vec());
    for row in 0..8 {
        for o in 0..2 {
            let want: f64 = b[o] + (0..3).map(|i| xv[row * 3 + i] * w[o * 3 + i]).sum::<f64>();
            assert!(close(yv[row * 2 + o], want, 1e-12));
        }
    }
    let vector = linear.forward(&x.narrow(0, 0, 1).unwrap().reshape([4, 3]).unwrap());
    assert_eq!(vector.unwrap().dims(), [4, 2]);
    let single = linear.forward(&Tensor::from_vec(vec![1.0f64, 2.0, 3.0], [3]).unwrap());
    assert_eq!(single.unwrap().dims(), [2]);
    let err = linear.forward(&Tensor::zeros([4, 5], DType::F64, Device::Cpu).unwrap());
    assert!(err.unwrap_err().to_string().contains("in_features = 3"));
}

// ----- train / eval -----------------------------------------------------------

#[test]
fn batch_norm_uses_batch_statistics_in_training_and_running_ones_in_eval() {
    let mut rng = Rng::seed(4);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F64);
    let bn = BatchNorm2d::new(2, &mut init).unwrap();
    let (n, c, hw) = (4, 2, 9);
    let x = Tensor::randn([n, c, 3, 3], DType::F64, Device::Cpu, &mut rng)
        .unwrap()
        .mul_scalar(2.0)
        .unwrap()
        .add_scalar(3.0)
        .unwrap();
    let xv = x.to_f64_vec();
    let channel_values = |v: &[f64], ch: usize| -> Vec<f64> {
        (0..n)
            .flat_map(|i| v[(i * c + ch) * hw..(i * c + ch + 1) * hw].to_vec())
            .collect()
    };

    // Training: each channel of the output is normalised by its batch statistics.
    let y = bn.forward(&x).unwrap().to_f64_vec();
    for ch in 0..c {
        let out = channel_values(&y, ch);
        let mean = out.iter().sum::<f64>() / out.len() as f64;
        let var = out.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / out.len() as f64;
        assert!(
            close(mean, 0.0, 1e-10) && close(var, 1.0, 1e-4),
            "channel {ch}"
        );
        // running = 0.9·initial + 0.1·batch statistic (unbiased variance).
        let input = channel_values(&xv, ch);
        let m = input.len() as f64;
        let batch_mean = input.iter().sum::<f64>() / m;
        let unbiased = input.iter().map(|v| (v - batch_mean).powi(2)).sum::<f64>() / (m - 1.0);
        assert!(close(
            bn.running_mean.as_ref().unwrap().to_f64_vec()[ch],
            0.1 * batch_mean,
            1e-12
        ));
        assert!(close(
            bn.running_var.as_ref().unwrap().to_f64_vec()[ch],
            0.9 + 0.1 * unbiased,
            1e-12
        ));
    }
    assert_eq!(
        bn.num_batches_tracked.as_ref().unwrap().item().unwrap(),
        1.0
    );

    // Eval: (x − running_mean)/√(running_var + eps), statistics frozen.
    bn.eval();
    let (rm, rv) = (
        bn.running_mean.as_ref().unwrap().to_f64_vec(),
        bn.running_var.as_ref().unwrap().to_f64_vec(),
    );
    let y = bn.forward(&x).unwrap().to_f64_vec();
    for (i, (&out, &input)) in y.iter().zip(&xv).enumerate() {
        let ch = (i / hw) % c;
        assert!(close(out, (input - rm[ch]) / (rv[ch] + 1e-5).sqrt(), 1e-12));
    }
    assert_eq!(bn.running_mean.as_ref().unwrap().to_f64_vec(), rm);
    assert_eq!(bn.running_var.as_ref().unwrap().to_f64_vec(), rv);
    assert_eq!(
        bn.num_batches_tracked.as_ref().unwrap().item().unwrap(),
        1.0
    );
}

// ----- norm and embedding options --------------------------------------------

/// An f64 BatchNorm2d of `channels` on the CPU with `options`.
fn batch_norm_with(channels: usize, options: BatchNorm2dOptions) -> BatchNorm2d {
    let mut rng = Rng::seed(6);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F64);
    BatchNorm2d::with_config(channels, options, &mut init).unwrap()
}

#[test]
fn batch_norm_with_momentum_none_keeps_the_cumulative_average_of_batch_statistics() {
    let options = BatchNorm2dOptions {
        momentum: None,
        ..BatchNorm2dOptions::default()
    };
    let bn = batch_norm_with(2, options);
    let mut rng = Rng::seed(7);
    let batches: Vec<Tensor> = (0..3)
        .map(|i| {
            Tensor::randn([3, 2, 2, 2], DType::F64, Device::Cpu, &mut rng)
                .unwrap()
                .add_scalar(i as f64)
                .unwrap()
        })
        .collect();
    let mut means = vec![];
    for (step, x) in batches.iter().enumerate() {
        bn.forward(x).unwrap();
        let tracked = bn.num_batches_tracked.as_ref().unwrap().item().unwrap();
        assert_eq!(tracked, (step + 1) as f64);
        // Channel 0's batch mean; the running mean is the plain average of them.
        let v = x.to_f64_vec();
        let channel0: Vec<f64> = (0..3).flat_map(|n| v[n * 8..n * 8 + 4].to_vec()).collect();
        means.push(channel0.iter().sum::<f64>() / 12.0);
        let average = means.iter().sum::<f64>() / means.len() as f64;
        let running = bn.running_mean.as_ref().unwrap().to_f64_vec()[0];
        assert!(
            close(running, average, 1e-12),
            "step {step}: {running} vs {average}"
        );
    }
    // The first batch replaced the initial statistics outright (factor 1).
    let bn = batch_norm_with(2, options);
    bn.forward(&batches[0]).unwrap();
    let var = bn.running_var.as_ref().unwrap().to_f64_vec();
    let fresh = batch_norm_with(
        2,
        BatchNorm2dOptions {
            momentum: Some(1.0),
            ..options
        },
    );
    fresh.forward(&batches[0]).unwrap();
    assert_eq!(var, fresh.running_var.as_ref().unwrap().to_f64_vec());
    // Eval neither counts nor updates.
    bn.eval();
    bn.forward(&batches[1]).unwrap();
    assert_eq!(
        bn.num_batches_tracked.as_ref().unwrap().item().unwrap(),
        1.0
    );
    assert_eq!(bn.running_var.as_ref().unwrap().to_f64_vec(), var);
}

#[test]
fn batch_norm_without_running_stats_has_no_buffers_and_uses_batch_statistics_in_eval() {
    let options = BatchNorm2dOptions {
        track_running_stats: false,
        ..BatchNorm2dOptions::default()
    };
    let bn = batch_norm_with(3, options);
    assert_eq!(names(&bn.state_dict()), ["weight", "bias"]);
    assert!(bn.named_buffers().is_empty());
    let mut rng = Rng::seed(8);
    let x = Tensor::randn([2, 3, 2, 3], DType::F64, Device::Cpu, &mut rng)
        .unwrap()
        .add_scalar(2.0)
        .unwrap();
    let batch_normalised = x
        .batch_norm2d(None, None, None, None, true, 0.1, 1e-5)
        .unwrap();
    let train = bn.forward(&x).unwrap().to_f64_vec();
    bn.eval();
    let eval = bn.forward(&x).unwrap().to_f64_vec();
    assert_eq!(train, batch_normalised.to_f64_vec());
    assert_eq!(eval, train);
    // Eval still needs more than one value per channel, as PyTorch's.
    let single = Tensor::ones([1, 3, 1, 1], DType::F64, Device::Cpu).unwrap();
    let err = bn.forward(&single).unwrap_err().to_string();
    assert!(err.contains("more than 1 value per channel"), "{err}");
}

#[test]
fn batch_norm_without_affine_has_no_parameters_and_normalises_only() {
    let options = BatchNorm2dOptions {
        affine: false,
        ..BatchNorm2dOptions::default()
    };
    let bn = batch_norm_with(2, options);
    assert!(bn.weight.is_none() && bn.bias.is_none());
    assert!(bn.named_parameters().is_empty());
    assert_eq!(
        names(&bn.state_dict()),
        ["running_mean", "running_var", "num_batches_tracked"]
    );
    let mut rng = Rng::seed(9);
    let x = Tensor::randn([2, 2, 3, 1], DType::F64, Device::Cpu, &mut rng).unwrap();
    let mean = Tensor::zeros([2], DType::F64, Device::Cpu).unwrap();
    let var = Tensor::ones([2], DType::F64, Device::Cpu).unwrap();
    let expected = x
        .batch_norm2d(Some(&mean), Some(&var), None, None, true, 0.1, 1e-5)
        .unwrap();
    assert_eq!(bn.forward(&x).unwrap().to_f64_vec(), expected.to_f64_vec());
    assert_eq!(
        bn.running_mean.as_ref().unwrap().to_f64_vec(),
        mean.to_f64_vec()
    );
}

#[test]
fn batch_norm_config_rejects_bad_momentum_and_eps() {
    let mut rng = Rng::seed(10);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    for (momentum, eps) in [
        (Some(1.5), 1e-5),
        (Some(-0.1), 1e-5),
        (None, 0.0),
        (None, f64::NAN),
    ] {
        let options = BatchNorm2dOptions {
            momentum,
            eps,
            ..BatchNorm2dOptions::default()
        };
        let err = BatchNorm2d::with_config(2, options, &mut init)
            .err()
            .expect("invalid options")
            .to_string();
        assert!(
            err.starts_with("BatchNorm2d:") && err.contains("momentum"),
            "{err}"
        );
    }
    let err = BatchNorm2d::with_config(0, BatchNorm2dOptions::default(), &mut init).err();
    assert!(err.unwrap().to_string().contains("at least one channel"));
}

#[test]
fn layer_norm_over_a_normalized_shape_has_parameters_of_that_shape() {
    let mut rng = Rng::seed(11);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F64);
    let ln = LayerNorm::with_normalized_shape(&[3, 4], &mut init).unwrap();
    assert_eq!(ln.normalized_shape(), [3, 4]);
    let state = ln.state_dict();
    assert_eq!(names(&state), ["weight", "bias"]);
    assert_eq!(shapes(&state), [vec![3, 4], vec![3, 4]]);
    let x = Tensor::randn([2, 3, 4], DType::F64, Device::Cpu, &mut Rng::seed(13)).unwrap();
    let expected = x
        .layer_norm_over(&[3, 4], Some(&ln.weight), Some(&ln.bias), 1e-5)
        .unwrap();
    assert_eq!(ln.forward(&x).unwrap().to_f64_vec(), expected.to_f64_vec());
    // Each [3, 4] slice has zero mean.
    let y = ln.forward(&x).unwrap().to_f64_vec();
    assert!(close(y[..12].iter().sum::<f64>(), 0.0, 1e-12));
    let wrong = Tensor::zeros([2, 4, 3], DType::F64, Device::Cpu).unwrap();
    let err = ln.forward(&wrong).unwrap_err().to_string();
    assert!(
        err.contains("[*, 3, 4]") && err.contains("[2, 4, 3]"),
        "{err}"
    );
    for bad in [&[][..], &[3, 0]] {
        let err = LayerNorm::with_normalized_shape(bad, &mut init)
            .err()
            .unwrap();
        assert!(err.to_string().starts_with("LayerNorm:"), "{err}");
    }
}

#[test]
fn embedding_with_padding_idx_zeroes_that_row_and_never_trains_it() {
    let mut rng = Rng::seed(12);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let embedding = Embedding::with_padding_idx(6, 4, -2, &mut init).unwrap();
    assert_eq!(embedding.padding_idx, Some(4));
    let weight = embedding.weight.to_f64_vec();
    assert!(
        weight[16..20]
            .iter()
            .all(|&v| v == 0.0 && v.is_sign_positive())
    );
    assert!(weight[..16].iter().chain(&weight[20..]).all(|&v| v != 0.0));
    // The other rows are those `new` draws from the same seed.
    let mut rng = Rng::seed(12);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let plain = Embedding::new(6, 4, &mut init).unwrap().weight.to_f64_vec();
    assert_eq!(weight[..16], plain[..16]);
    assert!(embedding.weight.requires_grad());

    let ids = Tensor::from_indices(vec![4, 1, 4, 4], [2, 2]).unwrap();
    let out = embedding.forward(&ids).unwrap();
    let grads = out.sum_all().unwrap().backward().unwrap();
    let grad = grads.get(&embedding.weight).unwrap().to_f64_vec();
    assert_eq!(grad[4..8], [1.0; 4]);
    assert_eq!(grad[16..20], [0.0; 4]);

    for padding_idx in [6, -7] {
        let err = Embedding::with_padding_idx(6, 4, padding_idx, &mut init).err();
        let err = err.expect("out of range").to_string();
        assert!(
            err.starts_with("Embedding:") && err.contains("padding_idx must be within"),
            "{err}"
        );
    }
}

#[test]
fn dropout_masks_in_training_differ_per_call_reproducibly_and_vanish_in_eval() {
    let p = 0.25;
    let x = Tensor::ones([4000], DType::F32, Device::Cpu).unwrap();
    let masks = |dropout: &Dropout| -> (Vec<f64>, Vec<f64>) {
        let first = dropout.forward(&x).unwrap().to_f64_vec();
        let second = dropout.forward(&x).unwrap().to_f64_vec();
        (first, second)
    };
    let dropout = Dropout::new(p, 42).unwrap();
    let (first, second) = masks(&dropout);
    let scale = 1.0 / (1.0 - p);
    for v in first.iter().chain(&second) {
        assert!(*v == 0.0 || close(*v, scale, 1e-6), "value {v}");
    }
    let dropped = first.iter().filter(|v| **v == 0.0).count() as f64 / first.len() as f64;
    assert!(close(dropped, p, 0.04), "dropped fraction {dropped}");
    assert_ne!(first, second, "two training calls drew the same mask");
    assert_eq!(
        masks(&Dropout::new(p, 42).unwrap()),
        (first.clone(), second)
    );
    assert_ne!(masks(&Dropout::new(p, 43).unwrap()).0, first);

    // Eval through a container: the identity.
    let model = Sequential::new().with(dropout).with(Tanh);
    model.eval();
    let y = model.forward(&x).unwrap().to_f64_vec();
    assert!(y.iter().all(|v| close(*v, 1f64.tanh(), 1e-6)));
    model.train();
    assert!(model.forward(&x).unwrap().to_f64_vec().contains(&0.0));
    assert!(Dropout::new(1.5, 0).is_err() && Dropout::new(-0.1, 0).is_err());
    assert!(
        Dropout::new(1.0, 0).is_ok(),
        "p = 1 is allowed, as torch.nn.Dropout"
    );
}

/// A module that registers one tensor under two names (weight tying).
struct Tied {
    shared: Tensor,
}

impl Module for Tied {
    fn forward(&self, x: &Tensor) -> kiln::Result<Tensor> {
        x.mul(&self.shared)
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visitor(
            &kiln::nn::child_prefix(prefix, "encoder"),
            &self.shared,
            TensorRole::Parameter,
        );
        visitor(
            &kiln::nn::child_prefix(prefix, "decoder"),
            &self.shared,
            TensorRole::Parameter,
        );
    }
}

#[test]
fn tied_weights_are_one_parameter_but_both_names_are_saved() {
    let tied = Tied {
        shared: Tensor::ones([3], DType::F32, Device::Cpu)
            .unwrap()
            .requires_grad_(),
    };
    assert_eq!(names(&tied.named_parameters()), ["encoder"]);
    assert_eq!(names(&tied.state_dict()), ["encoder", "decoder"]);
    assert_eq!(tied.num_parameters(), 3);
    let twice = vec![
        ("encoder".to_string(), tied.shared.clone()),
        ("decoder".to_string(), tied.shared.clone()),
    ];
    let err = Sgd::new(twice, SgdConfig::new(0.1))
        .err()
        .expect("listed twice");
    assert!(err.to_string().contains("decoder"), "{err}");
}
