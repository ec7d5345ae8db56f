#!/usr/bin/env bash
# kiln's whole test suite (what CI runs after cargo fmt and clippy):
#   1. every test, on this machine as it is: on a GPU the CUDA tests use it,
#      elsewhere they say "skipped" and the no-GPU error paths are tested;
#   2. the CUDA parity suite on the emulated device (KILN_CUDA=emulate), in
#      forward thread order, logging the first launch of each kernel;
#   3. the parity suite again in reverse thread order (a kernel whose result
#      changes with the order is missing a barrier);
#   4. on the emulated device: the emulator's faults suite, the CLI and
#      model tests, the API fuzz suite with operands on both devices, and
#      the PyTorch-semantics checks;
#   5. coverage: every __global__ in kernels/ was launched in 2.
# Steps 2-5 need a host C++ compiler (c++, g++ or clang++; or KILN_CXX).
set -euo pipefail
cd "$(dirname "$0")/.."

step() {
    echo
    echo "== $1"
    step_start=$SECONDS
}
took() {
    echo "-- took $((SECONDS - step_start)) s"
}

step "cargo test --release (this machine's devices)"
cargo test --release
took

log="$PWD/target/emulator-launches.log"
rm -f "$log"
export KILN_CUDA=emulate

step "CUDA parity on the emulated device, forward thread order"
KILN_CUDA_EMULATE_ORDER=forward KILN_CUDA_EMULATE_LAUNCH_LOG="$log" \
    cargo test --release --test cuda_parity
took

step "CUDA parity on the emulated device, reverse thread order"
KILN_CUDA_EMULATE_ORDER=reverse cargo test --release --test cuda_parity
took

step "emulator faults suite, CLI, models, fuzz and PyTorch semantics on the emulated device"
cargo test --release --test emulator --test cli --test models --test fuzz_ops \
    --test pytorch_semantics
took

step "kernel coverage of the forward parity run"
KILN_COVERAGE_LOG="$log" cargo test --release --test emulator coverage -- --nocapture
took
