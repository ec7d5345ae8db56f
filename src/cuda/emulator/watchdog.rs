//! A time limit on every launch, so an endless loop in a kernel is an error
//! naming the thread and source line instead of a hung process. A watchdog
//! thread waits for the running launch's deadline; past it, it marks the
//! launch expired and interrupts the launching thread with a signal (again
//! every half second until the launch ends). The scheduler checks the mark
//! before resuming each thread; the signal handler (see `trap`) stops a
//! thread that is inside kernel code, exactly like a memory fault.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The launch that ran out of time (0: none). Read by the signal handler.
static EXPIRED: AtomicU64 = AtomicU64::new(0);
/// The launch now running (0: none).
static CURRENT: AtomicU64 = AtomicU64::new(0);

struct Armed {
    id: u64,
    thread: libc::pthread_t,
    deadline: Instant,
}

struct Watchdog {
    armed: Mutex<Option<Armed>>,
    changed: Condvar,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<&'static Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let dog: &'static Watchdog = Box::leak(Box::new(Watchdog {
            armed: Mutex::new(None),
            changed: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("kiln-emulator-watchdog".into())
            .spawn(move || watch(dog))
            .expect("spawning the emulator's watchdog thread");
        dog
    })
}

fn watch(dog: &'static Watchdog) {
    let mut armed = dog.armed.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let Some(launch) = armed.as_ref() else {
            armed = dog.changed.wait(armed).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        let now = Instant::now();
        if now < launch.deadline {
            let wait = launch.deadline - now;
            armed = dog
                .changed
                .wait_timeout(armed, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        EXPIRED.store(launch.id, Ordering::SeqCst);
        // SAFETY: the thread is alive: it disarms (under this lock) before
        // its launch returns.
        unsafe { libc::pthread_kill(launch.thread, signal()) };
        armed = dog
            .changed
            .wait_timeout(armed, Duration::from_millis(500))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// The signal the watchdog interrupts a launch with: a real-time signal,
/// which nothing else in a Rust program sends.
pub(crate) fn signal() -> i32 {
    libc::SIGRTMIN() + 5
}

/// True once the running launch has passed its deadline.
pub(crate) fn expired() -> bool {
    let current = CURRENT.load(Ordering::SeqCst);
    current != 0 && EXPIRED.load(Ordering::SeqCst) == current
}

/// A launch under a time limit; dropping it ends the limit.
pub(crate) struct Limit {
    id: u64,
}

/// Starts the time limit of a launch on this thread.
pub(crate) fn arm(limit: Duration) -> Limit {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = NEXT.fetch_add(1, Ordering::SeqCst);
    let dog = watchdog();
    let mut armed = dog.armed.lock().unwrap_or_else(|e| e.into_inner());
    CURRENT.store(id, Ordering::SeqCst);
    *armed = Some(Armed {
        id,
        // SAFETY: pthread_self has no preconditions.
        thread: unsafe { libc::pthread_self() },
        deadline: Instant::now() + limit,
    });
    dog.changed.notify_all();
    Limit { id }
}

impl Drop for Limit {
    fn drop(&mut self) {
        let dog = watchdog();
        let mut armed = dog.armed.lock().unwrap_or_else(|e| e.into_inner());
        if armed.as_ref().is_some_and(|a| a.id == self.id) {
            *armed = None;
            CURRENT.store(0, Ordering::SeqCst);
        }
        dog.changed.notify_all();
    }
}
