//! Kernel benchmarks on the CPU: convolutions (forward, and forward +
//! backward) at the size of a DCGAN layer, a 1024³ matrix product, and the
//! plain reference conv beside the im2col + GEMM path.
//!
//! Units: every case sets `Throughput::Elements(flop_count)`, so the rate
//! criterion prints as "elem/s" is FLOP/s. A FLOP count is 2·M·N·K for each
//! GEMM the case runs, counted GEMM by GEMM; im2col/col2im copies and bias
//! adds are data movement and are left out. Each case also prints one line
//! to stderr with its median time per call in ms and its GFLOP/s.
//!
//! Run with `cargo bench --bench kernels` (about a minute and a half on 2 cores).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use kiln::ops::conv::cpu::{conv2d_forward, conv2d_reference};
use kiln::ops::conv::{Conv2dParams, ConvGeometry, ConvTranspose2dParams};
use kiln::{DType, Device, Rng, Tensor};

/// Random f32 values (never zeros: a kernel can be faster on them).
fn random(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, DType::F32, Device::Cpu, &mut Rng::seed(seed)).unwrap()
}

/// FLOPs of one product of an [m, k] and a [k, n] matrix.
fn gemm_flops(m: usize, n: usize, k: usize) -> u64 {
    2 * (m * n * k) as u64
}

/// Times `run` under criterion with `flops` per call as its throughput, then
/// prints the median ms per call and GFLOP/s over criterion's samples.
fn bench_case<R>(
    group: &mut BenchmarkGroup<WallTime>,
    name: &str,
    flops: u64,
    mut run: impl FnMut() -> R,
) {
    group.throughput(Throughput::Elements(flops));
    let mut seconds_per_call: Vec<f64> = Vec::new();
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(run());
            }
            let elapsed = start.elapsed();
            seconds_per_call.push(elapsed.as_secs_f64() / iters as f64);
            elapsed
        })
    });
    // Empty when a filter skipped the case.
    if seconds_per_call.is_empty() {
        return;
    }
    seconds_per_call.sort_by(f64::total_cmp);
    let median = seconds_per_call[seconds_per_call.len() / 2];
    eprintln!(
        "{name}: {:.2} ms, {:.1} GFLOP/s",
        median * 1e3,
        flops as f64 / median / 1e9
    );
}

/// Asserts |a − b| ≤ rtol·(|b| + max|b|) element by element.
fn assert_close(what: &str, actual: &[f32], expected: &[f32], rtol: f32) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= rtol * (e.abs() + scale),
            "{what}[{i}]: {a} vs {e}"
        );
    }
}

/// The first image of a batch (or row of a matrix), keeping the leading dim.
fn first_image(t: &Tensor) -> Tensor {
    t.narrow(0, 0, 1).unwrap()
}

