//! Compiling a kernel file for the host: the unmodified CUDA C of kernels/
//! (or a registered file), the prelude that maps CUDA C onto C++, and a
//! generated table of the file's kernels, built into a shared library by
//! the host C++ compiler and loaded with dlopen.
//!
//! Why at run time rather than in build.rs: it mirrors NVRTC (a kernel file
//! is compiled the first time something launches from it, then cached on
//! disk by a hash of everything that went in), so a crate build never needs
//! a C++ compiler, files registered at run time — the emulator's own fault
//! tests — go through exactly the same path, and an edited kernel is picked
//! up without rebuilding kiln.

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_void};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::cuda::compile::{cache_dir, fnv1a64};
use crate::cuda::source::kernel_decls;
use crate::kernels;

use super::scheduler::{ThreadState, runtime_fault, runtime_syncthreads, runtime_warp_op};

/// The header every host-compiled kernel file is built with.
const PRELUDE: &str = include_str!("prelude.h");

/// The host compiler's flags. -O2 because the parity suite runs every
/// kernel; -g1 so a faulting instruction maps to its source line; no fast
/// math and no FMA contraction, to stay close to the CPU reference;
/// alignment and array-bounds sanitizers, and thread-sanitizer
/// instrumentation of every load and store for racecheck (the prelude
/// supplies all their hooks).
const FLAGS: &[&str] = &[
    "-std=c++17",
    "-O2",
    "-g1",
    "-fPIC",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",
    "-fno-fast-math",
    "-ffp-contract=off",
    "-fsanitize=alignment,bounds,thread",
    "-Wno-unknown-pragmas",
];

/// GCC puts a static local of an inline function (a `__shared__` array in a
/// `__device__` helper) in a COMDAT group, which cannot share the prelude's
/// shared-memory section with other statics; one module is one translation
/// unit, so weak definitions are not needed. Clang has no such conflict.
/// Function entry/exit hooks only serve TSan's own stack traces.
const GCC_FLAGS: &[&str] = &["-fno-weak", "--param=tsan-instrument-func-entry-exit=0"];

fn compile_flags(version: &str) -> Vec<&'static str> {
    let mut flags = FLAGS.to_vec();
    if !version.contains("clang") {
        flags.extend_from_slice(GCC_FLAGS);
    }
    flags
}

/// One kernel's entry in the generated table (mirrors kiln_emu::KernelInfo).
#[repr(C)]
struct RawKernelInfo {
    name: *const c_char,
    param_size: usize,
    max_threads_per_block: u32,
    static_shared_bytes: usize,
    invoke: unsafe extern "C" fn(*const c_void),
}

/// What `kiln_emu_module_info` returns (mirrors kiln_emu_module).
#[repr(C)]
struct RawModuleInfo {
    kernels: *const RawKernelInfo,
    kernel_count: usize,
    state: *mut ThreadState,
    runtime: *mut RawRuntime,
    shared_begin: *mut u8,
    shared_end: *mut u8,
}

/// The callbacks the prelude calls (mirrors kiln_emu_runtime).
#[repr(C)]
struct RawRuntime {
    syncthreads: extern "C" fn(*const c_char, i32),
    warp_op: extern "C" fn(i32, u32, u64, i32, i32, *const c_char, i32) -> u64,
    fault: extern "C" fn(*const c_char),
}

/// A kernel of a loaded module.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostKernel {
    pub param_size: usize,
    pub max_threads_per_block: u32,
    pub static_shared_bytes: usize,
    pub invoke: unsafe extern "C" fn(*const c_void),
}

/// A kernel file compiled for the host and loaded.
pub(crate) struct HostModule {
    pub kernels: HashMap<String, HostKernel>,
    pub state: *mut ThreadState,
    /// The module's static shared memory (all its kernels' `__shared__`).
    pub shared: (*mut u8, usize),
    pub library_path: PathBuf,
    _library: libloading::Library,
}

// SAFETY: the raw pointers refer into the loaded library, which lives as
// long as the module; launches that use them are serialised.
unsafe impl Send for HostModule {}
unsafe impl Sync for HostModule {}

/// The first line `cxx --version` prints, or None if it does not run.
fn version_of(cxx: &str) -> Option<String> {
    let output = Command::new(cxx).arg("--version").output().ok()?;
    output.status.success().then(|| {
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    })
}

