//! An opt-in op profiler: which ops a training step spends its time in.
//!
//! Every public op opens a scope ([`op`]) under its name, every backward
//! rule one under "{name} backward" ([`backward`], in the autograd walk),
//! the walk's sums of gradients one under "gradient accumulation", and the
//! optimizers and `clip_grad_norm` one each ("adam step", ...). Ops that
//! only forward to another (`matmul` to `gemm_with`, `sum_all` to `sum`)
//! are timed under the name of the one that does the work.
//! Only the outermost scope of a thread counts: an op that calls other ops
//! (`cross_entropy` calling `log_softmax`, a backward rule made of forward
//! ops) is timed once, as a whole, so the totals add up to the step instead
//! of counting nested work twice.
//!
//! ```
//! use kiln::{DType, Device, Tensor, profile};
//!
//! let x = Tensor::ones([4, 4], DType::F32, Device::Cpu)?.requires_grad_();
//! let _profiling = profile::profiling();
//! x.matmul(&x)?.relu()?.sum_all()?.backward()?;
//! let times = profile::take();
//! assert!(times.iter().any(|t| t.name == "matmul backward"));
//! println!("{}", profile::markdown_table(&times, 0.0));
//! # Ok::<(), kiln::Error>(())
//! ```
//!
//! Cost. Off (the default), a scope costs one relaxed atomic load. On, each
//! outermost scope reads the clock twice and updates a per-thread table.
//!
//! CUDA. Kernels run asynchronously, so a wall-clock scope would time the
//! launch, not the kernel. While profiling is on, an outermost scope on a
//! CUDA device synchronises that device when it opens (so earlier queued
//! work is not billed to it) and when it closes (so its own kernels are).
//! Profiling therefore serialises the GPU: the launch latency that the queue
//! normally hides is paid by every op, which inflates the share of ops made
//! of small kernels a little. Compare shares, not absolute times, with an
//! unprofiled run.
//!
//! Threads. The switch is global; scopes and their times are per thread.
//! [`take`] returns what the calling thread recorded: kiln's ops run on the
//! thread that calls them (the rayon workers inside a CPU kernel are not
//! ops), so profile on the thread that runs the step.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::tensor::Device;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether a time was spent in an op's forward or in its backward rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Phase {
    Forward,
    Backward,
}

/// Calls and seconds accumulated under one scope name.
#[derive(Clone, Copy, Default)]
struct Tally {
    calls: u64,
    seconds: f64,
}

thread_local! {
    /// Scopes open on this thread while profiling (0: none).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    static TALLIES: RefCell<HashMap<(&'static str, Phase), Tally>> = RefCell::new(HashMap::new());
}

/// Turns profiling on or off for every thread.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether profiling is on.
pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Turns profiling on until the returned guard is dropped, which restores
/// the previous state.
pub fn profiling() -> Profiling {
    let previous = ENABLED.swap(true, Ordering::Relaxed);
    Profiling { previous }
}

/// Keeps profiling on while alive; see [`profiling`].
#[must_use = "profiling stops as soon as the guard is dropped"]
pub struct Profiling {
    previous: bool,
}

impl Drop for Profiling {
    fn drop(&mut self) {
        enable(self.previous);
    }
}

/// The time of one scope name: total seconds over `calls` outermost calls.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    /// The op's name, "{name} backward" for its backward rule.
    pub name: String,
    pub calls: u64,
    pub seconds: f64,
}

/// Opens the forward scope of op `name` running on `device`; the time until
/// the guard drops is recorded if profiling is on and no other scope is
/// open on this thread. Ops call it on their first line:
/// `let _profile = profile::op("conv2d", self.device());`
#[inline]
pub fn op(name: &'static str, device: Device) -> OpScope {
    scope(name, Phase::Forward, device)
}

/// Opens the scope of the backward rule of op `name`, recorded as
/// "{name} backward". The autograd walk opens one around each rule.
#[inline]
pub fn backward(name: &'static str, device: Device) -> OpScope {
    scope(name, Phase::Backward, device)
}

#[inline]
fn scope(name: &'static str, phase: Phase, device: Device) -> OpScope {
    if !ENABLED.load(Ordering::Relaxed) {
        return OpScope { active: None };
    }
    OpScope {
        active: Some(ActiveScope::open(name, phase, device)),
    }
}

