//! The benchmark: eBPF against iptables redirection, side by side, following
//! docs/BENCHMARKS.md: the same release binaries and proxy configuration in every scenario,
//! CPU-pinned pods, warm-up, repetitions with scenarios interleaved in a seeded shuffled order,
//! correctness gates, histograms merged before percentiles, ratios taken within a repetition.
//! `cargo xtask bench` calls [`run`] with its options, its setup and its release build.
//!
//! - `scenario`: what each scenario installs, and the lab it runs in;
//! - `workload`: the workloads and their settings (cells);
//! - `measure`: one scenario run, cell by cell, with the gates;
//! - `metrics`: CPU time, RSS, Prometheus and BPF statistics read from the kernel;
//! - `haproxy`: the peer proxy's configuration and counters;
//! - `h2load`: the HTTP/2 workload's load generator (nghttp2's h2load) and its report;
//! - `summary`: from measurements to medians, percentiles and ratios;
//! - `profile`: perf recordings summarised by kernel subsystem (the "why" of the ratios);
//! - `node_cost`: kernel memory per captured pod at idle, eBPF against iptables;
//! - `report`, `chart`: the Markdown table and the SVG chart;
//! - `targets`: the performance targets, checked in every results file;
//! - `system`: root, packages, sysctls, facts about the host.
mod chart;
mod h2load;
mod haproxy;
mod measure;
mod mesh;
mod metrics;
mod node_cost;
mod profile;
mod report;
mod results;
mod scenario;
mod summary;
mod system;
mod targets;
mod workload;

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};

use self::{
    measure::{Profiling, Slot, run_scenario},
    results::{BenchRun, Meta, ScenarioRun},
    scenario::{Binaries, CLIENT_CPU, SERVER_CPU, Scenario},
    workload::{Cell, Timing, WorkloadKind},
};

#[derive(Args)]
pub struct BenchOptions {
    /// Short cells, 2 repetitions, HTTP on 16 connections at one load: proves the harness
    /// works (CI) in about a minute after the build; the numbers are only indicative.
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of every scenario [default: 5; --quick: 2].
    #[arg(long)]
    pub reps: Option<usize>,
    /// Scenarios to run, comma separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Scenario::ALL)]
    pub scenarios: Vec<Scenario>,
    /// Workloads to run, comma separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = WorkloadKind::ALL)]
    pub workloads: Vec<WorkloadKind>,
    /// HTTP offered loads in percent of B0's closed-loop saturation [default: 10,25,50;
    /// --quick: 25].
    #[arg(long, value_delimiter = ',')]
    pub http_loads: Vec<u32>,
    /// Measured milliseconds per cell and run [default: 3000; --quick: 300].
    #[arg(long)]
    pub duration_ms: Option<u64>,
    /// Seed of the scenario shuffle [default: from the clock; recorded in the results].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where the results go [default: bench/results].
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

struct Settings {
    reps: usize,
    http_connections: &'static [usize],
    timing: Timing,
    http_loads: Vec<u32>,
    seed: u64,
    scenarios: Vec<Scenario>,
    workloads: Vec<WorkloadKind>,
}

impl Settings {
    fn from(opts: &BenchOptions) -> Settings {
        let timing = if opts.quick {
            Timing {
                warmup_ms: 100,
                duration_ms: 300,
            }
        } else {
            Timing {
                warmup_ms: 1000,
                duration_ms: 3000,
            }
        };
        // Lower than bench.md's 25/50/75: the open-loop generator costs more per request than the
        // closed loop that measures saturation, so 50% already saturates every proxied scenario.
        let default_loads: &[u32] = if opts.quick { &[25] } else { &[10, 25, 50] };
        let seed = opts.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_nanos() as u64)
        });
        Settings {
            reps: opts.reps.unwrap_or(if opts.quick { 2 } else { 5 }),
            http_connections: if opts.quick {
                &workload::QUICK_HTTP_CONNECTIONS
            } else {
                &workload::HTTP_CONNECTIONS
            },
            timing: Timing {
                duration_ms: opts.duration_ms.unwrap_or(timing.duration_ms),
                ..timing
            },
            http_loads: if opts.http_loads.is_empty() {
                default_loads.to_vec()
            } else {
                opts.http_loads.clone()
            },
            seed,
            scenarios: in_order(&Scenario::ALL, &opts.scenarios),
            workloads: in_order(&WorkloadKind::ALL, &opts.workloads),
        }
    }
}

/// `chosen` in the order of `all` (the order tables use), whatever order they were given in.
fn in_order<T: Copy + PartialEq>(all: &[T], chosen: &[T]) -> Vec<T> {
    all.iter()
        .copied()
        .filter(|item| chosen.contains(item))
        .collect()
}

/// What the bench needs of the task runner that calls it (`cargo xtask bench`).
pub struct TaskRunner<'a> {
    /// Installs what the machine lacks (`cargo xtask setup`).
    pub setup: &'a dyn Fn() -> Result<()>,
    /// Builds the BPF object and the release binaries; returns their directory.
    pub build_release: &'a dyn Fn() -> Result<PathBuf>,
}

