//! `cargo xtask setup`: installs what a fresh machine lacks, idempotently, one line per step.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::util::{run as run_cmd, which};

/// Debian packages the build, the capture modes, the tests and the lab need.
const APT_PACKAGES: &[&str] = &[
    "libllvm22", // bpf-linker links against LLVM 22, the version rustc 1.95 emits
    "iptables",  // the iptables capture mode (comparison baseline)
    "nftables",
    "iproute2",   // netns, veth, addresses for the lab
    "bpftool",    // debugging the loaded programs
    "tcpdump",    // captures in the tests
    "curl",       // the lab demo's HTTP client
    "openssl",    // the server TLS tests' `openssl s_client`, as a client outside the mesh
    "python3",    // the tests' apps (http.server, its ssl wrapper) and clients
    "util-linux", // setpriv, to run lab processes under the proxy UID
    "g++",        // libFuzzer, which bolero builds from source for `cargo xtask fuzz`
];
const LLVM_SONAME: &str = "/usr/lib/x86_64-linux-gnu/libLLVM.so.22.1";

pub fn run() -> Result<()> {
    step("rust-src component", has_rust_src, || {
        run_cmd(Command::new("rustup").args(["component", "add", "rust-src"]))
    })?;
    step(
        "Debian packages",
        missing_packages_is_empty,
        install_packages,
    )?;
    step(
        "bpf-linker (LLVM 22)",
        || which("bpf-linker").is_some(),
        install_bpf_linker,
    )?;
    step(
        "cargo-bolero (cargo xtask fuzz)",
        || which("cargo-bolero").is_some(),
        install_cargo_bolero,
    )?;
    step(
        "cargo-deny (licenses, bans, sources)",
        || which("cargo-deny").is_some(),
        install_cargo_deny,
    )?;
    println!("setup: done");
    Ok(())
}

fn step(name: &str, done: impl Fn() -> bool, install: impl Fn() -> Result<()>) -> Result<()> {
    if done() {
        println!("setup: {name}: already present");
        return Ok(());
    }
    println!("setup: {name}: installing");
    install().with_context(|| format!("setup step '{name}' failed"))?;
    if !done() {
        bail!("setup step '{name}' ran but its result is still missing");
    }
    println!("setup: {name}: installed");
    Ok(())
}

fn has_rust_src() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
        })
        .unwrap_or(false)
}

fn missing_packages() -> Vec<&'static str> {
    missing_from(APT_PACKAGES)
}

fn missing_from(packages: &[&'static str]) -> Vec<&'static str> {
    packages
        .iter()
        .copied()
        .filter(|pkg| {
            !Command::new("dpkg-query")
                .args(["-W", "-f", "${Status}", pkg])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect()
}

fn missing_packages_is_empty() -> bool {
    missing_packages().is_empty()
}

fn install_packages() -> Result<()> {
    install_apt(&missing_packages())
}

/// Installs the Debian packages a task needs beyond setup's, idempotently (image builds,
/// podman pods, the manifest validator's venv).
pub fn ensure_packages(what: &str, packages: &[&'static str]) -> Result<()> {
    step(
        what,
        || missing_from(packages).is_empty(),
        || install_apt(&missing_from(packages)),
    )
}

fn install_apt(missing: &[&str]) -> Result<()> {
    println!("setup:   apt-get install {}", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(missing),
    )
}

/// `cargo install bpf-linker` with default features wants LLVM 23; build it against Debian's
/// LLVM 22 through a private prefix holding the `libLLVM.so` symlink it links with.
fn install_bpf_linker() -> Result<()> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = PathBuf::from(home).join(".local/llvm22");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    if !link.exists() {
        std::os::unix::fs::symlink(LLVM_SONAME, &link)
            .with_context(|| format!("cannot link {} to {LLVM_SONAME}", link.display()))?;
    }
    run_cmd(
        Command::new("cargo")
            .env("LLVM_PREFIX", &prefix)
            .args(["install", "bpf-linker", "--locked", "--no-default-features"])
            .args(["--features", "llvm-22"]),
    )
}

/// The runner of `cargo xtask fuzz`, libFuzzer only (its AFL and honggfuzz engines are unused);
/// the version speaks the target protocol of the `bolero` crate in Cargo.lock.
fn install_cargo_bolero() -> Result<()> {
    run_cmd(Command::new("cargo").args([
        "install",
        "cargo-bolero",
        "--version",
        "0.13.5",
        "--locked",
        "--no-default-features",
        "--features",
        "libfuzzer",
    ]))
}

/// The dependency policy checker the test command runs (`deny.toml`); pinned, as the checks'
/// configuration format follows its version.
fn install_cargo_deny() -> Result<()> {
    run_cmd(Command::new("cargo").args([
        "install",
        "cargo-deny",
        "--version",
        "0.20.2",
        "--locked",
    ]))
}
