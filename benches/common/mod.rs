//! What the bench binaries share: the devices to run on, timing under
//! criterion with a device sync, each device's measured peak, one record per
//! timed case, and the summary table every `cargo bench` ends with.
//!
//! Units. `flops` is the op's exact floating-point operation count (2·M·N·K
//! per GEMM; each bench file documents its other counts); `bytes` is each
//! input read once plus each output written once. "% of peak" divides the
//! achieved rate by the device's measured peak: FLOP/s for compute-bound
//! cases (the best GEMM at the same precision: cuBLAS SGEMM on CUDA, the
//! CPU GEMM library kiln uses on the CPU, which has no vendor BLAS here),
//! bytes/s for memory-bound ones (a large device-to-device copy, counted as
//! one read plus one write).
//!
//! Output. Each binary writes its records to `<target>/kiln-bench/<name>.json`
//! and then renders `<target>/kiln-bench/summary.md` from every JSON file
//! there, and prints it: the last bench of a `cargo bench` run prints the
//! table of the whole run. `KILN_BENCH_DIR` overrides the folder (a bench
//! binary copied to another machine); `KILN_BENCH_QUICK=1` shortens every
//! measurement and drops the large shapes.

#![allow(dead_code)] // each bench binary uses its own part of this module

pub mod vendor;

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use kiln::cuda::CudaDevice;
use kiln::{DType, Device, Rng, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// True under `KILN_BENCH_QUICK=1`: short measurements, fewer shapes.
pub fn quick() -> bool {
    std::env::var("KILN_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Random N(0, 1) f32 values on `device` (never zeros: kernels can be faster on them).
pub fn random(shape: &[usize], seed: u64, device: Device) -> Tensor {
    Tensor::randn(shape, DType::F32, Device::Cpu, &mut Rng::seed(seed))
        .and_then(|t| t.to_device(device))
        .expect("a benchmark input")
}

/// Checks |a − e| ≤ rtol·(|e| + max|e|) element by element. Results are
/// checked after timing, so a fast wrong kernel cannot post a number
/// unnoticed; a failure is reported in the table (not a panic, so that one
/// wrong kernel does not cost the rest of a GPU run).
pub fn compare(actual: &Tensor, expected: &Tensor, rtol: f32) -> Result<(), String> {
    let actual = actual.to_vec::<f32>().map_err(|e| e.to_string())?;
    let expected = expected.to_vec::<f32>().map_err(|e| e.to_string())?;
    if actual.len() != expected.len() {
        return Err(format!(
            "{} values vs {} expected",
            actual.len(),
            expected.len()
        ));
    }
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = actual
        .iter()
        .zip(&expected)
        .enumerate()
        .map(|(i, (a, e))| (i, (a - e).abs() / (e.abs() + scale).max(f32::MIN_POSITIVE)))
        .fold(
            (0, 0f32),
            |w, c| if c.1 > w.1 || c.1.is_nan() { c } else { w },
        );
    if worst.1 <= rtol {
        Ok(())
    } else {
        Err(format!(
            "element {}: {} vs {} (relative error {:.2e} > {rtol:.0e})",
            worst.0, actual[worst.0], expected[worst.0], worst.1
        ))
    }
}

/// Where a case spends its time: which peak its "% of peak" is taken against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Bound {
    Compute,
    Memory,
}

/// A device to time on. CUDA work is asynchronous, so every measurement
/// brackets its calls with [`Target::sync`].
#[derive(Clone)]
pub struct Target {
    pub device: Device,
    cuda: Option<Arc<CudaDevice>>,
}

impl Target {
    pub fn cpu() -> Target {
        Target {
            device: Device::Cpu,
            cuda: None,
        }
    }

    /// "cpu" or "cuda".
    pub fn label(&self) -> &'static str {
        if self.cuda.is_some() { "cuda" } else { "cpu" }
    }

    pub fn is_cuda(&self) -> bool {
        self.cuda.is_some()
    }

    pub fn cuda_device(&self) -> Option<&Arc<CudaDevice>> {
        self.cuda.as_ref()
    }

    /// Waits for the device's queued work (nothing to do on the CPU).
    pub fn sync(&self) {
        if let Some(cuda) = &self.cuda {
            cuda.synchronize().expect("CUDA synchronize");
        }
    }

    /// The machine in words, for the report.
    pub fn describe(&self) -> String {
        match &self.cuda {
            Some(cuda) => format!("{} ({})", cuda.name(), cuda.arch()),
            None => format!(
                "{} ({}, {}, {} threads)",
                cpu_model().unwrap_or_else(|| "unknown CPU".into()),
                cpu_field("vendor_id").unwrap_or_else(|| "unknown vendor".into()),
                if cpu_has("avx512f") {
                    "AVX-512"
                } else {
                    "no AVX-512"
                },
                rayon::current_num_threads()
            ),
        }
    }
}

fn cpu_model() -> Option<String> {
    cpu_field("model name")
}

/// A field of the first CPU in /proc/cpuinfo, e.g. "vendor_id".
fn cpu_field(name: &str) -> Option<String> {
    let info = fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with(name))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// Whether the CPU lists `flag` (e.g. "avx512f") among its features.
fn cpu_has(flag: &str) -> bool {
    cpu_field("flags").is_some_and(|flags| flags.split_whitespace().any(|f| f == flag))
}

/// The CPU, then the first CUDA device when one opens; otherwise prints why
/// CUDA was skipped (the bench still runs its CPU half).
pub fn targets() -> Vec<Target> {
    let mut targets = vec![Target::cpu()];
    match kiln::cuda::device(0) {
        // Timing the emulator would measure the host CPU running CUDA C.
        Ok(cuda) if cuda.is_emulated() => {
            eprintln!("CUDA skipped: {} measures the CPU, not a GPU", cuda.name())
        }
        Ok(cuda) => targets.push(Target {
            device: Device::Cuda(0),
            cuda: Some(cuda),
        }),
        Err(e) => eprintln!("CUDA skipped: {e}"),
    }
    targets
}

/// What a timed case is: the names that identify it in the table and the
/// counts its rates come from.
#[derive(Clone, Debug)]
pub struct Case {
    /// e.g. "conv2d backward-weight", "gemm v3_register_blocked", "train_step gan".
    pub kernel: String,
    /// e.g. "x[64,64,16,16] w[128,64,4,4] s2 p1".
    pub shape: String,
    pub flops: u64,
    pub bytes: u64,
    pub bound: Bound,
    /// Examples processed per call (training steps), for samples/s.
    pub samples: Option<u64>,
}

impl Case {
    pub fn new(kernel: impl Into<String>, shape: impl Into<String>, bound: Bound) -> Case {
        Case {
            kernel: kernel.into(),
            shape: shape.into(),
            flops: 0,
            bytes: 0,
            bound,
            samples: None,
        }
    }

    pub fn flops(mut self, flops: u64) -> Case {
        self.flops = flops;
        self
    }

    pub fn bytes(mut self, bytes: u64) -> Case {
        self.bytes = bytes;
        self
    }

    /// `count` f32 values moved (read or written).
    pub fn floats(self, count: usize) -> Case {
        self.bytes(4 * count as u64)
    }

    pub fn samples(mut self, samples: u64) -> Case {
        self.samples = Some(samples);
        self
    }
}

/// One timed case as it goes into the JSON file and the table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub kernel: String,
    pub shape: String,
    pub device: String,
    /// Median seconds per call.
    pub seconds: f64,
    pub flops: u64,
    pub bytes: u64,
    pub bound: Bound,
    pub samples: Option<u64>,
    /// The baseline this case is compared with ("cuBLAS", "cuDNN",
    /// "reference") and its median seconds per call.
    pub baseline: Option<(String, f64)>,
    /// The check after timing: "ok", or what was wrong; None if unchecked.
    pub check: Option<String>,
}

