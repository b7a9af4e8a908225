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
/// The connection count whose closed-loop saturation every scenario measures (requests/s at
/// full speed, the figure wrk or h2load report).
pub const SATURATION_CONNECTIONS: usize = 16;
/// h2load's connections and streams in flight on each: as many requests in flight as the
/// saturation cell, multiplexed.
pub const H2_CONNECTIONS: usize = 4;
pub const H2_STREAMS: usize = 4;
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
    /// HTTP/1.1 keep-alive at fixed rates, open loop, on 1, 16 and 64 connections, and closed
    /// loop on 16.
    Http,
    /// HTTP/2 (h2c) keep-alive, closed loop, driven by h2load.
    H2,
    /// A new connection per request.
    Crr,
    /// Bulk throughput on one connection.
    Bulk,
}

impl WorkloadKind {
    pub const ALL: [WorkloadKind; 5] = [
        WorkloadKind::PingPong,
        WorkloadKind::Http,
        WorkloadKind::H2,
        WorkloadKind::Crr,
        WorkloadKind::Bulk,
    ];

    /// What one operation of the load report is, for costs and throughput.
    pub fn operation(self) -> &'static str {
        match self {
            WorkloadKind::PingPong => "round trip",
            WorkloadKind::Http | WorkloadKind::H2 => "request",
            WorkloadKind::Crr => "connection",
            WorkloadKind::Bulk => "GB",
        }
    }

    /// Whether the workload speaks HTTP (new connections do: one HTTP/1.1 request each).
    pub fn is_http(self) -> bool {
        matches!(
            self,
            WorkloadKind::Http | WorkloadKind::H2 | WorkloadKind::Crr
        )
    }
}

/// One workload at one setting, measured once per scenario run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    /// `ping-pong`, `http-c16-50pct`, `http-c16-closed`, `h2-c4-m4`, `crr`, `bulk`.
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
        WorkloadKind::H2,
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
                cells.push(cell(
                    format!("http-c{SATURATION_CONNECTIONS}-closed"),
                    kind,
                    Workload::Http {
                        connections: SATURATION_CONNECTIONS,
                        rate: None,
                    },
                    None,
                ));
            }
            WorkloadKind::H2 => cells.push(cell(
                format!("h2-c{H2_CONNECTIONS}-m{H2_STREAMS}"),
                kind,
                Workload::H2 {
                    connections: H2_CONNECTIONS,
                    streams: H2_STREAMS,
                },
                None,
            )),
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
                "http-c16-closed",
                "h2-c4-m4",
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
