//! Building the BPF object and the binaries. The BPF object is built by sidecar-capture's build
//! script, so `cargo build` alone does it; `build-ebpf` builds it on its own, with the same
//! invocation (`sidecar-capture/build/bpf_cargo.rs`, shared through `#[path]`).
use std::{path::PathBuf, process::Command};

use anyhow::{Result, bail};
use clap::Args;

use crate::util::{run, workspace_root};

#[path = "../../sidecar-capture/build/bpf_cargo.rs"]
mod bpf_cargo;

#[derive(Args, Clone, Default)]
pub struct BuildOptions {
    /// Build the userspace binaries in release mode (the BPF object is always optimised).
    #[arg(long)]
    pub release: bool,
}

/// Compiles sidecar-ebpf for the BPF target.
pub fn build_ebpf() -> Result<()> {
    if crate::util::which("bpf-linker").is_none() {
        bail!("bpf-linker is not installed: run `cargo xtask setup`");
    }
    run(&mut bpf_cargo("build"))?;
    println!(
        "build-ebpf: {}",
        bpf_cargo::built_object(&workspace_root()).display()
    );
    Ok(())
}

/// `cargo <subcommand>` for sidecar-ebpf on the BPF target (see `bpf_cargo.rs`).
pub fn bpf_cargo(subcommand: &str) -> Command {
    bpf_cargo::bpf_cargo(&workspace_root(), subcommand)
}

/// Builds every userspace binary (and, through sidecar-capture's build script, the BPF object
/// they embed); returns the target profile directory.
pub fn build_all(opts: &BuildOptions) -> Result<PathBuf> {
    if crate::util::which("bpf-linker").is_none() {
        bail!("bpf-linker is not installed: run `cargo xtask setup`");
    }
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
