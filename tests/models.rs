//! The DCGAN, VAE and GPT models: PyTorch state-dict names and parameter
//! counts, output shapes, configuration errors, and short training runs that
//! prove each model can learn (GAN losses stay finite, the VAE's loss falls,
//! the GPT memorises a paragraph).

use kiln::models::dcgan::{self, DcganConfig, Discriminator, Generator};
use kiln::models::gpt::{Gpt, GptConfig, GptInit};
use kiln::models::vae::{Vae, VaeConfig};
use kiln::nn::{Init, KvCache, Module};
use kiln::optim::{Adam, AdamConfig, AdamW, Optimizer};
use kiln::{DType, Device, MixedPrecision, Precision, Reduction, Rng, Tensor};

fn names(pairs: &[(String, Tensor)]) -> Vec<&str> {
    pairs.iter().map(|(n, _)| n.as_str()).collect()
}

fn mean_and_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

fn param<'a>(pairs: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &pairs
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no parameter named {name}"))
        .1
}

// ----- DCGAN -----------------------------------------------------------------

#[test]
fn dcgan_uses_the_pytorch_tutorial_names_and_default_parameter_counts() {
    let mut rng = Rng::seed(0);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let cfg = DcganConfig::default();
    let g = Generator::new(&cfg, &mut init).unwrap();
    let d = Discriminator::new(&cfg, &mut init).unwrap();

    assert_eq!(
        names(&g.named_parameters()),
        [
            "main.0.weight",
            "main.1.weight",
            "main.1.bias",
            "main.3.weight",
            "main.4.weight",
            "main.4.bias",
            "main.6.weight",
            "main.7.weight",
            "main.7.bias",
            "main.9.weight",
        ]
    );
    let g_buffers = g.named_buffers();
    assert_eq!(g_buffers[0].0, "main.1.running_mean");
    assert_eq!(g_buffers[2].0, "main.1.num_batches_tracked");
    assert_eq!(
        names(&d.named_parameters()),
        [
            "main.0.weight",
            "main.2.weight",
            "main.3.weight",
            "main.3.bias",
            "main.5.weight",
            "main.6.weight",
            "main.6.bias",
            "main.8.weight",
        ]
    );
    // ConvTranspose weights are [in, out, 4, 4], conv weights [out, in, 4, 4].
    let gp = g.named_parameters();
    assert_eq!(param(&gp, "main.0.weight").dims(), [100, 256, 4, 4]);
    assert_eq!(param(&gp, "main.9.weight").dims(), [64, 1, 4, 4]);
    assert_eq!(
        param(&d.named_parameters(), "main.8.weight").dims(),
        [1, 256, 4, 4]
    );

    // G: 100·256·16 + 2·256 + 256·128·16 + 2·128 + 128·64·16 + 2·64 + 64·1·16
    assert_eq!(g.num_parameters(), 1_066_880);
    // D: 1·64·16 + 64·128·16 + 2·128 + 128·256·16 + 2·256 + 256·1·16
    assert_eq!(d.num_parameters(), 661_248);
}

#[test]
fn dcgan_initialisation_draws_conv_weights_from_n0_002_and_bn_scales_from_n1_002() {
    let mut rng = Rng::seed(1);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let g = Generator::new(&DcganConfig::default(), &mut init).unwrap();
    let gp = g.named_parameters();
    let (mean, std) = mean_and_std(&param(&gp, "main.3.weight").to_f64_vec());
    assert!(
        mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3,
        "conv: mean {mean}, std {std}"
    );
    let (mean, std) = mean_and_std(&param(&gp, "main.1.weight").to_f64_vec());
    assert!(
        (mean - 1.0).abs() < 5e-3 && (std - 0.02).abs() < 5e-3,
        "bn: mean {mean}, std {std}"
    );
    assert!(
        param(&gp, "main.1.bias")
            .to_f64_vec()
            .iter()
            .all(|&b| b == 0.0)
    );
}

#[test]
fn dcgan_generator_makes_32x32_images_in_tanh_range_and_discriminator_one_logit_each() {
    let mut rng = Rng::seed(2);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let cfg = DcganConfig {
        nz: 8,
        ngf: 4,
        ndf: 4,
        channels: 3,
        image_size: 32,
    };
    let g = Generator::new(&cfg, &mut init).unwrap();
    let d = Discriminator::new(&cfg, &mut init).unwrap();
    let z = Tensor::randn([5, 8, 1, 1], DType::F32, Device::Cpu, &mut rng).unwrap();
    let images = g.forward(&z).unwrap();
    assert_eq!(images.dims(), [5, 3, 32, 32]);
    assert!(images.to_f64_vec().iter().all(|v| (-1.0..=1.0).contains(v)));
    // A flat [N, nz] latent is accepted too.
    let flat = g.forward(&z.reshape([5, 8]).unwrap()).unwrap();
    assert_eq!(flat.dims(), [5, 3, 32, 32]);
    assert_eq!(d.forward(&images).unwrap().dims(), [5]);
}

