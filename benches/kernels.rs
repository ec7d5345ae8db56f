//! Kernel benchmarks: every op family at the shapes the three models use,
//! on the CPU and (when one opens) the first CUDA device, with the vendor
//! libraries timed beside kiln on the GPU and kiln's plain reference beside
//! its fast path on the CPU.
//!
//! Shapes: DCGAN at batch 64 on 32×32 images (every conv and convT layer,
//! its batch norms and leaky ReLUs; on CUDA each conv's forward also in bf16
//! on tensor cores), the VAE's linear layers at batch 128,
//! GPT 4 layers / 128 wide / block 64 at batch 32, and a larger GPT (6
//! layers / 384 wide / block 256, batch 64), square GEMMs (1024³, and 4096³
//! on CUDA) and fused Adam over whole models' parameters.
//!
//! FLOP counts (exact for the math each op does; other work is memory):
//! - GEMM 2·M·N·K; conv forward, backward-data and backward-weight each
//!   2·N·O·C·kh·kw·Ho·Wo (the same products, differently arranged); conv
//!   transpose likewise on its mirror conv.
//! - causal attention forward 2·B·H·D·T(T+1) (Q·Kᵀ and P·V over the
//!   T(T+1)/2 allowed pairs), backward twice that (dV, dP, dQ, dK).
//! - element-wise and normalisation ops count their arithmetic per element
//!   as written beside each case; they are memory-bound, so their "% of
//!   peak" is against copy bandwidth.
//!
//! Bytes: each input read once, each output written once.
//!
//! Run: `cargo bench --bench kernels` (the summary is printed at the end and
//! written to target/kiln-bench/summary.md); `KILN_BENCH_QUICK=1` keeps the
//! model shapes that matter most and shortens every measurement.

mod common;

use common::vendor::{Cublas, CudnnBatchNorm, CudnnConv};
use common::{Bench, Bound, Case, Target, compare, quick, random};
use kiln::nn::Module;
use kiln::nn::init::Init;
use kiln::ops::conv::{Conv2dForwardKernel, ConvGeometry, conv2d_forward_with_kernel};
use kiln::ops::gemm::GemmKernel;
use kiln::optim::{AdamConfig, AdamW, Optimizer};
use kiln::{Conv2dParams, ConvTranspose2dParams, DType, Device, GeluApproximation, Shape, Tensor};

/// Relative tolerance of the after-timing checks (f32, sums of up to ~10⁴ terms).
const RTOL: f32 = 1e-3;

/// The check's tolerance for an output of `dtype`: a 16-bit result rounded
/// once on each side may differ by an ulp of its format (2⁻⁸ of the value
/// for bf16, 2⁻¹¹ for f16), beyond what f32 sums allow.
fn rtol_for(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        _ => RTOL,
    }
}

/// The most input sets a memory-bound case rotates through.
const MAX_ROTATION: usize = 32;

fn main() {
    let mut bench = Bench::new("kernels");
    let targets = common::targets();
    bench.add_peak(common::cpu_peak());
    for target in targets.iter().filter(|t| t.is_cuda()) {
        bench.add_peak(common::cuda_peak(target));
    }
    for target in &targets {
        let vendor = Vendor::open(&mut bench, target);
        gemm_benches(&mut bench, target, &vendor);
        conv_benches(&mut bench, target, &vendor);
        batch_norm_benches(&mut bench, target, &vendor);
        activation_benches(&mut bench, target);
        softmax_and_layer_norm_benches(&mut bench, target);
        gpt_elementwise_benches(&mut bench, target);
        attention_benches(&mut bench, target);
        embedding_benches(&mut bench, target);
        adam_benches(&mut bench, target);
    }
    bench.finish();
}

/// The vendor baselines usable on a target: on CUDA, those whose library
/// loads and whose smoke test (small odd shapes against an f64 loop) passes;
/// none on the CPU. The smoke-test lines go into the summary.
struct Vendor {
    cublas: Option<Cublas>,
    cudnn_conv: bool,
    cudnn_batch_norm: bool,
}

impl Vendor {
    fn open(bench: &mut Bench, target: &Target) -> Vendor {
        let mut vendor = Vendor {
            cublas: None,
            cudnn_conv: false,
            cudnn_batch_norm: false,
        };
        let Some(cuda) = target.cuda_device() else {
            return vendor;
        };
        let mut lines = String::new();
        for (name, outcome) in common::vendor::smoke_test(cuda) {
            let passed = outcome.is_ok();
            let line = match outcome {
                Ok(detail) => format!("- {name}: ok ({detail})\n"),
                Err(e) => format!("- {name}: not used ({e})\n"),
            };
            eprint!("{line}");
            lines.push_str(&line);
            match name {
                "cuBLAS sgemm" if passed => vendor.cublas = Cublas::new(cuda).ok(),
                "cuDNN conv" => vendor.cudnn_conv = passed,
                "cuDNN batch norm" => vendor.cudnn_batch_norm = passed,
                _ => {}
            }
        }
        bench.section("Vendor baselines (smoke test on the GPU)", lines);
        vendor
    }
}

// ----- the case runner ---------------------------------------------------------

/// How many input sets a case rotates through so that, together, they do
/// not fit in the last-level cache (L3 on the CPU, L2 on the GPU):
/// otherwise a memory-bound kernel is timed on cache, not memory.
fn rotation(target: &Target, case: &Case) -> usize {
    if case.bound == Bound::Compute || case.bytes == 0 {
        return 1;
    }
    let cache = last_level_cache_bytes(target);
    (2 * cache)
        .div_ceil(case.bytes)
        .clamp(1, MAX_ROTATION as u64) as usize
}

fn last_level_cache_bytes(target: &Target) -> u64 {
    if target.is_cuda() {
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE;
        let l2 = cudarc::driver::CudaContext::new(0)
            .and_then(|ctx| ctx.attribute(CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE));
        return l2.map_or(64 << 20, |bytes| bytes as u64);
    }
    let size = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size")
        .unwrap_or_default();
    let size = size.trim();
    let (digits, unit) = size.split_at(
        size.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(size.len()),
    );
    let value: u64 = digits.parse().unwrap_or(32 << 10);
    match unit {
        "M" => value << 20,
        "G" => value << 30,
        _ => value << 10,
    }
}

