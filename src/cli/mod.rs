//! The `kiln` command line: `train`, `sample`, `generate` and `eval` for the
//! DCGAN, the VAE and the character-level GPT. It lives in the library so
//! that tests can call it; `src/main.rs` only forwards to [`main`].
//!
//! Every user error (missing data, a checkpoint of another model, an
//! unknown prompt character, no GPU...) ends the process with one line
//! `error: ...` and exit code 1, and never touches existing checkpoints.

pub mod args;
pub mod budget;
pub mod datasets;
pub mod eval;
pub mod generate;
pub mod graph;
pub mod progress;
pub mod quality;
pub mod run_dir;
pub mod sample;
pub mod seeds;
pub mod specs;
pub mod step_profile;
pub mod train;

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Parser;

use crate::Device;
use args::{Cli, Command, DeviceArg};

/// Parses `args` (the first is the program name) and runs the command.
pub fn run<I, T>(args: I) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    execute(Cli::try_parse_from(args)?)
}

/// The binary's entry point: runs the command line of this process and
/// turns an error into `error: ...` on stderr and exit code 1 (clap's own
/// usage errors and --help keep clap's output and codes).
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> Result<()> {
    if let Some(threads) = cli.threads {
        use_threads(threads)?;
    }
    run_dir::allow_non_finite_weights(cli.allow_non_finite);
    match &cli.command {
        Command::Train(args) => train::run(args),
        Command::Sample(args) => sample::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Graph(args) => graph::run(args),
    }
}

/// Runs kiln's CPU kernels on `threads` threads (rayon's global pool; without
/// --threads, `RAYON_NUM_THREADS` or one thread per core). The pool starts
/// once per process, so a second, different request is an error.
fn use_threads(threads: usize) -> Result<()> {
    if threads == 0 {
        bail!("--threads 0: give at least 1 (or leave it out for one thread per core)");
    }
    if rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .is_err()
        && rayon::current_num_threads() != threads
    {
        bail!(
            "--threads {threads}: the CPU thread pool already runs {} threads in this process",
            rayon::current_num_threads()
        );
    }
    Ok(())
}

/// `cpu (N threads)`, or `cuda:N (its name)`: which GPU, or that it is the
/// emulator.
pub fn device_label(device: Device) -> String {
    match device {
        Device::Cuda(ordinal) => match crate::cuda::device(ordinal) {
            Ok(cuda) => format!("{device} ({})", cuda.name()),
            Err(_) => device.to_string(),
        },
        Device::Cpu => match rayon::current_num_threads() {
            1 => "cpu (1 thread)".into(),
            n => format!("cpu ({n} threads)"),
        },
    }
}

/// The device a `--device` flag names; CUDA is probed and fails clearly
/// when there is no driver or no device.
/// The autocast scope a trained checkpoint's forward passes run under: its
/// training precision.
pub fn checkpoint_autocast(
    checkpoint: &run_dir::LoadedCheckpoint,
) -> Result<Option<crate::AutocastGuard>> {
    Ok(checkpoint.precision()?.autocast())
}

pub fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => Ok(Device::cuda(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?),
    }
}
