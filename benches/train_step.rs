//! Whole training steps of the three models: forward, loss, backward and
//! optimizer update, through the same `train_step` functions that
//! `kiln train` calls, on models built exactly as the CLI builds them (its
//! default sizes, seed 0, parameters initialised on the target device).
//!
//! Cases, each timed per step with `samples/s` = examples per second:
//! - `train_step gan`: DCGAN, batch 64 of 1×32×32 images in [−1, 1], nz 100,
//!   ngf = ndf = 64; one discriminator and one generator update (Adam).
//! - `train_step gan 64x64 rgb`: the paper's DCGAN, batch 64 of 3×64×64
//!   images (`kiln train gan --image-size 64 --channels 3`), one stage more
//!   in each network; in f32 on the CPU, in f32 and bf16 on CUDA.
//! - `train_step vae`: VAE 784-400-20-400-784, batch 128 of images in [0, 1] (Adam).
//! - `train_step gpt`: character GPT, vocabulary 84, 4 layers / 4 heads /
//!   128 wide, context 64, batch 32; AdamW in two groups and gradient
//!   clipping with the CLI's defaults. On CUDA also nanoGPT's Shakespeare size: 6 layers / 6
//!   heads / 384 wide, context 256, batch 64 (too slow for the CPU suite).
//!
//! Every case runs in f32 and again in bf16 (`--precision bf16`: autocast,
//! f32 master weights, and as in `kiln train` the optimizers keep bf16
//! copies of the weights for the forward pass), named "... bf16", on each
//! device.
//!
//! Inputs are synthetic (random pixels, random token ids): a step costs the
//! same on any data of its shape, and the bench needs no data files. FLOPs
//! are not reported: a step mixes many ops whose exact counts differ with
//! the autograd path taken, so the table gives time and samples/s only.
//!
//! After timing, every training step on each device is broken down by op
//! (see `kiln::profile`), and each model is validated: its losses are
//! finite and every parameter has moved. On the CPU the breakdown also gives
//! the step's host memory: the most heap bytes a step holds above what it
//! starts with (activations, gradients and temporaries; the model and its
//! optimizer state are already allocated), counted by this binary's
//! allocator, so f32 and bf16 steps can be compared byte for byte.
//!
//! Run with `cargo bench --bench train_step`; `KILN_BENCH_QUICK=1` keeps the
//! whole binary under a minute on a 2-core machine.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use common::{Bench, Bound, Case, Target};
use kiln::cli::specs::{GanSpec, GptSpec, VaeSpec, build_gan, build_gpt, build_vae};
use kiln::models::gpt::GptOptimizers;
use kiln::models::{dcgan, gpt, vae};
use kiln::nn::Module;
use kiln::optim::Optimizer;
use kiln::{DType, MixedPrecision, Precision, Rng, Tensor, profile};

/// The system allocator, counting the heap bytes in use and their peak.
struct CountingAllocator;

static HEAP_IN_USE: AtomicUsize = AtomicUsize::new(0);
static HEAP_PEAK: AtomicUsize = AtomicUsize::new(0);

impl CountingAllocator {
    fn grew(bytes: usize) {
        let now = HEAP_IN_USE.fetch_add(bytes, Ordering::Relaxed) + bytes;
        HEAP_PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed to System unchanged; only counters are added.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            Self::grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            Self::grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) };
        HEAP_IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            HEAP_IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
            Self::grew(new_size);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The most heap bytes one call of `step` held above what was in use before it.
fn step_heap_peak<R>(step: &mut impl FnMut() -> R) -> usize {
    let start = HEAP_IN_USE.load(Ordering::Relaxed);
    HEAP_PEAK.store(start, Ordering::Relaxed);
    drop(step());
    HEAP_PEAK.load(Ordering::Relaxed).saturating_sub(start)
}

/// The CLI's default seed: the same initial weights as `kiln train`.
const SEED: u64 = 0;

/// Characters in the Shakespeare vocabulary the GPT is sized for.
const VOCAB: usize = 84;

