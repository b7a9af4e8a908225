//! What a person reads: one progress line per measurement while the bench runs, the Markdown
//! report of a run, and the headline table the README carries.

use std::{collections::BTreeMap, fmt::Write};

use sidecar_tests::tools::load::{Workload, histogram};

use super::{
    node_cost::NodeCost,
    profile,
    results::{BenchRun, Measurement},
    scenario::Scenario,
    summary::{COMPARISONS, CellSummary, Metric, Percentiles, Spread, SubsystemCost},
    targets,
    workload::{CRR_CONCURRENCY, Cell, PING_PONG_BYTES, WorkloadKind},
};

/// The HTTP cell the headline table shows, when it was run.
const HEADLINE_HTTP_CELL: &str = "http-c16-25pct";
/// Below this share of the offered rate, an open-loop cell measured a queue, not a latency.
const SATURATED: f64 = 0.97;

pub fn progress_line(label: &str, cell: &Cell, measurement: &Measurement) -> String {
    let report = &measurement.report;
    let seconds = report.elapsed_ns as f64 / 1e9;
    let mut line = format!("{label:<16} {:<16}", cell.id);
    if let Ok(latency) = histogram::decode(&report.latency)
        && cell.kind != WorkloadKind::Bulk
    {
        let micros = |q| latency.value_at_quantile(q) as f64 / 1000.0;
        let _ = write!(
            line,
            " p50 {:>7} µs  p99 {:>7} µs",
            num(micros(0.5)),
            num(micros(0.99))
        );
    }
    let cpu = measurement.cpu_usec.total() as f64;
    if cell.kind == WorkloadKind::Bulk {
        let gigabytes = report.bytes as f64 / 1e9;
        let _ = write!(
            line,
            " {:>6} Gbit/s  CPU {} ms/GB",
            num(gigabytes * 8.0 / seconds),
            num(cpu / 1000.0 / gigabytes)
        );
    } else {
        let operations = report.operations as f64;
        let _ = write!(
            line,
            "  {:>7}/s  CPU {} µs/{}",
            num(operations / seconds),
            num(cpu / operations),
            cell.kind.operation()
        );
    }
    if measurement.is_valid() {
        line.push_str("  ok");
    } else {
        let _ = write!(line, "  INVALID: {}", measurement.gate_failures.join("; "));
    }
    line
}

/// The HTTP cell the summary and the chart show: 16 connections at 25% if it ran, else the
/// first HTTP cell.
pub fn headline_http_cell(bench: &BenchRun) -> Option<&Cell> {
    let mut http = bench
        .cells
        .iter()
        .filter(|cell| cell.kind == WorkloadKind::Http && cell.load_percent.is_some());
    let first = http.clone().next();
    http.find(|cell| cell.id == HEADLINE_HTTP_CELL).or(first)
}

/// The README's summary: one row per scenario, the key number of each workload.
pub fn headline_table(bench: &BenchRun) -> String {
    let summary = &bench.summary;
    let http_cell = headline_http_cell(bench);
    let mut out = String::new();
    let http_title = http_cell.map_or_else(String::new, |cell| {
        format!(" {} p50 / p99 µs |", http_label(cell))
    });
    let _ = writeln!(
        out,
        "| scenario | ping-pong p50 / p99 µs |{http_title} HTTP/1.1 keep-alive requests/s | h2c requests/s | new connections/s | CPU µs per new connection | bulk Gbit/s | proxy peak RSS MiB |"
    );
    let columns = 8 + usize::from(http_cell.is_some());
    let closed = |kind: WorkloadKind| {
        bench
            .cells
            .iter()
            .find(|cell| cell.kind == kind && cell.load_percent.is_none())
            .map(|cell| cell.id.clone())
            .unwrap_or_default()
    };
    let (http_closed, h2_closed) = (closed(WorkloadKind::Http), closed(WorkloadKind::H2));
    let _ = writeln!(out, "|{}", "---|".repeat(columns));
    for &scenario in &bench.scenarios {
        let cell = |id: &str| summary.cell(scenario, id);
        let latency = |id: &str| {
            cell(id)
                .and_then(|c| c.latency_us)
                .map_or("–".to_owned(), |p| {
                    format!("{} / {}", num(p.p50), num(p.p99))
                })
        };
        let _ = write!(out, "| {scenario} | {} |", latency("ping-pong"));
        if let Some(http) = http_cell {
            let _ = write!(out, " {} |", latency(&http.id));
        }
        let crr = cell("crr");
        let _ = writeln!(
            out,
            " {} | {} | {} | {} | {} | {} |",
            spread(cell(&http_closed).and_then(|c| c.throughput)),
            spread(cell(&h2_closed).and_then(|c| c.throughput)),
            spread(crr.and_then(|c| c.throughput)),
            spread(crr.and_then(|c| c.cpu_us_per_op)),
            spread(cell("bulk").and_then(|c| c.throughput)),
            summary
                .proxy_peak_rss_kib
                .get(&scenario)
                .map_or("–".to_owned(), |rss| num(rss.median / 1024.0)),
        );
    }
    out
}

