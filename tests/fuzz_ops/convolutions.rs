use kiln::ops::conv::{Conv2dForwardKernel, conv2d_forward_with_kernel};
use kiln::{Conv2dPadding, Conv2dParams, ConvTranspose2dParams, DType};
use proptest::prelude::*;

use crate::harness::{CaseResult, Expect, V, check};
use crate::matmuls::autocast_choice;
use crate::operands::{Spec, build, dtype, paired, partner, spec_with};
use crate::oracles::{cast_operands_v, operands_v};

// ----- convolutions ----------------------------------------------------------

#[derive(Clone, Debug)]
pub(crate) struct ConvCase {
    x: Spec,
    w: Spec,
    bias: Option<Spec>,
    size: [usize; 7],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    output_padding: [usize; 2],
    mutation: u8,
    kernel: usize,
    autocast: Option<DType>,
}

/// Beyond any image: it overflows usize arithmetic when doubled or multiplied.
const BIG: usize = usize::MAX / 2 + 1;

fn hyper(low: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        24 => low..=3usize,
        1 => Just(0usize),
        1 => Just(BIG),
        1 => Just(usize::MAX),
    ]
}

/// A size that is mostly positive.
pub(crate) fn extent(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0usize), 19 => 1..=max]
}

pub(crate) fn conv_case() -> impl Strategy<Value = ConvCase> {
    (
        (
            spec_with(Just(vec![]), dtype()),
            partner(),
            prop::option::weighted(0.6, partner()),
        ),
        [
            extent(2),
            extent(3),
            extent(6),
            extent(6),
            extent(3),
            extent(3),
            extent(3),
        ],
        [hyper(1), hyper(1)],
        [hyper(0), hyper(0)],
        [hyper(1), hyper(1)],
        [0usize..3, 0..3],
        0u8..24,
        0usize..3,
        autocast_choice(),
    )
        .prop_map(
            |(
                (x, w, bias),
                size,
                stride,
                padding,
                dilation,
                output_padding,
                mutation,
                kernel,
                autocast,
            )| {
                let w = paired(&x, w);
                let bias = bias.map(|b| paired(&x, b));
                ConvCase {
                    x,
                    w,
                    bias,
                    size,
                    stride,
                    padding,
                    dilation,
                    output_padding,
                    mutation,
                    kernel,
                    autocast,
                }
            },
        )
}

/// conv2d's output [N, O, Ho, Wo], exactly (None if the arguments do not fit):
/// weight [O, C/groups, kh, kw] with O divisible by groups, and PyTorch's
/// padding "same" (stride 1, Ho = H) and "valid" (no padding).
pub(crate) fn conv2d_shape(
    x: &[usize],
    w: &[usize],
    bias: Option<&[usize]>,
    p: Conv2dParams,
) -> Option<Vec<usize>> {
    if x.len() != 4 || w.len() != 4 || x[1..].contains(&0) || w.contains(&0) {
        return None;
    }
    if p.groups == 0 || !w[0].is_multiple_of(p.groups) || w[1].checked_mul(p.groups) != Some(x[1]) {
        return None;
    }
    if p.stride.contains(&0) || p.dilation.contains(&0) || bias.is_some_and(|b| b != [w[0]]) {
        return None;
    }
    let padding = match p.padding {
        Conv2dPadding::Explicit(padding) => padding,
        Conv2dPadding::Valid => [0, 0],
        // The output is as large as the input.
        Conv2dPadding::Same if p.stride == [1, 1] => return Some(vec![x[0], w[0], x[2], x[3]]),
        Conv2dPadding::Same => return None,
    };
    let mut out = vec![x[0], w[0]];
    for d in 0..2 {
        let padded = x[2 + d] as u128 + 2 * padding[d] as u128;
        let reach = p.dilation[d] as u128 * (w[2 + d] as u128 - 1) + 1;
        if padded < reach {
            return None;
        }
        out.push(usize::try_from((padded - reach) / p.stride[d] as u128 + 1).ok()?);
    }
    Some(out)
}

