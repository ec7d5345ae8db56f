//! Turning a segmentation fault inside an emulated CUDA thread into a kernel
//! error instead of a dead process, and the watchdog's signal into a time
//! limit error instead of a hang. While a thread runs, its coroutine's
//! trap handler is published in a thread-local; the SIGSEGV/SIGBUS handler
//! checks that the faulting stack is that coroutine's, records what was hit,
//! and makes the coroutine return `ThreadOutcome::Trapped` to the scheduler
//! (corosensei rewrites the interrupted registers for that). Faults anywhere
//! else go to the handler that was installed before ours.

use std::cell::Cell;
use std::sync::OnceLock;

use corosensei::trap::CoroutineTrapHandler;

use super::scheduler::ThreadOutcome;
use super::watchdog;

/// What the signal handler saw.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawFault {
    pub address: usize,
    pub instruction: usize,
    pub write: bool,
    pub signal: i32,
    pub stack_pointer: usize,
}

thread_local! {
    static ACTIVE: Cell<Option<CoroutineTrapHandler<ThreadOutcome>>> = const { Cell::new(None) };
    static LAST_FAULT: Cell<Option<RawFault>> = const { Cell::new(None) };
}

/// Publishes (or clears) the trap handler of the thread about to run.
pub(crate) fn set_active(handler: Option<CoroutineTrapHandler<ThreadOutcome>>) {
    ACTIVE.with(|a| a.set(handler));
}

/// The fault that made the last coroutine return `Trapped`.
pub(crate) fn take_fault() -> Option<RawFault> {
    LAST_FAULT.with(|f| f.take())
}

struct Previous {
    segv: libc::sigaction,
    bus: libc::sigaction,
}

// SAFETY: plain data copied out of the kernel, only read after installation.
unsafe impl Sync for Previous {}
unsafe impl Send for Previous {}

static PREVIOUS: OnceLock<Previous> = OnceLock::new();

/// Gives the calling OS thread an alternate signal stack if it has none, so
/// the handler can run when an emulated thread has overflowed its own stack
/// (threads started by Rust's std already have one).
pub(crate) fn ensure_alternate_stack() {
    thread_local! {
        static CHECKED: Cell<bool> = const { Cell::new(false) };
    }
    if CHECKED.with(|c| c.replace(true)) {
        return;
    }
    const SIZE: usize = 64 * 1024;
    // SAFETY: queries, then installs a fresh mapping as this thread's
    // alternate stack; it is never unmapped (a thread's lifetime at most).
    unsafe {
        let mut current: libc::stack_t = std::mem::zeroed();
        if libc::sigaltstack(std::ptr::null(), &mut current) != 0
            || current.ss_flags & libc::SS_DISABLE == 0
        {
            return;
        }
        let memory = libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if memory == libc::MAP_FAILED {
            return;
        }
        let stack = libc::stack_t {
            ss_sp: memory,
            ss_flags: 0,
            ss_size: SIZE,
        };
        libc::sigaltstack(&stack, std::ptr::null_mut());
    }
}

/// Installs the handlers once per process. Returns false where faults cannot
/// be caught (targets other than x86-64 Linux): there a guard-page hit still
/// stops the process, just without kiln's message.
pub(crate) fn install() -> bool {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return false;
    }
    PREVIOUS.get_or_init(|| {
        // SAFETY: sigaction with a zeroed struct filled in field by field;
        // the handler only touches const-initialised thread-locals.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fault as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let mut segv: libc::sigaction = std::mem::zeroed();
            let mut bus: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGSEGV, &action, &mut segv);
            libc::sigaction(libc::SIGBUS, &action, &mut bus);
            libc::sigaction(watchdog::signal(), &action, std::ptr::null_mut());
            Previous { segv, bus }
        }
    });
    true
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
unsafe extern "C" fn on_fault(signal: i32, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo and ucontext to an SA_SIGINFO handler.
    unsafe {
        let context = &mut *(context as *mut libc::ucontext_t);
        let gregs = &mut context.uc_mcontext.gregs;
        let stack_pointer = gregs[libc::REG_RSP as usize] as usize;
        let from_watchdog = signal == watchdog::signal();
        if let Some(handler) = ACTIVE.with(|a| a.get())
            && handler.stack_ptr_in_bounds(stack_pointer)
            && (!from_watchdog || watchdog::expired())
        {
            ACTIVE.with(|a| a.set(None));
            LAST_FAULT.with(|f| {
                f.set(Some(RawFault {
                    address: (*info).si_addr() as usize,
                    instruction: gregs[libc::REG_RIP as usize] as usize,
                    // Bit 1 of the page-fault error code: the access was a write.
                    write: gregs[libc::REG_ERR as usize] & 2 != 0,
                    signal,
                    stack_pointer,
                }))
            });
            let regs = handler.setup_trap_handler(|| ThreadOutcome::Trapped);
            gregs[libc::REG_RIP as usize] = regs.rip as i64;
            gregs[libc::REG_RSP as usize] = regs.rsp as i64;
            gregs[libc::REG_RBP as usize] = regs.rbp as i64;
            gregs[libc::REG_RDI as usize] = regs.rdi as i64;
            gregs[libc::REG_RSI as usize] = regs.rsi as i64;
            return;
        }
        // Outside kernel code the scheduler notices an expired launch itself.
        if from_watchdog {
            return;
        }
        // Not an emulated thread: restore the previous handler; returning
        // re-runs the faulting instruction under it.
        if let Some(previous) = PREVIOUS.get() {
            let old = if signal == libc::SIGBUS {
                &previous.bus
            } else {
                &previous.segv
            };
            libc::sigaction(signal, old, std::ptr::null_mut());
        }
    }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
unsafe extern "C" fn on_fault(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
