//! The emulated device's memory: every block the caching allocator asks for
//! is its own mapping, placed against an inaccessible guard page, so an
//! access past the block faults at once (and the fault handler names the
//! kernel). The allocator rounds requests up to size classes, so a one
//! element overrun usually stays inside the block: everything in the mapping
//! outside the bytes a tensor asked for holds a canary, a NaN bit pattern.
//! A read of it shows up as NaN in the results; a write to it is found by
//! [`DeviceMemory::check_canaries`] after every launch.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Which side of a block its guard page is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardPlacement {
    /// The block ends where the guard page starts: catches overruns.
    After,
    /// The block starts where the guard page ends: catches underruns.
    Before,
}

/// A quiet NaN as f32 (and an absurd index as u32): what the bytes around a
/// tensor's data hold.
pub(crate) const CANARY: u32 = 0x7FC1_DEAD;

const PAGE: usize = 4096;

#[derive(Debug)]
struct Block {
    /// Start and length of the whole mapping, guard page included.
    map_start: usize,
    map_len: usize,
    /// The accessible pages.
    usable_start: usize,
    usable_len: usize,
    /// The block handed to the allocator, and the bytes its tensor uses.
    class: usize,
    live: usize,
    placement: GuardPlacement,
}

impl Block {
    fn guard(&self) -> (usize, usize) {
        match self.placement {
            GuardPlacement::After => (self.usable_start + self.usable_len, PAGE),
            GuardPlacement::Before => (self.map_start, PAGE),
        }
    }
}

/// All live mappings, keyed by the address the allocator was given.
#[derive(Default)]
pub(crate) struct DeviceMemory {
    blocks: Mutex<BTreeMap<usize, Block>>,
}

/// The canary byte at `addr`: CANARY's little-endian bytes repeated, so
/// that an aligned word reads CANARY whatever the byte range around it.
fn canary_byte(addr: usize) -> u8 {
    CANARY.to_le_bytes()[addr % 4]
}

/// Writes the canary over [start, end): words where aligned, bytes at the
/// unaligned ends (a 16-bit tensor's live bytes can end mid-word).
fn fill_canary(start: usize, end: usize) {
    let mut at = start;
    // SAFETY (all writes): [start, end) lies in a mapping this module owns;
    // the word writes are at 4-byte-aligned addresses.
    while at < end {
        if at.is_multiple_of(4) && at + 4 <= end {
            unsafe { (at as *mut u32).write(CANARY) };
            at += 4;
        } else {
            unsafe { (at as *mut u8).write(canary_byte(at)) };
            at += 1;
        }
    }
}

/// The first address in [start, end) whose byte is not the canary's.
fn first_damaged(start: usize, end: usize) -> Option<usize> {
    // SAFETY: as fill_canary; the range is readable.
    let bytes = unsafe { std::slice::from_raw_parts(start as *const u8, end - start) };
    bytes
        .iter()
        .enumerate()
        .position(|(i, &b)| b != canary_byte(start + i))
        .map(|i| start + i)
}