/// A device's measured limits, and how they were measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Peak {
    pub device: String,
    pub machine: String,
    pub bytes_per_second: f64,
    pub bandwidth_how: String,
    pub flops_per_second: f64,
    pub compute_how: String,
}

/// Everything one bench binary writes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub bench: String,
    pub quick: bool,
    pub peaks: Vec<Peak>,
    pub records: Vec<Record>,
    /// Extra markdown sections (title, body), e.g. a per-op breakdown.
    pub sections: Vec<(String, String)>,
}

/// A bench binary's run: criterion, the records so far, the peaks.
pub struct Bench {
    pub criterion: Criterion,
    report: Report,
}

impl Bench {
    /// Criterion configured from the command line (cargo's `--bench`, name
    /// filters) with short measurements: sample counts are modest because
    /// the suite must fit on a 2-core machine.
    pub fn new(name: &str) -> Bench {
        let (warm_up, measure) = if quick() {
            (Duration::from_millis(150), Duration::from_millis(500))
        } else {
            (Duration::from_millis(700), Duration::from_secs(2))
        };
        let criterion = Criterion::default()
            .sample_size(10)
            .warm_up_time(warm_up)
            .measurement_time(measure)
            .configure_from_args();
        Bench {
            criterion,
            report: Report {
                bench: name.to_string(),
                quick: quick(),
                ..Report::default()
            },
        }
    }

