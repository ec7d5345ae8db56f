//! `kiln train gpt`: the character GPT on random windows of the text, with
//! its learning-rate schedule, AdamW groups and gradient clipping.

use anyhow::{Context, Result, bail};

use super::{
    DEFAULT_GPT_STEPS, RunLength, Settings, Trainee, restore_optimizer, scalar, setting, size,
};
use crate::cli::args::TrainArgs;
use crate::cli::budget::check_training_fits;
use crate::cli::datasets;
use crate::cli::run_dir::{LoadedCheckpoint, RunState, prefixed};
use crate::cli::specs::{self, GptSpec, build_gpt_with_init, text_path};
use crate::data::text::{load_text, random_batch};
use crate::models::gpt::{self, Gpt, GptOptimizers};
use crate::nn::Module;
use crate::optim::Optimizer;
use crate::{Device, MixedPrecision, Rng, Tensor};

pub(super) struct GptTrainee {
    gpt: Gpt,
    optimizers: GptOptimizers,
    train: Vec<u32>,
    batch_size: usize,
    block_size: usize,
    device: Device,
    lr: f64,
    warmup: usize,
    lr_decay_steps: usize,
    grad_clip: f64,
}

/// nanoGPT's schedule: linear warm-up over `warmup` steps, then a cosine
/// from `lr` down to lr/10 at step `decay_steps`, then lr/10; with
/// `decay_steps` 0, `lr` from the end of the warm-up on (kiln's default: at
/// 2000 steps the 4-layer model ends at 1.7960 with a constant 1e-3 and at
/// 1.8275 decayed to 1e-4, with PyTorch's initialisation and β₂ = 0.999).
pub fn gpt_learning_rate(step: usize, lr: f64, warmup: usize, decay_steps: usize) -> f64 {
    let min_lr = lr / 10.0;
    if step < warmup {
        return lr * (step + 1) as f64 / (warmup + 1) as f64;
    }
    if decay_steps == 0 {
        return lr;
    }
    if step >= decay_steps {
        return min_lr;
    }
    let progress = (step - warmup) as f64 / (decay_steps - warmup).max(1) as f64;
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    min_lr + cosine * (lr - min_lr)
}

impl GptTrainee {
    pub(super) fn new(
        args: &TrainArgs,
        settings: &Settings,
        resumed: Option<&RunState>,
        device: Device,
    ) -> Result<(Self, GptSpec, String)> {
        let path = text_path(&datasets::data_dir(args.data.as_deref()));
        let text =
            load_text(&path).with_context(|| format!("loading the text {}", path.display()))?;
        let vocab = text.vocab.to_string_repr();
        if let Some(state) = resumed
            && state.vocab.as_deref() != Some(vocab.as_str())
        {
            bail!(
                "{} has another vocabulary than the resumed run's; resume with the same text",
                path.display()
            );
        }
        let saved: Option<GptSpec> = resumed.map(specs::spec).transpose()?;
        let saved = saved.as_ref();
        let spec = GptSpec {
            vocab_size: text.vocab.len(),
            n_layer: size("n-layer", args.gpt.n_layer, saved.map(|s| s.n_layer), 4)?,
            n_head: size("n-head", args.gpt.n_head, saved.map(|s| s.n_head), 4)?,
            n_embd: size("n-embd", args.gpt.n_embd, saved.map(|s| s.n_embd), 128)?,
            block_size: size(
                "block-size",
                args.gpt.block_size,
                saved.map(|s| s.block_size),
                64,
            )?,
            dropout: setting("dropout", args.gpt.dropout, saved.map(|s| s.dropout), 0.0)?,
        };
        let mut train = text.train;
        if let Some(limit) = settings.limit {
            train.truncate(limit);
        }
        if train.len() <= spec.block_size {
            bail!(
                "{} training characters are too few for --block-size {} (one more is needed for the target)",
                train.len(),
                spec.block_size
            );
        }
        check_training_fits("training the GPT", spec.parameter_count())?;
        let gpt = build_gpt_with_init(&spec, settings.gpt_init.scheme(), settings.seed, device)?;
        let optimizers =
            GptOptimizers::new(&gpt, settings.lr, settings.weight_decay, settings.beta2)?;
        let steps = settings.max_steps.unwrap_or(DEFAULT_GPT_STEPS);
        let trainee = GptTrainee {
            gpt,
            optimizers,
            train,
            batch_size: settings.batch_size,
            block_size: spec.block_size,
            device,
            lr: settings.lr,
            warmup: settings.warmup,
            lr_decay_steps: settings.lr_decay_steps.unwrap_or(steps),
            grad_clip: settings.grad_clip,
        };
        Ok((trainee, spec, vocab))
    }
}

