//! The models' architectures as they are written into a checkpoint's run
//! state, and the code that rebuilds a model from one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::run_dir::{DAMAGED_STATE, LoadedCheckpoint, RunState};
use super::seeds::{Stream, stream_rng};
use crate::data::text::Vocab;
use crate::models::classifier::{Classifier, ClassifierConfig};
use crate::models::dcgan::{DcganConfig, Discriminator, Generator};
use crate::models::gpt::{Gpt, GptConfig, GptInit};
use crate::models::vae::{Vae, VaeConfig};
use crate::nn::{Init, Module};
use crate::{DType, Device};

/// Image side the DCGAN works at by default (28×28 images are centred in 32×32).
pub const GAN_IMAGE_SIZE: usize = 32;
/// Image side of the VAE by default (the IDX images as they are).
pub const VAE_IMAGE_SIZE: usize = 28;

/// The Shakespeare text inside a data directory.
pub fn text_path(data: &Path) -> PathBuf {
    data.join("shakespeare.txt")
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GanSpec {
    pub nz: usize,
    pub ngf: usize,
    pub ndf: usize,
    pub channels: usize,
    /// Absent in runs from before it could change: 32.
    #[serde(default = "default_gan_image_size")]
    pub image_size: usize,
}

fn default_gan_image_size() -> usize {
    GAN_IMAGE_SIZE
}

impl Default for GanSpec {
    /// `kiln train gan`'s defaults: the tutorial's sizes, padded grey images.
    fn default() -> Self {
        GanSpec {
            nz: 100,
            ngf: 64,
            ndf: 64,
            channels: 1,
            image_size: GAN_IMAGE_SIZE,
        }
    }
}

impl From<&GanSpec> for DcganConfig {
    fn from(s: &GanSpec) -> DcganConfig {
        DcganConfig {
            nz: s.nz,
            ngf: s.ngf,
            ndf: s.ndf,
            channels: s.channels,
            image_size: s.image_size,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VaeSpec {
    /// Pixels per image: channels · image_size².
    pub input: usize,
    pub hidden: usize,
    pub latent: usize,
    /// Absent in runs from before it could change: 28.
    #[serde(default = "default_vae_image_size")]
    pub image_size: usize,
    /// Absent in runs from before it could change: 1.
    #[serde(default = "one")]
    pub channels: usize,
}

fn default_vae_image_size() -> usize {
    VAE_IMAGE_SIZE
}

fn one() -> usize {
    1
}

impl Default for VaeSpec {
    /// `kiln train vae`'s defaults: the PyTorch example's sizes on 28×28 grey images.
    fn default() -> Self {
        VaeSpec::for_images(VAE_IMAGE_SIZE, 1, 400, 20)
    }
}

impl VaeSpec {
    /// A VAE over `channels × image_size²` pixels.
    pub fn for_images(image_size: usize, channels: usize, hidden: usize, latent: usize) -> Self {
        VaeSpec {
            input: channels * image_size * image_size,
            hidden,
            latent,
            image_size,
            channels,
        }
    }

    /// The image shape [n, C, S, S] of n flat rows of pixels.
    pub fn image_shape(&self, n: usize) -> [usize; 4] {
        [n, self.channels, self.image_size, self.image_size]
    }
}

impl From<&VaeSpec> for VaeConfig {
    fn from(s: &VaeSpec) -> VaeConfig {
        VaeConfig {
            input: s.input,
            hidden: s.hidden,
            latent: s.latent,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GptSpec {
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub dropout: f64,
}

impl From<&GptSpec> for GptConfig {
    fn from(s: &GptSpec) -> GptConfig {
        GptConfig {
            vocab_size: s.vocab_size,
            n_layer: s.n_layer,
            n_head: s.n_head,
            n_embd: s.n_embd,
            block_size: s.block_size,
            dropout: s.dropout,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ClassifierSpec {
    pub width: usize,
    pub features: usize,
    pub classes: usize,
}

impl From<&ClassifierSpec> for ClassifierConfig {
    fn from(s: &ClassifierSpec) -> ClassifierConfig {
        ClassifierConfig {
            width: s.width,
            features: s.features,
            classes: s.classes,
        }
    }
}

impl GanSpec {
    /// Parameters of the generator and the discriminator together, from the
    /// models' own counts (nothing is built).
    pub fn parameter_count(&self) -> u128 {
        let (generator, discriminator) = DcganConfig::from(self).parameter_counts();
        generator.saturating_add(discriminator)
    }
}

impl VaeSpec {
    /// Parameters of the VAE (nothing is built).
    pub fn parameter_count(&self) -> u128 {
        VaeConfig::from(self).parameter_count()
    }
}

impl GptSpec {
    /// Parameters of the GPT (nothing is built).
    pub fn parameter_count(&self) -> u128 {
        GptConfig::from(self).parameter_count()
    }
}

impl ClassifierSpec {
    /// Parameters of the classifier (nothing is built).
    pub fn parameter_count(&self) -> u128 {
        ClassifierConfig::from(self).parameter_count()
    }
}

/// Parameters of the model a run state's configuration describes, or None
/// if it cannot be read.
fn described_parameters(state: &RunState) -> Option<u128> {
    match state.model.as_str() {
        "gan" => spec::<GanSpec>(state).ok().map(|s| s.parameter_count()),
        "vae" => spec::<VaeSpec>(state).ok().map(|s| s.parameter_count()),
        "gpt" => spec::<GptSpec>(state).ok().map(|s| s.parameter_count()),
        "classifier" => spec::<ClassifierSpec>(state)
            .ok()
            .map(|s| s.parameter_count()),
        _ => None,
    }
}

/// Checks the size of the model that a checkpoint's run state describes
/// against the values its file holds, before anything is built from it: a
/// damaged or edited run state (say `"hidden": 1000000000000`) is an error
/// naming the file, not an allocation of whatever size it declares. A
/// configuration that cannot be read is left to the model's loader, which
/// says so.
pub fn check_config(checkpoint: &LoadedCheckpoint) -> Result<()> {
    let state = &checkpoint.state;
    let Some(parameters) = described_parameters(state) else {
        return Ok(());
    };
    let groups: &[&str] = match state.model.as_str() {
        "gan" => &["generator", "discriminator"],
        _ => &["model"],
    };
    let stored: usize = checkpoint
        .tensors
        .iter()
        .filter(|(name, _)| {
            groups.iter().any(|g| {
                name.strip_prefix(g)
                    .is_some_and(|rest| rest.starts_with('.'))
            })
        })
        .map(|(_, tensor)| tensor.numel())
        .sum();
    if parameters <= stored as u128 {
        return Ok(());
    }
    let needs = if parameters == u128::MAX {
        "more parameters than can be counted".to_string()
    } else {
        format!("{parameters} parameters")
    };
    bail!(
        "{}: the run state's {} configuration {} describes a model of {needs}, but the file holds \
         only {stored} values for its {}; {DAMAGED_STATE}",
        checkpoint.weights_path.display(),
        state.model,
        state.config,
        groups.join(" and ")
    )
}

/// The architecture recorded in `state`, read as a `T`.
pub fn spec<T: for<'de> Deserialize<'de>>(state: &RunState) -> Result<T> {
    serde_json::from_value(state.config.clone()).with_context(|| {
        format!(
            "the checkpoint's {} configuration cannot be read",
            state.model
        )
    })
}

/// [`spec`] of a checkpoint, with an error naming its file.
fn read_spec<T: for<'de> Deserialize<'de>>(checkpoint: &LoadedCheckpoint) -> Result<T> {
    spec(&checkpoint.state).map_err(|e| {
        anyhow!(
            "{}: {e:#}; {DAMAGED_STATE}",
            checkpoint.weights_path.display()
        )
    })
}

/// An error building the model a checkpoint's run state describes, naming the file.
fn cannot_build(checkpoint: &LoadedCheckpoint, e: anyhow::Error) -> anyhow::Error {
    anyhow!(
        "{}: the run state's {} configuration {} does not describe a model kiln can build \
         ({e:#}); {DAMAGED_STATE}",
        checkpoint.weights_path.display(),
        checkpoint.state.model,
        checkpoint.state.config
    )
}

/// Generator and discriminator, freshly initialised from the run's seed.
pub fn build_gan(spec: &GanSpec, seed: u64, device: Device) -> Result<(Generator, Discriminator)> {
    let config = DcganConfig::from(spec);
    let mut rng = stream_rng(seed, Stream::Init, 0);
    let mut init = Init::new(&mut rng, device, DType::F32);
    let generator = Generator::new(&config, &mut init)?;
    let discriminator = Discriminator::new(&config, &mut init)?;
    Ok((generator, discriminator))
}

pub fn build_vae(spec: &VaeSpec, seed: u64, device: Device) -> Result<Vae> {
    let mut rng = stream_rng(seed, Stream::Init, 0);
    let mut init = Init::new(&mut rng, device, DType::F32);
    Ok(Vae::new(&VaeConfig::from(spec), &mut init)?)
}

pub fn build_gpt(spec: &GptSpec, seed: u64, device: Device) -> Result<Gpt> {
    build_gpt_with_init(spec, GptInit::default(), seed, device)
}

/// [`build_gpt`] with the weights initialised as `scheme` says.
pub fn build_gpt_with_init(
    spec: &GptSpec,
    scheme: GptInit,
    seed: u64,
    device: Device,
) -> Result<Gpt> {
    let mut rng = stream_rng(seed, Stream::Init, 0);
    let mut init = Init::new(&mut rng, device, DType::F32);
    let dropout_seed = stream_rng(seed, Stream::Dropout, 0).next_u64();
    Ok(Gpt::with_init(
        &GptConfig::from(spec),
        scheme,
        dropout_seed,
        &mut init,
    )?)
}

pub fn build_classifier(spec: &ClassifierSpec, seed: u64, device: Device) -> Result<Classifier> {
    let mut rng = stream_rng(seed, Stream::Init, 0);
    let mut init = Init::new(&mut rng, device, DType::F32);
    Ok(Classifier::new(&ClassifierConfig::from(spec), &mut init)?)
}

/// Loads the tensors "`prefix`.x" of `checkpoint` into `module`.
pub fn load_into(module: &dyn Module, checkpoint: &LoadedCheckpoint, prefix: &str) -> Result<()> {
    module
        .load_state_dict(&checkpoint.group(prefix))
        .with_context(|| {
            format!(
                "{}: cannot load the {prefix} weights",
                checkpoint.weights_path.display()
            )
        })
}

/// The trained generator of a GAN checkpoint, in eval mode.
pub fn load_generator(checkpoint: &LoadedCheckpoint, device: Device) -> Result<Generator> {
    checkpoint.expect_model("gan")?;
    let spec: GanSpec = read_spec(checkpoint)?;
    let (generator, _) =
        build_gan(&spec, checkpoint.state.seed, device).map_err(|e| cannot_build(checkpoint, e))?;
    load_into(&generator, checkpoint, "generator")?;
    generator.eval();
    Ok(generator)
}

/// The trained VAE of a checkpoint, in eval mode, with its sizes.
pub fn load_vae(checkpoint: &LoadedCheckpoint, device: Device) -> Result<(Vae, VaeSpec)> {
    checkpoint.expect_model("vae")?;
    let spec: VaeSpec = read_spec(checkpoint)?;
    let pixels = spec
        .channels
        .checked_mul(spec.image_size)
        .and_then(|p| p.checked_mul(spec.image_size));
    if pixels != Some(spec.input) {
        bail!(
            "{}: the VAE's input of {} pixels does not match its {}×{}×{} images; {DAMAGED_STATE}",
            checkpoint.weights_path.display(),
            spec.input,
            spec.channels,
            spec.image_size,
            spec.image_size
        );
    }
    let vae =
        build_vae(&spec, checkpoint.state.seed, device).map_err(|e| cannot_build(checkpoint, e))?;
    load_into(&vae, checkpoint, "model")?;
    vae.eval();
    Ok((vae, spec))
}

/// The trained GPT of a checkpoint, in eval mode, with its vocabulary.
pub fn load_gpt(checkpoint: &LoadedCheckpoint, device: Device) -> Result<(Gpt, Vocab)> {
    checkpoint.expect_model("gpt")?;
    let spec: GptSpec = read_spec(checkpoint)?;
    let repr = checkpoint.state.vocab.as_deref().with_context(|| {
        format!(
            "{}: the GPT checkpoint has no vocabulary",
            checkpoint.weights_path.display()
        )
    })?;
    let vocab = Vocab::from_string_repr(repr).map_err(|e| {
        anyhow!(
            "{}: the GPT checkpoint's vocabulary cannot be read ({e}); {DAMAGED_STATE}",
            checkpoint.weights_path.display()
        )
    })?;
    let gpt =
        build_gpt(&spec, checkpoint.state.seed, device).map_err(|e| cannot_build(checkpoint, e))?;
    load_into(&gpt, checkpoint, "model")?;
    gpt.eval();
    Ok((gpt, vocab))
}

/// The trained classifier of a checkpoint, in eval mode.
pub fn load_classifier(checkpoint: &LoadedCheckpoint, device: Device) -> Result<Classifier> {
    checkpoint.expect_model("classifier")?;
    let spec: ClassifierSpec = read_spec(checkpoint)?;
    let classifier = build_classifier(&spec, checkpoint.state.seed, device)
        .map_err(|e| cannot_build(checkpoint, e))?;
    load_into(&classifier, checkpoint, "model")?;
    classifier.eval();
    Ok(classifier)
}
