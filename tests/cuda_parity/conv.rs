//! conv2d and conv_transpose2d (forward and every input gradient) on CUDA
//! against the CPU, for shapes that fill no tile evenly (the implicit GEMM
//! tiles 64 positions × 64 channels × 16 reduction terms), strides 1/2/3,
//! padding, dilation 2, output_padding, groups (depthwise, and a group
//! wider than one 64-channel tile), padding="same", with and without bias,
//! and the DCGAN layers. Weights are drawn like a layer's initialisation, U(±1/√fan_in),
//! so values stay O(1). Tolerance atol 1e-4 + rtol 1e-4: every value is an
//! f32 sum of up to a few thousand products, taken in different orders on
//! the two devices (GEMM blocking on the CPU, tiles and tree reductions on
//! the GPU).

use kiln::ops::conv::{Conv2dForwardKernel, conv2d_forward_with_kernel};
use kiln::{Conv2dPadding, Conv2dParams, ConvTranspose2dParams, DType, Device, Tensor};

use crate::common::{
    assert_close, check_op, check_op_16bit, cuda_or_skip, f32_sum_grads, randn, uniform,
};

const ATOL: f64 = 1e-4;
const RTOL: f64 = 1e-4;

/// x [batch, channels, h, w] ~ N(0, 1), weight of `weight_dims` ~ U(±1/√fan_in)
/// and, if asked, a bias of `bias_len` values from the same range.
fn operands(
    x_dims: &[usize],
    weight_dims: &[usize],
    fan_in: usize,
    bias_len: Option<usize>,
    seed: u64,
) -> Vec<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let mut inputs = vec![
        randn(x_dims, seed),
        uniform(-bound, bound, weight_dims, seed + 1),
    ];
    if let Some(len) = bias_len {
        inputs.push(uniform(-bound, bound, &[len], seed + 2));
    }
    inputs
}

struct Conv2dCase {
    what: &'static str,
    /// batch, in_channels, height, width
    x: [usize; 4],
    out_channels: usize,
    kernel: [usize; 2],
    params: Conv2dParams,
    bias: bool,
}

fn conv2d_cases() -> Vec<Conv2dCase> {
    let params = |stride, padding: [usize; 2], dilation| Conv2dParams {
        stride,
        padding: padding.into(),
        dilation,
        groups: 1,
    };
    vec![
        Conv2dCase {
            what: "conv2d 3x3 stride 1 pad 1, bias",
            x: [2, 3, 37, 29],
            out_channels: 5,
            kernel: [3, 3],
            params: params([1, 1], [1, 1], [1, 1]),
            bias: true,
        },
        Conv2dCase {
            what: "conv2d 5x3 stride 2 pad 2x1, 70 channels, no bias",
            x: [3, 7, 19, 23],
            out_channels: 70,
            kernel: [5, 3],
            params: params([2, 2], [2, 1], [1, 1]),
            bias: false,
        },
        Conv2dCase {
            what: "conv2d 3x3 stride 3 dilation 2, bias",
            x: [2, 4, 17, 20],
            out_channels: 9,
            kernel: [3, 3],
            params: params([3, 3], [0, 0], [2, 2]),
            bias: true,
        },
        Conv2dCase {
            what: "conv2d 2x4 stride 2x3 pad 1x2 dilation 2x1, no bias",
            x: [1, 5, 13, 31],
            out_channels: 3,
            kernel: [2, 4],
            params: params([2, 3], [1, 2], [2, 1]),
            bias: false,
        },
        Conv2dCase {
            what: "conv2d DCGAN 1->64 32x32 k4 s2 p1, bias",
            x: [5, 1, 32, 32],
            out_channels: 64,
            kernel: [4, 4],
            params: params([2, 2], [1, 1], [1, 1]),
            bias: true,
        },
        Conv2dCase {
            what: "conv2d DCGAN 64->128 16x16 k4 s2 p1, no bias",
            x: [5, 64, 16, 16],
            out_channels: 128,
            kernel: [4, 4],
            params: params([2, 2], [1, 1], [1, 1]),
            bias: false,
        },
        Conv2dCase {
            what: "conv2d 3x3 stride 2 pad 1 dilation 2x1, 2 groups 4->6, bias",
            x: [2, 4, 15, 13],
            out_channels: 6,
            kernel: [3, 3],
            params: Conv2dParams {
                groups: 2,
                ..params([2, 2], [1, 1], [2, 1])
            },
            bias: true,
        },
        Conv2dCase {
            what: "conv2d depthwise 3x3 pad 1, 5 channels x 2, bias",
            x: [2, 5, 11, 9],
            out_channels: 10,
            kernel: [3, 3],
            params: Conv2dParams {
                groups: 5,
                ..params([1, 1], [1, 1], [1, 1])
            },
            bias: true,
        },
        Conv2dCase {
            what: "conv2d same 4x2 dilation 1x3 (extra bottom/right row and column), bias",
            x: [2, 3, 9, 10],
            out_channels: 4,
            kernel: [4, 2],
            params: Conv2dParams {
                padding: Conv2dPadding::Same,
                ..params([1, 1], [0, 0], [1, 3])
            },
            bias: true,
        },
        Conv2dCase {
            what: "conv2d same 3x3, 2 groups 6->140 (70 per group: two channel tiles), no bias",
            x: [1, 6, 9, 7],
            out_channels: 140,
            kernel: [3, 3],
            params: Conv2dParams {
                padding: Conv2dPadding::Same,
                groups: 2,
                ..params([1, 1], [0, 0], [1, 1])
            },
            bias: false,
        },
    ]
}