/// conv_transpose2d's output [N, Cout, Ho, Wo], exactly: weight
/// [Cin, Cout/groups, kh, kw] with Cin divisible by groups.
pub(crate) fn conv_transpose2d_shape(
    x: &[usize],
    w: &[usize],
    bias: Option<&[usize]>,
    p: ConvTranspose2dParams,
) -> Option<Vec<usize>> {
    if x.len() != 4 || w.len() != 4 || x[1..].contains(&0) || w.contains(&0) || x[1] != w[0] {
        return None;
    }
    if p.groups == 0 || !w[0].is_multiple_of(p.groups) {
        return None;
    }
    let out_channels = w[1].checked_mul(p.groups)?;
    if p.stride.contains(&0) || p.dilation.contains(&0) || bias.is_some_and(|b| b != [out_channels])
    {
        return None;
    }
    let mut out = vec![x[0], out_channels];
    for d in 0..2 {
        if p.output_padding[d] >= p.stride[d] && p.output_padding[d] >= p.dilation[d] {
            return None;
        }
        let size = (x[2 + d] as i128 - 1) * p.stride[d] as i128 - 2 * p.padding[d] as i128
            + p.dilation[d] as i128 * (w[2 + d] as i128 - 1)
            + p.output_padding[d] as i128
            + 1;
        if size <= 0 {
            return None;
        }
        out.push(usize::try_from(size).ok()?);
    }
    Some(out)
}

pub(crate) fn convolutions(case: ConvCase) -> CaseResult {
    let [n, c, h, wd, o, kh, kw] = case.size;
    let mut x_dims = vec![n, c, h, wd];
    let mut w_dims = vec![o, c, kh, kw];
    let mut t_dims = vec![c, o, kh, kw];
    match case.mutation {
        0 => {
            x_dims.pop();
        }
        1 => x_dims.push(1),
        2 => {
            w_dims[1] += 1;
            t_dims[0] += 1;
        }
        3 => {
            w_dims.truncate(2);
            t_dims.truncate(3);
        }
        _ => {}
    }
    let x = build(&Spec {
        dims: x_dims,
        ..case.x.clone()
    })?;
    let w = build(&Spec {
        dims: w_dims,
        ..case.w.clone()
    })?;
    let t = build(&Spec {
        dims: t_dims,
        ..case.w.clone()
    })?;
    let bias_len = if case.mutation == 4 { o + 1 } else { o };
    let bias = match &case.bias {
        Some(spec) => Some(build(&Spec {
            dims: vec![bias_len],
            ..spec.clone()
        })?),
        None => None,
    };
    let extreme = [case.stride, case.padding, case.dilation]
        .iter()
        .flatten()
        .any(|&s| s >= BIG);
    let _autocast = case.autocast.map(kiln::autocast);
    let maybe_v = if extreme || case.autocast.is_some() {
        V::Maybe
    } else {
        V::Valid
    };
    let bias_dims = bias.as_ref().map(|b| b.dims());

    let params = Conv2dParams {
        stride: case.stride,
        padding: case.padding.into(),
        dilation: case.dilation,
        ..Conv2dParams::default()
    };
    let mut operands = vec![&x, &w];
    operands.extend(bias.as_ref());
    let v = cast_operands_v(&operands, case.autocast).and(maybe_v);
    let shape = conv2d_shape(x.dims(), w.dims(), bias_dims, params);
    check("conv2d", Expect::new(shape.clone(), v), &operands, || {
        x.conv2d(&w, bias.as_ref(), params)
    })?;
    let kernel = [
        Conv2dForwardKernel::Direct,
        Conv2dForwardKernel::ImplicitGemm,
        Conv2dForwardKernel::TensorCore,
    ][case.kernel];
    check(
        "conv2d_forward_with_kernel",
        Expect::new(
            shape,
            v.and(if case.autocast.is_some() {
                V::Maybe
            } else {
                V::Valid
            }),
        ),
        &[],
        || conv2d_forward_with_kernel(&x, &w, bias.as_ref(), params, kernel),
    )?;

    let params = ConvTranspose2dParams {
        stride: case.stride,
        padding: case.padding,
        output_padding: case.output_padding,
        dilation: case.dilation,
        ..ConvTranspose2dParams::default()
    };
    let mut operands = vec![&x, &t];
    operands.extend(bias.as_ref());
    let v = cast_operands_v(&operands, case.autocast).and(maybe_v);
    let shape = conv_transpose2d_shape(x.dims(), t.dims(), bias_dims, params);
    check("conv_transpose2d", Expect::new(shape, v), &operands, || {
        x.conv_transpose2d(&t, bias.as_ref(), params)
    })?;
    Ok(())
}

/// conv2d and conv_transpose2d with channel groups, and conv2d with
/// PyTorch's padding "same" and "valid".
#[derive(Clone, Debug)]
pub(crate) struct GroupConvCase {
    x: Spec,
    w: Spec,
    bias: Option<Spec>,
    groups: usize,
    /// [N, C/groups, O/groups, H, W, kh, kw]
    size: [usize; 7],
    stride: [usize; 2],
    padding: Conv2dPadding,
    dilation: [usize; 2],
    output_padding: [usize; 2],
    mutation: u8,
}

