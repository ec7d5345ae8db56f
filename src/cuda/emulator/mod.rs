//! The emulated CUDA device (`KILN_CUDA=emulate`): the driver calls kiln
//! makes — allocate, copy, memset, launch, synchronize — carried out on the
//! CPU, with kernels/ compiled for the host (see `host_compile`) and each
//! CUDA thread run as a coroutine (see `scheduler`). Everything above the
//! driver is kiln's real CUDA code, unchanged.
//!
//! It checks what a GPU and compute-sanitizer would, and reports each as an
//! error naming the kernel, block, thread and, where known, source line:
//! - launch limits: threads per block, `__launch_bounds__`, grid size, shared
//!   memory, parameter struct size (here);
//! - divergent or unreachable barriers and incomplete shuffles (`scheduler`);
//! - accesses past a buffer: guard pages and canaries (`memory`, `trap`);
//! - misaligned vector accesses, array-bound overruns and shared-memory
//!   races between barriers: the sanitizers the kernels are compiled with,
//!   whose hooks the prelude supplies (`host_compile`, `prelude.h`);
//! - launches that run past a time limit (`watchdog`);
//! - other races a missing barrier leaves, by running under two thread
//!   orders and comparing.
//!
//! Settings (`settings`; read when the device is created, and the setters
//! override them):
//! - `KILN_CUDA_EMULATE_ORDER` = `forward` (default) | `reverse` | `random`
//!   | `random:<seed>`: the order runnable threads and blocks go in;
//! - `KILN_CUDA_EMULATE_GUARD` = `after` (default) | `before`: which side of
//!   each new buffer its guard page is on;
//! - `KILN_CUDA_EMULATE_ARCH` = `sm_90` (default) | `sm_80`: the reported
//!   compute capability;
//! - `KILN_CUDA_EMULATE_RACECHECK` = `1` (default) | `0`: check shared-memory
//!   accesses for races;
//! - `KILN_CUDA_EMULATE_TIMEOUT` = seconds (default 600): the longest a
//!   launch may run before it stops with an error;
//! - `KILN_CUDA_EMULATE_LAUNCH_LOG` = a file that gets one `file kernel` line
//!   the first time each kernel is launched (the coverage check reads it).

mod host_compile;
mod memory;
mod scheduler;
mod settings;
mod symbols;
mod trap;
mod watchdog;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cudarc::driver::LaunchConfig;

pub use memory::GuardPlacement;
pub use scheduler::ThreadOrder;
pub use settings::{
    emulated_arch, guard_placement, launch_timeout, parse_thread_order, racecheck,
    set_guard_placement, set_launch_timeout, set_racecheck, set_thread_order, thread_order,
};

use host_compile::HostModule;
use memory::DeviceMemory;
use scheduler::{Grid, LaunchFault, StackPool};
use symbols::{source_line, with_source_lines};

/// Shared memory a block may use without the opt-in attribute kiln never sets.
pub const MAX_SHARED_BYTES_PER_BLOCK: usize = 48 * 1024;
/// The driver's limits on a launch's shape.
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;
pub const MAX_BLOCK_DIM: [u32; 3] = [1024, 1024, 64];
pub const MAX_GRID_DIM: [u32; 3] = [i32::MAX as u32, 65_535, 65_535];

/// Launches per (file, kernel) in this process, on the emulated device.
pub fn launch_counts() -> BTreeMap<(String, String), u64> {
    launches().lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn launches() -> &'static Mutex<BTreeMap<(String, String), u64>> {
    static LAUNCHES: OnceLock<Mutex<BTreeMap<(String, String), u64>>> = OnceLock::new();
    LAUNCHES.get_or_init(Default::default)
}

