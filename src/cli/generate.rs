//! `kiln generate`: continues a prompt with a trained character GPT.

use anyhow::{Context, Result, bail};

use super::args::GenerateArgs;
use super::run_dir::load_checkpoint;
use super::seeds::{Stream, stream_rng};
use super::specs::load_gpt;

/// Prints the prompt followed by `--max-new-tokens` sampled characters.
pub fn run(args: &GenerateArgs) -> Result<()> {
    if !(args.temperature.is_finite() && args.temperature > 0.0) {
        bail!(
            "--temperature must be a positive number, got {}",
            args.temperature
        );
    }
    let device = super::device(args.device)?;
    let checkpoint = load_checkpoint(&args.checkpoint)?;
    let (gpt, vocab) = load_gpt(&checkpoint, device)?;
    // Without a prompt, start as nanoGPT does: from a newline.
    let prompt = match args.prompt.as_deref() {
        Some(p) if !p.is_empty() => p.to_string(),
        _ => "\n".to_string(),
    };
    let ids = vocab.encode(&prompt).context("--prompt")?;
    let top_k = (args.top_k > 0).then_some(args.top_k);
    let mut rng = stream_rng(args.seed, Stream::Sampling, 0);
    let _autocast = super::checkpoint_autocast(&checkpoint)?;
    let continuation =
        gpt.generate(&ids, args.max_new_tokens, args.temperature, top_k, &mut rng)?;
    println!("{prompt}{}", vocab.decode(&continuation));
    Ok(())
}