/// Times one case: `prepare(device, seed)` builds an input set (for a
/// backward case: the forward graph and an upstream gradient), `run`
/// performs the op on it. Memory-bound cases rotate through several input
/// sets (see [`rotation`]). Returns the first input set, or None if a
/// command-line filter skipped the case.
fn time_op<I>(
    bench: &mut Bench,
    target: &Target,
    case: &Case,
    prepare: impl Fn(Device, u64) -> I,
    run: impl Fn(&I) -> Tensor,
) -> Option<I> {
    let sets: Vec<I> = (0..rotation(target, case))
        .map(|i| prepare(target.device, 100 + i as u64))
        .collect();
    let mut next = 0;
    bench.time(target, case, || {
        std::hint::black_box(run(&sets[next]));
        next = (next + 1) % sets.len();
    })?;
    sets.into_iter().next()
}

/// [`time_op`], then the result on the first input set is checked: on CUDA
/// against the CPU running the same op on the same values, on the CPU
/// against `reference` when there is one.
fn bench_op<I>(
    bench: &mut Bench,
    target: &Target,
    case: &Case,
    prepare: impl Fn(Device, u64) -> I,
    run: impl Fn(&I) -> Tensor,
    reference: Option<&dyn Fn(&I) -> Tensor>,
) -> Option<I> {
    let first = time_op(bench, target, case, &prepare, &run)?;
    let actual = run(&first);
    let expected = if target.is_cuda() {
        Some(run(&prepare(Device::Cpu, 100)))
    } else {
        reference.map(|reference| reference(&first))
    };
    if let Some(expected) = expected {
        bench.check(
            target,
            case,
            compare(&actual, &expected, rtol_for(actual.dtype())),
        );
    }
    Some(first)
}

/// Times a baseline on the same inputs and attaches it to the case. The
/// baseline's output is checked against kiln's, so that a misconfigured
/// baseline is reported instead of posting a ratio.
fn bench_baseline(
    bench: &mut Bench,
    target: &Target,
    case: &Case,
    name: &str,
    kiln_output: &Tensor,
    mut run: impl FnMut() -> Result<Tensor, String>,
) {
    let checked = run().and_then(|out| compare(&out, kiln_output, rtol_for(kiln_output.dtype())));
    if let Err(e) = checked {
        eprintln!(
            "  {name} baseline for {} {} dropped: {e}",
            case.kernel, case.shape
        );
        return;
    }
    let seconds = bench.time_baseline(target, case, name, || {
        std::hint::black_box(run().expect("baseline ran before"));
    });
    if let Some(seconds) = seconds {
        bench.set_baseline(target, case, name, seconds);
    }
}

fn shape_str(dims: &[usize]) -> String {
    let dims: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(","))
}

fn zeros(shape: impl Into<Shape>, device: Device) -> Tensor {
    Tensor::zeros(shape, DType::F32, device).expect("an output buffer")
}

fn leaf(shape: &[usize], seed: u64, device: Device) -> Tensor {
    random(shape, seed, device).requires_grad_()
}

/// dL/d`wrt` after back-propagating `grad` from `y`.
fn grad_of(y: &Tensor, grad: &Tensor, wrt: &Tensor) -> Tensor {
    let grads = y.backward_with(grad).expect("backward");
    grads.get(wrt).expect("a gradient").clone()
}

// ----- GEMM --------------------------------------------------------------------

/// One GEMM shape: op(A) [M, K] · op(B) [K, N].
struct GemmShape {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
}

impl GemmShape {
    const fn new(name: &'static str, m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Self {
        GemmShape {
            name,
            m,
            n,
            k,
            trans_a: ta,
            trans_b: tb,
        }
    }

    fn a_dims(&self) -> [usize; 2] {
        if self.trans_a {
            [self.k, self.m]
        } else {
            [self.m, self.k]
        }
    }

    fn b_dims(&self) -> [usize; 2] {
        if self.trans_b {
            [self.n, self.k]
        } else {
            [self.k, self.n]
        }
    }

    fn label(&self) -> String {
        let op = |t: bool| if t { "ᵀ" } else { "" };
        format!(
            "{} {}×{}×{} (A{}B{})",
            self.name,
            self.m,
            self.n,
            self.k,
            op(self.trans_a),
            op(self.trans_b)
        )
    }
}

/// Linear layers as GEMMs: forward y = x·Wᵀ (A·Bᵀ), and the weight gradient
/// dW = dyᵀ·x (Aᵀ·B), at the token counts of each model.
fn gemm_shapes(target: &Target) -> Vec<GemmShape> {
    let mut shapes = vec![
        GemmShape::new("square", 1024, 1024, 1024, false, false),
        GemmShape::new("vae fc1", 128, 400, 784, false, true),
        GemmShape::new("gpt c_attn", 2048, 384, 128, false, true),
    ];
    if !quick() {
        shapes.extend([
            GemmShape::new("vae fc1 dW", 400, 784, 128, true, false),
            GemmShape::new("vae out", 128, 784, 400, false, true),
            GemmShape::new("gpt c_fc", 2048, 512, 128, false, true),
            GemmShape::new("gpt mlp c_proj", 2048, 128, 512, false, true),
            GemmShape::new("gpt c_fc dW", 512, 128, 2048, true, false),
        ]);
    }
    if target.is_cuda() || !quick() {
        shapes.push(GemmShape::new(
            "gpt-l c_attn",
            16384,
            1152,
            384,
            false,
            true,
        ));
    }
    if target.is_cuda() {
        shapes.extend([
            GemmShape::new("square", 4096, 4096, 4096, false, false),
            GemmShape::new("gpt-l c_fc", 16384, 1536, 384, false, true),
            GemmShape::new("gpt-l mlp c_proj", 16384, 384, 1536, false, true),
            GemmShape::new("gpt-l c_fc dW", 1536, 384, 16384, true, false),
        ]);
    }
    shapes
}