/// Untimed steps before timing: the first step creates the optimizer state
/// and (on CUDA) compiles the kernels; criterion then warms up on its own.
fn warm_up_steps() -> usize {
    if common::quick() { 1 } else { 2 }
}

/// Steps the profiled breakdown averages over.
fn profiled_steps() -> usize {
    if common::quick() { 2 } else { 5 }
}

fn main() {
    let mut bench = Bench::new("train_step");
    bench.add_peak(common::cpu_peak());
    let targets = common::targets();
    for target in targets.iter().filter(|t| t.is_cuda()) {
        bench.add_peak(common::cuda_peak(target));
    }
    for target in &targets {
        let precisions = [Precision::F32, Precision::BF16];
        let paper_gan = GanSpec {
            channels: 3,
            image_size: 64,
            ..GanSpec::default()
        };
        for precision in precisions {
            bench_gan(&mut bench, target, &GanSpec::default(), precision);
            bench_vae(&mut bench, target, precision);
        }
        for precision in precisions {
            if precision == Precision::F32 || target.is_cuda() {
                bench_gan(&mut bench, target, &paper_gan, precision);
            }
        }
        let small = GptSpec {
            vocab_size: VOCAB,
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            block_size: 64,
            dropout: 0.0,
        };
        for precision in precisions {
            bench_gpt(&mut bench, target, &small, 32, precision);
        }
        if target.is_cuda() {
            let shakespeare = GptSpec {
                n_layer: 6,
                n_head: 6,
                n_embd: 384,
                block_size: 256,
                ..small
            };
            for precision in precisions {
                bench_gpt(&mut bench, target, &shakespeare, 64, precision);
            }
        }
    }
    bench.finish();
}

/// "train_step gpt", or "train_step gpt bf16" in a mixed precision.
fn case_name(model: &str, precision: Precision) -> String {
    match precision {
        Precision::F32 => format!("train_step {model}"),
        other => format!("train_step {model} {other}"),
    }
}

fn bench_gan(bench: &mut Bench, target: &Target, spec: &GanSpec, precision: Precision) {
    let batch = 64;
    let (generator, discriminator) = build_gan(spec, SEED, target.device).expect("DCGAN");
    let mut optim_g = dcgan::optimizer(&generator, 2e-4).expect("Adam for G");
    let mut optim_d = dcgan::optimizer(&discriminator, 2e-4).expect("Adam for D");
    keep_forward_copies(&mut [&mut optim_g, &mut optim_d], precision);
    let mut rng = Rng::seed(1);
    let (size, channels) = (spec.image_size, spec.channels);
    let real = Tensor::rand(
        -1.0,
        1.0,
        [batch, channels, size, size],
        DType::F32,
        target.device,
        &mut rng,
    )
    .expect("real images");
    let z = common::random(&[batch, spec.nz, 1, 1], 2, target.device);
    let initial = [snapshot(&generator), snapshot(&discriminator)];

    let mut amp = MixedPrecision::new(precision);
    let mut step = || {
        dcgan::train_step(
            &generator,
            &discriminator,
            &mut optim_g,
            &mut optim_d,
            &real,
            &z,
            &mut amp,
        )
        .expect("GAN step")
    };
    for _ in 0..warm_up_steps() {
        step();
    }
    // The default GAN keeps its historical case name; other sizes say theirs.
    let model = if *spec == GanSpec::default() {
        "gan".to_string()
    } else {
        format!(
            "gan {size}x{size} {}",
            if channels == 3 { "rgb" } else { "grey" }
        )
    };
    let case = Case::new(
        case_name(&model, precision),
        format!(
            "batch {batch}, {channels}×{size}×{size}, nz {}, ngf={} ndf={}, Adam",
            spec.nz, spec.ngf, spec.ndf
        ),
        Bound::Compute,
    )
    .samples(batch as u64);
    if bench.time(target, &case, || drop(step())).is_none() {
        return;
    }

    let title = format!(
        "GAN {size}x{size} {precision} step breakdown ({})",
        target.label()
    );
    let what = format!(
        "One DCGAN step (batch {batch} of {channels}×{size}×{size}, one D and one G update)"
    );
    let breakdown = profile_steps(target, &what, &mut step);
    println!("\n## {title}\n\n{breakdown}");
    bench.section(&title, breakdown);

    let last = step();
    for (name, loss) in [("loss_d", &last.loss_d), ("loss_g", &last.loss_g)] {
        assert_finite(&format!("gan {name}"), loss);
    }
    assert_moved("gan generator", &initial[0], &generator);
    assert_moved("gan discriminator", &initial[1], &discriminator);
}