    pub fn add_peak(&mut self, peak: Peak) {
        eprintln!(
            "peak {} [{}]: {:.1} GB/s ({}), {:.1} GFLOP/s ({})",
            peak.device,
            peak.machine,
            peak.bytes_per_second / 1e9,
            peak.bandwidth_how,
            peak.flops_per_second / 1e9,
            peak.compute_how
        );
        self.report.peaks.push(peak);
    }

    /// Times `run` on `target` under criterion (group = the case's kernel
    /// name, id = its shape) and keeps the median seconds per call. Returns
    /// None when a command-line filter skipped the case.
    pub fn time(&mut self, target: &Target, case: &Case, run: impl FnMut()) -> Option<f64> {
        let seconds = measure(&mut self.criterion, target, case, run)?;
        self.report.records.push(Record {
            kernel: case.kernel.clone(),
            shape: case.shape.clone(),
            device: target.label().to_string(),
            seconds,
            flops: case.flops,
            bytes: case.bytes,
            bound: case.bound,
            samples: case.samples,
            baseline: None,
            check: None,
        });
        eprintln!("  {}", self.render_row(self.report.records.last().unwrap()));
        Some(seconds)
    }

    /// Times a baseline (cuBLAS, cuDNN, the CPU reference) of `case` on
    /// `target`: median seconds per call, None if a filter skipped it.
    pub fn time_baseline(
        &mut self,
        target: &Target,
        case: &Case,
        name: &str,
        run: impl FnMut(),
    ) -> Option<f64> {
        let baseline_case = Case {
            kernel: format!("{} [{name}]", case.kernel),
            ..case.clone()
        };
        measure(&mut self.criterion, target, &baseline_case, run)
    }

    /// Attaches a baseline time to the record of `case` on `target`.
    pub fn set_baseline(&mut self, target: &Target, case: &Case, name: &str, seconds: f64) {
        let Some(record) = self.record_mut(target, case) else {
            return;
        };
        record.baseline = Some((name.to_string(), seconds));
        let record = record.clone();
        eprintln!("  {}", render_row(&record, &self.report.peaks));
    }

    /// The latest record of `case` on `target`.
    fn record_mut(&mut self, target: &Target, case: &Case) -> Option<&mut Record> {
        let device = target.label();
        self.report
            .records
            .iter_mut()
            .rev()
            .find(|r| r.kernel == case.kernel && r.shape == case.shape && r.device == device)
    }

    /// Records the check of the case just timed on `target` (see [`compare`]).
    pub fn check(&mut self, target: &Target, case: &Case, outcome: Result<(), String>) {
        let Some(record) = self.record_mut(target, case) else {
            return;
        };
        if let Err(e) = &outcome {
            let device = target.label();
            eprintln!("  WRONG: {} {} [{device}]: {e}", case.kernel, case.shape);
        }
        record.check = Some(outcome.err().unwrap_or_else(|| "ok".into()));
    }

    pub fn last_record(&self) -> Option<&Record> {
        self.report.records.last()
    }

