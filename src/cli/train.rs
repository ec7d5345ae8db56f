//! `kiln train gan|vae|gpt|classifier`: the training loop and the machinery
//! every model shares (settings, resuming, checkpoints, metrics, progress,
//! the epochs over an image set); each model's step, data and checkpoint
//! contents live in its own module (`train/gan.rs`, `vae.rs`, `gpt.rs`,
//! `classifier.rs`), behind the `Trainee` trait.
//!
//! Reproducibility: every random draw of step k comes from a generator
//! seeded with (seed, k) (see `seeds`), the order of the images in epoch e
//! is a permutation seeded with (seed, e), and a checkpoint holds the models,
//! their BatchNorm statistics and the optimizers' moments. A run resumed
//! from step k on the CPU therefore continues bit-identically to one that
//! never stopped; the GPT's dropout masks too, since each step restarts
//! their stream at the step's number.

use std::fmt::Display;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::args::{GptInitArg, ModelKind, PrecisionArg, TrainArgs};
use super::datasets::ImageSource;
use super::progress::Progress;
use super::run_dir::{
    self, LOSS_CHART_FILE, LoadedCheckpoint, METRICS_FILE, MetricsLog, RunState, STATE_FORMAT,
    TrainingConfig, WEIGHTS_FILE, prefixed,
};
use super::seeds::{Stream, permutation, stream_rng};
use super::specs;
use super::step_profile::StepProfiler;
use crate::data::idx::{ImageSet, Split};
use crate::data::image::save_line_chart_png;
use crate::nn::Module;
use crate::optim::{ForwardCopies, Optimizer};
use crate::{MixedPrecision, Precision, Rng, Tensor};

mod classifier;
mod gan;
mod gpt;
mod vae;

pub use classifier::labelled_batch;
pub use gpt::gpt_learning_rate;
pub use vae::{vae_batch, vae_images};

/// Images in samples.png (an 8×8 grid).
const SAMPLE_GRID: usize = 8;

/// The checkpoint prefix of the loss scaler's state (f16 runs).
const GRAD_SCALER: &str = "grad_scaler";

/// Steps of a GPT run without --steps.
const DEFAULT_GPT_STEPS: usize = 2000;

/// One model's training: what the shared loop needs to know about it.
trait Trainee {
    /// Names of the values `train_step` returns (metrics.csv columns).
    fn metric_names(&self) -> &'static [&'static str];
    /// One optimisation step (global step `step`, 0-based) drawing its
    /// randomness from `rng`; returns the metrics, the first being the loss
    /// that must stay finite.
    fn train_step(
        &mut self,
        step: usize,
        rng: &mut Rng,
        amp: &mut MixedPrecision,
    ) -> Result<Vec<f64>>;
    /// How the run's steps relate to its examples and epochs.
    fn length(&self) -> &dyn RunLength;
    /// Models and optimizer state, by checkpoint name.
    fn checkpoint_tensors(&self) -> Vec<(String, Tensor)>;
    /// Restores what `checkpoint_tensors` saved.
    fn restore(&mut self, checkpoint: &LoadedCheckpoint) -> Result<()>;
    /// Every optimizer of the run.
    fn optimizers(&mut self) -> Vec<&mut dyn Optimizer>;
    /// Writes the pictures refreshed at each checkpoint (besides loss.png).
    fn save_pictures(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
}

/// How long a run is, in steps, examples and epochs.
trait RunLength {
    /// Examples (images or text windows) in step `step`.
    fn examples_in_step(&self, step: usize) -> usize;
    /// Training examples used (images, or characters of text).
    fn examples(&self) -> usize;
    /// Steps the whole run takes.
    fn total_steps(&self, settings: &Settings) -> usize;
    /// Completed epochs after `steps` steps.
    fn epochs_after(&self, steps: usize) -> usize;
}

/// The settings of a run, from the flags, the model's defaults, or (when
/// resuming) the checkpoint.
struct Settings {
    seed: u64,
    batch_size: usize,
    lr: f64,
    limit: Option<usize>,
    epochs: Option<usize>,
    max_steps: Option<usize>,
    warmup: usize,
    lr_decay_steps: Option<usize>,
    grad_clip: f64,
    weight_decay: f64,
    beta2: f64,
    gpt_init: GptInitArg,
    precision: Precision,
    stochastic_rounding: bool,
    /// The images of gan, vae and classifier (None for gpt).
    images: Option<ImageSource>,
}

