//! From raw measurements to the published numbers: histograms merged across repetitions before
//! any percentile is taken, per-repetition values summarised as median with min and max, and
//! every ratio between two scenarios computed within a repetition (the two ran minutes apart,
//! under the same conditions), then summarised the same way.

use std::collections::BTreeMap;

use anyhow::Result;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use sidecar_tests::tools::load::histogram;

use super::{
    results::{Measurement, ScenarioRun},
    scenario::Scenario,
    workload::{Cell, WorkloadKind},
};

/// The comparisons every run reports, `(a, b)` as the ratio a/b: eBPF against iptables, each
/// redirect against the explicitly dialled proxy (the redirect's own overhead), the proxy
/// against no proxy, what conntrack alone costs, the sidecar against HAProxy under the same
/// rules (opaque TCP and HTTP-aware), what HTTP awareness costs, and what mTLS adds.
pub const COMPARISONS: [(Scenario, Scenario); 16] = [
    (Scenario::E1, Scenario::I1),
    (Scenario::E1, Scenario::P0),
    (Scenario::I1, Scenario::P0),
    (Scenario::P0, Scenario::B0),
    (Scenario::I1, Scenario::P0Ct),
    (Scenario::B0Ct, Scenario::B0),
    (Scenario::P0Ct, Scenario::P0),
    (Scenario::I1, Scenario::H1),
    (Scenario::I1Http, Scenario::H1Http),
    (Scenario::E1Http, Scenario::I1Http),
    (Scenario::E1Http, Scenario::E1),
    (Scenario::E2, Scenario::I2),
    (Scenario::E2s, Scenario::E2),
    (Scenario::E2Mtls, Scenario::I2Mtls),
    (Scenario::E2Mtls, Scenario::E2),
    (Scenario::E2MtlsHttp, Scenario::E2Http),
];

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub count: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let middle = sorted.len() / 2;
        let median = if sorted.len().is_multiple_of(2) {
            (sorted[middle - 1] + sorted[middle]) / 2.0
        } else {
            sorted[middle]
        };
        Some(Spread {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            count: sorted.len(),
        })
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub samples: u64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Option<Percentiles> {
        let micros = |quantile| histogram.value_at_quantile(quantile) as f64 / 1000.0;
        (!histogram.is_empty()).then(|| Percentiles {
            p50: micros(0.5),
            p90: micros(0.9),
            p99: micros(0.99),
            p999: micros(0.999),
            max: histogram.max() as f64 / 1000.0,
            samples: histogram.len(),
        })
    }
}

/// One scenario in one cell, over all repetitions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CellSummary {
    pub scenario: Scenario,
    pub cell: String,
    pub valid_runs: usize,
    pub invalid_runs: usize,
    /// From the histograms of all valid runs, merged.
    pub latency_us: Option<Percentiles>,
    pub connect_latency_us: Option<Percentiles>,
    /// Operations per second (bulk: Gbit/s), one value per run.
    pub throughput: Option<Spread>,
    pub offered_rate: Option<f64>,
    /// CPU microseconds per operation (bulk: per GB): all cgroups together, the client app,
    /// the proxies (client and server), the server app.
    pub cpu_us_per_op: Option<Spread>,
    pub app_cpu_us_per_op: Option<Spread>,
    pub proxy_cpu_us_per_op: Option<Spread>,
    pub server_cpu_us_per_op: Option<Spread>,
}

/// a/b for one metric of one cell, computed per repetition.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub a: Scenario,
    pub b: Scenario,
    pub cell: String,
    pub metric: Metric,
    pub ratio: Spread,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Throughput,
    P50,
    P99,
    CpuPerOp,
}

impl Metric {
    pub const ALL: [Metric; 4] = [
        Metric::Throughput,
        Metric::P50,
        Metric::P99,
        Metric::CpuPerOp,
    ];
}

/// BPF program cost per operation, from the profiling runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgramCost {
    pub scenario: Scenario,
    pub cell: String,
    pub program: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
    pub runs_per_op: f64,
    pub ns_per_run: f64,
    pub ns_per_op: f64,
}

/// Where one scenario's CPU time went per operation of a cell: the measured CPU time of every
/// cgroup per operation, split by the shares of the perf samples on the pods' CPUs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubsystemCost {
    pub scenario: Scenario,
    pub cell: String,
    pub samples: u64,
    pub cpu_us_per_op: f64,
    /// Category (see `profile`) -> µs per operation.
    pub us_per_op: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    pub cells: Vec<CellSummary>,
    pub comparisons: Vec<Comparison>,
    pub proxy_peak_rss_kib: BTreeMap<Scenario, Spread>,
    pub bpf_programs: Vec<ProgramCost>,
    /// CPU time per operation by kernel subsystem, from the perf runs.
    #[serde(default)]
    pub subsystems: Vec<SubsystemCost>,
    /// One line per run or measurement that failed, with the reason.
    pub failures: Vec<String>,
}

