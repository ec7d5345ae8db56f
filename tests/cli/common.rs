//! The scratch data, the runner of the kiln binary and the readers of run
//! directories that every CLI test uses.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln::checkpoint;

/// A fresh scratch directory holding `data/fashion-mnist/` (40 train and
/// 12 test images) and `data/shakespeare.txt`; removed on drop.
pub struct Scratch {
    root: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "kiln-cli-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        let images = root.join("data/fashion-mnist");
        fs::create_dir_all(&images).unwrap();
        write_images(&images.join("train-images-idx3-ubyte"), 40, 1);
        write_labels(&images.join("train-labels-idx1-ubyte"), 40);
        write_images(&images.join("t10k-images-idx3-ubyte"), 12, 2);
        write_labels(&images.join("t10k-labels-idx1-ubyte"), 12);
        let line = "To be, or not to be, that is the question: whether 'tis nobler in the mind.\n";
        fs::write(root.join("data/shakespeare.txt"), line.repeat(20)).unwrap();
        Scratch { root }
    }

    pub fn root_path(&self) -> &Path {
        &self.root
    }

    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// An unsigned-byte IDX file: magic 0 0 8 rank, big-endian dims, data.
pub fn write_idx(path: &Path, dims: &[u32], data: &[u8]) {
    let mut bytes = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    fs::write(path, bytes).unwrap();
}

/// `count` 28×28 images of a bright square at a varying place.
pub fn write_images(path: &Path, count: usize, salt: usize) {
    let mut data = vec![0u8; count * 28 * 28];
    for (i, image) in data.chunks_mut(28 * 28).enumerate() {
        let offset = (i * 7 + salt) % 14;
        for r in offset..offset + 10 {
            for c in offset..offset + 12 {
                image[r * 28 + c] = (40 + (i * 13 + r * 5 + c) % 200) as u8;
            }
        }
    }
    write_idx(path, &[count as u32, 28, 28], &data);
}

pub fn write_labels(path: &Path, count: usize) {
    let labels: Vec<u8> = (0..count).map(|i| (i % 10) as u8).collect();
    write_idx(path, &[count as u32], &labels);
}

/// Runs the kiln binary with `args`.
pub fn kiln(args: &[&str]) -> Output {
    kiln_with_env(args, &[])
}

/// Runs the kiln binary with `args` and extra environment variables.
pub fn kiln_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("the kiln binary runs")
}

/// Runs kiln and requires success; returns stdout.
pub fn kiln_ok(args: &[&str]) -> String {
    let output = kiln(args);
    assert!(
        output.status.success(),
        "kiln {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs kiln and requires exit code 1 with one `error: ...` line that
/// contains every one of `expected`; returns that line.
pub fn kiln_fails(args: &[&str], expected: &[&str]) -> String {
    let output = kiln(args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(1),
        "kiln {args:?} should fail with code 1; stderr:\n{stderr}"
    );
    let line = stderr.trim_end();
    assert!(
        line.starts_with("error: ") && !line.contains('\n'),
        "expected one `error: ...` line, got:\n{stderr}"
    );
    for text in expected {
        assert!(line.contains(text), "`{text}` missing from: {line}");
    }
    line.to_string()
}

/// Tiny model and run sizes per model, to keep every run under a second.
pub fn tiny(model: &str) -> Vec<&'static str> {
    match model {
        "gan" => vec![
            "--nz",
            "8",
            "--ngf",
            "4",
            "--ndf",
            "4",
            "--batch-size",
            "2",
            "--limit",
            "12",
        ],
        "vae" => vec![
            "--hidden",
            "16",
            "--latent",
            "4",
            "--batch-size",
            "5",
            "--limit",
            "12",
        ],
        "gpt" => vec![
            "--n-layer",
            "1",
            "--n-head",
            "2",
            "--n-embd",
            "16",
            "--block-size",
            "8",
            "--batch-size",
            "4",
            "--warmup",
            "2",
        ],
        _ => unreachable!(),
    }
}

/// `kiln train MODEL` into `out` with tiny sizes plus `extra` flags.
pub fn train(scratch: &Scratch, model: &str, out: &str, extra: &[&str]) -> String {
    let output = train_with_env(scratch, model, out, extra, &[]);
    assert!(
        output.status.success(),
        "kiln train {model} {extra:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `kiln train MODEL` as `train`, with extra environment variables; the
/// output whatever the exit code.
pub fn train_with_env(
    scratch: &Scratch,
    model: &str,
    out: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let data = scratch.data().display().to_string();
    let out = scratch.arg(out);
    let mut args = vec!["train", model, "--data", &data, "--out", &out];
    args.extend(tiny(model));
    args.extend_from_slice(extra);
    kiln_with_env(&args, env)
}

/// `kiln train MODEL` (tiny, as `train`) that must fail with one error line
/// containing every `expected` text.
pub fn train_fails(scratch: &Scratch, model: &str, out: &str, extra: &[&str], expected: &[&str]) {
    let data = scratch.data().display().to_string();
    let out = scratch.arg(out);
    let mut args = vec!["train", model, "--data", &data, "--out", &out];
    args.extend_from_slice(extra);
    kiln_fails(&args, expected);
}

/// Every file of a directory with its bytes.
pub fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The checkpoint's tensors as raw values (f32/f64 bits or u32), by name.
pub fn checkpoint_values(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<u64>)> {
    let loaded = checkpoint::load(dir.join("checkpoint.safetensors")).unwrap();
    loaded
        .tensors
        .into_iter()
        .map(|(name, t)| {
            let values = match t.dtype() {
                kiln::DType::U32 => t.to_indices().unwrap().into_iter().map(u64::from).collect(),
                kiln::DType::F64 => t
                    .to_vec::<f64>()
                    .unwrap()
                    .into_iter()
                    .map(f64::to_bits)
                    .collect(),
                _ => t
                    .to_vec::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(|v| u64::from(v.to_bits()))
                    .collect(),
            };
            (name, (t.dims().to_vec(), values))
        })
        .collect()
}

/// metrics.csv without its timing column (the only one that may differ).
pub fn metrics_without_timing(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|line| line.rsplit_once(',').unwrap().0.to_string())
        .collect()
}

pub fn state(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(dir.join("checkpoint.json")).unwrap()).unwrap()
}
