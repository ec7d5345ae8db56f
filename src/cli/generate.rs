//! `kiln generate`: continues a prompt with a trained character GPT.

use std::time::Instant;

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
    let started = Instant::now();
    let continuation = gpt.generate_with(
        &ids,
        args.max_new_tokens,
        args.temperature,
        top_k,
        !args.no_kv_cache,
        &mut rng,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    println!("{prompt}{}", vocab.decode(&continuation));
    // On stderr, so that stdout is the text alone.
    eprintln!(
        "{} characters in {seconds:.2} s: {:.0} characters/s (KV cache {})",
        continuation.len(),
        continuation.len() as f64 / seconds.max(f64::MIN_POSITIVE),
        if args.no_kv_cache { "off" } else { "on" }
    );
    Ok(())
}