fn gemm_benches(bench: &mut Bench, target: &Target, vendor: &Vendor) {
    for shape in gemm_shapes(target) {
        let flops = 2 * (shape.m * shape.n * shape.k) as u64;
        let floats = shape.m * shape.k + shape.k * shape.n + shape.m * shape.n;
        let prepare = |device: Device, seed: u64| {
            (
                random(&shape.a_dims(), seed, device),
                random(&shape.b_dims(), seed + 1, device),
            )
        };
        let rungs: Vec<(String, GemmKernel)> = if target.is_cuda() {
            GemmKernel::F32
                .iter()
                .map(|&k| (format!("gemm {}", gemm_rung_name(k)), k))
                .collect()
        } else {
            vec![("gemm".to_string(), GemmKernel::BEST)]
        };
        let mut vendor_seconds = None;
        for (kernel, rung) in rungs {
            let case = Case::new(kernel, shape.label(), Bound::Compute)
                .flops(flops)
                .floats(floats);
            let run = |(a, b): &(Tensor, Tensor)| {
                a.gemm_with(b, shape.trans_a, shape.trans_b, rung)
                    .expect("gemm")
            };
            let Some(inputs) = bench_op(bench, target, &case, prepare, run, None) else {
                continue;
            };
            if let Some(cublas) = &vendor.cublas {
                let out = run(&inputs);
                match vendor_seconds {
                    Some(seconds) => bench.set_baseline(target, &case, "cuBLAS", seconds),
                    None => {
                        let c = zeros([shape.m, shape.n], target.device);
                        bench_baseline(bench, target, &case, "cuBLAS", &out, || {
                            cublas.sgemm(&inputs.0, &inputs.1, &c, shape.trans_a, shape.trans_b)?;
                            Ok(c.clone())
                        });
                        vendor_seconds = last_baseline(bench);
                    }
                }
            }
        }
    }
    if target.is_cuda() {
        tensor_core_gemm_benches(bench, target, vendor);
    }
    // The definition beside the fast path, on a size the triple loop can do.
    if !target.is_cuda() {
        let n = 256;
        let case = Case::new("gemm", format!("square {n}×{n}×{n}"), Bound::Compute)
            .flops(2 * (n * n * n) as u64)
            .floats(3 * n * n);
        let dims = kiln::ops::gemm::cpu::GemmDims {
            batch: 1,
            m: n,
            n,
            k: n,
            trans_a: false,
            trans_b: false,
        };
        let reference =
            |(a, b): &(Vec<f32>, Vec<f32>)| kiln::ops::gemm::cpu::gemm_reference(dims, a, b);
        let prepare = |device: Device, seed: u64| {
            (
                random(&[n, n], seed, device),
                random(&[n, n], seed + 1, device),
            )
        };
        let as_vecs =
            |(a, b): &(Tensor, Tensor)| (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        let reference_tensor = |inputs: &(Tensor, Tensor)| {
            Tensor::from_vec(reference(&as_vecs(inputs)), [n, n]).unwrap()
        };
        if let Some(inputs) = bench_op(
            bench,
            target,
            &case,
            prepare,
            |(a, b)| a.matmul(b).unwrap(),
            Some(&reference_tensor),
        ) {
            let slices = as_vecs(&inputs);
            if let Some(seconds) = bench.time_baseline(target, &case, "reference", || {
                std::hint::black_box(reference(&slices));
            }) {
                bench.set_baseline(target, &case, "reference", seconds);
            }
        }
    }
}

fn gemm_rung_name(kernel: GemmKernel) -> &'static str {
    match kernel {
        GemmKernel::V1Naive => "v1_naive",
        GemmKernel::V2SmemTiled => "v2_smem_tiled",
        GemmKernel::V3RegisterBlocked => "v3_register_blocked",
        GemmKernel::V4TensorCore => "v4_tensor_core",
    }
}

/// The tensor-core rung on bf16 and f16 operands (C in their format, f32
/// accumulation), against cuBLAS's 16-bit GEMM with f32 compute.
fn tensor_core_gemm_benches(bench: &mut Bench, target: &Target, vendor: &Vendor) {
    for shape in gemm_shapes(target) {
        for dtype in [DType::BF16, DType::F16] {
            let case = Case::new(
                format!("gemm v4_tensor_core {dtype}"),
                shape.label(),
                Bound::Compute,
            )
            .flops(2 * (shape.m * shape.n * shape.k) as u64);
            let prepare = |device: Device, seed: u64| {
                let as_half = |t: Tensor| t.to_dtype(dtype).expect("16-bit operand");
                (
                    as_half(random(&shape.a_dims(), seed, device)),
                    as_half(random(&shape.b_dims(), seed + 1, device)),
                )
            };
            let run = |(a, b): &(Tensor, Tensor)| {
                a.gemm_with(b, shape.trans_a, shape.trans_b, GemmKernel::V4TensorCore)
                    .expect("16-bit gemm")
            };
            let Some(inputs) = bench_op(bench, target, &case, prepare, run, None) else {
                continue;
            };
            if let Some(cublas) = &vendor.cublas {
                let widened = |t: &Tensor| t.to_dtype(DType::F32).expect("widened output");
                let out = widened(&run(&inputs));
                let c = zeros([shape.m, shape.n], target.device)
                    .to_dtype(dtype)
                    .expect("16-bit output");
                let call =
                    || cublas.gemm_16bit(&inputs.0, &inputs.1, &c, shape.trans_a, shape.trans_b);
                // Both round C once to 16 bits after f32 sums in their own
                // order: elements may differ by an ulp (2⁻⁷ of bf16's scale).
                let checked = call().and_then(|()| compare(&widened(&c), &out, rtol_for(dtype)));
                match checked {
                    Err(e) => eprintln!(
                        "  cuBLAS baseline for {} {} dropped: {e}",
                        case.kernel, case.shape
                    ),
                    Ok(()) => {
                        let seconds = bench.time_baseline(target, &case, "cuBLAS", || {
                            call().expect("cuBLAS ran before");
                        });
                        if let Some(seconds) = seconds {
                            bench.set_baseline(target, &case, "cuBLAS", seconds);
                        }
                    }
                }
            }
        }
    }
}

/// The baseline seconds of the record timed last (to reuse one cuBLAS
/// timing for every rung of the ladder on a shape).
fn last_baseline(bench: &Bench) -> Option<f64> {
    bench.last_record()?.baseline.as_ref().map(|(_, s)| *s)
}

// ----- convolutions ------------------------------------------------------------

/// A conv layer: the input x [N, C, H, W] and weight [O, C, k, k] of the
/// conv2d, or of the conv whose data-gradient a conv_transpose2d is.
struct ConvLayer {
    name: &'static str,
    x: [usize; 4],
    w: [usize; 4],
    stride: usize,
    padding: usize,
}

const fn conv_layer(
    name: &'static str,
    x: [usize; 4],
    w: [usize; 4],
    stride: usize,
    padding: usize,
) -> ConvLayer {
    ConvLayer {
        name,
        x,
        w,
        stride,
        padding,
    }
}

/// The DCGAN discriminator's convs (batch 64, 32×32 input, ndf 64).
fn dcgan_convs() -> Vec<ConvLayer> {
    let all = vec![
        conv_layer("D1", [64, 1, 32, 32], [64, 1, 4, 4], 2, 1),
        conv_layer("D2", [64, 64, 16, 16], [128, 64, 4, 4], 2, 1),
        conv_layer("D3", [64, 128, 8, 8], [256, 128, 4, 4], 2, 1),
        conv_layer("D4", [64, 256, 4, 4], [1, 256, 4, 4], 1, 0),
    ];
    keep_in_quick(all, &["D1", "D2"])
}