fn record_launch(file: &str, kernel: &str) {
    let mut counts = launches().lock().unwrap_or_else(|e| e.into_inner());
    let count = counts
        .entry((file.to_string(), kernel.to_string()))
        .or_insert(0);
    *count += 1;
    if *count == 1
        && let Some(path) = std::env::var_os("KILN_CUDA_EMULATE_LAUNCH_LOG")
    {
        // One short append per kernel: concurrent test processes interleave
        // whole lines. A log that cannot be written fails the coverage check.
        if let Ok(mut log) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = log.write_all(format!("{file} {kernel}\n").as_bytes());
        }
    }
}

/// Launches run one at a time, as on one stream; the lock also guards the
/// modules' built-in variables and static shared memory, and holds the
/// coroutine stacks the launches reuse.
static LAUNCH: Mutex<StackPool> = Mutex::new(StackPool::new());

/// A kernel file's module, compiled on first use.
type ModuleSlot = Arc<Mutex<Option<Arc<HostModule>>>>;

/// The emulated device's driver.
pub(crate) struct Emulator {
    memory: DeviceMemory,
    modules: Mutex<HashMap<&'static str, ModuleSlot>>,
}

impl Emulator {
    pub(crate) fn new() -> Result<Emulator, String> {
        settings::current()?;
        trap::install();
        Ok(Emulator {
            memory: DeviceMemory::default(),
            modules: Mutex::default(),
        })
    }

    pub(crate) fn malloc(&self, bytes: usize) -> Result<u64, String> {
        self.memory.allocate(bytes, settings::current()?.guard)
    }

    pub(crate) fn free(&self, ptr: u64) {
        self.memory.release(ptr);
    }

    /// A pooled block now holds a tensor of `live` bytes (poisoned, and
    /// surrounded by canary).
    pub(crate) fn hand_out(&self, ptr: u64, live: usize) {
        self.memory.hand_out(ptr, live);
    }

    /// Device memory is host memory: copies are memcpy.
    ///
    /// # Safety
    /// `dst` and `src` must be valid for `bytes`.
    pub(crate) unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) {
        // SAFETY: the caller's contract; device buffers never overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
    }

    /// # Safety
    /// `ptr` must be valid for `bytes`.
    pub(crate) unsafe fn memset(&self, ptr: u64, value: u8, bytes: usize) {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, value, bytes) };
    }

    fn module(&self, file: &'static str) -> Result<Arc<HostModule>, String> {
        let slot = self
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(file)
            .or_default()
            .clone();
        // Compiling one file does not hold up launches from others.
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(module) = slot.as_ref() {
            return Ok(module.clone());
        }
        let module = Arc::new(host_compile::load(file)?);
        *slot = Some(module.clone());
        Ok(module)
    }

    /// Runs `kernel` of `file` to completion, with its parameter struct's bytes.
    pub(crate) fn launch(
        &self,
        file: &'static str,
        kernel: &'static str,
        config: LaunchConfig,
        params: &[u8],
    ) -> Result<(), String> {
        let module = self.module(file)?;
        let entry = *module
            .kernels
            .get(kernel)
            .ok_or_else(|| format!("kernel {kernel} not found in kernels/{file}"))?;
        if entry.param_size != params.len() {
            return Err(format!(
                "parameter struct size mismatch: the Rust struct is {} bytes but {kernel}'s in kernels/{file} is {} \
                 (the two definitions have drifted apart)",
                params.len(),
                entry.param_size
            ));
        }
        check_launch_shape(kernel, &config, entry.max_threads_per_block)?;
        let shared = entry.static_shared_bytes + config.shared_mem_bytes as usize;
        if shared > MAX_SHARED_BYTES_PER_BLOCK {
            return Err(format!(
                "too much shared memory: {} bytes static + {} dynamic > {MAX_SHARED_BYTES_PER_BLOCK} a block",
                entry.static_shared_bytes, config.shared_mem_bytes
            ));
        }
        let settings = settings::current()?;
        let grid = Grid {
            invoke: entry.invoke,
            params: params.to_vec(),
            state: module.state,
            shared: module.shared,
            grid: [config.grid_dim.0, config.grid_dim.1, config.grid_dim.2],
            block: [config.block_dim.0, config.block_dim.1, config.block_dim.2],
            order: settings.order,
            racecheck: settings.racecheck,
        };
        let words = params
            .chunks_exact(8)
            .map(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")));
        let buffers = self.memory.blocks_named_by(words);
        let limit = settings.timeout;
        trap::ensure_alternate_stack();
        let mut stacks = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
        let timer = watchdog::arm(limit);
        let ran = scheduler::run_grid(&grid, &mut stacks);
        drop(timer);
        ran.map_err(|fault| self.describe(fault, &module, limit))?;
        self.memory.check_canaries(&buffers)?;
        record_launch(file, kernel);
        Ok(())
    }

    fn describe(&self, fault: LaunchFault, module: &HostModule, limit: Duration) -> String {
        let [bx, by, bz] = fault.block;
        let thread = fault
            .thread
            .map(|[x, y, z]| format!(", thread ({x},{y},{z})"))
            .unwrap_or_default();
        let over_time = format!(
            "the launch ran longer than its limit of {:.1} s (KILN_CUDA_EMULATE_TIMEOUT): an endless loop?",
            limit.as_secs_f64()
        );
        let message = match fault.raw {
            None if fault.message == scheduler::TIMED_OUT => over_time,
            None => with_source_lines(&fault.message, module),
            Some(raw) if raw.signal == watchdog::signal() => format!(
                "{over_time} This thread was at {}",
                source_line(module, raw.instruction)
            ),
            Some(raw) => {
                let access = if raw.write { "write" } else { "read" };
                let what = match self.memory.describe_guard_hit(raw.address) {
                    Some(what) => what,
                    // A fault right at the stack pointer is the stack's guard page.
                    None if raw.address.abs_diff(raw.stack_pointer) <= 2 * 4096 => format!(
                        "stack overflow: the thread used up its {} KiB stack (deep recursion or \
                         large local arrays)",
                        scheduler::THREAD_STACK_BYTES / 1024
                    ),
                    None => format!("address 0x{:x} is not in any device buffer", raw.address),
                };
                let signal = if raw.signal == libc::SIGBUS {
                    "SIGBUS"
                } else {
                    "SIGSEGV"
                };
                format!(
                    "invalid {access} ({signal}): {what}; at {}",
                    source_line(module, raw.instruction)
                )
            }
        };
        format!("block ({bx},{by},{bz}){thread}: {message}")
    }
}

