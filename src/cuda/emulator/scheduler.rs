//! Running a grid: blocks one after another, and inside a block every CUDA
//! thread as a stackful coroutine (corosensei, 64 KiB stacks with guard
//! pages, reused across threads and launches).
//!
//! A thread runs until it reaches a rendezvous — `__syncthreads`, a shuffle,
//! a vote, `__syncwarp` — or returns. When no thread of the block can run,
//! the scheduler settles what the waiting threads are owed:
//! - a warp-level operation completes when every lane named in its mask
//!   waits at the same call site with the same mask; each lane then gets its
//!   value. A named lane that has exited, waits at `__syncthreads`, or does
//!   not exist is an error (on hardware: undefined, often a hang).
//! - `__syncthreads` completes when every thread of the block waits at the
//!   same call site. Threads waiting at different sites, or some threads
//!   waiting while others have already returned, is an error. That is the
//!   policy for early returns: CUDA allows a barrier only in code every
//!   thread of the block reaches, so a thread that returns before a barrier
//!   its block still waits at is reported, not silently counted as arrived.
//!   Threads that return after the block's last barrier are fine.
//!
//! Nothing runs in lockstep, and the order in which runnable threads (and
//! blocks) go is `forward`, `reverse` or seeded `random`: a kernel whose
//! result depends on it is missing a barrier.

use std::ffi::{CStr, c_char, c_void};
use std::fmt;

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use super::{trap, watchdog};

/// What a launch stopped by the watchdog between two threads reports.
pub(crate) const TIMED_OUT: &str = "the launch ran past its time limit";

/// Bytes of stack each emulated thread gets (plus a guard page).
pub(crate) const THREAD_STACK_BYTES: usize = 64 * 1024;

/// How the coroutine of one CUDA thread ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ThreadOutcome {
    Finished,
    /// A fault signal; the details are in `trap::take_fault`.
    Trapped,
}

/// The order in which runnable threads and blocks are run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadOrder {
    Forward,
    Reverse,
    Random(u64),
}

impl fmt::Display for ThreadOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ThreadOrder::Forward => write!(f, "forward"),
            ThreadOrder::Reverse => write!(f, "reverse"),
            ThreadOrder::Random(seed) => write!(f, "random:{seed}"),
        }
    }
}

/// A call site in a kernel source (`__FILE__`, `__LINE__`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Site {
    file: *const c_char,
    line: i32,
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SAFETY: `file` is a __FILE__ literal of a loaded module.
        let file = unsafe { CStr::from_ptr(self.file) }.to_string_lossy();
        write!(f, "{file}:{}", self.line)
    }
}

/// The warp-level operations of the prelude (`kiln_emu_warp_op`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WarpOp {
    ShuffleIdx,
    ShuffleUp,
    ShuffleDown,
    ShuffleXor,
    Ballot,
    Any,
    All,
    SyncWarp,
}

impl WarpOp {
    fn from_code(code: i32) -> Option<WarpOp> {
        Some(match code {
            0 => WarpOp::ShuffleIdx,
            1 => WarpOp::ShuffleUp,
            2 => WarpOp::ShuffleDown,
            3 => WarpOp::ShuffleXor,
            4 => WarpOp::Ballot,
            5 => WarpOp::Any,
            6 => WarpOp::All,
            7 => WarpOp::SyncWarp,
            _ => return None,
        })
    }