pub(crate) fn group_conv_case() -> impl Strategy<Value = GroupConvCase> {
    let padding = prop_oneof![
        2 => [0usize..3, 0..3].prop_map(Conv2dPadding::Explicit),
        2 => Just(Conv2dPadding::Same),
        1 => Just(Conv2dPadding::Valid),
        1 => Just(Conv2dPadding::Explicit([BIG, 0])),
    ];
    (
        (
            spec_with(Just(vec![]), dtype()),
            partner(),
            prop::option::weighted(0.6, partner()),
        ),
        prop_oneof![8 => 1usize..=4, 1 => Just(0usize), 1 => Just(usize::MAX)],
        [
            extent(2),
            extent(2),
            extent(2),
            extent(5),
            extent(5),
            extent(3),
            extent(3),
        ],
        [
            prop_oneof![12 => Just(1usize), 3 => Just(2usize), 1 => Just(0usize)],
            prop_oneof![12 => Just(1usize), 3 => Just(2usize), 1 => Just(0usize)],
        ],
        padding,
        [hyper(1), hyper(1)],
        [0usize..2, 0..2],
        0u8..16,
    )
        .prop_map(
            |((x, w, bias), groups, size, stride, padding, dilation, output_padding, mutation)| {
                let w = paired(&x, w);
                let bias = bias.map(|b| paired(&x, b));
                GroupConvCase {
                    x,
                    w,
                    bias,
                    groups,
                    size,
                    stride,
                    padding,
                    dilation,
                    output_padding,
                    mutation,
                }
            },
        )
}

pub(crate) fn grouped_convolutions(case: GroupConvCase) -> CaseResult {
    let [n, c, o, h, wd, kh, kw] = case.size;
    // Channels are multiples of the groups (of 1 when groups is 0 or huge).
    let g = if case.groups <= 4 {
        case.groups.max(1)
    } else {
        1
    };
    let (mut cin, mut cout) = (g * c, g * o);
    let (mut w_in, mut t_in) = (c, g * c);
    match case.mutation {
        // A channel count that is no multiple of the groups (or does not match).
        0 => cin += 1,
        1 => cout += 1,
        2 => w_in += 1,
        3 => t_in += 1,
        _ => {}
    }
    let x = build(&Spec {
        dims: vec![n, cin, h, wd],
        ..case.x.clone()
    })?;
    let w = build(&Spec {
        dims: vec![cout, w_in, kh, kw],
        ..case.w.clone()
    })?;
    let t = build(&Spec {
        dims: vec![if case.mutation == 3 { t_in } else { cin }, o, kh, kw],
        ..case.w.clone()
    })?;
    let bias_len = cout + usize::from(case.mutation == 4);
    let bias = match &case.bias {
        Some(spec) => Some(build(&Spec {
            dims: vec![bias_len],
            ..spec.clone()
        })?),
        None => None,
    };
    let extreme = case.dilation.iter().any(|&d| d >= BIG)
        || matches!(case.padding, Conv2dPadding::Explicit(p) if p.contains(&BIG));
    let maybe_v = if extreme { V::Maybe } else { V::Valid };
    let bias_dims = bias.as_ref().map(|b| b.dims());

    let params = Conv2dParams {
        stride: case.stride,
        padding: case.padding,
        dilation: case.dilation,
        groups: case.groups,
    };
    let mut operands = vec![&x, &w];
    operands.extend(bias.as_ref());
    let v = operands_v(&operands).and(maybe_v);
    let shape = conv2d_shape(x.dims(), w.dims(), bias_dims, params);
    check(
        "conv2d (groups, padding)",
        Expect::new(shape, v),
        &operands,
        || x.conv2d(&w, bias.as_ref(), params),
    )?;

    // The transposed op takes the explicit padding pair (none for the others).
    let padding = match case.padding {
        Conv2dPadding::Explicit(p) => p,
        _ => [0, 0],
    };
    let params = ConvTranspose2dParams {
        stride: case.stride,
        padding,
        output_padding: case.output_padding,
        dilation: case.dilation,
        groups: case.groups,
    };
    // conv_transpose2d's bias has Cout = groups·(weight dim 1) entries.
    let bias = match &case.bias {
        Some(spec) => Some(build(&Spec {
            dims: vec![g * o + usize::from(case.mutation == 4)],
            ..spec.clone()
        })?),
        None => None,
    };
    let mut operands = vec![&x, &t];
    operands.extend(bias.as_ref());
    let v = operands_v(&operands).and(maybe_v);
    let shape = conv_transpose2d_shape(x.dims(), t.dims(), bias.as_ref().map(|b| b.dims()), params);
    check(
        "conv_transpose2d (groups)",
        Expect::new(shape, v),
        &operands,
        || x.conv_transpose2d(&t, bias.as_ref(), params),
    )?;
    Ok(())
}