pub fn markdown(bench: &BenchRun) -> String {
    let meta = &bench.meta;
    let summary = &bench.summary;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# eBPF vs iptables redirection: {}, kernel {}\n",
        &meta.started_utc[..10],
        meta.kernel
    );
    if meta.quick {
        out.push_str("**Quick run** (`--quick`): short cells and few repetitions, to prove the harness works. Indicative only.\n\n");
    }
    let _ = writeln!(
        out,
        "`{}` at `{}`, {} to {}. {} × {}. {} repetitions, scenarios in a shuffled order per repetition (seed {}); {} ms warm-up and {} ms measured per cell. {}. Load average {} before, {} after (other work on the machine shows here). Method and caveats: docs/BENCHMARKS.md.\n",
        meta.command,
        meta.git_revision,
        meta.started_utc,
        meta.finished_utc,
        meta.cpus,
        meta.cpu_model,
        meta.reps,
        meta.seed,
        meta.timing.warmup_ms,
        meta.timing.duration_ms,
        meta.pinning,
        meta.load_average_before,
        meta.load_average_after,
    );
    out.push_str("| scenario | what |\n|---|---|\n");
    for scenario in &bench.scenarios {
        let _ = writeln!(out, "| {scenario} | {} |", scenario.description());
    }
    out.push_str("\nTimes in µs; a value with brackets is the median of the repetitions [min–max]; percentiles come from the histograms of all repetitions merged.\n\n## Summary\n\n");
    out.push_str(&headline_table(bench));
    out.push_str(&targets::section(bench));

    for cell in &bench.cells {
        let rows: Vec<&CellSummary> = bench
            .scenarios
            .iter()
            .filter_map(|&scenario| summary.cell(scenario, &cell.id))
            .collect();
        match cell.kind {
            WorkloadKind::PingPong => {
                let _ = writeln!(
                    out,
                    "\n## Request/response on one connection ({PING_PONG_BYTES} B ping-pong, closed loop)\n"
                );
                out.push_str("| scenario | p50 | p90 | p99 | p99.9 | round trips/s | CPU µs per round trip (all cgroups) | proxies CPU µs |\n|---|---|---|---|---|---|---|---|\n");
                for row in rows {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} | {} |",
                        row.scenario,
                        percentiles(row.latency_us),
                        spread(row.throughput),
                        spread(row.cpu_us_per_op),
                        spread(row.proxy_cpu_us_per_op)
                    );
                }
            }
            WorkloadKind::Http | WorkloadKind::H2 if cell.load_percent.is_none() => {
                let _ = writeln!(out, "\n## {}\n", closed_http_title(cell));
                out.push_str("| scenario | requests/s | p50 | p90 | p99 | p99.9 | CPU µs per request | proxies CPU µs |\n|---|---|---|---|---|---|---|---|\n");
                for row in rows {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} | {} |",
                        row.scenario,
                        spread(row.throughput),
                        percentiles(row.latency_us),
                        spread(row.cpu_us_per_op),
                        spread(row.proxy_cpu_us_per_op)
                    );
                }
            }
            WorkloadKind::Http | WorkloadKind::H2 => {
                let baseline = summary
                    .cell(Scenario::B0, &cell.id)
                    .and_then(|c| c.latency_us);
                let _ = writeln!(
                    out,
                    "\n## HTTP, {}, open loop, 1 KiB responses\n\nOffered {} requests/s; latency from each request's intended send time (coordinated omission corrected). A scenario marked saturated could not keep up: its latency is the growth of a queue over the cell, and its achieved rate is its capacity.\n",
                    http_label(cell),
                    cell_rate(cell).map_or("?".to_owned(), num)
                );
                out.push_str("| scenario | achieved requests/s | p50 | p90 | p99 | p99.9 | added p50 / p99 over B0 | CPU µs per request | proxies CPU µs |\n|---|---|---|---|---|---|---|---|---|\n");
                for row in rows {
                    let added = match (row.latency_us, baseline) {
                        (Some(own), Some(base)) => {
                            format!("{:+.1} / {:+.1}", own.p50 - base.p50, own.p99 - base.p99)
                        }
                        _ => "–".to_owned(),
                    };
                    let saturated = match (row.throughput, row.offered_rate) {
                        (Some(achieved), Some(offered))
                            if achieved.median < SATURATED * offered =>
                        {
                            " (saturated)"
                        }
                        _ => "",
                    };
                    let _ = writeln!(
                        out,
                        "| {} | {}{saturated} | {} | {added} | {} | {} |",
                        row.scenario,
                        spread(row.throughput),
                        percentiles(row.latency_us),
                        spread(row.cpu_us_per_op),
                        spread(row.proxy_cpu_us_per_op)
                    );
                }
            }
            WorkloadKind::Crr => {
                let _ = writeln!(
                    out,
                    "\n## New connection per request ({CRR_CONCURRENCY} closed loops, HTTP/1.1 with `Connection: close`)\n"
                );
                out.push_str("| scenario | connections/s | connect p50 | connect p99 | request p50 | request p99 | CPU µs per connection | proxies CPU µs |\n|---|---|---|---|---|---|---|---|\n");
                for row in rows {
                    let pair = |p: Option<Percentiles>| {
                        p.map_or("– | –".to_owned(), |p| {
                            format!("{} | {}", num(p.p50), num(p.p99))
                        })
                    };
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} | {} | {} |",
                        row.scenario,
                        spread(row.throughput),
                        pair(row.connect_latency_us),
                        pair(row.latency_us),
                        spread(row.cpu_us_per_op),
                        spread(row.proxy_cpu_us_per_op)
                    );
                }
            }
            WorkloadKind::Bulk => {
                out.push_str("\n## Bulk throughput (one connection, client to server)\n\n| scenario | Gbit/s | CPU ms per GB | proxies CPU ms per GB |\n|---|---|---|---|\n");
                let millis = |s: Option<Spread>| {
                    s.map(|s| Spread {
                        median: s.median / 1000.0,
                        min: s.min / 1000.0,
                        max: s.max / 1000.0,
                        count: s.count,
                    })
                };
                for row in rows {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} |",
                        row.scenario,
                        spread(row.throughput),
                        spread(millis(row.cpu_us_per_op)),
                        spread(millis(row.proxy_cpu_us_per_op))
                    );
                }
            }
        }
    }

    if !summary.comparisons.is_empty() {
        out.push_str("\n## Ratios within a repetition\n\na/b computed in each repetition, then median [min–max]. Throughput above 1 favours a; latency and CPU below 1 favour a.\n\n| a/b | cell | throughput | p50 latency | p99 latency | CPU per op |\n|---|---|---|---|---|---|\n");
        for (a, b) in COMPARISONS {
            for cell in &bench.cells {
                let ratio = |metric| {
                    summary
                        .comparison(a, b, &cell.id, metric)
                        .map_or("–".to_owned(), |r| ratio(*r))
                };
                if summary
                    .comparison(a, b, &cell.id, Metric::Throughput)
                    .is_none()
                {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "| {a}/{b} | {} | {} | {} | {} | {} |",
                    cell.id,
                    ratio(Metric::Throughput),
                    ratio(Metric::P50),
                    ratio(Metric::P99),
                    ratio(Metric::CpuPerOp)
                );
            }
        }
    }

    if !summary.bpf_programs.is_empty() {
        out.push_str("\n## BPF programs (separate run with `kernel.bpf_stats_enabled=1`)\n\nPer operation of the cell: a round trip, a request, or a connection. Each connection runs connect4 twice (the app's connect, redirected; the proxy's own, exempted by its UID).\n\n| scenario | cell | program | runs per op | ns per run | ns per op |\n|---|---|---|---|---|---|\n");
        for cost in &summary.bpf_programs {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                cost.scenario,
                cost.cell,
                cost.program,
                num(cost.runs_per_op),
                num(cost.ns_per_run),
                num(cost.ns_per_op)
            );
        }
    }

    subsystems_section(&mut out, &summary.subsystems);
    if let Some(cost) = &bench.node_cost {
        node_cost_section(&mut out, cost);
    }

    out.push_str("\n## Validity\n\n");
    let measured: usize = bench.runs.iter().map(|run| run.measurements.len()).sum();
    if summary.failures.is_empty() {
        let _ = writeln!(
            out,
            "All {} scenario runs and {measured} measurements passed the gates: no errors, every connection reached the dialled destination, the proxy's connection counter (and for eBPF the kernel's `redirected`/`orig_dst_served` counters) equal to the connections the load generator opened, and for eBPF no original-destination handoff entry left behind.",
            bench.runs.len()
        );
    } else {
        out.push_str("Excluded from every number above:\n\n");
        for failure in &summary.failures {
            let _ = writeln!(out, "- {failure}");
        }
    }
    out
}

