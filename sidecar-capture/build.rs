//! Embeds the BPF object built by `cargo xtask build-ebpf` into the loader (`ebpf_capture.rs`).
use std::path::PathBuf;

fn main() {
    let object = std::env::var_os("SIDECAR_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bpf/sidecar-ebpf.o")
        });
    println!("cargo:rerun-if-env-changed=SIDECAR_BPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "the BPF object {} is missing: run `cargo xtask build-ebpf` (or `cargo xtask build`) first",
            object.display()
        );
    }
    println!("cargo:rustc-env=SIDECAR_BPF_OBJECT={}", object.display());
}
