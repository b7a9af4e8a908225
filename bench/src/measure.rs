//! One scenario run: a fresh lab, every cell measured in order, each checked by the
//! correctness gates.
//!
//! Per cell: the load generator warms up, then pauses while the CPU counters (and BPF run
//! statistics in the profiling pass) are read, then measures; the counters are read again once
//! it has exited. So the costs cover exactly the measured phase and the connections' teardown.
//! In the perf pass, `perf record -a` covers the measured phase the same way.

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sidecar_common::Counter;
use sidecar_tests::{
    LabProcess,
    tools::load::{LoadReport, LoadSpec, WARM_LINE, Workload, client::report_from_output},
};

use super::{
    h2load,
    metrics::{self, BpfRunStats},
    profile,
    results::{Measurement, ScenarioRun},
    scenario::{Binaries, CLIENT_CPU, SERVER_CPU, Scenario, ScenarioLab},
    workload::Cell,
};

/// What a scenario run measures besides the load generator's report and the CPU counters.
/// Each profiler costs time, so it runs in a pass of its own, never in a timed run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profiling {
    None,
    /// Per-program run counts and times (`kernel.bpf_stats_enabled=1`).
    BpfStats,
    /// `perf record -a` of both pods' CPUs, by kernel subsystem.
    Perf,
}

/// Slack on top of a cell's own warm-up and duration before the load generator is killed.
const LOAD_CLIENT_SLACK: Duration = Duration::from_secs(30);
/// How long closing connections get to leave the original-destination index.
const INDEX_SETTLE: Duration = Duration::from_secs(2);

/// Where a scenario run sits in the bench: repetition (None for calibration and profiling)
/// and position in that repetition's shuffled order.
#[derive(Clone, Copy)]
pub struct Slot {
    pub rep: Option<usize>,
    pub position: usize,
}

/// Runs `cells` in a fresh lab for `scenario`; a failure to set up the lab is recorded in the
/// run, not returned, so the other scenarios still run.
pub fn run_scenario(
    scenario: Scenario,
    slot: Slot,
    bins: &Binaries,
    cells: &[Cell],
    profiling: Profiling,
    mut progress: impl FnMut(&Cell, &Measurement),
) -> ScenarioRun {
    let mut run = ScenarioRun {
        scenario,
        rep: slot.rep,
        position: slot.position,
        proxy_peak_rss_kib: None,
        measurements: Vec::new(),
        error: None,
    };
    let result = (|| -> Result<()> {
        let lab = ScenarioLab::start(scenario, bins)?;
        let cells = cells.iter().filter(|cell| scenario.runs(cell.kind));
        for (index, cell) in cells.enumerate() {
            let measurement = measure_cell(&lab, index, cell, profiling)
                .with_context(|| format!("{scenario} {}", cell.id))?;
            progress(cell, &measurement);
            run.measurements.push(measurement);
        }
        run.proxy_peak_rss_kib = lab.proxy_peak_rss_kib()?;
        lab.finish()
    })();
    if let Err(error) = result {
        run.error = Some(format!("{error:#}"));
    }
    run
}

