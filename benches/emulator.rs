//! What the CUDA emulator's scheduler costs on this CPU (run with
//! `KILN_CUDA=emulate cargo bench --bench emulator`): a `__syncthreads` per
//! thread (one suspend and one resume of its coroutine, plus the scheduler's
//! check that every thread met), a full-warp shuffle per lane, and a thread
//! that meets nobody. Criterion's element throughput is per thread-switch
//! (or per thread); its inverse is the cost of one.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use cudarc::driver::LaunchConfig;
use kiln::{DType, Device, Tensor};

kiln::kernel_params! {
    struct MeetParams {
        out: u64,
        rounds: i64,
    }
}

const THREADS: u32 = 256;
const ROUNDS: i64 = 200;
const PLAIN_THREADS: i64 = 1 << 18;

fn bench(c: &mut Criterion) {
    match kiln::cuda::device(0) {
        Ok(device) if device.is_emulated() => {}
        _ => {
            eprintln!("skipped: this bench times the CUDA emulator; run it with KILN_CUDA=emulate");
            return;
        }
    }
    kiln::kernels::register_source("emulator.cu", include_str!("emulator.cu")).unwrap();
    let device = kiln::cuda::device(0).unwrap();
    let out = Tensor::zeros([PLAIN_THREADS as usize], DType::F32, Device::Cuda(0)).unwrap();
    let out_ptr = out.cuda_ptr().unwrap();
    let block = |threads: u32, blocks: u32| LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut group = c.benchmark_group("emulator");
    group.sample_size(10);
    for (kernel, name) in [
        ("barrier_rounds", "__syncthreads, per thread"),
        ("shuffle_rounds", "__shfl_xor_sync, per lane"),
    ] {
        group.throughput(Throughput::Elements(THREADS as u64 * ROUNDS as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let params = MeetParams {
                    out: out_ptr,
                    rounds: ROUNDS,
                };
                device
                    .launch("emulator.cu", kernel, block(THREADS, 1), params)
                    .unwrap();
            })
        });
    }
    group.throughput(Throughput::Elements(PLAIN_THREADS as u64));
    group.bench_function("a thread that meets nobody", |b| {
        b.iter(|| {
            let params = MeetParams {
                out: out_ptr,
                rounds: PLAIN_THREADS,
            };
            let blocks = (PLAIN_THREADS as u32).div_ceil(THREADS);
            device
                .launch(
                    "emulator.cu",
                    "one_store_per_thread",
                    block(THREADS, blocks),
                    params,
                )
                .unwrap();
        })
    });
    group.finish();
    let values = out.to_vec::<f32>().unwrap();
    assert!(
        values.iter().all(|&v| v == 1.0),
        "every thread stored its element"
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
