//! One training step of each model's layer stack on CUDA against the same
//! step on the CPU: equal initial weights (same seed), equal batch; the loss
//! and every parameter after the optimizer step must match.

use kiln::nn::{
    BatchNorm2d, CausalSelfAttention, Conv2d, ConvTranspose2d, Embedding, Flatten, Gelu, Init,
    LayerNorm, LeakyRelu, Linear, Module, Relu, Sequential, Tanh,
};
use kiln::optim::{Adam, AdamConfig, AdamW, Optimizer};
use kiln::{
    Conv2dParams, ConvTranspose2dParams, DType, Device, GeluApproximation, Reduction, Rng, Tensor,
};

use crate::common::{assert_close, cuda_or_skip, randn, uniform};

/// Loss and parameters after one optimizer step, for a model built on `device`.
fn train_step(
    device: Device,
    build: &dyn Fn(&mut Init) -> Sequential,
    inputs: &Tensor,
    loss: &dyn Fn(&Tensor) -> kiln::Result<Tensor>,
    adamw: bool,
) -> (f64, Vec<(String, Tensor)>) {
    let mut rng = Rng::seed(7);
    let mut init = Init::new(&mut rng, device, DType::F32);
    let model = build(&mut init);
    let x = inputs.to_device(device).unwrap();
    let value = loss(&model.forward(&x).unwrap()).unwrap();
    let grads = value.backward().unwrap();
    let params = model.named_parameters();
    if adamw {
        AdamW::new(params.clone(), AdamConfig::adamw())
            .unwrap()
            .step(&grads)
            .unwrap();
    } else {
        Adam::new(params.clone(), AdamConfig::adam())
            .unwrap()
            .step(&grads)
            .unwrap();
    }
    (value.item().unwrap(), model.state_dict())
}

fn compare(
    what: &str,
    build: &dyn Fn(&mut Init) -> Sequential,
    inputs: Tensor,
    loss: &dyn Fn(&Tensor) -> kiln::Result<Tensor>,
    adamw: bool,
) {
    let Some(dev) = cuda_or_skip(what) else {
        return;
    };
    let (cpu_loss, cpu_state) = train_step(Device::Cpu, build, &inputs, loss, adamw);
    let (cuda_loss, cuda_state) = train_step(dev, build, &inputs, loss, adamw);
    eprintln!("{what}: loss cpu {cpu_loss:.6} cuda {cuda_loss:.6}");
    assert!(
        (cpu_loss - cuda_loss).abs() <= 1e-4 * (1.0 + cpu_loss.abs()),
        "{what}: loss"
    );
    for ((name, c), (_, g)) in cpu_state.iter().zip(&cuda_state) {
        if name.ends_with("num_batches_tracked") {
            // A host-side counter by design (counting costs no device sync).
            assert_eq!(c.to_f64_vec(), g.to_f64_vec(), "{what} {name}");
            continue;
        }
        // One Adam step moves each weight by about lr; 1e-4 absolute keeps that visible.
        assert_close(
            &format!("{what} {name}"),
            &c.to_dtype(DType::F32).unwrap(),
            g,
            1e-4,
            1e-3,
        );
    }
}

#[test]
fn dcgan_discriminator_step_matches_cpu() {
    let s2 = Conv2dParams {
        stride: [2, 2],
        padding: [1, 1].into(),
        ..Conv2dParams::default()
    };
    let build = |init: &mut Init| {
        Sequential::new()
            .with(Conv2d::new(1, 8, [4, 4], s2, false, init).unwrap())
            .with(LeakyRelu(0.2))
            .with(Conv2d::new(8, 16, [4, 4], s2, false, init).unwrap())
            .with(BatchNorm2d::new(16, init).unwrap())
            .with(LeakyRelu(0.2))
            .with(Conv2d::new(16, 1, [8, 8], Conv2dParams::default(), false, init).unwrap())
            .with(Flatten)
    };
    let images = uniform(-1.0, 1.0, &[6, 1, 32, 32], 11);
    let labels = Tensor::ones([6, 1], DType::F32, Device::Cpu).unwrap();
    let loss = move |logits: &Tensor| {
        logits.bce_with_logits(&labels.to_device(logits.device())?, Reduction::Mean)
    };
    compare("dcgan D", &build, images, &loss, false);
}

#[test]
fn dcgan_generator_step_matches_cpu() {
    let s2 = ConvTranspose2dParams {
        stride: [2, 2],
        padding: [1, 1],
        output_padding: [0, 0],
        ..ConvTranspose2dParams::default()
    };
    let build = |init: &mut Init| {
        Sequential::new()
            .with(
                ConvTranspose2d::new(
                    10,
                    16,
                    [4, 4],
                    ConvTranspose2dParams::default(),
                    false,
                    init,
                )
                .unwrap(),
            )
            .with(BatchNorm2d::new(16, init).unwrap())
            .with(Relu)
            .with(ConvTranspose2d::new(16, 8, [4, 4], s2, false, init).unwrap())
            .with(BatchNorm2d::new(8, init).unwrap())
            .with(Relu)
            .with(ConvTranspose2d::new(8, 1, [4, 4], s2, false, init).unwrap())
            .with(Tanh)
    };
    let noise = randn(&[5, 10, 1, 1], 12);
    let loss = |images: &Tensor| images.mean_all();
    compare("dcgan G", &build, noise, &loss, false);
}

#[test]
fn vae_mlp_step_matches_cpu() {
    let build = |init: &mut Init| {
        Sequential::new()
            .with(Linear::new(784, 40, true, init).unwrap())
            .with(Relu)
            .with(Linear::new(40, 784, true, init).unwrap())
    };
    let pixels = uniform(0.0, 1.0, &[9, 784], 13);
    let targets = pixels.clone();
    let loss = move |logits: &Tensor| {
        logits.bce_with_logits(&targets.to_device(logits.device())?, Reduction::Sum)
    };
    compare("vae", &build, pixels, &loss, false);
}

/// A GPT block over embeddings: LN → attention → LN → GELU MLP → head.
#[test]
fn gpt_block_step_matches_cpu() {
    let (vocab, embd, heads, t) = (37, 32, 4, 17);
    let build = move |init: &mut Init| {
        Sequential::new()
            .with(Embedding::new(vocab, embd, init).unwrap())
            .with(LayerNorm::new(embd, init).unwrap())
            .with(CausalSelfAttention::new(embd, heads, 0.0, 0, init).unwrap())
            .with(LayerNorm::new(embd, init).unwrap())
            .with(Linear::new(embd, 4 * embd, true, init).unwrap())
            .with(Gelu(GeluApproximation::Tanh))
            .with(Linear::new(4 * embd, vocab, true, init).unwrap())
    };
    let ids: Vec<u32> = (0..3 * t as u32)
        .map(|i| (i * 7 + 3) % vocab as u32)
        .collect();
    let targets: Vec<u32> = ids.iter().map(|i| (i + 1) % vocab as u32).collect();
    let ids = Tensor::from_indices(ids, [3, t]).unwrap();
    let targets = Tensor::from_indices(targets, [3 * t]).unwrap();
    let loss = move |logits: &Tensor| {
        logits
            .reshape([3 * t, vocab])?
            .cross_entropy(&targets.to_device(logits.device())?, Reduction::Mean)
    };
    compare("gpt block", &build, ids, &loss, true);
}