#[test]
fn dcgan_at_64x64_rgb_adds_one_stage_and_a_training_step_runs() {
    let mut rng = Rng::seed(12);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let cfg = DcganConfig {
        nz: 6,
        ngf: 2,
        ndf: 2,
        channels: 3,
        image_size: 64,
    };
    let g = Generator::new(&cfg, &mut init).unwrap();
    let d = Discriminator::new(&cfg, &mut init).unwrap();
    // The paper's 64×64 stacks: 4 transposed convolutions before the output
    // layer, from 8·ngf feature maps; the discriminator mirrors them.
    let shapes = |m: &dyn Module| -> Vec<(String, Vec<usize>)> {
        m.named_parameters()
            .into_iter()
            .filter(|(name, _)| name.ends_with(".weight"))
            .map(|(name, t)| (name, t.dims().to_vec()))
            .filter(|(_, dims)| dims.len() == 4)
            .collect()
    };
    let expect = |list: &[(&str, [usize; 4])]| -> Vec<(String, Vec<usize>)> {
        list.iter()
            .map(|(n, d)| (n.to_string(), d.to_vec()))
            .collect()
    };
    assert_eq!(
        shapes(&g),
        expect(&[
            ("main.0.weight", [6, 16, 4, 4]),
            ("main.3.weight", [16, 8, 4, 4]),
            ("main.6.weight", [8, 4, 4, 4]),
            ("main.9.weight", [4, 2, 4, 4]),
            ("main.12.weight", [2, 3, 4, 4]),
        ])
    );
    assert_eq!(
        shapes(&d),
        expect(&[
            ("main.0.weight", [2, 3, 4, 4]),
            ("main.2.weight", [4, 2, 4, 4]),
            ("main.5.weight", [8, 4, 4, 4]),
            ("main.8.weight", [16, 8, 4, 4]),
            ("main.11.weight", [1, 16, 4, 4]),
        ])
    );

    let mut data_rng = Rng::seed(13);
    let real = Tensor::rand(
        -1.0,
        1.0,
        [4, 3, 64, 64],
        DType::F32,
        Device::Cpu,
        &mut data_rng,
    )
    .unwrap();
    let z = Tensor::randn([4, 6, 1, 1], DType::F32, Device::Cpu, &mut data_rng).unwrap();
    assert_eq!(g.forward(&z).unwrap().dims(), [4, 3, 64, 64]);
    let mut optim_g = dcgan::optimizer(&g, 2e-4).unwrap();
    let mut optim_d = dcgan::optimizer(&d, 2e-4).unwrap();
    let before = g.state_dict()[0].1.to_f64_vec();
    let mut amp = MixedPrecision::new(Precision::F32);
    let step = dcgan::train_step(&g, &d, &mut optim_g, &mut optim_d, &real, &z, &mut amp).unwrap();
    assert_eq!(step.logits_real.dims(), [4]);
    assert_eq!(step.logits_fake.dims(), [4]);
    assert!(step.loss_d.item().unwrap().is_finite() && step.loss_g.item().unwrap().is_finite());
    assert_ne!(
        g.state_dict()[0].1.to_f64_vec(),
        before,
        "G was not updated"
    );

    // 32×32 images are not 64×64 ones, and the side must be a power of two.
    let small = Tensor::zeros([2, 3, 32, 32], DType::F32, Device::Cpu).unwrap();
    let err = d.forward(&small).unwrap_err().to_string();
    assert!(err.contains("[N, 3, 64, 64]"), "{err}");
    let odd = DcganConfig {
        image_size: 48,
        ..cfg
    };
    let err = Generator::new(&odd, &mut init).err().unwrap().to_string();
    assert!(err.contains("power of two") && err.contains("48"), "{err}");
}

#[test]
fn dcgan_rejects_wrong_input_shapes_and_zero_sizes() {
    let mut rng = Rng::seed(3);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let cfg = DcganConfig {
        nz: 8,
        ngf: 4,
        ndf: 4,
        channels: 1,
        image_size: 32,
    };
    let g = Generator::new(&cfg, &mut init).unwrap();
    let d = Discriminator::new(&cfg, &mut init).unwrap();
    let wrong_z = Tensor::zeros([2, 7, 1, 1], DType::F32, Device::Cpu).unwrap();
    let err = g.forward(&wrong_z).unwrap_err().to_string();
    assert!(
        err.contains("Generator") && err.contains("[2, 7, 1, 1]"),
        "{err}"
    );
    let wrong_images = Tensor::zeros([2, 1, 28, 28], DType::F32, Device::Cpu).unwrap();
    let err = d.forward(&wrong_images).unwrap_err().to_string();
    assert!(
        err.contains("Discriminator") && err.contains("[2, 1, 28, 28]"),
        "{err}"
    );

    let zero = DcganConfig {
        ngf: 0,
        ..cfg.clone()
    };
    let err = Generator::new(&zero, &mut init).err().unwrap().to_string();
    assert!(err.contains("ngf"), "{err}");
    let zero = DcganConfig { channels: 0, ..cfg };
    let err = Discriminator::new(&zero, &mut init)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("channels"), "{err}");
}

