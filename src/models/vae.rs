//! Variational autoencoder (Kingma & Welling, "Auto-Encoding Variational
//! Bayes", 2014) with a Bernoulli likelihood over pixels, in the layout of
//! PyTorch's `examples/vae` (`fc1`, `fc21`, `fc22`, `fc3`, `fc4`):
//!
//! ```text
//! encoder  x → h = ReLU(fc1 x) → (mu = fc21 h, logvar = fc22 h)
//! sampler  z = mu + exp(½·logvar) · eps, eps ~ N(0, 1) (reparameterisation,
//!          so gradients reach mu and logvar through a deterministic path)
//! decoder  z → ReLU(fc3 z) → fc4 → pixel logits
//! ```
//!
//! The decoder returns logits rather than probabilities: the loss then uses
//! `bce_with_logits`, which stays finite when a pixel saturates.

use crate::autocast::MixedPrecision;
use crate::autograd::module_scope;
use crate::error::{Error, Result};
use crate::nn::init::Init;
use crate::nn::{Linear, Module, TensorRole, visit_child};
use crate::ops::loss::Reduction;
use crate::optim::{Adam, AdamConfig, Optimizer};
use crate::tensor::{Rng, Tensor};

/// Layer sizes.
#[derive(Clone, Debug)]
pub struct VaeConfig {
    /// Pixels per image (784 for 28×28).
    pub input: usize,
    pub hidden: usize,
    /// Dimension of the latent code z.
    pub latent: usize,
}

impl VaeConfig {
    /// Trainable parameters of the VAE these sizes build, computed without
    /// building it (to check that it fits before allocating).
    pub fn parameter_count(&self) -> u128 {
        let (x, h, z) = (self.input as u128, self.hidden as u128, self.latent as u128);
        // Saturating: sizes from a damaged file may be absurd.
        let linear = |i: u128, o: u128| i.saturating_mul(o).saturating_add(o);
        [
            linear(x, h),
            linear(h, z),
            linear(h, z),
            linear(z, h),
            linear(h, x),
        ]
        .into_iter()
        .fold(0, u128::saturating_add)
    }
}

impl Default for VaeConfig {
    /// The PyTorch example's sizes: 784 → 400 → 20.
    fn default() -> Self {
        VaeConfig {
            input: 784,
            hidden: 400,
            latent: 20,
        }
    }
}

/// The negative ELBO of a batch and its two parts, each a rank-0 tensor and
/// each a mean over the batch's images: `total = reconstruction + kl`.
pub struct VaeLoss {
    pub total: Tensor,
    /// −log p(x | z): Σ over pixels of the binary cross entropy.
    pub reconstruction: Tensor,
    /// KL(q(z | x) ‖ N(0, I)).
    pub kl: Tensor,
}

/// The VAE; its `forward` is the deterministic reconstruction decode(mu(x)).
pub struct Vae {
    pub fc1: Linear,
    pub fc21: Linear,
    pub fc22: Linear,
    pub fc3: Linear,
    pub fc4: Linear,
    config: VaeConfig,
}

