//! Every `__global__` in kernels/ was launched: the emulator appends
//! `file kernel` to `KILN_CUDA_EMULATE_LAUNCH_LOG` the first time a kernel
//! runs, and scripts/test.sh points this check (`KILN_COVERAGE_LOG`) at the
//! log the parity suite wrote.

use std::collections::BTreeSet;

use kiln::cuda::source::kernel_names;
use kiln::kernels::KERNEL_SOURCES;

#[test]
fn every_kernel_in_kernels_was_launched_by_the_parity_suite() {
    let Some(log) = std::env::var_os("KILN_COVERAGE_LOG") else {
        eprintln!(
            "skipped: set KILN_COVERAGE_LOG to the launch log of an emulated parity run (scripts/test.sh does)"
        );
        return;
    };
    let text = std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("reading the launch log {}: {e}", log.to_string_lossy()));
    let launched: BTreeSet<(String, String)> = text
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(file, kernel)| (file.to_string(), kernel.to_string()))
        .collect();
    let all: Vec<(String, String)> = KERNEL_SOURCES
        .iter()
        .filter(|(file, _)| file.ends_with(".cu"))
        .flat_map(|(file, source)| {
            kernel_names(source)
                .into_iter()
                .map(move |kernel| (file.to_string(), kernel))
        })
        .collect();
    let missing: Vec<String> = all
        .iter()
        .filter(|k| !launched.contains(k))
        .map(|(file, kernel)| format!("kernels/{file} {kernel}"))
        .collect();
    println!(
        "coverage: {}/{} kernels in kernels/ launched on the emulated device by the parity suite",
        all.len() - missing.len(),
        all.len()
    );
    assert!(
        missing.is_empty(),
        "never launched by the parity suite:\n  {}",
        missing.join("\n  ")
    );
}
