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

/// u32 indices of `shape`.
pub fn indices(values: &[u32], shape: &[usize]) -> Tensor {
    Tensor::from_indices(values.to_vec(), shape).unwrap()
}

/// The message of an expected error.
pub fn message(result: Result<Tensor>) -> String {
    match result {
        Ok(t) => panic!("expected an error, got a tensor of shape {}", t.shape()),
        Err(e) => e.to_string(),
    }
}

/// Asserts that `message` contains every one of `parts`.
pub fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "error {message:?} does not mention {part:?}"
        );
    }
}

/// Asserts `result` is an error whose message contains every one of `parts`.
pub fn assert_error_mentions(result: Result<Tensor>, parts: &[&str]) {
    assert_mentions(&message(result), parts);
}
