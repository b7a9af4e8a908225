//! Building the BPF object and the binaries.
use std::{path::PathBuf, process::Command};

use anyhow::{Result, bail};
use clap::Args;

use crate::util::{run, workspace_root};

#[derive(Args, Clone, Default)]
pub struct BuildOptions {
    /// Build the userspace binaries in release mode (the BPF object is always optimised).
    #[arg(long)]
    pub release: bool,
}

/// The BPF crate builds in its own target directory: `RUSTC_BOOTSTRAP=1` changes what build
/// scripts such as proc-macro2's detect, and sharing `target/` made every later host build
/// rebuild them (and everything after them).
fn bpf_target_dir() -> PathBuf {
    workspace_root().join("target/ebpf")
}

/// Where cargo leaves the BPF object.
fn cargo_ebpf_object() -> PathBuf {
    bpf_target_dir().join("bpfel-unknown-none/release/sidecar-ebpf")
}

/// Where `build-ebpf` publishes the object; sidecar-capture's build script embeds it from here.
/// It is rewritten only when its bytes change, so a BPF rebuild that produces the same object
/// does not make cargo rebuild the `sidecar` binary.
pub fn ebpf_object() -> PathBuf {
    workspace_root().join("target/bpf/sidecar-ebpf.o")
}

/// Compiles sidecar-ebpf for the BPF target.
pub fn build_ebpf(_opts: &BuildOptions) -> Result<()> {
    if crate::util::which("bpf-linker").is_none() {
        bail!("bpf-linker is not installed: run `cargo xtask setup`");
    }
    run(&mut bpf_cargo("build"))?;
    let built = std::fs::read(cargo_ebpf_object())?;
    let published = ebpf_object();
    if std::fs::read(&published).ok().as_deref() != Some(built.as_slice()) {
        std::fs::create_dir_all(published.parent().expect("target/bpf has a parent"))?;
        std::fs::write(&published, &built)?;
    }
    println!("build-ebpf: {}", published.display());
    Ok(())
}

/// `cargo <subcommand>` for sidecar-ebpf on the BPF target, on stable Rust: `RUSTC_BOOTSTRAP=1`
/// is set for this one invocation only, so that `-Z build-std=core` is accepted; everything
/// else in the workspace stays a plain stable build.
pub fn bpf_cargo(subcommand: &str) -> Command {
    let rustflags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ];
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f"))
        .env_remove("RUSTFLAGS")
        .args([subcommand, "--package", "sidecar-ebpf", "--release"])
        .arg("--target-dir")
        .arg(bpf_target_dir())
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"]);
    cmd
}

/// Builds the BPF object, then every userspace binary; returns the target profile directory.
pub fn build_all(opts: &BuildOptions) -> Result<PathBuf> {
    build_ebpf(opts)?;
    let mut cmd = Command::new("cargo");
    // The default members: everything but the BPF crate, which only builds for the BPF target.
    cmd.current_dir(workspace_root()).args(["build", "--bins"]);
    if opts.release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let profile = if opts.release { "release" } else { "debug" };
    Ok(workspace_root().join("target").join(profile))
}
