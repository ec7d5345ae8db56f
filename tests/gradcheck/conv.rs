//! conv2d and conv_transpose2d: gradients of x, weight and bias against
//! finite differences on random small problems (odd sizes, non-square
//! kernels, stride, padding, dilation, output_padding, groups, depthwise,
//! padding="same"), and the errors each op gives for inputs it cannot take.

use kiln::nn::init::Init;
use kiln::nn::{Conv2d, ConvTranspose2d};
use kiln::ops::conv::{Conv2dPadding, Conv2dParams, ConvTranspose2dParams};
use kiln::{DType, Device, Rng, Tensor};
use proptest::prelude::*;

use crate::common::*;

/// One random conv2d problem whose output is not empty.
#[derive(Debug, Clone)]
struct Conv2dCase {
    x: [usize; 4],
    weight: [usize; 4],
    params: Conv2dParams,
    bias: bool,
    seed: u64,
}

fn conv2d_case() -> impl Strategy<Value = Conv2dCase> {
    (
        (1usize..=2, 1usize..=3, 1usize..=3),
        (1usize..=7, 1usize..=7),
        (1usize..=3, 1usize..=3),
        (
            1usize..=3,
            1usize..=3,
            0usize..=2,
            0usize..=2,
            1usize..=2,
            1usize..=2,
        ),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |((n, c, o), (h, w), (kh, kw), (sh, sw, ph, pw, dh, dw), bias, seed)| {
                // Grow the image until the dilated kernel fits inside it plus padding.
                let fit = |size: usize, k: usize, p: usize, d: usize| {
                    size.max((d * (k - 1) + 1).saturating_sub(2 * p))
                };
                Conv2dCase {
                    x: [n, c, fit(h, kh, ph, dh), fit(w, kw, pw, dw)],
                    weight: [o, c, kh, kw],
                    params: Conv2dParams {
                        stride: [sh, sw],
                        padding: [ph, pw].into(),
                        dilation: [dh, dw],
                        ..Conv2dParams::default()
                    },
                    bias,
                    seed,
                }
            },
        )
}

/// One random conv_transpose2d problem whose output is not empty.
#[derive(Debug, Clone)]
struct ConvTranspose2dCase {
    x: [usize; 4],
    weight: [usize; 4],
    params: ConvTranspose2dParams,
    bias: bool,
    seed: u64,
}

/// (H − 1)·s − 2p + d·(k − 1) + output_padding + 1, as PyTorch.
fn transposed_size(h: usize, k: usize, s: usize, p: usize, op: usize, d: usize) -> i64 {
    (h as i64 - 1) * s as i64 - 2 * p as i64 + (d * (k - 1) + op + 1) as i64
}

fn conv_transpose2d_case() -> impl Strategy<Value = ConvTranspose2dCase> {
    (
        (1usize..=2, 1usize..=3, 1usize..=3),
        (1usize..=7, 1usize..=7),
        (1usize..=3, 1usize..=3),
        (
            1usize..=3,
            1usize..=3,
            0usize..=2,
            0usize..=2,
            1usize..=2,
            1usize..=2,
        ),
        (any::<u8>(), any::<u8>()),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(
                (n, cin, cout),
                (h, w),
                (kh, kw),
                (sh, sw, ph, pw, dh, dw),
                (oph, opw),
                bias,
                seed,
            )| {
                // output_padding < max(stride, dilation), as PyTorch requires.
                let (oph, opw) = (oph as usize % sh.max(dh), opw as usize % sw.max(dw));
                // Grow the input until the output is not empty.
                let fit = |mut size: usize, k: usize, s: usize, p: usize, op: usize, d: usize| {
                    while transposed_size(size, k, s, p, op, d) <= 0 {
                        size += 1;
                    }
                    size
                };
                ConvTranspose2dCase {
                    x: [
                        n,
                        cin,
                        fit(h, kh, sh, ph, oph, dh),
                        fit(w, kw, sw, pw, opw, dw),
                    ],
                    weight: [cin, cout, kh, kw],
                    params: ConvTranspose2dParams {
                        stride: [sh, sw],
                        padding: [ph, pw],
                        output_padding: [oph, opw],
                        dilation: [dh, dw],
                        ..ConvTranspose2dParams::default()
                    },
                    bias,
                    seed,
                }
            },
        )
}

