//! Elementwise and activation kernels (f32; tolerance atol 1e-5 + rtol 1e-5,
//! the gap between two correctly rounded f32 evaluations of these functions).

use kiln::GeluApproximation;

use crate::common::{check_op, cuda_or_skip, randn, uniform};

const ATOL: f64 = 1e-5;
const RTOL: f64 = 1e-5;

#[test]
fn broadcast_binary_ops_match_cpu() {
    let Some(dev) = cuda_or_skip("broadcast_binary_ops") else {
        return;
    };
    for (a, b) in [
        (vec![37, 129], vec![37, 129]),
        (vec![5, 1, 33], vec![7, 1]),
        (vec![3], vec![2, 4, 3]),
    ] {
        let x = randn(&a, 1);
        let y = uniform(0.5, 2.0, &b, 2);
        check_op(
            "add",
            dev,
            &[x.clone(), y.clone()],
            |t| t[0].add(&t[1]),
            ATOL,
            RTOL,
        );
        check_op(
            "sub",
            dev,
            &[x.clone(), y.clone()],
            |t| t[0].sub(&t[1]),
            ATOL,
            RTOL,
        );
        check_op(
            "mul",
            dev,
            &[x.clone(), y.clone()],
            |t| t[0].mul(&t[1]),
            ATOL,
            RTOL,
        );
        check_op("div", dev, &[x, y], |t| t[0].div(&t[1]), ATOL, RTOL);
    }
}

#[test]
fn pointwise_maps_match_cpu() {
    let Some(dev) = cuda_or_skip("pointwise_maps") else {
        return;
    };
    let x = randn(&[1001], 3);
    let positive = uniform(0.1, 4.0, &[1001], 4);
    check_op(
        "neg",
        dev,
        std::slice::from_ref(&x),
        |t| t[0].neg(),
        ATOL,
        RTOL,
    );
    check_op(
        "exp",
        dev,
        std::slice::from_ref(&x),
        |t| t[0].exp(),
        ATOL,
        RTOL,
    );
    check_op(
        "log",
        dev,
        std::slice::from_ref(&positive),
        |t| t[0].log(),
        ATOL,
        RTOL,
    );
    check_op(
        "sqrt",
        dev,
        std::slice::from_ref(&positive),
        |t| t[0].sqrt(),
        ATOL,
        RTOL,
    );
    check_op(
        "powf",
        dev,
        std::slice::from_ref(&positive),
        |t| t[0].powf(1.7),
        ATOL,
        RTOL,
    );
    check_op(
        "clamp",
        dev,
        std::slice::from_ref(&x),
        |t| t[0].clamp(-0.5, 0.7),
        ATOL,
        RTOL,
    );
    check_op(
        "scalar ops",
        dev,
        &[x],
        |t| t[0].add_scalar(0.3)?.mul_scalar(-1.5),
        ATOL,
        RTOL,
    );
}

#[test]
fn activations_match_cpu() {
    let Some(dev) = cuda_or_skip("activations") else {
        return;
    };
    let x = randn(&[7, 131], 5).mul_scalar(3.0).unwrap();
    let one = std::slice::from_ref(&x);
    check_op("relu", dev, one, |t| t[0].relu(), ATOL, RTOL);
    check_op("leaky_relu", dev, one, |t| t[0].leaky_relu(0.2), ATOL, RTOL);
    check_op("tanh", dev, one, |t| t[0].tanh(), ATOL, RTOL);
    check_op("sigmoid", dev, one, |t| t[0].sigmoid(), ATOL, RTOL);
    check_op(
        "gelu",
        dev,
        one,
        |t| t[0].gelu(GeluApproximation::None),
        ATOL,
        RTOL,
    );
    check_op(
        "gelu_tanh",
        dev,
        one,
        |t| t[0].gelu(GeluApproximation::Tanh),
        ATOL,
        RTOL,
    );
}

#[test]
fn device_errors_are_clear() {
    // Without a driver, asking for a device is an error naming the device.
    if kiln::cuda::device_count() == 0 {
        let message = kiln::Device::cuda(0).unwrap_err().to_string();
        assert!(message.contains("cuda:0"), "{message}");
        return;
    }
    let dev = kiln::Device::cuda(0).unwrap();
    let cpu = randn(&[3], 1);
    let gpu = cpu.to_device(dev).unwrap();
    let message = cpu.add(&gpu).unwrap_err().to_string();
    assert!(
        message.contains("cpu") && message.contains("cuda:0"),
        "{message}"
    );
}

/// bf16 and f16 tensors through every elementwise and activation kernel,
/// forward and backward, against the CPU: both compute in f32 and round once,
/// so results agree to one 16-bit ulp (the f32 values can differ by an ulp
/// of the transcendental functions, which may move a rounding).
#[test]
fn sixteen_bit_elementwise_and_activations_match_cpu_forward_and_backward() {
    let Some(dev) = cuda_or_skip("sixteen_bit_elementwise") else {
        return;
    };
    type Op = (
        &'static str,
        fn(&[kiln::Tensor]) -> kiln::Result<kiln::Tensor>,
    );
    let ops: [Op; 12] = [
        ("add broadcast", |t| t[0].add(&t[2])),
        ("sub", |t| t[0].sub(&t[1])),
        ("mul", |t| t[0].mul(&t[1])),
        ("div", |t| t[0].div(&t[1])),
        ("neg", |t| t[0].neg()),
        ("sqrt", |t| t[1].sqrt()),
        ("clamp", |t| t[0].clamp(-0.5, 0.75)),
        ("relu", |t| t[0].relu()),
        ("leaky_relu", |t| t[0].leaky_relu(0.2)),
        ("tanh", |t| t[0].tanh()),
        ("sigmoid", |t| t[0].sigmoid()),
        ("gelu_tanh", |t| t[0].gelu(GeluApproximation::Tanh)),
    ];
    for (dtype, rtol) in [
        (kiln::DType::BF16, 2f64.powi(-7)),
        (kiln::DType::F16, 2f64.powi(-10)),
    ] {
        let inputs = [
            randn(&[37, 129], 60),
            uniform(0.5, 2.0, &[37, 129], 61),
            randn(&[37, 1], 63),
        ];
        for (name, op) in ops {
            crate::common::check_op_16bit(name, dev, &inputs, dtype, op, 1e-6, rtol);
        }
    }
}
