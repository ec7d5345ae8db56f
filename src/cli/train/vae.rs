//! `kiln train vae`: the VAE on flat rows of pixels, and the conversions
//! between its rows and images that sampling and evaluation share.

use std::path::Path;

use anyhow::Result;

use super::{
    EpochSchedule, RunLength, SAMPLE_GRID, Settings, Trainee, image_geometry,
    model_and_optimizer_tensors, restore_model_and_optimizer, scalar, size,
};
use crate::cli::args::TrainArgs;
use crate::cli::budget::check_training_fits;
use crate::cli::run_dir::{LoadedCheckpoint, RunState, SAMPLES_FILE};
use crate::cli::seeds::{Stream, stream_rng};
use crate::cli::specs::{self, VaeSpec, build_vae};
use crate::data::idx::ImageSet;
use crate::data::image::save_grid_png;
use crate::models::vae::{self, Vae};
use crate::optim::{Adam, Optimizer};
use crate::{DType, Device, MixedPrecision, Rng, Tensor, no_grad};

pub(super) struct VaeTrainee {
    vae: Vae,
    spec: VaeSpec,
    optimizer: Adam,
    images: ImageSet,
    schedule: EpochSchedule,
    device: Device,
    /// Latents behind samples.png, the same at every checkpoint.
    fixed_latents: Tensor,
}

/// Images as the VAE sees them: flat rows [N, C·S·S] in [0, 1].
pub fn vae_batch(
    spec: &VaeSpec,
    images: &ImageSet,
    indices: &[usize],
    device: Device,
) -> Result<Tensor> {
    Ok(images
        .batch(indices, spec.image_size, 0.0, 1.0)?
        .reshape([indices.len(), spec.input])?
        .to_device(device)?)
}

/// Decoded images [N, C, S, S] in [0, 1] from latents [N, latent].
pub fn vae_images(vae: &Vae, spec: &VaeSpec, latents: &Tensor) -> Result<Tensor> {
    let _no_grad = no_grad();
    let n = latents.dims()[0];
    Ok(vae
        .decode(latents)?
        .sigmoid()?
        .reshape(spec.image_shape(n))?)
}

impl VaeTrainee {
    pub(super) fn new(
        args: &TrainArgs,
        settings: &Settings,
        resumed: Option<&RunState>,
        device: Device,
    ) -> Result<(Self, VaeSpec)> {
        let saved: Option<VaeSpec> = resumed.map(specs::spec).transpose()?;
        let saved = saved.as_ref();
        let defaults = VaeSpec::default();
        let (image_size, channels) = image_geometry(
            args,
            saved.map(|s| (s.image_size, s.channels)),
            (defaults.image_size, defaults.channels),
        )?;
        let spec = VaeSpec::for_images(
            image_size,
            channels,
            size("hidden", args.vae.hidden, saved.map(|s| s.hidden), 400)?,
            size("latent", args.vae.latent, saved.map(|s| s.latent), 20)?,
        );
        // Validates the sizes before the data is read.
        check_training_fits("training the VAE", spec.parameter_count())?;
        let vae = build_vae(&spec, settings.seed, device)?;
        let images = settings.training_images(spec.image_size, spec.channels)?;
        let schedule = EpochSchedule::over(settings, images.count);
        let optimizer = vae::optimizer(&vae, settings.lr)?;
        let mut noise_rng = stream_rng(settings.seed, Stream::FixedNoise, 0);
        let fixed_latents = Tensor::randn(
            [SAMPLE_GRID * SAMPLE_GRID, spec.latent],
            DType::F32,
            device,
            &mut noise_rng,
        )?;
        let trainee = VaeTrainee {
            vae,
            spec: spec.clone(),
            optimizer,
            images,
            schedule,
            device,
            fixed_latents,
        };
        Ok((trainee, spec))
    }
}

impl Trainee for VaeTrainee {
    fn metric_names(&self) -> &'static [&'static str] {
        &["loss", "reconstruction", "kl"]
    }

    fn train_step(
        &mut self,
        step: usize,
        rng: &mut Rng,
        amp: &mut MixedPrecision,
    ) -> Result<Vec<f64>> {
        let indices = self.schedule.batch(step).to_vec();
        let x = vae_batch(&self.spec, &self.images, &indices, self.device)?;
        let loss = vae::train_step(&self.vae, &mut self.optimizer, &x, rng, amp)?;
        Ok(vec![
            scalar(&loss.total)?,
            scalar(&loss.reconstruction)?,
            scalar(&loss.kl)?,
        ])
    }

    fn length(&self) -> &dyn RunLength {
        &self.schedule
    }

    fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        model_and_optimizer_tensors(&self.vae, &self.optimizer)
    }

    fn restore(&mut self, checkpoint: &LoadedCheckpoint) -> Result<()> {
        restore_model_and_optimizer(&self.vae, &mut self.optimizer, checkpoint)
    }

    fn optimizers(&mut self) -> Vec<&mut dyn Optimizer> {
        vec![&mut self.optimizer]
    }

    fn save_pictures(&self, dir: &Path) -> Result<()> {
        let images = vae_images(&self.vae, &self.spec, &self.fixed_latents)?;
        save_grid_png(&dir.join(SAMPLES_FILE), &images, SAMPLE_GRID, 0.0, 1.0)?;
        Ok(())
    }
}
