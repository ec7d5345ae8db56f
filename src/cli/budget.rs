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

/// Memory the system can give a new allocation without swapping, where it
/// says (Linux: `MemAvailable` in /proc/meminfo).
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses `what` (e.g. "training the GPT") when its `parameters` need
/// more memory for training than is available.
pub fn check_training_fits(what: &str, parameters: u128) -> Result<()> {
    let needed = parameters.saturating_mul(TRAINING_BYTES_PER_PARAMETER as u128);
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

/// `12.3 GiB`-style sizes for messages.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