    fn cuda_name(self) -> &'static str {
        match self {
            WarpOp::ShuffleIdx => "__shfl_sync",
            WarpOp::ShuffleUp => "__shfl_up_sync",
            WarpOp::ShuffleDown => "__shfl_down_sync",
            WarpOp::ShuffleXor => "__shfl_xor_sync",
            WarpOp::Ballot => "__ballot_sync",
            WarpOp::Any => "__any_sync",
            WarpOp::All => "__all_sync",
            WarpOp::SyncWarp => "__syncwarp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WarpRequest {
    op: WarpOp,
    mask: u32,
    value: u64,
    arg: i32,
    width: i32,
    site: Site,
}

impl WarpRequest {
    /// Whether two lanes wait at the same operation: the same call site,
    /// mask and width. Values and arguments (a shuffle's source lane or
    /// delta) are each lane's own.
    fn same_operation(&self, other: &WarpRequest) -> bool {
        self.op == other.op
            && self.mask == other.mask
            && self.width == other.width
            && self.site == other.site
    }
}

/// What a suspended thread is waiting for.
pub(crate) enum Event {
    Barrier(Site),
    Warp(WarpRequest),
    Fault(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Runnable,
    AtBarrier(Site),
    AtWarp(WarpRequest),
    Done,
}

type ThreadCoroutine = Coroutine<u64, Event, ThreadOutcome, DefaultStack>;

thread_local! {
    static YIELDER: std::cell::Cell<*const Yielder<u64, Event>> =
        const { std::cell::Cell::new(std::ptr::null()) };
}

/// Suspends the calling emulated thread with `event`; returns what the
/// scheduler resumes it with.
fn suspend(event: Event) -> u64 {
    let yielder = YIELDER.with(|y| y.get());
    assert!(
        !yielder.is_null(),
        "a kernel rendezvous outside an emulated thread"
    );
    // SAFETY: set by the running coroutine from its own live Yielder.
    let resumed = unsafe { (*yielder).suspend(event) };
    // Other threads ran meanwhile and published their own yielder.
    YIELDER.with(|y| y.set(yielder));
    resumed
}

pub(crate) extern "C" fn runtime_syncthreads(file: *const c_char, line: i32) {
    suspend(Event::Barrier(Site { file, line }));
}

pub(crate) extern "C" fn runtime_warp_op(
    op: i32,
    mask: u32,
    value: u64,
    arg: i32,
    width: i32,
    file: *const c_char,
    line: i32,
) -> u64 {
    let site = Site { file, line };
    match WarpOp::from_code(op) {
        Some(op) => suspend(Event::Warp(WarpRequest {
            op,
            mask,
            value,
            arg,
            width,
            site,
        })),
        None => runtime_fault_message(format!("unknown warp operation {op} at {site}")),
    }
}

pub(crate) extern "C" fn runtime_fault(message: *const c_char) {
    // SAFETY: the prelude passes a NUL-terminated message.
    let message = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    runtime_fault_message(message);
}

fn runtime_fault_message(message: String) -> ! {
    suspend(Event::Fault(message));
    // A faulted thread is never resumed.
    std::process::abort()
}

/// The built-in variables of the running thread, as laid out in the prelude.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct ThreadState {
    pub thread_idx: [u32; 3],
    pub block_idx: [u32; 3],
    pub block_dim: [u32; 3],
    pub grid_dim: [u32; 3],
    /// Racecheck's clocks: moved on at every block start and released
    /// barrier, and per warp at every completed warp operation.
    pub epoch: u32,
    pub warp_epoch: [u32; 32],
    pub racecheck: i32,
}

/// Why a launch stopped: what went wrong, in which block and thread.
#[derive(Debug)]
pub(crate) struct LaunchFault {
    pub block: [u32; 3],
    pub thread: Option<[u32; 3]>,
    pub message: String,
    pub raw: Option<trap::RawFault>,
}

/// One kernel launch, ready to run.
pub(crate) struct Grid {
    pub invoke: unsafe extern "C" fn(*const c_void),
    pub params: Vec<u8>,
    pub state: *mut ThreadState,
    pub shared: (*mut u8, usize),
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub order: ThreadOrder,
    /// Check shared-memory accesses for races between barriers.
    pub racecheck: bool,
}

/// Reusable coroutine stacks (an emulated block holds up to 1024 at once).
pub(crate) struct StackPool {
    stacks: Vec<DefaultStack>,
}

impl StackPool {
    pub(crate) const fn new() -> StackPool {
        StackPool { stacks: Vec::new() }
    }

    fn take(&mut self) -> Result<DefaultStack, String> {
        match self.stacks.pop() {
            Some(stack) => Ok(stack),
            None => DefaultStack::new(THREAD_STACK_BYTES)
                .map_err(|e| format!("allocating an emulated thread's stack: {e}")),
        }
    }

