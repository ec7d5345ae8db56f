//! The emulated CUDA device (`KILN_CUDA=emulate`): the driver calls kiln
//! makes — allocate, copy, memset, launch, synchronize — carried out on the
//! CPU, with kernels/ compiled for the host (see `host_compile`) and each
//! CUDA thread run as a coroutine (see `scheduler`). Everything above the
//! driver is kiln's real CUDA code, unchanged.
//!
//! It checks what a GPU and compute-sanitizer would, and reports each as an
//! error naming the kernel, block, thread and, where known, source line:
//! launch limits (threads per block, `__launch_bounds__`, grid size, shared
//! memory, parameter struct size), launches that run past a time limit,
//! divergent or unreachable barriers,
//! incomplete shuffles, accesses past a buffer (guard pages and canaries),
//! misaligned vector accesses and array-bound overruns (sanitizers),
//! shared-memory hazards between barriers (racecheck, on the prelude's
//! thread-sanitizer hooks) and — run under two thread orders — other races
//! a missing barrier leaves.
//!
//! Settings (read when the device is created; the setters override them):
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
mod trap;
mod watchdog;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cudarc::driver::LaunchConfig;

pub use memory::GuardPlacement;
pub use scheduler::ThreadOrder;

use host_compile::HostModule;
use memory::DeviceMemory;
use scheduler::{Grid, LaunchFault, StackPool};

/// Shared memory a block may use without the opt-in attribute kiln never sets.
pub const MAX_SHARED_BYTES_PER_BLOCK: usize = 48 * 1024;
/// The driver's limits on a launch's shape.
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;
pub const MAX_BLOCK_DIM: [u32; 3] = [1024, 1024, 64];
pub const MAX_GRID_DIM: [u32; 3] = [i32::MAX as u32, 65_535, 65_535];

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
        "random" => Ok(ThreadOrder::Random(scheduler::random_seed())),
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

static TIMEOUT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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

/// Launches run one at a time, as on one stream; the lock also guards the
/// modules' built-in variables and static shared memory.
static LAUNCH: Mutex<()> = Mutex::new(());

/// A kernel file's module, compiled on first use.
type ModuleSlot = Arc<Mutex<Option<Arc<HostModule>>>>;

/// The emulated device's driver.
pub(crate) struct Emulator {
    memory: DeviceMemory,
    modules: Mutex<HashMap<&'static str, ModuleSlot>>,
    stacks: Mutex<StackPool>,
}

impl Emulator {
    pub(crate) fn new() -> Result<Emulator, String> {
        thread_order()?;
        guard_placement()?;
        racecheck()?;
        launch_timeout()?;
        trap::install();
        Ok(Emulator {
            memory: DeviceMemory::default(),
            modules: Mutex::default(),
            stacks: Mutex::default(),
        })
    }

    pub(crate) fn malloc(&self, bytes: usize) -> Result<u64, String> {
        self.memory.allocate(bytes, guard_placement()?)
    }

    pub(crate) fn free(&self, ptr: u64) {
        self.memory.release(ptr);
    }

    /// A pooled block now holds a tensor of `live` bytes.
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
        let grid = Grid {
            invoke: entry.invoke,
            params: params.to_vec(),
            state: module.state,
            shared: module.shared,
            grid: [config.grid_dim.0, config.grid_dim.1, config.grid_dim.2],
            block: [config.block_dim.0, config.block_dim.1, config.block_dim.2],
            order: thread_order()?,
            racecheck: racecheck()?,
        };
        let words = params
            .chunks_exact(8)
            .map(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")));
        let buffers = self.memory.blocks_named_by(words);
        let limit = launch_timeout()?;
        trap::ensure_alternate_stack();
        let _serial = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
        let mut stacks = self.stacks.lock().unwrap_or_else(|e| e.into_inner());
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

/// A message from the prelude with its `@pc:0x…@` tokens (a return address
/// in kernel code) replaced by the source line of the call, and its
/// `@shared:0x…@` tokens (an offset into the module's shared memory) by the
/// `__shared__` variable there.
fn with_source_lines(message: &str, module: &HostModule) -> String {
    let mut out = String::new();
    let mut rest = message;
    while let Some(start) = rest.find('@') {
        let Some(len) = rest[start + 1..].find('@') else {
            break;
        };
        let token = &rest[start + 1..start + 1 + len];
        out.push_str(&rest[..start]);
        let value = |prefix: &str| {
            token
                .strip_prefix(prefix)
                .and_then(|hex| usize::from_str_radix(hex, 16).ok())
        };
        match (value("pc:0x"), value("shared:0x")) {
            // A return address points after the call; the call is one byte before.
            (Some(pc), _) => out.push_str(&source_line(module, pc.saturating_sub(1))),
            (_, Some(offset)) => out.push_str(&shared_variable(module, offset)),
            _ => out.push_str(&rest[start..start + len + 2]),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// "byte 512 of `partial` (in tree_sum(...))": the `__shared__` variable at
/// `offset` in the module's shared memory, read from its symbol table with
/// `nm`; the bare offset where that tool is missing.
fn shared_variable(module: &HostModule, offset: usize) -> String {
    let fallback = format!("byte {offset} of the module's shared memory");
    let address = module.shared.0 as usize + offset;
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the loader's tables.
    if unsafe { libc::dladdr(module.shared.0 as *const libc::c_void, &mut info) } == 0 {
        return fallback;
    }
    let relative = address - info.dli_fbase as usize;
    let Ok(output) = std::process::Command::new("nm")
        .args(["-C", "-S", "--defined-only"])
        .arg(&module.library_path)
        .output()
    else {
        return fallback;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let mut fields = line.splitn(4, ' ');
        let (Some(start), Some(size), Some(_kind), Some(name)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (Ok(start), Ok(size)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(size, 16),
        ) else {
            continue;
        };
        if (start..start + size).contains(&relative) {
            let (function, variable) = name.rsplit_once("::").unwrap_or(("", name));
            let within = if function.is_empty() {
                String::new()
            } else {
                format!(" (in {function})")
            };
            return format!("byte {} of `{variable}`{within}", relative - start);
        }
    }
    fallback
}

/// `file:line (function)` of an instruction in a module, via addr2line;
/// the library offset where that tool is missing.
fn source_line(module: &HostModule, instruction: usize) -> String {
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the loader's tables.
    let found = unsafe { libc::dladdr(instruction as *const libc::c_void, &mut info) } != 0;
    if !found || info.dli_fbase.is_null() {
        return format!("instruction 0x{instruction:x} (outside the kernel module)");
    }
    let offset = instruction - info.dli_fbase as usize;
    let lookup = std::process::Command::new("addr2line")
        .arg("-e")
        .arg(&module.library_path)
        .args(["-f", "-C", "-i"])
        .arg(format!("0x{offset:x}"))
        .output();
    if let Ok(output) = lookup
        && output.status.success()
    {
        let text = String::from_utf8_lossy(&output.stdout);
        // Pairs of lines (function, path:line), innermost inlined frame
        // first; keep the frames in kernel sources, as kernels/<file>:<line>.
        let frames: Vec<&str> = text
            .lines()
            .skip(1)
            .step_by(2)
            .filter_map(|location| location.find("kernels/").map(|at| &location[at..]))
            .map(|location| location.split(' ').next().unwrap_or(location))
            .collect();
        if !frames.is_empty() {
            return frames.join(", inlined from ");
        }
    }
    format!("{}+0x{offset:x}", module.library_path.display())
}