/// Runs the bench with `opts` and writes its results (by default in `bench/results/`).
pub fn run(opts: &BenchOptions, runner: &TaskRunner<'_>) -> Result<()> {
    let began = Instant::now();
    (runner.setup)()?;
    system::require_root()?;
    let settings = Settings::from(opts);
    // perf: where the CPU time goes, by kernel subsystem (`profile`).
    system::install_debian_packages(&["linux-perf"])?;
    if settings
        .scenarios
        .iter()
        .any(|scenario| scenario.uses_haproxy())
    {
        system::install_debian_packages(&["haproxy"])?;
    }
    if settings.workloads.contains(&WorkloadKind::H2) {
        system::install_debian_packages(&["nghttp2-client"])?;
    }
    let profile_dir = (runner.build_release)()?;
    let bins = Binaries {
        sidecar: profile_dir.join("sidecar"),
        labtool: profile_dir.join("labtool"),
    };
    let kernel = system::kernel_release()?;
    let started_utc = system::utc_now();
    let load_average_before = system::load_average();
    println!(
        "\nbench: kernel {kernel}, {} CPUs ({}), load {load_average_before}",
        system::cpus(),
        system::cpu_model()
    );
    println!(
        "bench: scenarios {:?}, {} repetitions, seed {}, {} ms warm-up + {} ms per cell",
        settings.scenarios,
        settings.reps,
        settings.seed,
        settings.timing.warmup_ms,
        settings.timing.duration_ms
    );

    // Off for the timed runs (statistics cost time on every program run), on for profiling.
    let bpf_stats = system::SysctlGuard::hold("kernel/bpf_stats_enabled")?;
    bpf_stats.set("0")?;

    let (http_saturation, calibration_run) = calibrate(&settings, &bins)?;
    let cells = workload::plan(
        &settings.workloads,
        &settings.http_loads,
        &http_saturation,
        settings.timing,
    );

    let mut rng = StdRng::seed_from_u64(settings.seed);
    let mut orders = Vec::new();
    let mut runs = Vec::new();
    let total = settings.reps * settings.scenarios.len();
    for rep in 0..settings.reps {
        let mut order = settings.scenarios.clone();
        order.shuffle(&mut rng);
        println!(
            "\nbench: repetition {}/{}: {order:?}",
            rep + 1,
            settings.reps
        );
        for (position, &scenario) in order.iter().enumerate() {
            let slot = Slot {
                rep: Some(rep),
                position,
            };
            let label = format!("[{}/{total}] {scenario}", runs.len() + 1);
            runs.push(run_scenario(
                scenario,
                slot,
                &bins,
                &cells,
                Profiling::None,
                |cell, m| println!("{}", report::progress_line(&label, cell, m)),
            ));
            print_run_error(runs.last());
        }
        orders.push(order);
    }

    let mut bpf_profile_runs = Vec::new();
    let profiled: Vec<Scenario> = settings
        .scenarios
        .iter()
        .copied()
        .filter(|scenario| scenario.uses_ebpf())
        .collect();
    if !profiled.is_empty() {
        bpf_stats.set("1")?;
        // Per round trip, per request and per connection; bulk adds nothing a connection does not.
        let profiled_kinds = [
            WorkloadKind::PingPong,
            WorkloadKind::Http,
            WorkloadKind::Crr,
        ];
        let first_of_each_kind: Vec<Cell> = profiled_kinds
            .iter()
            .filter_map(|kind| cells.iter().find(|cell| cell.kind == *kind).cloned())
            .collect();
        println!("\nbench: BPF program costs (kernel.bpf_stats_enabled=1, not timed)");
        bpf_profile_runs = profiling_pass(
            &profiled,
            &bins,
            &first_of_each_kind,
            Profiling::BpfStats,
            "profile",
        );
    }
    drop(bpf_stats);

    // Where each scenario's CPU time goes per new connection: the explanation of the ratios.
    let mut perf_profile_runs = Vec::new();
    if let Some(crr) = cells.iter().find(|cell| cell.kind == WorkloadKind::Crr) {
        println!("\nbench: CPU time by kernel subsystem (perf record -a, not timed)");
        perf_profile_runs = profiling_pass(
            &settings.scenarios,
            &bins,
            std::slice::from_ref(crr),
            Profiling::Perf,
            "perf",
        );
    }

    println!("\nbench: kernel memory per captured pod at idle (not timed)");
    let node_cost = node_cost::measure(&bins.sidecar).context("measuring kernel memory per pod")?;

    let summary = summary::summarize(
        &settings.scenarios,
        &cells,
        &runs,
        &bpf_profile_runs,
        &perf_profile_runs,
    )?;
    let bench = BenchRun {
        meta: Meta {
            started_utc: started_utc.clone(),
            finished_utc: system::utc_now(),
            command: command_line(),
            git_revision: system::git_revision(),
            kernel: kernel.clone(),
            cpu_model: system::cpu_model(),
            cpus: system::cpus(),
            quick: opts.quick,
            reps: settings.reps,
            seed: settings.seed,
            orders,
            timing: settings.timing,
            pinning: format!(
                "client pod (load generator, proxy) on CPU {CLIENT_CPU}, server pod on CPU {SERVER_CPU} (taskset)"
            ),
            pod_sysctls: scenario::POD_SYSCTLS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            sidecar_proxy_args: scenario::sidecar_proxy_args("client"),
            haproxy_version: settings
                .scenarios
                .iter()
                .any(|scenario| scenario.uses_haproxy())
                .then(system::haproxy_version)
                .flatten(),
            load_average_before,
            load_average_after: system::load_average(),
        },
        scenarios: settings.scenarios.clone(),
        cells,
        http_saturation,
        calibration_run,
        runs,
        bpf_profile_runs,
        perf_profile_runs,
        node_cost: Some(node_cost),
        summary,
    };
    let written = write_results(&bench, opts, &started_utc, &kernel)?;
    println!("\n{}", report::headline_table(&bench));
    for path in written {
        println!("bench: wrote {}", path.display());
    }
    println!("bench: took {:.0?}", began.elapsed());
    if !bench.summary.failures.is_empty() {
        bail!(
            "{} runs or measurements failed their correctness gates:\n{}",
            bench.summary.failures.len(),
            bench.summary.failures.join("\n")
        );
    }
    Ok(())
}

