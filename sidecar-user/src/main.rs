//! `sidecar`: eBPF-based transparent traffic interception for Kubernetes pods.
//!
//! - `sidecar init` (privileged, runs once): loads, configures, attaches and pins the capture.
//! - `sidecar cleanup`: removes everything `init` created.
//! - `sidecar status`: what is attached where, with the kernel-side counters.
//! - `sidecar proxy`: the userspace proxy the captured connections are sent to.
#![forbid(unsafe_code)]

mod commands;

use clap::{Parser, Subcommand};

/// jemalloc, as ztunnel uses: the proxy allocates per request (headers, bodies, futures), and
/// glibc's malloc was 8% of its CPU on the HTTP path (docs/BENCHMARKS.md). Not under the
/// fuzzer, whose AddressSanitizer replaces the allocator itself.
#[cfg(not(fuzzing))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "sidecar", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install capture for a pod (privileged; exits once capture is in place).
    Init(commands::init::InitArgs),
    /// Remove everything `init` installed.
    Cleanup(commands::cleanup::CleanupArgs),
    /// Show what is attached where, with the counters.
    Status(commands::status::StatusArgs),
    /// Collect the capture of every deleted pod on this node, by itself (a DaemonSet).
    NodeAgent(commands::node_agent::NodeAgentArgs),
    /// Follow what the pod's BPF programs log (aya-log).
    KernelLogs(commands::kernel_logs::KernelLogsArgs),
    /// Run the proxy.
    // Boxed: its options outweigh every other command's.
    Proxy(Box<sidecar_proxy::ProxyArgs>),
    /// Create a lab CA and SPIFFE workload certificates.
    Certs(commands::certs::CertsArgs),
    /// Add the init container and the proxy to Kubernetes workload YAML (like kube-inject).
    Inject(commands::inject::InjectArgs),
}

fn main() {
    let result = match Cli::parse().command {
        Command::Init(args) => commands::init::run(args),
        Command::Cleanup(args) => commands::cleanup::run(args),
        Command::Status(args) => commands::status::run(args),
        Command::NodeAgent(args) => commands::node_agent::run(args),
        Command::KernelLogs(args) => commands::kernel_logs::run(args),
        Command::Proxy(args) => commands::proxy::run(*args),
        Command::Certs(args) => commands::certs::run(args),
        Command::Inject(args) => commands::inject::run(args),
    };
    if let Err(error) = result {
        eprintln!("sidecar: error: {error:#}");
        std::process::exit(1);
    }
}
