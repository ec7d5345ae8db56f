//! The CUDA C sources of kernels/, embedded at build time by build.rs, and
//! any extra kernel files a program registers (the emulator's fault tests
//! compile deliberately broken kernels through the same path as kiln's own).

use std::sync::Mutex;

use crate::error::{Error, Result};

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

static REGISTERED: Mutex<Vec<(&'static str, &'static str)>> = Mutex::new(Vec::new());

/// The source of `kernels/<name>` or of a registered file, if it exists.
pub fn source(name: &str) -> Option<&'static str> {
    KERNEL_SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .or_else(|| {
            REGISTERED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, s)| *s)
        })
}

/// Makes `source` launchable as kernel file `name` (it may `#include` the
/// headers of kernels/), on hardware through NVRTC and on the emulator
/// through the host compiler. Registering the same text twice is a no-op;
/// a name taken by kernels/ or by different text is an error.
pub fn register_source(name: &'static str, source: &'static str) -> Result<()> {
    let taken = |msg: String| Error::Cuda {
        op: "register_source",
        msg,
    };
    if KERNEL_SOURCES.iter().any(|(n, _)| *n == name) {
        return Err(taken(format!(
            "kernel file name {name} is already used by kernels/{name}; pick another name"
        )));
    }
    let mut registered = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    match registered.iter().find(|(n, _)| *n == name) {
        Some((_, existing)) if *existing == source => Ok(()),
        Some(_) => Err(taken(format!(
            "kernel file {name} is already registered with a different source"
        ))),
        None => {
            registered.push((name, source));
            Ok(())
        }
    }
}
