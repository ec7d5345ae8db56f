//! `kiln train gan`: the DCGAN's generator and discriminator, one Adam
//! each, trained by the shared loop on padded IDX images or an image folder.

use std::path::Path;

use anyhow::Result;

use super::{
    EpochSchedule, RunLength, SAMPLE_GRID, Settings, Trainee, image_geometry, restore_optimizer,
    scalar, size,
};
use crate::cli::args::TrainArgs;
use crate::cli::budget::check_training_fits;
use crate::cli::run_dir::{LoadedCheckpoint, RunState, SAMPLES_FILE, prefixed};
use crate::cli::seeds::{Stream, stream_rng};
use crate::cli::specs::{self, GanSpec, build_gan};
use crate::data::idx::ImageSet;
use crate::data::image::save_grid_png;
use crate::models::dcgan::{self, Discriminator, Generator};
use crate::nn::Module;
use crate::optim::{Adam, Optimizer};
use crate::{DType, Device, MixedPrecision, Rng, Tensor, no_grad};

pub(super) struct GanTrainee {
    generator: Generator,
    discriminator: Discriminator,
    optim_g: Adam,
    optim_d: Adam,
    images: ImageSet,
    schedule: EpochSchedule,
    nz: usize,
    image_size: usize,
    device: Device,
    /// The noise behind samples.png, the same at every checkpoint.
    fixed_noise: Tensor,
}

impl GanTrainee {
    pub(super) fn new(
        args: &TrainArgs,
        settings: &Settings,
        resumed: Option<&RunState>,
        device: Device,
    ) -> Result<(Self, GanSpec)> {
        let saved: Option<GanSpec> = resumed.map(specs::spec).transpose()?;
        let saved = saved.as_ref();
        let defaults = GanSpec::default();
        let (image_size, channels) = image_geometry(
            args,
            saved.map(|s| (s.image_size, s.channels)),
            (defaults.image_size, defaults.channels),
        )?;
        let spec = GanSpec {
            nz: size("nz", args.gan.nz, saved.map(|s| s.nz), defaults.nz)?,
            ngf: size("ngf", args.gan.ngf, saved.map(|s| s.ngf), defaults.ngf)?,
            ndf: size("ndf", args.gan.ndf, saved.map(|s| s.ndf), defaults.ndf)?,
            channels,
            image_size,
        };
        // Validates the sizes before the data is read.
        check_training_fits("training the DCGAN", spec.parameter_count())?;
        let (generator, discriminator) = build_gan(&spec, settings.seed, device)?;
        let images = settings.training_images(spec.image_size, spec.channels)?;
        let schedule = EpochSchedule::over(settings, images.count);
        let optim_g = dcgan::optimizer(&generator, settings.lr)?;
        let optim_d = dcgan::optimizer(&discriminator, settings.lr)?;
        let mut noise_rng = stream_rng(settings.seed, Stream::FixedNoise, 0);
        let fixed_noise = Tensor::randn(
            [SAMPLE_GRID * SAMPLE_GRID, spec.nz, 1, 1],
            DType::F32,
            device,
            &mut noise_rng,
        )?;
        let trainee = GanTrainee {
            generator,
            discriminator,
            optim_g,
            optim_d,
            images,
            schedule,
            nz: spec.nz,
            image_size: spec.image_size,
            device,
            fixed_noise,
        };
        Ok((trainee, spec))
    }
}

impl Trainee for GanTrainee {
    fn metric_names(&self) -> &'static [&'static str] {
        // D(x), D(G(z)): the discriminator's mean probability of "real" on
        // the real and on the generated batch, as in the PyTorch tutorial.
        &["loss_d", "loss_g", "d_x", "d_g_z"]
    }

    fn train_step(
        &mut self,
        step: usize,
        rng: &mut Rng,
        amp: &mut MixedPrecision,
    ) -> Result<Vec<f64>> {
        let indices = self.schedule.batch(step).to_vec();
        let n = indices.len();
        let real = self
            .images
            .batch(&indices, self.image_size, -1.0, 1.0)?
            .to_device(self.device)?;
        let z = Tensor::randn([n, self.nz, 1, 1], DType::F32, self.device, rng)?;
        let result = dcgan::train_step(
            &self.generator,
            &self.discriminator,
            &mut self.optim_g,
            &mut self.optim_d,
            &real,
            &z,
            amp,
        )?;
        let _no_grad = no_grad();
        Ok(vec![
            scalar(&result.loss_d)?,
            scalar(&result.loss_g)?,
            // In f32 whatever the precision (16-bit logits would round the means).
            scalar(
                &result
                    .logits_real
                    .to_dtype(DType::F32)?
                    .sigmoid()?
                    .mean_all()?,
            )?,
            scalar(
                &result
                    .logits_fake
                    .to_dtype(DType::F32)?
                    .sigmoid()?
                    .mean_all()?,
            )?,
        ])
    }

    fn length(&self) -> &dyn RunLength {
        &self.schedule
    }

    fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = prefixed("generator", self.generator.state_dict());
        tensors.extend(prefixed("discriminator", self.discriminator.state_dict()));
        tensors.extend(prefixed("optim_g", self.optim_g.state_dict()));
        tensors.extend(prefixed("optim_d", self.optim_d.state_dict()));
        tensors
    }

    fn restore(&mut self, checkpoint: &LoadedCheckpoint) -> Result<()> {
        specs::load_into(&self.generator, checkpoint, "generator")?;
        specs::load_into(&self.discriminator, checkpoint, "discriminator")?;
        restore_optimizer(&mut self.optim_g, checkpoint, "optim_g")?;
        restore_optimizer(&mut self.optim_d, checkpoint, "optim_d")
    }

    fn optimizers(&mut self) -> Vec<&mut dyn Optimizer> {
        vec![&mut self.optim_g, &mut self.optim_d]
    }

    fn save_pictures(&self, dir: &Path) -> Result<()> {
        let images = {
            let _no_grad = no_grad();
            self.generator.eval();
            let images = self.generator.forward(&self.fixed_noise);
            self.generator.train();
            images?
        };
        save_grid_png(&dir.join(SAMPLES_FILE), &images, SAMPLE_GRID, -1.0, 1.0)?;
        Ok(())
    }
}