/// One random grouped conv2d problem: 1 to 3 groups of 1 to 2 input and
/// output channels each (a depthwise conv when both are 1 per group), with
/// explicit or "same" padding.
fn grouped_conv2d_case() -> impl Strategy<Value = Conv2dCase> {
    (
        (1usize..=2, 1usize..=3, 1usize..=2, 1usize..=2),
        (3usize..=6, 3usize..=6),
        (1usize..=3, 1usize..=3),
        (1usize..=2, 0usize..=1, 1usize..=2),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |((n, groups, cg, og), (h, w), (kh, kw), (stride, pad, dilation), same, seed)| {
                // "same" needs stride 1; explicit padding keeps the output non-empty.
                let (stride, padding) = if same {
                    (1, Conv2dPadding::Same)
                } else {
                    (stride, Conv2dPadding::Explicit([pad; 2]))
                };
                let reach = |k: usize| dilation * (k - 1) + 1;
                Conv2dCase {
                    x: [n, groups * cg, h.max(reach(kh)), w.max(reach(kw))],
                    weight: [groups * og, cg, kh, kw],
                    params: Conv2dParams {
                        stride: [stride; 2],
                        padding,
                        dilation: [dilation; 2],
                        groups,
                    },
                    bias: true,
                    seed,
                }
            },
        )
}

/// x, weight and (if used) bias, from one seed.
fn operands(x: [usize; 4], weight: [usize; 4], bias_len: Option<usize>, seed: u64) -> Vec<Tensor> {
    let mut inputs = vec![randn(&x, seed), randn(&weight, seed.wrapping_add(1))];
    inputs.extend(bias_len.map(|len| randn(&[len], seed.wrapping_add(2))));
    inputs
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn conv2d_gradients_of_input_weight_and_bias_match_finite_differences(case in conv2d_case()) {
        let inputs = operands(case.x, case.weight, case.bias.then_some(case.weight[0]), case.seed);
        check(|t| t[0].conv2d(&t[1], t.get(2), case.params), &inputs);
    }

    #[test]
    fn grouped_conv2d_gradients_match_finite_differences(case in grouped_conv2d_case()) {
        let inputs = operands(case.x, case.weight, Some(case.weight[0]), case.seed);
        check(|t| t[0].conv2d(&t[1], t.get(2), case.params), &inputs);
    }

    #[test]
    fn conv_transpose2d_gradients_of_input_weight_and_bias_match_finite_differences(
        case in conv_transpose2d_case()
    ) {
        let inputs = operands(case.x, case.weight, case.bias.then_some(case.weight[1]), case.seed);
        check(|t| t[0].conv_transpose2d(&t[1], t.get(2), case.params), &inputs);
    }
}

// ----- groups and padding="same": fixed cases ---------------------------------

/// Gradcheck of conv2d with bias on x, weight shapes and params.
fn check_conv2d(x: [usize; 4], weight: [usize; 4], params: Conv2dParams) {
    let inputs = operands(x, weight, Some(weight[0]), 17);
    check(|t| t[0].conv2d(&t[1], t.get(2), params), &inputs);
}

#[test]
fn conv2d_with_two_groups_stride_padding_and_dilation_matches_finite_differences() {
    let params = Conv2dParams {
        stride: [2, 2],
        padding: [1, 1].into(),
        dilation: [2, 1],
        groups: 2,
    };
    check_conv2d([2, 4, 7, 6], [6, 2, 3, 3], params);
}

#[test]
fn depthwise_conv2d_with_channel_multiplier_matches_finite_differences() {
    let params = Conv2dParams {
        padding: 1.into(),
        groups: 3,
        ..Conv2dParams::default()
    };
    check_conv2d([2, 3, 6, 5], [6, 1, 3, 3], params);
}

