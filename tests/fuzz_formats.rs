//! Fuzzing of the files kiln reads: safetensors checkpoints (plain module
//! files and training checkpoints), the run state (`checkpoint.json` and the
//! copy embedded in the weights), IDX files (raw, gzipped, and as a dataset
//! split) and the text corpus. Valid files are mutated at random (bit flips,
//! truncation, edited headers and fields) and loaded. For every mutant:
//!
//! 1. no panic: the load returns `Ok` or an `Err` whose message names the file;
//! 2. no allocation beyond what the file justifies: the heap grows by less
//!    than 4 × the file's size + 1 MiB during the load (a gzipped IDX file
//!    may also use the size its header declares, up to what the stream holds);
//! 3. no hang: the load finishes within a second.
//!
//! The tally per format is printed at the end
//! (`cargo test --test fuzz_formats -- --nocapture`). `KILN_FUZZ_SEED` and
//! `KILN_FUZZ_SCALE` (a multiplier of the case counts) widen a search;
//! `KILN_FUZZ_SHOW_ERRORS=1` prints every error message, to review them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::fs;
use std::io::{Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, Once};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use kiln::checkpoint;
use kiln::cli::run_dir::load_checkpoint;
use kiln::cli::specs;
use kiln::data::idx::{Split, load_split, read_idx};
use kiln::data::text::load_text;
use kiln::nn::{Init, Linear, Sequential};
use kiln::{DType, Device, Rng, Tensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// Heap accounting, per thread: the harness runs tests on several threads, and
// the formats below run side by side, so a process-wide count would mix them.

struct CountingAllocator;

thread_local! {
    static IN_USE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    /// While a case runs: the largest single allocation tolerated. A larger
    /// one aborts the process with the case named, before it exhausts memory.
    static HARD_LIMIT: Cell<usize> = const { Cell::new(usize::MAX) };
    /// The running case's description, for that abort message.
    static CASE: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
    /// Whether a panic on this thread belongs to a fuzz case (recorded, not printed).
    static IN_CASE: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn heap_grew(bytes: usize) {
    if bytes > HARD_LIMIT.try_with(Cell::get).unwrap_or(usize::MAX) {
        refuse_allocation(bytes);
    }
    let _ = IN_USE.try_with(|in_use| {
        let now = in_use.get() + bytes as isize;
        in_use.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn heap_shrank(bytes: usize) {
    let _ = IN_USE.try_with(|in_use| in_use.set(in_use.get() - bytes as isize));
}

/// Writes "an allocation of N bytes while loading CASE" to stderr without
/// allocating, and aborts.
fn refuse_allocation(bytes: usize) -> ! {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut rest = bytes;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let (case_ptr, case_len) = CASE.try_with(Cell::get).unwrap_or((std::ptr::null(), 0));
    let case: &[u8] = if case_ptr.is_null() {
        b"?"
    } else {
        // SAFETY: CASE points at the description `measure` holds for the whole load.
        unsafe { std::slice::from_raw_parts(case_ptr, case_len) }
    };
    let parts: [&[u8]; 5] = [
        b"\nfuzz_formats: an allocation of ",
        &digits[start..],
        b" bytes while loading ",
        case,
        b"\n",
    ];
    for part in parts {
        // SAFETY: a write of a valid buffer to stderr.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    std::process::abort()
}

// SAFETY: every call is passed to System unchanged; only counters are added.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        heap_grew(layout.size());
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc(layout) };
        if ptr.is_null() {
            heap_shrank(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        heap_grew(layout.size());
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if ptr.is_null() {
            heap_shrank(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) };
        heap_shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        heap_shrank(layout.size());
        heap_grew(new_size);
        // SAFETY: the caller's contract, passed on.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if new.is_null() {
            heap_shrank(new_size);
            heap_grew(layout.size());
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const MIB: usize = 1 << 20;

/// A load may take this long (debug build, busy machine) before it counts as a hang.
const TIME_LIMIT: Duration = Duration::from_secs(1);

/// A case still running after this long is a hang that would stall the
/// suite: the watchdog names it and aborts.
const WATCHDOG_LIMIT: Duration = Duration::from_secs(60);

/// The cases in flight, one per thread: when each began and what it is.
static IN_FLIGHT: Mutex<Vec<(ThreadId, Instant, String)>> = Mutex::new(Vec::new());

/// Records panics of fuzz cases instead of printing them, and starts the watchdog.
fn install_hooks() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_CASE.with(Cell::get) {
                LAST_PANIC.with(|last| *last.borrow_mut() = Some(info.to_string()));
            } else {
                previous(info);
            }
        }));
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let in_flight = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((_, _, case)) = in_flight
                    .iter()
                    .find(|(_, started, _)| started.elapsed() > WATCHDOG_LIMIT)
                {
                    eprintln!("fuzz_formats: loading {case} hangs; aborting");
                    std::process::abort();
                }
            }
        });
    });
}

/// What one load did.
struct Outcome {
    /// Err(panic message) for a panic.
    result: Result<Result<(), String>, String>,
    heap_growth: usize,
    elapsed: Duration,
}

/// Runs `load` once: catches a panic, and measures the heap's peak growth
/// and the time. An allocation beyond `hard_limit` aborts the process.
fn measure(case: &str, hard_limit: usize, load: impl FnOnce() -> Result<(), String>) -> Outcome {
    let thread = std::thread::current().id();
    IN_FLIGHT
        .lock()
        .unwrap()
        .push((thread, Instant::now(), case.to_string()));
    let base = IN_USE.with(Cell::get);
    PEAK.with(|peak| peak.set(base));
    CASE.with(|c| c.set((case.as_ptr(), case.len())));
    IN_CASE.with(|flag| flag.set(true));
    HARD_LIMIT.with(|limit| limit.set(hard_limit));
    let started = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(load));
    let elapsed = started.elapsed();
    HARD_LIMIT.with(|limit| limit.set(usize::MAX));
    IN_CASE.with(|flag| flag.set(false));
    CASE.with(|c| c.set((std::ptr::null(), 0)));
    let heap_growth = (PEAK.with(Cell::get) - base).max(0) as usize;
    IN_FLIGHT.lock().unwrap().retain(|(t, _, _)| *t != thread);
    let result = result.map_err(|_| {
        LAST_PANIC
            .with(|last| last.borrow_mut().take())
            .unwrap_or_else(|| "a panic without a message".into())
    });
    Outcome {
        result,
        heap_growth,
        elapsed,
    }
}

// ---------------------------------------------------------------------------
// The tally.

#[derive(Default)]
struct Tally {
    cases: usize,
    ok: usize,
    err: usize,
    panics: usize,
    /// Every broken property, one line each.
    failures: Vec<String>,
}

impl Tally {
    /// Loads one mutant of `file_len` bytes and checks the three properties;
    /// an error message must contain `must_name` (the file or its directory).
    fn check(
        &mut self,
        case: String,
        file_len: usize,
        extra_allowance: usize,
        must_name: &str,
        load: impl FnOnce() -> Result<(), String>,
    ) {
        let allowed = 4 * file_len + MIB + extra_allowance;
        let outcome = measure(&case, allowed.saturating_mul(64).max(256 * MIB), load);
        self.cases += 1;
        match &outcome.result {
            Ok(Ok(())) => self.ok += 1,
            Ok(Err(message)) => {
                self.err += 1;
                if std::env::var_os("KILN_FUZZ_SHOW_ERRORS").is_some() {
                    println!("{case}\n    -> {message}");
                }
                if !message.contains(must_name) {
                    self.failures.push(format!(
                        "{case}: the error does not name {must_name}: {message}"
                    ));
                }
            }
            Err(panic) => {
                self.panics += 1;
                self.failures
                    .push(format!("{case}: panicked: {}", panic.replace('\n', " ")));
            }
        }
        if outcome.heap_growth > allowed {
            self.failures.push(format!(
                "{case}: the heap grew by {} bytes, more than the {allowed} a {file_len}-byte file justifies",
                outcome.heap_growth
            ));
        }
        if outcome.elapsed > TIME_LIMIT {
            self.failures.push(format!(
                "{case}: the load took {:.2} s",
                outcome.elapsed.as_secs_f64()
            ));
        }
    }
}

