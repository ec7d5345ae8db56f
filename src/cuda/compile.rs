//! NVRTC compilation of the kernel files in kernels/, with an in-memory and
//! an on-disk cache. Works without a GPU (only NVRTC's library is needed), so
//! CI proves every kernel file compiles for sm_80 and sm_90.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use crate::error::{Error, Result};
use crate::kernels;

const OP: &str = "nvrtc";

/// NVRTC options every kernel is compiled with: IEEE-exact division and
/// square root, so results stay comparable with the CPU reference.
fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--fmad=true".into(),
    ]
}

/// True if NVRTC's shared library can be loaded (it is looked up on the
/// library path as `libnvrtc.so.<major>`).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library; no symbol is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's own version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; nvrtcVersion writes two ints.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Cuda {
            op: OP,
            msg: format!("nvrtcVersion failed: {status:?}"),
        });
    }
    Ok((major, minor))
}

fn require_nvrtc() -> Result<()> {
    if nvrtc_available() {
        Ok(())
    } else {
        Err(Error::Cuda {
            op: OP,
            msg: "NVRTC library (libnvrtc.so) not found: install the CUDA toolkit or \
                  `pip install nvidia-cuda-nvrtc` and add its lib directory to LD_LIBRARY_PATH"
                .into(),
        })
    }
}

/// The source of `kernels/<file>` with `#include "x.cuh"` lines replaced by
/// the embedded header, so NVRTC needs no include directory.
pub fn expanded_source(file: &str) -> Result<String> {
    let source = kernels::source(file).ok_or_else(|| Error::Cuda {
        op: OP,
        msg: format!("no kernel file kernels/{file} in this build"),
    })?;
    let mut out = String::with_capacity(source.len() * 2);
    for line in source.lines() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("#include") {
            let name = rest
                .trim()
                .trim_matches(|c| c == '"' || c == '<' || c == '>');
            let header = kernels::source(name).ok_or_else(|| Error::Cuda {
                op: OP,
                msg: format!("kernels/{file}: included header {name} is not in kernels/"),
            })?;
            out.push_str(&format!(
                "// ---- begin {name}\n{header}\n// ---- end {name}\n"
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// Compiles CUDA C `source` (named `file` in messages) to PTX for `arch`
/// (e.g. "sm_90"). A failure names the file and carries NVRTC's log.
pub fn compile_source(file: &str, source: &str, arch: &str) -> Result<String> {
    require_nvrtc()?;
    let compile_options = CompileOptions {
        options: options(arch),
        name: Some(file.to_string()),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(source, compile_options) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { log, .. }) => Err(Error::Cuda {
            op: OP,
            msg: format!(
                "kernels/{file} failed to compile for {arch}:\n{}",
                log.to_string_lossy()
            ),
        }),
        Err(other) => Err(Error::Cuda {
            op: OP,
            msg: format!("kernels/{file}: NVRTC error for {arch}: {other:?}"),
        }),
    }
}

/// PTX of `kernels/<file>` for `arch`: from memory, else from the disk cache
/// (`$KILN_CACHE_DIR`, default `~/.cache/kiln/ptx`), else compiled and stored
/// there. The key hashes source, options, arch and NVRTC's version, so an
/// edited kernel or a new NVRTC never reuses stale PTX.
pub fn ptx_for(file: &str, arch: &str) -> Result<Ptx> {
    static MEMORY: OnceLock<Mutex<HashMap<(String, String), String>>> = OnceLock::new();
    let memory = MEMORY.get_or_init(Default::default);
    let key = (file.to_string(), arch.to_string());
    if let Some(ptx) = memory.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(Ptx::from_src(ptx.clone()));
    }
    let source = expanded_source(file)?;
    let version = nvrtc_version()?;
    let digest = fnv1a64(format!("{source}\0{:?}\0{arch}\0{version:?}", options(arch)).as_bytes());
    let cached_path = cache_dir().map(|d| {
        d.join(format!(
            "{}-{arch}-{digest:016x}.ptx",
            file.trim_end_matches(".cu")
        ))
    });
    let ptx = match cached_path
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
    {
        Some(ptx) => ptx,
        None => {
            let ptx = compile_source(file, &source, arch)?;
            if let Some(path) = &cached_path {
                // A cache that cannot be written only costs a recompile next run.
                if let Some(dir) = path.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                let _ = crate::atomic_file::write_file_atomically(path, ptx.as_bytes());
            }
            ptx
        }
    };
    memory
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, ptx.clone());
    Ok(Ptx::from_src(ptx))
}

pub(crate) fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KILN_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("kiln").join("ptx"))
}

/// FNV-1a: a tiny, stable hash (the standard library's hasher may change
/// between Rust versions, which would silently invalidate the cache).
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}
