//! `cargo xtask test`: setup, build, lint, then every test (unit and root integration tests).
use std::process::Command;

use anyhow::Result;
use clap::Args;

use crate::{
    build::{self, BuildOptions},
    setup,
    util::{run, workspace_root},
};

#[derive(Args)]
pub struct TestOptions {
    /// Skip `cargo fmt --check` and `cargo clippy`.
    #[arg(long)]
    pub no_lint: bool,
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
        println!("test: cargo clippy");
        run(Command::new("cargo").current_dir(&root).args([
            "clippy",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    println!("test: cargo test (integration tests run as root on the real kernel)");
    run(Command::new("cargo")
        .current_dir(&root)
        .env("SIDECAR_BIN", profile_dir.join("sidecar"))
        .args(["test"])
        .args(&opts.cargo_test_args))
}
