use kiln::nn::init::Init;
use kiln::nn::{
    BatchNorm2d, BatchNorm2dOptions, CausalSelfAttention, Conv2d, ConvTranspose2d, Dropout,
    Embedding, Flatten, Gelu, KvCache, LayerNorm, LeakyRelu, Linear, Module, Relu, Sequential,
    Sigmoid, Tanh,
};
use kiln::{
    Conv2dPadding, Conv2dParams, ConvTranspose2dParams, DType, Device, GeluApproximation, Rng,
    Tensor,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::sync::atomic::Ordering;

use crate::convolutions::{conv_transpose2d_shape, conv2d_shape};
use crate::harness::{CASE_ON_CUDA, CaseResult, Expect, V, check, cuda_present, probe, valid};
use crate::normalisations::normalized_shape;
use crate::operands::{Spec, build, build_indices, scalar, spec};
use crate::oracles::{device_v, float_v};

// ----- nn layers -------------------------------------------------------------

#[derive(Clone, Debug)]
pub(crate) struct LayerCase {
    sizes: [usize; 4],
    n_head: usize,
    init_dtype: DType,
    init_cuda: bool,
    input: Spec,
    fit: u8,
    training: bool,
    p: f64,
    eps: f64,
    momentum: f64,
    seed: u64,
    config: LayerConfig,
}

/// The options of the layers' other constructors.
#[derive(Clone, Debug)]
struct LayerConfig {
    /// Conv2d / ConvTranspose2d channel groups.
    groups: usize,
    /// Conv2d's padding: 0 "same", 1 "valid", otherwise explicit.
    padding: u8,
    /// BatchNorm2d's affine and track_running_stats, and momentum None
    /// (a cumulative average) when `cumulative`.
    affine: bool,
    track: bool,
    cumulative: bool,
    /// LayerNorm's normalized_shape [2, a] (as `normalized_shape` changes it).
    ns_kind: u8,
    /// Embedding's padding_idx: as `LossOptions::padding`, less `None`.
    padding_idx: u8,
}

fn layer_config() -> impl Strategy<Value = LayerConfig> {
    (
        prop_oneof![3 => Just(1usize), 3 => 2usize..=3, 1 => Just(0usize)],
        0u8..4,
        prop::bool::weighted(0.7),
        prop::bool::weighted(0.7),
        prop::bool::weighted(0.3),
        0u8..8,
        1u8..8,
    )
        .prop_map(
            |(groups, padding, affine, track, cumulative, ns_kind, padding_idx)| LayerConfig {
                groups,
                padding,
                affine,
                track,
                cumulative,
                ns_kind,
                padding_idx,
            },
        )
}

pub(crate) fn layer_case() -> impl Strategy<Value = LayerCase> {
    (
        [0usize..5, 0..5, 0..4, 0..4],
        0usize..3,
        prop_oneof![8 => Just(DType::F32), 1 => Just(DType::F64), 1 => Just(DType::BF16), 1 => Just(DType::U32)],
        prop::bool::weighted(0.3),
        spec(0..=4),
        0u8..8,
        any::<bool>(),
        prop_oneof![4 => 0.0..0.9f64, 1 => scalar()],
        prop_oneof![4 => Just(1e-5f64), 1 => scalar()],
        prop_oneof![4 => 0.0..1.0f64, 1 => scalar()],
        any::<u64>(),
        layer_config(),
    )
        .prop_map(
            |(
                sizes,
                n_head,
                init_dtype,
                init_cuda,
                input,
                fit,
                training,
                p,
                eps,
                momentum,
                seed,
                config,
            )| {
                LayerCase {
                    sizes,
                    n_head,
                    init_dtype,
                    init_cuda,
                    input,
                    fit,
                    training,
                    p,
                    eps,
                    momentum,
                    seed,
                    config,
                }
            },
        )
}

/// Runs `module` on `x` (with backward) and checks its state dict.
fn run_module(
    label: &'static str,
    module: &dyn Module,
    x: &Tensor,
    expect: Expect,
    training: bool,
) -> CaseResult {
    if training {
        module.train();
    } else {
        module.eval();
    }
    let parameters = module.parameters();
    let mut leaves: Vec<&Tensor> = parameters.iter().collect();
    leaves.push(x);
    check(label, expect, &leaves, || module.forward(x))?;
    let state = module.state_dict();
    prop_assert_eq!(
        module.num_parameters(),
        parameters.iter().map(Tensor::numel).sum::<usize>()
    );
    let loaded: std::collections::HashMap<String, Tensor> = state.into_iter().collect();
    probe("load_state_dict", V::Valid, || {
        module.load_state_dict(&loaded)
    })?;
    Ok(())
}

/// The input for a layer: `dims` (fitting the layer) unless `fit` is 0
/// (x as drawn) or 1 (its last dim one too large); in the layer's dtype
/// and device when `fit` > 3.
fn layer_input(case: &LayerCase, dims: Vec<usize>) -> Result<Tensor, TestCaseError> {
    let dims = match case.fit {
        0 => case.input.dims.clone(),
        1 => {
            let mut wrong = dims;
            if let Some(last) = wrong.last_mut() {
                *last += 1;
            }
            wrong
        }
        _ => dims,
    };
    let layer_typed = case.fit > 3;
    build(&Spec {
        dims,
        dtype: if layer_typed {
            case.init_dtype
        } else {
            case.input.dtype
        },
        cuda: if layer_typed {
            case.init_cuda
        } else {
            case.input.cuda
        },
        ..case.input.clone()
    })
}

/// Ids for an embedding of a rows of b: of the input's dtype unless the
/// case fits (u32), one past the vocabulary when `case.fit` is 1, on the
/// input's device when `input_device` else the layer's; and the output the
/// suite expects of them.
fn embedding_ids(
    case: &LayerCase,
    input_device: bool,
    a: usize,
    b: usize,
    weight: &Tensor,
) -> Result<(Tensor, Expect), TestCaseError> {
    let ids_spec = Spec {
        dtype: if case.fit == 0 {
            case.input.dtype
        } else {
            DType::U32
        },
        cuda: if input_device {
            case.input.cuda
        } else {
            case.init_cuda
        },
        ..case.input.clone()
    };
    let ids = build_indices(&ids_spec, a as u32 + u32::from(case.fit == 1))?;
    let in_range = ids.dtype() == DType::U32 && ids.to_f64_vec().iter().all(|&i| (i as usize) < a);
    let mut shape = ids.dims().to_vec();
    shape.push(b);
    let weight_v = if case.init_dtype == DType::F32 {
        V::Valid
    } else {
        V::Maybe
    };
    let v = V::from(in_range)
        .and(device_v(&[&ids, weight]))
        .and(weight_v);
    Ok((ids, Expect::new(Some(shape), v)))
}

pub(crate) fn layers(case: LayerCase) -> CaseResult {
    let [a, b, k0, k1] = case.sizes;
    let device = if case.init_cuda && cuda_present() {
        CASE_ON_CUDA.store(true, Ordering::Relaxed);
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let mut rng = Rng::seed(case.seed);
    let mut init = Init::new(&mut rng, device, case.init_dtype);
    let init_v = V::from(case.init_dtype.is_float()).and(if device == Device::Cpu {
        V::Valid
    } else {
        V::Maybe
    });
    // A forward is certainly valid for fitting f32 (or CPU f64) input beside
    // parameters of its dtype and device, certainly invalid for a u32 input
    // or one that does not fit, and otherwise up to dtype support.
    let forward_v = |x: &Tensor, fits: bool| {
        let same = x.dtype() == case.init_dtype && x.device() == device;
        if !fits || x.dtype() == DType::U32 {
            V::Invalid
        } else if same && float_v(x) == V::Valid && !x.dtype().is_half() {
            V::Valid
        } else {
            V::Maybe
        }
    };
    let n = 1 + case.seed as usize % 3;
    let training = case.training;

    // Linear
    let linear = probe("Linear::new", init_v, || {
        Linear::new(a, b, training, &mut init)
    })?;
    if let Some(layer) = &linear {
        let x = layer_input(&case, vec![n, a])?;
        let fits = x.dims().last() == Some(&a);
        let mut shape = x.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = b;
        }
        let expect = Expect::new(fits.then_some(shape), forward_v(&x, fits));
        run_module("Linear", layer, &x, expect, training)?;
    }

    // Conv2d and ConvTranspose2d, kernel (k0, k1).
    let sizes_v = V::from(a > 0 && b > 0 && k0 > 0 && k1 > 0).and(init_v);
    let params = Conv2dParams {
        stride: [1 + case.seed as usize % 2, 1],
        padding: [k0 / 2, k1 / 2].into(),
        ..Conv2dParams::default()
    };
    let conv = probe("Conv2d::new", sizes_v, || {
        Conv2d::new(a, b, [k0, k1], params, !training, &mut init)
    })?;
    if let Some(layer) = &conv {
        let x = layer_input(&case, vec![n, a, 4, 3])?;
        let shape = conv2d_shape(x.dims(), layer.weight.dims(), None, params);
        let v = forward_v(&x, shape.is_some());
        run_module("Conv2d", layer, &x, Expect::new(shape, v), training)?;
    }
    let transpose_params = ConvTranspose2dParams {
        stride: [2, 1],
        padding: [0, 0],
        output_padding: [case.seed as usize % 2, 0],
        ..ConvTranspose2dParams::default()
    };
    let transpose = probe("ConvTranspose2d::new", sizes_v, || {
        ConvTranspose2d::new(a, b, [k0, k1], transpose_params, true, &mut init)
    })?;
    if let Some(layer) = &transpose {
        let x = layer_input(&case, vec![n, a, 3, 2])?;
        let shape = conv_transpose2d_shape(x.dims(), layer.weight.dims(), None, transpose_params);
        let v = forward_v(&x, shape.is_some());
        run_module(
            "ConvTranspose2d",
            layer,
            &x,
            Expect::new(shape, v),
            training,
        )?;
    }

    // BatchNorm2d with its options.
    let options_v =
        V::from((0.0..=1.0).contains(&case.momentum) && case.eps > 0.0 && case.eps.is_finite());
    let norm = probe("BatchNorm2d::new", V::from(a > 0).and(init_v), || {
        BatchNorm2d::new(a, &mut init)
    })?;
    let norm = match norm {
        Some(layer) => probe("BatchNorm2d::with_options", options_v, || {
            layer.with_options(case.momentum, case.eps)
        })?,
        None => None,
    };
    if let Some(layer) = &norm {
        let x = layer_input(&case, vec![n, a, 2, 1])?;
        let d = x.dims();
        let fits = d.len() == 4 && d[1] == a && (!training || d[0] * d[2] * d[3] > 1);
        // Its running statistics and parameters are in the init dtype.
        let stats_v = if case.init_dtype == DType::F32 {
            V::Valid
        } else {
            V::Maybe
        };
        let expect = Expect::new(Some(d.to_vec()), forward_v(&x, fits).and(stats_v));
        run_module("BatchNorm2d", layer, &x, expect, training)?;
    }

    // LayerNorm over a last dim of a, with any eps.
    let eps = case.eps.abs();
    let layer_norm = probe("LayerNorm::new", V::from(a > 0).and(init_v), || {
        Ok(LayerNorm::new(a, &mut init)?.with_eps(eps))
    })?;
    if let Some(layer) = &layer_norm {
        let x = layer_input(&case, vec![n, 2, a])?;
        let fits = x.dims().last() == Some(&a) && eps.is_finite();
        let expect = Expect::new(Some(x.dims().to_vec()), forward_v(&x, fits));
        run_module("LayerNorm", layer, &x, expect, training)?;
    }

    // Embedding: a vocabulary of a, rows of b.
    let embedding = probe(
        "Embedding::new",
        V::from(a > 0 && b > 0).and(init_v),
        || Embedding::new(a, b, &mut init),
    )?;
    if let Some(layer) = &embedding {
        let (ids, expect) = embedding_ids(&case, case.fit == 2, a, b, &layer.weight)?;
        run_module("Embedding", layer, &ids, expect, training)?;
    }

    // Conv2d and ConvTranspose2d with groups (channels a·g in, b·g out) and
    // conv2d's padding "same" / "valid".
    let config = &case.config;
    let g = config.groups;
    let (cin, cout) = (a * g.max(1), b * g.max(1));
    // An odd channel count with groups 2 or 3 now and then.
    let cin = cin + usize::from(case.seed.is_multiple_of(7));
    let groups_v = V::from(g > 0 && cin % g.max(1) == 0 && cout % g.max(1) == 0);
    let sizes_v = V::from(cin > 0 && cout > 0 && k0 > 0 && k1 > 0)
        .and(groups_v)
        .and(init_v);
    let params = Conv2dParams {
        // Stride 2 now and then: "same" refuses it.
        stride: [1 + usize::from(case.seed.is_multiple_of(5)), 1],
        padding: match config.padding {
            0 => Conv2dPadding::Same,
            1 => Conv2dPadding::Valid,
            _ => [k0 / 2, k1 / 2].into(),
        },
        groups: g,
        ..Conv2dParams::default()
    };
    let grouped_conv = probe("Conv2d::new (groups)", sizes_v, || {
        Conv2d::new(cin, cout, [k0, k1], params, training, &mut init)
    })?;
    if let Some(layer) = &grouped_conv {
        prop_assert_eq!(layer.weight.dims(), &[cout, cin / g, k0, k1][..]);
        let x = layer_input(&case, vec![n, cin, 4, 3])?;
        let shape = conv2d_shape(x.dims(), layer.weight.dims(), None, params);
        let v = forward_v(&x, shape.is_some());
        run_module(
            "Conv2d (groups)",
            layer,
            &x,
            Expect::new(shape, v),
            training,
        )?;
    }
    let transpose_params = ConvTranspose2dParams {
        stride: [1 + case.seed as usize % 2, 2],
        output_padding: [0, 1],
        groups: g,
        ..ConvTranspose2dParams::default()
    };
    let grouped_transpose = probe("ConvTranspose2d::new (groups)", sizes_v, || {
        ConvTranspose2d::new(cin, cout, [k0, k1], transpose_params, !training, &mut init)
    })?;
    if let Some(layer) = &grouped_transpose {
        prop_assert_eq!(layer.weight.dims(), &[cin, cout / g, k0, k1][..]);
        let x = layer_input(&case, vec![n, cin, 2, 3])?;
        let shape = conv_transpose2d_shape(x.dims(), layer.weight.dims(), None, transpose_params);
        let v = forward_v(&x, shape.is_some());
        run_module(
            "ConvTranspose2d (groups)",
            layer,
            &x,
            Expect::new(shape, v),
            training,
        )?;
    }

    // BatchNorm2d::with_config: affine, track_running_stats, momentum None.
    let options = BatchNorm2dOptions {
        eps: case.eps,
        momentum: (!config.cumulative).then_some(case.momentum),
        affine: config.affine,
        track_running_stats: config.track,
    };
    let config_v = V::from(
        a > 0
            && options.momentum.is_none_or(|m| (0.0..=1.0).contains(&m))
            && case.eps > 0.0
            && case.eps.is_finite(),
    );
    // The affine parameters need a float dtype; running statistics alone
    // are buffers of any dtype (as PyTorch's); without either it makes no
    // tensor, so the init's dtype and device do not matter.
    let made_v = if config.affine {
        init_v
    } else if config.track && device != Device::Cpu {
        V::Maybe
    } else {
        V::Valid
    };
    let configured_norm = probe("BatchNorm2d::with_config", config_v.and(made_v), || {
        BatchNorm2d::with_config(a, options, &mut init)
    })?;
    if let Some(layer) = &configured_norm {
        prop_assert_eq!(layer.weight.is_some(), config.affine);
        prop_assert_eq!(layer.running_mean.is_some(), config.track);
        prop_assert_eq!(layer.parameters().len(), if config.affine { 2 } else { 0 });
        let x = layer_input(&case, vec![n, a, 2, 1])?;
        let d = x.dims();
        // Batch statistics in training, and in eval too without running ones.
        let batch_stats = training || !config.track;
        // With neither parameters nor running statistics nothing ties x to
        // `a` channels (PyTorch checks only the rank then).
        let channels_fit = d.len() == 4 && (d[1] == a || !(config.affine || config.track));
        let fits = channels_fit && (!batch_stats || d[0] * d[2] * d[3] > 1);
        let stats_v = if case.init_dtype == DType::F32 {
            V::Valid
        } else {
            V::Maybe
        };
        let expect = Expect::new(Some(d.to_vec()), forward_v(&x, fits).and(stats_v));
        run_module("BatchNorm2d (config)", layer, &x, expect, training)?;
    }

    // LayerNorm::with_normalized_shape over the trailing [2, a] (or changed).
    let shape = normalized_shape(&[n, 2, a], 2, config.ns_kind);
    let shape_v = V::from(!shape.is_empty() && !shape.contains(&0));
    let shaped_norm = probe(
        "LayerNorm::with_normalized_shape",
        shape_v.and(init_v),
        || Ok(LayerNorm::with_normalized_shape(&shape, &mut init)?.with_eps(eps)),
    )?;
    if let Some(layer) = &shaped_norm {
        prop_assert_eq!(layer.normalized_shape(), &shape[..]);
        prop_assert_eq!(layer.weight.dims(), &shape[..]);
        let mut dims = vec![n];
        dims.extend(&shape);
        let x = layer_input(&case, dims)?;
        let fits = x.dims().ends_with(&shape) && eps.is_finite();
        let expect = Expect::new(Some(x.dims().to_vec()), forward_v(&x, fits));
        run_module("LayerNorm (normalized_shape)", layer, &x, expect, training)?;
    }

    // Embedding::with_padding_idx: the padding row starts at zero.
    let vocab = a as isize;
    let padding_idx = match config.padding_idx {
        1 => 0,
        2 => -1,
        3 => vocab - 1,
        4 => vocab,
        5 => -vocab,
        6 => -vocab - 1,
        _ => isize::MIN,
    };
    let padding_v = V::from(a > 0 && b > 0 && -vocab <= padding_idx && padding_idx < vocab);
    let padded_embedding = probe("Embedding::with_padding_idx", padding_v.and(init_v), || {
        Embedding::with_padding_idx(a, b, padding_idx, &mut init)
    })?;
    if let Some(layer) = &padded_embedding {
        let row = if padding_idx < 0 {
            (vocab + padding_idx) as usize
        } else {
            padding_idx as usize
        };
        prop_assert_eq!(layer.padding_idx, Some(row));
        let values = layer.weight.to_f64_vec();
        prop_assert!(values[row * b..(row + 1) * b].iter().all(|&v| v == 0.0));
        let (ids, expect) = embedding_ids(&case, false, a, b, &layer.weight)?;
        run_module("Embedding (padding_idx)", layer, &ids, expect, training)?;
    }

    // CausalSelfAttention: E = a·n_head.
    let embd = a * case.n_head.max(1);
    let new_v = V::from(case.n_head > 0 && (0.0..1.0).contains(&case.p)).and(init_v);
    let attention = probe("CausalSelfAttention::new", new_v, || {
        CausalSelfAttention::new(embd, case.n_head, case.p, case.seed, &mut init)
    })?;
    if let Some(layer) = &attention {
        let x = layer_input(&case, vec![n, 1 + k0, embd])?;
        let fits = x.rank() == 3 && x.dims()[2] == embd;
        // E = 0 leaves no heads to split.
        let v = forward_v(&x, fits).and(if embd == 0 { V::Maybe } else { V::Valid });
        let expect = Expect::new(Some(x.dims().to_vec()), v);
        run_module("CausalSelfAttention", layer, &x, expect, training)?;
        // Generation: x as the prompt, then its first position once more.
        let mut cache = KvCache::default();
        let prompt = probe("CausalSelfAttention::forward_cached", v, || {
            kiln::no_grad_scope(|| layer.forward_cached(&x, &mut cache))
        })?;
        if let Some(prompt) = prompt {
            prop_assert_eq!(prompt.dims(), x.dims());
            prop_assert_eq!(cache.len(), x.dims()[1]);
            let step = valid("narrow", || x.narrow(1, 0, x.dims()[1].min(1)))?;
            let stepped = probe("CausalSelfAttention::forward_cached", v, || {
                kiln::no_grad_scope(|| layer.forward_cached(&step, &mut cache))
            })?;
            if stepped.is_some() {
                prop_assert_eq!(cache.len(), x.dims()[1] + step.dims()[1]);
            }
        }
    }

    // Dropout and the stateless modules, alone and in a Sequential.
    let dropout = probe(
        "Dropout::new",
        V::from((0.0..1.0).contains(&case.p)),
        || Dropout::new(case.p, case.seed),
    )?;
    let x = build(&case.input)?;
    let same = Some(x.dims().to_vec());
    if let Some(layer) = &dropout {
        // In eval mode, or with p = 0, dropout is the identity on any tensor.
        let v = if training && case.p > 0.0 {
            float_v(&x)
        } else {
            V::Valid
        };
        run_module("Dropout", layer, &x, Expect::new(same.clone(), v), training)?;
    }
    let slope = case.eps;
    let stateless: [(&'static str, Box<dyn Module>, V); 5] = [
        ("Relu", Box::new(Relu), V::Valid),
        (
            "LeakyRelu",
            Box::new(LeakyRelu(slope)),
            V::from(slope.is_finite()),
        ),
        ("Tanh", Box::new(Tanh), V::Valid),
        ("Sigmoid", Box::new(Sigmoid), V::Valid),
        ("Gelu", Box::new(Gelu(GeluApproximation::Tanh)), V::Valid),
    ];
    for (label, module, v) in stateless {
        let expect = Expect::new(same.clone(), v.and(float_v(&x)));
        run_module(label, module.as_ref(), &x, expect, training)?;
    }
    let flattened = if x.rank() > 1 {
        vec![x.dims()[0], x.dims()[1..].iter().product()]
    } else {
        x.dims().to_vec()
    };
    run_module(
        "Flatten",
        &Flatten,
        &x,
        Expect::new(Some(flattened), V::Valid),
        training,
    )?;
    let mut sequential = Sequential::new().with(Flatten).with(Relu);
    if let Some(layer) = linear {
        sequential.push(layer);
    }
    sequential.push(Gelu(GeluApproximation::None));
    run_module("Sequential", &sequential, &x, Expect::any(), training)?;

    // A state dict loaded into a layer of other sizes.
    if let (Some(source), Some(target)) = (&conv, &transpose) {
        let (from, to) = (source.state_dict(), target.state_dict());
        let same_shapes = from.len() == to.len()
            && from
                .iter()
                .zip(&to)
                .all(|((f, s), (t, d))| f == t && s.dims() == d.dims());
        let loaded: std::collections::HashMap<String, Tensor> = from.into_iter().collect();
        probe("load_state_dict", V::from(same_shapes), || {
            target.load_state_dict(&loaded)
        })?;
    }
    Ok(())
}