fn seed() -> u64 {
    std::env::var("KILN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_240_611)
}

/// `base` cases, times `KILN_FUZZ_SCALE` (1 unless set).
fn cases(base: usize) -> usize {
    let scale: usize = std::env::var("KILN_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    base * scale
}

// ---------------------------------------------------------------------------
// Scratch files.

/// A fresh directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("kiln-fuzz-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn sub(&self, name: &str) -> PathBuf {
        let dir = self.0.join(name);
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// An unsigned-byte IDX file: magic 0 0 8 rank, big-endian dims, data.
fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// `data/fashion-mnist/` (8 train and 4 test images) and `data/shakespeare.txt`.
fn write_training_data(data: &Path) {
    let images = data.join("fashion-mnist");
    fs::create_dir_all(&images).unwrap();
    for (prefix, count) in [("train", 8u32), ("t10k", 4)] {
        let pixels: Vec<u8> = (0..count as usize * 784)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        fs::write(
            images.join(format!("{prefix}-images-idx3-ubyte")),
            idx_bytes(&[count, 28, 28], &pixels),
        )
        .unwrap();
        let labels: Vec<u8> = (0..count as u8).map(|i| i % 10).collect();
        fs::write(
            images.join(format!("{prefix}-labels-idx1-ubyte")),
            idx_bytes(&[count], &labels),
        )
        .unwrap();
    }
    let line = "To be, or not to be, that is the question: whether 'tis nobler in the mind.\n";
    fs::write(data.join("shakespeare.txt"), line.repeat(20)).unwrap();
}

/// Trains a tiny `model` for two steps with the kiln binary into `out`.
fn train(model: &str, data: &Path, out: &Path) -> Vec<u8> {
    let sizes: &[&str] = match model {
        "vae" => &[
            "--hidden",
            "8",
            "--latent",
            "2",
            "--batch-size",
            "4",
            "--limit",
            "8",
        ],
        "gan" => &[
            "--nz",
            "4",
            "--ngf",
            "2",
            "--ndf",
            "2",
            "--batch-size",
            "2",
            "--limit",
            "8",
        ],
        "gpt" => &[
            "--n-layer",
            "1",
            "--n-head",
            "2",
            "--n-embd",
            "8",
            "--block-size",
            "8",
            "--batch-size",
            "2",
        ],
        _ => unreachable!(),
    };
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", model, "--steps", "2"])
        .args(sizes)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kiln train {model} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    fs::read(out.join("checkpoint.safetensors")).unwrap()
}

// ---------------------------------------------------------------------------
// Mutations.

fn pick<T: Clone>(rng: &mut StdRng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())].clone()
}

fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.random()).collect()
}

/// Flips 1 to 8 random bits of `bytes[range]`.
fn flip_bits(rng: &mut StdRng, bytes: &mut [u8], range: std::ops::Range<usize>) -> String {
    if range.is_empty() {
        return "no bit flipped".into();
    }
    let flips = rng.random_range(1..=8);
    let mut at = Vec::new();
    for _ in 0..flips {
        let i = rng.random_range(range.clone());
        bytes[i] ^= 1 << rng.random_range(0..8);
        at.push(i);
    }
    format!("bits flipped at bytes {at:?}")
}

/// A byte-level mutation of a whole file; `hot` is the range that matters
/// most (a header), which gets half of the flips.
fn mutate_bytes(
    rng: &mut StdRng,
    original: &[u8],
    hot: std::ops::Range<usize>,
) -> (String, Vec<u8>) {
    let mut bytes = original.to_vec();
    let len = bytes.len();
    let description = match rng.random_range(0..6) {
        0 => flip_bits(rng, &mut bytes, hot),
        1 => flip_bits(rng, &mut bytes, 0..len),
        2 => {
            let keep = rng.random_range(0..len.max(1));
            bytes.truncate(keep);
            format!("truncated to {keep} bytes")
        }
        3 => {
            let extra = rng.random_range(1..512);
            let tail = random_bytes(rng, extra);
            bytes.extend(tail);
            format!("{extra} random bytes appended")
        }
        4 => {
            let start = rng.random_range(0..len.max(1));
            let end = (start + rng.random_range(1..64)).min(len);
            for b in &mut bytes[start..end] {
                *b = rng.random();
            }
            format!("bytes {start}..{end} randomised")
        }
        _ => {
            let at = rng
                .random_range(hot.start..hot.end.max(hot.start + 1))
                .min(len);
            if rng.random_bool(0.5) && at < len {
                bytes.remove(at);
                format!("byte {at} removed")
            } else {
                let byte = rng.random();
                bytes.insert(at, byte);
                format!("byte {byte:#04x} inserted at {at}")
            }
        }
    };
    (description, bytes)
}

/// A value of some unexpected type or size.
fn odd_value(rng: &mut StdRng) -> Value {
    match rng.random_range(0..16) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!("eight"),
        3 => json!(-1),
        4 => json!(0.5),
        5 => json!(1e300),
        6 => json!(u64::MAX),
        7 => json!(i64::MIN),
        8 => json!([]),
        9 => json!({}),
        10 => nested(rng.random_range(1..400)),
        11 => json!("\u{0}\u{FFFF}é"),
        12 => json!(0),
        13 => json!(1u64 << 33),
        14 => json!("x".repeat(rng.random_range(1000..100_000))),
        _ => json!([1, "two", null]),
    }
}

/// Arrays nested `depth` deep.
fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(0), |inner, _| Value::Array(vec![inner]))
}

/// Every JSON pointer into `value` (the root excluded).
fn pointers(value: &Value, at: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let here = format!("{at}/{}", key.replace('~', "~0").replace('/', "~1"));
                out.push(here.clone());
                pointers(child, &here, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate().take(8) {
                let here = format!("{at}/{i}");
                out.push(here.clone());
                pointers(child, &here, out);
            }
        }
        _ => {}
    }
}

/// Replaces a random node of `value` with an odd one, or removes it.
fn mutate_json_node(rng: &mut StdRng, value: &mut Value) -> String {
    let mut all = Vec::new();
    pointers(value, "", &mut all);
    if all.is_empty() {
        *value = odd_value(rng);
        return "root replaced".into();
    }
    let at = pick(rng, &all);
    if rng.random_bool(0.3) {
        let (parent, key) = at.rsplit_once('/').unwrap();
        let parent = if parent.is_empty() {
            Some(&mut *value)
        } else {
            value.pointer_mut(parent)
        };
        match parent {
            Some(Value::Object(map)) => {
                map.remove(&key.replace("~1", "/").replace("~0", "~"));
            }
            Some(Value::Array(items)) => {
                items.remove(key.parse::<usize>().unwrap());
            }
            _ => {}
        }
        return format!("{at} removed");
    }
    let odd = odd_value(rng);
    let shown = shorten(&odd.to_string());
    *value.pointer_mut(&at).unwrap() = odd;
    format!("{at} = {shown}")
}

