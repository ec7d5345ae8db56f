//! DCGAN (Radford, Metz & Chintala, "Unsupervised Representation Learning
//! with Deep Convolutional Generative Adversarial Networks", 2016), laid out
//! as the PyTorch DCGAN tutorial: each network is one `main` [`Sequential`],
//! so state-dict names read `main.0.weight`, `main.1.running_mean`, ...
//! Convolutions have no bias (BatchNorm's shift plays that role), weights
//! start from N(0, 0.02) and BatchNorm scales from N(1, 0.02), as the paper
//! prescribes.
//!
//! The image side sets the depth: each stride-2 stage doubles (generator)
//! or halves (discriminator) the side between 4×4 and the image, so 64×64
//! (the paper's and the tutorial's size) has four stages and 32×32, which
//! fits 28×28 (Fashion-)MNIST padded by two pixels, has three. The feature
//! maps double at each stage away from the image: ngf at the generator's
//! last hidden layer, ngf·2^(stages−1) at its first.

use crate::autocast::MixedPrecision;
use crate::autograd::module_scope;
use crate::error::{Error, Result};
use crate::nn::init::{Init, normal};
use crate::nn::{
    BatchNorm2d, Conv2d, ConvTranspose2d, LeakyRelu, Module, Relu, Sequential, Tanh, TensorRole,
    visit_child,
};
use crate::ops::conv::{Conv2dParams, ConvTranspose2dParams};
use crate::ops::loss::Reduction;
use crate::optim::{Adam, AdamConfig, Optimizer};
use crate::tensor::{DType, Device, Tensor};

/// The image side of [`DcganConfig::default`]: padded (Fashion-)MNIST.
pub const DEFAULT_IMAGE_SIZE: usize = 32;

/// Std of the N(0, σ²) conv weights and N(1, σ²) BatchNorm scales.
const INIT_STD: f64 = 0.02;

/// The discriminator's leaky-ReLU slope (the paper's 0.2).
const LEAKY_SLOPE: f64 = 0.2;

/// Sizes of both networks.
#[derive(Clone, Debug)]
pub struct DcganConfig {
    /// Length of the latent vector z.
    pub nz: usize,
    /// Generator feature maps in its last hidden layer (4·ngf in its first).
    pub ngf: usize,
    /// Discriminator feature maps in its first layer (4·ndf in its last hidden one).
    pub ndf: usize,
    /// Image channels: 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Side of the square images: a power of two, at least 8 (32 or 64).
    pub image_size: usize,
}

impl Default for DcganConfig {
    /// The tutorial's sizes (nz 100, 64 feature maps) for grey images.
    fn default() -> Self {
        DcganConfig {
            nz: 100,
            ngf: 64,
            ndf: 64,
            channels: 1,
            image_size: DEFAULT_IMAGE_SIZE,
        }
    }
}

impl DcganConfig {
    fn validate(&self, model: &'static str) -> Result<()> {
        super::check_positive(
            model,
            &[
                ("nz", self.nz),
                ("ngf", self.ngf),
                ("ndf", self.ndf),
                ("channels", self.channels),
            ],
        )?;
        if self.image_size < 8 || !self.image_size.is_power_of_two() {
            return Err(Error::invalid(
                model,
                format!(
                    "image_size must be a power of two of at least 8 (32 or 64 as in the paper), got {}",
                    self.image_size
                ),
            ));
        }
        Ok(())
    }