/// A flag's value: the one typed (which must match the resumed run's), the
/// resumed run's, or the default.
pub(super) fn setting<T: PartialEq + Display + Copy>(
    flag: &str,
    given: Option<T>,
    saved: Option<T>,
    default: T,
) -> Result<T> {
    match (given, saved) {
        (Some(given), Some(saved)) if given != saved => bail!(
            "--{flag} {given} differs from the resumed run's {saved}; a resumed run keeps its settings (drop --{flag}, or train into a new --out)"
        ),
        (Some(given), _) => Ok(given),
        (None, Some(saved)) => Ok(saved),
        (None, None) => Ok(default),
    }
}

/// Like `setting` for a value that may be absent (no default).
fn optional_setting<T: PartialEq + Display + Copy>(
    flag: &str,
    given: Option<T>,
    saved: Option<Option<T>>,
) -> Result<Option<T>> {
    match (given, saved) {
        (Some(given), Some(Some(saved))) if given != saved => bail!(
            "--{flag} {given} differs from the resumed run's {saved}; a resumed run keeps its settings (drop --{flag}, or train into a new --out)"
        ),
        (Some(given), Some(None)) => bail!(
            "--{flag} {given} was not set in the resumed run; a resumed run keeps its settings (drop --{flag}, or train into a new --out)"
        ),
        (Some(given), _) => Ok(Some(given)),
        (None, Some(saved)) => Ok(saved),
        (None, None) => Ok(None),
    }
}

impl Settings {
    /// The 16-bit weight copies the optimizers keep for the forward pass:
    /// the precision's own (rounded to nearest even: training is unchanged,
    /// only the per-step conversions go) or, on request, stochastic ones.
    fn forward_copies(&self) -> Option<ForwardCopies> {
        if self.stochastic_rounding {
            Some(ForwardCopies::stochastic_bf16(self.seed))
        } else {
            self.precision.forward_copies()
        }
    }

