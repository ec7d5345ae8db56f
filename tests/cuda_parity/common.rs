//! Shared pieces of the CPU-vs-CUDA parity tests.

use kiln::{DType, Device, Rng, Tensor};

/// The first CUDA device — a GPU, or the emulator under `KILN_CUDA=emulate`
/// — or None after printing a visible skip message. Each test's log names
/// the device it ran on.
pub fn cuda_or_skip(test: &str) -> Option<Device> {
    if kiln::cuda::device_count() == 0 {
        eprintln!(
            "skipped: no CUDA device ({test}); set KILN_CUDA=emulate to run it on the CPU emulator"
        );
        return None;
    }
    // New device buffers start as NaN so an unwritten element cannot pass.
    kiln::cuda::set_poison_allocations(true);
    let device = kiln::cuda::device(0).expect("a CUDA device was counted");
    eprintln!("{test}: running on {}", device.name());
    Some(Device::cuda(0).expect("a CUDA device was counted"))
}

/// Fresh N(0, 1) values (never zeros) of `shape` on the CPU, f32.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, DType::F32, Device::Cpu, &mut Rng::seed(seed)).unwrap()
}

pub fn uniform(low: f64, high: f64, shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand(
        low,
        high,
        shape,
        DType::F32,
        Device::Cpu,
        &mut Rng::seed(seed),
    )
    .unwrap()
}

/// |cuda − cpu| ≤ atol + rtol·|cpu| for every element, and the maximum error.
pub fn assert_close(what: &str, cpu: &Tensor, cuda: &Tensor, atol: f64, rtol: f64) -> f64 {
    assert_eq!(cpu.dims(), cuda.dims(), "{what}: shape");
    assert_eq!(
        cuda.device(),
        Device::Cuda(0),
        "{what}: result left the device"
    );
    let expected = cpu.to_f64_vec();
    let actual = cuda.to_f64_vec();
    let mut worst = 0f64;
    for (i, (e, a)) in expected.iter().zip(&actual).enumerate() {
        let err = (a - e).abs();
        assert!(
            err <= atol + rtol * e.abs(),
            "{what}[{i}]: cuda {a} vs cpu {e} (atol {atol}, rtol {rtol})"
        );
        worst = worst.max(err);
    }
    eprintln!("{what}: max |error| {worst:.3e}");
    worst
}

/// Runs `f` on CPU inputs and on their CUDA copies; compares the outputs and
/// the gradients of Σ out·w (w random) with respect to every input.
pub fn check_op(
    what: &str,
    device: Device,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> kiln::Result<Tensor>,
    atol: f64,
    rtol: f64,
) {
    let cpu_leaves: Vec<Tensor> = inputs.iter().map(|t| t.detach().requires_grad_()).collect();
    let cuda_leaves: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_device(device).unwrap().detach().requires_grad_())
        .collect();
    let cpu_out = f(&cpu_leaves).unwrap();
    let cuda_out = f(&cuda_leaves).unwrap();
    assert_close(&format!("{what} forward"), &cpu_out, &cuda_out, atol, rtol);
    let weights = randn(cpu_out.dims(), 999);
    let cpu_grads = cpu_out.backward_with(&weights).unwrap();
    let cuda_grads = cuda_out
        .backward_with(&weights.to_device(device).unwrap())
        .unwrap();
    for (i, (c, g)) in cpu_leaves.iter().zip(&cuda_leaves).enumerate() {
        if let (Some(cg), Some(gg)) = (cpu_grads.get(c), cuda_grads.get(g)) {
            assert_close(&format!("{what} grad of input {i}"), cg, gg, atol, rtol);
        }
    }
}

/// Outputs and input gradients of one 16-bit run.
type Run16 = (Tensor, Vec<Tensor>);

/// `inputs` (f32) rounded to `dtype`, `f` run on them on the CPU and on the
/// device, and the gradients of Σ out·w (w random, in `dtype`; the sum in
/// f32). Outputs and gradients must keep `dtype`.
fn run_16bit(
    what: &str,
    device: Device,
    inputs: &[Tensor],
    dtype: DType,
    f: impl Fn(&[Tensor]) -> kiln::Result<Tensor>,
) -> (Run16, Run16) {
    let inputs: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
    let run = |on: Device| {
        let leaves: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_device(on).unwrap().requires_grad_())
            .collect();
        let out = f(&leaves).unwrap();
        assert_eq!(out.dtype(), dtype, "{what}: output dtype");
        let probe = randn(out.dims(), 999).to_dtype(dtype).unwrap();
        let grads = f32_sum_grads(&out.mul(&probe.to_device(on).unwrap()).unwrap(), &leaves);
        for g in &grads {
            assert_eq!(g.dtype(), dtype, "{what}: gradient dtype");
        }
        (out, grads)
    };
    let (cpu, cuda) = (run(Device::Cpu), run(device));
    assert_eq!(cpu.1.len(), cuda.1.len(), "{dtype} {what}: gradients");
    (cpu, cuda)
}

/// `check_op` for 16-bit tensors (see `run_16bit`): outputs within
/// atol + rtol·|cpu| elementwise, gradients within atol + 2·rtol·|cpu|.
pub fn check_op_16bit(
    what: &str,
    device: Device,
    inputs: &[Tensor],
    dtype: DType,
    f: impl Fn(&[Tensor]) -> kiln::Result<Tensor>,
    atol: f64,
    rtol: f64,
) {
    let (cpu, cuda) = run_16bit(what, device, inputs, dtype, f);
    assert_close(&format!("{dtype} {what}"), &cpu.0, &cuda.0, atol, rtol);
    for (i, (c, g)) in cpu.1.iter().zip(&cuda.1).enumerate() {
        assert_close(
            &format!("{dtype} {what} grad of input {i}"),
            c,
            g,
            atol,
            2.0 * rtol,
        );
    }
}

/// As `check_op_16bit`, with the gradients compared by relative Frobenius
/// error ‖cuda − cpu‖ / ‖cpu‖ ≤ `grad_error`: for ops whose two forms round
/// an intermediate differently, so an element's error scales with the sum
/// of its terms' magnitudes rather than with its own value.
pub fn check_op_16bit_frobenius_grads(
    what: &str,
    device: Device,
    inputs: &[Tensor],
    dtype: DType,
    f: impl Fn(&[Tensor]) -> kiln::Result<Tensor>,
    (atol, rtol): (f64, f64),
    grad_error: f64,
) {
    let (cpu, cuda) = run_16bit(what, device, inputs, dtype, f);
    assert_close(&format!("{dtype} {what}"), &cpu.0, &cuda.0, atol, rtol);
    for (i, (c, g)) in cpu.1.iter().zip(&cuda.1).enumerate() {
        let (c, g) = (c.to_f64_vec(), g.to_f64_vec());
        let diff: f64 = c
            .iter()
            .zip(&g)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = c.iter().map(|a| a * a).sum::<f64>().sqrt();
        let error = diff / norm;
        eprintln!("{dtype} {what} grad of input {i}: relative Frobenius error {error:.3e}");
        assert!(
            error <= grad_error,
            "{dtype} {what} grad of input {i}: relative Frobenius error {error:.3e} > {grad_error:.0e}"
        );
    }
}

/// The gradients of Σ out (summed in f32) with respect to each of `leaves`
/// that gets one.
pub fn f32_sum_grads(out: &Tensor, leaves: &[Tensor]) -> Vec<Tensor> {
    let grads = out
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    leaves
        .iter()
        .filter_map(|l| grads.get(l).cloned())
        .collect()
}
