//! Project tasks: `cargo xtask <setup|build-ebpf|build|test|lab>`.
mod build;
mod lab;
mod setup;
mod test;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and demo tasks for the sidecar")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (idempotent, one line per step).
    Setup,
    /// Build the BPF object that the `sidecar` binary embeds.
    BuildEbpf(build::BuildOptions),
    /// Build the BPF object, then the `sidecar` binary.
    Build(build::BuildOptions),
    /// Setup, build, then run every test (unit and root integration tests).
    Test(test::TestOptions),
    /// Demo: two pods, an HTTP request from one to the other intercepted by the proxy.
    Lab(lab::LabOptions),
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf(opts) => build::build_ebpf(&opts),
        Task::Build(opts) => build::build_all(&opts).map(|_| ()),
        Task::Test(opts) => test::run_tests(&opts),
        Task::Lab(opts) => lab::run(&opts),
    }
}
