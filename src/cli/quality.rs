//! The sample-quality scores of `kiln eval gan|vae --classifier DIR` and the
//! accuracy and floor of `kiln eval classifier`: a trained Fashion-MNIST
//! classifier reads generated (or real) images; its penultimate features
//! give a Fréchet distance to the test set's features (a classifier-feature
//! FID, not the Inception FID of the literature: the numbers are only
//! comparable between runs scored by the same classifier checkpoint), and
//! its class probabilities the two entropies (see `models::quality`).
//!
//! Every image reaches the classifier as the IDX sets are stored and as the
//! classifier was trained: [N, 1, 28, 28] in [0, 1]. The GAN's images are
//! 32×32 in [−1, 1] (28×28 images padded by 2 pixels of background, then
//! mapped by x ↦ 2x − 1), so they are converted back: the central 28×28
//! crop, mapped by y ↦ (y + 1)/2. On a real training image this is the
//! exact inverse of the GAN's input pipeline.
//!
//! A classifier judges only models trained on its own dataset (Fashion-MNIST
//! or MNIST, as recorded in both checkpoints); a model trained on an image
//! folder has no judge here.

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::args::{DatasetArg, EvalArgs};
use super::datasets::{ImageSource, data_dir, recorded_dataset};
use super::progress::Progress;
use super::run_dir::{LoadedCheckpoint, load_checkpoint};
use super::seeds::{Stream, permutation, stream_rng};
use super::specs::{VaeSpec, load_classifier, load_generator};
use super::train::{labelled_batch, vae_images};
use crate::autocast::AutocastGuard;
use crate::data::idx::Split;
use crate::models::classifier::{Classifier, IMAGE_SIZE, correct_predictions};
use crate::models::quality::{ClassTally, FeatureAccumulator, frechet_distance};
use crate::models::vae::Vae;
use crate::nn::Module;
use crate::{DType, Device, Precision, Tensor, no_grad};

/// Images the classifier reads per forward pass (and generated per batch).
const BATCH: usize = 500;

/// A classifier checkpoint, loaded for scoring, with its precision.
pub struct Judge {
    classifier: Classifier,
    precision: Precision,
    /// The dataset it learned, whose test split the samples are scored against.
    dataset: DatasetArg,
}

/// What the classifier makes of a set of images, summed image by image:
/// the features' mean and covariance, and the class predictions. Any
/// number of images fits in the same small memory.
struct Tally {
    features: FeatureAccumulator,
    classes: ClassTally,
}

/// The three scores of a set of images against the test set.
pub struct Scores {
    pub fid: f64,
    pub histogram_entropy: f64,
    pub prediction_entropy: f64,
    pub samples: usize,
    pub test_images: usize,
    pub features: usize,
    pub classes: usize,
}

impl Scores {
    /// The lines `kiln eval` prints.
    pub fn print(&self, what: &str) {
        let Scores {
            samples,
            test_images,
            features,
            classes,
            ..
        } = self;
        println!(
            "classifier-feature FID: {:.4} ({features}-wide features of {samples} {what} vs {test_images} test images)",
            self.fid
        );
        println!(
            "class-histogram entropy: {:.4} nats (mode coverage; ln {classes} = {:.4} when every class comes equally often)",
            self.histogram_entropy,
            (*classes as f64).ln()
        );
        println!(
            "mean prediction entropy: {:.4} nats (sharpness; 0 when the classifier is certain of every image)",
            self.prediction_entropy
        );
    }
}

impl Judge {
    /// The classifier of `--classifier PATH` (a run directory or its checkpoint files).
    pub fn load(path: &Path, device: Device) -> Result<Judge> {
        let checkpoint = load_checkpoint(path).with_context(|| {
            format!(
                "--classifier {}: give the run directory of `kiln train classifier`",
                path.display()
            )
        })?;
        Judge::new(&checkpoint, device)
            .context("--classifier must name a run of `kiln train classifier`")
    }

    /// The classifier of a loaded checkpoint.
    pub fn new(checkpoint: &LoadedCheckpoint, device: Device) -> Result<Judge> {
        Ok(Judge {
            classifier: load_classifier(checkpoint, device)?,
            precision: checkpoint.precision()?,
            dataset: recorded_dataset(&checkpoint.state.training)?,
        })
    }

    /// Refuses to score a model trained on other images than the classifier.
    fn check_judges(&self, model: &str, trained_on: &LoadedCheckpoint) -> Result<()> {
        let dataset = recorded_dataset(&trained_on.state.training)?;
        if dataset == DatasetArg::Folder {
            bail!(
                "the {model} was trained on an image folder; the classifier scores only models of the labelled IDX sets (fashion-mnist, mnist)"
            );
        }
        if dataset != self.dataset {
            bail!(
                "the {model} was trained on {dataset} but the classifier on {}; score it with a classifier of the same data (kiln train classifier --dataset {dataset})",
                self.dataset
            );
        }
        Ok(())
    }

