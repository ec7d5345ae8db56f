//! The command line, declared with clap's derive API. Hyper-parameters are
//! `Option`s so that a resumed run can tell a flag the user typed (which must
//! agree with the checkpoint) from one left at its per-model default.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Train and sample a DCGAN, a VAE and a character-level GPT with kiln.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// CPU threads for kiln's kernels [default: RAYON_NUM_THREADS, else one per core].
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Load checkpoints whose weights or optimizer state hold NaN or ±Inf
    /// (refused by default, naming the tensor).
    #[arg(long, global = true)]
    pub allow_non_finite: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model; writes checkpoint.safetensors, checkpoint.json,
    /// metrics.csv, loss.png (and samples.png for gan/vae) into --out.
    Train(Box<TrainArgs>),
    /// Draw images from a trained GAN or VAE into a PNG grid.
    Sample(SampleArgs),
    /// Continue a text prompt with a trained GPT and print the result.
    Generate(GenerateArgs),
    /// Evaluate a checkpoint on held-out data (VAE: test negative ELBO; GPT:
    /// validation loss; GAN/VAE with --classifier: classifier-feature FID of
    /// samples; classifier: test accuracy).
    Eval(EvalArgs),
    /// Draw the autograd graph of a model's training loss as Graphviz DOT,
    /// SVG or PNG (--depth N boxes repeated blocks).
    Graph(super::graph::GraphArgs),
}

/// The three models kiln trains.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// DCGAN on Fashion-MNIST padded to 32x32 (or --dataset, --image-size 64).
    Gan,
    /// Fully connected VAE on Fashion-MNIST 28x28 (or --dataset).
    Vae,
    /// Character-level GPT on Shakespeare.
    Gpt,
    /// Fashion-MNIST (or MNIST) CNN classifier, the judge of `kiln eval gan|vae --classifier`.
    Classifier,
}

impl ModelKind {
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Gan => "gan",
            ModelKind::Vae => "vae",
            ModelKind::Gpt => "gpt",
            ModelKind::Classifier => "classifier",
        }
    }

    pub fn from_name(name: &str) -> Option<ModelKind> {
        match name {
            "gan" => Some(ModelKind::Gan),
            "vae" => Some(ModelKind::Vae),
            "gpt" => Some(ModelKind::Gpt),
            "classifier" => Some(ModelKind::Classifier),
            _ => None,
        }
    }
}

/// The image models, the ones `kiln sample` can draw from.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageModelKind {
    /// DCGAN: images from the generator.
    Gan,
    /// VAE: images decoded from latents drawn from the prior N(0, I).
    Vae,
}

impl From<ImageModelKind> for ModelKind {
    fn from(kind: ImageModelKind) -> ModelKind {
        match kind {
            ImageModelKind::Gan => ModelKind::Gan,
            ImageModelKind::Vae => ModelKind::Vae,
        }
    }
}

/// The models `kiln eval` can score.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalModelKind {
    /// VAE: mean negative ELBO per test image (nats); with --classifier,
    /// also the sample-quality scores of its samples.
    Vae,
    /// GPT: mean cross-entropy on validation batches (nats per character).
    Gpt,
    /// GAN (needs --classifier): classifier-feature FID, class-histogram
    /// entropy and mean prediction entropy of --n generated images.
    Gan,
    /// Classifier: test accuracy, and the scores of --n real training
    /// images (the floor a generator can reach).
    Classifier,
}

impl From<EvalModelKind> for ModelKind {
    fn from(kind: EvalModelKind) -> ModelKind {
        match kind {
            EvalModelKind::Vae => ModelKind::Vae,
            EvalModelKind::Gpt => ModelKind::Gpt,
            EvalModelKind::Gan => ModelKind::Gan,
            EvalModelKind::Classifier => ModelKind::Classifier,
        }
    }
}

/// The images of `kiln train gan|vae|classifier`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetArg {
    /// Fashion-MNIST's 28x28 grey clothes, from DATA/fashion-mnist/ (scripts/fetch-data.sh).
    FashionMnist,
    /// MNIST's 28x28 grey digits, from the IDX files in DATA/mnist/.
    Mnist,
    /// Every PNG/JPEG under the folder --data, resized and centre-cropped to --image-size.
    Folder,
}

impl DatasetArg {
    pub fn name(self) -> &'static str {
        match self {
            DatasetArg::FashionMnist => "fashion-mnist",
            DatasetArg::Mnist => "mnist",
            DatasetArg::Folder => "folder",
        }
    }

    pub fn from_name(name: &str) -> Option<DatasetArg> {
        [
            DatasetArg::FashionMnist,
            DatasetArg::Mnist,
            DatasetArg::Folder,
        ]
        .into_iter()
        .find(|d| d.name() == name)
    }
}

impl std::fmt::Display for DatasetArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where tensors live.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceArg {
    #[default]
    Cpu,
    /// The first CUDA device (fails with a clear error when there is none).
    Cuda,
}

