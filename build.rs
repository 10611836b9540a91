//! Build script. It owns the `cuda` feature switch: with the feature on, every
//! `kernels/*.cu` is compiled by nvcc into a fatbin (sm_80 and sm_90 machine code, plus
//! compute_90 PTX that newer GPUs compile at load) and embedded in the binary; with it
//! off it does nothing and needs no CUDA tools.
//!
//! nvcc is looked for in `NVCC`, `CUDA_HOME/bin` (or `CUDA_PATH/bin`), `PATH`, then the
//! PyPI `nvidia-cuda-nvcc` package: the venv `scripts/nvcc-venv` makes
//! (`~/.cache/inferd/nvcc-venv`), or the one of `INFERD_NVCC_PYTHON`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Machine code for Ampere and Hopper, PTX for anything newer.
const GENCODE: &[&str] = &[
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "INFERD_NVCC_PYTHON", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    let nvcc = find_nvcc().unwrap_or_else(|| {
        panic!(
            "the `cuda` feature needs nvcc, and none was found: set NVCC or CUDA_HOME, put nvcc on PATH, \
             or run scripts/nvcc-venv (installs the pinned nvcc from PyPI into ~/.cache/inferd/nvcc-venv)"
        )
    });
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")))
        .collect();
    sources.sort();
    let mut modules = String::from(
        "/// Kernel modules compiled by build.rs: (name, fatbin).\npub const MODULES: &[(&str, &[u8])] = &[\n",
    );
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
    }
    for src in sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")) {
        let name = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("kernel file name is UTF-8");
        let fatbin = out_dir.join(format!("{name}.fatbin"));
        let output = Command::new(&nvcc)
            .args(["-fatbin", "-O3", "-std=c++17", "-Xptxas=-warn-spills"])
            .args(GENCODE)
            .arg("-o")
            .arg(&fatbin)
            .arg(src)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        if !output.status.success() {
            panic!(
                "nvcc failed on {}:\n{}{}",
                src.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            println!("cargo:warning={name}.cu: {line}");
        }
        modules.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            fatbin.display().to_string()
        ));
    }
    modules.push_str("];\n");
    std::fs::write(out_dir.join("kernels.rs"), modules).expect("write kernels.rs");
}

fn find_nvcc() -> Option<PathBuf> {
    let runs = |p: &Path| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if let Some(p) = std::env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let p = Path::new(&home).join("bin/nvcc");
            if runs(&p) {
                return Some(p);
            }
        }
    }
    if runs(Path::new("nvcc")) {
        return Some(PathBuf::from("nvcc"));
    }
    // The PyPI package: nvidia/cu13/bin/nvcc inside a Python's site-packages.
    let mut pythons: Vec<PathBuf> = std::env::var_os("INFERD_NVCC_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    if let Some(home) = std::env::var_os("HOME") {
        pythons.push(Path::new(&home).join(".cache/inferd/nvcc-venv/bin/python3"));
    }
    pythons.push(PathBuf::from("python3"));
    for python in pythons {
        let Ok(out) = Command::new(&python)
            .args(["-c", "import nvidia, sys; print('\\n'.join(nvidia.__path__))"])
            .output()
        else {
            continue;
        };
        for dir in String::from_utf8_lossy(&out.stdout).lines() {
            for sub in ["cu13/bin/nvcc", "cuda_nvcc/bin/nvcc"] {
                let p = Path::new(dir).join(sub);
                if runs(&p) {
                    return Some(p);
                }
            }
        }
    }
    None
}
