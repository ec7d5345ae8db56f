//! Training steps reuse memory: after warm-up, a GPT or DCGAN step on the
//! CPU maps (almost) no fresh pages. Freshly mapped pages cost a page fault
//! each, and at these sizes the faults were a third of the step's time.
//! One test in its own binary, because page faults are counted per process,
//! and without the test harness (`harness = false`), so that it runs on the
//! main thread as `kiln train` does: glibc gives every other thread its own
//! malloc arena, whose heaps are at most 64 MiB and are unmapped as soon as
//! they empty, so a thread's step that peaks above that maps fresh pages
//! whatever the main arena's thresholds say.

use kiln::cli::specs::{GanSpec, GptSpec, build_gan, build_gpt};
use kiln::models::gpt::GptOptimizers;
use kiln::models::{dcgan, gpt};
use kiln::{DType, Device, MixedPrecision, Rng, Tensor};

/// Minor page faults of this process so far.
fn page_faults() -> i64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_minflt
}

/// Page faults per step of `step`, over `steps` steps after `warm_up`.
fn faults_per_step(warm_up: usize, steps: usize, mut step: impl FnMut()) -> f64 {
    for _ in 0..warm_up {
        step();
    }
    let before = page_faults();
    for _ in 0..steps {
        step();
    }
    (page_faults() - before) as f64 / steps as f64
}

fn main() {
    let spec = GptSpec {
        vocab_size: 84,
        n_layer: 4,
        n_head: 4,
        n_embd: 128,
        block_size: 64,
        dropout: 0.0,
    };
    let model = build_gpt(&spec, 0, Device::Cpu).unwrap();
    let mut optimizers =
        GptOptimizers::new(&model, 1e-3, gpt::DEFAULT_WEIGHT_DECAY, gpt::DEFAULT_BETA2).unwrap();
    let mut rng = Rng::seed(4);
    let ids: Vec<u32> = (0..32 * 65).map(|_| (rng.next_u64() % 84) as u32).collect();
    let window = |offset: usize| {
        let picked: Vec<u32> = ids
            .chunks(65)
            .flat_map(|w| w[offset..offset + 64].to_vec())
            .collect();
        Tensor::from_indices(picked, [32, 64]).unwrap()
    };
    let (x, y) = (window(0), window(1));
    let mut amp = MixedPrecision::f32();
    let gpt_faults = faults_per_step(3, 5, || {
        gpt::train_step(
            &model,
            &mut optimizers,
            &x,
            &y,
            gpt::DEFAULT_GRAD_CLIP,
            &mut amp,
        )
        .unwrap();
    });

    let gan = GanSpec::default();
    let (generator, discriminator) = build_gan(&gan, 0, Device::Cpu).unwrap();
    let mut optim_g = dcgan::optimizer(&generator, 2e-4).unwrap();
    let mut optim_d = dcgan::optimizer(&discriminator, 2e-4).unwrap();
    let size = generator.image_size();
    let real = Tensor::rand(
        -1.0,
        1.0,
        [64, 1, size, size],
        DType::F32,
        Device::Cpu,
        &mut rng,
    )
    .unwrap();
    let z = Tensor::randn([64, 100, 1, 1], DType::F32, Device::Cpu, &mut rng).unwrap();
    let gan_faults = faults_per_step(3, 3, || {
        dcgan::train_step(
            &generator,
            &discriminator,
            &mut optim_g,
            &mut optim_d,
            &real,
            &z,
            &mut amp,
        )
        .unwrap();
    });
    println!("page faults per step: GPT {gpt_faults:.0}, DCGAN {gan_faults:.0}");
    assert!(gpt_faults <= 1000.0, "GPT: {gpt_faults} page faults a step");
    assert!(
        gan_faults <= 1000.0,
        "DCGAN: {gan_faults} page faults a step"
    );
}