    /// Trainable parameters of the generator and of the discriminator these
    /// sizes build, computed without building them (to check that they fit
    /// before allocating): 4×4 kernels without bias, and a scale and shift
    /// per BatchNorm channel.
    pub fn parameter_counts(&self) -> (u128, u128) {
        // Saturating: sizes from a damaged file may be absurd.
        let stages = self.stages().clamp(1, 64);
        let (nz, c) = (self.nz as u128, self.channels as u128);
        let kernel = |i: u128, o: u128| i.saturating_mul(o).saturating_mul(16);
        let sum = |terms: &mut dyn Iterator<Item = u128>| terms.fold(0u128, u128::saturating_add);
        let widths = |base: usize| -> Vec<u128> {
            (0..stages)
                .map(|i| (base as u128).saturating_mul(1 << i))
                .collect()
        };
        // Generator: nz → ngf·2^(s−1) → … → ngf → C, BatchNorm after all but the last.
        let g = widths(self.ngf);
        let generator = sum(&mut [kernel(nz, g[g.len() - 1]), kernel(g[0], c)]
            .into_iter()
            .chain(g.windows(2).map(|w| kernel(w[1], w[0])))
            .chain(g.iter().map(|w| w.saturating_mul(2))));
        // Discriminator: C → ndf → … → ndf·2^(s−1) → 1, BatchNorm after all but the first.
        let d = widths(self.ndf);
        let discriminator = sum(&mut [kernel(c, d[0]), kernel(d[d.len() - 1], 1)]
            .into_iter()
            .chain(
                d.windows(2)
                    .map(|w| kernel(w[0], w[1]).saturating_add(w[1].saturating_mul(2))),
            ));
        (generator, discriminator)
    }

    /// Stride-2 stages between the 4×4 maps and the image: log2(size / 4).
    pub fn stages(&self) -> usize {
        (self.image_size / 4).trailing_zeros() as usize
    }
}

/// A 4×4 transposed convolution without bias, weight from N(0, 0.02).
fn up_conv(
    in_c: usize,
    out_c: usize,
    stride: usize,
    padding: usize,
    init: &mut Init,
) -> Result<ConvTranspose2d> {
    Ok(ConvTranspose2d {
        weight: normal(init, [in_c, out_c, 4, 4], 0.0, INIT_STD)?,
        bias: None,
        params: ConvTranspose2dParams {
            stride: [stride; 2],
            padding: [padding; 2],
            ..ConvTranspose2dParams::default()
        },
    })
}

/// A 4×4 convolution without bias, weight from N(0, 0.02).
fn down_conv(
    in_c: usize,
    out_c: usize,
    stride: usize,
    padding: usize,
    init: &mut Init,
) -> Result<Conv2d> {
    Ok(Conv2d {
        weight: normal(init, [out_c, in_c, 4, 4], 0.0, INIT_STD)?,
        bias: None,
        params: Conv2dParams {
            stride: [stride; 2],
            padding: [padding; 2].into(),
            ..Conv2dParams::default()
        },
    })
}

/// BatchNorm with its scale drawn from N(1, 0.02) and shift 0.
fn batch_norm(channels: usize, init: &mut Init) -> Result<BatchNorm2d> {
    let mut bn = BatchNorm2d::new(channels, init)?;
    bn.weight = Some(normal(init, [channels], 1.0, INIT_STD)?);
    Ok(bn)
}

/// Maps a latent z [N, nz, 1, 1] to images [N, C, S, S] in [−1, 1]. At
/// S = 32: ConvT(nz→4ngf, 4, 1, 0) 4×4 → ConvT(→2ngf, 4, 2, 1) 8×8 →
/// ConvT(→ngf) 16×16, each with BatchNorm + ReLU, then ConvT(→C) 32×32 +
/// tanh; S = 64 starts from 8ngf and adds one stage.
pub struct Generator {
    pub main: Sequential,
    nz: usize,
    channels: usize,
    image_size: usize,
    device: Device,
}