fn conv_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv_cpu");

    // conv2d: x [64, 64, 16, 16], weight [128, 64, 4, 4], stride 2, padding 1 → y [64, 128, 8, 8].
    let (n, cin, cout, size, k) = (64, 64, 128, 16, 4);
    let params = Conv2dParams {
        stride: [2, 2],
        padding: [1, 1],
        dilation: [1, 1],
    };
    let out_size = (size + 2 - k) / 2 + 1;
    let positions = out_size * out_size;
    let col_rows = cin * k * k;
    let x = random(&[n, cin, size, size], 1);
    let weight = random(&[cout, cin, k, k], 2).mul_scalar(0.05).unwrap();
    let bias = random(&[cout], 3);
    let grad_out = random(&[n, cout, out_size, out_size], 4);
    // y_n = W [O, C·k²] · cols_n [C·k², P], once per image.
    let forward = n as u64 * gemm_flops(cout, positions, col_rows);
    // dcols_n = Wᵀ [C·k², O] · dy_n [O, P] per image; dW = dy [O, N·P] · colsᵀ [N·P, C·k²].
    let backward_data = n as u64 * gemm_flops(col_rows, positions, cout);
    let backward_weight = gemm_flops(cout, col_rows, n * positions);
    bench_case(&mut group, "conv2d_forward", forward, || {
        x.conv2d(&weight, Some(&bias), params).unwrap()
    });
    let (xg, wg, bg) = (
        x.detach().requires_grad_(),
        weight.detach().requires_grad_(),
        bias.detach().requires_grad_(),
    );
    bench_case(
        &mut group,
        "conv2d_forward_backward",
        forward + backward_data + backward_weight,
        || {
            let y = xg.conv2d(&wg, Some(&bg), params).unwrap();
            y.backward_with(&grad_out).unwrap()
        },
    );
    // Validate after timing, on the first image (the reference is slow).
    let (x1, y1) = (
        first_image(&x),
        first_image(&x.conv2d(&weight, Some(&bias), params).unwrap()),
    );
    let g1 = ConvGeometry::for_conv2d(x1.shape(), weight.shape(), params).unwrap();
    let expected = conv2d_reference(
        &g1,
        &x1.to_vec::<f32>().unwrap(),
        &weight.to_vec::<f32>().unwrap(),
        Some(&bias.to_vec::<f32>().unwrap()),
    );
    assert_close(
        "conv2d_forward",
        &y1.to_vec::<f32>().unwrap(),
        &expected,
        1e-4,
    );

    // conv_transpose2d, the mirror: x [64, 128, 8, 8], weight [128, 64, 4, 4] → y [64, 64, 16, 16].
    let tparams = ConvTranspose2dParams {
        stride: [2, 2],
        padding: [1, 1],
        output_padding: [0, 0],
        dilation: [1, 1],
    };
    let (tin, tout, tsize) = (128, 64, 8);
    let tpositions = tsize * tsize;
    let tcol_rows = tout * k * k;
    let tx = random(&[n, tin, tsize, tsize], 5);
    let tweight = random(&[tin, tout, k, k], 6).mul_scalar(0.05).unwrap();
    let tbias = random(&[tout], 7);
    let tgrad_out = random(&[n, tout, 2 * tsize, 2 * tsize], 8);
    // cols_n = Wᵀ [Cout·k², Cin] · x_n [Cin, H·W] per image, then col2im.
    let tforward = n as u64 * gemm_flops(tcol_rows, tpositions, tin);
    // dx_n = W [Cin, Cout·k²] · im2col(dy_n) [Cout·k², H·W]; dW = x [Cin, N·H·W] · im2col(dy)ᵀ.
    let tbackward_data = n as u64 * gemm_flops(tin, tpositions, tcol_rows);
    let tbackward_weight = gemm_flops(tin, tcol_rows, n * tpositions);
    bench_case(&mut group, "conv_transpose2d_forward", tforward, || {
        tx.conv_transpose2d(&tweight, Some(&tbias), tparams)
            .unwrap()
    });
    let (txg, twg, tbg) = (
        tx.detach().requires_grad_(),
        tweight.detach().requires_grad_(),
        tbias.detach().requires_grad_(),
    );
    bench_case(
        &mut group,
        "conv_transpose2d_forward_backward",
        tforward + tbackward_data + tbackward_weight,
        || {
            let y = txg.conv_transpose2d(&twg, Some(&tbg), tparams).unwrap();
            y.backward_with(&tgrad_out).unwrap()
        },
    );
    let tx1 = first_image(&tx);
    let ty1 = first_image(
        &tx.conv_transpose2d(&tweight, Some(&tbias), tparams)
            .unwrap(),
    );
    let tg1 = ConvGeometry::for_conv_transpose2d(tx1.shape(), tweight.shape(), tparams).unwrap();
    let texpected = kiln::ops::conv::cpu::conv_transpose2d_reference(
        &tg1,
        &tx1.to_vec::<f32>().unwrap(),
        &tweight.to_vec::<f32>().unwrap(),
        Some(&tbias.to_vec::<f32>().unwrap()),
    );
    assert_close(
        "conv_transpose2d_forward",
        &ty1.to_vec::<f32>().unwrap(),
        &texpected,
        1e-4,
    );

    // The gap between the definition and the fast path, on a small conv:
    // x [4, 16, 16, 16], weight [32, 16, 3, 3], padding 1 → y [4, 32, 16, 16].
    let small_x = random(&[4, 16, 16, 16], 9).to_vec::<f32>().unwrap();
    let small_w = random(&[32, 16, 3, 3], 10).to_vec::<f32>().unwrap();
    let small_params = Conv2dParams {
        padding: [1, 1],
        ..Conv2dParams::default()
    };
    let g = ConvGeometry::for_conv2d(
        &[4, 16, 16, 16].into(),
        &[32, 16, 3, 3].into(),
        small_params,
    )
    .unwrap();
    let small_flops = g.batch as u64 * gemm_flops(g.out_channels, g.out_positions(), g.col_rows());
    bench_case(
        &mut group,
        "conv2d_small_reference_loops",
        small_flops,
        || conv2d_reference(&g, &small_x, &small_w, None),
    );
    bench_case(&mut group, "conv2d_small_im2col_gemm", small_flops, || {
        conv2d_forward(&g, &small_x, &small_w, None)
    });
    assert_close(
        "conv2d_small",
        &conv2d_forward(&g, &small_x, &small_w, None),
        &conv2d_reference(&g, &small_x, &small_w, None),
        1e-5,
    );
    group.finish();
}

fn matmul_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul_cpu");
    let size = 1024;
    let a = random(&[size, size], 11);
    let b = random(&[size, size], 12);
    bench_case(
        &mut group,
        "matmul_1024",
        gemm_flops(size, size, size),
        || a.matmul(&b).unwrap(),
    );
    // Validate the first row after timing.
    let product = a.matmul(&b).unwrap();
    let row = first_image(&product).to_vec::<f32>().unwrap();
    let (av, bv) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    let expected: Vec<f32> = (0..size)
        .map(|j| (0..size).map(|p| av[p] * bv[p * size + j]).sum())
        .collect();
    assert_close("matmul_1024 row 0", &row, &expected, 1e-4);
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = conv_benches, matmul_benches
}
criterion_main!(benches);
