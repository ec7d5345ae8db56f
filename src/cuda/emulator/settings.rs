//! The emulator's settings: each is read from its environment variable the
//! first time it is needed, and a setter overrides it for the rest of the
//! process (the emulator's own tests use the setters).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use super::memory::GuardPlacement;
use super::scheduler::{ThreadOrder, random_seed};

static ORDER: Mutex<Option<ThreadOrder>> = Mutex::new(None);
static GUARD: AtomicU8 = AtomicU8::new(0);

fn env_setting(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
}

/// Parses a `KILN_CUDA_EMULATE_ORDER` value.
pub fn parse_thread_order(text: &str) -> Result<ThreadOrder, String> {
    match text {
        "forward" => Ok(ThreadOrder::Forward),
        "reverse" => Ok(ThreadOrder::Reverse),
        "random" => Ok(ThreadOrder::Random(random_seed())),
        other => match other.strip_prefix("random:").map(str::parse::<u64>) {
            Some(Ok(seed)) => Ok(ThreadOrder::Random(seed)),
            _ => Err(format!(
                "KILN_CUDA_EMULATE_ORDER={other} is not an order: use forward, reverse, random or random:<seed>"
            )),
        },
    }
}

/// The order emulated threads run in: set by [`set_thread_order`], else
/// from `KILN_CUDA_EMULATE_ORDER`, else forward.
pub fn thread_order() -> Result<ThreadOrder, String> {
    let mut order = ORDER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(order) = *order {
        return Ok(order);
    }
    let parsed = match env_setting("KILN_CUDA_EMULATE_ORDER") {
        Some(text) => parse_thread_order(&text)?,
        None => ThreadOrder::Forward,
    };
    *order = Some(parsed);
    Ok(parsed)
}

/// Runs later launches in `order`.
pub fn set_thread_order(order: ThreadOrder) {
    *ORDER.lock().unwrap_or_else(|e| e.into_inner()) = Some(order);
}

/// Where new buffers' guard pages go: set by [`set_guard_placement`], else
/// from `KILN_CUDA_EMULATE_GUARD`, else after.
pub fn guard_placement() -> Result<GuardPlacement, String> {
    match GUARD.load(Ordering::Relaxed) {
        1 => return Ok(GuardPlacement::After),
        2 => return Ok(GuardPlacement::Before),
        _ => {}
    }
    match env_setting("KILN_CUDA_EMULATE_GUARD").as_deref() {
        None | Some("after") => Ok(GuardPlacement::After),
        Some("before") => Ok(GuardPlacement::Before),
        Some(other) => Err(format!(
            "KILN_CUDA_EMULATE_GUARD={other} is not a placement: use after or before"
        )),
    }
}

/// Places the guard page of buffers the driver allocates from now on.
pub fn set_guard_placement(placement: GuardPlacement) {
    let code = match placement {
        GuardPlacement::After => 1,
        GuardPlacement::Before => 2,
    };
    GUARD.store(code, Ordering::Relaxed);
}

static TIMEOUT_MS: AtomicU64 = AtomicU64::new(0);

/// The longest a launch may run: set by [`set_launch_timeout`], else
/// `KILN_CUDA_EMULATE_TIMEOUT` (seconds), else 600 s. Past it the launch
/// stops with an error naming where its threads were (an endless loop?).
pub fn launch_timeout() -> Result<Duration, String> {
    match TIMEOUT_MS.load(Ordering::Relaxed) {
        0 => {}
        ms => return Ok(Duration::from_millis(ms)),
    }
    match env_setting("KILN_CUDA_EMULATE_TIMEOUT") {
        None => Ok(Duration::from_secs(600)),
        Some(text) => match text.parse::<f64>() {
            Ok(seconds) if seconds > 0.0 && seconds.is_finite() => {
                Ok(Duration::from_secs_f64(seconds))
            }
            _ => Err(format!(
                "KILN_CUDA_EMULATE_TIMEOUT={text} is not a time limit: give seconds, e.g. 600"
            )),
        },
    }
}

/// Limits later launches to `limit` (at least a millisecond).
pub fn set_launch_timeout(limit: Duration) {
    TIMEOUT_MS.store(limit.as_millis().max(1) as u64, Ordering::Relaxed);
}

static RACECHECK: AtomicU8 = AtomicU8::new(0);

/// Whether shared-memory accesses are checked for races: set by
/// [`set_racecheck`], else `KILN_CUDA_EMULATE_RACECHECK` (`1`, the default,
/// or `0`).
pub fn racecheck() -> Result<bool, String> {
    match RACECHECK.load(Ordering::Relaxed) {
        1 => return Ok(true),
        2 => return Ok(false),
        _ => {}
    }
    match env_setting("KILN_CUDA_EMULATE_RACECHECK").as_deref() {
        None | Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(other) => Err(format!(
            "KILN_CUDA_EMULATE_RACECHECK={other} is not a switch: use 1 or 0"
        )),
    }
}

/// Turns racecheck on or off for later launches.
pub fn set_racecheck(enabled: bool) {
    RACECHECK.store(if enabled { 1 } else { 2 }, Ordering::Relaxed);
}

/// The arch the emulated device reports: `KILN_CUDA_EMULATE_ARCH`, else sm_90.
pub fn emulated_arch() -> Result<String, String> {
    match env_setting("KILN_CUDA_EMULATE_ARCH").as_deref() {
        None | Some("sm_90") => Ok("sm_90".into()),
        Some("sm_80") => Ok("sm_80".into()),
        Some(other) => Err(format!(
            "KILN_CUDA_EMULATE_ARCH={other} is not emulated: use sm_90 or sm_80"
        )),
    }
}
