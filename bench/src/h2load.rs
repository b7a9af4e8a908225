//! The h2 workload's load generator: nghttp2's `h2load` (HTTP/2 with prior knowledge), a
//! client we did not write. It cannot pause between warm-up and measurement as labtool's
//! client does, so a cell runs it twice: once for the warm-up, then, with the counters read
//! in between, once for the measured phase with a per-request log, from which the latency
//! histogram is built.

use std::{fs, path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use sidecar_tests::tools::load::{LoadReport, histogram};

/// The arguments of one run: `connections` with `streams` in flight each, for `duration`.
pub fn args(
    url: &str,
    connections: usize,
    streams: usize,
    duration: Duration,
    log_file: Option<&Path>,
) -> Vec<String> {
    let mut args = vec![
        "--threads=1".to_owned(),
        format!("--clients={connections}"),
        format!("--max-concurrent-streams={streams}"),
        format!("--duration={}ms", duration.as_millis()),
    ];
    if let Some(log_file) = log_file {
        args.push(format!("--log-file={}", log_file.display()));
    }
    args.push(url.to_owned());
    args
}

/// The report of the measured run, from h2load's summary and its log (one line per request:
/// start time, status, duration in µs). `connections` counts the warm-up run's too.
pub fn report(stdout: &str, log_file: &Path, connections: u64) -> Result<LoadReport> {
    let summary = Summary::parse(stdout)?;
    let log = fs::read_to_string(log_file)
        .with_context(|| format!("reading h2load's log {}", log_file.display()))?;
    let mut latency = histogram::new_latency();
    for line in log.lines() {
        let mut fields = line.split('\t');
        let micros: u64 = fields
            .nth(2)
            .and_then(|field| field.trim().parse().ok())
            .with_context(|| format!("h2load log line {line:?}"))?;
        latency.saturating_record(micros.saturating_mul(1000).max(1));
    }
    let errors = summary.failed + summary.errored + summary.timeout;
    Ok(LoadReport {
        operations: summary.succeeded,
        elapsed_ns: summary.elapsed_ns,
        bytes: 0,
        connections,
        errors,
        first_error: (errors > 0).then(|| {
            format!(
                "h2load: {} failed, {} errored, {} timed out",
                summary.failed, summary.errored, summary.timeout
            )
        }),
        latency: histogram::encode(&latency)?,
        connect_latency: None,
    })
}

#[derive(Debug, PartialEq)]
struct Summary {
    elapsed_ns: u64,
    succeeded: u64,
    failed: u64,
    errored: u64,
    timeout: u64,
}

impl Summary {
    /// Reads `finished in 3.00s, ...` and `requests: N total, N started, N done, N succeeded,
    /// N failed, N errored, N timeout`.
    fn parse(stdout: &str) -> Result<Summary> {
        let finished = stdout
            .lines()
            .find_map(|line| line.strip_prefix("finished in "))
            .context("no `finished in` line in h2load's output")?;
        let elapsed = finished.split(',').next().unwrap_or_default().trim();
        let elapsed_ns = if let Some(ms) = elapsed.strip_suffix("ms") {
            ms.parse::<f64>().map(|ms| ms * 1e6)
        } else if let Some(s) = elapsed.strip_suffix('s') {
            s.parse::<f64>().map(|s| s * 1e9)
        } else {
            bail!("h2load's elapsed time {elapsed:?} has no unit")
        }
        .with_context(|| format!("h2load's elapsed time {elapsed:?}"))?;
        let requests = stdout
            .lines()
            .find_map(|line| line.strip_prefix("requests: "))
            .context("no `requests:` line in h2load's output")?;
        let count = |what: &str| -> Result<u64> {
            requests
                .split(", ")
                .find_map(|part| part.strip_suffix(what))
                .and_then(|number| number.trim().parse().ok())
                .with_context(|| format!("no `{what}` count in h2load's {requests:?}"))
        };
        Ok(Summary {
            elapsed_ns: elapsed_ns as u64,
            succeeded: count(" succeeded")?,
            failed: count(" failed")?,
            errored: count(" errored")?,
            timeout: count(" timeout")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "starting benchmark...
finished in 2.00s, 24673.50 req/s, 24.75MB/s
requests: 49347 total, 49363 started, 49347 done, 49340 succeeded, 7 failed, 0 errored, 0 timeout
status codes: 49340 2xx, 0 3xx, 0 4xx, 7 5xx
";

    #[test]
    fn reads_the_summary() {
        assert_eq!(
            Summary::parse(OUTPUT).unwrap(),
            Summary {
                elapsed_ns: 2_000_000_000,
                succeeded: 49340,
                failed: 7,
                errored: 0,
                timeout: 0,
            }
        );
        assert!(Summary::parse("finished in 2.00s, 1 req/s\n").is_err());
    }

    #[test]
    fn builds_the_report_from_the_log() {
        let dir = std::env::temp_dir().join(format!("h2load-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        fs::write(
            &log,
            "1796585020249601\t200\t1005\n1796585020249602\t200\t2000\n",
        )
        .unwrap();
        let report = report(OUTPUT, &log, 8).unwrap();
        assert_eq!(
            (report.operations, report.errors, report.connections),
            (49340, 7, 8)
        );
        let latency = histogram::decode(&report.latency).unwrap();
        assert_eq!(latency.len(), 2);
        assert!(latency.max() >= 1_999_000);
        fs::remove_dir_all(dir).unwrap();
    }
}
