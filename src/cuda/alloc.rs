//! A caching device allocator. cudaMalloc/cudaFree are slow and
//! synchronising, and a training step allocates the same sizes every time,
//! so freed blocks go to a free list of their size class and are handed out
//! again. All kernels run on one stream, so a block reused by a later kernel
//! is only touched after the earlier kernels that used it.

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::driver::sys::CUdeviceptr;

/// Bytes currently handed out, the peak of that, and bytes held from the driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub bytes_in_use: usize,
    pub peak_bytes_in_use: usize,
    pub bytes_reserved: usize,
}

#[derive(Default)]
pub(crate) struct Allocator {
    state: Mutex<AllocatorState>,
}

#[derive(Default)]
struct AllocatorState {
    free: HashMap<usize, Vec<CUdeviceptr>>,
    stats: MemoryStats,
}

/// Size classes: multiples of 512 bytes up to 1 MiB, then powers of two (so
/// reuse wastes at most half a block, and small tensors waste little).
pub(crate) fn size_class(bytes: usize) -> usize {
    const SMALL: usize = 512;
    const LARGE: usize = 1 << 20;
    let bytes = bytes.max(1);
    if bytes <= LARGE {
        bytes.div_ceil(SMALL) * SMALL
    } else {
        bytes.next_power_of_two()
    }
}

impl Allocator {
    /// A block of at least `bytes`: reused if one of its class is free, else
    /// from `fresh` (which calls the driver), retried once after releasing
    /// the cache to the driver if memory is short.
    pub(crate) fn allocate<E>(
        &self,
        bytes: usize,
        fresh: impl Fn(usize) -> Result<CUdeviceptr, E>,
        release: impl Fn(CUdeviceptr),
    ) -> Result<(CUdeviceptr, usize), E> {
        let class = size_class(bytes);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let reused = state.free.get_mut(&class).and_then(Vec::pop);
        let ptr = match reused {
            Some(ptr) => ptr,
            None => {
                let ptr = match fresh(class) {
                    Ok(ptr) => ptr,
                    Err(_) => {
                        Self::release_cached(&mut state, &release);
                        fresh(class)?
                    }
                };
                state.stats.bytes_reserved += class;
                ptr
            }
        };
        state.stats.bytes_in_use += class;
        state.stats.peak_bytes_in_use = state.stats.peak_bytes_in_use.max(state.stats.bytes_in_use);
        Ok((ptr, class))
    }

    /// Returns a block to its free list.
    pub(crate) fn free(&self, ptr: CUdeviceptr, class: usize) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.stats.bytes_in_use -= class;
        state.free.entry(class).or_default().push(ptr);
    }

    fn release_cached(state: &mut AllocatorState, release: &impl Fn(CUdeviceptr)) {
        for (class, blocks) in state.free.drain() {
            state.stats.bytes_reserved -= class * blocks.len();
            blocks.into_iter().for_each(release);
        }
    }

    pub(crate) fn stats(&self) -> MemoryStats {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn size_classes_round_up() {
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(512), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class((1 << 20) + 1), 1 << 21);
    }

    #[test]
    fn freed_blocks_are_reused_and_stats_track_use() {
        let allocator = Allocator::default();
        let next = Cell::new(0x1000u64);
        let fresh = |bytes: usize| -> Result<u64, ()> {
            let ptr = next.get();
            next.set(ptr + bytes as u64);
            Ok(ptr)
        };
        let (a, class) = allocator.allocate(1000, fresh, |_| {}).unwrap();
        assert_eq!(class, 1024);
        let (b, _) = allocator.allocate(600, fresh, |_| {}).unwrap();
        assert_ne!(a, b);
        allocator.free(a, class);
        let (c, _) = allocator.allocate(1024, fresh, |_| {}).unwrap();
        assert_eq!(c, a, "a freed block of the same class is reused");
        let stats = allocator.stats();
        assert_eq!(stats.bytes_in_use, 2048);
        assert_eq!(stats.peak_bytes_in_use, 2048);
        assert_eq!(stats.bytes_reserved, 2048);
    }

    #[test]
    fn out_of_memory_releases_the_cache_and_retries() {
        let allocator = Allocator::default();
        let calls = Cell::new(0);
        let released = Cell::new(0);
        let (a, class) = allocator
            .allocate(512, |_| Ok::<u64, ()>(1), |_| {})
            .unwrap();
        allocator.free(a, class);
        // The next fresh allocation fails once, then succeeds.
        let flaky = |_| {
            calls.set(calls.get() + 1);
            if calls.get() == 1 { Err(()) } else { Ok(2) }
        };
        let (b, _) = allocator
            .allocate(4096, flaky, |_| released.set(released.get() + 1))
            .unwrap();
        assert_eq!(b, 2);
        assert_eq!(released.get(), 1);
        assert_eq!(allocator.stats().bytes_reserved, 4096);
    }
}
