//! `kiln generate`: continues a prompt with a trained character GPT.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::args::GenerateArgs;
use super::run_dir::load_checkpoint;
use super::seeds::{Stream, stream_rng};
use super::specs::load_gpt;
use crate::models::gpt::Sampling;

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
    let how = Sampling {
        temperature: args.temperature,
        top_k,
        kv_cache: !args.no_kv_cache,
    };
    // The text goes to stdout as it is drawn, the speed to stderr at the end.
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{prompt}")?;
    let mut drawn = 0usize;
    let started = Instant::now();
    gpt.generate_streaming(&ids, args.max_new_tokens, &how, &mut rng, &mut |token| {
        stdout
            .write_all(vocab.decode(&[token]).as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(crate::Error::Io)?;
        drawn += 1;
        Ok(())
    })?;
    writeln!(stdout)?;
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "{drawn} characters in {seconds:.2} s: {:.0} characters/s (KV cache {})",
        drawn as f64 / seconds.max(f64::MIN_POSITIVE),
        if args.no_kv_cache { "off" } else { "on" }
    );
    Ok(())
}