fn node_cost_section(out: &mut String, cost: &NodeCost) {
    let kib = |bytes: f64| format!("{:.1}", bytes / 1024.0);
    let _ = write!(
        out,
        "\n## Kernel memory per captured pod at idle\n\n{} pods with their network namespace and cgroup, before and after capture; the kernel's own allocations (`Slab + VmallocUsed + Percpu` in /proc/meminfo, where BPF maps and programs, netfilter rules and namespaces all live) are measured the same way for both. BPF memlock is the figure `sidecar status` reports (the node-wide log ring, 144 KiB once per node, excluded).\n\n| capture | kernel allocations per pod (KiB) | BPF memlock per pod (KiB) |\n|---|---|---|\n| eBPF | {} | {} |\n| iptables | {} | — |\n",
        cost.pods,
        kib(cost.ebpf_kernel_bytes_per_pod as f64),
        kib(cost.ebpf_memlock_bytes_per_pod as f64),
        kib(cost.iptables_kernel_bytes_per_pod as f64),
    );
    match cost.conntrack_entry_bytes {
        Some(bytes) => {
            let _ = writeln!(
                out,
                "\nPer connection, iptables capture also holds a conntrack entry ({bytes} bytes, `nf_conntrack` in /proc/slabinfo) while it lives and for two minutes after it closes (TIME_WAIT); eBPF capture holds two socket-storage entries, freed with the sockets."
            );
        }
        None => out.push_str(
            "\nThe conntrack entry size could not be read (`nf_conntrack` not listed in /proc/slabinfo: merged with another cache).\n",
        ),
    }
}

