//! The emulator's settings: read from their environment variables once, the
//! first time any is needed (so a bad value is an error when the device is
//! created), and changed for the rest of the process by the setters (the
//! emulator's own tests use them).

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::memory::GuardPlacement;
use super::scheduler::{ThreadOrder, random_seed};

/// Everything a launch or an allocation reads.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub order: ThreadOrder,
    pub guard: GuardPlacement,
    pub racecheck: bool,
    pub timeout: Duration,
}

static SETTINGS: Mutex<Option<Settings>> = Mutex::new(None);

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

fn from_env() -> Result<Settings, String> {
    let order = match env_setting("KILN_CUDA_EMULATE_ORDER") {
        Some(text) => parse_thread_order(&text)?,
        None => ThreadOrder::Forward,
    };
    let guard = match env_setting("KILN_CUDA_EMULATE_GUARD").as_deref() {
        None | Some("after") => GuardPlacement::After,
        Some("before") => GuardPlacement::Before,
        Some(other) => {
            return Err(format!(
                "KILN_CUDA_EMULATE_GUARD={other} is not a placement: use after or before"
            ));
        }
    };
    let racecheck = match env_setting("KILN_CUDA_EMULATE_RACECHECK").as_deref() {
        None | Some("1") => true,
        Some("0") => false,
        Some(other) => {
            return Err(format!(
                "KILN_CUDA_EMULATE_RACECHECK={other} is not a switch: use 1 or 0"
            ));
        }
    };
    let timeout = match env_setting("KILN_CUDA_EMULATE_TIMEOUT") {
        None => Duration::from_secs(600),
        Some(text) => match text.parse::<f64>() {
            Ok(seconds) if seconds > 0.0 && seconds.is_finite() => Duration::from_secs_f64(seconds),
            _ => {
                return Err(format!(
                    "KILN_CUDA_EMULATE_TIMEOUT={text} is not a time limit: give seconds, e.g. 600"
                ));
            }
        },
    };
    Ok(Settings {
        order,
        guard,
        racecheck,
        timeout,
    })
}

/// The settings, read from the environment on first use.
fn settings() -> Result<MutexGuard<'static, Option<Settings>>, String> {
    let mut slot = SETTINGS.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        *slot = Some(from_env()?);
    }
    Ok(slot)
}

/// All settings at once (what a launch reads).
pub(crate) fn current() -> Result<Settings, String> {
    Ok(settings()?.expect("resolved above"))
}

/// Changes one setting; a no-op while the environment holds an invalid
/// value (the emulated device cannot be opened then anyway).
fn change(f: impl FnOnce(&mut Settings)) {
    if let Ok(mut slot) = settings() {
        f(slot.as_mut().expect("resolved above"));
    }
}

/// The order emulated threads and blocks run in: `KILN_CUDA_EMULATE_ORDER`
/// = `forward` (default) | `reverse` | `random` | `random:<seed>`.
pub fn thread_order() -> Result<ThreadOrder, String> {
    Ok(current()?.order)
}

/// Runs later launches in `order`.
pub fn set_thread_order(order: ThreadOrder) {
    change(|s| s.order = order);
}

/// Where new buffers' guard pages go: `KILN_CUDA_EMULATE_GUARD` = `after`
/// (default) | `before`.
pub fn guard_placement() -> Result<GuardPlacement, String> {
    Ok(current()?.guard)
}

/// Places the guard page of buffers the driver allocates from now on.
pub fn set_guard_placement(placement: GuardPlacement) {
    change(|s| s.guard = placement);
}

/// The longest a launch may run: `KILN_CUDA_EMULATE_TIMEOUT` (seconds,
/// default 600). Past it the launch stops with an error naming where its
/// threads were (an endless loop?).
pub fn launch_timeout() -> Result<Duration, String> {
    Ok(current()?.timeout)
}

/// Limits later launches to `limit` (at least a millisecond).
pub fn set_launch_timeout(limit: Duration) {
    change(|s| s.timeout = limit.max(Duration::from_millis(1)));
}

/// Whether shared-memory accesses are checked for races:
/// `KILN_CUDA_EMULATE_RACECHECK` = `1` (default) | `0`.
pub fn racecheck() -> Result<bool, String> {
    Ok(current()?.racecheck)
}

/// Turns racecheck on or off for later launches.
pub fn set_racecheck(enabled: bool) {
    change(|s| s.racecheck = enabled);
}

/// The arch the emulated device reports: `KILN_CUDA_EMULATE_ARCH`, else
/// sm_90 (read once, when the device is created).
pub fn emulated_arch() -> Result<String, String> {
    match env_setting("KILN_CUDA_EMULATE_ARCH").as_deref() {
        None | Some("sm_90") => Ok("sm_90".into()),
        Some("sm_80") => Ok("sm_80".into()),
        Some(other) => Err(format!(
            "KILN_CUDA_EMULATE_ARCH={other} is not emulated: use sm_90 or sm_80"
        )),
    }
}