fn shorten(text: &str) -> String {
    if text.len() <= 60 {
        text.to_string()
    } else {
        let cut = (0..=60).rev().find(|&i| text.is_char_boundary(i)).unwrap();
        format!("{}…({} bytes)", &text[..cut], text.len())
    }
}

/// Text-level damage to a JSON document.
fn mutate_json_text(rng: &mut StdRng, text: &[u8]) -> (String, Vec<u8>) {
    let mut bytes = text.to_vec();
    let len = bytes.len();
    match rng.random_range(0..7) {
        0 => {
            let invalid: &[u8] = pick(
                rng,
                &[
                    &[0xff][..],
                    &[0xc3],
                    &[0x80],
                    &[0xc0, 0xaf],
                    &[0xed, 0xa0, 0x80],
                    &[0xf4, 0x90, 0x80, 0x80],
                ],
            );
            let at = rng.random_range(0..len);
            bytes.splice(at..at, invalid.iter().copied());
            (format!("invalid UTF-8 {invalid:02x?} at byte {at}"), bytes)
        }
        1 => {
            // A number literal replaced by one no integer or float type holds.
            let digits: Vec<usize> = (0..len).filter(|&i| bytes[i].is_ascii_digit()).collect();
            let at = if digits.is_empty() {
                rng.random_range(0..len)
            } else {
                pick(rng, &digits)
            };
            let end = (at..len)
                .find(|&i| !bytes[i].is_ascii_digit())
                .unwrap_or(len);
            let huge: &[u8] = pick(
                rng,
                &[
                    &b"18446744073709551616"[..],
                    b"99999999999999999999999999999",
                    b"1e400",
                    b"4294967296",
                    b"-0",
                    b"0.0000001",
                ],
            );
            bytes.splice(at..end, huge.iter().copied());
            (
                format!(
                    "number at byte {at} replaced by {}",
                    String::from_utf8_lossy(huge)
                ),
                bytes,
            )
        }
        2 => {
            let depth = pick(rng, &[129usize, 1000, 100_000]);
            let mut deep = "[".repeat(depth).into_bytes();
            deep.extend(&bytes);
            (
                format!("{depth} unclosed brackets before the document"),
                deep,
            )
        }
        3 => {
            let keep = rng.random_range(0..len);
            bytes.truncate(keep);
            (format!("truncated to {keep} bytes"), bytes)
        }
        4 => {
            let mut with_bom = vec![0xef, 0xbb, 0xbf];
            with_bom.extend(&bytes);
            ("a byte-order mark before the document".into(), with_bom)
        }
        5 => {
            let description = flip_bits(rng, &mut bytes, 0..len);
            (description, bytes)
        }
        _ => {
            // Duplicate keys: the last copy of a field under a second value.
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let doubled = text.replacen("\"step\":", "\"step\": 1, \"step\":", 1);
            ("a duplicated step field".into(), doubled.into_bytes())
        }
    }
}

/// A safetensors file split into its header and its data bytes.
fn split_safetensors(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

fn join_safetensors(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(data);
    bytes
}

fn header_len(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

const DTYPES: [&str; 14] = [
    "F32", "F64", "F16", "BF16", "U32", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "Q4",
    "",
];

const DIMS: [u64; 11] = [
    0,
    1,
    2,
    3,
    7,
    255,
    65_536,
    1 << 31,
    1 << 32,
    1 << 62,
    u64::MAX,
];

/// An edit of a safetensors header: the length field, a tensor's dtype,
/// shape or offsets, a dtype reinterpreted with a matching shape, removed
/// or extra entries, the metadata, nesting, invalid UTF-8.
fn mutate_safetensors_header(rng: &mut StdRng, original: &[u8]) -> (String, Vec<u8>) {
    let (mut header, data) = split_safetensors(original);
    let file_len = original.len() as u64;
    let names: Vec<String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    let name = pick(rng, &names);
    let entry = &mut header[&name];
    let description = match rng.random_range(0..14) {
        12 | 13 => return relayout(rng, original),
        0 => {
            let n = header_len(original) as u64 - 8;
            let random = rng.random();
            let length = pick(
                rng,
                &[
                    0,
                    1,
                    7,
                    n - 1,
                    n + 1,
                    file_len - 8,
                    file_len,
                    file_len + 1,
                    1 << 62,
                    u64::MAX,
                    100_000_001,
                    random,
                ],
            );
            let mut bytes = original.to_vec();
            bytes[..8].copy_from_slice(&length.to_le_bytes());
            return (format!("header length {length}"), bytes);
        }
        1 => {
            let dtype = pick(rng, &DTYPES);
            entry["dtype"] = json!(dtype);
            format!("{name}: dtype {dtype}")
        }
        2 => {
            let mut shape: Vec<Value> = entry["shape"].as_array().cloned().unwrap_or_default();
            let description = match rng.random_range(0..8) {
                0 => {
                    shape.clear();
                    "shape []".to_string()
                }
                1 => {
                    shape.push(json!(pick(rng, &DIMS)));
                    "a dimension appended".to_string()
                }
                2 => {
                    shape.pop();
                    "a dimension removed".to_string()
                }
                3 if !shape.is_empty() => {
                    let i = rng.random_range(0..shape.len());
                    shape[i] = json!(pick(rng, &DIMS));
                    format!("dimension {i} = {}", shape[i])
                }
                4 => {
                    shape = vec![json!(1u64 << 32); 3];
                    "shape [2^32, 2^32, 2^32] (element count overflows)".to_string()
                }
                5 => {
                    shape = pick(
                        rng,
                        &[
                            vec![json!(0), json!(1u64 << 40), json!(1u64 << 40)],
                            vec![json!(1u64 << 40), json!(0), json!(1u64 << 40)],
                            vec![json!(1u64 << 40), json!(1u64 << 40), json!(0)],
                        ],
                    );
                    "an empty shape with huge dimensions".to_string()
                }
                6 => {
                    let rank = rng.random_range(10..2000);
                    let mut ones = vec![json!(1); rank];
                    ones.extend(shape);
                    shape = ones;
                    format!("{rank} leading dimensions of 1")
                }
                _ => {
                    let odd = odd_value(rng);
                    let shown = shorten(&odd.to_string());
                    entry["shape"] = odd;
                    return (
                        format!("{name}: shape = {shown}"),
                        join_safetensors(header.to_string().as_bytes(), &data),
                    );
                }
            };
            entry["shape"] = Value::Array(shape);
            format!("{name}: {description}")
        }
        3 => {
            let offsets = entry["data_offsets"].clone();
            let (s, e) = (offsets[0].as_u64().unwrap(), offsets[1].as_u64().unwrap());
            let new = pick(
                rng,
                &[
                    json!([s, file_len * 2]),
                    json!([s.saturating_sub(4), e]),
                    json!([e, s]),
                    json!([0, 0]),
                    json!([1u64 << 62, 1u64 << 63]),
                    json!([s]),
                    json!([-1, e]),
                    json!([s, e + 4]),
                    json!([s as f64 + 0.5, e]),
                    json!([u64::MAX - 1, u64::MAX]),
                    json!([s, e, e]),
                    json!({"start": s}),
                ],
            );
            let shown = new.to_string();
            entry["data_offsets"] = new;
            format!("{name}: data_offsets {shown}")
        }
        4 => reinterpret(rng, &name, entry),
        5 => {
            let field = pick(rng, &["dtype", "shape", "data_offsets"]);
            if rng.random_bool(0.5) {
                entry.as_object_mut().unwrap().remove(field);
                format!("{name}: {field} removed")
            } else {
                entry["extra"] = json!(1);
                format!("{name}: an unknown field")
            }
        }
        6 => {
            let object = header.as_object_mut().unwrap();
            match rng.random_range(0..3) {
                0 => {
                    object.remove(&name);
                    format!("{name} removed")
                }
                1 => {
                    let value = object.remove(&name).unwrap();
                    object.insert(format!("{name}\u{0}é"), value);
                    format!("{name} renamed")
                }
                _ => {
                    let value = object[&name].clone();
                    object.insert(format!("{name}.copy"), value);
                    format!("{name} listed twice with the same bytes")
                }
            }
        }
        7 => {
            let metadata = pick(
                rng,
                &[
                    Value::Null,
                    json!({"kiln.run_state": 7}),
                    json!({"kiln.run_state": {"format": 1}}),
                    json!([]),
                    json!("text"),
                    json!({"kiln.run_state": "x".repeat(50_000)}),
                ],
            );
            let shown = shorten(&metadata.to_string());
            header["__metadata__"] = metadata;
            format!("__metadata__ = {shown}")
        }
        8 => mutate_json_node(rng, &mut header),
        9 => {
            let depth = pick(rng, &[128usize, 129, 10_000, 1_000_000]);
            let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            return (
                format!("a header of {depth} nested arrays"),
                join_safetensors(deep.as_bytes(), &data),
            );
        }
        10 => {
            let mut text = header.to_string().into_bytes();
            let at = rng.random_range(0..text.len());
            let byte = pick(rng, &[0xffu8, 0xc3, 0x80, 0xed]);
            text[at] = byte;
            return (
                format!("header byte {at} = {byte:#04x}"),
                join_safetensors(&text, &data),
            );
        }
        _ => {
            let pad = rng.random_range(1..4096);
            let text = format!("{}{}", header, " ".repeat(pad));
            return (
                format!("header padded with {pad} spaces"),
                join_safetensors(text.as_bytes(), &data),
            );
        }
    };
    (
        description,
        join_safetensors(header.to_string().as_bytes(), &data),
    )
}

/// Bytes per element of a safetensors dtype.
fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "U8" | "I8" | "BOOL" => 1,
        _ => return None,
    })
}

