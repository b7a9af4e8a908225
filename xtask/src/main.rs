//! Project tasks: `cargo xtask <setup|build-ebpf|build|test|fuzz|lab|bench|image|pod-test|validate-manifests|vm-test|vm-shell>`.
mod build;
mod fuzz;
mod image;
mod lab;
mod manifests;
mod pod_test;
mod setup;
mod test;
mod util;
mod vm;

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
    /// Build the BPF object on its own (`cargo build` also builds it, for the binary to embed).
    BuildEbpf,
    /// Build the BPF object and every binary (`sidecar`, `labtool`).
    Build(build::BuildOptions),
    /// Setup, build, then run every test (unit and root integration tests).
    Test(test::TestOptions),
    /// Run each fuzz target under libFuzzer (coverage-guided) for a bounded time.
    Fuzz(fuzz::FuzzOptions),
    /// Demo: two pods, an HTTP request from one to the other intercepted by the proxy.
    Lab(lab::LabOptions),
    /// Benchmark: eBPF vs iptables redirection, every scenario and workload (docs/BENCHMARKS.md).
    Bench(sidecar_bench::BenchOptions),
    /// Build the FROM-scratch images (static binaries) the deploy/ manifests name, with podman.
    Image,
    /// Play deploy/kubernetes under `podman kube play`: capture, interception, teardown.
    PodTest,
    /// Validate every deploy/ manifest against the Kubernetes schemas (kubernetes-validate).
    ValidateManifests,
    /// Boot pinned Debian kernels in qemu and run the root integration tests in each.
    VmTest(vm::VmTestOptions),
    /// Boot one pinned kernel in qemu with the sidecar inside, on an interactive console.
    VmShell(vm::VmShellOptions),
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build::build_ebpf(),
        Task::Build(opts) => build::build_all(&opts).map(|_| ()),
        Task::Test(opts) => test::run_tests(&opts),
        Task::Fuzz(opts) => fuzz::run_fuzz(&opts),
        Task::Lab(opts) => lab::run(&opts),
        Task::Bench(opts) => sidecar_bench::run(
            &opts,
            &sidecar_bench::TaskRunner {
                setup: &setup::run,
                build_release: &|| build::build_all(&build::BuildOptions { release: true }),
            },
        ),
        Task::Image => image::build_images().map(|_| ()),
        Task::PodTest => pod_test::run_pod_test(),
        Task::ValidateManifests => manifests::validate(),
        Task::VmTest(opts) => vm::run_tests(&opts),
        Task::VmShell(opts) => vm::run_shell(&opts),
    }
}