/// The DCGAN generator's transposed convs (batch 64, nz 100, ngf 64): x is
/// the convT's input [N, Cin, H, W], w its weight [Cin, Cout, k, k].
fn dcgan_conv_transposes() -> Vec<ConvLayer> {
    let all = vec![
        conv_layer("G1", [64, 100, 1, 1], [100, 256, 4, 4], 1, 0),
        conv_layer("G2", [64, 256, 4, 4], [256, 128, 4, 4], 2, 1),
        conv_layer("G3", [64, 128, 8, 8], [128, 64, 4, 4], 2, 1),
        conv_layer("G4", [64, 64, 16, 16], [64, 1, 4, 4], 2, 1),
    ];
    keep_in_quick(all, &["G3"])
}

fn keep_in_quick(layers: Vec<ConvLayer>, keep: &[&str]) -> Vec<ConvLayer> {
    if quick() {
        layers
            .into_iter()
            .filter(|l| keep.contains(&l.name))
            .collect()
    } else {
        layers
    }
}

impl ConvLayer {
    fn conv_params(&self) -> Conv2dParams {
        Conv2dParams {
            stride: [self.stride; 2],
            padding: [self.padding; 2].into(),
            ..Conv2dParams::default()
        }
    }

    fn transpose_params(&self) -> ConvTranspose2dParams {
        ConvTranspose2dParams {
            stride: [self.stride; 2],
            padding: [self.padding; 2],
            output_padding: [0, 0],
            ..ConvTranspose2dParams::default()
        }
    }

    fn label(&self) -> String {
        format!(
            "{} x{} w{} s{} p{}",
            self.name,
            shape_str(&self.x),
            shape_str(&self.w),
            self.stride,
            self.padding
        )
    }
}

/// cuDNN's plan for one conv shape, when cuDNN convolutions passed their
/// smoke test on this target.
fn cudnn_conv(
    vendor: &Vendor,
    target: &Target,
    x: [usize; 4],
    w: [usize; 4],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
) -> Option<CudnnConv> {
    let cuda = target.cuda_device().filter(|_| vendor.cudnn_conv)?;
    CudnnConv::new(cuda, x, w, stride, padding, dilation)
        .map_err(|e| eprintln!("cuDNN conv for x{x:?} w{w:?} unavailable: {e}"))
        .ok()
}

fn dims4(shape: &Shape) -> [usize; 4] {
    shape.dims().try_into().expect("a rank-4 shape")
}

fn conv_benches(bench: &mut Bench, target: &Target, vendor: &Vendor) {
    for layer in dcgan_convs() {
        conv2d_layer(bench, target, vendor, &layer);
    }
    for layer in dcgan_conv_transposes() {
        conv_transpose2d_layer(bench, target, vendor, &layer);
    }
}

/// conv2d forward (each ladder rung on CUDA), backward-data, backward-weight
/// and the whole forward+backward, on one layer.
fn conv2d_layer(bench: &mut Bench, target: &Target, vendor: &Vendor, layer: &ConvLayer) {
    let params = layer.conv_params();
    let g = ConvGeometry::for_conv2d(&layer.x.into(), &layer.w.into(), params).unwrap();
    let y = dims4(&g.output_shape());
    let flops = 2 * (g.batch * g.out_channels * g.col_rows() * g.out_positions()) as u64;
    let (nx, nw, ny) = (numel(&layer.x), numel(&layer.w), numel(&y));
    let cudnn = cudnn_conv(
        vendor,
        target,
        layer.x,
        layer.w,
        params.stride,
        [layer.padding; 2],
        params.dilation,
    );
    let cpu_reference = |x: &Tensor, w: &Tensor| {
        let expected = kiln::ops::conv::cpu::conv2d_reference(
            &g,
            &x.to_vec::<f32>().unwrap(),
            &w.to_vec::<f32>().unwrap(),
            None,
        );
        Tensor::from_vec(expected, y).unwrap()
    };

    // Forward.
    let prepare = |device: Device, seed: u64| {
        (
            random(&layer.x, seed, device),
            random(&layer.w, seed + 1, device).mul_scalar(0.05).unwrap(),
        )
    };
    let kernels: &[(&str, Conv2dForwardKernel)] = if target.is_cuda() {
        &[
            ("conv2d forward direct", Conv2dForwardKernel::Direct),
            (
                "conv2d forward implicit_gemm",
                Conv2dForwardKernel::ImplicitGemm,
            ),
        ]
    } else {
        &[("conv2d forward", Conv2dForwardKernel::ENGINE)]
    };
    for &(kernel, choice) in kernels {
        let case = Case::new(kernel, layer.label(), Bound::Compute)
            .flops(flops)
            .floats(nx + nw + ny);
        let run = |(x, w): &(Tensor, Tensor)| {
            conv2d_forward_with_kernel(x, w, None, params, choice).unwrap()
        };
        let reference = |(x, w): &(Tensor, Tensor)| cpu_reference(x, w);
        let Some((x, w)) = bench_op(bench, target, &case, prepare, run, Some(&reference)) else {
            continue;
        };
        if let Some(cudnn) = &cudnn {
            let out = run(&(x.clone(), w.clone()));
            let yt = zeros(y, target.device);
            bench_baseline(bench, target, &case, "cuDNN", &out, || {
                cudnn.forward(&x, &w, &yt)?;
                Ok(yt.clone())
            });
        } else if layer.name == "D1" && !target.is_cuda() {
            // The definition (direct loops) beside im2col + GEMM.
            if let Some(seconds) = bench.time_baseline(target, &case, "reference", || {
                std::hint::black_box(cpu_reference(&x, &w));
            }) {
                bench.set_baseline(target, &case, "reference", seconds);
            }
        }
    }

    // The bf16 forward on tensor cores (2-byte operands), checked against
    // the CPU's bf16 conv2d.
    if target.is_cuda() {
        let case = Case::new(
            "conv2d forward tensor_core bf16",
            layer.label(),
            Bound::Compute,
        )
        .flops(flops)
        .bytes(2 * (nx + nw + ny) as u64);
        let prepare_bf16 = |device: Device, seed: u64| {
            let (x, w) = prepare(device, seed);
            let bf16 = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
            (bf16(x), bf16(w))
        };
        let run = |(x, w): &(Tensor, Tensor)| {
            conv2d_forward_with_kernel(x, w, None, params, Conv2dForwardKernel::TensorCore).unwrap()
        };
        bench_op(bench, target, &case, prepare_bf16, run, None);
    }

    let conv = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| x.conv2d(w, b, params).unwrap();
    let shapes = LayerShapes { layer, y, flops };
    // Backward-data: dL/dx = col2im(Wᵀ · dy).
    let baseline = cudnn.as_ref().map(|c| {
        move |_: &Tensor, w: &Tensor, dy: &Tensor, dx: &Tensor| c.backward_data(w, dy, dx)
    });
    conv_backward_case(
        bench,
        target,
        "conv2d backward-data",
        &shapes,
        &conv,
        Wrt::Input,
        baseline.as_ref().map(|f| f as _),
    );
    // Backward-weight: dL/dW = Σ_n dy_n · im2col(x_n)ᵀ.
    let baseline = cudnn.as_ref().map(|c| {
        move |x: &Tensor, _: &Tensor, dy: &Tensor, dw: &Tensor| c.backward_filter(x, dy, dw)
    });
    conv_backward_case(
        bench,
        target,
        "conv2d backward-weight",
        &shapes,
        &conv,
        Wrt::Weight,
        baseline.as_ref().map(|f| f as _),
    );
    if layer.name == "D2" {
        conv_forward_backward_case(
            bench,
            target,
            "conv2d forward+backward",
            &shapes,
            &conv,
            layer.w[0],
        );
    }
}