    fn put(&mut self, stack: DefaultStack) {
        self.stacks.push(stack);
    }
}

fn coords(linear: usize, dims: [u32; 3]) -> [u32; 3] {
    let (x, y) = (dims[0] as usize, dims[1] as usize);
    [
        (linear % x) as u32,
        ((linear / x) % y) as u32,
        (linear / (x * y)) as u32,
    ]
}

/// Runs every block of `grid`; the first fault stops the launch.
pub(crate) fn run_grid(grid: &Grid, pool: &mut StackPool) -> Result<(), LaunchFault> {
    let blocks = grid.grid.iter().map(|&d| d as usize).product::<usize>();
    let mut rng = match grid.order {
        ThreadOrder::Random(seed) => Some(rand::rngs::StdRng::seed_from_u64(seed)),
        _ => None,
    };
    let block_order: Vec<usize> = match (grid.order, rng.as_mut()) {
        (ThreadOrder::Forward, _) => (0..blocks).collect(),
        (ThreadOrder::Reverse, _) => (0..blocks).rev().collect(),
        (ThreadOrder::Random(_), Some(rng)) => {
            let mut order: Vec<usize> = (0..blocks).collect();
            order.shuffle(rng);
            order
        }
        (ThreadOrder::Random(_), None) => unreachable!("random order has an rng"),
    };
    // SAFETY: `state` points at the module's kiln_emu_state; launches are
    // serialised, so nothing else writes it meanwhile.
    unsafe {
        (*grid.state).block_dim = grid.block;
        (*grid.state).grid_dim = grid.grid;
        (*grid.state).racecheck = grid.racecheck as i32;
    }
    let mut block = BlockRun::new(grid, rng);
    for linear in block_order {
        let index = coords(linear, grid.grid);
        block
            .run(index, pool)
            .map_err(|(thread, message, raw)| LaunchFault {
                block: index,
                thread,
                message,
                raw,
            })?;
    }
    Ok(())
}

type BlockError = (Option<[u32; 3]>, String, Option<trap::RawFault>);

struct BlockRun<'g> {
    grid: &'g Grid,
    threads: Vec<Option<ThreadCoroutine>>,
    status: Vec<Status>,
    resume_with: Vec<u64>,
    rng: Option<rand::rngs::StdRng>,
    /// The threads in the order a pass over the block runs them (reshuffled
    /// every pass in random order).
    order: Vec<usize>,
    /// Threads that have returned, and threads waiting at a warp operation.
    done: usize,
    at_warp: usize,
}

impl<'g> BlockRun<'g> {
    fn new(grid: &'g Grid, rng: Option<rand::rngs::StdRng>) -> Self {
        let n = grid.block.iter().map(|&d| d as usize).product::<usize>();
        BlockRun {
            grid,
            threads: (0..n).map(|_| None).collect(),
            status: vec![Status::Runnable; n],
            resume_with: vec![0; n],
            rng,
            order: match grid.order {
                ThreadOrder::Reverse => (0..n).rev().collect(),
                _ => (0..n).collect(),
            },
            done: 0,
            at_warp: 0,
        }
    }

    /// Orders every shared-memory access before this point before every one
    /// after it (a block start, a released barrier).
    fn new_epoch(&mut self) {
        // SAFETY: see run_grid.
        unsafe { (*self.grid.state).epoch = (*self.grid.state).epoch.wrapping_add(1) };
    }

    fn thread_coords(&self, t: usize) -> [u32; 3] {
        coords(t, self.grid.block)
    }

    fn run(&mut self, block_index: [u32; 3], pool: &mut StackPool) -> Result<(), BlockError> {
        // SAFETY: see run_grid; the shared section belongs to this module
        // and no thread of another block is alive.
        unsafe {
            (*self.grid.state).block_idx = block_index;
            self.new_epoch();
            if self.grid.shared.1 > 0 {
                std::ptr::write_bytes(self.grid.shared.0, 0xFF, self.grid.shared.1);
            }
        }
        self.status.fill(Status::Runnable);
        self.resume_with.fill(0);
        (self.done, self.at_warp) = (0, 0);
        let result = self.run_threads(pool);
        // Threads still suspended (after a fault) are abandoned: kernel code
        // holds nothing that needs dropping.
        for slot in &mut self.threads {
            if let Some(mut coroutine) = slot.take() {
                if !coroutine.done() {
                    // SAFETY: the suspended frames are C++ kernel code and the
                    // Rust rendezvous shims, none of which owns a resource.
                    unsafe { coroutine.force_reset() };
                }
                pool.put(coroutine.into_stack());
            }
        }
        result
    }

    fn run_threads(&mut self, pool: &mut StackPool) -> Result<(), BlockError> {
        let n = self.status.len();
        loop {
            if let Some(rng) = self.rng.as_mut() {
                self.order.shuffle(rng);
            }
            for i in 0..n {
                let t = self.order[i];
                if self.status[t] == Status::Runnable {
                    self.resume(t, pool)?;
                }
            }
            if self.done == n {
                return Ok(());
            }
            if self.at_warp > 0 && self.settle_warps()? {
                continue;
            }
            self.settle_barrier()?;
        }
    }