/// The C++ compiler and its `--version` line, found once: $KILN_CXX, else
/// $CXX, else the first of c++, g++, clang++ on the PATH that runs.
fn compiler_identity() -> Result<&'static (String, String), String> {
    static IDENTITY: OnceLock<Result<(String, String), String>> = OnceLock::new();
    IDENTITY
        .get_or_init(|| {
            let chosen = ["KILN_CXX", "CXX"]
                .iter()
                .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()));
            if let Some(cxx) = chosen {
                return match version_of(&cxx) {
                    Some(version) => Ok((cxx, version)),
                    None => Err(format!(
                        "the CUDA emulator compiles kernels/ with the host C++ compiler, but `{cxx} --version` \
                         did not run: install g++ or point KILN_CXX at a C++17 compiler"
                    )),
                };
            }
            ["c++", "g++", "clang++"]
                .iter()
                .find_map(|cxx| Some((cxx.to_string(), version_of(cxx)?)))
                .ok_or_else(|| {
                    "the CUDA emulator compiles kernels/ with the host C++ compiler, but none was found: \
                     install one (for example `apt-get install g++`) or set KILN_CXX"
                        .into()
                })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The generated C++ file for kernel file `file` of text `source`: the
/// prelude, the kernel file, and its kernel table.
fn generated_source(file: &str, source: &str) -> Result<String, String> {
    let mut table = String::new();
    for kernel in kernel_decls(source) {
        if kernel.dynamic_shared {
            return Err(format!(
                "kernels/{file}: kernel {} uses extern __shared__ (dynamic shared memory), which the emulator \
                 does not support yet",
                kernel.name
            ));
        }
        let bounds = kernel.launch_bounds.unwrap_or_else(|| "1024".into());
        let shared: String = kernel
            .shared_types
            .iter()
            .map(|t| format!(" + sizeof({t})"))
            .collect();
        table.push_str(&format!(
            "    KILN_EMU_KERNEL({}, ({bounds}), 0{shared})\n",
            kernel.name
        ));
    }
    Ok(format!(
        "// Generated by kiln's CUDA emulator from kernels/{file}.\n\
         #include \"prelude.h\"\n\
         #include \"kernels/{file}\"\n\
         KILN_EMU_DEFINE_MODULE(\n{table})\n"
    ))
}

/// `$KILN_CACHE_DIR/emulator`, else `emulator` beside the PTX cache
/// (`~/.cache/kiln/emulator`).
fn emulator_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KILN_CACHE_DIR") {
        return Some(PathBuf::from(dir).join("emulator"));
    }
    Some(cache_dir()?.parent()?.join("emulator"))
}

/// Compiles (or finds in the cache) and loads `file`.
pub(crate) fn load(file: &str) -> Result<HostModule, String> {
    let source = kernels::source(file)
        .ok_or_else(|| format!("no kernel file kernels/{file} in this build"))?;
    let generated = generated_source(file, source)?;
    let (cxx, version) = compiler_identity()?;
    let headers: Vec<(&str, &str)> = kernels::KERNEL_SOURCES
        .iter()
        .filter(|(name, _)| name.ends_with(".cuh"))
        .copied()
        .collect();
    let flags = compile_flags(version);
    let mut key = format!("{PRELUDE}\0{generated}\0{source}\0{flags:?}\0{cxx}\0{version}");
    for (name, text) in &headers {
        key.push_str(&format!("\0{name}\0{text}"));
    }
    let digest = fnv1a64(key.as_bytes());
    let root = emulator_cache_dir().ok_or(
        "no cache directory: set KILN_CACHE_DIR (or HOME) for the emulator's compiled kernels",
    )?;
    let stem = file.trim_end_matches(".cu");
    let dir = root.join(format!("{stem}-{digest:016x}"));
    let library_path = dir.join(format!("{stem}.so"));
    if !library_path.exists() {
        let inputs = BuildInputs {
            file,
            source,
            generated: &generated,
            headers: &headers,
            cxx,
            flags: &flags,
        };
        build(&root, &dir, &inputs)?;
    }
    open(&library_path, file)
}

/// Writes the sources into a fresh folder, compiles, and moves the folder
/// into place in one rename (so a half-built library is never seen).
/// Everything one module is built from.
struct BuildInputs<'a> {
    file: &'a str,
    source: &'a str,
    generated: &'a str,
    headers: &'a [(&'a str, &'a str)],
    cxx: &'a str,
    flags: &'a [&'static str],
}

