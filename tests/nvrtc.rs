//! Every kernel file compiles with NVRTC for sm_80 and sm_90 — no GPU needed,
//! only NVRTC's library (CI installs it from PyPI and sets KILN_REQUIRE_NVRTC,
//! so there this test cannot be skipped).

use kiln::cuda::compile::{compile_source, expanded_source, nvrtc_available, nvrtc_version};
use kiln::cuda::source::kernel_names;
use kiln::kernels::KERNEL_SOURCES;

/// False (with a visible message) when NVRTC is absent and not required.
fn nvrtc_or_skip() -> bool {
    if nvrtc_available() {
        return true;
    }
    if std::env::var_os("KILN_REQUIRE_NVRTC").is_some() {
        panic!(
            "KILN_REQUIRE_NVRTC is set but libnvrtc could not be loaded (check LD_LIBRARY_PATH)"
        );
    }
    eprintln!(
        "skipped: NVRTC library not found (pip install nvidia-cuda-nvrtc and add its lib dir to LD_LIBRARY_PATH)"
    );
    false
}

#[test]
fn every_kernel_file_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip() {
        return;
    }
    let (major, minor) = nvrtc_version().unwrap();
    eprintln!("NVRTC {major}.{minor}");
    let files: Vec<&str> = KERNEL_SOURCES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| name.ends_with(".cu"))
        .collect();
    assert!(!files.is_empty(), "no kernel files embedded");
    // The emulator's test and bench kernels are CUDA too: they must stay valid.
    kiln::kernels::register_source("faults.cu", include_str!("emulator/faults.cu")).unwrap();
    kiln::kernels::register_source("warp.cu", include_str!("emulator/warp.cu")).unwrap();
    kiln::kernels::register_source("emulator.cu", include_str!("../benches/emulator.cu")).unwrap();
    for file in files
        .into_iter()
        .chain(["faults.cu", "warp.cu", "emulator.cu"])
    {
        let source = expanded_source(file).unwrap();
        let kernels = kernel_names(&source);
        assert!(
            !kernels.is_empty(),
            "kernels/{file} declares no __global__ function"
        );
        for arch in ["sm_80", "sm_90"] {
            let ptx = compile_source(file, &source, arch).unwrap_or_else(|e| panic!("{e}"));
            for kernel in &kernels {
                assert!(
                    ptx.contains(&format!(".entry {kernel}(")),
                    "kernels/{file}: {kernel} missing from the {arch} PTX (is it extern \"C\"?)"
                );
            }
            eprintln!("kernels/{file} -> {arch}: {} kernels", kernels.len());
        }
    }
}

#[test]
fn a_compile_error_names_the_file_and_carries_nvrtc_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let broken = "extern \"C\" __global__ void broken_kernel(float* x) { x[0] = undeclared_name; }";
    let message = compile_source("broken.cu", broken, "sm_90")
        .unwrap_err()
        .to_string();
    assert!(message.contains("kernels/broken.cu"), "{message}");
    assert!(
        message.contains("undeclared_name"),
        "NVRTC's log is missing: {message}"
    );
}

#[test]
fn includes_are_inlined_so_nvrtc_needs_no_include_path() {
    let source = expanded_source("elementwise.cu").unwrap();
    assert!(!source.contains("#include"), "an #include survived");
    assert!(source.contains("GRID_STRIDE_LOOP"));
}
