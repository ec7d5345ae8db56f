//! The emulator's own checks, proven on deliberately broken kernels
//! (tests/emulator/faults.cu, launched through kiln's real launch path): each
//! must stop with its documented error, quickly, and each correct twin must
//! pass. Also the coverage check: every `__global__` in kernels/ was
//! launched by the parity suite. Needs `KILN_CUDA=emulate` (scripts/test.sh
//! sets it); elsewhere each test says it is skipped.

mod coverage;
mod faults;
mod warp;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::LaunchConfig;
use kiln::cuda::CudaDevice;
use kiln::{DType, Device, Tensor};

kiln::kernel_params! {
    pub struct FaultParams {
        x: u64,
        out: u64,
        n: i64,
    }
}

const FAULTS: &str = include_str!("faults.cu");

/// The emulated device, with faults.cu registered; None (and a message) when
/// the emulator is not selected.
pub fn emulator_or_skip(test: &str) -> Option<Arc<CudaDevice>> {
    if kiln::cuda::backend().ok() != Some(kiln::cuda::Backend::Emulated) {
        eprintln!("skipped: {test} checks the emulator; run with KILN_CUDA=emulate");
        return None;
    }
    kiln::kernels::register_source("faults.cu", FAULTS).unwrap();
    Some(kiln::cuda::device(0).expect("the emulated device"))
}

/// `values` on the device.
pub fn on_device(values: &[f32]) -> Tensor {
    Tensor::from_vec(values.to_vec(), [values.len()])
        .unwrap()
        .to_device(Device::Cuda(0))
        .unwrap()
}

pub fn zeros(n: usize) -> Tensor {
    Tensor::zeros([n], DType::F32, Device::Cuda(0)).unwrap()
}

pub fn one_block(threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches `kernel` of faults.cu on x (and out), returning the error text
/// or None, and how long it took.
pub fn launch(
    device: &CudaDevice,
    kernel: &'static str,
    config: LaunchConfig,
    x: &Tensor,
    out: &Tensor,
    n: usize,
) -> (Option<String>, Duration) {
    let params = FaultParams {
        x: x.cuda_ptr().unwrap(),
        out: out.cuda_ptr().unwrap(),
        n: n as i64,
    };
    let start = Instant::now();
    let result = device.launch("faults.cu", kernel, config, params);
    (result.err().map(|e| e.to_string()), start.elapsed())
}

/// Asserts the launch failed within seconds with a message containing every
/// one of `expected`; prints it.
pub fn expect_error(
    what: &str,
    (error, elapsed): (Option<String>, Duration),
    expected: &[&str],
) -> String {
    let error = error.unwrap_or_else(|| panic!("{what}: the launch succeeded"));
    eprintln!("{what}: caught in {:.3} s: {error}", elapsed.as_secs_f64());
    assert!(
        elapsed < Duration::from_secs(10),
        "{what}: took {elapsed:?}"
    );
    for part in expected {
        assert!(
            error.contains(part),
            "{what}: {error:?} does not mention {part:?}"
        );
    }
    error
}
