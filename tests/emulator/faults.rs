//! Each broken kernel of faults.cu stops with its documented error; each
//! correct twin runs and computes the right values.

use cudarc::driver::LaunchConfig;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use kiln::cuda::emulator::{
    GuardPlacement, ThreadOrder, guard_placement, launch_timeout, racecheck, set_guard_placement,
    set_launch_timeout, set_racecheck, set_thread_order, thread_order,
};

use crate::{FaultParams, emulator_or_skip, expect_error, launch, on_device, one_block, zeros};

/// The emulator's settings are process-wide, and some tests here change
/// them (thread order, racecheck, guard placement, time limit) while the
/// test harness runs the others on parallel threads: a test expecting the
/// default forward order once saw another test's reverse order and named
/// thread 63 instead of 32. Every test here holds this lock throughout.
fn exclusive() -> MutexGuard<'static, ()> {
    static SETTINGS: Mutex<()> = Mutex::new(());
    SETTINGS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| 0.5 + i as f32 * 0.25).collect()
}

/// Runs `f` with the thread order set to `order`, then restores it.
fn with_order<T>(order: ThreadOrder, f: impl FnOnce() -> T) -> T {
    let before = thread_order().unwrap();
    set_thread_order(order);
    let result = f();
    set_thread_order(before);
    result
}

/// Runs `f` with racecheck set to `enabled`, then restores it.
fn with_racecheck<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    let before = racecheck().unwrap();
    set_racecheck(enabled);
    let result = f();
    set_racecheck(before);
    result
}

// One test for both detectors: each turns the other off for a moment.
#[test]
fn a_missing_barrier_is_caught_by_racecheck_and_by_comparing_two_thread_orders() {
    let _settings = exclusive();
    let Some(device) = emulator_or_skip("missing barrier") else {
        return;
    };
    let values = ramp(200);
    let expected: f32 = values.iter().sum();
    let x = on_device(&values);
    let sum = |kernel: &'static str, order: ThreadOrder| {
        with_order(order, || {
            let out = zeros(1);
            let (error, _) = launch(&device, kernel, one_block(256), &x, &out, values.len());
            (error, out.to_vec::<f32>().unwrap()[0])
        })
    };
    // With racecheck (the default): the missing barrier stops the kernel,
    // naming the two unordered accesses.
    with_racecheck(true, || {
        for order in [
            ThreadOrder::Forward,
            ThreadOrder::Reverse,
            ThreadOrder::Random(7),
        ] {
            let (error, total) = sum("tree_sum_with_barrier", order);
            assert_eq!(error, None, "tree_sum_with_barrier under {order}");
            assert!(
                (total - expected).abs() <= 1e-3 * expected,
                "{total} vs {expected}"
            );
        }
        let start = std::time::Instant::now();
        let (error, _) = sum("tree_sum_missing_barrier", ThreadOrder::Forward);
        expect_error(
            "racecheck",
            (error, start.elapsed()),
            &[
                "tree_sum_missing_barrier",
                "shared-memory race (racecheck)",
                "of `partial` (in tree_sum",
                "with no __syncthreads between",
                "kernels/faults.cu:",
            ],
        );
    });
    // Without it, the two thread orders disagree.
    with_racecheck(false, || {
        let (error, forward) = sum("tree_sum_missing_barrier", ThreadOrder::Forward);
        assert_eq!(error, None);
        let (error, reverse) = sum("tree_sum_missing_barrier", ThreadOrder::Reverse);
        assert_eq!(error, None);
        eprintln!("without racecheck: forward {forward}, reverse {reverse} (expected {expected})");
        // Forward, thread 0 adds slots later threads have not written yet:
        // shared memory is NaN-poisoned before every block, so it shows.
        assert!(
            forward.is_nan(),
            "forward order read unwritten shared memory: {forward}"
        );
        assert!(
            forward.to_bits() != reverse.to_bits(),
            "the result must depend on the order: {forward} vs {reverse}"
        );
    });
}

#[test]
fn an_access_past_a_buffer_hits_its_guard_page_on_either_side() {
    let _settings = exclusive();
    let Some(device) = emulator_or_skip("guard pages") else {
        return;
    };
    let placement = guard_placement().unwrap();
    // 128 floats fill their 512-byte block exactly, so x[128] is the guard page.
    set_guard_placement(GuardPlacement::After);
    let x = on_device(&ramp(128));
    let out = zeros(128);
    let error = expect_error(
        "overrun",
        launch(
            &device,
            "read_one_past_the_end",
            one_block(128),
            &x,
            &out,
            128,
        ),
        &[
            "read_one_past_the_end",
            "invalid read",
            "0 bytes past the end of a 512-byte device buffer",
            "faults.cu:",
        ],
    );
    assert!(error.contains("block (0,0,0), thread (127,0,0)"), "{error}");
    // An underrun needs the guard page before the block; 1000 floats is a
    // size class no other test uses, so this block is new.
    set_guard_placement(GuardPlacement::Before);
    let x = on_device(&ramp(1000));
    let out = zeros(1000);
    set_guard_placement(placement);
    expect_error(
        "underrun",
        launch(
            &device,
            "read_one_before_the_start",
            one_block(64),
            &x,
            &out,
            1000,
        ),
        &[
            "read_one_before_the_start",
            "invalid read",
            "4 bytes before the start of a 4000-byte device buffer",
            "thread (0,0,0)",
        ],
    );
}