/// Index in [`conv2d_cases`] of the first grouped case.
const FIRST_GROUPED_CASE: usize = 6;

fn conv2d_case_operands(case: &Conv2dCase, seed: u64) -> Vec<Tensor> {
    let channels = case.x[1] / case.params.groups;
    let [kh, kw] = case.kernel;
    operands(
        &case.x,
        &[case.out_channels, channels, kh, kw],
        channels * kh * kw,
        case.bias.then_some(case.out_channels),
        seed,
    )
}

#[test]
fn conv2d_forward_and_grads_match_cpu() {
    let Some(dev) = cuda_or_skip("conv2d_forward_and_grads") else {
        return;
    };
    for (k, case) in conv2d_cases().iter().enumerate() {
        let inputs = conv2d_case_operands(case, 10 * k as u64);
        let params = case.params;
        check_op(
            case.what,
            dev,
            &inputs,
            |t| t[0].conv2d(&t[1], t.get(2), params),
            ATOL,
            RTOL,
        );
    }
}

/// Every conv2d case on every rung of the forward kernel ladder, not only
/// the one the engine uses, with operands rounded to `dtype`, against the
/// CPU. (f32 asked for the tensor-core kernel runs the implicit GEMM;
/// 16-bit asked for the implicit GEMM runs the tensor-core kernel.)
fn every_forward_kernel_matches_cpu(dev: Device, dtype: DType, seed: u64, atol: f64, rtol: f64) {
    for (k, case) in conv2d_cases().iter().enumerate() {
        let inputs: Vec<Tensor> = conv2d_case_operands(case, seed + 10 * k as u64)
            .iter()
            .map(|t| t.to_dtype(dtype).unwrap())
            .collect();
        let expected = inputs[0]
            .conv2d(&inputs[1], inputs.get(2), case.params)
            .unwrap();
        let on_device: Vec<Tensor> = inputs.iter().map(|t| t.to_device(dev).unwrap()).collect();
        for kernel in [
            Conv2dForwardKernel::Direct,
            Conv2dForwardKernel::ImplicitGemm,
            Conv2dForwardKernel::TensorCore,
        ] {
            let actual = conv2d_forward_with_kernel(
                &on_device[0],
                &on_device[1],
                on_device.get(2),
                case.params,
                kernel,
            )
            .unwrap();
            assert_eq!(actual.dtype(), dtype);
            assert_close(
                &format!("{dtype} {} with {kernel:?}", case.what),
                &expected,
                &actual,
                atol,
                rtol,
            );
        }
    }
}

#[test]
fn every_conv2d_forward_kernel_matches_cpu() {
    let Some(dev) = cuda_or_skip("every_conv2d_forward_kernel") else {
        return;
    };
    every_forward_kernel_matches_cpu(dev, DType::F32, 100, ATOL, RTOL);
}

/// The 16-bit formats and their tolerances: the CPU and the device both
/// accumulate in f32 and round once, in different orders, so a value may
/// land one 16-bit ulp away (2⁻⁷ of its size for bf16, 2⁻¹⁰ for f16); the
/// atol covers values that cancel to near zero.
const SIXTEEN_BIT: [(DType, f64); 2] = [(DType::BF16, 1.0 / 128.0), (DType::F16, 1.0 / 1024.0)];
const SIXTEEN_BIT_ATOL: f64 = 2e-3;