/// A conv layer's sizes as the backward cases need them.
struct LayerShapes<'a> {
    layer: &'a ConvLayer,
    /// The op's output shape.
    y: [usize; 4],
    /// FLOPs of one pass (forward, backward-data and backward-weight each).
    flops: u64,
}

/// Which operand a backward case differentiates.
#[derive(Clone, Copy, PartialEq)]
enum Wrt {
    Input,
    Weight,
}

/// A conv op as a case runs it: y = op(x, w, bias).
type ConvOp<'a> = &'a dyn Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor;

/// A vendor call writing the gradient into the last tensor, given (x, w, dy).
type ConvBaseline<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(), String>;

/// One backward kernel of a conv op: the forward graph is built once per
/// input set, and backward runs with only x (backward-data) or only w
/// (backward-weight) requiring a gradient, so only that kernel runs.
fn conv_backward_case(
    bench: &mut Bench,
    target: &Target,
    kernel: &str,
    shapes: &LayerShapes,
    op: ConvOp,
    wrt: Wrt,
    baseline: Option<ConvBaseline>,
) {
    let layer = shapes.layer;
    let (nx, nw, ny) = (numel(&layer.x), numel(&layer.w), numel(&shapes.y));
    let case = Case::new(kernel, layer.label(), Bound::Compute)
        .flops(shapes.flops)
        .floats(nx + nw + ny);
    let prepare = |device: Device, seed: u64| {
        let x = random(&layer.x, seed, device);
        let w = random(&layer.w, seed + 1, device).mul_scalar(0.05).unwrap();
        let (x, w) = match wrt {
            Wrt::Input => (x.requires_grad_(), w),
            Wrt::Weight => (x, w.requires_grad_()),
        };
        let y = op(&x, &w, None);
        let dy = random(&shapes.y, seed + 2, device);
        (x, w, y, dy)
    };
    let run = |(x, w, y, dy): &(Tensor, Tensor, Tensor, Tensor)| match wrt {
        Wrt::Input => grad_of(y, dy, x),
        Wrt::Weight => grad_of(y, dy, w),
    };
    if let Some(inputs) = bench_op(bench, target, &case, prepare, run, None)
        && let Some(baseline) = baseline
    {
        let expected = run(&inputs);
        let (x, w, _, dy) = &inputs;
        let grad = zeros(
            if wrt == Wrt::Input { layer.x } else { layer.w },
            target.device,
        );
        bench_baseline(bench, target, &case, "cuDNN", &expected, || {
            baseline(&x.detach(), &w.detach(), dy, &grad)?;
            Ok(grad.clone())
        });
    }
}

/// The whole layer as training runs it: forward with a bias of `bias_len`,
/// then dx, dW and db.
fn conv_forward_backward_case(
    bench: &mut Bench,
    target: &Target,
    kernel: &str,
    shapes: &LayerShapes,
    op: ConvOp,
    bias_len: usize,
) {
    let layer = shapes.layer;
    let (nx, nw, ny) = (numel(&layer.x), numel(&layer.w), numel(&shapes.y));
    let case = Case::new(kernel, layer.label(), Bound::Compute)
        .flops(3 * shapes.flops)
        .floats(2 * (nx + nw + ny) + nx + nw);
    let prepare = |device: Device, seed: u64| {
        (
            leaf(&layer.x, seed, device),
            random(&layer.w, seed + 1, device)
                .mul_scalar(0.05)
                .unwrap()
                .requires_grad_(),
            leaf(&[bias_len], seed + 2, device),
            random(&shapes.y, seed + 3, device),
        )
    };
    let run = |(x, w, b, dy): &(Tensor, Tensor, Tensor, Tensor)| {
        let out = op(x, w, Some(b));
        grad_of(&out, dy, w)
    };
    bench_op(bench, target, &case, prepare, run, None);
}

