//! conv2d and conv_transpose2d against PyTorch: output and the gradients of
//! x, weight and bias for the stored upstream gradient, groups and
//! padding="same" included.

use crate::common::Golden;
use kiln::Tensor;
use kiln::ops::conv::{Conv2dPadding, Conv2dParams, ConvTranspose2dParams};

/// Runs `f(x, weight, bias)` on the case's inputs, checks `out`, backpropagates
/// `grad_out` and checks `grad_x`, `grad_weight` and (when stored) `grad_bias`.
fn check_case(
    case: &str,
    f: impl Fn(&Golden, &Tensor, &Tensor, Option<&Tensor>) -> kiln::Result<Tensor>,
) {
    let g = Golden::load(case);
    let has_bias = match g.meta("bias") {
        "true" => true,
        "false" => false,
        other => panic!("{case}: bias metadata {other:?}"),
    };
    assert_eq!(has_bias, g.has("bias"), "{case}: bias metadata vs tensors");
    let x = g.tensor("x").requires_grad_();
    let weight = g.tensor("weight").requires_grad_();
    let bias = has_bias.then(|| g.tensor("bias").requires_grad_());
    let out = f(&g, &x, &weight, bias.as_ref()).unwrap();
    g.assert_close("out", &out);
    let grads = out.backward_with(&g.tensor("grad_out")).unwrap();
    g.assert_close("grad_x", grads.get(&x).unwrap());
    g.assert_close("grad_weight", grads.get(&weight).unwrap());
    if let Some(bias) = &bias {
        g.assert_close("grad_bias", grads.get(bias).unwrap());
    }
}

/// Cases stored before groups existed have no `groups` metadata: one group.
fn one_group(_: &Golden) -> usize {
    1
}

/// The case's `groups` metadata.
fn stored_groups(g: &Golden) -> usize {
    g.meta("groups").parse().unwrap()
}

/// The `padding` metadata: "same", "valid" or an "h,w" pair.
fn conv2d_padding(g: &Golden) -> Conv2dPadding {
    match g.meta("padding") {
        "same" => Conv2dPadding::Same,
        "valid" => Conv2dPadding::Valid,
        _ => g.meta_pair("padding").into(),
    }
}

fn conv2d_case(case: &str, groups: fn(&Golden) -> usize) {
    check_case(case, |g, x, weight, bias| {
        let params = Conv2dParams {
            stride: g.meta_pair("stride"),
            padding: conv2d_padding(g),
            dilation: g.meta_pair("dilation"),
            groups: groups(g),
        };
        x.conv2d(weight, bias, params)
    });
}

fn conv_transpose2d_case(case: &str, groups: fn(&Golden) -> usize) {
    check_case(case, |g, x, weight, bias| {
        let params = ConvTranspose2dParams {
            stride: g.meta_pair("stride"),
            padding: g.meta_pair("padding"),
            output_padding: g.meta_pair("output_padding"),
            dilation: g.meta_pair("dilation"),
            groups: groups(g),
        };
        x.conv_transpose2d(weight, bias, params)
    });
}

#[test]
fn conv2d_with_stride_padding_and_bias_matches_pytorch() {
    conv2d_case("conv2d_a", one_group);
}

#[test]
fn conv2d_with_nonsquare_kernel_stride_dilation_and_no_bias_matches_pytorch() {
    conv2d_case("conv2d_b", one_group);
}

#[test]
fn conv2d_dcgan_downsampling_layer_matches_pytorch() {
    conv2d_case("conv2d_dcgan", one_group);
}

#[test]
fn conv_transpose2d_with_output_padding_and_bias_matches_pytorch() {
    conv_transpose2d_case("conv_transpose2d_a", one_group);
}

#[test]
fn conv_transpose2d_with_uneven_stride_and_output_padding_without_bias_matches_pytorch() {
    conv_transpose2d_case("conv_transpose2d_b", one_group);
}

#[test]
fn conv_transpose2d_with_dilation_matches_pytorch() {
    conv_transpose2d_case("conv_transpose2d_c", one_group);
}

#[test]
fn conv2d_with_two_groups_stride_padding_and_dilation_matches_pytorch() {
    conv2d_case("conv2d_grouped", stored_groups);
}

#[test]
fn depthwise_conv2d_with_channel_multiplier_two_matches_pytorch() {
    conv2d_case("conv2d_depthwise", stored_groups);
}

#[test]
fn conv2d_same_padding_with_odd_total_pads_bottom_right_like_pytorch() {
    conv2d_case("conv2d_same_asymmetric", stored_groups);
}

#[test]
fn conv_transpose2d_with_two_groups_and_output_padding_matches_pytorch() {
    conv_transpose2d_case("conv_transpose2d_grouped", stored_groups);
}