/// bf16/f16 conv2d on every forward kernel (the direct one in 16 bits, the
/// tiled ones on tensor cores) against the CPU's 16-bit conv2d.
#[test]
fn sixteen_bit_conv2d_forward_kernels_match_cpu() {
    let Some(dev) = cuda_or_skip("sixteen_bit_conv2d_forward_kernels") else {
        return;
    };
    for (dtype, rtol) in SIXTEEN_BIT {
        every_forward_kernel_matches_cpu(dev, dtype, 300, SIXTEEN_BIT_ATOL, rtol);
    }
}

/// bf16/f16 conv2d and conv_transpose2d through the engine, forward and
/// every input gradient (backward-data, backward-weight and bias-grad in
/// 16 bits), against the CPU.
#[test]
fn sixteen_bit_convolutions_and_grads_match_cpu() {
    let Some(dev) = cuda_or_skip("sixteen_bit_convolutions_and_grads") else {
        return;
    };
    for (dtype, rtol) in SIXTEEN_BIT {
        for (k, case) in conv2d_cases().iter().enumerate() {
            let inputs = conv2d_case_operands(case, 400 + 10 * k as u64);
            let params = case.params;
            check_op_16bit(
                case.what,
                dev,
                &inputs,
                dtype,
                |t| t[0].conv2d(&t[1], t.get(2), params),
                SIXTEEN_BIT_ATOL,
                rtol,
            );
        }
        let params = ConvTranspose2dParams {
            stride: [2, 2],
            padding: [1, 1],
            output_padding: [1, 0],
            ..ConvTranspose2dParams::default()
        };
        let inputs = operands(&[3, 70, 5, 6], &[70, 9, 4, 4], 70 * 16, Some(9), 500);
        check_op_16bit(
            "conv_transpose2d 4x4 stride 2 pad 1 output_padding 1x0, 70 -> 9 channels, bias",
            dev,
            &inputs,
            dtype,
            |t| t[0].conv_transpose2d(&t[1], t.get(2), params),
            SIXTEEN_BIT_ATOL,
            rtol,
        );
        let grouped = ConvTranspose2dParams {
            groups: 2,
            ..params
        };
        let inputs = operands(&[2, 6, 5, 4], &[6, 3, 4, 4], 3 * 16, Some(6), 510);
        check_op_16bit(
            "conv_transpose2d 4x4 stride 2 pad 1 output_padding 1x0, 2 groups 6 -> 6, bias",
            dev,
            &inputs,
            dtype,
            |t| t[0].conv_transpose2d(&t[1], t.get(2), grouped),
            SIXTEEN_BIT_ATOL,
            rtol,
        );
    }
}

/// Under autocast an f32 conv2d runs in bf16 on the device and its f32
/// parameters get f32 gradients, as on the CPU.
#[test]
fn autocast_conv2d_on_the_device_matches_cpu_with_f32_gradients() {
    let Some(dev) = cuda_or_skip("autocast_conv2d") else {
        return;
    };
    let cases = conv2d_cases();
    for case in [&cases[1], &cases[FIRST_GROUPED_CASE]] {
        autocast_conv2d_matches_cpu(dev, case);
    }
}

/// One conv2d case under bf16 autocast on the CPU and on `dev`.
fn autocast_conv2d_matches_cpu(dev: Device, case: &Conv2dCase) {
    let inputs = conv2d_case_operands(case, 600);
    let run = |on: Device| {
        let leaves: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_device(on).unwrap().requires_grad_())
            .collect();
        let out = {
            let _scope = kiln::autocast(DType::BF16);
            leaves[0]
                .conv2d(&leaves[1], leaves.get(2), case.params)
                .unwrap()
        };
        assert_eq!(out.dtype(), DType::BF16);
        let grads = f32_sum_grads(&out, &leaves);
        assert_eq!(grads.len(), leaves.len());
        (out, grads)
    };
    let (cpu, cuda) = (run(Device::Cpu), run(dev));
    assert_close(
        &format!("autocast {}", case.what),
        &cpu.0,
        &cuda.0,
        SIXTEEN_BIT_ATOL,
        1.0 / 128.0,
    );
    for (i, (c, g)) in cpu.1.iter().zip(&cuda.1).enumerate() {
        assert_eq!(g.dtype(), DType::F32, "gradient {i} dtype");
        assert_close(
            &format!("autocast {} grad {i}", case.what),
            c,
            g,
            SIXTEEN_BIT_ATOL,
            1.0 / 64.0,
        );
    }
}