/// The driver's checks on a launch's shape.
fn check_launch_shape(kernel: &str, config: &LaunchConfig, bound: u32) -> Result<(), String> {
    let block = [config.block_dim.0, config.block_dim.1, config.block_dim.2];
    let grid = [config.grid_dim.0, config.grid_dim.1, config.grid_dim.2];
    let threads = block.iter().map(|&d| d as u64).product::<u64>();
    if threads > MAX_THREADS_PER_BLOCK as u64 {
        return Err(format!(
            "invalid launch: {threads} threads a block ({block:?}) exceeds the device limit of {MAX_THREADS_PER_BLOCK}"
        ));
    }
    if threads > bound as u64 {
        return Err(format!(
            "invalid launch: {threads} threads a block exceeds {kernel}'s __launch_bounds__ of {bound} \
             (the driver refuses it: too many resources requested for launch)"
        ));
    }
    for (axis, ((&b, &g), (&max_b, &max_g))) in block
        .iter()
        .zip(&grid)
        .zip(MAX_BLOCK_DIM.iter().zip(&MAX_GRID_DIM))
        .enumerate()
    {
        let axis = ["x", "y", "z"][axis];
        if b == 0 || g == 0 {
            return Err(format!(
                "invalid launch: a zero dimension (grid {grid:?}, block {block:?})"
            ));
        }
        if b > max_b {
            return Err(format!(
                "invalid launch: blockDim.{axis} = {b} exceeds {max_b}"
            ));
        }
        if g > max_g {
            return Err(format!(
                "invalid launch: gridDim.{axis} = {g} exceeds {max_g}"
            ));
        }
    }
    Ok(())
}
