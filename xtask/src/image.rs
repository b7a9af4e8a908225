//! `cargo xtask image`: `FROM scratch` images with static binaries, built with podman (no
//! Docker engine, no registry), tagged with the names deploy/kubernetes uses.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    setup,
    util::{run, workspace_root},
};

pub const SIDECAR_IMAGE: &str = "localhost/sidecar:dev";
pub const LABTOOL_IMAGE: &str = "localhost/labtool:dev";
/// `+crt-static` on the gnu target gives a static-pie binary (no musl target is installed).
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Packages podman needs here: runc (crun refuses cgroup hybrid mode) and catatonit (the pod's
/// infra container, built locally as no registry is reachable).
pub const PODMAN_PACKAGES: &[&str] = &["podman", "buildah", "runc", "catatonit"];

/// Builds both images; returns the directory of the static binaries.
pub fn build_images() -> Result<PathBuf> {
    setup::ensure_packages("podman, buildah, runc, catatonit", PODMAN_PACKAGES)?;
    let bin_dir = build_static_binaries()?;
    for (image, binary) in [(SIDECAR_IMAGE, "sidecar"), (LABTOOL_IMAGE, "labtool")] {
        build_image(image, &bin_dir.join(binary))?;
    }
    Ok(bin_dir)
}

fn build_static_binaries() -> Result<PathBuf> {
    run(Command::new("cargo")
        .current_dir(workspace_root())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args(["build", "--release", "--target", STATIC_TARGET])
        .args(["-p", "sidecar-user", "-p", "sidecar-tests"])
        .args(["--bin", "sidecar", "--bin", "labtool"]))?;
    let dir = workspace_root()
        .join("target")
        .join(STATIC_TARGET)
        .join("release");
    for binary in ["sidecar", "labtool"] {
        require_static(&dir.join(binary))?;
    }
    Ok(dir)
}

/// A dynamically linked binary in a scratch image fails with a baffling "no such file": refuse
/// it here, by its ELF program headers (a `PT_INTERP` entry names the dynamic loader).
fn require_static(binary: &Path) -> Result<()> {
    const PT_INTERP: u32 = 3;
    let elf = std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    if elf.len() < 64 || &elf[..5] != b"\x7fELF\x02" {
        bail!("{} is not a 64-bit ELF binary", binary.display());
    }
    let table = u64::from_le_bytes(elf[32..40].try_into().expect("8 bytes")) as usize;
    let (entry_size, entries) = (u16_at(54), u16_at(56));
    let interpreted = (0..entries)
        .map(|i| table + i * entry_size)
        .filter(|&at| at + 4 <= elf.len())
        .any(|at| u32::from_le_bytes(elf[at..at + 4].try_into().expect("4 bytes")) == PT_INTERP);
    if interpreted {
        bail!(
            "{} is dynamically linked: a scratch image cannot run it",
            binary.display()
        );
    }
    Ok(())
}

fn build_image(image: &str, binary: &Path) -> Result<()> {
    let name = binary
        .file_name()
        .and_then(|n| n.to_str())
        .expect("utf-8 name");
    let context = workspace_root().join("target/images").join(name);
    std::fs::create_dir_all(&context)?;
    std::fs::copy(binary, context.join(name))
        .with_context(|| format!("cannot copy {} into the image context", binary.display()))?;
    let containerfile = format!("FROM scratch\nCOPY {name} /{name}\nENTRYPOINT [\"/{name}\"]\n",);
    std::fs::write(context.join("Containerfile"), containerfile)?;
    run(Command::new("podman")
        .args(["build", "--quiet", "--tag", image, "--file"])
        .arg(context.join("Containerfile"))
        .arg(&context))?;
    println!("image: {image} (FROM scratch, /{name} static)");
    Ok(())
}