#[test]
fn conv2d_forward_kernel_choice_is_ignored_on_cpu() {
    let inputs = operands(&[2, 3, 9, 8], &[4, 3, 3, 3], 27, Some(4), 7);
    let params = Conv2dParams::default();
    let expected = inputs[0].conv2d(&inputs[1], inputs.get(2), params).unwrap();
    let direct = conv2d_forward_with_kernel(
        &inputs[0],
        &inputs[1],
        inputs.get(2),
        params,
        Conv2dForwardKernel::Direct,
    )
    .unwrap();
    assert_eq!(direct.device(), Device::Cpu);
    assert_eq!(direct.to_f64_vec(), expected.to_f64_vec());
}

#[test]
fn conv_transpose2d_forward_and_grads_match_cpu() {
    let Some(dev) = cuda_or_skip("conv_transpose2d_forward_and_grads") else {
        return;
    };
    let params = |stride, padding, output_padding, dilation| ConvTranspose2dParams {
        stride,
        padding,
        output_padding,
        dilation,
        groups: 1,
    };
    let grouped = |groups, params| ConvTranspose2dParams { groups, ..params };
    // (what, x [N, Cin, H, W], Cout, kernel, params, bias)
    let cases = [
        (
            "conv_transpose2d 3x3 stride 1 pad 1, bias",
            [2, 5, 11, 13],
            3,
            [3, 3],
            params([1, 1], [1, 1], [0, 0], [1, 1]),
            true,
        ),
        (
            "conv_transpose2d 4x4 stride 2 pad 1 output_padding 1, 70 channels, no bias",
            [3, 6, 9, 7],
            70,
            [4, 4],
            params([2, 2], [1, 1], [1, 1], [1, 1]),
            false,
        ),
        (
            "conv_transpose2d 3x3 stride 3 pad 2 dilation 2 output_padding 2x1, bias",
            [2, 4, 6, 5],
            9,
            [3, 3],
            params([3, 3], [2, 2], [2, 1], [2, 2]),
            true,
        ),
        (
            "conv_transpose2d DCGAN 100->256 1x1 k4 s1 p0, no bias",
            [5, 100, 1, 1],
            256,
            [4, 4],
            params([1, 1], [0, 0], [0, 0], [1, 1]),
            false,
        ),
        (
            "conv_transpose2d DCGAN 128->64 8x8 k4 s2 p1, no bias",
            [5, 128, 8, 8],
            64,
            [4, 4],
            params([2, 2], [1, 1], [0, 0], [1, 1]),
            false,
        ),
        (
            "conv_transpose2d DCGAN 64->1 16x16 k4 s2 p1, bias",
            [5, 64, 16, 16],
            1,
            [4, 4],
            params([2, 2], [1, 1], [0, 0], [1, 1]),
            true,
        ),
        (
            "conv_transpose2d 3x3 stride 2x3 pad 1x0 output_padding 1x2, 2 groups 4->6, bias",
            [2, 4, 5, 4],
            6,
            [3, 3],
            grouped(2, params([2, 3], [1, 0], [1, 2], [1, 1])),
            true,
        ),
        (
            "conv_transpose2d depthwise 2x3 stride 2 dilation 1x2, 3 channels, bias",
            [2, 3, 6, 5],
            3,
            [2, 3],
            grouped(3, params([2, 2], [0, 0], [0, 0], [1, 2])),
            true,
        ),
        (
            "conv_transpose2d 3x3 stride 1, 2 groups 140->6 (70 per group), no bias",
            [1, 140, 4, 3],
            6,
            [3, 3],
            grouped(2, params([1, 1], [0, 0], [0, 0], [1, 1])),
            false,
        ),
    ];
    for (k, (what, x, out_channels, [kh, kw], params, bias)) in cases.into_iter().enumerate() {
        let in_channels = x[1];
        let out_per_group = out_channels / params.groups;
        let inputs = operands(
            &x,
            &[in_channels, out_per_group, kh, kw],
            in_channels * kh * kw,
            bias.then_some(out_channels),
            200 + 10 * k as u64,
        );
        check_op(
            what,
            dev,
            &inputs,
            |t| t[0].conv_transpose2d(&t[1], t.get(2), params),
            ATOL,
            RTOL,
        );
    }
}