impl Summary {
    pub fn cell(&self, scenario: Scenario, cell: &str) -> Option<&CellSummary> {
        self.cells
            .iter()
            .find(|summary| summary.scenario == scenario && summary.cell == cell)
    }

    pub fn comparison(
        &self,
        a: Scenario,
        b: Scenario,
        cell: &str,
        metric: Metric,
    ) -> Option<&Spread> {
        self.comparisons
            .iter()
            .find(|c| c.a == a && c.b == b && c.cell == cell && c.metric == metric)
            .map(|c| &c.ratio)
    }
}

/// One valid measurement reduced to the values summaries use.
struct RunValues {
    latency: Histogram<u64>,
    connect_latency: Option<Histogram<u64>>,
    throughput: f64,
    cpu_per_op: [f64; 4],
}

impl RunValues {
    fn of(kind: WorkloadKind, measurement: &Measurement) -> Result<RunValues> {
        let report = &measurement.report;
        let seconds = report.elapsed_ns as f64 / 1e9;
        let (throughput, units) = match kind {
            WorkloadKind::Bulk => (
                report.bytes as f64 * 8.0 / 1e9 / seconds,
                report.bytes as f64 / 1e9,
            ),
            _ => (report.operations as f64 / seconds, report.operations as f64),
        };
        let cpu = measurement.cpu_usec;
        let per_op = |usec: u64| usec as f64 / units;
        Ok(RunValues {
            latency: histogram::decode(&report.latency)?,
            connect_latency: report
                .connect_latency
                .as_deref()
                .map(histogram::decode)
                .transpose()?,
            throughput,
            cpu_per_op: [
                per_op(cpu.total()),
                per_op(cpu.client_app),
                per_op(cpu.proxies()),
                per_op(cpu.server),
            ],
        })
    }

    fn metric(&self, metric: Metric) -> f64 {
        match metric {
            Metric::Throughput => self.throughput,
            Metric::P50 => self.latency.value_at_quantile(0.5) as f64,
            Metric::P99 => self.latency.value_at_quantile(0.99) as f64,
            Metric::CpuPerOp => self.cpu_per_op[0],
        }
    }
}

pub fn summarize(
    scenarios: &[Scenario],
    cells: &[Cell],
    runs: &[ScenarioRun],
    profile_runs: &[ScenarioRun],
    perf_runs: &[ScenarioRun],
) -> Result<Summary> {
    let mut summary = Summary::default();
    for run in runs.iter().chain(profile_runs).chain(perf_runs) {
        let rep = run
            .rep
            .map_or("profile".to_owned(), |rep| format!("rep {}", rep + 1));
        if let Some(error) = &run.error {
            summary
                .failures
                .push(format!("{} {rep}: run failed: {error}", run.scenario));
        }
        for measurement in run.measurements.iter().filter(|m| !m.is_valid()) {
            summary.failures.push(format!(
                "{} {rep} {}: {}",
                run.scenario,
                measurement.cell,
                measurement.gate_failures.join("; ")
            ));
        }
    }

    // (scenario, cell) -> values by repetition.
    let mut values: BTreeMap<(Scenario, &str), BTreeMap<usize, RunValues>> = BTreeMap::new();
    let mut invalid: BTreeMap<(Scenario, &str), usize> = BTreeMap::new();
    for run in runs {
        let Some(rep) = run.rep else { continue };
        for measurement in &run.measurements {
            let Some(cell) = cells.iter().find(|cell| cell.id == measurement.cell) else {
                continue;
            };
            let key = (run.scenario, cell.id.as_str());
            if measurement.is_valid() {
                values
                    .entry(key)
                    .or_default()
                    .insert(rep, RunValues::of(cell.kind, measurement)?);
            } else {
                *invalid.entry(key).or_default() += 1;
            }
        }
    }

    for cell in cells {
        for &scenario in scenarios {
            let key = (scenario, cell.id.as_str());
            let Some(by_rep) = values.get(&key) else {
                summary
                    .cells
                    .push(CellSummary::empty(scenario, cell, invalid.get(&key)));
                continue;
            };
            summary
                .cells
                .push(CellSummary::of(scenario, cell, by_rep, invalid.get(&key))?);
        }
        for (a, b) in COMPARISONS {
            let (Some(a_runs), Some(b_runs)) = (
                values.get(&(a, cell.id.as_str())),
                values.get(&(b, cell.id.as_str())),
            ) else {
                continue;
            };
            for metric in Metric::ALL {
                let ratios: Vec<f64> = a_runs
                    .iter()
                    .filter_map(|(rep, a_run)| {
                        let b_run = b_runs.get(rep)?;
                        Some(a_run.metric(metric) / b_run.metric(metric))
                    })
                    .collect();
                if let Some(ratio) = Spread::of(&ratios) {
                    summary.comparisons.push(Comparison {
                        a,
                        b,
                        cell: cell.id.clone(),
                        metric,
                        ratio,
                    });
                }
            }
        }
    }

    for &scenario in scenarios {
        let peaks: Vec<f64> = runs
            .iter()
            .filter(|run| run.scenario == scenario)
            .filter_map(|run| run.proxy_peak_rss_kib)
            .map(|kib| kib as f64)
            .collect();
        if let Some(spread) = Spread::of(&peaks) {
            summary.proxy_peak_rss_kib.insert(scenario, spread);
        }
    }

    for run in profile_runs {
        for measurement in run.measurements.iter().filter(|m| m.is_valid()) {
            let operations = measurement.report.operations.max(1) as f64;
            for (program, stats) in measurement.bpf.iter().flatten() {
                summary.bpf_programs.push(ProgramCost {
                    scenario: run.scenario,
                    cell: measurement.cell.clone(),
                    program: program.clone(),
                    run_cnt: stats.run_cnt,
                    run_time_ns: stats.run_time_ns,
                    runs_per_op: stats.run_cnt as f64 / operations,
                    ns_per_run: stats.run_time_ns as f64 / stats.run_cnt.max(1) as f64,
                    ns_per_op: stats.run_time_ns as f64 / operations,
                });
            }
        }
    }
    for run in perf_runs {
        for measurement in run.measurements.iter().filter(|m| m.is_valid()) {
            let Some(profile) = &measurement.perf else {
                continue;
            };
            let operations = measurement.report.operations.max(1) as f64;
            let cpu_us_per_op = measurement.cpu_usec.total() as f64 / operations;
            // cpu.stat counts busy time only: split it by the busy samples' shares.
            let idle = profile
                .shares
                .get(super::profile::IDLE)
                .copied()
                .unwrap_or(0.0);
            let busy = (1.0 - idle).max(f64::EPSILON);
            summary.subsystems.push(SubsystemCost {
                scenario: run.scenario,
                cell: measurement.cell.clone(),
                samples: profile.samples,
                cpu_us_per_op,
                us_per_op: profile
                    .shares
                    .iter()
                    .filter(|(category, _)| category.as_str() != super::profile::IDLE)
                    .map(|(category, share)| (category.clone(), share / busy * cpu_us_per_op))
                    .collect(),
            });
        }
    }
    Ok(summary)
}

