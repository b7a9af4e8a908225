//! What a bench run records: the JSON file is this structure, raw measurements (with their
//! histograms) included, so any summary can be recomputed from it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sidecar_tests::tools::load::LoadReport;

use super::{
    metrics::BpfRunStats,
    node_cost::NodeCost,
    profile::Profile,
    scenario::{CpuUsage, Scenario},
    summary::Summary,
    workload::{Cell, Timing},
};

#[derive(Serialize, Deserialize)]
pub struct BenchRun {
    pub meta: Meta,
    /// Scenarios in the order tables list them.
    pub scenarios: Vec<Scenario>,
    pub cells: Vec<Cell>,
    /// B0's closed-loop HTTP requests/s by connection count: 100% of the HTTP load levels.
    pub http_saturation: BTreeMap<usize, f64>,
    pub calibration_run: Option<ScenarioRun>,
    /// The timed runs, in the order they ran.
    pub runs: Vec<ScenarioRun>,
    /// Extra runs of the eBPF scenarios with `kernel.bpf_stats_enabled=1`, kept out of the
    /// timed runs because the statistics cost time on every program run.
    pub bpf_profile_runs: Vec<ScenarioRun>,
    /// Extra runs of every scenario's new-connection cell under `perf record -a`, also kept
    /// out of the timed runs.
    #[serde(default)]
    pub perf_profile_runs: Vec<ScenarioRun>,
    /// Kernel memory per captured pod at idle, eBPF against iptables.
    #[serde(default)]
    pub node_cost: Option<NodeCost>,
    pub summary: Summary,
}

#[derive(Serialize, Deserialize)]
pub struct Meta {
    pub started_utc: String,
    pub finished_utc: String,
    pub command: String,
    pub git_revision: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub quick: bool,
    pub reps: usize,
    pub seed: u64,
    /// The shuffled scenario order of each repetition.
    pub orders: Vec<Vec<Scenario>>,
    pub timing: Timing,
    pub pinning: String,
    pub pod_sysctls: Vec<String>,
    pub sidecar_proxy_args: Vec<String>,
    pub haproxy_version: Option<String>,
    pub load_average_before: String,
    pub load_average_after: String,
}

/// One scenario brought up in a fresh lab, every cell measured in it, torn down.
#[derive(Clone, Serialize, Deserialize)]
pub struct ScenarioRun {
    pub scenario: Scenario,
    pub rep: Option<usize>,
    pub position: usize,
    pub proxy_peak_rss_kib: Option<u64>,
    pub measurements: Vec<Measurement>,
    /// Set when the run could not complete (its measurements so far are kept).
    pub error: Option<String>,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub cell: String,
    pub report: LoadReport,
    /// CPU time of each cgroup over the measured phase.
    pub cpu_usec: CpuUsage,
    /// Connections the client's proxy accepted over the whole cell (warm-up included).
    pub proxy_connections: Option<u64>,
    /// Two-sidecar scenarios: connections the server's proxy accepted over the whole cell.
    #[serde(default)]
    pub server_proxy_connections: Option<u64>,
    /// HTTP-aware scenarios: HTTP requests the client's proxy counted over the measured phase.
    #[serde(default)]
    pub proxy_requests: Option<u64>,
    /// eBPF scenarios: the client pod's capture's kernel counters over the whole cell.
    pub kernel_counters: Option<BTreeMap<String, u64>>,
    /// Two-sidecar eBPF scenarios: the server pod's kernel counters over the whole cell.
    #[serde(default)]
    pub server_kernel_counters: Option<BTreeMap<String, u64>>,
    /// eBPF scenarios: entries left in the original-destination index after the cell, beyond
    /// those there before (closed connections must leave none).
    pub orig_dst_index_growth: Option<u64>,
    /// Profiling runs: per-program BPF run statistics over the measured phase.
    pub bpf: Option<BTreeMap<String, BpfRunStats>>,
    /// perf runs: where the CPU time of both pods' CPUs went, by kernel subsystem.
    #[serde(default)]
    pub perf: Option<Profile>,
    /// Why this measurement does not count; empty when it passed every gate.
    pub gate_failures: Vec<String>,
}

impl Measurement {
    pub fn is_valid(&self) -> bool {
        self.gate_failures.is_empty()
    }
}