fn measure_cell(
    lab: &ScenarioLab,
    index: usize,
    cell: &Cell,
    profiling: Profiling,
) -> Result<Measurement> {
    let start_file = lab.dir().join(format!("start-{index}"));
    let spec = LoadSpec {
        workload: cell.workload.clone(),
        connect_to: lab.connect_to(),
        expect_server: lab.server_addr(),
        warmup_ms: cell.warmup_ms,
        duration_ms: cell.duration_ms,
        start_file: Some(start_file),
    };
    let proxied_before = lab.proxy_connections()?;
    let server_proxied_before = lab.server_proxy_connections()?;
    let kernel_before = lab.capture_counters()?;
    let server_kernel_before = lab.server_capture_counters()?;
    let index_before = lab.orig_dst_index_entries()?;
    let profile_bpf = profiling == Profiling::BpfStats;
    let programs = if profile_bpf {
        lab.bpf_programs()?
    } else {
        Vec::new()
    };

    let load = WarmLoad::start(lab, index, cell, &spec)?;
    // The load is paused here: nothing is in flight while the counters are read.
    let requests_before = lab.proxy_requests()?;
    let cpu_before = lab.cpu_usage()?;
    let bpf_before = if profile_bpf {
        metrics::bpf_run_stats()?
    } else {
        BTreeMap::new()
    };
    let perf_data = lab.dir().join(format!("perf-{index}.data"));
    let recording = match profiling {
        Profiling::Perf => Some(profile::Recording::start(&perf_data)?),
        _ => None,
    };
    let report = load.measure(lab, cell);
    let cpu_usec = lab.cpu_usage()?.since(cpu_before);
    let perf = match recording {
        Some(recording) => {
            recording.stop()?;
            let profile = profile::summarize(&perf_data, &[CLIENT_CPU, SERVER_CPU])?;
            let _ = fs::remove_file(&perf_data);
            Some(profile)
        }
        None => None,
    };
    let bpf_after = if profile_bpf {
        metrics::bpf_run_stats()?
    } else {
        BTreeMap::new()
    };
    let report = report?;
    let proxy_requests = delta(requests_before, lab.proxy_requests()?);
    let proxy_connections = delta(proxied_before, lab.proxy_connections()?);
    let server_proxy_connections = delta(server_proxied_before, lab.server_proxy_connections()?);
    let kernel_counters = counters_delta(kernel_before, lab.capture_counters()?);
    let server_kernel_counters =
        counters_delta(server_kernel_before, lab.server_capture_counters()?);
    let orig_dst_index_growth = match index_before {
        Some(before) => Some(index_growth(lab, before)?),
        None => None,
    };
    let bpf = profile_bpf.then(|| {
        programs
            .iter()
            .map(|(name, id)| {
                let after = bpf_after.get(id).copied().unwrap_or_default();
                let before = bpf_before.get(id).copied().unwrap_or_default();
                (name.clone(), after.since(before))
            })
            .collect::<BTreeMap<String, BpfRunStats>>()
    });
    let mut measurement = Measurement {
        cell: cell.id.clone(),
        report,
        cpu_usec,
        proxy_connections,
        server_proxy_connections,
        proxy_requests,
        kernel_counters,
        server_kernel_counters,
        orig_dst_index_growth,
        bpf,
        perf,
        gate_failures: Vec::new(),
    };
    measurement.gate_failures = gate_failures(&measurement, lab.scenario);
    Ok(measurement)
}

/// A cell's load generator once warmed up, paused before its measured phase.
enum WarmLoad {
    /// labtool's client, waiting for its start file.
    Labtool {
        client: LabProcess,
        start_file: PathBuf,
    },
    /// h2load's warm-up run is over; the measured run starts afresh.
    H2load {
        connections: usize,
        streams: usize,
        log_file: PathBuf,
    },
}

impl WarmLoad {
    fn start(lab: &ScenarioLab, index: usize, cell: &Cell, spec: &LoadSpec) -> Result<WarmLoad> {
        let warmup = Duration::from_millis(cell.warmup_ms);
        if let Workload::H2 {
            connections,
            streams,
        } = cell.workload
        {
            let args = h2load::args(&lab.url(), connections, streams, warmup, None);
            let warm = lab.h2load(&args).spawn()?;
            let status = warm.wait(warmup + LOAD_CLIENT_SLACK)?;
            if !status.success() {
                bail!(
                    "h2load's warm-up exited with {status}: {}",
                    warm.stderr_text().trim()
                );
            }
            return Ok(WarmLoad::H2load {
                connections,
                streams,
                log_file: lab.dir().join(format!("h2load-{index}.log")),
            });
        }
        let start_file = spec
            .start_file
            .clone()
            .context("labtool needs a start file")?;
        let client = lab.load_client(&serde_json::to_string(spec)?).spawn()?;
        client.wait_for_stdout(WARM_LINE, warmup + LOAD_CLIENT_SLACK)?;
        Ok(WarmLoad::Labtool { client, start_file })
    }

    /// Runs the measured phase to its end and reads the generator's report.
    fn measure(self, lab: &ScenarioLab, cell: &Cell) -> Result<LoadReport> {
        let duration = Duration::from_millis(cell.duration_ms);
        match self {
            WarmLoad::Labtool { client, start_file } => {
                fs::write(&start_file, b"")?;
                let status = client.wait(duration + LOAD_CLIENT_SLACK)?;
                if !status.success() {
                    bail!(
                        "the load generator exited with {status}: {}",
                        client.stderr_text().trim()
                    );
                }
                report_from_output(&client.stdout_text())
            }
            WarmLoad::H2load {
                connections,
                streams,
                log_file,
            } => {
                let args =
                    h2load::args(&lab.url(), connections, streams, duration, Some(&log_file));
                let measured = lab.h2load(&args).spawn()?;
                let status = measured.wait(duration + LOAD_CLIENT_SLACK)?;
                if !status.success() {
                    bail!(
                        "h2load exited with {status}: {}",
                        measured.stderr_text().trim()
                    );
                }
                // The warm-up run opened as many connections as the measured one.
                let report =
                    h2load::report(&measured.stdout_text(), &log_file, 2 * connections as u64);
                let _ = fs::remove_file(&log_file);
                report
            }
        }
    }
}

