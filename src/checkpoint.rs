//! Checkpoints in the safetensors format (what `safetensors.torch.save_file`
//! writes), so kiln and PyTorch read each other's state dicts.
//!
//! Saving is atomic: the file is written to a temporary name in the target's
//! directory, flushed to disk and renamed over the target, so a crash or an
//! error mid-save leaves the previous checkpoint intact and no partial file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::nn::Module;
use crate::storage::CpuStorage;
use crate::tensor::{Device, Tensor};

/// The contents of a checkpoint file.
pub struct Checkpoint {
    pub tensors: HashMap<String, Tensor>,
    /// Free-form string metadata (step, hyper-parameters, vocabulary...).
    pub metadata: BTreeMap<String, String>,
}

fn checkpoint_error(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// A tensor's values as little-endian bytes with their safetensors dtype.
fn to_le_bytes(name: &str, tensor: &Tensor) -> std::result::Result<(Dtype, Vec<u8>), String> {
    let on_cpu = tensor
        .to_device(Device::Cpu)
        .map_err(|e| format!("cannot copy tensor {name} to the CPU: {e}"))?;
    Ok(on_cpu.with_cpu(|s| {
        let dtype = match s {
            CpuStorage::F32(_) => Dtype::F32,
            CpuStorage::F64(_) => Dtype::F64,
            CpuStorage::F16(_) => Dtype::F16,
            CpuStorage::BF16(_) => Dtype::BF16,
            CpuStorage::U32(_) => Dtype::U32,
        };
        (dtype, s.as_bytes().to_vec())
    }))
}

/// Writes `tensors` and `metadata` to `path` as safetensors, atomically.
/// Every tensor keeps its dtype (f32, f64, f16, bf16, u32).
pub fn save(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let mut names = HashSet::new();
    let mut encoded = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if !names.insert(name.as_str()) {
            return Err(checkpoint_error(
                path,
                format!("tensor name {name} appears twice; give every tensor its own name"),
            ));
        }
        let (dtype, bytes) = to_le_bytes(name, tensor).map_err(|m| checkpoint_error(path, m))?;
        encoded.push((name.as_str(), dtype, tensor.dims().to_vec(), bytes));
    }
    let mut views = Vec::with_capacity(encoded.len());
    for (name, dtype, shape, bytes) in &encoded {
        let view = TensorView::new(*dtype, shape.clone(), bytes)
            .map_err(|e| checkpoint_error(path, format!("tensor {name}: {e}")))?;
        views.push((*name, view));
    }
    let info: HashMap<String, String> = metadata.clone().into_iter().collect();
    let bytes = safetensors::serialize(views, Some(info))
        .map_err(|e| checkpoint_error(path, format!("cannot encode the checkpoint: {e}")))?;
    write_atomically(path, &bytes)
}

/// Write to a temporary file, fsync, rename over `path`; on failure remove
/// the temporary file and leave `path` as it was.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.file_name().is_none() {
        return Err(checkpoint_error(path, "the path names no file"));
    }
    let directory = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !directory.is_dir() {
        return Err(checkpoint_error(
            path,
            format!(
                "directory {} does not exist; create it before saving",
                directory.display()
            ),
        ));
    }
    crate::atomic_file::write_file_atomically(path, bytes).map_err(|e| {
        checkpoint_error(
            path,
            format!("cannot write the checkpoint ({e}); the previous file, if any, is unchanged"),
        )
    })
}

