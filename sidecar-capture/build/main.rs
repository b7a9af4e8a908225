//! Builds the BPF object (sidecar-ebpf, for the BPF target) and embeds it into the loader
//! (`ebpf_capture.rs`), so a plain `cargo build` or `cargo test` works once `cargo xtask setup`
//! has installed bpf-linker. `SIDECAR_BPF_OBJECT` names a prebuilt object instead.
//!
//! Not aya-build: it needs either a nightly toolchain or `RUSTC_BOOTSTRAP` in this script's
//! own environment, which only the caller can set; here it is set on the inner cargo alone.
mod bpf_cargo;

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=SIDECAR_BPF_OBJECT");
    let object = match std::env::var_os("SIDECAR_BPF_OBJECT") {
        Some(object) => PathBuf::from(object),
        None => build_object(),
    };
    if !object.is_file() {
        panic!("the BPF object {} is missing", object.display());
    }
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo:rustc-env=SIDECAR_BPF_OBJECT={}", object.display());
}

/// Compiles sidecar-ebpf (cargo keeps it up to date in its own target directory) and copies
/// the object into this build's output directory.
fn build_object() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let workspace_root = manifest_dir
        .parent()
        .expect("the workspace holds this crate");
    for source in ["sidecar-ebpf", "sidecar-common", "Cargo.lock"] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace_root.join(source).display()
        );
    }
    let status = bpf_cargo::bpf_cargo(workspace_root, "build")
        .status()
        .unwrap_or_else(|error| panic!("cannot run cargo for the BPF object: {error}"));
    if !status.success() {
        panic!(
            "building the BPF object failed ({status}; the errors are above): is bpf-linker \
             installed? `cargo xtask setup` installs it"
        );
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out_dir.join("sidecar-ebpf.o");
    std::fs::copy(bpf_cargo::built_object(workspace_root), &object)
        .unwrap_or_else(|error| panic!("cannot copy the BPF object: {error}"));
    object
}
