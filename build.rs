//! Embeds every CUDA source in kernels/ into the binary as a string, so the
//! CUDA backend can hand it to NVRTC at run time. Needs no CUDA installed.

use std::env;
use std::fs;
use std::path::Path;

fn main() {
    let kernel_dir = Path::new("kernels");
    println!("cargo:rerun-if-changed=kernels");
    let mut sources: Vec<(String, String)> = Vec::new();
    if let Ok(entries) = fs::read_dir(kernel_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let is_cuda = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("cu" | "cuh")
            );
            if !is_cuda {
                continue;
            }
            println!("cargo:rerun-if-changed={}", path.display());
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let absolute = fs::canonicalize(&path).expect("kernel path resolves");
            sources.push((name, absolute.display().to_string()));
        }
    }
    sources.sort();
    let mut generated = String::from(
        "/// (file name, CUDA C source) of every file in kernels/, sorted by name.\n\
         pub const KERNEL_SOURCES: &[(&str, &str)] = &[\n",
    );
    for (name, path) in &sources {
        generated.push_str(&format!("    ({name:?}, include_str!({path:?})),\n"));
    }
    generated.push_str("];\n");
    let out = Path::new(&env::var("OUT_DIR").unwrap()).join("kernel_sources.rs");
    fs::write(out, generated).expect("write the generated kernel table");
}
