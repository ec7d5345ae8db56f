//! Mixed precision on the CPU: 16-bit matrix products and convolutions
//! against an f64 reference, the autocast table (which ops go 16-bit, which
//! stay f32, what comes out), gradients through an autocast graph, and
//! gradient dtypes.

use kiln::{
    Conv2dParams, ConvTranspose2dParams, DType, Device, GeluApproximation, Reduction, Rng, Tensor,
    autocast, bf16,
};

/// The two lower precisions with the relative Frobenius error a product of
/// inputs rounded to them may show against exact arithmetic on the unrounded
/// inputs: a few units of each format's rounding (2⁻⁹ for bf16, 2⁻¹² for f16).
const PRECISIONS: [(DType, f64); 2] = [(DType::BF16, 1e-2), (DType::F16, 2e-3)];

fn randn(dims: &[usize], seed: u64) -> Tensor {
    Tensor::randn(dims, DType::F32, Device::Cpu, &mut Rng::seed(seed)).unwrap()
}

/// ‖got − exact‖_F / ‖exact‖_F.
fn relative_frobenius(got: &Tensor, exact: &Tensor) -> f64 {
    let (g, e) = (got.to_f64_vec(), exact.to_f64_vec());
    assert_eq!(g.len(), e.len());
    let diff: f64 = g.iter().zip(&e).map(|(a, b)| (a - b).powi(2)).sum();
    let norm: f64 = e.iter().map(|b| b * b).sum();
    (diff / norm).sqrt()
}

/// The gradients of Σ y, summed in f32 (y may be 16-bit).
fn backward_of_f32_sum(y: &Tensor) -> kiln::GradStore {
    y.to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}