#[test]
fn dcgan_adversarial_training_keeps_losses_finite_and_samples_varied() {
    let mut rng = Rng::seed(4);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let cfg = DcganConfig {
        nz: 16,
        ngf: 16,
        ndf: 16,
        channels: 1,
        image_size: 32,
    };
    let g = Generator::new(&cfg, &mut init).unwrap();
    let d = Discriminator::new(&cfg, &mut init).unwrap();
    let adam = AdamConfig {
        lr: 2e-4,
        betas: (0.5, 0.999),
        ..AdamConfig::adam()
    };
    let mut opt_g = Adam::new(g.named_parameters(), adam).unwrap();
    let mut opt_d = Adam::new(d.named_parameters(), adam).unwrap();
    let batch = 16;
    let ones = Tensor::ones([batch], DType::F32, Device::Cpu).unwrap();
    let zeros = Tensor::zeros([batch], DType::F32, Device::Cpu).unwrap();
    // "Real" images: a fixed pool of random pictures in [−1, 1].
    let real = Tensor::rand(
        -1.0,
        1.0,
        [batch, 1, 32, 32],
        DType::F32,
        Device::Cpu,
        &mut rng,
    )
    .unwrap();

    for step in 0..50 {
        let z = Tensor::randn([batch, 16, 1, 1], DType::F32, Device::Cpu, &mut rng).unwrap();
        // Discriminator: real → 1, fake → 0 (fakes detached: G is not updated here).
        let fake = g.forward(&z).unwrap();
        let loss_d = d
            .forward(&real)
            .unwrap()
            .bce_with_logits(&ones, Reduction::Mean)
            .unwrap()
            .add(
                &d.forward(&fake.detach())
                    .unwrap()
                    .bce_with_logits(&zeros, Reduction::Mean)
                    .unwrap(),
            )
            .unwrap();
        opt_d.step(&loss_d.backward().unwrap()).unwrap();
        // Generator: make D call the fakes real.
        let loss_g = d
            .forward(&fake)
            .unwrap()
            .bce_with_logits(&ones, Reduction::Mean)
            .unwrap();
        opt_g.step(&loss_g.backward().unwrap()).unwrap();

        let (ld, lg) = (loss_d.item().unwrap(), loss_g.item().unwrap());
        assert!(
            ld.is_finite() && lg.is_finite(),
            "step {step}: D {ld}, G {lg}"
        );
    }

    g.eval();
    let z = Tensor::randn([8, 16, 1, 1], DType::F32, Device::Cpu, &mut rng).unwrap();
    let samples = g.forward(&z).unwrap().to_f64_vec();
    assert!(samples.iter().all(|v| v.is_finite()));
    let (_, pixel_std) = mean_and_std(&samples);
    assert!(pixel_std > 1e-2, "samples are constant: std {pixel_std}");
    let (first, second) = samples.split_at(32 * 32);
    let differs = first
        .iter()
        .zip(&second[..32 * 32])
        .any(|(a, b)| (a - b).abs() > 1e-3);
    assert!(differs, "two latents gave the same image");
}

// ----- VAE -------------------------------------------------------------------

#[test]
fn vae_uses_the_pytorch_example_names_and_parameter_count() {
    let mut rng = Rng::seed(5);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let vae = Vae::new(&VaeConfig::default(), &mut init).unwrap();
    let params = vae.named_parameters();
    assert_eq!(
        names(&params),
        [
            "fc1.weight",
            "fc1.bias",
            "fc21.weight",
            "fc21.bias",
            "fc22.weight",
            "fc22.bias",
            "fc3.weight",
            "fc3.bias",
            "fc4.weight",
            "fc4.bias",
        ]
    );
    assert_eq!(param(&params, "fc1.weight").dims(), [400, 784]);
    assert_eq!(param(&params, "fc4.weight").dims(), [784, 400]);
    assert_eq!(
        vae.num_parameters(),
        784 * 400 + 400 + 2 * (400 * 20 + 20) + 20 * 400 + 400 + 400 * 784 + 784
    );
}

