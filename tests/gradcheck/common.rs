//! Shared pieces of the gradient checks: random f64 inputs from proptest
//! seeds, and the default tolerances.

use kiln::gradcheck::{GradcheckOptions, gradcheck};
use kiln::{DType, Device, Result, Rng, Tensor};

/// N(0, 1) values of `shape` from `seed`, in f64.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, DType::F64, Device::Cpu, &mut Rng::seed(seed)).unwrap()
}

/// Uniform values in [low, high) of `shape` from `seed`, in f64.
pub fn uniform(low: f64, high: f64, shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand(
        low,
        high,
        shape,
        DType::F64,
        Device::Cpu,
        &mut Rng::seed(seed),
    )
    .unwrap()
}

/// Asserts that backward() agrees with central differences (panics with the
/// worst element otherwise).
pub fn check(f: impl Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor]) {
    check_with(f, inputs, GradcheckOptions::default());
}

pub fn check_with(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    options: GradcheckOptions,
) {
    if let Err(e) = gradcheck(f, inputs, options) {
        panic!("{e}");
    }
}