/// One tensor given another shape and dtype, and the data laid out again so
/// that the file stays valid for safetensors: that tensor's bytes are cut or
/// padded with random bytes to its new size, and every offset recomputed.
/// Tensors with no elements but huge dimensions, scalars and high ranks
/// reach kiln this way.
fn relayout(rng: &mut StdRng, original: &[u8]) -> (String, Vec<u8>) {
    let (mut header, data) = split_safetensors(original);
    let object = header.as_object_mut().unwrap();
    let mut order: Vec<(String, usize, usize)> = object
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, entry)| {
            let offsets = &entry["data_offsets"];
            let start = offsets[0].as_u64().unwrap() as usize;
            (name.clone(), start, offsets[1].as_u64().unwrap() as usize)
        })
        .collect();
    order.sort_by_key(|&(_, start, _)| start);
    let (name, start, end) = pick(rng, &order);
    let old_dtype = object[&name]["dtype"].as_str().unwrap().to_string();
    let elements = (end - start) as u64 / dtype_size(&old_dtype).unwrap();
    let dtype = if rng.random_bool(0.5) {
        old_dtype
    } else {
        pick(
            rng,
            &[
                "F32", "F64", "F16", "BF16", "U32", "I64", "I32", "U8", "BOOL",
            ],
        )
        .to_string()
    };
    let shape: Vec<u64> = match rng.random_range(0..8) {
        0 => vec![0, 1 << 40, 1 << 40],
        1 => vec![1 << 40, 0],
        2 => vec![0],
        3 => vec![],
        4 => std::iter::repeat_n(1, rng.random_range(5..300))
            .chain([elements])
            .collect(),
        5 => vec![elements],
        6 => vec![1, elements, 1],
        _ => (0..rng.random_range(1..4))
            .map(|_| rng.random_range(1..40))
            .collect(),
    };
    let size = shape
        .iter()
        .try_fold(dtype_size(&dtype).unwrap(), |acc, &d| acc.checked_mul(d))
        .unwrap() as usize;
    object[&name]["dtype"] = json!(dtype);
    object[&name]["shape"] = json!(shape);
    let mut laid_out = Vec::new();
    for (tensor, start, end) in &order {
        let begin = laid_out.len();
        let mut bytes = data[*start..*end].to_vec();
        if *tensor == name {
            let padding = size.saturating_sub(bytes.len());
            bytes.truncate(size);
            bytes.extend(random_bytes(rng, padding));
        }
        laid_out.extend(bytes);
        object[tensor]["data_offsets"] = json!([begin, laid_out.len()]);
    }
    (
        format!("{name} laid out again as {dtype} {shape:?}"),
        join_safetensors(header.to_string().as_bytes(), &laid_out),
    )
}

