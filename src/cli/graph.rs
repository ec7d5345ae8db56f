//! `kiln graph gan|vae|gpt`: the autograd graph of one training loss as a
//! picture. The model is built as `kiln train` builds it (sizes and weights
//! from --checkpoint when given, else the default sizes, freshly
//! initialised), its training loss is computed once on a small synthetic
//! batch, and the graph reachable from the loss is written as Graphviz DOT,
//! or rendered to SVG / PNG by Graphviz's `dot`.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use clap::Args;

use super::args::ModelKind;
use super::run_dir::{LoadedCheckpoint, load_checkpoint, write_atomically};
use super::seeds::{Stream, stream_rng};
use super::specs::{
    ClassifierSpec, GanSpec, GptSpec, VaeSpec, build_classifier, build_gan, build_gpt, build_vae,
    load_into, spec,
};
use crate::autograd::GraphBuilder;
use crate::nn::Module;
use crate::{DType, Device, Reduction, Rng, Tensor};

/// Examples in the synthetic batch: enough for batch norm, small enough to be instant.
const BATCH: usize = 2;

/// The character count of the Shakespeare text, the vocabulary of a GPT
/// drawn without a checkpoint.
const DEFAULT_VOCAB: usize = 65;

#[derive(Args, Debug, Clone)]
pub struct GraphArgs {
    /// Which model's loss to draw. gan: the generator's loss (D(G(z)) against
    /// the "real" label), which runs through both networks; vae: the negative
    /// ELBO; gpt: the next-character cross-entropy.
    #[arg(value_enum)]
    pub model: ModelKind,
    /// A run directory, its checkpoint.json or its checkpoint.safetensors, to
    /// take the sizes and weights from [default: the default sizes, freshly
    /// initialised].
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// The file to write: FILE.dot (the graph as Graphviz text), FILE.svg or
    /// FILE.png (rendered by Graphviz's `dot`, which must be on PATH).
    #[arg(long)]
    pub out: PathBuf,
    /// Draw each module scope nested N deep as one box with its op count
    /// (gpt --depth 1: one box per transformer block) [default: every op].
    #[arg(long, value_name = "N")]
    pub depth: Option<usize>,
    /// GPT without --checkpoint: the number of transformer blocks [default: 4].
    #[arg(long)]
    pub n_layer: Option<usize>,
}

/// What --out asks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Dot,
    Svg,
    Png,
}

impl Format {
    fn of(path: &Path) -> Result<Format> {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("dot" | "gv") => Ok(Format::Dot),
            Some("svg") => Ok(Format::Svg),
            Some("png") => Ok(Format::Png),
            _ => bail!(
                "--out {}: name a .dot, .svg or .png file (the extension picks the format)",
                path.display()
            ),
        }
    }
}

pub fn run(args: &GraphArgs) -> Result<()> {
    let format = Format::of(&args.out)?;
    if args.depth == Some(0) {
        bail!(
            "--depth 0: give at least 1 (1 draws each top-level module as one box), or leave it out to draw every op"
        );
    }
    if args.n_layer.is_some() && (args.model != ModelKind::Gpt || args.checkpoint.is_some()) {
        bail!("--n-layer sizes a fresh GPT: use it with `kiln graph gpt` and without --checkpoint");
    }
    // Before any work: without Graphviz an SVG or PNG cannot be made.
    let graphviz = match format {
        Format::Dot => None,
        Format::Svg | Format::Png => Some(find_graphviz_dot()?),
    };
    let checkpoint = args
        .checkpoint
        .as_deref()
        .map(load_checkpoint)
        .transpose()?;
    let (loss, names) = match args.model {
        ModelKind::Gan => gan_loss(checkpoint.as_ref())?,
        ModelKind::Vae => vae_loss(checkpoint.as_ref())?,
        ModelKind::Gpt => gpt_loss(checkpoint.as_ref(), args.n_layer)?,
        ModelKind::Classifier => classifier_loss(checkpoint.as_ref())?,
    };
    let mut graph = GraphBuilder::new()
        .names(&names)
        .constants(true)
        .build(&loss);
    if let Some(depth) = args.depth {
        graph = graph.collapsed(depth);
    }
    let dot = graph.to_dot();
    let bytes = match (graphviz, format) {
        (Some(program), Format::Svg) => render(&program, "svg", &dot)?,
        (Some(program), Format::Png) => render(&program, "png", &dot)?,
        _ => dot.into_bytes(),
    };
    write_atomically(&args.out, &bytes)?;
    println!(
        "wrote the {} loss's graph ({} nodes, {} edges) to {}",
        args.model.name(),
        graph.nodes().len(),
        graph.edges().len(),
        args.out.display()
    );
    Ok(())
}

/// The path of Graphviz's `dot` on PATH, or the error that says how to get it.
fn find_graphviz_dot() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("dot"))
        .find(|candidate| candidate.is_file())
        .context(
            "Graphviz's `dot` was not found on PATH; install it (Debian/Ubuntu: apt install graphviz) or write --out FILE.dot",
        )
}

/// `dot -T<format>` of `dot_text`: the rendered file's bytes.
fn render(program: &Path, format: &str, dot_text: &str) -> Result<Vec<u8>> {
    let mut child = Command::new(program)
        .arg(format!("-T{format}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", program.display()))?;
    let mut stdin = child.stdin.take().context("no stdin for dot")?;
    // Fed from another thread so that neither side can block on a full pipe.
    let output = std::thread::scope(|scope| {
        let writer = scope.spawn(move || stdin.write_all(dot_text.as_bytes()));
        let output = child.wait_with_output();
        (writer.join(), output)
    });
    let output = match output {
        (_, Err(e)) => bail!("{} failed: {e}", program.display()),
        (Ok(Err(e)), _) if e.kind() != ErrorKind::BrokenPipe => {
            bail!("cannot send the graph to {}: {e}", program.display())
        }
        (_, Ok(output)) => output,
    };
    if !output.status.success() {
        let message = String::from_utf8_lossy(&output.stderr);
        bail!(
            "{} -T{format} failed ({}): {}",
            program.display(),
            output.status,
            message.trim()
        );
    }
    Ok(output.stdout)
}