    fn resolve(args: &TrainArgs, resumed: Option<&RunState>) -> Result<Settings> {
        let kind = args.model;
        let saved = resumed.map(|s| &s.training);
        let (batch_size, lr) = match kind {
            ModelKind::Gan => (64, 2e-4),
            ModelKind::Vae => (128, 1e-3),
            ModelKind::Gpt => (12, 1e-3),
            ModelKind::Classifier => (128, 1e-3),
        };
        let settings = Settings {
            seed: setting("seed", args.seed, resumed.map(|s| s.seed), 0)?,
            batch_size: setting(
                "batch-size",
                args.batch_size,
                saved.map(|t| t.batch_size),
                batch_size,
            )?,
            lr: setting("lr", args.lr, saved.map(|t| t.lr), lr)?,
            limit: optional_setting("limit", args.limit, saved.map(|t| t.limit))?,
            // The length of a run may change when it is resumed.
            epochs: args.epochs.or(saved.and_then(|t| t.epochs)).or(match kind {
                ModelKind::Gan => Some(5),
                ModelKind::Vae => Some(10),
                ModelKind::Gpt => None,
                ModelKind::Classifier => Some(3),
            }),
            max_steps: args.steps.or(saved.and_then(|t| t.max_steps)),
            warmup: setting("warmup", args.gpt.warmup, saved.and_then(|t| t.warmup), 0)?,
            // A constant rate for new runs; a resumed run keeps its own (one
            // saved without any decayed over all its steps).
            lr_decay_steps: optional_setting(
                "lr-decay-steps",
                args.gpt.lr_decay_steps,
                saved.map(|t| t.lr_decay_steps),
            )?
            .or(resumed.is_none().then_some(0)),
            grad_clip: setting(
                "grad-clip",
                args.gpt.grad_clip,
                saved.and_then(|t| t.grad_clip),
                crate::models::gpt::DEFAULT_GRAD_CLIP,
            )?,
            weight_decay: setting(
                "weight-decay",
                args.gpt.weight_decay,
                saved.and_then(|t| t.weight_decay),
                crate::models::gpt::DEFAULT_WEIGHT_DECAY,
            )?,
            precision: setting(
                "precision",
                args.precision.map(PrecisionArg::precision),
                saved.map(TrainingConfig::precision).transpose()?,
                Precision::F32,
            )?,
            // Runs saved before these were recorded used 0.99 and GPT-2's init.
            beta2: setting(
                "beta2",
                args.gpt.beta2,
                saved.map(|t| t.beta2.unwrap_or(0.99)),
                crate::models::gpt::DEFAULT_BETA2,
            )?,
            gpt_init: setting(
                "init",
                args.gpt.init,
                saved.map(|t| match t.init.as_deref() {
                    Some("pytorch") => GptInitArg::Pytorch,
                    _ => GptInitArg::Gpt2,
                }),
                GptInitArg::Pytorch,
            )?,
            stochastic_rounding: setting(
                "stochastic-rounding",
                args.stochastic_rounding.then_some(true),
                saved.map(|t| t.stochastic_rounding.unwrap_or(false)),
                false,
            )?,
            images: match kind {
                ModelKind::Gpt => None,
                _ => Some(ImageSource::for_training(args, saved)?),
            },
        };
        let image_flags = &args.images;
        let image_flag_given = image_flags.dataset.is_some()
            || image_flags.image_size.is_some()
            || image_flags.channels.is_some();
        if kind == ModelKind::Gpt && image_flag_given {
            bail!(
                "--dataset, --image-size and --channels choose the images of gan, vae and classifier; kiln train gpt reads the text in --data"
            );
        }
        if kind == ModelKind::Classifier
            && (image_flags.image_size.is_some() || image_flags.channels.is_some())
        {
            bail!(
                "the classifier reads the 28x28 grey images of an IDX set as they are; --image-size and --channels are for gan and vae"
            );
        }
        if !(0.0..1.0).contains(&settings.beta2) {
            bail!("--beta2 must lie in [0, 1), got {}", settings.beta2);
        }
        if settings.stochastic_rounding && settings.precision != Precision::BF16 {
            bail!(
                "--stochastic-rounding rounds the bf16 copies of the weights; it needs --precision bf16 (the run trains in {})",
                settings.precision
            );
        }
        if settings.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if !(settings.lr.is_finite() && settings.lr > 0.0) {
            bail!("--lr must be a positive number, got {}", settings.lr);
        }
        if settings.limit == Some(0) {
            bail!("--limit must be at least 1");
        }
        if settings.epochs == Some(0) || settings.max_steps == Some(0) {
            bail!("--epochs and --steps must be at least 1");
        }
        if kind == ModelKind::Gpt && args.epochs.is_some() {
            bail!("kiln train gpt counts --steps (random windows of the text), not --epochs");
        }
        Ok(settings)
    }
}

