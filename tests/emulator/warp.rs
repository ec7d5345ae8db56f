//! Shuffles, votes and __syncwarp on the emulator give what CUDA specifies,
//! lane by lane (tests/emulator/warp.cu).

use kiln::cuda::emulator::launch_counts;

use crate::{FaultParams, emulator_or_skip, on_device, one_block, zeros};

#[test]
fn every_warp_operation_matches_its_cuda_definition() {
    let Some(device) = emulator_or_skip("warp operations") else {
        return;
    };
    kiln::kernels::register_source("warp.cu", include_str!("warp.cu")).unwrap();
    const N: usize = 64;
    let x: Vec<f32> = (0..N)
        .map(|t| {
            if t % 3 == 0 {
                -(t as f32) - 1.0
            } else {
                t as f32 + 0.5
            }
        })
        .collect();
    let (input, out) = (on_device(&x), zeros(9 * N));
    let params = FaultParams {
        x: input.cuda_ptr().unwrap(),
        out: out.cuda_ptr().unwrap(),
        n: N as i64,
    };
    let key = ("warp.cu".to_string(), "warp_operations".to_string());
    let launched = || launch_counts().get(&key).copied().unwrap_or(0);
    let before = launched();
    device
        .launch("warp.cu", "warp_operations", one_block(N as u32), params)
        .unwrap();
    assert_eq!(launched(), before + 1, "the emulator counts each launch");
    let got = out.to_vec::<f32>().unwrap();
    for t in 0..N {
        let (base, lane) = (t / 32 * 32, t % 32);
        let warp = &x[base..base + 32];
        let segment16 = lane / 16 * 16;
        let expected = [
            warp[3],
            if lane >= 2 {
                warp[lane - 2]
            } else {
                warp[lane]
            },
            if lane + 5 < segment16 + 16 {
                warp[lane + 5]
            } else {
                warp[lane]
            },
            warp[lane ^ 4],
            warp.iter().filter(|v| **v > 0.0).count() as f32,
            0.0,
            1.0,
            if lane < 16 {
                warp[lane ^ 1]
            } else {
                warp[lane]
            },
            warp[(lane + 1) % 32],
        ];
        for (row, e) in expected.iter().enumerate() {
            assert_eq!(got[row * N + t], *e, "operation {row}, thread {t}");
        }
    }
}

#[test]
fn atomics_on_shared_memory_are_exact_and_not_races() {
    let Some(device) = emulator_or_skip("shared atomics") else {
        return;
    };
    kiln::kernels::register_source("warp.cu", include_str!("warp.cu")).unwrap();
    let (input, out) = (on_device(&[0.0]), zeros(3));
    let params = FaultParams {
        x: input.cuda_ptr().unwrap(),
        out: out.cuda_ptr().unwrap(),
        n: 0,
    };
    let config = cudarc::driver::LaunchConfig {
        grid_dim: (3, 1, 1),
        block_dim: (96, 1, 1),
        shared_mem_bytes: 0,
    };
    device
        .launch("warp.cu", "shared_atomic_count", config, params)
        .unwrap();
    assert_eq!(out.to_vec::<f32>().unwrap(), vec![96.0; 3]);
}