impl Generator {
    pub fn new(cfg: &DcganConfig, init: &mut Init) -> Result<Self> {
        cfg.validate("Generator")?;
        let (nz, ngf, c) = (cfg.nz, cfg.ngf, cfg.channels);
        // Feature maps from the 4×4 layer out: ngf·2^(stages−1), ..., ngf.
        let widths: Vec<usize> = (0..cfg.stages()).rev().map(|i| ngf << i).collect();
        let mut main = Sequential::new()
            .with(up_conv(nz, widths[0], 1, 0, init)?)
            .with(batch_norm(widths[0], init)?)
            .with(Relu);
        for pair in widths.windows(2) {
            main = main
                .with(up_conv(pair[0], pair[1], 2, 1, init)?)
                .with(batch_norm(pair[1], init)?)
                .with(Relu);
        }
        let main = main.with(up_conv(ngf, c, 2, 1, init)?).with(Tanh);
        Ok(Generator {
            main,
            nz,
            channels: c,
            image_size: cfg.image_size,
            device: init.device,
        })
    }

    pub fn nz(&self) -> usize {
        self.nz
    }

    /// Channels of the images it draws.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Side of the images it draws.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Where the parameters live (`init.device` at construction).
    pub fn device(&self) -> Device {
        self.device
    }
}

impl Module for Generator {
    /// z [N, nz, 1, 1] (or [N, nz]) → images [N, C, S, S] in [−1, 1]; z is
    /// moved to the model's device if it is elsewhere.
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let nz = self.nz;
        let z = match z.dims() {
            [n, k, 1, 1] if *k == nz && *n > 0 => z.clone(),
            [n, k] if *k == nz && *n > 0 => z.reshape([*n, nz, 1, 1])?,
            _ => {
                return Err(Error::shape(
                    "Generator",
                    format!("expected z of shape [N, {nz}, 1, 1], got {}", z.shape()),
                ));
            }
        };
        // Boxes the generator's ops in `kiln graph` (the checkpoint's prefix).
        let _scope = module_scope("generator");
        self.main.forward(&z.to_device(self.device())?)
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_child(prefix, "main", &self.main, visitor);
    }

    fn set_training(&self, training: bool) {
        self.main.set_training(training);
    }
}

/// Scores images [N, C, S, S] with one logit each (real > 0 > fake). At
/// S = 32: Conv(C→ndf, 4, 2, 1) 16×16 + LeakyReLU(0.2) → Conv(→2ndf) 8×8 →
/// Conv(→4ndf) 4×4, each with BatchNorm + LeakyReLU, then Conv(→1, 4, 1, 0);
/// S = 64 adds one stage, ending at 8ndf. The tutorial's final sigmoid is
/// left to the loss (`bce_with_logits`), which is stable where
/// sigmoid-then-log is not.
pub struct Discriminator {
    pub main: Sequential,
    channels: usize,
    image_size: usize,
    device: Device,
}

impl Discriminator {
    pub fn new(cfg: &DcganConfig, init: &mut Init) -> Result<Self> {
        cfg.validate("Discriminator")?;
        let (ndf, c) = (cfg.ndf, cfg.channels);
        // Feature maps from the image side in: ndf, 2ndf, ..., ndf·2^(stages−1).
        let widths: Vec<usize> = (0..cfg.stages()).map(|i| ndf << i).collect();
        // The first layer has no BatchNorm, as in the paper.
        let mut main = Sequential::new()
            .with(down_conv(c, ndf, 2, 1, init)?)
            .with(LeakyRelu(LEAKY_SLOPE));
        for pair in widths.windows(2) {
            main = main
                .with(down_conv(pair[0], pair[1], 2, 1, init)?)
                .with(batch_norm(pair[1], init)?)
                .with(LeakyRelu(LEAKY_SLOPE));
        }
        let last = widths[widths.len() - 1];
        let main = main.with(down_conv(last, 1, 1, 0, init)?);
        Ok(Discriminator {
            main,
            channels: c,
            image_size: cfg.image_size,
            device: init.device,
        })
    }

    /// Where the parameters live (`init.device` at construction).
    pub fn device(&self) -> Device {
        self.device
    }
}