    /// Autocast as the classifier was trained, whatever scope the caller is
    /// in (a bf16 generator's must not leak into an f32 classifier).
    fn precision_scope(&self) -> (AutocastGuard, Option<AutocastGuard>) {
        (crate::autocast::suspend(), self.precision.autocast())
    }

    /// An empty tally of this classifier's outputs.
    fn tally(&self) -> Tally {
        let config = self.classifier.config();
        Tally {
            features: FeatureAccumulator::new(config.features),
            classes: ClassTally::new(config.classes),
        }
    }

    /// Adds the features and predictions of `images` [N, 1, 28, 28] in
    /// [0, 1] to `tally`, a batch at a time.
    fn add(&self, images: &Tensor, tally: &mut Tally) -> Result<()> {
        let _no_grad = no_grad();
        let _autocast = self.precision_scope();
        let count = images.dims()[0];
        for start in (0..count).step_by(BATCH) {
            let len = BATCH.min(count - start);
            let features = self.classifier.features(&images.narrow(0, start, len)?)?;
            let probabilities = self.classifier.probabilities(&features)?;
            tally
                .features
                .add(&features.to_dtype(DType::F32)?.to_vec::<f32>()?)?;
            tally.classes.add(&probabilities.to_vec::<f32>()?);
        }
        Ok(())
    }

    /// The first `limit` test images (all without it), as the classifier reads them.
    fn test_images(&self, data: Option<&Path>, limit: Option<usize>) -> Result<(Tensor, Tensor)> {
        let test = self.source(data).load_idx(Split::Test)?;
        let count = limit.map_or(test.count, |l| l.min(test.count));
        let indices: Vec<usize> = (0..count).collect();
        labelled_batch(&test, &indices)
    }

    /// The tally of the first `limit` test images.
    fn test_tally(&self, data: Option<&Path>, limit: Option<usize>) -> Result<Tally> {
        let (test, _) = self.test_images(data, limit)?;
        let mut tally = self.tally();
        self.add(&test, &mut tally)?;
        Ok(tally)
    }

    /// FID and entropies of the `generated` tally against the `test` one.
    fn scores(&self, generated: &Tally, test: &Tally) -> Result<Scores> {
        let config = self.classifier.config();
        let (samples, test_images) = (generated.features.count(), test.features.count());
        if samples < 2 || test_images < 2 {
            bail!(
                "the FID needs at least 2 images on each side, got {samples} samples and {test_images} test images"
            );
        }
        Ok(Scores {
            fid: frechet_distance(&generated.features.stats()?, &test.features.stats()?)?,
            histogram_entropy: generated.classes.histogram_entropy(),
            prediction_entropy: generated.classes.mean_prediction_entropy(),
            samples,
            test_images,
            features: config.features,
            classes: config.classes,
        })
    }

    /// Scores --n images drawn `BATCH` at a time by `draw(len)` (a progress
    /// bar counts them): memory does not grow with --n.
    fn score_drawn(
        &self,
        args: &EvalArgs,
        mut draw: impl FnMut(usize) -> Result<Tensor>,
    ) -> Result<Scores> {
        let n = sample_count(args)?;
        let test = self.test_tally(args.data.as_deref(), args.limit)?;
        let mut generated = self.tally();
        let progress = Progress::new(n, 0);
        for start in (0..n).step_by(BATCH) {
            let len = BATCH.min(n - start);
            self.add(&draw(len)?, &mut generated)?;
            progress.advance(len);
        }
        progress.finish();
        self.scores(&generated, &test)
    }
}

impl Judge {
    /// The classifier's dataset under the data directory `data`.
    fn source(&self, data: Option<&Path>) -> ImageSource {
        ImageSource {
            dataset: self.dataset,
            path: data_dir(data),
        }
    }
}

/// Checks --n: the FID's covariances need two samples.
fn sample_count(args: &EvalArgs) -> Result<usize> {
    if args.n < 2 {
        bail!("--n {}: the FID needs at least 2 samples", args.n);
    }
    Ok(args.n)
}

/// GAN images [N, 1, S, S] in [−1, 1] (S ≥ 28) → [N, 1, 28, 28] in [0, 1]:
/// the central crop (undoing the padding) mapped by y ↦ (y + 1)/2.
pub fn gan_to_classifier_images(images: &Tensor) -> Result<Tensor> {
    Ok(central_crop(images)?
        .add_scalar(1.0)?
        .mul_scalar(0.5)?
        .clamp(0.0, 1.0)?)
}