impl CellSummary {
    fn empty(scenario: Scenario, cell: &Cell, invalid: Option<&usize>) -> CellSummary {
        CellSummary {
            scenario,
            cell: cell.id.clone(),
            valid_runs: 0,
            invalid_runs: invalid.copied().unwrap_or(0),
            latency_us: None,
            connect_latency_us: None,
            throughput: None,
            offered_rate: offered_rate(cell),
            cpu_us_per_op: None,
            app_cpu_us_per_op: None,
            proxy_cpu_us_per_op: None,
            server_cpu_us_per_op: None,
        }
    }

    fn of(
        scenario: Scenario,
        cell: &Cell,
        by_rep: &BTreeMap<usize, RunValues>,
        invalid: Option<&usize>,
    ) -> Result<CellSummary> {
        let mut latency = histogram::new_latency();
        let mut connect_latency = histogram::new_latency();
        for run in by_rep.values() {
            latency.add(&run.latency)?;
            if let Some(connect) = &run.connect_latency {
                connect_latency.add(connect)?;
            }
        }
        let spread = |value: &dyn Fn(&RunValues) -> f64| {
            Spread::of(&by_rep.values().map(value).collect::<Vec<_>>())
        };
        Ok(CellSummary {
            valid_runs: by_rep.len(),
            latency_us: Percentiles::of(&latency),
            connect_latency_us: Percentiles::of(&connect_latency),
            throughput: spread(&|run| run.throughput),
            cpu_us_per_op: spread(&|run| run.cpu_per_op[0]),
            app_cpu_us_per_op: spread(&|run| run.cpu_per_op[1]),
            proxy_cpu_us_per_op: spread(&|run| run.cpu_per_op[2]),
            server_cpu_us_per_op: spread(&|run| run.cpu_per_op[3]),
            ..CellSummary::empty(scenario, cell, invalid)
        })
    }
}

fn offered_rate(cell: &Cell) -> Option<f64> {
    match cell.workload {
        sidecar_tests::tools::load::Workload::Http { rate, .. } => rate,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle_of_an_even_count() {
        let spread = Spread::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(
            (spread.median, spread.min, spread.max, spread.count),
            (2.5, 1.0, 4.0, 4)
        );
        assert!(Spread::of(&[f64::NAN]).is_none());
    }
}
