//! Host memory reuse between training steps. A step allocates and frees the
//! same tensor sizes every time. glibc's malloc gives large freed blocks back
//! to the operating system (each block above `M_MMAP_THRESHOLD` is its own
//! mapping, and the heap is trimmed above `M_TRIM_THRESHOLD`), so every step
//! mapped its activations and gradients afresh: one page fault per 4 KiB
//! touched, 21 833 a step for the 4-layer GPT. Raising both thresholds keeps
//! freed memory in malloc's heap, where the next step finds it.
//!
//! kiln does this once, when the first tensor is made; set
//! `KILN_KEEP_FREED_MEMORY=0` to leave malloc as it is (a process that holds
//! its peak memory until exit is the price). Other C libraries and
//! allocators are left alone. The thresholds govern the main thread's arena,
//! where `kiln train` runs; a training loop on another thread gets an arena
//! of its own, made of heaps of at most 64 MiB that glibc unmaps as soon as
//! they empty, so a step that needs more than one heap still maps fresh
//! pages there.

use std::sync::Once;

/// Blocks up to this size come from malloc's heap rather than their own
/// mapping: glibc's largest allowed threshold on 64-bit targets.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;

/// Keeps freed host memory for reuse, once per process (see the module docs).
pub fn keep_freed_memory() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("KILN_KEEP_FREED_MEMORY").is_some_and(|v| v == "0") {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes malloc's tuning parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    });
}
