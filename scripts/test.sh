#!/usr/bin/env bash
# kiln's whole test suite (what CI runs after cargo fmt and clippy):
#   1. every test, on this machine as it is: on a GPU the CUDA tests use it,
#      elsewhere they say "skipped" and the no-GPU error paths are tested;
#   2. every CUDA test on the emulated device (KILN_CUDA=emulate, forward
#      thread order): the parity suite, the emulator's faults suite, the CLI
#      and model tests; the first launch of each kernel is logged;
#   3. the parity suite again in reverse thread order (a kernel whose result
#      changes with the order is missing a barrier);
#   4. coverage: every __global__ in kernels/ was launched in 2.
# Needs a host C++ compiler (c++, g++ or clang++; or KILN_CXX) for step 2-4.
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

step "CUDA tests on the emulated device, forward thread order"
KILN_CUDA_EMULATE_ORDER=forward KILN_CUDA_EMULATE_LAUNCH_LOG="$log" \
    cargo test --release --test cuda_parity --test emulator --test cli --test models
took

step "CUDA parity on the emulated device, reverse thread order"
KILN_CUDA_EMULATE_ORDER=reverse cargo test --release --test cuda_parity
took

step "kernel coverage of the emulated parity run"
KILN_COVERAGE_LOG="$log" cargo test --release --test emulator coverage -- --nocapture
took