#[test]
fn vae_shapes_and_loss_is_reconstruction_plus_nonnegative_kl() {
    let mut rng = Rng::seed(6);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let cfg = VaeConfig {
        input: 12,
        hidden: 8,
        latent: 3,
    };
    let vae = Vae::new(&cfg, &mut init).unwrap();
    let mut data_rng = Rng::seed(60);
    let x = Tensor::rand(0.0, 1.0, [4, 12], DType::F32, Device::Cpu, &mut data_rng).unwrap();
    let (mu, logvar) = vae.encode(&x).unwrap();
    assert_eq!(
        (mu.dims(), logvar.dims()),
        ([4, 3].as_slice(), [4, 3].as_slice())
    );
    assert_eq!(vae.decode(&mu).unwrap().dims(), [4, 12]);
    assert_eq!(vae.forward(&x).unwrap().dims(), [4, 12]);

    let loss = vae.loss(&x, &mut data_rng).unwrap();
    let (total, rec, kl) = (
        loss.total.item().unwrap(),
        loss.reconstruction.item().unwrap(),
        loss.kl.item().unwrap(),
    );
    assert_eq!(loss.total.rank(), 0);
    assert!((total - (rec + kl)).abs() < 1e-4, "{total} != {rec} + {kl}");
    assert!(kl >= 0.0, "KL {kl}");
    // Per-image reconstruction is a sum over 12 pixels: near 12·ln 2 for logits near 0.
    assert!(rec > 4.0 && rec < 20.0, "reconstruction {rec}");

    let err = vae.encode(&Tensor::zeros([4, 11], DType::F32, Device::Cpu).unwrap());
    assert!(err.unwrap_err().to_string().contains("[4, 11]"));
    let err = vae.decode(&Tensor::zeros([4, 2], DType::F32, Device::Cpu).unwrap());
    assert!(err.unwrap_err().to_string().contains("[4, 2]"));
    let zero = VaeConfig { latent: 0, ..cfg };
    let err = Vae::new(&zero, &mut init).err().unwrap().to_string();
    assert!(err.contains("latent"), "{err}");
}

/// 28×28 images of one soft-edged disc each, at a random centre with a
/// random radius: pixel = sigmoid(3·(r − distance)), so nearly every pixel is
/// close to 0 or 1 (binary-ish, like MNIST strokes) and the set has just
/// three degrees of freedom, which a 20-d latent code can capture.
fn blob_images(count: usize, rng: &mut Rng) -> Vec<f32> {
    let params = Tensor::rand(0.0, 1.0, [count, 3], DType::F64, Device::Cpu, rng)
        .unwrap()
        .to_f64_vec();
    let mut pixels = Vec::with_capacity(count * 784);
    for p in params.chunks(3) {
        let (cy, cx, radius) = (7.0 + 14.0 * p[0], 7.0 + 14.0 * p[1], 3.0 + 4.0 * p[2]);
        for y in 0..28 {
            for x in 0..28 {
                let distance = ((y as f64 - cy).powi(2) + (x as f64 - cx).powi(2)).sqrt();
                pixels.push((1.0 / (1.0 + (-3.0 * (radius - distance)).exp())) as f32);
            }
        }
    }
    pixels
}

#[test]
fn vae_loss_falls_by_a_third_in_200_steps_on_synthetic_blobs() {
    let mut rng = Rng::seed(7);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let vae = Vae::new(&VaeConfig::default(), &mut init).unwrap();
    let mut opt = Adam::new(vae.named_parameters(), AdamConfig::adam()).unwrap();
    let images = 2000;
    let pixels = blob_images(images, &mut rng);
    let batch = 50;
    let mut losses = Vec::new();
    for step in 0..200 {
        let start = (step * batch) % images;
        let x = Tensor::from_vec(
            pixels[start * 784..(start + batch) * 784].to_vec(),
            [batch, 784],
        )
        .unwrap();
        let loss = vae.loss(&x, &mut rng).unwrap();
        opt.step(&loss.total.backward().unwrap()).unwrap();
        losses.push(loss.total.item().unwrap());
    }
    let first = losses[..10].iter().sum::<f64>() / 10.0;
    let last = losses[190..].iter().sum::<f64>() / 10.0;
    assert!(last.is_finite());
    assert!(
        last <= 0.7 * first,
        "loss fell only from {first:.1} to {last:.1}"
    );
}

// ----- GPT -------------------------------------------------------------------

fn small_gpt_config(vocab_size: usize) -> GptConfig {
    GptConfig {
        vocab_size,
        n_layer: 2,
        n_head: 2,
        n_embd: 64,
        block_size: 32,
        dropout: 0.0,
    }
}

fn small_gpt(cfg: &GptConfig, seed: u64) -> Gpt {
    let mut rng = Rng::seed(seed);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    Gpt::new(cfg, seed, &mut init).unwrap()
}