/// conv_transpose2d forward, backward-data, backward-weight and the whole
/// forward+backward. cuDNN has no transposed conv of its own: its forward is
/// the mirror conv's backward-data, and so on (as in every framework).
fn conv_transpose2d_layer(bench: &mut Bench, target: &Target, vendor: &Vendor, layer: &ConvLayer) {
    let params = layer.transpose_params();
    let g = ConvGeometry::for_conv_transpose2d(&layer.x.into(), &layer.w.into(), params).unwrap();
    // g describes the mirror conv2d: its input is this op's output.
    let y = dims4(&g.input_shape());
    let flops = 2 * (g.batch * g.out_channels * g.col_rows() * g.out_positions()) as u64;
    let (nx, nw, ny) = (numel(&layer.x), numel(&layer.w), numel(&y));
    let cudnn = cudnn_conv(
        vendor,
        target,
        y,
        layer.w,
        [layer.stride; 2],
        [layer.padding; 2],
        [1, 1],
    );

    let prepare = |device: Device, seed: u64| {
        (
            random(&layer.x, seed, device),
            random(&layer.w, seed + 1, device).mul_scalar(0.05).unwrap(),
        )
    };
    let case = Case::new("conv_transpose2d forward", layer.label(), Bound::Compute)
        .flops(flops)
        .floats(nx + nw + ny);
    let run = |(x, w): &(Tensor, Tensor)| x.conv_transpose2d(w, None, params).unwrap();
    let reference = |(x, w): &(Tensor, Tensor)| {
        let expected = kiln::ops::conv::cpu::conv_transpose2d_reference(
            &g,
            &x.to_vec::<f32>().unwrap(),
            &w.to_vec::<f32>().unwrap(),
            None,
        );
        Tensor::from_vec(expected, y).unwrap()
    };
    if let Some((x, w)) = bench_op(bench, target, &case, prepare, run, Some(&reference))
        && let Some(cudnn) = &cudnn
    {
        let out = run(&(x.clone(), w.clone()));
        let yt = zeros(y, target.device);
        bench_baseline(bench, target, &case, "cuDNN", &out, || {
            cudnn.backward_data(&w, &x, &yt)?;
            Ok(yt.clone())
        });
    }

    let conv_t =
        |x: &Tensor, w: &Tensor, b: Option<&Tensor>| x.conv_transpose2d(w, b, params).unwrap();
    let shapes = LayerShapes { layer, y, flops };
    // Backward-data: dL/dx = conv2d(dy, W), the mirror conv's forward.
    let baseline = cudnn
        .as_ref()
        .map(|c| move |_: &Tensor, w: &Tensor, dy: &Tensor, dx: &Tensor| c.forward(dy, w, dx));
    conv_backward_case(
        bench,
        target,
        "conv_transpose2d backward-data",
        &shapes,
        &conv_t,
        Wrt::Input,
        baseline.as_ref().map(|f| f as _),
    );
    // Backward-weight: dL/dW = Σ_n x_n · im2col(dy_n)ᵀ, the mirror conv's
    // weight gradient with dy as its input and x as its output gradient.
    let baseline = cudnn.as_ref().map(|c| {
        move |x: &Tensor, _: &Tensor, dy: &Tensor, dw: &Tensor| c.backward_filter(dy, x, dw)
    });
    conv_backward_case(
        bench,
        target,
        "conv_transpose2d backward-weight",
        &shapes,
        &conv_t,
        Wrt::Weight,
        baseline.as_ref().map(|f| f as _),
    );
    if layer.name == "G3" {
        conv_forward_backward_case(
            bench,
            target,
            "conv_transpose2d forward+backward",
            &shapes,
            &conv_t,
            layer.w[1],
        );
    }
}

fn numel(dims: &[usize]) -> usize {
    dims.iter().product()
}

// ----- batch norm, activations -------------------------------------------------

/// The DCGAN activations that pass through BatchNorm2d and LeakyReLU.
fn dcgan_activations() -> Vec<(&'static str, [usize; 4])> {
    let all = vec![
        ("D2 out", [64, 128, 8, 8]),
        ("D3 out", [64, 256, 4, 4]),
        ("G3 out", [64, 64, 16, 16]),
    ];
    if quick() { all[..1].to_vec() } else { all }
}

/// Train-mode BatchNorm2d, forward (batch statistics, running statistics
/// updated) and backward (dx, dγ, dβ).
/// Arithmetic per element: forward 8 (mean and variance sums 3, normalise
/// and scale 5), backward 10.
fn batch_norm_benches(bench: &mut Bench, target: &Target, vendor: &Vendor) {
    for (name, dims) in dcgan_activations() {
        let n = numel(&dims);
        let c = dims[1];
        let label = format!("{name} {}", shape_str(&dims));
        let cudnn = vendor
            .cudnn_batch_norm
            .then(|| target.cuda_device())
            .flatten()
            .and_then(|cuda| CudnnBatchNorm::new(cuda, dims).ok());

        let case = Case::new("batch_norm2d forward (train)", label.clone(), Bound::Memory)
            .flops(8 * n as u64)
            .floats(2 * n + 4 * c);
        let prepare = |device: Device, seed: u64| {
            (
                random(&dims, seed, device),
                random(&[c], seed + 1, device),
                random(&[c], seed + 2, device),
            )
        };
        let run = |(x, gamma, beta): &(Tensor, Tensor, Tensor)| {
            x.batch_norm2d(None, None, Some(gamma), Some(beta), true, 0.1, 1e-5)
                .unwrap()
        };
        if let Some((x, gamma, beta)) = bench_op(bench, target, &case, prepare, run, None)
            && let Some(cudnn) = &cudnn
        {
            let out = run(&(x.clone(), gamma.clone(), beta.clone()));
            let yt = zeros(dims, target.device);
            bench_baseline(bench, target, &case, "cuDNN", &out, || {
                cudnn.forward_training(&x, &gamma, &beta, &yt)?;
                Ok(yt.clone())
            });
        }

        let case = Case::new("batch_norm2d backward", label, Bound::Memory)
            .flops(10 * n as u64)
            .floats(3 * n + 4 * c);
        let prepare = |device: Device, seed: u64| {
            let x = leaf(&dims, seed, device);
            let gamma = leaf(&[c], seed + 1, device);
            let beta = leaf(&[c], seed + 2, device);
            let y = x
                .batch_norm2d(None, None, Some(&gamma), Some(&beta), true, 0.1, 1e-5)
                .unwrap();
            let dy = random(&dims, seed + 3, device);
            (x, gamma, beta, y, dy)
        };
        let run = |(x, _, _, y, dy): &(Tensor, Tensor, Tensor, Tensor, Tensor)| grad_of(y, dy, x);
        if let Some((x, gamma, beta, y, dy)) = bench_op(bench, target, &case, prepare, run, None)
            && let Some(cudnn) = &cudnn
        {
            let out = grad_of(&y, &dy, &x);
            let (dx, dgamma, dbeta) = (
                zeros(dims, target.device),
                zeros([c], target.device),
                zeros([c], target.device),
            );
            let (xd, gd) = (x.detach(), gamma.detach());
            let yt = zeros(dims, target.device);
            // Backward needs the saved statistics of a forward on the same x.
            let ready = cudnn.forward_training(&xd, &gd, &beta.detach(), &yt);
            if ready.is_ok() {
                bench_baseline(bench, target, &case, "cuDNN", &out, || {
                    cudnn.backward(&xd, &dy, &gd, &dx, &dgamma, &dbeta)?;
                    Ok(dx.clone())
                });
            }
        }
    }
}

