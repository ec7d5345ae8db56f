//! A small convolutional Fashion-MNIST classifier, the judge of kiln's
//! generated images: its penultimate layer gives the features whose
//! Fréchet distance `kiln eval gan|vae --classifier` reports (see
//! [`super::quality`]), and its class probabilities the two entropies.
//!
//! ```text
//! x [N, 1, 28, 28] in [0, 1]
//! Conv(1→w, 3, stride 1, pad 1)   + BatchNorm + ReLU   28×28
//! Conv(w→2w, 3, stride 2, pad 1)  + BatchNorm + ReLU   14×14
//! Conv(2w→2w, 3, stride 2, pad 1) + BatchNorm + ReLU    7×7
//! Flatten → Linear(2w·49 → features) + ReLU            the features
//! Linear(features → classes)                           logits
//! ```
//!
//! kiln has no pooling op: stride-2 convolutions do the down-sampling.

use crate::autocast::MixedPrecision;
use crate::autograd::module_scope;
use crate::error::{Error, Result};
use crate::nn::init::Init;
use crate::nn::{
    BatchNorm2d, Conv2d, Flatten, Linear, Module, Relu, Sequential, TensorRole, visit_child,
};
use crate::ops::conv::Conv2dParams;
use crate::ops::loss::Reduction;
use crate::optim::{Adam, AdamConfig, Optimizer};
use crate::tensor::{DType, Device, Tensor};

/// Side of the images the classifier reads (Fashion-MNIST as stored).
pub const IMAGE_SIZE: usize = 28;

/// Layer sizes.
#[derive(Clone, Debug)]
pub struct ClassifierConfig {
    /// Channels of the first convolution (2× that in the next two).
    pub width: usize,
    /// Width of the penultimate layer: the feature vector.
    pub features: usize,
    /// Number of classes (10 for Fashion-MNIST).
    pub classes: usize,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        ClassifierConfig {
            width: 32,
            features: 128,
            classes: 10,
        }
    }
}

impl ClassifierConfig {
    /// Trainable parameters of the classifier these sizes build, computed
    /// without building it (to check that it fits before allocating).
    pub fn parameter_count(&self) -> u128 {
        let (w, f, c) = (
            self.width as u128,
            self.features as u128,
            self.classes as u128,
        );
        // Saturating: sizes from a damaged file may be absurd.
        let linear = |i: u128, o: u128| i.saturating_mul(o).saturating_add(o);
        let conv3x3 = |i: u128, o: u128| linear(9 * i, o);
        [
            conv3x3(1, w),
            conv3x3(w, 2 * w),
            conv3x3(2 * w, 2 * w),
            2 * (w + 2 * w + 2 * w),
            linear(2 * w * 49, f),
            linear(f, c),
        ]
        .into_iter()
        .fold(0, u128::saturating_add)
    }
}

/// The classifier: a feature extractor `body` and a linear `head`.
pub struct Classifier {
    /// Images → features [N, features] (after the ReLU).
    pub body: Sequential,
    /// Features → class logits.
    pub head: Linear,
    config: ClassifierConfig,
    device: Device,
}

/// A 3×3 convolution with bias, PyTorch's default initialisation.
fn conv3x3(in_c: usize, out_c: usize, stride: usize, init: &mut Init) -> Result<Conv2d> {
    Conv2d::new(
        in_c,
        out_c,
        [3, 3],
        Conv2dParams {
            stride: [stride; 2],
            padding: [1, 1].into(),
            ..Conv2dParams::default()
        },
        true,
        init,
    )
}

