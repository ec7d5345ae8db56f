//! `kiln train --profile N`: kiln's op profiler (`kiln::profile`) over N
//! training steps after a short warm-up, reported at the end of the run as
//! a table of one step (op, calls, ms, share of the step; forward and
//! backward rows apart) and written to `profile.md` and `profile.json` in
//! the run directory.
//!
//! Only the training step itself is profiled (forward, loss, backward,
//! optimizer), not the logging and checkpointing around it; the table's
//! total is the measured wall time of those steps, and the time no op scope
//! covers (batching data, creating tensors) has a row of its own. Outside
//! the window the profiler is off, which costs each op one atomic load.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use serde_json::json;

use super::run_dir::write_atomically;
use crate::profile::{self, OpTime};
use crate::tensor::Device;

pub const PROFILE_MD: &str = "profile.md";
pub const PROFILE_JSON: &str = "profile.json";

/// Steps run before the profiled ones (first-step allocations, optimizer
/// state, kernel compilation on CUDA), when the run is long enough.
const WARM_UP_STEPS: usize = 3;

/// The profiled window of a run and what it recorded.
pub struct StepProfiler {
    /// Profiled steps: first..end (0-based global steps).
    first: usize,
    end: usize,
    warm_up: usize,
    device: Device,
    /// Wall time of the profiled steps.
    seconds: f64,
    times: Vec<OpTime>,
}

impl StepProfiler {
    /// Profiles `steps` steps of a run going from `start_step` to
    /// `total_steps`, after up to WARM_UP_STEPS of warm-up; fewer when the
    /// run is shorter (at least one step is profiled).
    pub fn new(steps: usize, start_step: usize, total_steps: usize, device: Device) -> Self {
        let remaining = total_steps.saturating_sub(start_step);
        let warm_up = WARM_UP_STEPS.min(remaining.saturating_sub(steps.max(1)));
        let first = start_step + warm_up;
        // Nothing is recorded until the window: clear what came before now,
        // outside the timed steps.
        profile::take();
        StepProfiler {
            first,
            end: (first + steps.max(1)).min(total_steps),
            warm_up,
            device,
            seconds: 0.0,
            times: Vec::new(),
        }
    }

    /// Runs training step `step`, profiled when it is in the window.
    pub fn run<R>(&mut self, step: usize, train_step: impl FnOnce() -> R) -> R {
        if !(self.first..self.end).contains(&step) {
            return train_step();
        }
        let _profiling = profile::profiling();
        profile::synchronize(self.device);
        let started = Instant::now();
        let result = train_step();
        profile::synchronize(self.device);
        self.seconds += started.elapsed().as_secs_f64();
        result
    }

    fn steps(&self) -> usize {
        self.end - self.first
    }

    /// One step's table in markdown, with the CUDA caveat under it.
    fn markdown(&self, what: &str) -> String {
        let per_step = profile::per_step(self.times.clone(), self.steps());
        let mut text = format!(
            "{what}: one training step on {}, averaged over steps {}..{} \
             ({} profiled after {} of warm-up). Each op is timed once, at its outermost \
             call; \"backward\" rows are the op's gradient rule.\n\n",
            self.device,
            self.first + 1,
            self.end,
            self.steps(),
            self.warm_up,
        );
        text.push_str(&profile::markdown_table(
            &per_step,
            self.seconds / self.steps() as f64,
        ));
        if matches!(self.device, Device::Cuda(_)) {
            text.push_str(
                "\nOn CUDA the profiler synchronises the device around every op, so each op \
                 pays its launch latency and small kernels' shares come out inflated; compare \
                 shares, not absolute times, with an unprofiled run.\n",
            );
        }
        text
    }

    /// The same table as JSON: per-step ms, calls and share of each op.
    fn json(&self, what: &str) -> serde_json::Value {
        let step_seconds = self.seconds / self.steps() as f64;
        let per_step = profile::per_step(self.times.clone(), self.steps());
        let recorded: f64 = per_step.iter().map(|t| t.seconds).sum();
        let share = |seconds: f64| 100.0 * seconds / step_seconds.max(f64::MIN_POSITIVE);
        let ops: Vec<serde_json::Value> = per_step
            .iter()
            .map(|t| {
                json!({
                    "op": t.name,
                    "phase": if profile::is_backward(t) { "backward" } else { "forward" },
                    "calls": t.calls,
                    "ms": t.seconds * 1e3,
                    "percent": share(t.seconds),
                })
            })
            .collect();
        json!({
            "run": what,
            "device": self.device.to_string(),
            "first_step": self.first + 1,
            "last_step": self.end,
            "profiled_steps": self.steps(),
            "ms_per_step": step_seconds * 1e3,
            "outside_op_scopes_ms": (step_seconds - recorded).max(0.0) * 1e3,
            "ops": ops,
            "cuda_synchronised": matches!(self.device, Device::Cuda(_)),
        })
    }

    /// Prints the table and writes profile.md and profile.json into `out`.
    pub fn finish(&mut self, what: &str, out: &Path) -> Result<()> {
        // Profiling was off after the window, so this is the window's record.
        self.times = profile::take();
        if self.times.is_empty() {
            println!("--profile: the run ended before its profiled steps");
            return Ok(());
        }
        let markdown = self.markdown(what);
        println!("\n{markdown}");
        write_atomically(&out.join(PROFILE_MD), markdown.as_bytes())?;
        let json = serde_json::to_string_pretty(&self.json(what))?;
        write_atomically(&out.join(PROFILE_JSON), json.as_bytes())?;
        println!(
            "profile written to {} and {}",
            out.join(PROFILE_MD).display(),
            out.join(PROFILE_JSON).display()
        );
        Ok(())
    }
}