/// `kiln train MODEL ...`
pub fn run(args: &TrainArgs) -> Result<()> {
    let kind = args.model;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(kind.name()));
    if args.checkpoint_every == 0 {
        bail!("--checkpoint-every must be at least 1");
    }
    let resumed = if args.resume {
        if !out.join(WEIGHTS_FILE).exists() {
            bail!(
                "--resume: {} holds no checkpoint ({WEIGHTS_FILE} is missing); start the run without --resume",
                out.display()
            );
        }
        let checkpoint = run_dir::load_checkpoint(&out)?;
        checkpoint.expect_model(kind.name())?;
        Some(checkpoint)
    } else {
        if run_dir::has_checkpoint(&out) {
            bail!(
                "{} already holds a checkpoint; pass --resume to continue it, or choose another --out (nothing was changed)",
                out.display()
            );
        }
        None
    };
    let state = resumed.as_ref().map(|c| &c.state);
    let settings = Settings::resolve(args, state)?;
    let device = super::device(args.device)?;
    let mut amp = MixedPrecision::new(settings.precision);

    let (mut trainee, config, vocab): (Box<dyn Trainee>, serde_json::Value, Option<String>) =
        match kind {
            ModelKind::Gan => {
                let (trainee, spec) = gan::GanTrainee::new(args, &settings, state, device)?;
                (Box::new(trainee), serde_json::to_value(spec)?, None)
            }
            ModelKind::Vae => {
                let (trainee, spec) = vae::VaeTrainee::new(args, &settings, state, device)?;
                (Box::new(trainee), serde_json::to_value(spec)?, None)
            }
            ModelKind::Gpt => {
                let (trainee, spec, vocab) = gpt::GptTrainee::new(args, &settings, state, device)?;
                (Box::new(trainee), serde_json::to_value(spec)?, Some(vocab))
            }
            ModelKind::Classifier => {
                let (trainee, spec) =
                    classifier::ClassifierTrainee::new(args, &settings, state, device)?;
                (Box::new(trainee), serde_json::to_value(spec)?, None)
            }
        };
    for optimizer in trainee.optimizers() {
        optimizer.keep_forward_copies(settings.forward_copies())?;
    }
    let examples = trainee.length().examples();
    if let Some(state) = state
        && state.training.examples != examples
    {
        bail!(
            "the data gives {examples} training examples but the resumed run used {}; resume with the same data and --limit",
            state.training.examples
        );
    }
    let total_steps = trainee.length().total_steps(&settings);
    let start_step = state.map_or(0, |s| s.step);
    if let Some(checkpoint) = &resumed {
        trainee.restore(checkpoint)?;
        amp.scaler
            .load_state_dict(&checkpoint.group(GRAD_SCALER))
            .with_context(|| {
                format!(
                    "{}: cannot restore the loss scaler",
                    checkpoint.weights_path.display()
                )
            })?;
    }
    if start_step >= total_steps {
        println!(
            "{}: already trained for {start_step} steps (the run asks for {total_steps}); raise --steps or --epochs to train further",
            out.display()
        );
        return Ok(());
    }

    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    run_dir::remove_stale_temporaries(&out);
    let mut columns = vec!["step", "epoch"];
    columns.extend_from_slice(trainee.metric_names());
    columns.push("samples_per_s");
    let mut metrics = MetricsLog::open(
        &out.join(METRICS_FILE),
        &columns,
        resumed.as_ref().map(|_| start_step),
    )?;

    let (dataset, image_folder) = settings
        .images
        .as_ref()
        .map_or((None, None), ImageSource::record);
    let training = TrainingConfig {
        batch_size: settings.batch_size,
        lr: settings.lr,
        examples,
        limit: settings.limit,
        total_steps,
        epochs: settings.epochs,
        max_steps: settings.max_steps,
        warmup: (kind == ModelKind::Gpt).then_some(settings.warmup),
        lr_decay_steps: settings.lr_decay_steps,
        grad_clip: (kind == ModelKind::Gpt).then_some(settings.grad_clip),
        weight_decay: (kind == ModelKind::Gpt).then_some(settings.weight_decay),
        beta2: (kind == ModelKind::Gpt).then_some(settings.beta2),
        init: (kind == ModelKind::Gpt).then(|| settings.gpt_init.name().to_string()),
        precision: Some(settings.precision.name().to_string()),
        stochastic_rounding: settings.stochastic_rounding.then_some(true),
        dataset,
        image_folder,
    };
    let run_state = |step: usize, epoch: usize| RunState {
        format: STATE_FORMAT,
        model: kind.name().to_string(),
        config: config.clone(),
        training: training.clone(),
        step,
        epoch,
        seed: settings.seed,
        vocab: vocab.clone(),
        weights: WEIGHTS_FILE.to_string(),
    };

    println!(
        "training {} on {} in {}: steps {start_step}..{total_steps}, {examples} examples, batch {}, lr {}, into {}",
        kind.name(),
        super::device_label(device),
        settings.precision,
        settings.batch_size,
        settings.lr,
        out.display()
    );
    if args.profile == Some(0) {
        bail!("--profile needs at least 1 step to profile");
    }
    let mut profiler = args
        .profile
        .map(|steps| StepProfiler::new(steps, start_step, total_steps, device));
    let progress = Progress::new(total_steps, start_step);
    let epochs_total = trainee.length().epochs_after(total_steps.saturating_sub(1)) + 1;
    let mut last_checkpoint = start_step;
    for step in start_step..total_steps {
        let epoch = trainee.length().epochs_after(step);
        let mut rng = stream_rng(settings.seed, Stream::Step, step as u64);
        let started = Instant::now();
        let mut train_step = || trainee.train_step(step, &mut rng, &mut amp);
        let values = match &mut profiler {
            Some(profiler) => profiler.run(step, train_step)?,
            None => train_step()?,
        };
        let samples_per_s =
            trainee.length().examples_in_step(step) as f64 / started.elapsed().as_secs_f64();
        if !values[0].is_finite() {
            bail!(
                "the {} became {} at step {}; the checkpoint in {} (step {last_checkpoint}) is unchanged; try a lower --lr",
                trainee.metric_names()[0],
                values[0],
                step + 1,
                out.display()
            );
        }
        let mut row = vec![(step + 1) as f64, epoch as f64];
        row.extend_from_slice(&values);
        row.push(samples_per_s);
        metrics.append(row)?;

        let shown: Vec<String> = trainee
            .metric_names()
            .iter()
            .zip(&values)
            .map(|(name, value)| format!("{name} {value:.4}"))
            .collect();
        progress.update(
            step + 1,
            format!(
                "epoch {}/{epochs_total} {} {samples_per_s:.0} samples/s",
                epoch + 1,
                shown.join(" ")
            ),
        );

        let done = step + 1;
        if done % args.checkpoint_every == 0 || done == total_steps {
            let state = run_state(done, trainee.length().epochs_after(done));
            let mut tensors = trainee.checkpoint_tensors();
            tensors.extend(prefixed(GRAD_SCALER, amp.scaler.state_dict()));
            run_dir::save_checkpoint(&out, &state, &tensors)?;
            last_checkpoint = done;
            save_loss_chart(&out, kind, trainee.metric_names(), &metrics)?;
            {
                // Pictures come from the model as it runs: in its precision.
                let _autocast = amp.autocast();
                trainee.save_pictures(&out)?;
            }
            progress.println(&format!(
                "step {done}/{total_steps} epoch {} {}: saved {}",
                epoch + 1,
                shown.join(" "),
                out.join(WEIGHTS_FILE).display()
            ));
        }
    }
    progress.finish();
    if let Some(profiler) = &mut profiler {
        let what = format!("kiln train {} ({})", kind.name(), settings.precision);
        profiler.finish(&what, &out)?;
    }
    Ok(())
}

