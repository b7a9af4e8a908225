//! The one way the BPF crate is compiled, shared by sidecar-capture's build script (which
//! embeds the object) and xtask (`build-ebpf`, and the BPF crate's clippy), through `#[path]`.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

/// The BPF crate builds in its own target directory: `RUSTC_BOOTSTRAP=1` changes what build
/// scripts such as proc-macro2's detect, and sharing `target/` made every later host build
/// rebuild them (and everything after them).
pub fn bpf_target_dir(workspace_root: &Path) -> PathBuf {
    workspace_root.join("target/ebpf")
}

/// Where cargo leaves the BPF object.
pub fn built_object(workspace_root: &Path) -> PathBuf {
    bpf_target_dir(workspace_root).join("bpfel-unknown-none/release/sidecar-ebpf")
}

/// `cargo <subcommand>` for sidecar-ebpf on the BPF target, on stable Rust: `RUSTC_BOOTSTRAP=1`
/// is set for this one invocation only, so that `-Z build-std=core` is accepted; everything
/// else in the workspace stays a plain stable build. What the calling cargo set for its own
/// build (a rustc wrapper such as clippy-driver, fuzzing or static-linking flags, its target
/// directory) is removed: none of it applies to the BPF target.
pub fn bpf_cargo(workspace_root: &Path, subcommand: &str) -> Command {
    let rustflags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ];
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f"))
        // The workspace's release profile has fat LTO for the proxy's sake; bpf-linker links
        // the whole object itself, and the programs stay as the kernel matrix verified them.
        .env("CARGO_PROFILE_RELEASE_LTO", "false");
    for inherited in [
        "RUSTFLAGS",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(inherited);
    }
    cmd.args([subcommand, "--package", "sidecar-ebpf", "--release"])
        .arg("--target-dir")
        .arg(bpf_target_dir(workspace_root))
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"]);
    cmd
}
