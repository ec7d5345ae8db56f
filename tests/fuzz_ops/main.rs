//! A property-based fuzz of kiln's public API. Every op on `Tensor` and
//! every `nn` layer gets arguments drawn from valid and invalid regions:
//! mismatched, empty and rank-0 to rank-6 shapes, out-of-range dims and
//! indices, u32 and 16-bit tensors, f32 mixed with f64, NaN and ±∞ values,
//! and (where a CUDA device or the emulator is present) operands on
//! `cuda:0` mixed with CPU ones.
//!
//! The property: a call returns `Ok` with the documented shape (checked
//! wherever the shape follows from the arguments) or an `Err` whose message
//! starts with the op's name (for an op built from others, the name of the
//! inner op that found the problem); it never panics. Arguments the suite
//! knows to be valid must succeed and ones it knows to be invalid must fail.
//! When an input requires grad, the output is summed and `backward()` must
//! succeed too, giving each leaf a gradient of its own shape, dtype and
//! device.
//!
//! Per-op tallies print at the end as a markdown table
//! (`cargo test --release --test fuzz_ops -- --nocapture`).

mod attention;
mod construction;
mod convolutions;
mod elementwise;
mod harness;
mod layers;
mod losses;
mod matmuls;
mod normalisations;
mod operands;
mod oracles;
mod reductions;
mod shapes;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed, TestError, TestRunner};
use std::sync::atomic::Ordering;

use crate::attention::{attention, attention_case, sdpa, sdpa_case};
use crate::construction::{construct_case, construction};
use crate::convolutions::{conv_case, convolutions, group_conv_case, grouped_convolutions};
use crate::elementwise::{elementwise, elementwise_case};
use crate::harness::{
    CASE_ON_CUDA, CUDA_TENSORS, CaseResult, cuda_present, install_panic_hook, print_table,
};
use crate::layers::{layer_case, layers};
use crate::losses::{loss_case, losses};
use crate::matmuls::{matmul_case, matmuls};
use crate::normalisations::{norm_case, normalisations};
use crate::reductions::{reduce_case, reductions};
use crate::shapes::{shape_case, shapes};

// ----- the suite -------------------------------------------------------------

/// Runs `property` on `cases` inputs drawn from `strategy`; a failure is
/// shrunk, saved to tests/proptest-regressions/fuzz_ops.txt and returned.
fn run_property<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> CaseResult,
) -> Option<String>
where
    S::Value: std::fmt::Debug,
{
    let config = Config {
        cases,
        max_shrink_iters: 512,
        rng_seed: RngSeed::Fixed(0x6b69_6c6e),
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/proptest-regressions/fuzz_ops.txt",
        ))),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let started = std::time::Instant::now();
    let result = runner.run(&strategy, |case| {
        CASE_ON_CUDA.store(false, Ordering::Relaxed);
        property(case)
    });
    println!(
        "{name}: {cases} cases in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    match result {
        Ok(()) => None,
        Err(TestError::Fail(reason, input)) => {
            Some(format!("{name}: {reason}\n    minimal input: {input:?}"))
        }
        Err(TestError::Abort(reason)) => Some(format!("{name}: aborted: {reason}")),
    }
}

#[test]
fn every_public_op_returns_ok_or_a_named_error_and_never_panics() {
    install_panic_hook();
    if cuda_present() {
        println!("cuda:0 is present: operands are also placed on it and mixed with CPU ones");
    } else {
        println!(
            "skipped: mixed-device cases (no CUDA device; run with KILN_CUDA=emulate to include them)"
        );
    }
    let failures: Vec<String> = [
        run_property("elementwise", 2048, elementwise_case(), elementwise),
        run_property("reductions", 3072, reduce_case(), reductions),
        run_property("shapes", 2048, shape_case(), shapes),
        run_property("construction", 3072, construct_case(), construction),
        run_property("matmuls", 3072, matmul_case(), matmuls),
        run_property("convolutions", 3072, conv_case(), convolutions),
        run_property("normalisations", 3072, norm_case(), normalisations),
        run_property("attention", 2048, attention_case(), attention),
        run_property("sdpa", 1536, sdpa_case(), sdpa),
        run_property(
            "grouped convolutions",
            1536,
            group_conv_case(),
            grouped_convolutions,
        ),
        run_property("losses", 3072, loss_case(), losses),
        run_property("layers", 1536, layer_case(), layers),
    ]
    .into_iter()
    .flatten()
    .collect();
    print_table();
    println!(
        "tensors placed on cuda:0: {}",
        CUDA_TENSORS.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "{} properties failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