impl Module for Discriminator {
    /// images `[N, C, S, S]` → logits `[N]`; images are moved to the model's
    /// device if they are elsewhere (a data loader's batches live on the CPU).
    fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let (c, s) = (self.channels, self.image_size);
        let n = match images.dims() {
            [n, ch, h, w] if *ch == c && *h == s && *w == s && *n > 0 => *n,
            _ => {
                return Err(Error::shape(
                    "Discriminator",
                    format!(
                        "expected images of shape [N, {c}, {s}, {s}], got {}",
                        images.shape()
                    ),
                ));
            }
        };
        // [N, 1, 1, 1] → [N]
        let images = images.to_device(self.device())?;
        let _scope = module_scope("discriminator");
        self.main.forward(&images)?.reshape([n])
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_child(prefix, "main", &self.main, visitor);
    }

    fn set_training(&self, training: bool) {
        self.main.set_training(training);
    }
}

/// The DCGAN paper's optimizer for either network: Adam with β1 = 0.5
/// (β2 = 0.999, eps 1e-8), which the paper found steadier than β1 = 0.9.
pub fn optimizer(network: &dyn Module, lr: f64) -> Result<Adam> {
    Adam::new(
        network.named_parameters(),
        AdamConfig {
            lr,
            betas: (0.5, 0.999),
            ..AdamConfig::adam()
        },
    )
}

/// What one GAN training step leaves behind, each tensor detached (the
/// step's graphs are freed when it returns).
pub struct GanStep {
    /// The discriminator's loss on the real and the generated batch (rank 0).
    pub loss_d: Tensor,
    /// The generator's non-saturating loss (rank 0).
    pub loss_g: Tensor,
    /// D's logits on the real batch [N], before its update.
    pub logits_real: Tensor,
    /// D's logits on the generated batch [N], before its update.
    pub logits_fake: Tensor,
}

/// One training step of both networks, as the PyTorch DCGAN tutorial: a
/// discriminator step on `real` images [N, C, S, S] in [−1, 1] and on
/// G(`z`), then a generator step through the updated discriminator. `z` is
/// the latent batch [N, nz, 1, 1]. The same call serves `kiln train gan`
/// and the benchmarks.
pub fn train_step(
    generator: &Generator,
    discriminator: &Discriminator,
    optim_g: &mut dyn Optimizer,
    optim_d: &mut dyn Optimizer,
    real: &Tensor,
    z: &Tensor,
    amp: &mut MixedPrecision,
) -> Result<GanStep> {
    let n = real.dims().first().copied().unwrap_or(0);
    let device = discriminator.device();
    let real_label = Tensor::ones([n], DType::F32, device)?;
    let fake_label = Tensor::zeros([n], DType::F32, device)?;

    // Discriminator: maximise log D(x) + log(1 − D(G(z))). G gets no update
    // from this loss: D sees the generated batch detached.
    let autocast = amp.autocast();
    let fake = generator.forward(z)?;
    let logits_real = discriminator.forward(real)?;
    let loss_real = logits_real.bce_with_logits(&real_label, Reduction::Mean)?;
    let logits_fake = discriminator.forward(&fake.detach())?;
    let loss_fake = logits_fake.bce_with_logits(&fake_label, Reduction::Mean)?;
    let loss_d = loss_real.add(&loss_fake)?;
    drop(autocast);
    // With f16, a step whose gradients overflowed is skipped; the one
    // scaler serves both players and backs off once, at the end.
    let (grads, finite_d) = amp.backward(&loss_d)?;
    if finite_d {
        optim_d.step(&grads)?;
    }

    // Generator: maximise log D(G(z)) (the non-saturating loss), through
    // the discriminator just updated.
    let autocast = amp.autocast();
    let logits = discriminator.forward(&fake)?;
    let loss_g = logits.bce_with_logits(&real_label, Reduction::Mean)?;
    drop(autocast);
    let (grads, finite_g) = amp.backward(&loss_g)?;
    if finite_g {
        optim_g.step(&grads)?;
    }
    amp.end_step();

    Ok(GanStep {
        loss_d: loss_d.detach(),
        loss_g: loss_g.detach(),
        logits_real: logits_real.detach(),
        logits_fake: logits_fake.detach(),
    })
}