/// The tensor's bytes read as another dtype, with its last dimension scaled
/// to keep the byte count: a file that stays valid for safetensors.
fn reinterpret(rng: &mut StdRng, name: &str, entry: &mut Value) -> String {
    let dtype = entry["dtype"].as_str().unwrap_or("F32").to_string();
    let bits: u64 = match dtype.as_str() {
        "F64" | "I64" => 64,
        "F16" | "BF16" => 16,
        _ => 32,
    };
    let (target, target_bits) = pick(
        rng,
        &[
            ("F16", 16u64),
            ("BF16", 16),
            ("U32", 32),
            ("I32", 32),
            ("F64", 64),
            ("I64", 64),
            ("U8", 8),
            ("BOOL", 8),
        ],
    );
    let mut shape: Vec<u64> = entry["shape"]
        .as_array()
        .map(|dims| dims.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    if shape.is_empty() {
        shape.push(1);
    }
    let last = shape.last_mut().unwrap();
    let bytes_in_last = *last * bits;
    if !bytes_in_last.is_multiple_of(target_bits) {
        return format!("{name}: kept (cannot read {dtype} as {target})");
    }
    *last = bytes_in_last / target_bits;
    entry["dtype"] = json!(target);
    entry["shape"] = json!(shape);
    format!("{name}: {dtype} read as {target} {shape:?}")
}

/// A run state edited: wrong types, missing fields, huge numbers, unknown
/// models, other weights, deep nesting, or damaged text. Returns bytes that
/// may not be UTF-8.
fn mutate_run_state(rng: &mut StdRng, state: &Value) -> (String, Vec<u8>) {
    let mut state = state.clone();
    let description = match rng.random_range(0..10) {
        0 | 1 => mutate_json_node(rng, &mut state),
        2 => {
            let model = pick(
                rng,
                &[
                    "gan",
                    "vae",
                    "gpt",
                    "classifier",
                    "",
                    "VAE",
                    "resnet",
                    "vae\u{0}",
                ],
            );
            state["model"] = json!(model);
            format!("model {model:?}")
        }
        3 | 4 => {
            let keys: Vec<String> = state["config"]
                .as_object()
                .map(|c| c.keys().cloned().collect())
                .unwrap_or_default();
            let key = pick(rng, &keys);
            let value = pick(
                rng,
                &[
                    json!(0),
                    json!(1),
                    json!(3),
                    json!(100_000),
                    json!(1_000_000_000_000u64),
                    json!(1u64 << 33),
                    json!(1u64 << 62),
                    json!(u64::MAX),
                    json!(-1),
                    json!(0.5),
                    json!("8"),
                ],
            );
            let shown = value.to_string();
            state["config"][&key] = value;
            format!("config.{key} = {shown}")
        }
        5 => {
            let vocab = pick(
                rng,
                &[
                    json!("ba"),
                    json!("aa"),
                    json!(""),
                    json!("abcdefghijklmnopqrstuvwxyz".repeat(100)),
                    json!(42),
                    Value::Null,
                ],
            );
            let shown = shorten(&vocab.to_string());
            state["vocab"] = vocab;
            format!("vocab = {shown}")
        }
        6 => {
            let weights = pick(
                rng,
                &[
                    "",
                    ".",
                    "..",
                    "/dev/zero",
                    "missing.safetensors",
                    "checkpoint.json",
                    "../checkpoint.safetensors",
                ],
            );
            state["weights"] = json!(weights);
            format!("weights {weights:?}")
        }
        7 => {
            let format = pick(rng, &[json!(0), json!(2), json!(1u64 << 32), json!(-1)]);
            let shown = format.to_string();
            state["format"] = format;
            format!("format {shown}")
        }
        8 => {
            let depth = pick(rng, &[10usize, 120, 127, 128, 129, 500]);
            let at = pick(rng, &["/config", "/training", "/vocab", "/step"]);
            if let Some(node) = state.pointer_mut(at) {
                *node = nested(depth);
            }
            format!("{at} nested {depth} deep")
        }
        _ => {
            let text = serde_json::to_vec_pretty(&state).unwrap();
            return mutate_json_text(rng, &text);
        }
    };
    (description, serde_json::to_vec_pretty(&state).unwrap())
}

/// `original` (a training checkpoint) with `state` as its embedded run state;
/// state bytes that are not UTF-8 are spliced in raw.
fn embed_state(original: &[u8], state: &[u8]) -> Vec<u8> {
    let (mut header, data) = split_safetensors(original);
    let text = String::from_utf8_lossy(state).into_owned();
    header["__metadata__"]["kiln.run_state"] = json!(text);
    let mut header = header.to_string().into_bytes();
    if std::str::from_utf8(state).is_err()
        && let Some(at) = header.windows(3).position(|w| w == [0xef, 0xbf, 0xbd])
    {
        header.splice(at..at + 3, [0xff]);
    }
    join_safetensors(&header, &data)
}

/// Damage to an IDX file's content: bits, length, magic, type, rank,
/// dimensions (overflowing, or far beyond the data), trailing bytes.
fn mutate_idx(rng: &mut StdRng, original: &[u8], data: &[u8]) -> (String, Vec<u8>) {
    let mut bytes = original.to_vec();
    let rank = bytes[3] as usize;
    match rng.random_range(0..10) {
        0 => mutate_bytes(rng, original, 0..4 + 4 * rank),
        1 => {
            let at = rng.random_range(0..4);
            let value = pick(rng, &[0u8, 1, 0x08, 0x09, 0x0b, 0x0c, 0x0d, 0x0e, 0xff]);
            bytes[at] = value;
            (format!("magic byte {at} = {value:#04x}"), bytes)
        }
        2 => {
            let rank = rng.random_range(0..=255u8);
            bytes[3] = rank;
            (format!("rank {rank}"), bytes)
        }
        3 => {
            let at = rng.random_range(0..rank);
            let random = rng.random();
            let dim = pick(rng, &[0u32, 1, 2, 255, 65_535, u32::MAX, random]);
            bytes[4 + 4 * at..8 + 4 * at].copy_from_slice(&dim.to_be_bytes());
            (format!("dimension {at} = {dim}"), bytes)
        }
        4 => {
            let rank = pick(rng, &[3usize, 4, 5, 255]);
            (
                format!("{rank} dimensions of u32::MAX (the size overflows)"),
                idx_bytes(&vec![u32::MAX; rank], data),
            )
        }
        5 => {
            let dims = pick(
                rng,
                &[
                    vec![65_535u32, 65_535, 255],
                    vec![u32::MAX, 28, 28],
                    vec![1 << 24, 28, 28],
                    vec![u32::MAX],
                ],
            );
            (
                format!("dimensions {dims:?} far beyond the data"),
                idx_bytes(&dims, data),
            )
        }
        6 => {
            let extra = rng.random_range(1..4096);
            let tail = random_bytes(rng, extra);
            bytes.extend(tail);
            (format!("{extra} trailing bytes"), bytes)
        }
        7 => {
            bytes.truncate(4 + 4 * rank);
            ("the header alone".into(), bytes)
        }
        8 => {
            // Extra dimensions of 1 keep the size: a valid file of another rank.
            let extra = rng.random_range(1..=250);
            let dims: Vec<u32> = (0..rank)
                .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()))
                .chain(std::iter::repeat_n(1, extra))
                .collect();
            (
                format!("{extra} extra dimensions of 1"),
                idx_bytes(&dims, data),
            )
        }
        _ => {
            let keep = rng.random_range(0..bytes.len());
            bytes.truncate(keep);
            (format!("truncated to {keep} bytes"), bytes)
        }
    }
}

/// Damage to a gzip stream itself: its header, compressed body or trailer.
fn mutate_gzip(rng: &mut StdRng, gz: &[u8]) -> (String, Vec<u8>) {
    let mut bytes = gz.to_vec();
    let len = bytes.len();
    match rng.random_range(0..7) {
        0 => {
            let description = flip_bits(rng, &mut bytes, 10..len - 8);
            (format!("compressed body: {description}"), bytes)
        }
        1 => {
            let keep = rng.random_range(2..len);
            bytes.truncate(keep);
            (format!("gzip stream truncated to {keep} bytes"), bytes)
        }
        2 => {
            let at = rng.random_range(len - 8..len);
            bytes[at] ^= 0x5a;
            (format!("gzip trailer byte {at} changed"), bytes)
        }
        3 => {
            // FEXTRA announced with the largest extra field, and no field.
            bytes[3] |= 0x04;
            bytes.splice(10..10, [0xff, 0xff]);
            (
                "gzip header announces a 65535-byte extra field".into(),
                bytes,
            )
        }
        4 => {
            // FNAME announced, and the name never ends.
            bytes[3] |= 0x08;
            bytes.truncate(10);
            bytes.extend(std::iter::repeat_n(b'a', 1000));
            ("gzip file name without its terminator".into(), bytes)
        }
        5 => {
            let len = rng.random_range(1..100);
            let tail = random_bytes(rng, len);
            bytes.extend(tail);
            ("garbage after the gzip stream".into(), bytes)
        }
        _ => {
            let description = flip_bits(rng, &mut bytes, 0..10);
            (format!("gzip header: {description}"), bytes)
        }
    }
}

/// How much heap a gzipped IDX file's load may use beyond the 4 × file size:
/// twice the decompressed bytes its header accounts for (the declared size,
/// or less if the stream holds less; growing a buffer may double it).
fn gzip_allowance(gz: &[u8]) -> usize {
    if !gz.starts_with(&[0x1f, 0x8b]) {
        return 0;
    }
    let mut decoder = flate2::read::GzDecoder::new(gz);
    let mut head = [0u8; 4];
    if decoder.read_exact(&mut head).is_err() || head[..3] != [0, 0, 8] {
        return 0;
    }
    let rank = head[3] as usize;
    let mut dims = vec![0u8; 4 * rank];
    if decoder.read_exact(&mut dims).is_err() {
        return 0;
    }
    let declared = dims
        .chunks_exact(4)
        .map(|d| u32::from_be_bytes(d.try_into().unwrap()) as u64)
        .try_fold(1u64, u64::checked_mul)
        .unwrap_or(u64::MAX);
    let mut sink = std::io::sink();
    let held = std::io::copy(&mut decoder.take(declared), &mut sink).unwrap_or(0);
    2 * (4 * rank as u64 + 4 + held) as usize
}