#[test]
fn gpt_uses_gpt2_names_and_parameter_count() {
    let (v, e, block, layers) = (30, 64, 32, 2);
    let gpt = small_gpt(&small_gpt_config(v), 8);
    let params = gpt.named_parameters();
    let all = names(&params);
    assert_eq!(&all[..2], ["wte.weight", "wpe.weight"]);
    assert_eq!(
        &all[2..14],
        [
            "h.0.ln_1.weight",
            "h.0.ln_1.bias",
            "h.0.attn.c_attn.weight",
            "h.0.attn.c_attn.bias",
            "h.0.attn.c_proj.weight",
            "h.0.attn.c_proj.bias",
            "h.0.ln_2.weight",
            "h.0.ln_2.bias",
            "h.0.mlp.c_fc.weight",
            "h.0.mlp.c_fc.bias",
            "h.0.mlp.c_proj.weight",
            "h.0.mlp.c_proj.bias",
        ]
    );
    assert_eq!(
        &all[all.len() - 3..],
        ["ln_f.weight", "ln_f.bias", "lm_head.weight"]
    );
    assert_eq!(param(&params, "h.1.attn.c_attn.weight").dims(), [3 * e, e]);
    assert_eq!(param(&params, "h.1.mlp.c_fc.weight").dims(), [4 * e, e]);
    // wte + wpe + per block (2 LayerNorms, qkv, proj, fc, proj) + ln_f + head
    let per_block =
        4 * e + (3 * e * e + 3 * e) + (e * e + e) + (4 * e * e + 4 * e) + (4 * e * e + e);
    assert_eq!(
        gpt.num_parameters(),
        v * e + block * e + layers * per_block + 2 * e + e * v
    );
    assert_eq!(gpt.num_parameters(), 105_984);
}

#[test]
fn gpt2_initialisation_scales_residual_projections_by_depth() {
    let cfg = GptConfig {
        n_layer: 8,
        ..small_gpt_config(30)
    };
    let mut rng = Rng::seed(9);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let gpt = Gpt::with_init(&cfg, GptInit::Gpt2, 9, &mut init).unwrap();
    let params = gpt.named_parameters();
    let (_, std) = mean_and_std(&param(&params, "h.0.mlp.c_fc.weight").to_f64_vec());
    assert!((std - 0.02).abs() < 1e-3, "c_fc std {std}");
    let (_, std) = mean_and_std(&param(&params, "h.0.mlp.c_proj.weight").to_f64_vec());
    assert!(
        (std - 0.005).abs() < 3e-4,
        "c_proj std {std} (expected 0.02/√16)"
    );
    assert!(
        param(&params, "h.0.attn.c_attn.bias")
            .to_f64_vec()
            .iter()
            .all(|&b| b == 0.0)
    );
}

#[test]
fn gpt_forward_gives_logits_per_position_and_rejects_bad_ids() {
    let gpt = small_gpt(&small_gpt_config(30), 10);
    let ids = Tensor::from_indices((0..3 * 7).map(|i| i % 30).collect(), [3, 7]).unwrap();
    assert_eq!(gpt.forward(&ids).unwrap().dims(), [3, 7, 30]);
    let too_long = Tensor::from_indices(vec![0; 33], [1, 33]).unwrap();
    let err = gpt.forward(&too_long).unwrap_err().to_string();
    assert!(
        err.contains("block_size = 32") && err.contains("[1, 33]"),
        "{err}"
    );
    let floats = Tensor::zeros([1, 4], DType::F32, Device::Cpu).unwrap();
    assert!(gpt.forward(&floats).is_err());
    let out_of_vocab = Tensor::from_indices(vec![30], [1, 1]).unwrap();
    assert!(gpt.forward(&out_of_vocab).is_err());
}

#[test]
fn gpt_rejects_bad_configs() {
    let mut rng = Rng::seed(11);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    let base = small_gpt_config(30);
    let cases = [
        (
            GptConfig {
                n_head: 3,
                ..base.clone()
            },
            "not divisible",
        ),
        (
            GptConfig {
                n_head: 0,
                ..base.clone()
            },
            "n_head",
        ),
        (
            GptConfig {
                vocab_size: 0,
                ..base.clone()
            },
            "vocab_size",
        ),
        (
            GptConfig {
                n_layer: 0,
                ..base.clone()
            },
            "n_layer",
        ),
        (
            GptConfig {
                block_size: 0,
                ..base.clone()
            },
            "block_size",
        ),
        (
            GptConfig {
                dropout: 1.0,
                ..base.clone()
            },
            "dropout",
        ),
    ];
    for (cfg, expected) in cases {
        let err = Gpt::new(&cfg, 0, &mut init).err().unwrap().to_string();
        assert!(err.contains(expected), "{cfg:?}: {err}");
    }
}

/// The default initialisation is PyTorch's: unit-normal embeddings, linear
/// layers uniform in ±1/√fan_in (biases too), LayerNorms 1 and 0.
#[test]
fn gpt_starts_from_pytorchs_initialisation_by_default() {
    let gpt = small_gpt(&small_gpt_config(30), 10);
    let params = gpt.named_parameters();
    let (mean, std) = mean_and_std(&param(&params, "wte.weight").to_f64_vec());
    assert!(
        mean.abs() < 0.05 && (std - 1.0).abs() < 0.05,
        "wte: {mean}, {std}"
    );
    for (name, fan_in) in [("h.0.mlp.c_fc", 64.0f64), ("h.1.mlp.c_proj", 256.0)] {
        let bound = 1.0 / fan_in.sqrt();
        for part in ["weight", "bias"] {
            let values = param(&params, &format!("{name}.{part}")).to_f64_vec();
            let largest = values.iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(
                largest <= bound && largest > 0.9 * bound,
                "{name}.{part}: {largest} vs {bound}"
            );
        }
    }
    assert!(
        param(&params, "ln_f.weight")
            .to_f64_vec()
            .iter()
            .all(|&w| w == 1.0)
    );
}