#[test]
fn conv2d_same_padding_with_odd_totals_matches_finite_differences() {
    // Totals 3 (kernel 4) and 3 (kernel 2, dilation 3): one more row and
    // column at the bottom/right than at the top/left.
    let params = Conv2dParams {
        padding: Conv2dPadding::Same,
        dilation: [1, 3],
        ..Conv2dParams::default()
    };
    check_conv2d([2, 2, 5, 6], [3, 2, 4, 2], params);
    // Grouped, and a dilated kernel wider than the image (PyTorch allows it).
    let params = Conv2dParams {
        padding: Conv2dPadding::Same,
        dilation: [3, 2],
        groups: 2,
        ..Conv2dParams::default()
    };
    check_conv2d([1, 4, 3, 2], [2, 2, 2, 3], params);
}

#[test]
fn conv2d_same_padding_keeps_the_size_and_valid_means_no_padding() {
    let x = randn(&[1, 2, 5, 4], 1);
    let w = randn(&[3, 2, 4, 3], 2);
    let same = Conv2dParams {
        padding: Conv2dPadding::Same,
        dilation: [1, 2],
        ..Conv2dParams::default()
    };
    assert_eq!(x.conv2d(&w, None, same).unwrap().dims(), &[1, 3, 5, 4]);
    let valid = Conv2dParams {
        padding: Conv2dPadding::Valid,
        ..Conv2dParams::default()
    };
    let explicit = Conv2dParams::default();
    assert_eq!(
        x.conv2d(&w, None, valid).unwrap().to_f64_vec(),
        x.conv2d(&w, None, explicit).unwrap().to_f64_vec()
    );
}

#[test]
fn conv_transpose2d_with_two_groups_and_output_padding_matches_finite_differences() {
    let params = ConvTranspose2dParams {
        stride: [2, 3],
        padding: [1, 0],
        output_padding: [1, 2],
        groups: 2,
        ..ConvTranspose2dParams::default()
    };
    let inputs = operands([2, 4, 3, 3], [4, 3, 3, 3], Some(6), 23);
    check(|t| t[0].conv_transpose2d(&t[1], t.get(2), params), &inputs);
    // Depthwise: one input and one output channel per group, dilated.
    let params = ConvTranspose2dParams {
        stride: [2, 1],
        dilation: [1, 2],
        groups: 3,
        ..ConvTranspose2dParams::default()
    };
    let inputs = operands([1, 3, 3, 4], [3, 1, 2, 3], Some(3), 29);
    check(|t| t[0].conv_transpose2d(&t[1], t.get(2), params), &inputs);
}

// ----- errors -----------------------------------------------------------------

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, Device::Cpu).unwrap()
}

fn conv2d_error(
    x: &[usize],
    weight: &[usize],
    bias: Option<&[usize]>,
    params: Conv2dParams,
) -> String {
    let bias = bias.map(zeros);
    zeros(x)
        .conv2d(&zeros(weight), bias.as_ref(), params)
        .expect_err("conv2d should reject these shapes")
        .to_string()
}

fn conv_transpose2d_error(
    x: &[usize],
    weight: &[usize],
    bias: Option<&[usize]>,
    params: ConvTranspose2dParams,
) -> String {
    let bias = bias.map(zeros);
    zeros(x)
        .conv_transpose2d(&zeros(weight), bias.as_ref(), params)
        .expect_err("conv_transpose2d should reject these shapes")
        .to_string()
}

#[test]
fn conv2d_rejects_input_and_weight_of_wrong_rank() {
    let message = conv2d_error(&[3, 8, 8], &[4, 3, 3, 3], None, Conv2dParams::default());
    assert_mentions(&message, &["conv2d", "[3, 8, 8]", "rank 4"]);
    let message = conv2d_error(&[1, 3, 8, 8], &[4, 3, 3], None, Conv2dParams::default());
    assert_mentions(&message, &["conv2d", "weight", "[4, 3, 3]", "rank 4"]);
}