/// LeakyReLU(0.2) forward (1 op per element: y = x > 0 ? x : 0.2·x) and
/// backward (1: dx = dy · (x > 0 ? 1 : 0.2)).
fn activation_benches(bench: &mut Bench, target: &Target) {
    for (name, dims) in dcgan_activations() {
        let n = numel(&dims);
        let label = format!("{name} {}", shape_str(&dims));
        let case = Case::new("leaky_relu forward", label.clone(), Bound::Memory)
            .flops(n as u64)
            .floats(2 * n);
        bench_op(
            bench,
            target,
            &case,
            |device, seed| random(&dims, seed, device),
            |x| x.leaky_relu(0.2).unwrap(),
            None,
        );
        let case = Case::new("leaky_relu backward", label, Bound::Memory)
            .flops(n as u64)
            .floats(3 * n);
        bench_op(
            bench,
            target,
            &case,
            |device, seed| {
                let x = leaf(&dims, seed, device);
                let y = x.leaky_relu(0.2).unwrap();
                (x, y, random(&dims, seed + 1, device))
            },
            |(x, y, dy)| grad_of(y, dy, x),
            None,
        );
    }
}

// ----- GPT: softmax, layer norm, attention, embedding ---------------------------

/// A GPT configuration's activation sizes: batch B, context T, width E, heads H.
struct GptShape {
    name: &'static str,
    batch: usize,
    block: usize,
    embd: usize,
    heads: usize,
}

const VOCAB: usize = 84;

fn gpt_shapes(target: &Target) -> Vec<GptShape> {
    let mut shapes = vec![GptShape {
        name: "gpt",
        batch: 32,
        block: 64,
        embd: 128,
        heads: 4,
    }];
    if target.is_cuda() || !quick() {
        shapes.push(GptShape {
            name: "gpt-l",
            batch: 64,
            block: 256,
            embd: 384,
            heads: 6,
        });
    }
    shapes
}

impl GptShape {
    fn tokens(&self) -> usize {
        self.batch * self.block
    }
}

/// Softmax over the vocabulary logits (forward 4 per element: max, exp,
/// sum, divide; backward 4: dx = y·(dy − Σ y·dy)) and LayerNorm over the
/// residual stream (forward 8 per element, backward 10, as batch norm).
fn softmax_and_layer_norm_benches(bench: &mut Bench, target: &Target) {
    for gpt in gpt_shapes(target) {
        let rows = gpt.tokens();
        let logits = [rows, VOCAB];
        let n = rows * VOCAB;
        let label = format!("{} logits {}", gpt.name, shape_str(&logits));
        let case = Case::new("softmax forward", label.clone(), Bound::Memory)
            .flops(4 * n as u64)
            .floats(2 * n);
        bench_op(
            bench,
            target,
            &case,
            |device, seed| random(&logits, seed, device),
            |x| x.softmax(-1).unwrap(),
            None,
        );
        let case = Case::new("softmax backward", label, Bound::Memory)
            .flops(4 * n as u64)
            .floats(3 * n);
        bench_op(
            bench,
            target,
            &case,
            |device, seed| {
                let x = leaf(&logits, seed, device);
                let y = x.softmax(-1).unwrap();
                (x, y, random(&logits, seed + 1, device))
            },
            |(x, y, dy)| grad_of(y, dy, x),
            None,
        );

        let stream = [rows, gpt.embd];
        let n = rows * gpt.embd;
        let e = gpt.embd;
        let label = format!("{} {}", gpt.name, shape_str(&stream));
        let case = Case::new("layer_norm forward", label.clone(), Bound::Memory)
            .flops(8 * n as u64)
            .floats(2 * n + 2 * e);
        bench_op(
            bench,
            target,
            &case,
            |device, seed| {
                (
                    random(&stream, seed, device),
                    random(&[e], seed + 1, device),
                    random(&[e], seed + 2, device),
                )
            },
            |(x, w, b)| x.layer_norm(Some(w), Some(b), 1e-5).unwrap(),
            None,
        );
        let case = Case::new("layer_norm backward", label, Bound::Memory)
            .flops(10 * n as u64)
            .floats(3 * n + 3 * e);
        bench_op(
            bench,
            target,
            &case,
            |device, seed| {
                let x = leaf(&stream, seed, device);
                let w = leaf(&[e], seed + 1, device);
                let b = leaf(&[e], seed + 2, device);
                let y = x.layer_norm(Some(&w), Some(&b), 1e-5).unwrap();
                (x, y, random(&stream, seed + 3, device))
            },
            |(x, y, dy)| grad_of(y, dy, x),
            None,
        );
    }
}

/// The GPT's elementwise ops, all memory-bound at these sizes (their % is
/// of the copy bandwidth): GELU (tanh form) on the MLP's hidden activations
/// [B·T, 4E] (forward ~20 flops per element, backward ~25), the residual
/// add on [B·T, E] (1), and a Linear's bias broadcast over the hidden
/// rows, [B·T, 4E] + [4E] (1).
fn gpt_elementwise_benches(bench: &mut Bench, target: &Target) {
    for gpt in gpt_shapes(target) {
        let hidden = [gpt.tokens(), 4 * gpt.embd];
        let n = numel(&hidden);
        let label = format!("{} mlp {}", gpt.name, shape_str(&hidden));
        let case = Case::new("gelu_tanh forward", label.clone(), Bound::Memory)
            .flops(20 * n as u64)
            .floats(2 * n);
        bench_op(
            bench,
            target,
            &case,
            |device, seed| random(&hidden, seed, device),
            |x| x.gelu(GeluApproximation::Tanh).unwrap(),
            None,
        );
        let case = Case::new("gelu_tanh backward", label.clone(), Bound::Memory)
            .flops(25 * n as u64)
            .floats(3 * n);
        bench_op(
            bench,
            target,
            &case,
            |device, seed| {
                let x = leaf(&hidden, seed, device);
                let y = x.gelu(GeluApproximation::Tanh).unwrap();
                (x, y, random(&hidden, seed + 1, device))
            },
            |(x, y, dy)| grad_of(y, dy, x),
            None,
        );
        let case = Case::new("add bias", label, Bound::Memory)
            .flops(n as u64)
            .floats(2 * n + hidden[1]);
        bench_op(
            bench,
            target,
            &case,
            |device, seed| {
                (
                    random(&hidden, seed, device),
                    random(&hidden[1..], seed + 1, device),
                )
            },
            |(x, b)| x.add(b).unwrap(),
            None,
        );

        let stream = [gpt.tokens(), gpt.embd];
        let n = numel(&stream);
        let case = Case::new(
            "add",
            format!("{} residual {}", gpt.name, shape_str(&stream)),
            Bound::Memory,
        )
        .flops(n as u64)
        .floats(3 * n);
        bench_op(
            bench,
            target,
            &case,
            |device, seed| {
                (
                    random(&stream, seed, device),
                    random(&stream, seed + 1, device),
                )
            },
            |(x, y)| x.add(y).unwrap(),
            None,
        );
    }
}