/// The token with the largest logit after `context`, computed independently of `generate`.
fn argmax_next(gpt: &Gpt, context: &[u32]) -> u32 {
    let t = context.len();
    let ids = Tensor::from_indices(context.to_vec(), [1, t]).unwrap();
    let logits = gpt.forward(&ids).unwrap().to_f64_vec();
    let last = &logits[(t - 1) * 30..];
    (0..30)
        .max_by(|&a, &b| last[a].total_cmp(&last[b]))
        .unwrap() as u32
}

#[test]
fn gpt_generate_returns_new_tokens_greedily_with_top_k_1_and_sharpens_with_low_temperature() {
    let gpt = small_gpt(&small_gpt_config(30), 12);
    let prompt = [1u32, 2, 3];
    let mut rng = Rng::seed(0);

    // More tokens than block_size: the context must be cropped.
    let sampled = gpt.generate(&prompt, 40, 1.0, None, &mut rng).unwrap();
    assert_eq!(sampled.len(), 40);
    assert!(sampled.iter().all(|&t| t < 30));

    // 100 tokens: past twice the block, where generation drops the text's
    // head and keeps only its tail.
    let greedy = gpt.generate(&prompt, 100, 1.0, Some(1), &mut rng).unwrap();
    let mut context = prompt.to_vec();
    for (i, &token) in greedy.iter().enumerate() {
        let start = context.len().saturating_sub(32);
        assert_eq!(token, argmax_next(&gpt, &context[start..]), "token {i}");
        context.push(token);
    }
    // A near-zero temperature turns sampling into argmax.
    let cold = gpt.generate(&prompt, 100, 1e-6, None, &mut rng).unwrap();
    assert_eq!(cold, greedy);
    // An untrained model at temperature 1 is close to uniform: far from greedy.
    let agree = sampled.iter().zip(&greedy).filter(|(a, b)| a == b).count();
    assert!(
        agree < 20,
        "{agree} of 40 sampled tokens equal the greedy ones"
    );

    // Same seed, same tokens.
    let a = gpt
        .generate(&prompt, 10, 0.8, Some(5), &mut Rng::seed(3))
        .unwrap();
    let b = gpt
        .generate(&prompt, 10, 0.8, Some(5), &mut Rng::seed(3))
        .unwrap();
    assert_eq!(a, b);

    assert!(gpt.generate(&prompt, 5, 0.0, None, &mut rng).is_err());
    assert!(gpt.generate(&prompt, 5, 1.0, Some(0), &mut rng).is_err());
    assert!(gpt.generate(&[], 5, 1.0, None, &mut rng).is_err());
    assert!(gpt.generate(&[30], 5, 1.0, None, &mut rng).is_err());
}

/// The KV cache: attention fed one position at a time, each query against
/// the cached keys and values, gives the outputs of the whole sequence at
/// once; and cached generation gives the uncached tokens, within the block
/// and while the window slides past it.
#[test]
fn kv_cached_attention_and_generation_match_recomputing_the_window() {
    let gpt = small_gpt(&small_gpt_config(30), 21);
    let attn = &gpt.h[0].attn;
    let x = Tensor::randn([1, 9, 64], DType::F32, Device::Cpu, &mut Rng::seed(4)).unwrap();
    let whole = attn.forward(&x).unwrap().to_f64_vec();
    for prefill in [1, 4] {
        let mut cache = KvCache::default();
        let mut outputs = attn
            .forward_cached(&x.narrow(1, 0, prefill).unwrap(), &mut cache)
            .unwrap()
            .to_f64_vec();
        for t in prefill..9 {
            let y = attn
                .forward_cached(&x.narrow(1, t, 1).unwrap(), &mut cache)
                .unwrap();
            outputs.extend(y.to_f64_vec());
        }
        assert_eq!(cache.len(), 9);
        for (i, (a, b)) in outputs.iter().zip(&whole).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "prefill {prefill}, [{i}]: {a} vs {b}"
            );
        }
        // A filled cache takes one position at a time.
        assert!(
            attn.forward_cached(&x.narrow(1, 0, 2).unwrap(), &mut cache)
                .is_err()
        );
    }
    // 200 tokens with a block of 32: 29 from the cache, then a sliding window.
    let prompt = [5u32, 6, 7];
    for top_k in [Some(1), Some(3)] {
        let generate = |kv_cache| {
            gpt.generate_with(&prompt, 200, 0.9, top_k, kv_cache, &mut Rng::seed(8))
                .unwrap()
        };
        assert_eq!(generate(true), generate(false), "top_k {top_k:?}");
    }
}