/// The heading of a closed-loop HTTP cell: how many requests are in flight, and how.
fn closed_http_title(cell: &Cell) -> String {
    match cell.workload {
        Workload::H2 {
            connections,
            streams,
        } => format!(
            "HTTP/2 (h2c) keep-alive, closed loop: h2load, {connections} connections × {streams} streams, 1 KiB responses"
        ),
        Workload::Http { connections, .. } => format!(
            "HTTP/1.1 keep-alive, closed loop: {connections} connections, each sending its next request when the last is answered, 1 KiB responses"
        ),
        _ => cell.id.clone(),
    }
}

fn http_label(cell: &Cell) -> String {
    match (&cell.workload, cell.load_percent) {
        (Workload::Http { connections, .. }, Some(percent)) => {
            format!("{connections} conn @ {percent}% of B0 saturation")
        }
        _ => cell.id.clone(),
    }
}

fn cell_rate(cell: &Cell) -> Option<f64> {
    match cell.workload {
        Workload::Http { rate, .. } => rate,
        _ => None,
    }
}

fn percentiles(p: Option<Percentiles>) -> String {
    p.map_or("– | – | – | –".to_owned(), |p| {
        format!(
            "{} | {} | {} | {}",
            num(p.p50),
            num(p.p90),
            num(p.p99),
            num(p.p999)
        )
    })
}