/// The central 28×28 of grey images [N, 1, S, S] with S ≥ 28, in f32.
fn central_crop(images: &Tensor) -> Result<Tensor> {
    let (channels, side) = match images.dims() {
        [_, c, h, w] if h == w => (*c, *h),
        _ => bail!(
            "expected square images [N, 1, S, S], got {}",
            images.shape()
        ),
    };
    if channels != 1 || side < IMAGE_SIZE {
        bail!(
            "the classifier reads grey images of at least {IMAGE_SIZE}x{IMAGE_SIZE}, got {channels} channel(s) of {side}x{side}"
        );
    }
    let border = (side - IMAGE_SIZE) / 2;
    Ok(images
        .to_dtype(DType::F32)?
        .narrow(2, border, IMAGE_SIZE)?
        .narrow(3, border, IMAGE_SIZE)?)
}

/// `kiln eval gan --classifier DIR`: the scores of --n generator samples.
/// `checkpoint` is the GAN's; `kiln eval` runs it without a graph, in its autocast scope.
pub fn eval_gan(args: &EvalArgs, checkpoint: &LoadedCheckpoint, device: Device) -> Result<()> {
    let Some(classifier) = &args.classifier else {
        bail!(
            "kiln eval gan needs --classifier DIR: a run of `kiln train classifier`, whose features score the samples"
        );
    };
    let generator = load_generator(checkpoint, device)?;
    let judge = Judge::load(classifier, device)?;
    judge.check_judges("GAN", checkpoint)?;
    // Noise as `kiln sample gan --seed` draws it, batch after batch.
    let mut rng = stream_rng(args.seed, Stream::Sampling, 0);
    judge
        .score_drawn(args, |len| {
            let z = Tensor::randn([len, generator.nz(), 1, 1], DType::F32, device, &mut rng)?;
            gan_to_classifier_images(&generator.forward(&z)?)
        })?
        .print("generated images");
    Ok(())
}

/// `kiln eval vae --classifier DIR`: the scores of --n images decoded from
/// prior samples z ~ N(0, I) (Bernoulli probabilities, as `kiln sample vae`).
pub fn eval_vae_samples(
    args: &EvalArgs,
    checkpoint: &LoadedCheckpoint,
    vae: &Vae,
    spec: &VaeSpec,
    device: Device,
) -> Result<()> {
    let Some(classifier) = &args.classifier else {
        return Ok(());
    };
    let judge = Judge::load(classifier, device)?;
    judge.check_judges("VAE", checkpoint)?;
    let mut rng = stream_rng(args.seed, Stream::Sampling, 0);
    judge
        .score_drawn(args, |len| {
            let latents = Tensor::randn([len, vae.config().latent], DType::F32, device, &mut rng)?;
            central_crop(&vae_images(vae, spec, &latents)?)
        })?
        .print("decoded prior samples");
    Ok(())
}

/// `kiln eval classifier`: test accuracy, then the scores of --n random
/// training images against the test set, the floor a perfect generator of
/// the classifier's dataset would reach with as many samples.
pub fn eval_classifier(
    args: &EvalArgs,
    checkpoint: &LoadedCheckpoint,
    device: Device,
) -> Result<()> {
    if args.classifier.is_some() {
        bail!(
            "--classifier scores the samples of gan and vae; `kiln eval classifier` takes the classifier as --checkpoint"
        );
    }
    let n = sample_count(args)?;
    let judge = Judge::new(checkpoint, device)?;
    let (test, labels) = judge.test_images(args.data.as_deref(), args.limit)?;
    let count = labels.dims()[0];
    let mut correct = 0;
    {
        let _no_grad = no_grad();
        let _autocast = judge.precision_scope();
        for start in (0..count).step_by(BATCH) {
            let len = BATCH.min(count - start);
            let logits = judge.classifier.forward(&test.narrow(0, start, len)?)?;
            correct += correct_predictions(&logits, &labels.narrow(0, start, len)?)?;
        }
    }
    println!(
        "test accuracy: {:.2}% ({correct} of {count} test images)",
        100.0 * correct as f64 / count as f64
    );
    let train = judge.source(args.data.as_deref()).load_idx(Split::Train)?;
    let mut rng = stream_rng(args.seed, Stream::Eval, 0);
    let mut order = permutation(train.count, &mut rng);
    order.truncate(n);
    let (real, _) = labelled_batch(&train, &order)?;
    let (mut real_tally, mut test_tally) = (judge.tally(), judge.tally());
    judge.add(&real, &mut real_tally)?;
    judge.add(&test, &mut test_tally)?;
    judge
        .scores(&real_tally, &test_tally)?
        .print("training images (the floor)");
    Ok(())
}