#[test]
fn gpt_generate_leaves_a_training_model_in_training_mode() {
    let cfg = GptConfig {
        dropout: 0.5,
        ..small_gpt_config(30)
    };
    let gpt = small_gpt(&cfg, 13);
    gpt.generate(&[1, 2], 3, 1.0, None, &mut Rng::seed(0))
        .unwrap();
    let ids = Tensor::from_indices(vec![1, 2, 3, 4], [1, 4]).unwrap();
    let (a, b) = (gpt.forward(&ids).unwrap(), gpt.forward(&ids).unwrap());
    assert_ne!(
        a.to_f64_vec(),
        b.to_f64_vec(),
        "dropout is off after generate"
    );
}

/// About 1 kB: one paragraph written for this test, repeated.
fn paragraph_text() -> String {
    let paragraph = "The quick brown fox jumps over the lazy dog while five wizards \
                     box jolly quail. Pack my box with five dozen liquor jugs, then \
                     sphinx of black quartz, judge my vow. ";
    paragraph.repeat(6)
}

#[test]
fn gpt_memorises_a_repeated_paragraph_to_loss_below_0_3() {
    let text = paragraph_text();
    let mut chars: Vec<char> = text.chars().collect();
    chars.sort_unstable();
    chars.dedup();
    let tokens: Vec<u32> = text
        .chars()
        .map(|c| chars.binary_search(&c).unwrap() as u32)
        .collect();
    let cfg = small_gpt_config(chars.len());
    let gpt = small_gpt(&cfg, 14);
    let mut opt = AdamW::new(
        gpt.named_parameters(),
        AdamConfig {
            lr: 3e-3,
            ..AdamConfig::adamw()
        },
    )
    .unwrap();

    let (batch, block) = (16, cfg.block_size);
    let windows = tokens.len() - block;
    let make_batch = |starts: &[usize]| {
        let x: Vec<u32> = starts
            .iter()
            .flat_map(|&s| tokens[s..s + block].to_vec())
            .collect();
        let y: Vec<u32> = starts
            .iter()
            .flat_map(|&s| tokens[s + 1..s + block + 1].to_vec())
            .collect();
        let n = starts.len();
        (
            Tensor::from_indices(x, [n, block]).unwrap(),
            Tensor::from_indices(y, [n, block]).unwrap(),
        )
    };
    let mut rng = Rng::seed(15);
    for _ in 0..300 {
        let starts: Vec<usize> = (0..batch)
            .map(|_| (rng.next_u64() % windows as u64) as usize)
            .collect();
        let (x, y) = make_batch(&starts);
        let loss = gpt.loss(&x, &y).unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
    }

    gpt.eval();
    let every_window: Vec<usize> = (0..windows).step_by(7).collect();
    let (x, y) = make_batch(&every_window);
    let loss = kiln::no_grad_scope(|| gpt.loss(&x, &y).unwrap().item().unwrap());
    assert!(loss < 0.3, "loss over the text {loss}");

    // Greedy decoding continues the paragraph.
    let prompt = &tokens[..block];
    let continuation = gpt.generate(prompt, 40, 1.0, Some(1), &mut rng).unwrap();
    let correct = continuation
        .iter()
        .zip(&tokens[block..block + 40])
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        correct >= 36,
        "only {correct} of 40 greedy characters follow the text"
    );
}

// ----- devices ---------------------------------------------------------------

fn assert_all_close(what: &str, expected: &Tensor, actual: &Tensor) {
    assert_eq!(expected.dims(), actual.dims(), "{what}: shapes");
    for (i, (e, a)) in expected
        .to_f64_vec()
        .iter()
        .zip(actual.to_f64_vec())
        .enumerate()
    {
        assert!(
            (e - a).abs() <= 1e-3 + 1e-3 * e.abs(),
            "{what}[{i}]: CPU {e}, CUDA {a}"
        );
    }
}