impl Vae {
    /// Linear layers with PyTorch's default initialisation.
    pub fn new(cfg: &VaeConfig, init: &mut Init) -> Result<Self> {
        super::check_positive(
            "Vae",
            &[
                ("input", cfg.input),
                ("hidden", cfg.hidden),
                ("latent", cfg.latent),
            ],
        )?;
        Ok(Vae {
            fc1: Linear::new(cfg.input, cfg.hidden, true, init)?,
            fc21: Linear::new(cfg.hidden, cfg.latent, true, init)?,
            fc22: Linear::new(cfg.hidden, cfg.latent, true, init)?,
            fc3: Linear::new(cfg.latent, cfg.hidden, true, init)?,
            fc4: Linear::new(cfg.hidden, cfg.input, true, init)?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// x [N, input] with values in [0, 1] → (mu, logvar), each [N, latent].
    /// x is moved to the model's device if it is elsewhere.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = self.input_on_device(x)?;
        // Boxes the encoder's ops in `kiln graph`.
        let _scope = module_scope("encoder");
        let h = self.fc1.forward(&x)?.relu()?;
        Ok((self.fc21.forward(&h)?, self.fc22.forward(&h)?))
    }

    /// z [N, latent] → pixel logits [N, input] (sigmoid gives probabilities).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let latent = self.config.latent;
        if z.rank() != 2 || z.dims()[1] != latent {
            return Err(Error::shape(
                "Vae::decode",
                format!("expected z of shape [N, {latent}], got {}", z.shape()),
            ));
        }
        let z = z.to_device(self.fc3.weight.device())?;
        let _scope = module_scope("decoder");
        let h = self.fc3.forward(&z)?.relu()?;
        self.fc4.forward(&h)
    }

    /// Negative ELBO per image, averaged over the batch: Σ_pixels BCE(logits,
    /// x) + KL(N(mu, σ²) ‖ N(0, 1)), with z drawn once per image from `rng`.
    pub fn loss(&self, x: &Tensor, rng: &mut Rng) -> Result<VaeLoss> {
        let x = self.input_on_device(x)?;
        let (mu, logvar) = self.encode(&x)?;
        let images = x.dims()[0];
        // z = mu + σ · eps with σ = exp(½·logvar)
        let eps = Tensor::randn(mu.shape().clone(), mu.dtype(), mu.device(), rng)?;
        let z = mu.add(&logvar.mul_scalar(0.5)?.exp()?.mul(&eps)?)?;
        let logits = self.decode(&z)?;
        let reconstruction = logits
            .bce_with_logits(&x, Reduction::Sum)?
            .mul_scalar(1.0 / images as f64)?;
        let kl = Tensor::gaussian_kl(&mu, &logvar, Reduction::Mean)?;
        Ok(VaeLoss {
            total: reconstruction.add(&kl)?,
            reconstruction,
            kl,
        })
    }

    /// Checks x is [N, input] and returns it on the model's device.
    fn input_on_device(&self, x: &Tensor) -> Result<Tensor> {
        let input = self.config.input;
        if x.rank() != 2 || x.dims()[0] == 0 || x.dims()[1] != input {
            return Err(Error::shape(
                "Vae",
                format!(
                    "expected images flattened to [N, {input}] with N > 0, got {}",
                    x.shape()
                ),
            ));
        }
        x.to_device(self.fc1.weight.device())
    }
}

impl Module for Vae {
    /// x [N, input] → reconstruction logits [N, input] from the mean code (no sampling).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (mu, _) = self.encode(x)?;
        self.decode(&mu)
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_child(prefix, "fc1", &self.fc1, visitor);
        visit_child(prefix, "fc21", &self.fc21, visitor);
        visit_child(prefix, "fc22", &self.fc22, visitor);
        visit_child(prefix, "fc3", &self.fc3, visitor);
        visit_child(prefix, "fc4", &self.fc4, visitor);
    }
}

/// The optimizer of PyTorch's VAE example: Adam with its defaults
/// (β 0.9/0.999, eps 1e-8) at learning rate `lr`.
pub fn optimizer(vae: &Vae, lr: f64) -> Result<Adam> {
    Adam::new(
        vae.named_parameters(),
        AdamConfig {
            lr,
            ..AdamConfig::adam()
        },
    )
}

/// One training step: the negative ELBO of the batch `x` [N, input] in
/// [0, 1] (z drawn from `rng`), its gradients, one optimizer update.
/// Returns the loss and its parts, detached. The same call serves
/// `kiln train vae` and the benchmarks.
pub fn train_step(
    vae: &Vae,
    optimizer: &mut dyn Optimizer,
    x: &Tensor,
    rng: &mut Rng,
    amp: &mut MixedPrecision,
) -> Result<VaeLoss> {
    let loss = {
        let _autocast = amp.autocast();
        vae.loss(x, rng)?
    };
    let (grads, finite) = amp.backward(&loss.total)?;
    // A step whose f16 gradients overflowed is skipped (the scale backs off).
    if finite {
        optimizer.step(&grads)?;
    }
    amp.end_step();
    Ok(VaeLoss {
        total: loss.total.detach(),
        reconstruction: loss.reconstruction.detach(),
        kl: loss.kl.detach(),
    })
}