/// loss.png: the loss columns of metrics.csv against the step.
fn save_loss_chart(
    out: &Path,
    kind: ModelKind,
    names: &[&str],
    metrics: &MetricsLog,
) -> Result<()> {
    let losses: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.starts_with("loss"))
        .collect();
    let series: Vec<(&str, Vec<(f64, f64)>)> =
        losses.iter().map(|&n| (n, metrics.series(n))).collect();
    let borrowed: Vec<(&str, &[(f64, f64)])> =
        series.iter().map(|(n, s)| (*n, s.as_slice())).collect();
    save_line_chart_png(
        &out.join(LOSS_CHART_FILE),
        &format!("{} training loss", kind.name()),
        &borrowed,
    )?;
    Ok(())
}

impl Settings {
    fn image_source(&self) -> Result<&ImageSource> {
        self.images.as_ref().context("this model reads no images")
    }

    /// The training images of an image model, `size × size` with `channels`.
    fn training_images(&self, size: usize, channels: usize) -> Result<ImageSet> {
        self.image_source()?.load(Split::Train, size, channels)
    }

    /// The labelled training split of an IDX set (the classifier's data).
    fn labelled_training_images(&self) -> Result<ImageSet> {
        self.image_source()?.load_idx(Split::Train)
    }
}

/// Global step → (epoch, batch in epoch) for a shuffled pass over `examples`
/// images in batches of `batch_size` (the last batch of an epoch may be
/// smaller, as PyTorch's DataLoader without drop_last).
struct EpochSchedule {
    seed: u64,
    examples: usize,
    batch_size: usize,
    /// The permutation of the epoch last asked for.
    order: Option<(usize, Vec<usize>)>,
}