fn f64_copy(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

#[test]
fn sixteen_bit_matmul_and_linear_match_f64_within_the_format_error() {
    // Sizes that are not multiples of 16 or of the GEMM's blocks: a short A
    // (widened whole) and a tall one (widened a block of rows at a time).
    for rows in [37, 601] {
        sixteen_bit_products_match_f64(rows);
    }
}

fn sixteen_bit_products_match_f64(rows: usize) {
    let (a, b) = (randn(&[rows, 53], 1), randn(&[53, 29], 2));
    let bias = randn(&[29], 3);
    let exact = f64_copy(&a).matmul(&f64_copy(&b)).unwrap();
    let exact_linear = f64_copy(&a)
        .linear(
            &f64_copy(&b.transpose(0, 1).unwrap()),
            Some(&f64_copy(&bias)),
        )
        .unwrap();
    for (dtype, tolerance) in PRECISIONS {
        let _scope = autocast(dtype);
        let product = a.matmul(&b).unwrap();
        assert_eq!(product.dtype(), dtype);
        let error = relative_frobenius(&product, &exact);
        assert!(
            error <= tolerance,
            "{dtype} matmul, {rows} rows: {error:.2e}"
        );
        let linear = a.linear(&b.transpose(0, 1).unwrap(), Some(&bias)).unwrap();
        assert_eq!(linear.dtype(), dtype);
        let error = relative_frobenius(&linear, &exact_linear);
        assert!(
            error <= tolerance,
            "{dtype} linear, {rows} rows: {error:.2e}"
        );
        // Aᵀ·B (a weight gradient's product), its depth in blocks of rows.
        let c = randn(&[rows, 29], 4);
        let exact_tn = f64_copy(&a).gemm(&f64_copy(&c), true, false).unwrap();
        let tn = a
            .to_dtype(dtype)
            .unwrap()
            .gemm(&c.to_dtype(dtype).unwrap(), true, false)
            .unwrap();
        assert_eq!(tn.dtype(), dtype);
        let error = relative_frobenius(&tn, &exact_tn);
        assert!(error <= tolerance, "{dtype} Aᵀ·B, {rows} rows: {error:.2e}");
        // Inputs already 16-bit take the same path outside a scope too.
        drop(_scope);
        let direct = a
            .to_dtype(dtype)
            .unwrap()
            .matmul(&b.to_dtype(dtype).unwrap())
            .unwrap();
        assert_eq!(direct.to_f64_vec(), product.to_f64_vec());
    }
}

#[test]
fn sixteen_bit_convolutions_match_f64_within_the_format_error() {
    let x = randn(&[2, 3, 11, 9], 4);
    let w = randn(&[5, 3, 3, 3], 5);
    let bias = randn(&[5], 6);
    let params = Conv2dParams {
        stride: [2, 1],
        padding: [1, 1].into(),
        ..Conv2dParams::default()
    };
    let exact = f64_copy(&x)
        .conv2d(&f64_copy(&w), Some(&f64_copy(&bias)), params)
        .unwrap();
    let wt = randn(&[3, 4, 4, 4], 7);
    let bias_t = randn(&[4], 8);
    let params_t = ConvTranspose2dParams {
        stride: [2, 2],
        padding: [1, 1],
        output_padding: [0, 0],
        ..ConvTranspose2dParams::default()
    };
    let exact_t = f64_copy(&x)
        .conv_transpose2d(&f64_copy(&wt), Some(&f64_copy(&bias_t)), params_t)
        .unwrap();
    for (dtype, tolerance) in PRECISIONS {
        let _scope = autocast(dtype);
        let y = x.conv2d(&w, Some(&bias), params).unwrap();
        assert_eq!(y.dtype(), dtype);
        let error = relative_frobenius(&y, &exact);
        assert!(error <= tolerance, "{dtype} conv2d: {error:.2e}");
        let yt = x.conv_transpose2d(&wt, Some(&bias_t), params_t).unwrap();
        assert_eq!(yt.dtype(), dtype);
        let error = relative_frobenius(&yt, &exact_t);
        assert!(error <= tolerance, "{dtype} conv_transpose2d: {error:.2e}");
    }
}

#[test]
fn f32_policy_ops_given_huge_bf16_logits_return_finite_f32() {
    // ±1e4 is representable in bf16, and exp of it overflows f32: every op
    // on the f32 list must subtract its maxima in f32 and return f32.
    let logits: Vec<bf16> = [1e4f32, -1e4, 3.0, 1e4, 0.5, -1e4]
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let x = Tensor::from_vec(logits, [2, 3]).unwrap();
    let targets = Tensor::from_vec(vec![0u32, 2], [2]).unwrap();
    let _scope = autocast(DType::BF16);
    let outputs = [
        ("softmax", x.softmax(-1).unwrap()),
        ("log_softmax", x.log_softmax(-1).unwrap()),
        ("layer_norm", x.layer_norm(None, None, 1e-5).unwrap()),
        ("sum", x.sum_all().unwrap()),
        ("mean", x.mean(&[1], false).unwrap()),
        (
            "cross_entropy",
            x.cross_entropy(&targets, Reduction::Mean).unwrap(),
        ),
        (
            "bce_with_logits",
            x.bce_with_logits(&x.sigmoid().unwrap(), Reduction::Mean)
                .unwrap(),
        ),
    ];
    for (name, out) in outputs {
        assert_eq!(out.dtype(), DType::F32, "{name}");
        assert!(
            out.to_f64_vec().iter().all(|v| v.is_finite()),
            "{name}: {:?}",
            out.to_f64_vec()
        );
    }
    let p = x.softmax(-1).unwrap().to_f64_vec();
    assert_eq!(&p[..3], &[1.0, 0.0, 0.0]);
}

#[test]
fn outside_autocast_f32_policy_ops_give_back_the_input_dtype() {
    let x = randn(&[4, 6], 9).to_dtype(DType::F16).unwrap();
    for out in [
        x.softmax(-1).unwrap(),
        x.layer_norm(None, None, 1e-5).unwrap(),
        x.sum(&[0], false).unwrap(),
        x.max(1, false).unwrap(),
        x.exp().unwrap(),
    ] {
        assert_eq!(out.dtype(), DType::F16);
    }
    // And inside a scope the same ops return f32.
    let _scope = autocast(DType::F16);
    assert_eq!(x.softmax(-1).unwrap().dtype(), DType::F32);
    assert_eq!(x.exp().unwrap().dtype(), DType::F32);
    // Ops off the table keep their input's dtype.
    assert_eq!(x.gelu(GeluApproximation::Tanh).unwrap().dtype(), DType::F16);
}

/// A small two-layer network with every kind of op the models use:
/// linear, GELU, layer norm, residual add, attention, cross entropy.
fn network_loss(x: &Tensor, w1: &Tensor, b1: &Tensor, w2: &Tensor, targets: &Tensor) -> Tensor {
    let h = x.linear(w1, Some(b1)).unwrap(); // [2, 5, 12] = qkv of E = 4
    let attended = h.causal_self_attention(2).unwrap(); // [2, 5, 4]
    let mixed = attended
        .gelu(GeluApproximation::Tanh)
        .unwrap()
        .add(&x.narrow(2, 0, 4).unwrap())
        .unwrap()
        .layer_norm(None, None, 1e-5)
        .unwrap();
    let logits = mixed.linear(w2, None).unwrap().reshape([10, 7]).unwrap();
    logits.cross_entropy(targets, Reduction::Mean).unwrap()
}

#[test]
fn autocast_gradients_follow_the_f64_gradients_along_random_directions() {
    let x = randn(&[2, 5, 6], 10);
    let params = [
        randn(&[12, 6], 11).mul_scalar(0.5).unwrap(),
        randn(&[12], 12).mul_scalar(0.1).unwrap(),
        randn(&[7, 4], 13).mul_scalar(0.5).unwrap(),
    ];
    let targets = Tensor::from_vec((0..10u32).map(|i| i * 3 % 7).collect(), [10]).unwrap();
    let loss_f64 = |p: &[Tensor]| -> f64 {
        network_loss(&f64_copy(&x), &p[0], &p[1], &p[2], &targets).to_f64_vec()[0]
    };
    for (dtype, tolerance) in [(DType::BF16, 3e-2), (DType::F16, 5e-3)] {
        let leaves: Vec<Tensor> = params.iter().map(|p| p.detach().requires_grad_()).collect();
        let loss = {
            let _scope = autocast(dtype);
            network_loss(&x, &leaves[0], &leaves[1], &leaves[2], &targets)
        };
        assert_eq!(loss.dtype(), DType::F32);
        let grads = loss.backward().unwrap();
        for (i, leaf) in leaves.iter().enumerate() {
            let g = grads.get(leaf).unwrap();
            // f32 parameters get f32 gradients, whatever ran in between.
            assert_eq!(g.dtype(), DType::F32, "{dtype} parameter {i}");
            // d/dε L(p + ε·v) from the autocast gradient and from f64
            // central differences of the same network in exact arithmetic.
            let v = randn(leaf.dims(), 100 + i as u64);
            let along: f64 = g
                .to_f64_vec()
                .iter()
                .zip(v.to_f64_vec())
                .map(|(a, b)| a * b)
                .sum();
            let eps = 1e-5;
            let shifted = |sign: f64| {
                let mut p: Vec<Tensor> = params.iter().map(f64_copy).collect();
                p[i] = p[i]
                    .add(&f64_copy(&v).mul_scalar(sign * eps).unwrap())
                    .unwrap();
                loss_f64(&p)
            };
            let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps);
            let error = (along - numeric).abs() / numeric.abs().max(1e-3);
            assert!(
                error <= tolerance,
                "{dtype} parameter {i}: autocast {along:.6} vs f64 {numeric:.6} ({error:.2e})"
            );
        }
    }
}