    fn resume(&mut self, t: usize, pool: &mut StackPool) -> Result<(), BlockError> {
        if watchdog::expired() {
            return Err((None, TIMED_OUT.into(), None));
        }
        if self.threads[t].is_none() {
            let stack = pool.take().map_err(|e| (None, e, None))?;
            let invoke = self.grid.invoke;
            let params = self.grid.params.as_ptr() as usize;
            self.threads[t] = Some(Coroutine::with_stack(
                stack,
                move |yielder: &Yielder<u64, Event>, _| {
                    YIELDER.with(|y| y.set(yielder as *const _));
                    // SAFETY: `invoke` is the module's entry for this kernel and
                    // `params` holds exactly its parameter struct's bytes.
                    unsafe { invoke(params as *const c_void) };
                    ThreadOutcome::Finished
                },
            ));
        }
        let coroutine = self.threads[t].as_mut().expect("created above");
        // SAFETY: as in run_grid.
        unsafe { (*self.grid.state).thread_idx = coords(t, self.grid.block) };
        trap::set_active(Some(coroutine.trap_handler()));
        let result = coroutine.resume(self.resume_with[t]);
        trap::set_active(None);
        let here = Some(self.thread_coords(t));
        match result {
            CoroutineResult::Yield(Event::Barrier(site)) => {
                self.status[t] = Status::AtBarrier(site)
            }
            CoroutineResult::Yield(Event::Warp(request)) => {
                self.status[t] = Status::AtWarp(request);
                self.at_warp += 1;
            }
            CoroutineResult::Yield(Event::Fault(message)) => return Err((here, message, None)),
            CoroutineResult::Return(ThreadOutcome::Finished) => {
                self.status[t] = Status::Done;
                self.done += 1;
                if let Some(done) = self.threads[t].take() {
                    pool.put(done.into_stack());
                }
            }
            CoroutineResult::Return(ThreadOutcome::Trapped) => {
                let raw = trap::take_fault();
                return Err((here, "stopped by a fault signal".into(), raw));
            }
        }
        Ok(())
    }

    fn describe_thread(&self, t: usize) -> String {
        let [x, y, z] = self.thread_coords(t);
        format!("thread ({x},{y},{z})")
    }

    fn describe_status(&self, t: usize) -> String {
        match self.status[t] {
            Status::Runnable => "is runnable".into(),
            Status::Done => "has exited".into(),
            Status::AtBarrier(site) => format!("waits at __syncthreads at {site}"),
            Status::AtWarp(r) => format!(
                "waits at {} at {} (mask 0x{:08x})",
                r.op.cuda_name(),
                r.site,
                r.mask
            ),
        }
    }

    /// Completes every warp-level operation whose lanes have all arrived.
    /// Returns whether any did; errors where one never can.
    fn settle_warps(&mut self) -> Result<bool, BlockError> {
        let n = self.status.len();
        let mut progress = false;
        for warp_start in (0..n).step_by(32) {
            let warp_len = (n - warp_start).min(32);
            for lane in 0..warp_len {
                let t = warp_start + lane;
                let Status::AtWarp(request) = self.status[t] else {
                    continue;
                };
                let here = Some(self.thread_coords(t));
                let name = request.op.cuda_name();
                if request.mask & (1 << lane) == 0 {
                    return Err((
                        here,
                        format!(
                            "{name} at {}: lane {lane} calls it with mask 0x{:08x}, which does not name the lane itself",
                            request.site, request.mask
                        ),
                        None,
                    ));
                }
                let mut complete = true;
                for member in 0..32 {
                    if request.mask & (1 << member) == 0 {
                        continue;
                    }
                    if member >= warp_len {
                        return Err((
                            here,
                            format!(
                                "{name} at {}: mask 0x{:08x} names lane {member}, but this warp has only {warp_len} threads",
                                request.site, request.mask
                            ),
                            None,
                        ));
                    }
                    match self.status[warp_start + member] {
                        Status::AtWarp(other) if other.same_operation(&request) => {}
                        Status::AtWarp(_) => complete = false,
                        Status::Runnable => complete = false,
                        Status::Done | Status::AtBarrier(_) => {
                            return Err((
                                here,
                                format!(
                                    "{name} at {} with mask 0x{:08x}: lane {member} {} instead, so the \
                                     operation can never complete (a lane named in the mask is missing)",
                                    request.site,
                                    request.mask,
                                    self.describe_status(warp_start + member)
                                ),
                                None,
                            ));
                        }
                    }
                }
                if complete {
                    self.complete_warp_op(warp_start, request)?;
                    progress = true;
                }
            }
        }
        Ok(progress)
    }