fn spread(s: Option<Spread>) -> String {
    match s {
        None => "–".to_owned(),
        Some(s) if s.count == 1 => num(s.median),
        Some(s) => format!("{} [{}–{}]", num(s.median), num(s.min), num(s.max)),
    }
}

fn ratio(s: Spread) -> String {
    format!("{:.3} [{:.3}–{:.3}]", s.median, s.min, s.max)
}

/// Three significant digits at most, no exponent.
pub fn num(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// Columns of the subsystem table beyond which categories are summed into "rest".
const SUBSYSTEM_COLUMNS: usize = 8;

/// CPU µs per new connection by kernel subsystem, one row per scenario.
fn subsystems_section(out: &mut String, costs: &[SubsystemCost]) {
    if costs.is_empty() {
        return;
    }
    let mut largest: BTreeMap<&str, f64> = BTreeMap::new();
    for cost in costs {
        for (category, us) in &cost.us_per_op {
            let entry = largest.entry(category.as_str()).or_default();
            *entry = entry.max(*us);
        }
    }
    // The two subsystems a redirect lives in always show; then the largest others.
    let mut columns = vec![profile::NETFILTER, profile::BPF];
    let mut others: Vec<&str> = largest
        .keys()
        .copied()
        .filter(|category| !columns.contains(category))
        .collect();
    others.sort_by(|a, b| largest[b].total_cmp(&largest[a]));
    columns.extend(others.into_iter().take(SUBSYSTEM_COLUMNS - columns.len()));
    out.push_str("\n## Where the CPU time goes (separate run under `perf record -a`)\n\nCPU µs per operation of every cgroup (`cpu.stat`), split by where `perf` (cpu-clock, 999 Hz, call chains) found both CPUs busy: each sample goes to the first kernel subsystem on its call chain from the leaf up (locks, copies and allocations count for their caller), or to the user-space program it was in. The differences between scenarios in one column are what each redirect costs.\n\n");
    let _ = writeln!(
        out,
        "| scenario | cell | samples | total | {} | rest |",
        columns.join(" | ")
    );
    let _ = writeln!(out, "|---|---|---|---|{}---|", "---|".repeat(columns.len()));
    for cost in costs {
        let shown: Vec<f64> = columns
            .iter()
            .map(|column| cost.us_per_op.get(*column).copied().unwrap_or(0.0))
            .collect();
        let rest = cost.cpu_us_per_op - shown.iter().sum::<f64>();
        let cells: Vec<String> = shown.iter().map(|us| num(*us)).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            cost.scenario,
            cost.cell,
            cost.samples,
            num(cost.cpu_us_per_op),
            cells.join(" | "),
            num(rest.max(0.0))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_numbers_and_spreads() {
        assert_eq!(num(12345.6), "12346");
        assert_eq!(num(45.67), "45.7");
        assert_eq!(num(0.1234), "0.12");
        let one = Spread {
            median: 2.0,
            min: 2.0,
            max: 2.0,
            count: 1,
        };
        assert_eq!(spread(Some(one)), "2.00");
        let many = Spread {
            median: 2.0,
            min: 1.0,
            max: 30.0,
            count: 3,
        };
        assert_eq!(spread(Some(many)), "2.00 [1.00–30.0]");
    }
}
