//! Refusing, before it starts, work whose size comes from a user's numbers
//! and cannot fit: a model whose sizes (`--n-embd 100000`, `--n-layer
//! 1000000`, or a damaged checkpoint.json) need more memory than the
//! machine has free would otherwise abort in the allocator or crawl into
//! swap, after minutes, with no useful message.

use anyhow::{Result, bail};

/// Bytes per parameter while training: the f32 weight, its f32 gradient,
/// Adam's two f32 moments and a 16-bit forward copy. Activations come on
/// top, so this is a floor.
pub const TRAINING_BYTES_PER_PARAMETER: u64 = 4 + 4 + 8 + 2;

/// Bytes per parameter of a model that is only built (f32 weights).
pub const BUILD_BYTES_PER_PARAMETER: u64 = 4;

/// Memory the system can give a new allocation without swapping, where it
/// says (Linux: `MemAvailable` in /proc/meminfo).
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses `what` (e.g. "training the GPT") when its `parameters` at
/// `bytes_per_parameter` need more memory than is available.
pub fn check_fits(what: &str, parameters: u128, bytes_per_parameter: u64) -> Result<()> {
    let needed = parameters.saturating_mul(bytes_per_parameter as u128);
    let Some(available) = available_memory() else {
        return Ok(());
    };
    if needed > available as u128 {
        bail!(
            "{what} needs at least {} for its {parameters} parameters, but {} of memory is available; choose smaller sizes",
            gib(needed),
            gib(available as u128)
        );
    }
    Ok(())
}

fn gib(bytes: u128) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}