/// B0's closed-loop HTTP throughput per connection count (skipped without HTTP).
fn calibrate(
    settings: &Settings,
    bins: &Binaries,
) -> Result<(BTreeMap<usize, f64>, Option<ScenarioRun>)> {
    if !settings.workloads.contains(&WorkloadKind::Http) {
        return Ok((BTreeMap::new(), None));
    }
    println!("\nbench: calibration: B0 closed-loop HTTP saturation");
    let cells = workload::calibration_cells(settings.http_connections, settings.timing);
    let slot = Slot {
        rep: None,
        position: 0,
    };
    let run = run_scenario(
        Scenario::B0,
        slot,
        bins,
        &cells,
        Profiling::None,
        |cell, m| println!("{}", report::progress_line("[calibration] B0", cell, m)),
    );
    if let Some(error) = &run.error {
        bail!("calibration failed: {error}");
    }
    let mut saturation = BTreeMap::new();
    for (cell, measurement) in cells.iter().zip(&run.measurements) {
        if !measurement.is_valid() {
            bail!(
                "calibration {} failed its gates: {}",
                cell.id,
                measurement.gate_failures.join("; ")
            );
        }
        let sidecar_tests::tools::load::Workload::Http { connections, .. } = cell.workload else {
            continue;
        };
        let report = &measurement.report;
        let rate = report.operations as f64 / (report.elapsed_ns as f64 / 1e9);
        saturation.insert(connections, rate);
    }
    Ok((saturation, Some(run)))
}

/// One untimed run of each scenario with a profiler on, its progress labelled `[label]`.
fn profiling_pass(
    scenarios: &[Scenario],
    bins: &Binaries,
    cells: &[Cell],
    profiling: Profiling,
    label: &str,
) -> Vec<ScenarioRun> {
    let slot = Slot {
        rep: None,
        position: 0,
    };
    scenarios
        .iter()
        .map(|&scenario| {
            let label = format!("[{label}] {scenario}");
            let run = run_scenario(scenario, slot, bins, cells, profiling, |cell, m| {
                println!("{}", report::progress_line(&label, cell, m))
            });
            print_run_error(Some(&run));
            run
        })
        .collect()
}

fn print_run_error(run: Option<&ScenarioRun>) {
    if let Some(error) = run.and_then(|run| run.error.as_deref()) {
        println!("    FAILED: {error}");
    }
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("cargo xtask {}", args.join(" "))
}

/// `<out>/<date>-<kernel>[-quick].{json,md,svg}`.
fn write_results(
    bench: &BenchRun,
    opts: &BenchOptions,
    started_utc: &str,
    kernel: &str,
) -> Result<Vec<PathBuf>> {
    let dir = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| system::workspace_root().join("bench/results"));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let date = &started_utc[..10];
    let quick = if opts.quick { "-quick" } else { "" };
    // Not `with_extension`: the kernel release has dots of its own.
    let base = format!("{date}-{kernel}{quick}");
    let json = dir.join(format!("{base}.json"));
    let markdown = dir.join(format!("{base}.md"));
    let svg = dir.join(format!("{base}.svg"));
    fs::write(&json, serde_json::to_string_pretty(bench)?)?;
    fs::write(&markdown, report::markdown(bench))?;
    chart::draw(bench, &svg)?;
    Ok(vec![json, markdown, svg])
}