#[test]
fn conv2d_rejects_channel_mismatch_between_input_and_weight() {
    let message = conv2d_error(&[2, 3, 8, 8], &[4, 5, 3, 3], None, Conv2dParams::default());
    assert_mentions(
        &message,
        &[
            "conv2d",
            "[2, 3, 8, 8]",
            "[4, 5, 3, 3]",
            "3 channels",
            "expects 5",
        ],
    );
}

#[test]
fn conv2d_rejects_bias_not_one_per_output_channel() {
    let message = conv2d_error(
        &[2, 3, 8, 8],
        &[4, 3, 3, 3],
        Some(&[5]),
        Conv2dParams::default(),
    );
    assert_mentions(&message, &["conv2d", "bias", "[4]", "[5]", "[4, 3, 3, 3]"]);
}

#[test]
fn conv2d_rejects_kernel_larger_than_padded_input() {
    let message = conv2d_error(&[1, 1, 3, 3], &[1, 1, 5, 5], None, Conv2dParams::default());
    assert_mentions(
        &message,
        &[
            "conv2d",
            "[1, 1, 3, 3]",
            "[1, 1, 5, 5]",
            "input 3x3 with kernel 5 and padding 0 gives an empty output",
        ],
    );
}

#[test]
fn conv2d_rejects_zero_stride_and_zero_dilation() {
    let zero_stride = Conv2dParams {
        stride: [0, 1],
        ..Conv2dParams::default()
    };
    let message = conv2d_error(&[1, 1, 4, 4], &[1, 1, 3, 3], None, zero_stride);
    assert_mentions(&message, &["conv2d", "stride", "[0, 1]"]);
    let zero_dilation = Conv2dParams {
        dilation: [1, 0],
        ..Conv2dParams::default()
    };
    let message = conv2d_error(&[1, 1, 4, 4], &[1, 1, 3, 3], None, zero_dilation);
    assert_mentions(&message, &["conv2d", "dilation", "[1, 0]"]);
}

#[test]
fn conv2d_rejects_operands_of_different_dtypes() {
    let x = Tensor::zeros([1, 1, 4, 4], DType::F64, Device::Cpu).unwrap();
    let message = x
        .conv2d(&zeros(&[1, 1, 3, 3]), None, Conv2dParams::default())
        .unwrap_err()
        .to_string();
    assert_mentions(&message, &["conv2d", "f64", "f32"]);
}

#[test]
fn conv_transpose2d_rejects_input_and_weight_of_wrong_rank() {
    let message = conv_transpose2d_error(
        &[4, 5, 3],
        &[4, 3, 4, 4],
        None,
        ConvTranspose2dParams::default(),
    );
    assert_mentions(&message, &["conv_transpose2d", "[4, 5, 3]", "rank 4"]);
    let message = conv_transpose2d_error(
        &[2, 4, 5, 3],
        &[4, 3, 4],
        None,
        ConvTranspose2dParams::default(),
    );
    assert_mentions(
        &message,
        &["conv_transpose2d", "weight", "[4, 3, 4]", "rank 4"],
    );
}

#[test]
fn conv_transpose2d_rejects_channel_mismatch_between_input_and_weight() {
    // The weight is [in_channels, out_channels, kh, kw]: its first dim must match x.
    let message = conv_transpose2d_error(
        &[2, 4, 5, 3],
        &[3, 4, 4, 4],
        None,
        ConvTranspose2dParams::default(),
    );
    assert_mentions(
        &message,
        &[
            "conv_transpose2d",
            "[2, 4, 5, 3]",
            "[3, 4, 4, 4]",
            "4 channels",
            "expects 3",
        ],
    );
}

#[test]
fn conv_transpose2d_rejects_bias_not_one_per_output_channel() {
    let message = conv_transpose2d_error(
        &[2, 4, 5, 3],
        &[4, 3, 4, 4],
        Some(&[4]),
        ConvTranspose2dParams::default(),
    );
    assert_mentions(
        &message,
        &["conv_transpose2d", "bias", "[3]", "[4]", "[4, 3, 4, 4]"],
    );
}

