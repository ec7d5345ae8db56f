//! `kiln eval vae|gpt|gan|classifier`: held-out scores of a trained model.
//!
//! - VAE: the negative ELBO per image (nats), averaged over the test set of
//!   its dataset (10,000 images, or the first --limit; for a VAE of an image
//!   folder, the folder given as --data), with one eps per
//!   image drawn from a generator seeded by --seed: an upper bound on
//!   −log p(x).
//! - GPT: the mean cross-entropy (nats per character) of --batches random
//!   windows batches of the validation text (the last 10%), each of the
//!   training batch size and block size, their offsets drawn from a
//!   generator seeded by --seed, as nanoGPT's `estimate_loss`; with --full,
//!   the mean over every consecutive window of the whole split instead.
//! - GAN, and VAE with --classifier: the classifier-feature FID and the two
//!   entropies of --n samples (see `quality`).
//! - Classifier: the test accuracy and the same scores of --n real
//!   training images, the floor of the generators' scores.

use anyhow::{Context, Result, bail};

use super::args::{DatasetArg, EvalArgs, EvalModelKind};
use super::datasets::{ImageSource, data_dir};
use super::quality;
use super::run_dir::load_checkpoint;
use super::seeds::{Stream, stream_rng};
use super::specs::{load_gpt, load_vae, text_path};
use super::train::vae_batch;
use crate::data::idx::Split;
use crate::data::text::{load_text, random_batch};
use crate::no_grad;

/// Test images scored per forward pass.
const VAE_EVAL_BATCH: usize = 500;

pub fn run(args: &EvalArgs) -> Result<()> {
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if args.classifier.is_some() && args.model == EvalModelKind::Gpt {
        bail!("--classifier scores images: use it with `kiln eval gan` or `kiln eval vae`");
    }
    let device = super::device(args.device)?;
    let checkpoint = load_checkpoint(&args.checkpoint)?;
    let mut rng = stream_rng(args.seed, Stream::Eval, 0);
    let _no_grad = no_grad();
    let _autocast = super::checkpoint_autocast(&checkpoint)?;
    match args.model {
        EvalModelKind::Vae => {
            let (vae, spec) = load_vae(&checkpoint, device)?;
            let source = ImageSource::of_run(&checkpoint.state.training, args.data.as_deref())?;
            let test = source.load(Split::Test, spec.image_size, spec.channels)?;
            let count = args.limit.map_or(test.count, |l| l.min(test.count));
            let mut total = 0.0;
            for start in (0..count).step_by(VAE_EVAL_BATCH) {
                let indices: Vec<usize> = (start..(start + VAE_EVAL_BATCH).min(count)).collect();
                let x = vae_batch(&spec, &test, &indices, device)?;
                // The loss is a mean over the batch; weight it by the batch's size.
                total += vae.loss(&x, &mut rng)?.total.item()? * indices.len() as f64;
            }
            // A folder is a set of held-out images the user chose, not a test split.
            let images = match source.dataset {
                DatasetArg::Folder => "held-out images",
                _ => "test images",
            };
            println!(
                "test negative ELBO: {:.4} nats per image (mean over {count} {images})",
                total / count as f64
            );
            quality::eval_vae_samples(args, &checkpoint, &vae, &spec, device)?;
        }
        EvalModelKind::Gan => quality::eval_gan(args, &checkpoint, device)?,
        EvalModelKind::Classifier => quality::eval_classifier(args, &checkpoint, device)?,
        EvalModelKind::Gpt => {
            if args.batches == 0 {
                bail!("--batches must be at least 1");
            }
            let (gpt, _) = load_gpt(&checkpoint, device)?;
            let path = text_path(&data_dir(args.data.as_deref()));
            let text =
                load_text(&path).with_context(|| format!("loading the text {}", path.display()))?;
            let saved_vocab = checkpoint.state.vocab.as_deref().unwrap_or_default();
            if text.vocab.to_string_repr() != saved_vocab {
                bail!(
                    "{} has another vocabulary than the checkpoint's; evaluate on the text it was trained on",
                    path.display()
                );
            }
            let mut val = text.val;
            if let Some(limit) = args.limit {
                val.truncate(limit);
            }
            let block = gpt.config().block_size;
            let batch = checkpoint.state.training.batch_size;
            if val.len() <= block {
                bail!(
                    "{} validation characters are too few for the model's block size {block}",
                    val.len()
                );
            }
            if args.full {
                let (loss, windows) = full_split_loss(&gpt, &val, block, device)?;
                println!(
                    "validation loss: {loss:.4} nats per character (all {windows} consecutive windows of {block} in the split)"
                );
                return Ok(());
            }
            let mut total = 0.0;
            for _ in 0..args.batches {
                let (x, y) = random_batch(&val, batch, block, &mut rng)?;
                total += gpt
                    .loss(&x.to_device(device)?, &y.to_device(device)?)?
                    .item()?;
            }
            println!(
                "validation loss: {:.4} nats per character (mean over {} random batches of {batch}x{block})",
                total / args.batches as f64,
                args.batches
            );
        }
    }
    Ok(())
}

/// Windows scored per forward pass by `--full`.
const FULL_EVAL_BATCH: usize = 64;

/// Mean cross-entropy over every consecutive, non-overlapping window of
/// `block` characters of `tokens` (each predicting its next characters), and
/// the number of windows: the whole split, with no sampling noise.
fn full_split_loss(
    gpt: &crate::models::gpt::Gpt,
    tokens: &[u32],
    block: usize,
    device: crate::Device,
) -> Result<(f64, usize)> {
    let windows = (tokens.len() - 1) / block;
    let mut total = 0.0;
    for first in (0..windows).step_by(FULL_EVAL_BATCH) {
        let count = FULL_EVAL_BATCH.min(windows - first);
        let mut x = Vec::with_capacity(count * block);
        let mut y = Vec::with_capacity(count * block);
        for w in first..first + count {
            let start = w * block;
            x.extend_from_slice(&tokens[start..start + block]);
            y.extend_from_slice(&tokens[start + 1..start + block + 1]);
        }
        let x = crate::Tensor::from_indices(x, [count, block])?.to_device(device)?;
        let y = crate::Tensor::from_indices(y, [count, block])?.to_device(device)?;
        // Gpt::loss is a mean over the batch: weight it by its window count.
        total += gpt.loss(&x, &y)?.item()? * count as f64;
    }
    Ok((total / windows as f64, windows))
}