    fn complete_warp_op(
        &mut self,
        warp_start: usize,
        request: WarpRequest,
    ) -> Result<(), BlockError> {
        let members = || (0..32).filter(move |m| request.mask & (1 << m) != 0);
        let request_of = |status: &[Status], lane: usize| match status[warp_start + lane] {
            Status::AtWarp(r) => r,
            _ => unreachable!("every member waits at this operation"),
        };
        let value_of = |status: &[Status], lane: usize| request_of(status, lane).value;
        let width = request.width;
        if !(1..=32).contains(&width) || (width & (width - 1)) != 0 {
            return Err((
                None,
                format!(
                    "{} at {}: width {width} is not a power of two in 1..=32",
                    request.op.cuda_name(),
                    request.site
                ),
                None,
            ));
        }
        let width = width as usize;
        // The lanes whose predicate holds, and how many lanes vote.
        let ballot: u64 = members()
            .filter(|&m| value_of(&self.status, m) != 0)
            .map(|m| 1u64 << m)
            .sum();
        let voters = request.mask.count_ones();
        let mut results = [0u64; 32];
        for lane in members() {
            let own = value_of(&self.status, lane);
            let segment = lane / width * width;
            let arg = request_of(&self.status, lane).arg as i64;
            let source = match request.op {
                WarpOp::ShuffleIdx => Some(segment + (arg.rem_euclid(width as i64)) as usize),
                WarpOp::ShuffleUp => {
                    let s = lane as i64 - arg;
                    (s >= segment as i64).then_some(s as usize)
                }
                WarpOp::ShuffleDown => {
                    let s = lane as i64 + arg;
                    (s < (segment + width) as i64).then_some(s as usize)
                }
                WarpOp::ShuffleXor => {
                    let s = (lane as i64) ^ arg;
                    (0..(segment + width) as i64)
                        .contains(&s)
                        .then_some(s as usize)
                }
                WarpOp::Ballot | WarpOp::Any | WarpOp::All | WarpOp::SyncWarp => None,
            };
            let result = match request.op {
                WarpOp::Ballot => ballot,
                WarpOp::Any => (ballot != 0) as u64,
                WarpOp::All => (ballot.count_ones() == voters) as u64,
                WarpOp::SyncWarp => 0,
                _ => match source {
                    None => own,
                    Some(s) if s == lane => own,
                    Some(s) if request.mask & (1 << s) == 0 => {
                        return Err((
                            Some(self.thread_coords(warp_start + lane)),
                            format!(
                                "{} at {}: lane {lane} reads lane {s}, which is not in mask 0x{:08x}",
                                request.op.cuda_name(),
                                request.site,
                                request.mask
                            ),
                            None,
                        ));
                    }
                    Some(s) => value_of(&self.status, s),
                },
            };
            results[lane] = result;
        }
        for lane in members() {
            self.resume_with[warp_start + lane] = results[lane];
            self.status[warp_start + lane] = Status::Runnable;
            self.at_warp -= 1;
        }
        // SAFETY: see run_grid; a block has at most 32 warps.
        unsafe {
            let epoch = &mut (*self.grid.state).warp_epoch[warp_start / 32];
            *epoch = epoch.wrapping_add(1);
        }
        Ok(())
    }

    /// Releases a barrier every thread of the block waits at, or explains
    /// why the block can never go on.
    fn settle_barrier(&mut self) -> Result<(), BlockError> {
        let at_barrier = |s: &Status| matches!(s, Status::AtBarrier(_));
        let waiting = self.status.iter().position(at_barrier);
        let other = self.status.iter().position(|s| !at_barrier(s));
        if let (Some(first), None) = (waiting, other) {
            let Status::AtBarrier(site) = self.status[first] else {
                unreachable!()
            };
            if let Some(diverged) = self
                .status
                .iter()
                .position(|s| *s != Status::AtBarrier(site))
            {
                return Err((
                    Some(self.thread_coords(diverged)),
                    format!(
                        "divergent __syncthreads: {} waits at {site} but {} {}",
                        self.describe_thread(first),
                        self.describe_thread(diverged),
                        self.describe_status(diverged)
                    ),
                    None,
                ));
            }
            self.status.fill(Status::Runnable);
            self.new_epoch();
            return Ok(());
        }
        let stuck = other.expect("some thread is not at a barrier");
        let message = match waiting {
            Some(first) => format!(
                "divergent __syncthreads: {} {} but {} {} (every thread of the block must reach the same barrier)",
                self.describe_thread(first),
                self.describe_status(first),
                self.describe_thread(stuck),
                self.describe_status(stuck)
            ),
            None => format!(
                "warp-level deadlock: {} {} and no warp operation can complete",
                self.describe_thread(stuck),
                self.describe_status(stuck)
            ),
        };
        Err((Some(self.thread_coords(stuck)), message, None))
    }
}

/// A uniformly random seed, for `random` without one.
pub(crate) fn random_seed() -> u64 {
    rand::rng().random()
}
