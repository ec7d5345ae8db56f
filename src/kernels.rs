//! The CUDA C sources of kernels/, embedded at build time by build.rs.

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

/// The source of `kernels/<name>`, if it exists.
pub fn source(name: &str) -> Option<&'static str> {
    KERNEL_SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
}