/// Causal self-attention on q, k, v [B, H, T, D].
fn attention_benches(bench: &mut Bench, target: &Target) {
    for gpt in gpt_shapes(target) {
        let d = gpt.embd / gpt.heads;
        let qkv = [gpt.batch, gpt.heads, gpt.block, d];
        let n = numel(&qkv);
        let pairs = gpt.batch * gpt.heads * gpt.block * (gpt.block + 1) / 2;
        let forward_flops = 2 * 2 * (pairs * d) as u64;
        let label = format!("{} q,k,v{}", gpt.name, shape_str(&qkv));
        let scale = 1.0 / (d as f64).sqrt();
        let case = Case::new("causal_attention forward", label.clone(), Bound::Compute)
            .flops(forward_flops)
            .floats(4 * n);
        let prepare = |device: Device, seed: u64| {
            (
                random(&qkv, seed, device).mul_scalar(scale).unwrap(),
                random(&qkv, seed + 1, device),
                random(&qkv, seed + 2, device),
            )
        };
        bench_op(
            bench,
            target,
            &case,
            prepare,
            |(q, k, v)| Tensor::causal_attention(q, k, v).unwrap(),
            None,
        );
        let case = Case::new("causal_attention backward", label, Bound::Compute)
            .flops(2 * forward_flops)
            .floats(8 * n);
        bench_op(
            bench,
            target,
            &case,
            |device, seed| {
                let (q, k, v) = prepare(device, seed);
                let (q, k, v) = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_());
                let y = Tensor::causal_attention(&q, &k, &v).unwrap();
                (q, y, random(&qkv, seed + 3, device))
            },
            |(q, y, dy)| grad_of(y, dy, q),
            None,
        );
    }
}

/// Token embedding lookup (forward: one row gathered per id) and its
/// gradient (rows scattered and summed into dW).
fn embedding_benches(bench: &mut Bench, target: &Target) {
    for gpt in gpt_shapes(target) {
        let (tokens, e) = (gpt.tokens(), gpt.embd);
        let label = format!(
            "{} ids[{},{}] wte[{VOCAB},{e}]",
            gpt.name, gpt.batch, gpt.block
        );
        let ids = |device: Device, seed: u64| {
            let values: Vec<u32> = (0..tokens as u64)
                .map(|i| ((i * 2_654_435_761 + seed * 97) % VOCAB as u64) as u32)
                .collect();
            Tensor::from_indices(values, [gpt.batch, gpt.block])
                .unwrap()
                .to_device(device)
                .unwrap()
        };
        let case = Case::new("embedding forward", label.clone(), Bound::Memory)
            .bytes(4 * tokens as u64 + 4 * (2 * tokens * e) as u64);
        bench_op(
            bench,
            target,
            &case,
            |device, seed| (ids(device, seed), random(&[VOCAB, e], seed, device)),
            |(ids, w)| Tensor::embedding(ids, w).unwrap(),
            None,
        );
        let case = Case::new("embedding backward", label, Bound::Memory)
            .flops((tokens * e) as u64)
            .bytes(4 * tokens as u64 + 4 * (tokens * e + VOCAB * e) as u64);
        bench_op(
            bench,
            target,
            &case,
            |device, seed| {
                let w = leaf(&[VOCAB, e], seed, device);
                let y = Tensor::embedding(&ids(device, seed), &w).unwrap();
                (w, y, random(&[gpt.batch, gpt.block, e], seed + 1, device))
            },
            |(w, y, dy)| grad_of(y, dy, w),
            None,
        );
    }
}

// ----- optimizer ---------------------------------------------------------------

/// One fused AdamW step over all of a GPT's parameters (one kernel per
/// parameter tensor). Per parameter it reads p, g, m, v and writes p, m, v,
/// and does 12 ops (two moment updates, bias corrections, √, divide, decay).
fn adam_benches(bench: &mut Bench, target: &Target) {
    for gpt in gpt_shapes(target) {
        let cfg = kiln::models::gpt::GptConfig {
            vocab_size: VOCAB,
            n_layer: if gpt.name == "gpt" { 4 } else { 6 },
            n_head: gpt.heads,
            n_embd: gpt.embd,
            block_size: gpt.block,
            dropout: 0.0,
        };
        let prepare = |device: Device, seed: u64| {
            let mut rng = kiln::Rng::seed(seed);
            let mut init = Init::new(&mut rng, device, DType::F32);
            let model = kiln::models::gpt::Gpt::new(&cfg, seed, &mut init).unwrap();
            let params = model.named_parameters();
            // A gradient for every parameter: d/dp Σ p·r = r.
            let mut loss: Option<Tensor> = None;
            for (i, (_, p)) in params.iter().enumerate() {
                let r = random(p.dims(), seed + i as u64, device);
                let term = p.mul(&r).unwrap().sum_all().unwrap();
                loss = Some(match loss {
                    Some(l) => l.add(&term).unwrap(),
                    None => term,
                });
            }
            let grads = loss.unwrap().backward().unwrap();
            let optimizer = AdamW::new(params.clone(), AdamConfig::adam()).unwrap();
            (params, grads, std::cell::RefCell::new(optimizer))
        };
        let count: usize = prepare(Device::Cpu, 0)
            .0
            .iter()
            .map(|(_, p)| p.numel())
            .sum();
        let case = Case::new(
            "adamw step",
            format!("{} {count} params", gpt.name),
            Bound::Memory,
        )
        .flops(12 * count as u64)
        .floats(7 * count);
        let run = |(params, grads, optimizer): &(
            Vec<(String, Tensor)>,
            kiln::GradStore,
            std::cell::RefCell<AdamW>,
        )| {
            optimizer.borrow_mut().step(grads).unwrap();
            params[0].1.clone()
        };
        // The timed sets have taken many steps: the check runs one step
        // from the same fresh start on both devices.
        if time_op(bench, target, &case, prepare, run).is_none() {
            continue;
        }
        if target.is_cuda() {
            let (fresh, cpu) = (prepare(target.device, 7), prepare(Device::Cpu, 7));
            let outcome = compare(&run(&fresh), &run(&cpu), RTOL);
            bench.check(target, &case, outcome);
        }
    }
}
