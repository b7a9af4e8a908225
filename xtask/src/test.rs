//! `cargo xtask test`: setup, build, lint, then every test: unit and root integration tests on
//! the real kernel, a minute of coverage-guided fuzzing, the manifests against the Kubernetes
//! schemas, the manifests played under podman, the integration tests on the oldest and newest
//! kernels of the matrix (qemu), and the benchmark harness in its quick form (no performance
//! thresholds).
use std::process::Command;

use anyhow::Result;
use clap::Args;

use crate::{
    build::{self, BuildOptions},
    fuzz::{self, FuzzOptions},
    manifests, pod_test, setup,
    util::{run, workspace_root},
};

#[derive(Args)]
pub struct TestOptions {
    /// Skip `cargo fmt --check` and `cargo clippy`.
    #[arg(long)]
    pub no_lint: bool,
    /// Only the cargo tests (which replay the fuzz corpora): skip the fuzzing, the manifests,
    /// the podman run, the VMs and the benchmark.
    #[arg(long)]
    pub cargo_only: bool,
    /// Extra arguments passed to `cargo test` (e.g. a test name filter after `--`).
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

pub fn run_tests(opts: &TestOptions) -> Result<()> {
    setup::run()?;
    let profile_dir = build::build_all(&BuildOptions::default())?;
    let root = workspace_root();
    if !opts.no_lint {
        println!("test: cargo fmt --check");
        run(Command::new("cargo")
            .current_dir(&root)
            .args(["fmt", "--all", "--check"]))?;
        println!("test: cargo clippy (userspace)");
        run(Command::new("cargo").current_dir(&root).args([
            "clippy",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        println!("test: cargo clippy (BPF programs)");
        run(build::bpf_cargo("clippy").args(["--", "-D", "warnings"]))?;
        // Advisories are not checked here: their database is fetched from GitHub, which these
        // machines cannot reach.
        println!("test: cargo deny (licenses, bans, sources: deny.toml)");
        run(Command::new("cargo").current_dir(&root).args([
            "deny",
            "--workspace",
            "check",
            "licenses",
            "bans",
            "sources",
        ]))?;
    }
    println!("test: cargo test (integration tests run as root on the real kernel)");
    run(Command::new("cargo")
        .current_dir(&root)
        .env("SIDECAR_BIN", profile_dir.join("sidecar"))
        .args(["test"])
        .args(&opts.cargo_test_args))?;
    if opts.cargo_only {
        return Ok(());
    }
    let fuzzing = FuzzOptions {
        from_seeds: true,
        quick_build: true,
        ..FuzzOptions::default()
    };
    println!(
        "test: the fuzz targets under libFuzzer, {} s each",
        fuzzing.time_per_target.as_secs()
    );
    fuzz::run_fuzz(&fuzzing)?;
    println!("test: Kubernetes manifests against the schemas");
    manifests::validate()?;
    println!("test: the manifests under podman kube play");
    pod_test::run_pod_test()?;
    println!("test: the oldest and newest kernels of the matrix, in qemu (docs/KERNELS.md)");
    run(xtask(&root).args(["vm-test", "--kernel", "5.10,7.2"]))?;
    println!("test: the benchmark harness, quick (proves it works; no thresholds)");
    // Through our own binary, as a user runs it; results stay out of bench/results. One
    // repetition: every scenario, cell, gate, profiler and report still runs once.
    let quick_results = root.join("target/bench-quick");
    run(xtask(&root)
        .args(["bench", "--quick", "--reps", "1", "--out-dir"])
        .arg(&quick_results))?;
    println!("test: all passed");
    Ok(())
}

/// `cargo xtask ...` through cargo, not our own executable: a build earlier in the run may
/// have replaced that file.
fn xtask(root: &std::path::Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).arg("xtask");
    cmd
}