#[test]
fn backward_keeps_the_forward_dtypes_and_promotion_sends_gradients_home() {
    let a = randn(&[3, 4], 14)
        .to_dtype(DType::BF16)
        .unwrap()
        .requires_grad_();
    let b = randn(&[3, 4], 15).requires_grad_();
    let sum = a.mul(&b).unwrap();
    assert_eq!(sum.dtype(), DType::F32);
    let grads = sum.sum_all().unwrap().backward().unwrap();
    assert_eq!(grads.get(&a).unwrap().dtype(), DType::BF16);
    assert_eq!(grads.get(&b).unwrap().dtype(), DType::F32);
    // The gradient of a·b w.r.t. a is b, rounded once to bf16.
    let expected: Vec<f64> = b
        .to_f64_vec()
        .iter()
        .map(|&v| bf16::from_f64(v).to_f64())
        .collect();
    assert_eq!(grads.get(&a).unwrap().to_f64_vec(), expected);
}

#[test]
fn autocast_leaves_f64_alone_and_refuses_a_wide_lower_precision() {
    let a = f64_copy(&randn(&[3, 3], 16));
    let _scope = autocast(DType::BF16);
    assert_eq!(a.matmul(&a).unwrap().dtype(), DType::F64);
    let err = kiln::try_autocast(DType::F32).err().unwrap().to_string();
    assert!(err.contains("bf16 or f16"), "{err}");
}