impl EpochSchedule {
    /// The run's epochs over `count` images (or the first --limit of them).
    fn over(settings: &Settings, count: usize) -> EpochSchedule {
        EpochSchedule {
            seed: settings.seed,
            examples: settings.limit.map_or(count, |l| l.min(count)),
            batch_size: settings.batch_size,
            order: None,
        }
    }

    fn steps_per_epoch(&self) -> usize {
        self.examples.div_ceil(self.batch_size)
    }

    /// Images in global step `step`.
    fn batch_len(&self, step: usize) -> usize {
        let start = (step % self.steps_per_epoch()) * self.batch_size;
        self.batch_size.min(self.examples - start)
    }

    /// The image indices of global step `step`.
    fn batch(&mut self, step: usize) -> &[usize] {
        let per_epoch = self.steps_per_epoch();
        let (epoch, index) = (step / per_epoch, step % per_epoch);
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut rng = stream_rng(self.seed, Stream::EpochOrder, epoch as u64);
            self.order = Some((epoch, permutation(self.examples, &mut rng)));
        }
        let order = &self.order.as_ref().expect("just filled").1;
        let start = index * self.batch_size;
        &order[start..(start + self.batch_size).min(self.examples)]
    }
}

/// Image runs: --epochs passes over the images, capped by --steps.
impl RunLength for EpochSchedule {
    fn examples_in_step(&self, step: usize) -> usize {
        self.batch_len(step)
    }

    fn examples(&self) -> usize {
        self.examples
    }

    fn total_steps(&self, settings: &Settings) -> usize {
        let by_epochs = settings.epochs.unwrap_or(1) * self.steps_per_epoch();
        settings
            .max_steps
            .map_or(by_epochs, |cap| cap.min(by_epochs))
    }

    fn epochs_after(&self, steps: usize) -> usize {
        steps / self.steps_per_epoch()
    }
}

/// The sizes of a model: a flag (checked against a resumed run) or the default.
fn size(flag: &str, given: Option<usize>, saved: Option<usize>, default: usize) -> Result<usize> {
    setting(flag, given, saved, default)
}

/// The side and channels of an image model's images (`--image-size`,
/// `--channels`): typed (and checked against a resumed run), the resumed
/// run's, or the model's `default`.
fn image_geometry(
    args: &TrainArgs,
    saved: Option<(usize, usize)>,
    default: (usize, usize),
) -> Result<(usize, usize)> {
    let images = &args.images;
    Ok((
        size(
            "image-size",
            images.image_size,
            saved.map(|s| s.0),
            default.0,
        )?,
        size("channels", images.channels, saved.map(|s| s.1), default.1)?,
    ))
}

/// The value of a rank-0 tensor (a loss), for the metrics.
fn scalar(tensor: &Tensor) -> Result<f64> {
    Ok(tensor.item()?)
}

/// The checkpoint tensors of a run of one model and one optimizer:
/// "model.*" and "optim.*".
fn model_and_optimizer_tensors(
    model: &dyn Module,
    optimizer: &dyn Optimizer,
) -> Vec<(String, Tensor)> {
    let mut tensors = prefixed("model", model.state_dict());
    tensors.extend(prefixed("optim", optimizer.state_dict()));
    tensors
}

/// Restores what [`model_and_optimizer_tensors`] saved.
fn restore_model_and_optimizer(
    model: &dyn Module,
    optimizer: &mut dyn Optimizer,
    checkpoint: &LoadedCheckpoint,
) -> Result<()> {
    specs::load_into(model, checkpoint, "model")?;
    restore_optimizer(optimizer, checkpoint, "optim")
}

fn restore_optimizer(
    optimizer: &mut dyn Optimizer,
    checkpoint: &LoadedCheckpoint,
    prefix: &str,
) -> Result<()> {
    optimizer
        .load_state_dict(&checkpoint.group(prefix))
        .with_context(|| {
            format!(
                "{}: cannot restore the {prefix} optimizer state",
                checkpoint.weights_path.display()
            )
        })
}
