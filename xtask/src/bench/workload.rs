//! The workloads and the cells they expand to (one workload at one setting), in the order a
//! scenario run measures them.

use std::collections::BTreeMap;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use sidecar_tests::tools::load::Workload;

/// Payload of one ping-pong round trip.
pub const PING_PONG_BYTES: usize = 64;
/// HTTP keep-alive connection counts (1 KiB response bodies).
pub const HTTP_CONNECTIONS: [usize; 3] = [1, 16, 64];
/// The one connection count of a quick run.
pub const QUICK_HTTP_CONNECTIONS: [usize; 1] = [16];
/// Closed loops of the new-connection-per-request workload: enough to keep both CPUs busy.
pub const CRR_CONCURRENCY: usize = 4;
pub const BULK_CHUNK_BYTES: usize = 128 * 1024;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// Request/response latency on one connection.
    PingPong,
    /// HTTP at fixed rates, open loop, on 1, 16 and 64 connections.
    Http,
    /// A new connection per request.
    Crr,
    /// Bulk throughput on one connection.
    Bulk,
}

impl WorkloadKind {
    pub const ALL: [WorkloadKind; 4] = [
        WorkloadKind::PingPong,
        WorkloadKind::Http,
        WorkloadKind::Crr,
        WorkloadKind::Bulk,
    ];

    /// What one operation of the load report is, for costs and throughput.
    pub fn operation(self) -> &'static str {
        match self {
            WorkloadKind::PingPong => "round trip",
            WorkloadKind::Http => "request",
            WorkloadKind::Crr => "connection",
            WorkloadKind::Bulk => "GB",
        }
    }
}

/// One workload at one setting, measured once per scenario run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    /// `ping-pong`, `http-c16-50pct`, `crr`, `bulk`.
    pub id: String,
    pub kind: WorkloadKind,
    pub workload: Workload,
    /// HTTP: the offered rate as a percentage of B0's closed-loop saturation on as many
    /// connections.
    pub load_percent: Option<u32>,
    pub warmup_ms: u64,
    pub duration_ms: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Timing {
    pub warmup_ms: u64,
    pub duration_ms: u64,
}

/// Closed-loop HTTP cells that find B0's saturation for each connection count.
pub fn calibration_cells(connection_counts: &[usize], timing: Timing) -> Vec<Cell> {
    connection_counts
        .iter()
        .map(|&connections| Cell {
            id: format!("http-c{connections}-closed"),
            kind: WorkloadKind::Http,
            workload: Workload::Http {
                connections,
                rate: None,
            },
            load_percent: None,
            warmup_ms: timing.warmup_ms,
            duration_ms: timing.duration_ms,
        })
        .collect()
}

/// The cells of `kinds`, HTTP at `load_percents` of `saturation` (requests/s by connections).
/// New-connection churn goes last, so its TIME_WAIT sockets and conntrack entries cannot slow
/// the other workloads of the same run.
pub fn plan(
    kinds: &[WorkloadKind],
    load_percents: &[u32],
    saturation: &BTreeMap<usize, f64>,
    timing: Timing,
) -> Vec<Cell> {
    let cell = |id: String, kind, workload, load_percent| Cell {
        id,
        kind,
        workload,
        load_percent,
        warmup_ms: timing.warmup_ms,
        duration_ms: timing.duration_ms,
    };
    let mut cells = Vec::new();
    for kind in [
        WorkloadKind::PingPong,
        WorkloadKind::Http,
        WorkloadKind::Bulk,
        WorkloadKind::Crr,
    ] {
        if !kinds.contains(&kind) {
            continue;
        }
        match kind {
            WorkloadKind::PingPong => cells.push(cell(
                "ping-pong".into(),
                kind,
                Workload::PingPong {
                    message_bytes: PING_PONG_BYTES,
                },
                None,
            )),
            WorkloadKind::Http => {
                for (&connections, &saturated) in saturation {
                    for &percent in load_percents {
                        cells.push(cell(
                            format!("http-c{connections}-{percent}pct"),
                            kind,
                            Workload::Http {
                                connections,
                                rate: Some(saturated * f64::from(percent) / 100.0),
                            },
                            Some(percent),
                        ));
                    }
                }
            }
            WorkloadKind::Crr => cells.push(cell(
                "crr".into(),
                kind,
                Workload::ConnectPerRequest {
                    concurrency: CRR_CONCURRENCY,
                },
                None,
            )),
            WorkloadKind::Bulk => cells.push(cell(
                "bulk".into(),
                kind,
                Workload::Bulk {
                    chunk_bytes: BULK_CHUNK_BYTES,
                },
                None,
            )),
        }
    }
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_http_rates_from_the_saturation_and_churn_last() {
        let saturation = BTreeMap::from([(1, 1000.0), (16, 8000.0)]);
        let timing = Timing {
            warmup_ms: 1,
            duration_ms: 2,
        };
        let cells = plan(&WorkloadKind::ALL, &[25, 50], &saturation, timing);
        let ids: Vec<_> = cells.iter().map(|cell| cell.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "ping-pong",
                "http-c1-25pct",
                "http-c1-50pct",
                "http-c16-25pct",
                "http-c16-50pct",
                "bulk",
                "crr"
            ]
        );
        assert_eq!(
            cells[4].workload,
            Workload::Http {
                connections: 16,
                rate: Some(4000.0)
            }
        );
    }
}