fn build(root: &Path, dir: &Path, inputs: &BuildInputs) -> Result<(), String> {
    let BuildInputs {
        file,
        source,
        generated,
        headers,
        cxx,
        flags,
    } = *inputs;
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let work = root.join(format!("tmp-{}-{n}", std::process::id()));
    let io =
        |what: &str, e: std::io::Error| format!("emulator cache {}: {what}: {e}", work.display());
    std::fs::create_dir_all(work.join("kernels")).map_err(|e| io("create", e))?;
    std::fs::write(work.join("prelude.h"), PRELUDE).map_err(|e| io("write prelude.h", e))?;
    for &(name, text) in headers {
        std::fs::write(work.join("kernels").join(name), text).map_err(|e| io("write header", e))?;
    }
    std::fs::write(work.join("kernels").join(file), source).map_err(|e| io("write source", e))?;
    std::fs::write(work.join("module.cpp"), generated).map_err(|e| io("write module.cpp", e))?;
    let stem = file.trim_end_matches(".cu");
    // Two steps: compiling with -fsanitize would otherwise link the UBSan
    // runtime, whose hooks the prelude replaces.
    let library = format!("{stem}.so");
    let steps: [(&str, Vec<&str>); 2] = [
        (
            "compile",
            [flags, &["-c", "module.cpp", "-o", "module.o"]].concat(),
        ),
        ("link", vec!["-shared", "module.o", "-o", &library]),
    ];
    for (step, args) in steps {
        let output = Command::new(cxx)
            .args(&args)
            .current_dir(&work)
            .output()
            .map_err(|e| format!("running the C++ compiler {cxx} to {step}: {e}"))?;
        if !output.status.success() {
            let _ = std::fs::remove_dir_all(&work);
            return Err(format!(
                "kernels/{file} failed to {step} for the emulator ({cxx}):\n{}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    if std::fs::rename(&work, dir).is_err() {
        // Another process finished the same build first; theirs is identical.
        let _ = std::fs::remove_dir_all(&work);
        if !dir.join(format!("{stem}.so")).exists() {
            return Err(format!(
                "emulator cache: could not move the build into {}",
                dir.display()
            ));
        }
    }
    Ok(())
}

fn open(library_path: &Path, file: &str) -> Result<HostModule, String> {
    // SAFETY: the library is kiln's own generated module; its initialisers
    // are the C++ runtime's and do nothing else.
    let library = unsafe { libloading::Library::new(library_path) }.map_err(|e| {
        format!(
            "loading the emulator module {}: {e}",
            library_path.display()
        )
    })?;
    // SAFETY: the symbol is defined by KILN_EMU_DEFINE_MODULE with this signature.
    let info = unsafe {
        let module_info = library
            .get::<unsafe extern "C" fn() -> RawModuleInfo>(b"kiln_emu_module_info\0")
            .map_err(|e| format!("kernels/{file}: the emulator module has no kernel table: {e}"))?;
        module_info()
    };
    // SAFETY: the runtime table is a plain struct of function pointers in the module.
    unsafe {
        info.runtime.write(RawRuntime {
            syncthreads: runtime_syncthreads,
            warp_op: runtime_warp_op,
            fault: runtime_fault,
        });
    }
    let mut kernels = HashMap::new();
    for i in 0..info.kernel_count {
        // SAFETY: `kernels` points at `kernel_count` entries with C-string names.
        let raw = unsafe { &*info.kernels.add(i) };
        let name = unsafe { CStr::from_ptr(raw.name) }
            .to_string_lossy()
            .into_owned();
        kernels.insert(
            name,
            HostKernel {
                param_size: raw.param_size,
                max_threads_per_block: raw.max_threads_per_block,
                static_shared_bytes: raw.static_shared_bytes,
                invoke: raw.invoke,
            },
        );
    }
    let shared_len = if info.shared_begin.is_null() {
        0
    } else {
        info.shared_end as usize - info.shared_begin as usize
    };
    Ok(HostModule {
        kernels,
        state: info.state,
        shared: (info.shared_begin, shared_len),
        library_path: library_path.to_path_buf(),
        _library: library,
    })
}