/// The seed of a checkpoint's run (its initialisation), or 0.
fn run_seed(checkpoint: Option<&LoadedCheckpoint>) -> u64 {
    checkpoint.map_or(0, |c| c.state.seed)
}

/// A rng for the synthetic batch.
fn batch_rng(checkpoint: Option<&LoadedCheckpoint>) -> Rng {
    stream_rng(run_seed(checkpoint), Stream::Step, 0)
}

/// `named` with every name prefixed by "`prefix`.".
fn prefixed(prefix: &str, named: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    named
        .into_iter()
        .map(|(name, tensor)| (format!("{prefix}.{name}"), tensor))
        .collect()
}

type LossAndNames = (Tensor, Vec<(String, Tensor)>);

/// The generator's loss on noise z: bce(D(G(z)), 1).
fn gan_loss(checkpoint: Option<&LoadedCheckpoint>) -> Result<LossAndNames> {
    let spec = match checkpoint {
        Some(c) => {
            c.expect_model("gan")?;
            spec(&c.state)?
        }
        None => GanSpec::default(),
    };
    let (generator, discriminator) = build_gan(&spec, run_seed(checkpoint), Device::Cpu)?;
    if let Some(c) = checkpoint {
        load_into(&generator, c, "generator")?;
        load_into(&discriminator, c, "discriminator")?;
    }
    let mut rng = batch_rng(checkpoint);
    let z = Tensor::randn([BATCH, spec.nz, 1, 1], DType::F32, Device::Cpu, &mut rng)?;
    let real_label = Tensor::ones([BATCH], DType::F32, Device::Cpu)?;
    let logits = discriminator.forward(&generator.forward(&z)?)?;
    let loss = logits.bce_with_logits(&real_label, Reduction::Mean)?;
    let mut names = prefixed("generator", generator.named_parameters());
    names.extend(prefixed("discriminator", discriminator.named_parameters()));
    Ok((loss, names))
}

/// The negative ELBO of random pixels in [0, 1].
fn vae_loss(checkpoint: Option<&LoadedCheckpoint>) -> Result<LossAndNames> {
    let spec = match checkpoint {
        Some(c) => {
            c.expect_model("vae")?;
            spec(&c.state)?
        }
        None => VaeSpec::default(),
    };
    let vae = build_vae(&spec, run_seed(checkpoint), Device::Cpu)?;
    if let Some(c) = checkpoint {
        load_into(&vae, c, "model")?;
    }
    let mut rng = batch_rng(checkpoint);
    let x = Tensor::rand(
        0.0,
        1.0,
        [BATCH, spec.input],
        DType::F32,
        Device::Cpu,
        &mut rng,
    )?;
    let loss = vae.loss(&x, &mut rng)?.total;
    Ok((loss, vae.named_parameters()))
}

/// The classifier's cross entropy on random images with labels 0, 1, ...
fn classifier_loss(checkpoint: Option<&LoadedCheckpoint>) -> Result<LossAndNames> {
    let spec = match checkpoint {
        Some(c) => {
            c.expect_model("classifier")?;
            spec(&c.state)?
        }
        None => ClassifierSpec {
            width: 32,
            features: 128,
            classes: 10,
        },
    };
    let classifier = build_classifier(&spec, run_seed(checkpoint), Device::Cpu)?;
    if let Some(c) = checkpoint {
        load_into(&classifier, c, "model")?;
    }
    let mut rng = batch_rng(checkpoint);
    let size = crate::models::classifier::IMAGE_SIZE;
    let x = Tensor::rand(
        0.0,
        1.0,
        [BATCH, 1, size, size],
        DType::F32,
        Device::Cpu,
        &mut rng,
    )?;
    let labels = (0..BATCH).map(|i| (i % spec.classes) as u32).collect();
    let y = Tensor::from_indices(labels, [BATCH])?;
    let (loss, _) = classifier.loss(&x, &y)?;
    Ok((loss, classifier.named_parameters()))
}

/// The next-token cross-entropy of random token ids, a full block long.
fn gpt_loss(checkpoint: Option<&LoadedCheckpoint>, n_layer: Option<usize>) -> Result<LossAndNames> {
    let spec = match checkpoint {
        Some(c) => {
            c.expect_model("gpt")?;
            spec(&c.state)?
        }
        None => GptSpec {
            vocab_size: DEFAULT_VOCAB,
            n_layer: n_layer.unwrap_or(4),
            n_head: 4,
            n_embd: 128,
            block_size: 64,
            dropout: 0.0,
        },
    };
    let gpt = build_gpt(&spec, run_seed(checkpoint), Device::Cpu)?;
    if let Some(c) = checkpoint {
        load_into(&gpt, c, "model")?;
    }
    let mut rng = batch_rng(checkpoint);
    let shape = [BATCH, spec.block_size];
    let mut random_ids = || -> Result<Tensor> {
        let count = BATCH * spec.block_size;
        let ids = (0..count)
            .map(|_| (rng.next_u64() % spec.vocab_size as u64) as u32)
            .collect();
        Ok(Tensor::from_indices(ids, shape)?)
    };
    let (x, y) = (random_ids()?, random_ids()?);
    let loss = gpt.loss(&x, &y)?;
    Ok((loss, gpt.named_parameters()))
}