    pub fn section(&mut self, title: &str, markdown: String) {
        self.report.sections.push((title.to_string(), markdown));
    }

    fn render_row(&self, record: &Record) -> String {
        render_row(record, &self.report.peaks)
    }

    /// Writes this binary's JSON, re-renders summary.md from every report in
    /// the folder, and prints the summary.
    pub fn finish(self) {
        self.criterion.final_summary();
        let dir = output_dir();
        if let Err(e) = fs::create_dir_all(&dir) {
            eprintln!("could not create {}: {e}", dir.display());
            return;
        }
        let json = serde_json::to_string_pretty(&self.report).expect("report as JSON");
        let path = dir.join(format!("{}.json", self.report.bench));
        if let Err(e) = kiln::atomic_file::write_file_atomically(&path, json.as_bytes()) {
            eprintln!("could not write {}: {e}", path.display());
            return;
        }
        let summary = render_summary(&read_reports(&dir));
        let summary_path = dir.join("summary.md");
        match kiln::atomic_file::write_file_atomically(&summary_path, summary.as_bytes()) {
            Ok(()) => println!("\n{summary}\n(written to {})", summary_path.display()),
            Err(e) => eprintln!("could not write {}: {e}", summary_path.display()),
        }
    }
}

/// criterion's timing of one case: `iter_custom` with the device synced
/// before the clock starts and after the last call, so CUDA time is the
/// kernels' and not the launch queue's. Median seconds per call over the
/// samples, or None if a filter skipped the case.
fn measure(
    criterion: &mut Criterion,
    target: &Target,
    case: &Case,
    mut run: impl FnMut(),
) -> Option<f64> {
    let mut group = criterion.benchmark_group(format!("{}/{}", case.kernel, target.label()));
    group.sampling_mode(SamplingMode::Flat);
    if case.flops > 0 {
        group.throughput(Throughput::Elements(case.flops));
    } else if case.bytes > 0 {
        group.throughput(Throughput::Bytes(case.bytes));
    }
    let mut per_call: Vec<f64> = Vec::new();
    group.bench_function(&case.shape, |b| {
        b.iter_custom(|iters| {
            target.sync();
            let start = Instant::now();
            for _ in 0..iters {
                run();
            }
            target.sync();
            let elapsed = start.elapsed();
            per_call.push(elapsed.as_secs_f64() / iters as f64);
            elapsed
        })
    });
    group.finish();
    if per_call.is_empty() {
        return None;
    }
    per_call.sort_by(f64::total_cmp);
    Some(per_call[per_call.len() / 2])
}

/// `<target>/kiln-bench`: `KILN_BENCH_DIR`, else `$CARGO_TARGET_DIR`, else
/// the `target` folder this binary was built into (target/release/deps/x).
pub fn output_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_BENCH_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("kiln-bench");
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(|p| p.join("kiln-bench")))
        .unwrap_or_else(|| PathBuf::from("target/kiln-bench"))
}

fn read_reports(dir: &std::path::Path) -> Vec<Report> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default();
    paths.sort();
    paths
        .iter()
        .filter_map(|p| serde_json::from_str(&fs::read_to_string(p).ok()?).ok())
        .collect()
}

/// "1.23 ms" / "45.6 µs" / "2.10 s".
pub fn format_seconds(seconds: f64) -> String {
    if seconds >= 1.0 {
        format!("{seconds:.2} s")
    } else if seconds >= 1e-3 {
        format!("{:.3} ms", seconds * 1e3)
    } else {
        format!("{:.1} µs", seconds * 1e6)
    }
}

/// The achieved rate as a percentage of the device's peak for the case's bound.
fn percent_of_peak(record: &Record, peaks: &[Peak]) -> Option<f64> {
    let peak = peaks.iter().find(|p| p.device == record.device)?;
    match record.bound {
        Bound::Compute if record.flops > 0 => {
            Some(100.0 * record.flops as f64 / record.seconds / peak.flops_per_second)
        }
        Bound::Memory if record.bytes > 0 => {
            Some(100.0 * record.bytes as f64 / record.seconds / peak.bytes_per_second)
        }
        _ => None,
    }
}