#[test]
fn batch_norm_of_bf16_keeps_f32_statistics_and_refuses_16_bit_running_stats() {
    let x = randn(&[4, 3, 5, 5], 17).to_dtype(DType::BF16).unwrap();
    let running_mean = Tensor::zeros([3], DType::F32, Device::Cpu).unwrap();
    let running_var = Tensor::ones([3], DType::F32, Device::Cpu).unwrap();
    let exact = f64_copy(&x)
        .batch_norm2d(None, None, None, None, true, 0.1, 1e-5)
        .unwrap();
    let _scope = autocast(DType::BF16);
    let y = x
        .batch_norm2d(
            Some(&running_mean),
            Some(&running_var),
            None,
            None,
            true,
            0.1,
            1e-5,
        )
        .unwrap();
    // Normalised in f32 from the bf16 values, y rounded once to bf16.
    assert_eq!(y.dtype(), DType::BF16);
    let error = relative_frobenius(&y, &exact);
    assert!(error < 4e-3, "{error:.2e}");
    assert_eq!(running_var.dtype(), DType::F32);
    assert_eq!(running_mean.dtype(), DType::F32);
    assert!(running_mean.to_f64_vec().iter().any(|&m| m != 0.0));
    // Gradients: dx in x's bf16, dγ and dβ in the parameters' f32, all close
    // to f64's.
    let leaf = x.detach().requires_grad_();
    let gamma = randn(&[3], 18).requires_grad_();
    let beta = randn(&[3], 19).requires_grad_();
    let probe = randn(&[4, 3, 5, 5], 20);
    let loss_of = |x: &Tensor, g: &Tensor, b: &Tensor, probe: &Tensor| {
        x.batch_norm2d(None, None, Some(g), Some(b), true, 0.1, 1e-5)
            .unwrap()
            .mul(probe)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss_of(&leaf, &gamma, &beta, &probe).backward().unwrap();
    let (wide, g64, b64) = (
        f64_copy(&x).requires_grad_(),
        f64_copy(&gamma).requires_grad_(),
        f64_copy(&beta).requires_grad_(),
    );
    let exact = loss_of(&wide, &g64, &b64, &f64_copy(&probe))
        .backward()
        .unwrap();
    for (got, want, dtype) in [
        (&leaf, &wide, DType::BF16),
        (&gamma, &g64, DType::F32),
        (&beta, &b64, DType::F32),
    ] {
        let g = grads.get(got).unwrap();
        assert_eq!(g.dtype(), dtype);
        let error = relative_frobenius(g, exact.get(want).unwrap());
        assert!(error < 1e-2, "{dtype} gradient: {error:.2e}");
    }
    let half_stats = running_var.to_dtype(DType::BF16).unwrap();
    let err = x
        .batch_norm2d(
            Some(&running_mean),
            Some(&half_stats),
            None,
            None,
            true,
            0.1,
            1e-5,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("running_mean and running_var"), "{err}");
}

#[test]
fn unpacked_causal_attention_under_autocast_runs_in_bf16_and_matches_f64() {
    let [q, k, v] = [21, 22, 23].map(|seed| randn(&[2, 3, 7, 8], seed));
    let exact = Tensor::causal_attention(&f64_copy(&q), &f64_copy(&k), &f64_copy(&v)).unwrap();
    let _scope = autocast(DType::BF16);
    let out = Tensor::causal_attention(&q, &k, &v).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    let error = relative_frobenius(&out, &exact);
    assert!(error <= 1e-2, "{error:.2e}");
}

/// The packed attention of a 16-bit qkv (computed a batch item at a time)
/// against the f64 one: output and gradient, several items and heads.
#[test]
fn packed_causal_self_attention_in_16_bits_matches_f64_with_its_gradient() {
    let qkv = randn(&[3, 11, 3 * 12], 24);
    let probe = randn(&[3, 11, 12], 25);
    let exact_leaf = f64_copy(&qkv).requires_grad_();
    let exact = exact_leaf.causal_self_attention(3).unwrap();
    let exact_grad = exact
        .mul(&f64_copy(&probe))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(&exact_leaf)
        .unwrap()
        .clone();
    for (dtype, tolerance) in PRECISIONS {
        let leaf = qkv.to_dtype(dtype).unwrap().requires_grad_();
        let out = leaf.causal_self_attention(3).unwrap();
        assert_eq!(out.dtype(), dtype);
        let error = relative_frobenius(&out, &exact);
        assert!(error <= tolerance, "{dtype} output: {error:.2e}");
        let grads = backward_of_f32_sum(&out.mul(&probe.to_dtype(dtype).unwrap()).unwrap());
        let grad = grads.get(&leaf).unwrap();
        assert_eq!(grad.dtype(), dtype);
        let error = relative_frobenius(grad, &exact_grad);
        assert!(error <= tolerance, "{dtype} gradient: {error:.2e}");
    }
}

/// A 16-bit sum over leading dims outside the graph (a bias gradient) is
/// summed a chunk of rows at a time; it equals the sum of the widened
/// tensor rounded back, in 16 bits outside autocast and f32 inside.
#[test]
fn sixteen_bit_sums_over_leading_dims_match_the_widened_sum() {
    for dtype in [DType::BF16, DType::F16] {
        // 2·300·45 values: more than one chunk and enough to split across threads.
        let x = randn(&[2, 300, 45], 26)
            .mul_scalar(3.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let wide = x.to_dtype(DType::F32).unwrap();
        for (dims, keepdim) in [(&[0usize][..], false), (&[0, 1][..], true)] {
            let got = kiln::no_grad_scope(|| x.sum(dims, keepdim)).unwrap();
            let expected = wide.sum(dims, keepdim).unwrap().to_dtype(dtype).unwrap();
            assert_eq!(got.dtype(), dtype);
            assert_eq!(got.dims(), expected.dims());
            assert_eq!(
                got.to_f64_vec(),
                expected.to_f64_vec(),
                "{dtype} sum over {dims:?}"
            );
            let _scope = autocast(DType::BF16);
            let inside = kiln::no_grad_scope(|| x.sum(dims, keepdim)).unwrap();
            assert_eq!(inside.dtype(), DType::F32);
        }
    }
}

/// 16-bit conv2d and conv_transpose2d on a batch of DCGAN-sized layers
/// (several of the CPU kernels' im2col chunks): forward and the input and
/// weight gradients against f64.
#[test]
fn sixteen_bit_convolutions_match_f64_with_gradients() {
    let x = randn(&[6, 16, 64, 64], 27);
    let w = randn(&[8, 16, 3, 3], 28).mul_scalar(0.1).unwrap();
    let bias = randn(&[8], 29);
    let wt = randn(&[16, 4, 2, 2], 30).mul_scalar(0.1).unwrap();
    let conv_params = Conv2dParams {
        padding: [1, 1].into(),
        ..Conv2dParams::default()
    };
    let transpose_params = ConvTranspose2dParams {
        stride: [2, 2],
        padding: [0, 0],
        output_padding: [0, 0],
        ..ConvTranspose2dParams::default()
    };
    type Layer = fn(&Tensor, &Tensor, &Tensor, Conv2dParams, ConvTranspose2dParams) -> Tensor;
    let layers: [(&str, Layer, bool); 2] = [
        (
            "conv2d",
            |x, w, b, p, _| x.conv2d(w, Some(b), p).unwrap(),
            false,
        ),
        (
            "conv_transpose2d",
            |x, w, _, _, p| x.conv_transpose2d(w, None, p).unwrap(),
            true,
        ),
    ];
    for (name, layer, transposed) in layers {
        let weight = if transposed { &wt } else { &w };
        let exact_leaves =
            [f64_copy(&x), f64_copy(weight), f64_copy(&bias)].map(|t| t.requires_grad_());
        let exact = layer(
            &exact_leaves[0],
            &exact_leaves[1],
            &exact_leaves[2],
            conv_params,
            transpose_params,
        );
        let exact_grads = exact.sum_all().unwrap().backward().unwrap();
        for (dtype, tolerance) in PRECISIONS {
            let leaves = [&x, weight, &bias].map(|t| t.to_dtype(dtype).unwrap().requires_grad_());
            let y = layer(
                &leaves[0],
                &leaves[1],
                &leaves[2],
                conv_params,
                transpose_params,
            );
            assert_eq!(y.dtype(), dtype);
            let error = relative_frobenius(&y, &exact);
            assert!(error <= tolerance, "{dtype} {name}: {error:.2e}");
            let grads = backward_of_f32_sum(&y);
            for (i, which) in ["x", "weight"].iter().enumerate() {
                let got = grads.get(&leaves[i]).unwrap();
                let want = exact_grads.get(&exact_leaves[i]).unwrap();
                let error = relative_frobenius(got, want);
                assert!(error <= tolerance, "{dtype} {name} d{which}: {error:.2e}");
            }
        }
    }
}

/// Batch norm of a 16-bit x with f32 parameters and running statistics:
/// output, dx and the parameters' gradients against f64, training and eval.
#[test]
fn sixteen_bit_batch_norm_matches_f64_with_gradients() {
    // Each image offset differently, so the batch statistics are not those
    // of any one image.
    let offsets = Tensor::from_vec(vec![0f32, 2.0, 4.0, 6.0, 8.0, 10.0], [6, 1, 1, 1]).unwrap();
    let x = randn(&[6, 16, 64, 64], 31).add(&offsets).unwrap();
    let (weight, bias) = (randn(&[16], 32), randn(&[16], 33));
    for training in [true, false] {
        let run = |x: &Tensor, weight: &Tensor, bias: &Tensor| {
            let dtype = if weight.dtype() == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            let running_mean = randn(&[16], 34).to_dtype(dtype).unwrap();
            let running_var = randn(&[16], 35)
                .powf(2.0)
                .unwrap()
                .add_scalar(0.5)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let leaves = [x, weight, bias].map(|t| t.clone().requires_grad_());
            let y = leaves[0]
                .batch_norm2d(
                    Some(&running_mean),
                    Some(&running_var),
                    Some(&leaves[1]),
                    Some(&leaves[2]),
                    training,
                    0.1,
                    1e-5,
                )
                .unwrap();
            let probe = randn(y.dims(), 36).to_dtype(y.dtype()).unwrap();
            let grads = backward_of_f32_sum(&y.mul(&probe).unwrap());
            let grads: Vec<Tensor> = leaves
                .iter()
                .map(|l| grads.get(l).unwrap().clone())
                .collect();
            (y, grads, running_mean)
        };
        let exact = run(&f64_copy(&x), &f64_copy(&weight), &f64_copy(&bias));
        for (dtype, tolerance) in PRECISIONS {
            let got = run(&x.to_dtype(dtype).unwrap(), &weight, &bias);
            assert_eq!(got.0.dtype(), dtype);
            let error = relative_frobenius(&got.0, &exact.0);
            assert!(
                error <= tolerance,
                "{dtype} training={training} y: {error:.2e}"
            );
            for (i, name) in ["dx", "dweight", "dbias"].iter().enumerate() {
                let error = relative_frobenius(&got.1[i], &exact.1[i]);
                assert!(
                    error <= tolerance,
                    "{dtype} training={training} {name}: {error:.2e}"
                );
            }
            // From the 16-bit x: its rounding moves the batch mean a little.
            let error = relative_frobenius(&got.2, &exact.2);
            assert!(
                error <= tolerance,
                "{dtype} training={training} running mean: {error:.2e}"
            );
        }
    }
}