/// How many more index entries there are than `before`, once the closes of the cell's last
/// connections have had time to complete.
fn index_growth(lab: &ScenarioLab, before: usize) -> Result<u64> {
    let deadline = Instant::now() + INDEX_SETTLE;
    loop {
        let grown = lab
            .orig_dst_index_entries()?
            .unwrap_or(before)
            .saturating_sub(before);
        if grown == 0 || Instant::now() >= deadline {
            return Ok(grown as u64);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn delta(before: Option<u64>, after: Option<u64>) -> Option<u64> {
    Some(after?.saturating_sub(before?))
}

fn counters_delta(
    before: Option<BTreeMap<String, u64>>,
    after: Option<BTreeMap<String, u64>>,
) -> Option<BTreeMap<String, u64>> {
    let before = before?;
    Some(
        after?
            .into_iter()
            // A counter missing from either reading is left out: the gates then name it.
            .filter_map(|(name, value)| {
                let since = value.saturating_sub(*before.get(&name)?);
                Some((name, since))
            })
            .collect(),
    )
}

/// Everything that makes a measurement untrustworthy: errors (the load generator also fails
/// any connection whose server saw another destination than the one dialled), proxy or kernel
/// counters that disagree with the connections the load generator opened (with the sockmap
/// shortcut: both ends of each loopback hop must have entered it), and, where the proxies
/// parse HTTP, a measured request the client's proxy did not count as one.
fn gate_failures(measurement: &Measurement, scenario: Scenario) -> Vec<String> {
    let report = &measurement.report;
    let connections = report.connections;
    let mut failures = Vec::new();
    if report.errors > 0 {
        failures.push(format!(
            "{} errors, first: {}",
            report.errors,
            report.first_error.as_deref().unwrap_or("?")
        ));
    }
    if report.operations == 0 {
        failures.push("no operation completed".to_owned());
    }
    if let Some(proxied) = measurement.proxy_connections
        && proxied != connections
    {
        failures.push(format!(
            "the proxy counted {proxied} connections, the load generator opened {connections}"
        ));
    }
    // An HTTP-aware client proxy pools its upstream connections (a cell may reuse the last
    // cell's), so the server's proxy sees fewer connections than the app opened; the server
    // pod's kernel counters are checked against the proxy's own count.
    let server_connections = if scenario.http_aware() {
        measurement.server_proxy_connections.unwrap_or(0)
    } else {
        connections
    };
    if let Some(proxied) = measurement.server_proxy_connections
        && !scenario.http_aware()
        && proxied != connections
    {
        failures.push(format!(
            "the server's proxy counted {proxied} connections, the load generator opened {connections}"
        ));
    }
    if let Some(requests) = measurement.proxy_requests
        && requests < report.operations
    {
        failures.push(format!(
            "the proxy counted {requests} HTTP requests, fewer than the {} measured",
            report.operations
        ));
    }
    let shortcut = scenario.sockmap_shortcut();
    let mut check_counters = |pod: &str,
                              counters: &BTreeMap<String, u64>,
                              expected: u64,
                              equal: &[Counter],
                              zero: &[Counter]| {
        let mut check =
            |counter: Counter, wanted: u64, what: &str| match counters.get(counter.name()) {
                Some(&value) if value == wanted => {}
                Some(value) => failures.push(format!(
                    "{pod} kernel counter {} = {value}, expected {what}",
                    counter.name()
                )),
                None => failures.push(format!(
                    "{pod} kernel counter {} is not in `sidecar status --json` (has {:?})",
                    counter.name(),
                    counters.keys().collect::<Vec<_>>()
                )),
            };
        for &counter in equal {
            check(counter, expected, &expected.to_string());
        }
        if shortcut {
            check(
                Counter::ShortcutSockets,
                2 * expected,
                &format!("2 per connection ({expected} connections)"),
            );
        }
        for &counter in zero {
            check(counter, 0, "0");
        }
    };
    if let Some(counters) = &measurement.kernel_counters {
        let equal = [Counter::Redirected, Counter::OrigDstServed];
        // The proxy was there for every connect: none refused or sent direct for its absence.
        let zero = [
            Counter::Errors,
            Counter::OrigDstMissing,
            Counter::OutboundNoProxyRefused,
            Counter::OutboundNoProxyDirect,
        ];
        check_counters("client", counters, connections, &equal, &zero);
    }
    if let Some(counters) = &measurement.server_kernel_counters {
        let zero = [Counter::Errors, Counter::InboundNoProxy];
        let equal = [Counter::InboundRedirected];
        check_counters("server", counters, server_connections, &equal, &zero);
    }
    if let Some(grown) = measurement.orig_dst_index_growth
        && grown > 0
    {
        failures.push(format!(
            "{grown} original-destination handoff entries outlived their handshakes"
        ));
    }
    failures
}
