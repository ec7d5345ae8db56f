//! The three generative models kiln trains end to end, each built only from
//! [`crate::nn`] modules and tensor ops, with PyTorch's state-dict names so
//! that weights move between the two frameworks:
//!
//! - [`dcgan`]: a deep convolutional GAN for 32×32 images (Radford et al.,
//!   2016, in the layout of the PyTorch DCGAN tutorial);
//! - [`vae`]: a variational autoencoder with a Bernoulli likelihood (Kingma &
//!   Welling, 2014, in the layout of PyTorch's `examples/vae`);
//! - [`gpt`]: a character-level GPT with GPT-2-style pre-LayerNorm blocks.
//!
//! Beside them, [`classifier`] is a small Fashion-MNIST CNN whose features
//! and predictions [`quality`] turns into scores of generated images.

pub mod classifier;
pub mod dcgan;
pub mod gpt;
pub mod quality;
pub mod vae;

use crate::error::{Error, Result};

/// Fails with a message naming `model` and `field` when a size is zero.
fn check_positive(model: &'static str, sizes: &[(&str, usize)]) -> Result<()> {
    let zero: Vec<&str> = sizes
        .iter()
        .filter(|(_, size)| *size == 0)
        .map(|(name, _)| *name)
        .collect();
    if zero.is_empty() {
        Ok(())
    } else {
        Err(Error::invalid(
            model,
            format!("sizes must be positive, got 0 for {}", zero.join(", ")),
        ))
    }
}
