//! `kiln train classifier`: the Fashion-MNIST classifier that scores the
//! image models' samples (`kiln eval gan|vae --classifier`), trained by the
//! shared loop of `train` with cross entropy and Adam.

use anyhow::Result;

use super::{
    EpochSchedule, RunLength, Settings, Trainee, model_and_optimizer_tensors,
    restore_model_and_optimizer, scalar, size,
};
use crate::cli::args::TrainArgs;
use crate::cli::budget::check_training_fits;
use crate::cli::run_dir::{LoadedCheckpoint, RunState};
use crate::cli::specs::{self, ClassifierSpec, build_classifier};
use crate::data::idx::ImageSet;
use crate::models::classifier::{self, Classifier, IMAGE_SIZE};
use crate::optim::{Adam, Optimizer};
use crate::{Device, MixedPrecision, Rng, Tensor};

/// Fashion-MNIST's ten classes.
const CLASSES: usize = 10;

pub(super) struct ClassifierTrainee {
    classifier: Classifier,
    optimizer: Adam,
    images: ImageSet,
    schedule: EpochSchedule,
    device: Device,
}

/// Images [N, 1, 28, 28] in [0, 1] and their u32 labels [N]: what the
/// classifier reads.
pub fn labelled_batch(images: &ImageSet, indices: &[usize]) -> Result<(Tensor, Tensor)> {
    if images.labels.len() != images.count {
        anyhow::bail!("the classifier needs labelled images; this set has no labels");
    }
    let x = images.batch(indices, IMAGE_SIZE, 0.0, 1.0)?;
    let labels: Vec<u32> = indices.iter().map(|&i| images.labels[i] as u32).collect();
    let y = Tensor::from_indices(labels, [indices.len()])?;
    Ok((x, y))
}

impl ClassifierTrainee {
    pub(super) fn new(
        args: &TrainArgs,
        settings: &Settings,
        resumed: Option<&RunState>,
        device: Device,
    ) -> Result<(Self, ClassifierSpec)> {
        let saved: Option<ClassifierSpec> = resumed.map(specs::spec).transpose()?;
        let saved = saved.as_ref();
        let spec = ClassifierSpec {
            width: size("width", args.classifier.width, saved.map(|s| s.width), 32)?,
            features: size(
                "features",
                args.classifier.features,
                saved.map(|s| s.features),
                128,
            )?,
            classes: CLASSES,
        };
        let images = settings.labelled_training_images()?;
        let schedule = EpochSchedule::over(settings, images.count);
        check_training_fits("training the classifier", spec.parameter_count())?;
        let classifier = build_classifier(&spec, settings.seed, device)?;
        let optimizer = classifier::optimizer(&classifier, settings.lr)?;
        let trainee = ClassifierTrainee {
            classifier,
            optimizer,
            images,
            schedule,
            device,
        };
        Ok((trainee, spec))
    }
}

impl Trainee for ClassifierTrainee {
    fn metric_names(&self) -> &'static [&'static str] {
        // accuracy: the fraction of the batch classified right, before the update.
        &["loss", "accuracy"]
    }

    fn train_step(
        &mut self,
        step: usize,
        _rng: &mut Rng,
        amp: &mut MixedPrecision,
    ) -> Result<Vec<f64>> {
        let indices = self.schedule.batch(step).to_vec();
        let (x, y) = labelled_batch(&self.images, &indices)?;
        let (loss, correct) = classifier::train_step(
            &self.classifier,
            &mut self.optimizer,
            &x.to_device(self.device)?,
            &y.to_device(self.device)?,
            amp,
        )?;
        Ok(vec![scalar(&loss)?, correct as f64 / indices.len() as f64])
    }

    fn length(&self) -> &dyn RunLength {
        &self.schedule
    }

    fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        model_and_optimizer_tensors(&self.classifier, &self.optimizer)
    }

    fn restore(&mut self, checkpoint: &LoadedCheckpoint) -> Result<()> {
        restore_model_and_optimizer(&self.classifier, &mut self.optimizer, checkpoint)
    }

    fn optimizers(&mut self) -> Vec<&mut dyn Optimizer> {
        vec![&mut self.optimizer]
    }
}