#[test]
fn conv_transpose2d_rejects_padding_that_crops_the_output_away() {
    let params = ConvTranspose2dParams {
        padding: [1, 1],
        ..ConvTranspose2dParams::default()
    };
    // (1 − 1)·1 − 2·1 + 1·(1 − 1) + 0 + 1 = −1
    let message = conv_transpose2d_error(&[1, 1, 1, 1], &[1, 1, 1, 1], None, params);
    assert_mentions(
        &message,
        &[
            "conv_transpose2d",
            "[1, 1, 1, 1]",
            "input 1x1 with kernel 1",
            "padding 1",
            "empty output (-1x-1)",
        ],
    );
}

#[test]
fn conv_transpose2d_rejects_output_padding_not_below_stride_or_dilation() {
    let params = ConvTranspose2dParams {
        stride: [2, 2],
        output_padding: [2, 0],
        ..ConvTranspose2dParams::default()
    };
    let message = conv_transpose2d_error(&[1, 1, 3, 3], &[1, 1, 3, 3], None, params);
    assert_mentions(
        &message,
        &[
            "conv_transpose2d",
            "output_padding [2, 0]",
            "stride [2, 2]",
            "dilation [1, 1]",
        ],
    );
    // Allowed when below the dilation, as in PyTorch.
    let params = ConvTranspose2dParams {
        dilation: [3, 1],
        ..params
    };
    let out = zeros(&[1, 1, 3, 3])
        .conv_transpose2d(&zeros(&[1, 1, 3, 3]), None, params)
        .unwrap();
    // H: (3 − 1)·2 + 3·2 + 2 + 1 = 13; W: (3 − 1)·2 + 2 + 0 + 1 = 7.
    assert_eq!(out.dims(), &[1, 1, 13, 7]);
}

#[test]
fn empty_batch_gives_empty_output_and_zero_weight_gradient() {
    let x = randn(&[0, 2, 5, 5], 1).requires_grad_();
    let weight = randn(&[3, 2, 3, 3], 2).requires_grad_();
    let bias = randn(&[3], 3).requires_grad_();
    let y = x
        .conv2d(&weight, Some(&bias), Conv2dParams::default())
        .unwrap();
    assert_eq!(y.dims(), &[0, 3, 3, 3]);
    let grads = y.backward_with(&y.zeros_like().unwrap()).unwrap();
    assert_eq!(grads.get(&weight).unwrap().to_f64_vec(), vec![0.0; 54]);
    assert_eq!(grads.get(&bias).unwrap().to_f64_vec(), vec![0.0; 3]);
    let transposed = randn(&[2, 3, 3, 2], 4).requires_grad_();
    let y = randn(&[0, 2, 3, 3], 5)
        .conv_transpose2d(&transposed, None, ConvTranspose2dParams::default())
        .unwrap();
    assert_eq!(y.dims(), &[0, 3, 5, 4]);
}

#[test]
fn conv2d_rejects_groups_that_do_not_divide_the_channels() {
    let groups = |groups| Conv2dParams {
        groups,
        ..Conv2dParams::default()
    };
    let message = conv2d_error(&[1, 4, 8, 8], &[6, 2, 3, 3], None, groups(0));
    assert_mentions(&message, &["conv2d", "groups must be at least 1"]);
    // Output channels (weight dim 0) not divisible, as PyTorch checks first.
    let message = conv2d_error(&[1, 4, 8, 8], &[5, 2, 3, 3], None, groups(2));
    assert_mentions(
        &message,
        &["conv2d", "[5, 2, 3, 3]", "5 channels", "groups=2"],
    );
    // Input channels ≠ weight's in_channels/groups · groups.
    let message = conv2d_error(&[1, 5, 8, 8], &[6, 2, 3, 3], None, groups(2));
    assert_mentions(
        &message,
        &[
            "conv2d",
            "[1, 5, 8, 8]",
            "5 channels",
            "groups=2",
            "expects 4",
        ],
    );
}