/// Reads a safetensors file. F32, F64, F16 and BF16 keep their dtype, U32 and I64 → u32 (an
/// error if an I64 value does not fit); other dtypes are an error naming the
/// tensor.
pub fn load(path: impl AsRef<Path>) -> Result<Checkpoint> {
    let path = path.as_ref();
    let bytes = crate::atomic_file::read_regular_file(path).map_err(|e| {
        let msg = if e.kind() == std::io::ErrorKind::NotFound {
            "file not found; check the path, or train first to create it".to_string()
        } else {
            format!("cannot read the file: {e}")
        };
        checkpoint_error(path, msg)
    })?;
    let corrupt = |e: safetensors::SafeTensorError| {
        checkpoint_error(
            path,
            format!(
                "not a valid safetensors file ({e}); it may be truncated or corrupt: save it again from a good copy"
            ),
        )
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(corrupt)?;
    let file = SafeTensors::deserialize(&bytes).map_err(corrupt)?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut tensors = HashMap::new();
    for (name, view) in file.iter() {
        let tensor = tensor_from_view(name, &view).map_err(|m| checkpoint_error(path, m))?;
        tensors.insert(name.to_string(), tensor);
    }
    Ok(Checkpoint { tensors, metadata })
}

fn tensor_from_view(name: &str, view: &TensorView) -> std::result::Result<Tensor, String> {
    let shape = view.shape().to_vec();
    let data = view.data();
    // The file's bytes are little-endian, as every target kiln builds for;
    // bytemuck copies them out (the data need not be aligned in the file).
    let storage = match view.dtype() {
        Dtype::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(data)),
        Dtype::F64 => CpuStorage::F64(bytemuck::pod_collect_to_vec(data)),
        Dtype::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec(data)),
        Dtype::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec(data)),
        Dtype::U32 => CpuStorage::U32(bytemuck::pod_collect_to_vec(data)),
        // PyTorch stores indices and counters as int64; kiln's are u32.
        Dtype::I64 => {
            let mut values = Vec::with_capacity(data.len() / 8);
            for b in data.chunks_exact(8) {
                let v = i64::from_le_bytes(b.try_into().expect("8 bytes"));
                let fits = u32::try_from(v).map_err(|_| {
                    format!("tensor {name}: int64 value {v} does not fit kiln's u32 index type")
                })?;
                values.push(fits);
            }
            CpuStorage::U32(values)
        }
        other => {
            return Err(format!(
                "tensor {name} has dtype {other:?}, which kiln cannot load (supported: F32, F64, F16, BF16, U32, I64); convert it to float32 first"
            ));
        }
    };
    Tensor::from_cpu_storage(storage, shape).map_err(|e| format!("tensor {name}: {e}"))
}

/// Saves `module.state_dict()` with `metadata`.
pub fn save_module<M: Module + ?Sized>(
    path: impl AsRef<Path>,
    module: &M,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    save(path, &module.state_dict(), metadata)
}

/// What [`load_module_with`] accepts.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Load tensors holding NaN or ±Inf. Off by default: such weights come
    /// from a diverged run or a damaged file, and would train or sample on
    /// silently.
    pub allow_non_finite: bool,
}

/// Loads a checkpoint into `module` (see `Module::load_state_dict`: all or
/// nothing) and returns the file's metadata. A tensor holding NaN or ±Inf
/// is an error naming it (see [`load_module_with`] to allow them).
pub fn load_module<M: Module + ?Sized>(
    path: impl AsRef<Path>,
    module: &M,
) -> Result<BTreeMap<String, String>> {
    load_module_with(path, module, LoadOptions::default())
}

/// [`load_module`] with `options`.
pub fn load_module_with<M: Module + ?Sized>(
    path: impl AsRef<Path>,
    module: &M,
    options: LoadOptions,
) -> Result<BTreeMap<String, String>> {
    let path = path.as_ref();
    let checkpoint = load(path)?;
    if !options.allow_non_finite {
        check_finite(path, &checkpoint.tensors)?;
    }
    module
        .load_state_dict(&checkpoint.tensors)
        .map_err(|e| checkpoint_error(path, e.to_string()))?;
    Ok(checkpoint.metadata)
}

/// An error naming the first tensor (in name order) of a file at `path`
/// that holds NaN or ±Inf: how many such values, and the first one.
pub fn check_finite(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let tensor = &tensors[name];
        if !tensor.dtype().is_float() {
            continue;
        }
        let values = tensor.to_f64_vec();
        let mut bad = values.iter().enumerate().filter(|(_, v)| !v.is_finite());
        if let Some((index, value)) = bad.next() {
            let count = 1 + bad.count();
            return Err(checkpoint_error(
                path,
                format!(
                    "tensor {name} {} holds {count} non-finite value(s), the first {value} at flat index {index}; \
                     the run that wrote it diverged or the file is damaged: use an earlier checkpoint, \
                     or allow non-finite weights explicitly (kiln: --allow-non-finite) to load it anyway",
                    tensor.shape()
                ),
            ));
        }
    }
    Ok(())
}