/// An open profiling scope; records its time when dropped. Inert (and
/// free) while profiling is off.
#[must_use = "the scope is timed until the guard is dropped"]
pub struct OpScope {
    active: Option<ActiveScope>,
}

struct ActiveScope {
    name: &'static str,
    phase: Phase,
    device: Device,
    /// When the scope opened; None for a scope nested in another (not timed).
    start: Option<Instant>,
}

impl ActiveScope {
    fn open(name: &'static str, phase: Phase, device: Device) -> Self {
        let depth = DEPTH.with(|d| d.replace(d.get() + 1));
        let start = (depth == 0).then(|| {
            synchronize(device);
            Instant::now()
        });
        ActiveScope {
            name,
            phase,
            device,
            start,
        }
    }
}

impl Drop for OpScope {
    fn drop(&mut self) {
        let Some(scope) = &self.active else { return };
        DEPTH.with(|d| d.set(d.get() - 1));
        let Some(start) = scope.start else { return };
        synchronize(scope.device);
        let seconds = start.elapsed().as_secs_f64();
        TALLIES.with(|t| {
            let mut tallies = t.borrow_mut();
            let tally = tallies.entry((scope.name, scope.phase)).or_default();
            tally.calls += 1;
            tally.seconds += seconds;
        });
    }
}

/// Waits for the device's queued work, so that a scope's wall time is its
/// kernels' time. A failure is left for the next op to report: a profiler
/// must not change what the program does.
pub(crate) fn synchronize(device: Device) {
    if let Device::Cuda(ordinal) = device
        && let Ok(cuda) = crate::cuda::device(ordinal)
    {
        let _ = cuda.synchronize();
    }
}

/// Returns the times this thread recorded since the last `take`, the
/// largest first, and clears them.
pub fn take() -> Vec<OpTime> {
    let tallies = TALLIES.with(|t| std::mem::take(&mut *t.borrow_mut()));
    let mut times: Vec<OpTime> = tallies
        .into_iter()
        .map(|((name, phase), tally)| OpTime {
            name: match phase {
                Phase::Forward => name.to_string(),
                Phase::Backward => format!("{name} backward"),
            },
            calls: tally.calls,
            seconds: tally.seconds,
        })
        .collect();
    times.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then(a.name.cmp(&b.name)));
    times
}

/// `times` recorded over `steps` steps as averages per step (calls and
/// seconds divided by the step count), for a table of one step.
pub fn per_step(times: Vec<OpTime>, steps: usize) -> Vec<OpTime> {
    let steps = steps.max(1);
    times
        .into_iter()
        .map(|t| OpTime {
            calls: t.calls / steps as u64,
            seconds: t.seconds / steps as f64,
            ..t
        })
        .collect()
}

/// Whether a row of [`take`] is a backward rule ("{name} backward").
pub fn is_backward(time: &OpTime) -> bool {
    time.name.ends_with(" backward")
}