#[test]
fn conv2d_rejects_same_padding_with_stride() {
    let params = Conv2dParams {
        stride: [1, 2],
        padding: Conv2dPadding::Same,
        ..Conv2dParams::default()
    };
    let message = conv2d_error(&[1, 1, 6, 6], &[1, 1, 3, 3], None, params);
    assert_mentions(
        &message,
        &["conv2d", "padding=\"same\"", "strided", "stride 1x2"],
    );
}

#[test]
fn conv_transpose2d_rejects_groups_that_do_not_divide_the_channels() {
    let groups = |groups| ConvTranspose2dParams {
        groups,
        ..ConvTranspose2dParams::default()
    };
    let message = conv_transpose2d_error(&[1, 4, 5, 5], &[4, 3, 3, 3], None, groups(0));
    assert_mentions(&message, &["conv_transpose2d", "groups must be at least 1"]);
    let message = conv_transpose2d_error(&[1, 5, 5, 5], &[5, 3, 3, 3], None, groups(2));
    assert_mentions(
        &message,
        &["conv_transpose2d", "[5, 3, 3, 3]", "5 channels", "groups=2"],
    );
    // The bias is [out_channels/groups · groups] = [6].
    let message = conv_transpose2d_error(&[1, 4, 5, 5], &[4, 3, 3, 3], Some(&[3]), groups(2));
    assert_mentions(&message, &["conv_transpose2d", "bias", "[6]", "[3]"]);
}

// ----- modules ----------------------------------------------------------------

#[test]
fn grouped_modules_size_and_initialise_the_weight_like_pytorch() {
    let mut rng = Rng::seed(3);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let params = Conv2dParams {
        groups: 2,
        ..Conv2dParams::default()
    };
    let conv = Conv2d::new(4, 6, [3, 3], params, true, &mut init).unwrap();
    assert_eq!(conv.weight.dims(), &[6, 2, 3, 3]);
    // fan_in = 4/2 · 3 · 3 = 18: values fill U(−1/√18, 1/√18), past 1/√36.
    let largest = |t: &Tensor| t.to_f64_vec().iter().fold(0f64, |m, v| m.max(v.abs()));
    let bound = 1.0 / 18f64.sqrt();
    assert!(largest(&conv.weight) <= bound && largest(&conv.weight) > 1.0 / 36f64.sqrt());
    let params = ConvTranspose2dParams {
        groups: 2,
        ..ConvTranspose2dParams::default()
    };
    let convt = ConvTranspose2d::new(4, 6, [3, 3], params, true, &mut init).unwrap();
    assert_eq!(convt.weight.dims(), &[4, 3, 3, 3]);
    assert_eq!(convt.bias.as_ref().unwrap().dims(), &[6]);
    // PyTorch reads fan_in from weight.size(1): 6/2 · 3 · 3 = 27.
    let bound = 1.0 / 27f64.sqrt();
    assert!(largest(&convt.weight) <= bound && largest(&convt.weight) > 1.0 / 54f64.sqrt());
}

#[test]
fn grouped_modules_reject_channels_not_divisible_by_groups() {
    let mut rng = Rng::seed(3);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let groups = Conv2dParams {
        groups: 3,
        ..Conv2dParams::default()
    };
    let message = Conv2d::new(4, 6, [3, 3], groups, true, &mut init)
        .err()
        .expect("4 input channels in 3 groups")
        .to_string();
    assert_mentions(&message, &["Conv2d", "in_channels = 4", "groups = 3"]);
    let groups = ConvTranspose2dParams {
        groups: 2,
        ..ConvTranspose2dParams::default()
    };
    let message = ConvTranspose2d::new(4, 5, [3, 3], groups, true, &mut init)
        .err()
        .expect("5 output channels in 2 groups")
        .to_string();
    assert_mentions(
        &message,
        &["ConvTranspose2d", "out_channels = 5", "groups = 2"],
    );
}
