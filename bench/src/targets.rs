//! The performance targets of the benchmark issues, checked against every run's own ratios, so
//! each results file says which are met and by how much the others are missed:
//! - eBPF capture at least as good as iptables on every workload, and at least 1.15x in new
//!   connections per second; the redirect's own overhead (E1 over P0) within 3% at p50;
//! - our proxy at least as good as HAProxy under the same capture (opaque TCP and HTTP);
//! - the proxy at least half as fast as no proxy; mTLS new connections at 0.6x plaintext;
//! - the proxy's footprint with mTLS under Istio's published sidecar figures.
use std::{collections::BTreeSet, fmt::Write};

use super::{
    results::BenchRun,
    scenario::Scenario,
    summary::{Metric, Spread, SubsystemCost, Summary},
    workload::{SATURATION_CONNECTIONS, WorkloadKind},
};

const NEW_CONNECTIONS_TARGET: f64 = 1.15;
const REDIRECT_OVERHEAD_TARGET: f64 = 0.03;
/// Proxy against no proxy, in bulk and new connections.
const DIRECT_SHARE_TARGET: f64 = 0.5;
/// mTLS new connections against plaintext ones (session resumption).
const MTLS_NEW_CONNECTIONS_TARGET: f64 = 0.6;
/// Peak RSS of one proxy, MiB, and CPU per proxy per HTTP request, µs (0.05 vCPU per 1000
/// requests/s): under ztunnel's published 12 MB and 0.06 vCPU.
const PROXY_RSS_MIB_TARGET: f64 = 15.0;
const PROXY_CPU_US_PER_REQUEST_TARGET: f64 = 50.0;
/// eBPF against iptables, pair by pair.
const PAIRS: [(Scenario, Scenario); 3] = [
    (Scenario::E1, Scenario::I1),
    (Scenario::E2, Scenario::I2),
    (Scenario::E2Mtls, Scenario::I2Mtls),
];

/// A target on the ratio a/b of one cell's metric, measured within each repetition.
struct RatioTarget {
    what: &'static str,
    a: Scenario,
    b: Scenario,
    cell: String,
    metric: Metric,
    /// Throughput: a/b at least this; latency: a/b at most this.
    bound: f64,
}

/// The "Targets" section of the Markdown report (empty when none of its scenarios ran).
pub fn section(bench: &BenchRun) -> String {
    let summary = &bench.summary;
    let mut rows = String::new();
    let cell_of = |kind: WorkloadKind, closed: bool| {
        bench
            .cells
            .iter()
            .find(|cell| cell.kind == kind && cell.load_percent.is_none() == closed)
            .map(|cell| cell.id.clone())
    };
    let crr = cell_of(WorkloadKind::Crr, true);
    let bulk = cell_of(WorkloadKind::Bulk, true);
    let http_closed = cell_of(WorkloadKind::Http, true);
    let h2 = cell_of(WorkloadKind::H2, true);
    let http_half = format!("http-c{SATURATION_CONNECTIONS}-50pct");
    let target = |what, a, b, cell: &Option<String>, metric, bound| {
        cell.clone().map(|cell| RatioTarget {
            what,
            a,
            b,
            cell,
            metric,
            bound,
        })
    };
    use Scenario::*;
    let targets = [
        target(
            "eBPF new connections/s",
            E1,
            I1,
            &crr,
            Metric::Throughput,
            NEW_CONNECTIONS_TARGET,
        ),
        target(
            "sidecar/HAProxy, opaque TCP: new connections/s",
            I1,
            H1,
            &crr,
            Metric::Throughput,
            1.0,
        ),
        target(
            "sidecar/HAProxy, opaque TCP: bulk Gbit/s",
            I1,
            H1,
            &bulk,
            Metric::Throughput,
            1.0,
        ),
        target(
            "sidecar/HAProxy, HTTP: keep-alive requests/s",
            I1Http,
            H1Http,
            &http_closed,
            Metric::Throughput,
            1.0,
        ),
        target(
            "sidecar/HAProxy, HTTP: h2c requests/s",
            I1Http,
            H1Http,
            &h2,
            Metric::Throughput,
            1.0,
        ),
        target(
            "sidecar/HAProxy, HTTP: new connections/s",
            I1Http,
            H1Http,
            &crr,
            Metric::Throughput,
            1.0,
        ),
        target(
            "sidecar/HAProxy, HTTP: p99 at 50% of B0's saturation",
            I1Http,
            H1Http,
            &Some(http_half),
            Metric::P99,
            1.0,
        ),
        target(
            "proxy/no proxy: bulk Gbit/s",
            P0,
            B0,
            &bulk,
            Metric::Throughput,
            DIRECT_SHARE_TARGET,
        ),
        target(
            "proxy/no proxy: new connections/s",
            P0,
            B0,
            &crr,
            Metric::Throughput,
            DIRECT_SHARE_TARGET,
        ),
        target(
            "mTLS/plaintext new connections/s (resumption)",
            E2Mtls,
            E2,
            &crr,
            Metric::Throughput,
            MTLS_NEW_CONNECTIONS_TARGET,
        ),
    ];
    for target in targets.into_iter().flatten() {
        if let Some(ratio) = summary.comparison(target.a, target.b, &target.cell, target.metric) {
            let _ = writeln!(rows, "{}", ratio_row(&target, ratio));
        }
    }
    if let Some(ratio) = ping_pong_overhead(bench, summary) {
        rows.push_str(&ratio);
    }
    footprint_rows(bench, &mut rows);
    if bench.scenarios.contains(&E1) && bench.scenarios.contains(&I1) {
        let worse = worse_cells(bench, summary);
        let _ = writeln!(
            rows,
            "| eBPF at least as good as iptables on every workload ({}) | {} | {} |",
            PAIRS.map(|(a, b)| format!("{a}/{b}")).join(", "),
            if worse.is_empty() {
                "no cell worse".to_owned()
            } else {
                worse.join("; ")
            },
            verdict(worse.is_empty(), || format!("{} cells worse", worse.len()))
        );
    }
    if rows.is_empty() {
        return rows;
    }
    let mut out = "\n## Targets\n\nRatios are medians of the per-repetition ratios [min–max].\n\n| target | measured | verdict |\n|---|---|---|\n".to_owned();
    out.push_str(&rows);
    out.push_str(&redirect_cost_note(summary));
    out
}