impl DeviceMemory {
    /// A new block of `class` bytes against a guard page.
    pub(crate) fn allocate(&self, class: usize, placement: GuardPlacement) -> Result<u64, String> {
        let usable_len = class.max(1).div_ceil(PAGE) * PAGE;
        let map_len = usable_len + PAGE;
        // SAFETY: a fresh anonymous mapping; nothing else refers to it.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(format!(
                "emulated device out of memory: mmap of {map_len} bytes failed ({})",
                std::io::Error::last_os_error()
            ));
        }
        let map_start = map as usize;
        let (usable_start, guard_start, ptr) = match placement {
            GuardPlacement::After => (
                map_start,
                map_start + usable_len,
                map_start + usable_len - class,
            ),
            GuardPlacement::Before => (map_start + PAGE, map_start, map_start + PAGE),
        };
        // SAFETY: the guard page lies inside the mapping just made.
        if unsafe { libc::mprotect(guard_start as *mut libc::c_void, PAGE, libc::PROT_NONE) } != 0 {
            let error = std::io::Error::last_os_error();
            // SAFETY: unmapping what was mapped above.
            unsafe { libc::munmap(map, map_len) };
            return Err(format!(
                "emulated device: mprotect of a guard page failed ({error})"
            ));
        }
        fill_canary(usable_start, usable_start + usable_len);
        let block = Block {
            map_start,
            map_len,
            usable_start,
            usable_len,
            class,
            live: 0,
            placement,
        };
        self.lock().insert(ptr, block);
        Ok(ptr as u64)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, Block>> {
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Unmaps a block the allocator gave back to the driver.
    pub(crate) fn release(&self, ptr: u64) {
        if let Some(block) = self.lock().remove(&(ptr as usize)) {
            // SAFETY: the mapping was made by `allocate` and nothing refers to it.
            unsafe { libc::munmap(block.map_start as *mut libc::c_void, block.map_len) };
        }
    }

    /// A block is handed to a tensor that uses its first `live` bytes: those
    /// are NaN-poisoned (every byte 0xFF), so an element no kernel writes
    /// shows up, and the rest of the mapping becomes canary again.
    pub(crate) fn hand_out(&self, ptr: u64, live: usize) {
        let mut blocks = self.lock();
        if let Some(block) = blocks.get_mut(&(ptr as usize)) {
            let ptr = ptr as usize;
            block.live = live.min(block.class);
            fill_canary(block.usable_start, ptr);
            // SAFETY: the live bytes lie inside the block.
            unsafe { std::ptr::write_bytes(ptr as *mut u8, 0xFF, block.live) };
            fill_canary(ptr + block.live, block.usable_start + block.usable_len);
        }
    }

    /// Blocks whose address range contains one of `words` (the 8-byte words
    /// of a kernel's parameter struct: the pointers it was given).
    pub(crate) fn blocks_named_by(&self, words: impl Iterator<Item = u64>) -> Vec<u64> {
        let blocks = self.lock();
        let mut found: Vec<u64> = words
            .filter_map(|w| {
                let w = w as usize;
                let (&ptr, block) = blocks.range(..=w).next_back()?;
                (w < ptr + block.class.max(1)).then_some(ptr as u64)
            })
            .collect();
        found.sort_unstable();
        found.dedup();
        found
    }

    /// Checks that the canary around each block's live bytes is intact;
    /// describes the first damaged byte of the first damaged block.
    pub(crate) fn check_canaries(&self, ptrs: &[u64]) -> Result<(), String> {
        let blocks = self.lock();
        for &ptr in ptrs {
            let start = ptr as usize;
            let Some(block) = blocks.get(&start) else {
                continue;
            };
            let live_end = start + block.live;
            let usable_end = block.usable_start + block.usable_len;
            if let Some(at) = first_damaged(live_end, usable_end) {
                return Err(format!(
                    "wrote past the end of a {}-byte device buffer at 0x{start:x}: byte {} \
                     (that is {} bytes past its end) was overwritten",
                    block.live,
                    at - start,
                    at - live_end
                ));
            }
            if let Some(at) = first_damaged(block.usable_start, start) {
                return Err(format!(
                    "wrote before the start of a {}-byte device buffer at 0x{start:x}: \
                     {} bytes before its start was overwritten",
                    block.live,
                    start - at
                ));
            }
        }
        Ok(())
    }

    /// If `addr` lies in a block's guard page: where, relative to the block.
    pub(crate) fn describe_guard_hit(&self, addr: usize) -> Option<String> {
        let blocks = self.lock();
        let candidates = blocks
            .range(..=addr)
            .next_back()
            .into_iter()
            .chain(blocks.range(addr..).next());
        for (&ptr, block) in candidates {
            let (guard_start, guard_len) = block.guard();
            if addr < guard_start || addr >= guard_start + guard_len {
                continue;
            }
            return Some(if addr >= ptr {
                format!(
                    "address 0x{addr:x} is {} bytes past the end of a {}-byte device buffer at 0x{ptr:x} \
                     (its guard page)",
                    addr - (ptr + block.live),
                    block.live
                )
            } else {
                format!(
                    "address 0x{addr:x} is {} bytes before the start of a {}-byte device buffer at 0x{ptr:x} \
                     (its guard page)",
                    ptr - addr,
                    block.live
                )
            });
        }
        None
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        for (_, block) in std::mem::take(&mut *self.lock()) {
            // SAFETY: the device is gone, so nothing refers to its memory.
            unsafe { libc::munmap(block.map_start as *mut libc::c_void, block.map_len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canaries_surround_the_live_bytes_and_damage_is_reported() {
        let memory = DeviceMemory::default();
        let ptr = memory.allocate(512, GuardPlacement::After).unwrap();
        memory.hand_out(ptr, 400);
        assert_eq!(ptr as usize % 512, 0);
        memory.check_canaries(&[ptr]).unwrap();
        // SAFETY: inside the block.
        unsafe { ((ptr as usize + 400) as *mut f32).write(1.0) };
        let error = memory.check_canaries(&[ptr]).unwrap_err();
        assert!(error.contains("0 bytes past its end"), "{error}");
        assert_eq!(memory.blocks_named_by([ptr + 8, 7].into_iter()), vec![ptr]);
        let guard = ptr as usize + 512;
        let hit = memory.describe_guard_hit(guard).unwrap();
        assert!(
            hit.contains("112 bytes past the end of a 400-byte"),
            "{hit}"
        );
        memory.release(ptr);
    }

    #[test]
    fn a_block_can_sit_after_its_guard_page() {
        let memory = DeviceMemory::default();
        let ptr = memory.allocate(1024, GuardPlacement::Before).unwrap();
        memory.hand_out(ptr, 1024);
        let hit = memory.describe_guard_hit(ptr as usize - 4).unwrap();
        assert!(hit.contains("4 bytes before the start"), "{hit}");
    }
}
