//! The performance targets of the benchmark issue, checked against every run's own ratios, so
//! each results file says which are met and by how much the others are missed:
//! - eBPF capture at least as good as iptables on every workload;
//! - eBPF at least 1.15x iptables in new connections per second;
//! - the redirect's own overhead (E1 over P0) within 3% at p50.
use std::{collections::BTreeSet, fmt::Write};

use super::{
    results::BenchRun,
    scenario::Scenario,
    summary::{Metric, Spread, SubsystemCost, Summary},
    workload::WorkloadKind,
};

const NEW_CONNECTIONS_TARGET: f64 = 1.15;
const REDIRECT_OVERHEAD_TARGET: f64 = 0.03;
/// eBPF against iptables, pair by pair.
const PAIRS: [(Scenario, Scenario); 3] = [
    (Scenario::E1, Scenario::I1),
    (Scenario::E2, Scenario::I2),
    (Scenario::E2Mtls, Scenario::I2Mtls),
];

/// The "Targets" section of the Markdown report (empty when E1 or I1 did not run).
pub fn section(bench: &BenchRun) -> String {
    let summary = &bench.summary;
    let mut out = String::new();
    if !(bench.scenarios.contains(&Scenario::E1) && bench.scenarios.contains(&Scenario::I1)) {
        return out;
    }
    out.push_str("\n## Targets\n\nRatios are medians of the per-repetition ratios [min–max].\n\n| target | measured | verdict |\n|---|---|---|\n");
    let crr = bench
        .cells
        .iter()
        .find(|cell| cell.kind == WorkloadKind::Crr);
    if let Some(ratio) = crr.and_then(|cell| {
        summary.comparison(Scenario::E1, Scenario::I1, &cell.id, Metric::Throughput)
    }) {
        let _ = writeln!(
            out,
            "| E1/I1 new connections/s ≥ {NEW_CONNECTIONS_TARGET}x | {} | {} |",
            ratio_text(ratio),
            verdict(ratio.median >= NEW_CONNECTIONS_TARGET, || format!(
                "missed by {:.0}%",
                (NEW_CONNECTIONS_TARGET / ratio.median - 1.0) * 100.0
            ))
        );
    }
    let ping_pong = bench
        .cells
        .iter()
        .find(|cell| cell.kind == WorkloadKind::PingPong);
    if let Some(ratio) = ping_pong
        .and_then(|cell| summary.comparison(Scenario::E1, Scenario::P0, &cell.id, Metric::P50))
    {
        let overhead = ratio.median - 1.0;
        let _ = writeln!(
            out,
            "| E1 − P0 ≤ {:.0}% of P0 at p50 (ping-pong) | {:+.1}% [{:+.1}% – {:+.1}%] | {} |",
            REDIRECT_OVERHEAD_TARGET * 100.0,
            overhead * 100.0,
            (ratio.min - 1.0) * 100.0,
            (ratio.max - 1.0) * 100.0,
            verdict(overhead <= REDIRECT_OVERHEAD_TARGET, || format!(
                "missed by {:.1} points",
                (overhead - REDIRECT_OVERHEAD_TARGET) * 100.0
            ))
        );
    }
    let worse = worse_cells(bench, summary);
    let _ = writeln!(
        out,
        "| eBPF at least as good as iptables on every workload ({}) | {} | {} |",
        PAIRS.map(|(a, b)| format!("{a}/{b}")).join(", "),
        if worse.is_empty() {
            "no cell worse".to_owned()
        } else {
            worse.join("; ")
        },
        verdict(worse.is_empty(), || format!("{} cells worse", worse.len()))
    );
    out.push_str(&redirect_cost_note(summary));
    out
}

/// Cells where an eBPF scenario does worse than its iptables pair: lower throughput in the
/// closed-loop cells, higher p50 in the open-loop ones (whose throughput is the offered rate).
fn worse_cells(bench: &BenchRun, summary: &Summary) -> Vec<String> {
    let mut worse = Vec::new();
    for cell in &bench.cells {
        let open_loop = cell.load_percent.is_some();
        let metric = if open_loop {
            Metric::P50
        } else {
            Metric::Throughput
        };
        for (a, b) in PAIRS {
            let Some(ratio) = summary.comparison(a, b, &cell.id, metric) else {
                continue;
            };
            let is_worse = if open_loop {
                ratio.median > 1.0
            } else {
                ratio.median < 1.0
            };
            if is_worse {
                let what = if open_loop { "p50" } else { "throughput" };
                worse.push(format!("{a}/{b} {} {what} {:.2}x", cell.id, ratio.median));
            }
        }
    }
    worse
}

/// Why the new-connection ratio is what it is, from the perf run: how the CPU time per
/// connection of I1 and E1 differs, subsystem by subsystem.
fn redirect_cost_note(summary: &Summary) -> String {
    let cost = |scenario| {
        summary
            .subsystems
            .iter()
            .find(|cost| cost.scenario == scenario && cost.cell == "crr")
    };
    let (Some(ebpf), Some(iptables)) = (cost(Scenario::E1), cost(Scenario::I1)) else {
        return String::new();
    };
    let categories: BTreeSet<&String> = iptables
        .us_per_op
        .keys()
        .chain(ebpf.us_per_op.keys())
        .collect();
    let mut differences: Vec<(&str, f64)> = categories
        .into_iter()
        .map(|category| {
            let of = |cost: &SubsystemCost| cost.us_per_op.get(category).copied().unwrap_or(0.0);
            (category.as_str(), of(iptables) - of(ebpf))
        })
        .collect();
    differences.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
    let largest: Vec<String> = differences
        .iter()
        .take(4)
        .map(|(category, us)| format!("{category} {us:+.1} µs"))
        .collect();
    format!(
        "\nFrom the perf run (\"Where the CPU time goes\", one repetition): a new connection costs {:.0} µs of CPU under I1 and {:.0} µs under E1 ({:.2}x); the largest differences, I1 minus E1: {}. Throughput follows the cost on the client's CPU, where the load generator and its proxy share one core.\n",
        iptables.cpu_us_per_op,
        ebpf.cpu_us_per_op,
        iptables.cpu_us_per_op / ebpf.cpu_us_per_op.max(f64::EPSILON),
        largest.join(", ")
    )
}

fn ratio_text(ratio: &Spread) -> String {
    format!("{:.2}x [{:.2}–{:.2}]", ratio.median, ratio.min, ratio.max)
}

fn verdict(met: bool, missed: impl FnOnce() -> String) -> String {
    if met {
        "met".to_owned()
    } else {
        format!("**not met**: {}", missed())
    }
}
