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

/// `ptxas`: KILN_PTXAS, else on PATH (the nvidia-cuda-nvcc wheel has one).
fn ptxas_or_skip() -> Option<std::path::PathBuf> {
    let candidate = std::env::var_os("KILN_PTXAS").map_or_else(|| "ptxas".into(), Into::into);
    let found = std::process::Command::new(&candidate)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(candidate);
    }
    if std::env::var_os("KILN_REQUIRE_PTXAS").is_some() {
        panic!("KILN_REQUIRE_PTXAS is set but {candidate:?} does not run");
    }
    eprintln!("skipped: ptxas not found (pip install nvidia-cuda-nvcc and set KILN_PTXAS)");
    None
}

/// The tensor-core kernels (the GEMM's v4 rung and the 16-bit implicit-GEMM
/// convolution) keep their accumulators and fragments in registers:
/// ptxas -v reports no spill stores or loads for them on sm_80 and sm_90.
#[test]
fn the_tensor_core_kernels_assemble_without_register_spills() {
    if !nvrtc_or_skip() {
        return;
    }
    let Some(ptxas) = ptxas_or_skip() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("kiln-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (file, kernel) in [
        ("gemm.cu", "gemm_v4_tensor_core"),
        ("conv.cu", "conv2d_forward_tensor_core"),
    ] {
        let source = expanded_source(file).unwrap();
        for arch in ["sm_80", "sm_90"] {
            let ptx_path = dir.join(format!("{file}-{arch}.ptx"));
            std::fs::write(&ptx_path, compile_source(file, &source, arch).unwrap()).unwrap();
            let output = std::process::Command::new(&ptxas)
                .args(["-v", "--gpu-name", arch, "-o"])
                .arg(dir.join(format!("{file}-{arch}.cubin")))
                .arg(&ptx_path)
                .output()
                .unwrap();
            let log = String::from_utf8_lossy(&output.stderr).into_owned();
            assert!(
                output.status.success(),
                "ptxas failed for {file} on {arch}:\n{log}"
            );
            // "Function properties for <kernel>", then its frame and spills.
            let properties = log
                .split("Function properties for ")
                .find(|block| block.starts_with(kernel))
                .unwrap_or_else(|| panic!("no properties for {kernel} in:\n{log}"));
            let spills = properties.lines().nth(1).unwrap_or_default();
            eprintln!("{arch} {kernel}: {}", spills.trim());
            assert!(
                spills.contains("0 bytes spill stores, 0 bytes spill loads"),
                "{arch}: {kernel} spills registers: {spills}\n{log}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