fn bench_vae(bench: &mut Bench, target: &Target, precision: Precision) {
    let batch = 128;
    let spec = VaeSpec::default();
    let model = build_vae(&spec, SEED, target.device).expect("VAE");
    let mut optimizer = vae::optimizer(&model, 1e-3).expect("Adam");
    keep_forward_copies(&mut [&mut optimizer], precision);
    let mut rng = Rng::seed(3);
    let x = Tensor::rand(
        0.0,
        1.0,
        [batch, spec.input],
        DType::F32,
        target.device,
        &mut rng,
    )
    .expect("images");
    let initial = snapshot(&model);

    let mut amp = MixedPrecision::new(precision);
    let mut step =
        || vae::train_step(&model, &mut optimizer, &x, &mut rng, &mut amp).expect("VAE step");
    for _ in 0..warm_up_steps() {
        step();
    }
    let case = Case::new(
        case_name("vae", precision),
        format!("batch {batch}, 784-400-20-400-784, Adam"),
        Bound::Compute,
    )
    .samples(batch as u64);
    if bench.time(target, &case, || drop(step())).is_none() {
        return;
    }

    let title = format!("VAE {precision} step breakdown ({})", target.label());
    let what = format!("One VAE step (batch {batch}, 784-400-20-400-784, Adam)");
    let breakdown = profile_steps(target, &what, &mut step);
    println!("\n## {title}\n\n{breakdown}");
    bench.section(&title, breakdown);

    let last = step();
    assert_finite("vae loss", &last.total);
    assert_moved("vae", &initial, &model);
}

fn bench_gpt(
    bench: &mut Bench,
    target: &Target,
    spec: &GptSpec,
    batch: usize,
    precision: Precision,
) {
    let model = build_gpt(spec, SEED, target.device).expect("GPT");
    let mut optimizers =
        GptOptimizers::new(&model, 1e-3, gpt::DEFAULT_WEIGHT_DECAY, gpt::DEFAULT_BETA2)
            .expect("AdamW");
    keep_forward_copies(
        &mut [&mut optimizers.decay, &mut optimizers.no_decay],
        precision,
    );
    let (x, y) = random_windows(batch, spec.block_size, target);
    let initial = snapshot(&model);

    let mut amp = MixedPrecision::new(precision);
    let mut step = || {
        gpt::train_step(
            &model,
            &mut optimizers,
            &x,
            &y,
            gpt::DEFAULT_GRAD_CLIP,
            &mut amp,
        )
        .expect("GPT step")
    };
    for _ in 0..warm_up_steps() {
        step();
    }
    let case = Case::new(
        case_name("gpt", precision),
        format!(
            "{}L/{}H/{} embd, block {}, batch {batch}, vocab {VOCAB}, AdamW, clip {}",
            spec.n_layer,
            spec.n_head,
            spec.n_embd,
            spec.block_size,
            gpt::DEFAULT_GRAD_CLIP
        ),
        Bound::Compute,
    )
    .samples(batch as u64);
    if bench.time(target, &case, || drop(step())).is_none() {
        return;
    }

    let title = format!(
        "GPT {}L/{} {precision} step breakdown ({})",
        spec.n_layer,
        spec.n_embd,
        target.label()
    );
    let what = format!(
        "One GPT step ({}L/{}H/{} embd, block {}, batch {batch}, AdamW, clip)",
        spec.n_layer, spec.n_head, spec.n_embd, spec.block_size
    );
    let breakdown = profile_steps(target, &what, &mut step);
    println!("\n## {title}\n\n{breakdown}");
    bench.section(&title, breakdown);

    let last = step();
    assert_finite("gpt loss", &last.loss);
    let norm = last.grad_norm.expect("clipping on");
    assert!(norm.is_finite(), "gpt gradient norm is {norm}");
    assert_moved("gpt", &initial, &model);
}