/// A markdown table of `times` (op, calls, ms, % of step): totals as taken,
/// or one step's after [`per_step`]. Shares are of `wall_seconds`, the
/// measured time of the same steps, with a row for the time spent outside
/// every op scope (creating tensors, copying data, the host-side
/// bookkeeping); pass 0 to take shares of the ops' sum.
pub fn markdown_table(times: &[OpTime], wall_seconds: f64) -> String {
    let recorded: f64 = times.iter().map(|t| t.seconds).sum();
    let total = if wall_seconds > 0.0 {
        wall_seconds
    } else {
        recorded
    };
    let share = |seconds: f64| {
        if total > 0.0 {
            100.0 * seconds / total
        } else {
            0.0
        }
    };
    let mut out = String::from("| op | calls | ms | % of step |\n|---|---:|---:|---:|\n");
    for t in times {
        out.push_str(&format!(
            "| {} | {} | {:.3} | {:.1}% |\n",
            t.name,
            t.calls,
            t.seconds * 1e3,
            share(t.seconds)
        ));
    }
    if total > recorded {
        let other = total - recorded;
        out.push_str(&format!(
            "| (outside op scopes) | | {:.3} | {:.1}% |\n",
            other * 1e3,
            share(other)
        ));
    }
    out.push_str(&format!("| **total** | | {:.3} | 100.0% |\n", total * 1e3));
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{DType, Tensor};

    /// The switch is global: tests that flip it run one at a time.
    static SWITCH: Mutex<()> = Mutex::new(());

    fn lock() -> std::sync::MutexGuard<'static, ()> {
        SWITCH.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn names(times: &[OpTime]) -> Vec<&str> {
        let mut names: Vec<&str> = times.iter().map(|t| t.name.as_str()).collect();
        names.sort();
        names
    }

    fn calls(times: &[OpTime], name: &str) -> u64 {
        times.iter().find(|t| t.name == name).map_or(0, |t| t.calls)
    }

    #[test]
    fn a_profiled_graph_records_each_op_and_each_backward_rule() {
        let _lock = lock();
        take();
        let x = Tensor::ones([3, 4], DType::F32, Device::Cpu)
            .unwrap()
            .requires_grad_();
        let w = Tensor::full(0.5, [4, 2], DType::F32, Device::Cpu)
            .unwrap()
            .requires_grad_();
        {
            let _profiling = profile_on();
            let loss = x.matmul(&w).unwrap().tanh().unwrap().sum_all().unwrap();
            loss.backward().unwrap();
        }
        let times = take();
        assert_eq!(
            names(&times),
            [
                "matmul",
                "matmul backward",
                "sum",
                "sum backward",
                "tanh",
                "tanh backward"
            ]
        );
        assert!(times.iter().all(|t| t.calls == 1 && t.seconds >= 0.0));
        assert!(
            times.windows(2).all(|w| w[0].seconds >= w[1].seconds),
            "largest first"
        );
        assert!(take().is_empty(), "take clears the table");
    }

    #[test]
    fn nested_ops_count_once_under_the_outermost() {
        let _lock = lock();
        take();
        let x = Tensor::ones([2, 3], DType::F32, Device::Cpu).unwrap();
        {
            let _profiling = profile_on();
            // mean_all calls mean; sum_to_shape calls sum; neither inner op counts.
            x.mean_all().unwrap();
            x.sum_to_shape(&[1, 3].into()).unwrap();
            // A scope around ops hides them all.
            let _outer = op("outer", Device::Cpu);
            x.exp().unwrap().add(&x).unwrap();
        }
        let times = take();
        assert_eq!(names(&times), ["mean", "outer", "sum_to_shape"]);
        assert_eq!(calls(&times, "mean"), 1);
        assert_eq!(DEPTH.with(|d| d.get()), 0, "every scope closed");
    }

    #[test]
    fn disabled_profiling_records_nothing() {
        let _lock = lock();
        take();
        enable(false);
        let x = Tensor::ones([2, 2], DType::F32, Device::Cpu)
            .unwrap()
            .requires_grad_();
        x.mul(&x).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(take().is_empty());
        assert_eq!(DEPTH.with(|d| d.get()), 0);
    }

    #[test]
    fn the_guard_restores_the_previous_state() {
        let _lock = lock();
        enable(false);
        {
            let _profiling = profiling();
            assert!(is_enabled());
            {
                let _inner = profiling();
            }
            assert!(is_enabled(), "an inner guard leaves it on");
        }
        assert!(!is_enabled());
    }

    #[test]
    fn the_table_shares_the_wall_time_and_shows_the_rest() {
        let times = vec![
            OpTime {
                name: "conv2d backward".into(),
                calls: 4,
                seconds: 0.006,
            },
            OpTime {
                name: "conv2d".into(),
                calls: 4,
                seconds: 0.002,
            },
        ];
        let table = markdown_table(&times, 0.010);
        assert!(
            table.contains("| conv2d backward | 4 | 6.000 | 60.0% |"),
            "{table}"
        );
        assert!(table.contains("| conv2d | 4 | 2.000 | 20.0% |"), "{table}");
        assert!(
            table.contains("| (outside op scopes) | | 2.000 | 20.0% |"),
            "{table}"
        );
        assert!(
            table.contains("| **total** | | 10.000 | 100.0% |"),
            "{table}"
        );
        let of_ops = markdown_table(&times, 0.0);
        assert!(
            of_ops.contains("| conv2d | 4 | 2.000 | 25.0% |"),
            "{of_ops}"
        );
        assert!(!of_ops.contains("outside"), "{of_ops}");
    }

    /// Profiling on for one test, off again after it.
    fn profile_on() -> Profiling {
        enable(false);
        profiling()
    }
}