fn table_cells(record: &Record, peaks: &[Peak]) -> [String; 9] {
    let rate = |count: u64| {
        if count == 0 {
            "-".to_string()
        } else {
            format!("{:.1}", count as f64 / record.seconds / 1e9)
        }
    };
    let percent = percent_of_peak(record, peaks).map_or("-".into(), |p| {
        let unit = if record.bound == Bound::Compute {
            "math"
        } else {
            "bw"
        };
        format!("{p:.0}% {unit}")
    });
    // Speed ratio: baseline time / kiln time (> 1 means kiln is faster).
    let baseline = record
        .baseline
        .as_ref()
        .map_or("-".into(), |(name, seconds)| {
            format!("{:.2}× {name}", seconds / record.seconds)
        });
    [
        record.kernel.clone(),
        record.shape.clone(),
        record.device.clone(),
        format_seconds(record.seconds),
        rate(record.flops),
        rate(record.bytes),
        percent,
        baseline,
        match record.check.as_deref() {
            None => "-".into(),
            Some("ok") => "ok".into(),
            Some(wrong) => format!("WRONG ({wrong})"),
        },
    ]
}

fn render_row(record: &Record, peaks: &[Peak]) -> String {
    let [
        kernel,
        shape,
        device,
        time,
        gflops,
        gbs,
        percent,
        baseline,
        _,
    ] = table_cells(record, peaks);
    format!(
        "{kernel} {shape} [{device}]: {time}, {gflops} GFLOP/s, {gbs} GB/s, {percent}, vs baseline {baseline}"
    )
}

/// The markdown summary of every report: peaks, one kernel table, one
/// training-step table, then the reports' own sections.
pub fn render_summary(reports: &[Report]) -> String {
    let mut out = String::from("# kiln bench summary\n\n");
    let peaks: Vec<Peak> =
        reports
            .iter()
            .flat_map(|r| r.peaks.clone())
            .fold(Vec::new(), |mut unique, peak| {
                if !unique.iter().any(|p: &Peak| p.device == peak.device) {
                    unique.push(peak);
                }
                unique
            });
    if reports.iter().any(|r| r.quick) {
        out.push_str("Measured with KILN_BENCH_QUICK=1 (short measurements, fewer shapes).\n\n");
    }
    out.push_str("| device | machine | copy bandwidth | GEMM peak |\n|---|---|---|---|\n");
    for p in &peaks {
        out.push_str(&format!(
            "| {} | {} | {:.1} GB/s ({}) | {:.1} GFLOP/s ({}) |\n",
            p.device,
            p.machine,
            p.bytes_per_second / 1e9,
            p.bandwidth_how,
            p.flops_per_second / 1e9,
            p.compute_how
        ));
    }
    let (steps, kernels): (Vec<&Record>, Vec<&Record>) = reports
        .iter()
        .flat_map(|r| &r.records)
        .partition(|r| r.samples.is_some());
    if !kernels.is_empty() {
        out.push_str("\n## Kernels\n\n| kernel | shape | device | time | GFLOP/s | GB/s | % of peak | vs baseline | check |\n|---|---|---|---|---|---|---|---|---|\n");
        for record in kernels {
            out.push_str(&format!(
                "| {} |\n",
                table_cells(record, &peaks).join(" | ")
            ));
        }
    }
    if !steps.is_empty() {
        out.push_str("\n## Training steps\n\n| model | config | device | ms/step | samples/s | GFLOP/s |\n|---|---|---|---|---|---|\n");
        for r in steps {
            let gflops = if r.flops > 0 {
                format!("{:.1}", r.flops as f64 / r.seconds / 1e9)
            } else {
                "-".into()
            };
            out.push_str(&format!(
                "| {} | {} | {} | {:.2} | {:.0} | {gflops} |\n",
                r.kernel,
                r.shape,
                r.device,
                r.seconds * 1e3,
                r.samples.unwrap_or(0) as f64 / r.seconds,
            ));
        }
    }
    for (title, body) in reports.iter().flat_map(|r| &r.sections) {
        out.push_str(&format!("\n## {title}\n\n{body}\n"));
    }
    out
}

