//! Build script. It owns the `cuda` feature switch: with the feature on, the kernels in
//! `kernels/` are compiled with nvcc (that work arrives with the CUDA backend); with it
//! off it does nothing and needs no CUDA tools.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rerun-if-changed=kernels");
        panic!("the `cuda` feature needs the CUDA backend, which has not landed yet: build without `--features cuda`");
    }
}