#[test]
fn a_write_one_past_the_end_inside_the_rounded_block_is_caught_by_the_canary() {
    let _settings = exclusive();
    let Some(device) = emulator_or_skip("canary") else {
        return;
    };
    let x = on_device(&ramp(100));
    let out = zeros(100);
    expect_error(
        "write past the end",
        launch(
            &device,
            "write_one_past_the_end",
            one_block(128),
            &x,
            &out,
            100,
        ),
        &[
            "write_one_past_the_end",
            "wrote past the end of a 400-byte device buffer",
            "0 bytes past its end",
        ],
    );
}

#[test]
fn a_read_one_past_the_end_inside_the_rounded_block_reads_nan() {
    let _settings = exclusive();
    let Some(device) = emulator_or_skip("canary read") else {
        return;
    };
    let values = ramp(100);
    let x = on_device(&values);
    let out = zeros(100);
    let (error, _) = launch(
        &device,
        "read_one_past_the_end",
        one_block(128),
        &x,
        &out,
        100,
    );
    assert_eq!(error, None);
    let got = out.to_vec::<f32>().unwrap();
    assert_eq!(&got[..99], &values[1..]);
    assert!(
        got[99].is_nan(),
        "the element past the end reads as NaN: {}",
        got[99]
    );
}

#[test]
fn a_barrier_inside_a_branch_is_a_divergence_error() {
    let _settings = exclusive();
    let Some(device) = emulator_or_skip("divergent barrier") else {
        return;
    };
    let (x, out) = (on_device(&ramp(64)), zeros(64));
    expect_error(
        "barrier in a branch",
        launch(&device, "barrier_in_a_branch", one_block(64), &x, &out, 64),
        &[
            "barrier_in_a_branch",
            "divergent __syncthreads",
            "faults.cu:",
            "has exited",
        ],
    );
}

#[test]
fn threads_may_return_after_the_last_barrier_but_not_before_one() {
    let _settings = exclusive();
    let Some(device) = emulator_or_skip("early return") else {
        return;
    };
    let values = ramp(64);
    let (x, out) = (on_device(&values), zeros(64));
    expect_error(
        "return before a barrier",
        launch(
            &device,
            "return_before_a_barrier",
            one_block(64),
            &x,
            &out,
            40,
        ),
        &[
            "return_before_a_barrier",
            "divergent __syncthreads",
            "thread (40,0,0) has exited",
        ],
    );
    let (error, _) = launch(
        &device,
        "return_after_the_last_barrier",
        one_block(64),
        &x,
        &out,
        40,
    );
    assert_eq!(error, None);
    let got = out.to_vec::<f32>().unwrap();
    for i in 0..40 {
        assert_eq!(got[i], values[(i + 1) % 40], "out[{i}]");
    }
}

#[test]
fn a_shuffle_with_a_missing_lane_is_a_mask_error() {
    let _settings = exclusive();
    let Some(device) = emulator_or_skip("shuffle mask") else {
        return;
    };
    let values = ramp(32);
    let (x, out) = (on_device(&values), zeros(32));
    expect_error(
        "missing lane",
        launch(
            &device,
            "shuffle_missing_a_lane",
            one_block(32),
            &x,
            &out,
            32,
        ),
        &[
            "__shfl_xor_sync",
            "mask 0xffffffff",
            "lane 7 has exited",
            "faults.cu:",
        ],
    );
    let (error, _) = launch(&device, "shuffle_every_lane", one_block(32), &x, &out, 32);
    assert_eq!(error, None);
    let got = out.to_vec::<f32>().unwrap();
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, values[i ^ 1], "out[{i}]");
    }
}