/// A batch of next-character windows over random text: ids x and targets y
/// (x shifted by one), u32 [batch, block] on the target device.
fn random_windows(batch: usize, block: usize, target: &Target) -> (Tensor, Tensor) {
    let mut rng = Rng::seed(4);
    let text: Vec<u32> = (0..batch * (block + 1))
        .map(|_| (rng.next_u64() % VOCAB as u64) as u32)
        .collect();
    let windows = |offset: usize| {
        let ids: Vec<u32> = text
            .chunks(block + 1)
            .flat_map(|w| w[offset..offset + block].to_vec())
            .collect();
        Tensor::from_indices(ids, [batch, block])
            .and_then(|t| t.to_device(target.device))
            .expect("token ids")
    };
    (windows(0), windows(1))
}

/// Runs `step` a few times with the profiler on and renders the time per
/// step of each op, as a share of the measured wall time of the steps.
fn profile_steps<R>(target: &Target, what: &str, step: &mut impl FnMut() -> R) -> String {
    let steps = profiled_steps();
    profile::take();
    target.sync();
    let started = Instant::now();
    {
        let _profiling = profile::profiling();
        for _ in 0..steps {
            drop(step());
        }
        target.sync();
    }
    let wall = started.elapsed().as_secs_f64();
    let per_step = profile::per_step(profile::take(), steps);
    let mut text = format!(
        "{what} on {}: calls and ms per step, \
         averaged over {steps} profiled steps after warm-up. Each op is timed once at its \
         outermost call (nested ops are inside it); \"backward\" rows are the op's gradient rule.",
        target.describe()
    );
    if target.is_cuda() {
        text.push_str(
            " On CUDA the profiler synchronises the device around every op, so launch \
             latency is paid per op and small kernels' shares come out slightly inflated.",
        );
    }
    text.push_str("\n\n");
    text.push_str(&profile::markdown_table(&per_step, wall / steps as f64));
    if !target.is_cuda() {
        let peak = step_heap_peak(step);
        println!("{what}: step host memory {:.1} MiB", mib(peak));
        text.push_str(&format!(
            "\nHost memory of one step (activations, gradients and temporaries above \
             the model and optimizer state): {:.1} MiB.\n",
            mib(peak)
        ));
    }
    text
}

/// The precision's forward copies, as `kiln train` keeps them.
fn keep_forward_copies(optimizers: &mut [&mut dyn Optimizer], precision: Precision) {
    for optimizer in optimizers {
        optimizer
            .keep_forward_copies(precision.forward_copies())
            .expect("forward copies");
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Every parameter's values, to check after timing that training moved them.
fn snapshot(module: &dyn Module) -> Vec<Vec<f32>> {
    module
        .parameters()
        .iter()
        .map(|p| p.to_vec::<f32>().expect("f32 parameter"))
        .collect()
}

fn assert_moved(what: &str, initial: &[Vec<f32>], module: &dyn Module) {
    let named = module.named_parameters();
    assert_eq!(named.len(), initial.len(), "{what}: parameter count");
    for ((name, param), before) in named.iter().zip(initial) {
        let after = param.to_vec::<f32>().expect("f32 parameter");
        assert!(
            after.iter().all(|v| v.is_finite()),
            "{what}: {name} has a non-finite value after training"
        );
        assert_ne!(&after, before, "{what}: {name} did not change in training");
    }
}

fn assert_finite(what: &str, loss: &Tensor) {
    let value = loss.item().expect("a scalar loss");
    assert!(value.is_finite(), "{what} is {value}");
}