impl Classifier {
    pub fn new(cfg: &ClassifierConfig, init: &mut Init) -> Result<Self> {
        super::check_positive(
            "Classifier",
            &[
                ("width", cfg.width),
                ("features", cfg.features),
                ("classes", cfg.classes),
            ],
        )?;
        let w = cfg.width;
        // 28 → 14 → 7 after the two stride-2 convolutions.
        let flat = 2 * w * 7 * 7;
        let body = Sequential::new()
            .with(conv3x3(1, w, 1, init)?)
            .with(BatchNorm2d::new(w, init)?)
            .with(Relu)
            .with(conv3x3(w, 2 * w, 2, init)?)
            .with(BatchNorm2d::new(2 * w, init)?)
            .with(Relu)
            .with(conv3x3(2 * w, 2 * w, 2, init)?)
            .with(BatchNorm2d::new(2 * w, init)?)
            .with(Relu)
            .with(Flatten)
            .with(Linear::new(flat, cfg.features, true, init)?)
            .with(Relu);
        let head = Linear::new(cfg.features, cfg.classes, true, init)?;
        Ok(Classifier {
            body,
            head,
            config: cfg.clone(),
            device: init.device,
        })
    }

    pub fn config(&self) -> &ClassifierConfig {
        &self.config
    }

    /// images [N, 1, 28, 28] in [0, 1] → penultimate features [N, features].
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let s = IMAGE_SIZE;
        match images.dims() {
            [n, 1, h, w] if *n > 0 && *h == s && *w == s => {}
            _ => {
                return Err(Error::shape(
                    "Classifier",
                    format!(
                        "expected images of shape [N, 1, {s}, {s}] with N > 0, got {}",
                        images.shape()
                    ),
                ));
            }
        }
        let _scope = module_scope("classifier");
        self.body.forward(&images.to_device(self.device)?)
    }

    /// Class probabilities [N, classes] from features [N, features].
    pub fn probabilities(&self, features: &Tensor) -> Result<Tensor> {
        self.head
            .forward(features)?
            .to_dtype(DType::F32)?
            .softmax(-1)
    }

    /// Mean cross entropy of the batch `images` against u32 `labels` [N],
    /// and how many images the logits classify correctly.
    pub fn loss(&self, images: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
        let logits = self.forward(images)?;
        let labels = labels.to_device(self.device)?;
        let loss = logits.cross_entropy(&labels, Reduction::Mean)?;
        let correct = correct_predictions(&logits, &labels)?;
        Ok((loss, correct))
    }
}

/// How many rows of `logits` [N, C] have their maximum at `labels` [N].
pub fn correct_predictions(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let (_, predicted) = logits.detach().max_with_indices(1, false)?;
    let predicted = predicted.to_indices()?;
    let labels = labels.to_indices()?;
    Ok(predicted
        .iter()
        .zip(&labels)
        .filter(|(p, l)| p == l)
        .count())
}

impl Module for Classifier {
    /// images [N, 1, 28, 28] in [0, 1] → logits [N, classes].
    fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.head.forward(&self.features(images)?)
    }

    fn visit(&self, prefix: &str, visitor: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_child(prefix, "body", &self.body, visitor);
        visit_child(prefix, "head", &self.head, visitor);
    }

    fn set_training(&self, training: bool) {
        self.body.set_training(training);
    }
}

/// Adam with its defaults (β 0.9/0.999, eps 1e-8) at learning rate `lr`.
pub fn optimizer(classifier: &Classifier, lr: f64) -> Result<Adam> {
    Adam::new(
        classifier.named_parameters(),
        AdamConfig {
            lr,
            ..AdamConfig::adam()
        },
    )
}

/// One training step on `images` [N, 1, 28, 28] in [0, 1] with u32
/// `labels` [N]: cross entropy, its gradients, one optimizer update.
/// Returns the loss (detached) and the batch's correct predictions.
pub fn train_step(
    classifier: &Classifier,
    optimizer: &mut dyn Optimizer,
    images: &Tensor,
    labels: &Tensor,
    amp: &mut MixedPrecision,
) -> Result<(Tensor, usize)> {
    let (loss, correct) = {
        let _autocast = amp.autocast();
        classifier.loss(images, labels)?
    };
    let (grads, finite) = amp.backward(&loss)?;
    // A step whose f16 gradients overflowed is skipped (the scale backs off).
    if finite {
        optimizer.step(&grads)?;
    }
    amp.end_step();
    Ok((loss.detach(), correct))
}