// ----- peaks ---------------------------------------------------------------

/// Best of `reps` timings of `run`, in seconds (peaks take the best, not the
/// median: they estimate what the hardware can do).
fn best_of(reps: usize, target: &Target, mut run: impl FnMut()) -> f64 {
    run();
    (0..reps)
        .map(|_| {
            target.sync();
            let start = Instant::now();
            run();
            target.sync();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// The CPU's peaks: a 256 MiB copy split across rayon's threads, and the
/// GEMM library kiln uses (the `gemm` crate) on 2048³. The copy is counted
/// as one read and one write per element, as on the GPU, but a CPU store to
/// a line not in cache first reads it (write-allocate): kernels that mostly
/// read (AdamW, a gather from a small table) can show more than 100%.
pub fn cpu_peak() -> Peak {
    let target = Target::cpu();
    let len = 64 << 20; // 64 Mi f32 = 256 MiB
    let source = vec![1.5f32; len];
    let mut dest = vec![0f32; len];
    let chunk = len / rayon::current_num_threads().max(1) / 16;
    let copy_seconds = best_of(5, &target, || {
        dest.par_chunks_mut(chunk)
            .zip(source.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
    });
    assert_eq!(dest[len - 1], 1.5);
    let n = if quick() { 1024 } else { 2048 };
    let a = random(&[n, n], 1, Device::Cpu);
    let b = random(&[n, n], 2, Device::Cpu);
    let gemm_seconds = best_of(3, &target, || {
        std::hint::black_box(a.matmul(&b).unwrap());
    });
    Peak {
        device: "cpu".into(),
        machine: target.describe(),
        bytes_per_second: 2.0 * (4 * len) as f64 / copy_seconds,
        bandwidth_how: "256 MiB memcpy on all threads".into(),
        flops_per_second: 2.0 * (n as f64).powi(3) / gemm_seconds,
        compute_how: format!("gemm crate SGEMM {n}³, the library kiln's CPU path uses"),
    }
}

/// The GPU's peaks: a 1 GiB device-to-device copy, and cuBLAS SGEMM 4096³
/// with TF32 off (kiln's best GEMM rung stands in if cuBLAS is missing).
pub fn cuda_peak(target: &Target) -> Peak {
    let cuda = target.cuda_device().expect("a CUDA target");
    let len = 256 << 20; // 256 Mi f32 = 1 GiB
    let source = Tensor::ones([len], DType::F32, target.device).expect("1 GiB on the GPU");
    let dest = Tensor::zeros([len], DType::F32, target.device).expect("1 GiB on the GPU");
    // assign: one device-to-device copy into a buffer from the caching allocator.
    let copy_seconds = best_of(10, target, || dest.assign(&source).expect("device copy"));
    drop((source, dest));
    let n = 4096;
    let a = random(&[n, n], 1, target.device);
    let b = random(&[n, n], 2, target.device);
    let c = Tensor::zeros([n, n], DType::F32, target.device).expect("C");
    let (gemm_seconds, how) = match vendor::Cublas::new(cuda) {
        Ok(cublas) => (
            best_of(10, target, || {
                cublas.sgemm(&a, &b, &c, false, false).unwrap()
            }),
            "cuBLAS SGEMM 4096³, TF32 off".to_string(),
        ),
        Err(e) => {
            eprintln!("cuBLAS unavailable ({e}); kiln's GEMM stands in for the compute peak");
            (
                best_of(10, target, || {
                    std::hint::black_box(a.matmul(&b).unwrap());
                }),
                "kiln GEMM 4096³ (cuBLAS unavailable)".to_string(),
            )
        }
    };
    Peak {
        device: "cuda".into(),
        machine: target.describe(),
        bytes_per_second: 2.0 * (4 * len) as f64 / copy_seconds,
        bandwidth_how: "1 GiB device-to-device copy".into(),
        flops_per_second: 2.0 * (n as f64).powi(3) / gemm_seconds,
        compute_how: how,
    }
}