#[test]
fn models_built_on_cuda_keep_parameters_there_and_match_the_cpu() {
    if kiln::cuda::device_count() == 0 {
        eprintln!("skipped: no CUDA device (models_built_on_cuda_...)");
        return;
    }
    let cuda = Device::cuda(0).unwrap();
    let build = |device: Device| {
        let mut rng = Rng::seed(16);
        let mut init = Init::new(&mut rng, device, DType::F32);
        let dcgan = DcganConfig {
            nz: 8,
            ngf: 8,
            ndf: 8,
            channels: 1,
            image_size: 32,
        };
        let vae = VaeConfig {
            input: 784,
            hidden: 64,
            latent: 8,
        };
        (
            Generator::new(&dcgan, &mut init).unwrap(),
            Discriminator::new(&dcgan, &mut init).unwrap(),
            Vae::new(&vae, &mut init).unwrap(),
            Gpt::new(&small_gpt_config(30), 16, &mut init).unwrap(),
        )
    };
    let (g_cpu, d_cpu, vae_cpu, gpt_cpu) = build(Device::Cpu);
    let (g, d, vae, gpt) = build(cuda);
    for (name, tensor) in g
        .state_dict()
        .into_iter()
        .chain(vae.state_dict())
        .chain(gpt.state_dict())
    {
        // BatchNorm's step counter is a host-side value by design.
        if !name.ends_with("num_batches_tracked") {
            assert_eq!(tensor.device(), cuda, "{name}");
        }
    }

    // Inputs made on the CPU are moved to the model's device.
    let z = Tensor::randn([4, 8, 1, 1], DType::F32, Device::Cpu, &mut Rng::seed(1)).unwrap();
    let images = g.forward(&z).unwrap();
    assert_eq!(images.device(), cuda);
    assert_all_close("G(z)", &g_cpu.forward(&z).unwrap(), &images);
    let images_cpu = images.to_device(Device::Cpu).unwrap();
    assert_all_close(
        "D(x)",
        &d_cpu.forward(&images_cpu).unwrap(),
        &d.forward(&images_cpu).unwrap(),
    );

    let x = Tensor::from_vec(blob_images(4, &mut Rng::seed(2)), [4, 784]).unwrap();
    let loss_cpu = vae_cpu.loss(&x, &mut Rng::seed(3)).unwrap();
    let loss = vae.loss(&x, &mut Rng::seed(3)).unwrap();
    assert_all_close("VAE loss", &loss_cpu.total, &loss.total);
    assert!(
        loss.total
            .backward()
            .unwrap()
            .get(&vae.fc1.weight)
            .is_some()
    );

    let ids = Tensor::from_indices((0..2 * 9).map(|i| (i * 7) % 30).collect(), [2, 9]).unwrap();
    let targets = Tensor::from_indices((0..2 * 9).map(|i| (i * 5) % 30).collect(), [2, 9]).unwrap();
    assert_all_close(
        "GPT loss",
        &gpt_cpu.loss(&ids, &targets).unwrap(),
        &gpt.loss(&ids, &targets).unwrap(),
    );
    assert_eq!(
        gpt_cpu
            .generate(&[1, 2], 8, 1.0, Some(1), &mut Rng::seed(4))
            .unwrap(),
        gpt.generate(&[1, 2], 8, 1.0, Some(1), &mut Rng::seed(4))
            .unwrap()
    );
}

/// Elements of every trainable parameter of `module`.
fn parameters_of(module: &dyn Module) -> u128 {
    module.num_parameters() as u128
}

#[test]
fn parameter_counts_computed_from_the_sizes_match_the_built_models() {
    let mut rng = Rng::seed(21);
    let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
    for (n_layer, n_embd, block_size) in [(1, 8, 4), (3, 24, 16)] {
        let cfg = GptConfig {
            vocab_size: 11,
            n_layer,
            n_head: 2,
            n_embd,
            block_size,
            dropout: 0.1,
        };
        let gpt = Gpt::new(&cfg, 0, &mut init).unwrap();
        assert_eq!(cfg.parameter_count(), parameters_of(&gpt), "{cfg:?}");
    }
    for (image_size, channels) in [(8, 1), (32, 1), (64, 3)] {
        let cfg = DcganConfig {
            nz: 5,
            ngf: 3,
            ndf: 2,
            channels,
            image_size,
        };
        let (g, d) = (
            Generator::new(&cfg, &mut init).unwrap(),
            Discriminator::new(&cfg, &mut init).unwrap(),
        );
        assert_eq!(
            cfg.parameter_counts(),
            (parameters_of(&g), parameters_of(&d)),
            "{cfg:?}"
        );
    }
    let vae = VaeConfig {
        input: 12,
        hidden: 7,
        latent: 3,
    };
    assert_eq!(
        vae.parameter_count(),
        parameters_of(&Vae::new(&vae, &mut init).unwrap())
    );
    let classifier = kiln::models::classifier::ClassifierConfig {
        width: 3,
        features: 5,
        classes: 4,
    };
    let built = kiln::models::classifier::Classifier::new(&classifier, &mut init).unwrap();
    assert_eq!(classifier.parameter_count(), parameters_of(&built));
    // Sizes far beyond any memory are counted without overflow.
    let huge = GptConfig {
        vocab_size: 84,
        n_layer: 1_000_000,
        n_head: 1,
        n_embd: 1 << 20,
        block_size: 64,
        dropout: 0.0,
    };
    assert!(huge.parameter_count() > 1u128 << 50);
    let absurd = DcganConfig {
        nz: usize::MAX,
        ngf: usize::MAX,
        ndf: usize::MAX,
        channels: usize::MAX,
        image_size: 1 << 62,
    };
    assert_eq!(absurd.parameter_counts(), (u128::MAX, u128::MAX));
    let absurd = GptConfig {
        n_layer: usize::MAX,
        n_embd: usize::MAX,
        ..huge
    };
    assert_eq!(absurd.parameter_count(), u128::MAX);
}