/// Text runs count steps (--steps); an epoch is one pass of characters.
impl RunLength for GptTrainee {
    fn examples_in_step(&self, _step: usize) -> usize {
        self.batch_size
    }

    fn examples(&self) -> usize {
        self.train.len()
    }

    fn total_steps(&self, settings: &Settings) -> usize {
        settings.max_steps.unwrap_or(DEFAULT_GPT_STEPS)
    }

    fn epochs_after(&self, steps: usize) -> usize {
        steps * self.batch_size * self.block_size / self.train.len()
    }
}

impl Trainee for GptTrainee {
    fn metric_names(&self) -> &'static [&'static str] {
        &["loss", "lr", "grad_norm"]
    }

    fn train_step(
        &mut self,
        step: usize,
        rng: &mut Rng,
        amp: &mut MixedPrecision,
    ) -> Result<Vec<f64>> {
        // The step's dropout masks depend on the step alone (resumable).
        self.gpt.restart_dropout_streams(step as u64);
        let lr = gpt_learning_rate(step, self.lr, self.warmup, self.lr_decay_steps);
        self.optimizers.set_learning_rate(lr);
        let (x, y) = random_batch(&self.train, self.batch_size, self.block_size, rng)?;
        let result = gpt::train_step(
            &self.gpt,
            &mut self.optimizers,
            &x.to_device(self.device)?,
            &y.to_device(self.device)?,
            self.grad_clip,
            amp,
        )?;
        // metrics.csv keeps a NaN column when gradients are not clipped.
        let grad_norm = result.grad_norm.unwrap_or(f64::NAN);
        Ok(vec![scalar(&result.loss)?, lr, grad_norm])
    }

    fn length(&self) -> &dyn RunLength {
        self
    }

    fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = prefixed("model", self.gpt.state_dict());
        tensors.extend(prefixed("optim_decay", self.optimizers.decay.state_dict()));
        tensors.extend(prefixed(
            "optim_no_decay",
            self.optimizers.no_decay.state_dict(),
        ));
        tensors
    }

    fn restore(&mut self, checkpoint: &LoadedCheckpoint) -> Result<()> {
        specs::load_into(&self.gpt, checkpoint, "model")?;
        restore_optimizer(&mut self.optimizers.decay, checkpoint, "optim_decay")?;
        restore_optimizer(&mut self.optimizers.no_decay, checkpoint, "optim_no_decay")
    }

    fn optimizers(&mut self) -> Vec<&mut dyn Optimizer> {
        vec![&mut self.optimizers.decay, &mut self.optimizers.no_decay]
    }
}

#[cfg(test)]
mod tests {
    use super::gpt_learning_rate;

    #[test]
    fn gpt_rate_warms_up_linearly_then_decays_by_cosine_to_a_tenth() {
        let (lr, warmup, decay) = (1e-3, 10, 110);
        assert!((gpt_learning_rate(0, lr, warmup, decay) - lr / 11.0).abs() < 1e-15);
        assert!((gpt_learning_rate(9, lr, warmup, decay) - lr * 10.0 / 11.0).abs() < 1e-15);
        assert!((gpt_learning_rate(10, lr, warmup, decay) - lr).abs() < 1e-15);
        // Half way through the decay the cosine is at its midpoint.
        assert!((gpt_learning_rate(60, lr, warmup, decay) - 0.55 * lr).abs() < 1e-12);
        assert_eq!(gpt_learning_rate(110, lr, warmup, decay), lr / 10.0);
        assert_eq!(gpt_learning_rate(5000, lr, warmup, decay), lr / 10.0);
        let rates: Vec<f64> = (10..110)
            .map(|s| gpt_learning_rate(s, lr, warmup, decay))
            .collect();
        assert!(
            rates.windows(2).all(|w| w[1] <= w[0]),
            "the decay is monotone"
        );
        // No decay steps: the rate stays at lr after the warm-up.
        assert!((gpt_learning_rate(0, lr, warmup, 0) - lr / 11.0).abs() < 1e-15);
        for step in [10, 110, 5000] {
            assert_eq!(gpt_learning_rate(step, lr, warmup, 0), lr);
        }
    }
}