// ---------------------------------------------------------------------------
// The formats.

/// Plain safetensors files (a module's weights; tensors of every dtype)
/// through `checkpoint::load` and `checkpoint::load_module`.
fn fuzz_module_checkpoints(rng: &mut StdRng, dir: &Path, count: usize) -> Tally {
    let model = || {
        let mut rng = Rng::seed(2);
        let mut init = Init::new(&mut rng, Device::Cpu, DType::F32);
        Sequential::new()
            .with(Linear::new(48, 64, true, &mut init).unwrap())
            .with(Linear::new(64, 10, true, &mut init).unwrap())
    };
    let trained = model();
    let module_path = dir.join("module.safetensors");
    let metadata = [("step".to_string(), "17".to_string())].into();
    checkpoint::save_module(&module_path, &trained, &metadata).unwrap();
    let mixed_path = dir.join("mixed.safetensors");
    let values: Vec<f64> = (0..24).map(|i| i as f64 / 7.0 - 1.0).collect();
    let tensor = |dtype| {
        Tensor::from_vec(values.clone(), [2, 3, 4])
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    checkpoint::save(
        &mixed_path,
        &[
            ("f16".into(), tensor(DType::F16)),
            ("bf16".into(), tensor(DType::BF16)),
            ("f64".into(), tensor(DType::F64)),
            (
                "ids".into(),
                Tensor::from_indices((0..6).collect(), [6]).unwrap(),
            ),
            (
                "scalar".into(),
                Tensor::from_vec(vec![2.5f32], Vec::<usize>::new()).unwrap(),
            ),
        ],
        &metadata,
    )
    .unwrap();
    let originals = [
        fs::read(&module_path).unwrap(),
        fs::read(&mixed_path).unwrap(),
    ];
    let target = model();
    let path = dir.join("mutant.safetensors");
    let name = path.display().to_string();
    let mut tally = Tally::default();
    for i in 0..count {
        let which = i % 2;
        let original = &originals[which];
        let (description, bytes) = if rng.random_bool(0.5) {
            mutate_bytes(rng, original, 0..header_len(original))
        } else {
            mutate_safetensors_header(rng, original)
        };
        fs::write(&path, &bytes).unwrap();
        let base = ["module", "mixed"][which];
        tally.check(
            format!("{base}.safetensors, {description}, through load"),
            bytes.len(),
            0,
            &name,
            || checkpoint::load(&path).map(drop).map_err(|e| e.to_string()),
        );
        if which == 0 {
            tally.check(
                format!("{base}.safetensors, {description}, through load_module"),
                bytes.len(),
                0,
                &name,
                || {
                    checkpoint::load_module(&path, &target)
                        .map(drop)
                        .map_err(|e| e.to_string())
                },
            );
        }
    }
    tally
}

/// Loads a training checkpoint and the model its run state names, as
/// `kiln sample` and `kiln generate` do.
fn load_run(path: &Path) -> Result<(), String> {
    let loaded = load_checkpoint(path).map_err(|e| format!("{e:#}"))?;
    let built = match loaded.state.model.as_str() {
        "gan" => specs::load_generator(&loaded, Device::Cpu).map(drop),
        "gpt" => specs::load_gpt(&loaded, Device::Cpu).map(drop),
        "classifier" => specs::load_classifier(&loaded, Device::Cpu).map(drop),
        _ => specs::load_vae(&loaded, Device::Cpu).map(drop),
    };
    built.map_err(|e| format!("{e:#}"))
}

/// The training checkpoints of the three models, with the state as written.
struct Runs {
    /// (model, checkpoint.safetensors bytes, checkpoint.json bytes)
    runs: Vec<(String, Vec<u8>, Vec<u8>)>,
}

impl Runs {
    fn train(scratch: &Scratch) -> Runs {
        let data = scratch.sub("data");
        write_training_data(&data);
        let runs = ["vae", "gpt", "gan"]
            .iter()
            .map(|model| {
                let out = scratch.0.join(format!("trained-{model}"));
                let weights = train(model, &data, &out);
                let json = fs::read(out.join("checkpoint.json")).unwrap();
                (model.to_string(), weights, json)
            })
            .collect();
        Runs { runs }
    }
}

/// Training checkpoints with damaged bytes or headers, through
/// `load_checkpoint` and the model loaders of `cli::specs`.
fn fuzz_run_checkpoints(rng: &mut StdRng, dir: &Path, runs: &Runs, count: usize) -> Tally {
    let path = dir.join("checkpoint.safetensors");
    let name = path.display().to_string();
    let mut tally = Tally::default();
    for i in 0..count {
        let (model, original, _) = &runs.runs[i % runs.runs.len()];
        let (description, bytes) = if rng.random_bool(0.4) {
            mutate_bytes(rng, original, 0..header_len(original))
        } else {
            mutate_safetensors_header(rng, original)
        };
        fs::write(&path, &bytes).unwrap();
        tally.check(
            format!("{model} checkpoint.safetensors, {description}"),
            bytes.len(),
            0,
            &name,
            || load_run(&path),
        );
    }
    tally
}

/// Damaged run states: written as checkpoint.json beside good weights and
/// loaded through the .json path (`embedded` false), or embedded in the
/// weights' metadata and loaded through them (`embedded` true).
fn fuzz_run_states(
    rng: &mut StdRng,
    dir: &Path,
    runs: &Runs,
    count: usize,
    embedded: bool,
) -> Tally {
    let mut tally = Tally::default();
    let dirs: Vec<PathBuf> = runs
        .runs
        .iter()
        .map(|(model, weights, _)| {
            let run = dir.join(model);
            fs::create_dir_all(&run).unwrap();
            fs::write(run.join("checkpoint.safetensors"), weights).unwrap();
            run
        })
        .collect();
    for i in 0..count + config_edges(runs) {
        let which = i % runs.runs.len();
        let (model, weights, json) = &runs.runs[which];
        let state: Value = serde_json::from_slice(json).unwrap();
        // The first cases set every config field to every edge value; then random edits.
        let (description, text) = match config_edge(runs, i) {
            Some((key, value)) => {
                let mut edited = state.clone();
                edited["config"][&key] = value.clone();
                (
                    format!("config.{key} = {value}"),
                    serde_json::to_vec_pretty(&edited).unwrap(),
                )
            }
            None => mutate_run_state(rng, &state),
        };
        let run = &dirs[which];
        let (path, file_len) = if embedded {
            let path = run.join("checkpoint.safetensors");
            let bytes = embed_state(weights, &text);
            fs::write(&path, &bytes).unwrap();
            (path, bytes.len())
        } else {
            let path = run.join("checkpoint.json");
            fs::write(&path, &text).unwrap();
            (path, text.len() + weights.len())
        };
        let name = run.display().to_string();
        let place = if embedded {
            "embedded run state"
        } else {
            "checkpoint.json"
        };
        tally.check(
            format!("{model} {place}, {description}"),
            file_len,
            0,
            &name,
            || load_run(&path),
        );
    }
    tally
}

const CONFIG_EDGES: [u64; 6] = [0, 3, 100_000, 1_000_000_000_000, 1 << 33, u64::MAX];

fn config_edges(runs: &Runs) -> usize {
    runs.runs
        .iter()
        .map(|(_, _, json)| {
            let state: Value = serde_json::from_slice(json).unwrap();
            state["config"].as_object().unwrap().len() * CONFIG_EDGES.len()
        })
        .sum()
}

/// The `i`th (config key, edge value) over the models in turn, or None past the last.
fn config_edge(runs: &Runs, i: usize) -> Option<(String, Value)> {
    let which = i % runs.runs.len();
    let state: Value = serde_json::from_slice(&runs.runs[which].2).unwrap();
    let keys: Vec<&String> = state["config"].as_object().unwrap().keys().collect();
    let round = i / runs.runs.len();
    let key = keys.get(round / CONFIG_EDGES.len())?;
    Some((
        key.to_string(),
        json!(CONFIG_EDGES[round % CONFIG_EDGES.len()]),
    ))
}

/// IDX files, raw and gzipped, through `read_idx`, and as the files of a
/// split through `load_split`.
fn fuzz_idx(rng: &mut StdRng, dir: &Path, count: usize) -> [Tally; 3] {
    let pixels: Vec<u8> = (0..4 * 9 * 7).map(|i| (i * 37 % 256) as u8).collect();
    let images = idx_bytes(&[4, 9, 7], &pixels);
    let labels = idx_bytes(&[4], &[3, 1, 4, 1]);
    let (mut raw, mut gz, mut split) = (Tally::default(), Tally::default(), Tally::default());

    let mut bombs = Vec::new();
    // More decompressed bytes than the header declares: a 32 MiB tail of zeros.
    let mut tail = images.clone();
    tail.resize(images.len() + 32 * MIB, 0);
    bombs.push(("32 MiB of zeros after the declared data", gzip(&tail)));
    // A header declaring 16 MiB over a stream that holds 252 bytes.
    bombs.push((
        "dimensions [4096, 4096, 1] over 252 bytes",
        gzip(&idx_bytes(&[4096, 4096, 1], &pixels)),
    ));
    bombs.push((
        "dimensions [u32::MAX, 28, 28] over 252 bytes",
        gzip(&idx_bytes(&[u32::MAX, 28, 28], &pixels)),
    ));

    let path = dir.join("mutant-idx3-ubyte");
    let name = path.display().to_string();
    for i in 0..count + bombs.len() {
        let (description, bytes, zipped) = if let Some((description, bytes)) = bombs.get(i) {
            (description.to_string(), bytes.clone(), true)
        } else {
            let (description, content) = mutate_idx(rng, &images, &pixels);
            match rng.random_range(0..3) {
                0 => (description, content, false),
                1 => (format!("gzipped, {description}"), gzip(&content), true),
                _ => {
                    let (damage, bytes) = mutate_gzip(rng, &gzip(&images));
                    (damage, bytes, true)
                }
            }
        };
        fs::write(&path, &bytes).unwrap();
        let allowance = gzip_allowance(&bytes);
        let tally = if zipped { &mut gz } else { &mut raw };
        tally.check(
            format!("IDX images, {description}"),
            bytes.len(),
            allowance,
            &name,
            || read_idx(&path).map(drop).map_err(|e| e.to_string()),
        );

        // The same damage inside a split directory, to the images or the labels.
        let split_dir = dir.join("split");
        let _ = fs::remove_dir_all(&split_dir);
        fs::create_dir_all(&split_dir).unwrap();
        let suffix = if zipped { ".gz" } else { "" };
        let (damaged, description, damaged_bytes, good, good_bytes) = if i % 4 == 3 {
            let (description, content) = mutate_idx(rng, &labels, &[3, 1, 4, 1]);
            let content = if zipped { gzip(&content) } else { content };
            let good = ("train-images-idx3-ubyte", &images);
            (
                "train-labels-idx1-ubyte",
                description,
                content,
                good.0,
                good.1,
            )
        } else {
            let good = ("train-labels-idx1-ubyte", &labels);
            (
                "train-images-idx3-ubyte",
                description,
                bytes,
                good.0,
                good.1,
            )
        };
        fs::write(split_dir.join(format!("{damaged}{suffix}")), &damaged_bytes).unwrap();
        fs::write(split_dir.join(good), good_bytes).unwrap();
        split.check(
            format!("split with {damaged}{suffix}, {description}"),
            damaged_bytes.len() + good_bytes.len(),
            gzip_allowance(&damaged_bytes),
            &split_dir.display().to_string(),
            || {
                load_split(&split_dir, Split::Train)
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
        );
    }
    [raw, gz, split]
}

/// The text corpus through `load_text`: random bytes, invalid UTF-8,
/// truncation inside a character, empty, one character.
fn fuzz_text(rng: &mut StdRng, dir: &Path, count: usize) -> Tally {
    let base = "First Citizen:\nBefore we proceed any further, hear me speak.\n\
                Étoile, naïve café: 日本語 ☃ 𝄞\n"
        .repeat(20)
        .into_bytes();
    let path = dir.join("corpus.txt");
    let name = path.display().to_string();
    let mut tally = Tally::default();
    for _ in 0..count {
        let (description, bytes) = match rng.random_range(0..9) {
            0 => {
                let len = rng.random_range(0..4096);
                (format!("{len} random bytes"), random_bytes(rng, len))
            }
            1 => {
                let mut bytes = base.clone();
                let description = flip_bits(rng, &mut bytes, 0..base.len());
                (description, bytes)
            }
            2 => mutate_json_text(rng, &base),
            3 => {
                let keep = rng.random_range(0..base.len());
                (format!("truncated to {keep} bytes"), base[..keep].to_vec())
            }
            4 => ("empty".into(), Vec::new()),
            5 => {
                let one = pick(rng, &["a", "\n", "é", "\u{10FFFF}", "\0", "\u{FEFF}", "𝄞"]);
                (
                    format!("the one character {one:?}"),
                    one.as_bytes().to_vec(),
                )
            }
            6 => {
                let one = pick(rng, &["a", "é", "\0"]);
                let times = rng.random_range(1..5000);
                (
                    format!("{one:?} {times} times"),
                    one.repeat(times).into_bytes(),
                )
            }
            7 => {
                let lone: &[u8] = pick(
                    rng,
                    &[&[0xffu8][..], &[0xc3], &[0xe6, 0x97], &[0xf0, 0x9d, 0x84]],
                );
                (format!("the lone bytes {lone:02x?}"), lone.to_vec())
            }
            _ => mutate_bytes(rng, &base, 0..base.len()),
        };
        fs::write(&path, &bytes).unwrap();
        tally.check(
            format!("text, {description}"),
            bytes.len(),
            0,
            &name,
            || load_text(&path).map(drop).map_err(|e| e.to_string()),
        );
    }
    tally
}

/// The generator of one format's cases: the run's seed, varied per stream.
fn rng_for(stream: u64) -> StdRng {
    StdRng::seed_from_u64(seed() ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

#[test]
fn every_format_survives_random_mutation() {
    install_hooks();
    let started = Instant::now();
    let scratch = Scratch::new("formats");
    let runs = Runs::train(&scratch);
    let rows: Vec<(&str, Tally)> = std::thread::scope(|scope| {
        let (runs, scratch) = (&runs, &scratch);
        let jobs = vec![
            scope.spawn(move || {
                let dir = scratch.sub("module");
                vec![(
                    "safetensors: module files",
                    fuzz_module_checkpoints(&mut rng_for(1), &dir, cases(300)),
                )]
            }),
            scope.spawn(move || {
                let dir = scratch.sub("run");
                vec![(
                    "safetensors: training checkpoints",
                    fuzz_run_checkpoints(&mut rng_for(2), &dir, runs, cases(300)),
                )]
            }),
            scope.spawn(move || {
                let dir = scratch.sub("json");
                vec![(
                    "run state: checkpoint.json",
                    fuzz_run_states(&mut rng_for(3), &dir, runs, cases(250), false),
                )]
            }),
            scope.spawn(move || {
                let dir = scratch.sub("embedded");
                vec![(
                    "run state: embedded",
                    fuzz_run_states(&mut rng_for(4), &dir, runs, cases(250), true),
                )]
            }),
            scope.spawn(move || {
                let dir = scratch.sub("idx");
                let [raw, gz, split] = fuzz_idx(&mut rng_for(5), &dir, cases(300));
                vec![
                    ("IDX: raw", raw),
                    ("IDX: gzipped", gz),
                    ("IDX: load_split", split),
                ]
            }),
            scope.spawn(move || {
                let dir = scratch.sub("text");
                vec![("text corpus", fuzz_text(&mut rng_for(6), &dir, cases(300)))]
            }),
        ];
        jobs.into_iter()
            .flat_map(|job| job.join().unwrap())
            .collect()
    });

    println!("\nfuzz_formats, seed {}:", seed());
    println!(
        "{:<36} {:>6} {:>6} {:>6} {:>7} {:>9}",
        "format", "cases", "Ok", "Err", "panics", "failures"
    );
    for (format, tally) in &rows {
        println!(
            "{format:<36} {:>6} {:>6} {:>6} {:>7} {:>9}",
            tally.cases,
            tally.ok,
            tally.err,
            tally.panics,
            tally.failures.len()
        );
    }
    println!("in {:.1} s", started.elapsed().as_secs_f64());
    let failures: Vec<&String> = rows.iter().flat_map(|(_, t)| &t.failures).collect();
    assert!(
        failures.is_empty(),
        "{} broken properties (the first 40):\n{}",
        failures.len(),
        failures
            .iter()
            .take(40)
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A copy of a safetensors file with its header edited by `edit`.
fn edit_header(original: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let (mut header, data) = split_safetensors(original);
    edit(&mut header);
    join_safetensors(header.to_string().as_bytes(), &data)
}

/// A copy of a training checkpoint whose embedded run state is edited by `edit`.
fn edit_state(original: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    edit_header(original, |header| {
        let text = header["__metadata__"]["kiln.run_state"].as_str().unwrap();
        let mut state: Value = serde_json::from_str(text).unwrap();
        edit(&mut state);
        header["__metadata__"]["kiln.run_state"] = json!(state.to_string());
    })
}

#[test]
fn kiln_sample_reports_a_damaged_checkpoint_on_one_error_line() {
    let scratch = Scratch::new("binary");
    let data = scratch.sub("data");
    write_training_data(&data);
    let trained = scratch.0.join("trained");
    let original = train("vae", &data, &trained);
    let state = fs::read(trained.join("checkpoint.json")).unwrap();
    let with_length = |length: u64| {
        let mut bytes = original.clone();
        bytes[..8].copy_from_slice(&length.to_le_bytes());
        bytes
    };
    let mut json_with_weights: Value = serde_json::from_slice(&state).unwrap();
    json_with_weights["weights"] = json!("/dev/zero");
    // (what, weights, checkpoint.json, load through the .json file)
    let mut mutants: Vec<(String, Vec<u8>, Vec<u8>, bool)> = vec![
        (
            "truncated to half".into(),
            original[..original.len() / 2].to_vec(),
            state.clone(),
            false,
        ),
        (
            "header length 2^62".into(),
            with_length(1 << 62),
            state.clone(),
            false,
        ),
        (
            "header length 0".into(),
            with_length(0),
            state.clone(),
            false,
        ),
        (
            "fc1 weight as I8".into(),
            edit_header(&original, |h| h["model.fc1.weight"]["dtype"] = json!("I8")),
            state.clone(),
            false,
        ),
        (
            "fc1 weight's offsets beyond the file".into(),
            edit_header(&original, |h| {
                h["model.fc1.weight"]["data_offsets"] = json!([0, 1u64 << 40])
            }),
            state.clone(),
            false,
        ),
        (
            "hidden 10^12".into(),
            edit_state(&original, |s| {
                s["config"]["hidden"] = json!(1_000_000_000_000u64)
            }),
            state.clone(),
            false,
        ),
        (
            "image_size 2^33".into(),
            edit_state(&original, |s| s["config"]["image_size"] = json!(1u64 << 33)),
            state.clone(),
            false,
        ),
        (
            "a gpt run state".into(),
            edit_state(&original, |s| s["model"] = json!("gpt")),
            state.clone(),
            false,
        ),
        (
            "no config".into(),
            edit_state(&original, |s| {
                drop(s.as_object_mut().unwrap().remove("config"))
            }),
            state.clone(),
            false,
        ),
        (
            "checkpoint.json naming /dev/zero".into(),
            original.clone(),
            json_with_weights.to_string().into_bytes(),
            true,
        ),
    ];
    let mut rng = rng_for(7);
    for _ in 0..6 {
        let (description, bytes) = mutate_safetensors_header(&mut rng, &original);
        mutants.push((description, bytes, state.clone(), false));
    }
    for (i, (what, weights, json, through_json)) in mutants.iter().enumerate() {
        let run = scratch.sub(&format!("mutant-{i}"));
        fs::write(run.join("checkpoint.safetensors"), weights).unwrap();
        fs::write(run.join("checkpoint.json"), json).unwrap();
        let checkpoint = if *through_json {
            run.join("checkpoint.json")
        } else {
            run.join("checkpoint.safetensors")
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["sample", "vae", "--n", "1", "--checkpoint"])
            .arg(&checkpoint)
            .arg("--out")
            .arg(run.join("samples.png"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("kiln sample vae hangs on a checkpoint with {what}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        match output.status.code() {
            Some(0) => {}
            Some(1) => {
                let line = stderr.trim_end();
                assert!(
                    line.starts_with("error: ") && !line.contains('\n'),
                    "{what}: expected one `error: ...` line, got:\n{stderr}"
                );
                assert!(
                    line.contains(&run.display().to_string()),
                    "{what}: the error does not name the checkpoint: {line}"
                );
            }
            other => panic!("{what}: kiln sample vae exited with {other:?}:\n{stderr}"),
        }
    }
}

/// A device that never ends and a pipe nobody writes to: a loader must
/// refuse them without reading (or it reads forever, or blocks on open).
#[test]
fn special_files_are_refused_without_reading_them() {
    use std::os::unix::ffi::OsStrExt;
    install_hooks();
    let scratch = Scratch::new("special");
    let fifo = scratch.0.join("pipe");
    let name = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    let run = scratch.sub("run");
    let mut tally = Tally::default();
    for special in [Path::new("/dev/zero"), fifo.as_path()] {
        let shown = special.display().to_string();
        let target = run.join("checkpoint.safetensors");
        let _ = fs::remove_file(&target);
        std::os::unix::fs::symlink(special, &target).unwrap();
        tally.check(format!("checkpoint::load {shown}"), 0, 0, &shown, || {
            checkpoint::load(special)
                .map(drop)
                .map_err(|e| e.to_string())
        });
        tally.check(
            format!("load_checkpoint of a run whose weights link to {shown}"),
            0,
            0,
            &run.display().to_string(),
            || load_run(&run),
        );
        tally.check(format!("read_idx {shown}"), 0, 0, &shown, || {
            read_idx(special).map(drop).map_err(|e| e.to_string())
        });
        tally.check(format!("load_text {shown}"), 0, 0, &shown, || {
            load_text(special).map(drop).map_err(|e| e.to_string())
        });
    }
    assert_eq!(tally.err, tally.cases, "every special file is an error");
    assert!(tally.failures.is_empty(), "{}", tally.failures.join("\n"));
}