#[test]
fn launches_beyond_the_device_or_kernel_limits_are_refused() {
    let _settings = exclusive();
    let Some(device) = emulator_or_skip("launch limits") else {
        return;
    };
    let (x, out) = (on_device(&ramp(64)), zeros(64));
    expect_error(
        "2048 threads",
        launch(
            &device,
            "bounded_to_128_threads",
            one_block(2048),
            &x,
            &out,
            64,
        ),
        &["2048 threads a block", "device limit of 1024"],
    );
    expect_error(
        "launch bounds",
        launch(
            &device,
            "bounded_to_128_threads",
            one_block(256),
            &x,
            &out,
            64,
        ),
        &["256 threads a block exceeds bounded_to_128_threads's __launch_bounds__ of 128"],
    );
    let tall = LaunchConfig {
        grid_dim: (1, 70_000, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    expect_error(
        "grid",
        launch(&device, "bounded_to_128_threads", tall, &x, &out, 64),
        &["gridDim.y = 70000 exceeds 65535"],
    );
    // Its 64-float staging array plus 49 000 dynamic bytes pass 48 KiB.
    let greedy = LaunchConfig {
        shared_mem_bytes: 49_000,
        ..one_block(64)
    };
    expect_error(
        "shared memory",
        launch(
            &device,
            "return_after_the_last_barrier",
            greedy,
            &x,
            &out,
            64,
        ),
        &["too much shared memory: 256 bytes static + 49000 dynamic > 49152"],
    );
    let (error, _) = launch(
        &device,
        "bounded_to_128_threads",
        one_block(128),
        &x,
        &out,
        64,
    );
    assert_eq!(error, None, "a launch inside every limit runs");
}

#[test]
fn a_parameter_struct_of_the_wrong_size_is_refused() {
    let _settings = exclusive();
    let Some(device) = emulator_or_skip("parameter size") else {
        return;
    };
    kiln::kernel_params! {
        struct Drifted { x: u64, out: u64, n: i64, extra: i64 }
    }
    let (x, out) = (on_device(&ramp(8)), zeros(8));
    let params = Drifted {
        x: x.cuda_ptr().unwrap(),
        out: out.cuda_ptr().unwrap(),
        n: 8,
        extra: 0,
    };
    let error = device
        .launch("faults.cu", "bounded_to_128_threads", one_block(32), params)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("parameter struct size mismatch: the Rust struct is 32 bytes")
            && error.contains("is 24"),
        "{error}"
    );
    let unknown = device
        .launch(
            "faults.cu",
            "no_such_kernel",
            one_block(32),
            FaultParams { x: 0, out: 0, n: 0 },
        )
        .unwrap_err()
        .to_string();
    assert!(
        unknown.contains("kernel no_such_kernel not found in kernels/faults.cu"),
        "{unknown}"
    );
}

#[test]
fn a_misaligned_float4_access_is_reported() {
    let _settings = exclusive();
    let Some(device) = emulator_or_skip("alignment") else {
        return;
    };
    let (x, out) = (on_device(&ramp(8)), zeros(1));
    expect_error(
        "misaligned float4",
        launch(&device, "misaligned_float4", one_block(32), &x, &out, 8),
        &[
            "misaligned_float4",
            "misaligned access",
            "multiple of 16 bytes",
            "faults.cu:",
        ],
    );
}

#[test]
fn a_shared_array_index_out_of_bounds_is_reported() {
    let _settings = exclusive();
    let Some(device) = emulator_or_skip("shared bounds") else {
        return;
    };
    let (x, out) = (on_device(&ramp(8)), zeros(1));
    expect_error(
        "shared index",
        launch(
            &device,
            "shared_index_out_of_bounds",
            one_block(64),
            &x,
            &out,
            8,
        ),
        &[
            "array index 32 out of bounds",
            "thread (32,0,0)",
            "faults.cu:",
        ],
    );
}

#[test]
fn a_stack_overflow_in_a_thread_is_an_error_not_a_crash() {
    let _settings = exclusive();
    let Some(device) = emulator_or_skip("stack overflow") else {
        return;
    };
    let (x, out) = (on_device(&ramp(8)), zeros(1));
    expect_error(
        "stack overflow",
        launch(&device, "stack_overflow", one_block(32), &x, &out, 100_000),
        &[
            "stack_overflow",
            "stack overflow: the thread used up its 64 KiB stack",
            "thread (0,0,0)",
        ],
    );
    // The device still works afterwards.
    let (error, _) = launch(&device, "shuffle_every_lane", one_block(32), &x, &out, 1);
    assert_eq!(error, None);
}

#[test]
fn an_endless_loop_runs_into_the_launch_time_limit() {
    let _settings = exclusive();
    let Some(device) = emulator_or_skip("time limit") else {
        return;
    };
    let limit = launch_timeout().unwrap();
    set_launch_timeout(Duration::from_secs(1));
    let (x, out) = (on_device(&ramp(8)), zeros(1));
    let result = launch(&device, "endless_loop", one_block(32), &x, &out, 1);
    set_launch_timeout(limit);
    assert!(
        result.1 >= Duration::from_secs(1),
        "stopped after {:?}",
        result.1
    );
    expect_error(
        "endless loop",
        result,
        &[
            "endless_loop",
            "ran longer than its limit of 1.0 s",
            "thread (0,0,0)",
            "kernels/faults.cu:",
        ],
    );
    let (error, _) = launch(&device, "shuffle_every_lane", one_block(32), &x, &out, 1);
    assert_eq!(error, None, "the device still works afterwards");
}