fn ratio_row(target: &RatioTarget, ratio: &Spread) -> String {
    let (a, b, bound) = (target.a, target.b, target.bound);
    let higher_is_better = target.metric == Metric::Throughput;
    let (sign, met, missed_by) = if higher_is_better {
        (
            "≥",
            ratio.median >= bound,
            (bound / ratio.median - 1.0) * 100.0,
        )
    } else {
        (
            "≤",
            ratio.median <= bound,
            (ratio.median / bound - 1.0) * 100.0,
        )
    };
    format!(
        "| {} ({a}/{b}, {}) {sign} {bound}x | {} | {} |",
        target.what,
        target.cell,
        ratio_text(ratio),
        verdict(met, || format!("missed by {missed_by:.0}%"))
    )
}

fn ping_pong_overhead(bench: &BenchRun, summary: &Summary) -> Option<String> {
    let ping_pong = bench
        .cells
        .iter()
        .find(|cell| cell.kind == WorkloadKind::PingPong)?;
    let ratio = summary.comparison(Scenario::E1, Scenario::P0, &ping_pong.id, Metric::P50)?;
    let overhead = ratio.median - 1.0;
    Some(format!(
        "| E1 − P0 ≤ {:.0}% of P0 at p50 (ping-pong) | {:+.1}% [{:+.1}% – {:+.1}%] | {} |\n",
        REDIRECT_OVERHEAD_TARGET * 100.0,
        overhead * 100.0,
        (ratio.min - 1.0) * 100.0,
        (ratio.max - 1.0) * 100.0,
        verdict(overhead <= REDIRECT_OVERHEAD_TARGET, || format!(
            "missed by {:.1} points",
            (overhead - REDIRECT_OVERHEAD_TARGET) * 100.0
        ))
    ))
}

/// E2-mTLS-http's proxies: peak RSS of the client's, and CPU per request of each (both
/// proxies' CPU halved) at the lowest open-loop HTTP load on 16 connections, the cell nearest
/// Istio's 1000 requests/s.
fn footprint_rows(bench: &BenchRun, rows: &mut String) {
    let scenario = Scenario::E2MtlsHttp;
    let summary = &bench.summary;
    if let Some(rss) = summary.proxy_peak_rss_kib.get(&scenario) {
        let mib = rss.median / 1024.0;
        let _ = writeln!(
            rows,
            "| proxy peak RSS with mTLS and HTTP ({scenario}) ≤ {PROXY_RSS_MIB_TARGET} MiB | {mib:.1} MiB | {} |",
            verdict(mib <= PROXY_RSS_MIB_TARGET, || format!(
                "missed by {:.0}%",
                (mib / PROXY_RSS_MIB_TARGET - 1.0) * 100.0
            ))
        );
    }
    let lowest_load = bench
        .cells
        .iter()
        .filter(|cell| cell.kind == WorkloadKind::Http && cell.load_percent.is_some())
        .filter(|cell| {
            cell.id
                .starts_with(&format!("http-c{SATURATION_CONNECTIONS}-"))
        })
        .min_by_key(|cell| cell.load_percent);
    let Some(cell) = lowest_load else {
        return;
    };
    let Some(cpu) = summary
        .cell(scenario, &cell.id)
        .and_then(|row| row.proxy_cpu_us_per_op)
    else {
        return;
    };
    let per_proxy = cpu.median / 2.0;
    let _ = writeln!(
        rows,
        "| CPU per proxy with mTLS and HTTP ({scenario}, {}) ≤ {PROXY_CPU_US_PER_REQUEST_TARGET} µs per request (0.05 vCPU per 1000 requests/s) | {per_proxy:.1} µs ({:.3} vCPU per 1000 requests/s) | {} |",
        cell.id,
        per_proxy / 1000.0,
        verdict(per_proxy <= PROXY_CPU_US_PER_REQUEST_TARGET, || format!(
            "missed by {:.0}%",
            (per_proxy / PROXY_CPU_US_PER_REQUEST_TARGET - 1.0) * 100.0
        ))
    );
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