/// The weight initialisation of a new GPT (see `kiln::models::gpt::GptInit`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GptInitArg {
    /// PyTorch's module defaults: embeddings N(0, 1), linear layers U(±1/√fan_in).
    Pytorch,
    /// GPT-2's: N(0, 0.02²), residual projections scaled by 1/√(2·n_layer).
    Gpt2,
}

impl GptInitArg {
    pub fn name(self) -> &'static str {
        match self {
            GptInitArg::Pytorch => "pytorch",
            GptInitArg::Gpt2 => "gpt2",
        }
    }

    pub fn scheme(self) -> crate::models::gpt::GptInit {
        match self {
            GptInitArg::Pytorch => crate::models::gpt::GptInit::PyTorch,
            GptInitArg::Gpt2 => crate::models::gpt::GptInit::Gpt2,
        }
    }
}

impl std::fmt::Display for GptInitArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The precision of a training run.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionArg {
    /// Everything in f32.
    F32,
    /// Matrix products and convolutions in bf16 (f32 accumulation); f32 weights and optimizer.
    Bf16,
    /// As bf16 with f16 inputs, and the loss scaled (GradScaler) against f16's small range.
    F16,
}

impl PrecisionArg {
    pub fn precision(self) -> crate::Precision {
        match self {
            PrecisionArg::F32 => crate::Precision::F32,
            PrecisionArg::Bf16 => crate::Precision::BF16,
            PrecisionArg::F16 => crate::Precision::F16,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Which model to train.
    #[arg(value_enum)]
    pub model: ModelKind,

    /// Device to train on.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,

    /// Passes over the training set (gan: 5, vae: 10, classifier: 3; gpt counts --steps only).
    #[arg(long)]
    pub epochs: Option<usize>,

    /// Total optimisation steps (gpt: 2000 by default; gan/vae: a cap on top of --epochs).
    #[arg(long)]
    pub steps: Option<usize>,

    /// Examples per step (gan: 64, vae: 128, gpt: 12, classifier: 128).
    #[arg(long)]
    pub batch_size: Option<usize>,

    /// Peak learning rate (gan: 2e-4, vae: 1e-3, gpt: 1e-3, classifier: 1e-3).
    #[arg(long)]
    pub lr: Option<f64>,

    /// Seed of every random draw: initialisation, batch order, noise, dropout.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Data directory, as filled by scripts/fetch-data.sh (holds
    /// fashion-mnist/, mnist/ and shakespeare.txt) [default: data]; with
    /// --dataset folder, the image folder [default: the resumed run's].
    #[arg(long)]
    pub data: Option<PathBuf>,

    #[command(flatten)]
    pub images: ImageArgs,

    /// Run directory for checkpoints, metrics and pictures [default: runs/<model>].
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// Continue the run saved in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,

    /// Numeric precision [default: f32, or the resumed run's]; sample,
    /// generate and eval run a checkpoint in the precision it was trained in.
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,

    /// With --precision bf16: round the bf16 copies of the weights that the
    /// optimizer writes for the forward pass stochastically (seeded by
    /// --seed) instead of to nearest even.
    #[arg(long)]
    pub stochastic_rounding: bool,

    /// Save a checkpoint (and refresh loss.png / samples.png) every N steps.
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: usize,

    /// Profile N training steps (after a short warm-up): print the time per
    /// op at the end and write profile.md and profile.json into --out.
    #[arg(long, value_name = "N")]
    pub profile: Option<usize>,

    /// Use only the first N training examples: images, or for gpt characters
    /// of the training text (quick runs and tests).
    #[arg(long)]
    pub limit: Option<usize>,

    #[command(flatten)]
    pub gan: GanArgs,

    #[command(flatten)]
    pub vae: VaeArgs,

    #[command(flatten)]
    pub gpt: GptArgs,

    #[command(flatten)]
    pub classifier: ClassifierArgs,
}

/// The images an image model trains on (`kiln train gan|vae|classifier`).
#[derive(Args, Debug, Clone, Default)]
pub struct ImageArgs {
    /// gan/vae/classifier: the images [default: fashion-mnist].
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetArg>,
    /// gan/vae: image side; gan: a power of two (32, or 64 as in the DCGAN
    /// paper), vae: 28 for MNIST-like sets [default: gan 32, vae 28].
    #[arg(long)]
    pub image_size: Option<usize>,
    /// gan/vae: 1 (grey) or 3 (RGB, --dataset folder only) [default: 1].
    #[arg(long)]
    pub channels: Option<usize>,
}

/// Classifier size (`kiln train classifier`).
#[derive(Args, Debug, Clone, Default)]
pub struct ClassifierArgs {
    /// Classifier: channels of the first convolution (twice that in the next two) [default: 32].
    #[arg(long)]
    pub width: Option<usize>,
    /// Classifier: width of the penultimate layer, the features of the FID [default: 128].
    #[arg(long)]
    pub features: Option<usize>,
}

/// DCGAN size (`kiln train gan`).
#[derive(Args, Debug, Clone, Default)]
pub struct GanArgs {
    /// GAN: length of the noise vector z [default: 100].
    #[arg(long)]
    pub nz: Option<usize>,
    /// GAN: generator feature maps [default: 64].
    #[arg(long)]
    pub ngf: Option<usize>,
    /// GAN: discriminator feature maps [default: 64].
    #[arg(long)]
    pub ndf: Option<usize>,
}

/// VAE size (`kiln train vae`).
#[derive(Args, Debug, Clone, Default)]
pub struct VaeArgs {
    /// VAE: latent dimensions [default: 20].
    #[arg(long)]
    pub latent: Option<usize>,
    /// VAE: hidden units of the encoder and decoder [default: 400].
    #[arg(long)]
    pub hidden: Option<usize>,
}

/// GPT size and optimisation (`kiln train gpt`).
#[derive(Args, Debug, Clone, Default)]
pub struct GptArgs {
    /// GPT: transformer blocks [default: 4].
    #[arg(long)]
    pub n_layer: Option<usize>,
    /// GPT: attention heads [default: 4].
    #[arg(long)]
    pub n_head: Option<usize>,
    /// GPT: embedding width [default: 128].
    #[arg(long)]
    pub n_embd: Option<usize>,
    /// GPT: context length in characters [default: 64].
    #[arg(long)]
    pub block_size: Option<usize>,
    /// GPT: dropout probability [default: 0.0].
    #[arg(long)]
    pub dropout: Option<f64>,
    /// GPT: linear warm-up steps of the learning rate [default: 0].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// GPT: steps over which the rate decays (cosine) to lr/10; 0 keeps it
    /// constant [default: 0].
    #[arg(long)]
    pub lr_decay_steps: Option<usize>,
    /// GPT: clip the global gradient norm to this value (0 disables) [default: 5.0].
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// GPT: AdamW decoupled weight decay of the matrices [default: 0.01].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// GPT: AdamW's beta2 [default: 0.999; 0.99 in runs saved before it was recorded].
    #[arg(long)]
    pub beta2: Option<f64>,
    /// GPT: how a new run's weights start [default: pytorch].
    #[arg(long, value_enum)]
    pub init: Option<GptInitArg>,
}

#[derive(Args, Debug, Clone)]
pub struct SampleArgs {
    /// Which kind of model the checkpoint holds.
    #[arg(value_enum)]
    pub model: ImageModelKind,
    /// A run directory, its checkpoint.json or its checkpoint.safetensors.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 64)]
    pub n: usize,
    /// PNG grid to write (ceil(sqrt(n)) images per row).
    #[arg(long, default_value = "samples.png")]
    pub out: PathBuf,
    /// Also write the images as a safetensors tensor `samples` [n, C, H, W].
    #[arg(long)]
    pub raw: Option<PathBuf>,
    /// Seed of the noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
}

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// A GPT run directory, its checkpoint.json or its checkpoint.safetensors.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Text to continue; every character must be in the training vocabulary
    /// [default: a newline].
    #[arg(long)]
    pub prompt: Option<String>,
    /// Characters to generate after the prompt.
    #[arg(long, default_value_t = 500)]
    pub max_new_tokens: usize,
    /// Softmax temperature (> 0): below 1 is more conservative, above 1 more random.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Sample only among the K most likely characters (0: all).
    #[arg(long, default_value_t = 200)]
    pub top_k: usize,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Recompute the whole window for every character instead of keeping
    /// each layer's keys and values (the same text; to measure the cache).
    #[arg(long)]
    pub no_kv_cache: bool,
}

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Which kind of model the checkpoint holds.
    #[arg(value_enum)]
    pub model: EvalModelKind,
    /// A run directory, its checkpoint.json or its checkpoint.safetensors.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Data directory, as filled by scripts/fetch-data.sh [default: data];
    /// for a VAE trained on an image folder, a folder of held-out images.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Seed of the evaluation's randomness (VAE: the eps of the ELBO; GPT: the
    /// batch offsets; --classifier: the samples' noise; classifier: which training images).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// GPT: number of random validation batches averaged.
    #[arg(long, default_value_t = 200)]
    pub batches: usize,
    /// GPT: score the whole validation split (every consecutive window of the
    /// block size) instead of random batches; slower, but free of sampling noise.
    #[arg(long)]
    pub full: bool,
    /// Score only the first N held-out examples (VAE: images; GPT: characters;
    /// with --classifier and for classifier: the test images).
    #[arg(long)]
    pub limit: Option<usize>,
    /// A classifier run directory (`kiln train classifier`) whose features and
    /// predictions score the samples of gan (required) or vae.
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Samples generated for the scores (classifier: real training images).
    #[arg(long, default_value_t = 5000)]
    pub n: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
}
