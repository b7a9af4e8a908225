//! The benchmark's traffic: `labtool load-server` and `labtool load-client`, driven by
//! `cargo xtask bench`.
//!
//! One server port speaks three protocols, chosen by the client's first four bytes, so that a
//! proxy dialled explicitly (one fixed upstream) carries every workload:
//! - `GET `: HTTP/1.1 with keep-alive and a fixed-size body; each response names the address
//!   the connection arrived on in an `x-server-local` header;
//! - `ECHO`: the server sends that address and a newline, then echoes every byte back;
//! - `BULK`: the server sends that address and a newline, reads to EOF, then answers with the
//!   number of bytes it read;
//! - `PRI `: HTTP/2 with prior knowledge (h2c, `h2load`'s protocol), the same responses as
//!   HTTP/1.1.
//!
//! The client checks that address on every connection against the one it meant to reach, so a
//! proxy that dials the wrong original destination fails the run instead of going unnoticed.

pub mod client;
pub mod h2_server;
pub mod histogram;
pub mod server;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Response header carrying the server's local address of the connection.
pub const SERVER_LOCAL_HEADER: &str = "x-server-local";
pub const ECHO_PREFACE: &[u8; 4] = b"ECHO";
pub const BULK_PREFACE: &[u8; 4] = b"BULK";
/// Printed by the client once its warm-up is over and it waits for the start file.
pub const WARM_LINE: &str = "warm";

/// What `labtool load-client --spec JSON` runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadSpec {
    pub workload: Workload,
    /// Where the client connects.
    pub connect_to: SocketAddr,
    /// The address the server must report: `connect_to` itself, or the upstream of a proxy the
    /// client dials explicitly.
    pub expect_server: SocketAddr,
    pub warmup_ms: u64,
    pub duration_ms: u64,
    /// After the warm-up the client prints [`WARM_LINE`] and waits for this file to exist before
    /// measuring, so the caller can snapshot counters while the load is paused.
    pub start_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Workload {
    /// Closed loop on one connection: send `message_bytes`, wait for the echo.
    PingPong { message_bytes: usize },
    /// HTTP GETs on `connections` keep-alive connections. With a `rate` (requests/s over all
    /// connections) the load is open loop and latency counts from each request's intended send
    /// time; without, each connection sends its next request as soon as the last one is answered.
    Http {
        connections: usize,
        rate: Option<f64>,
    },
    /// `concurrency` closed loops, each opening a new connection per HTTP request.
    ConnectPerRequest { concurrency: usize },
    /// One connection sending `chunk_bytes` writes for the whole duration.
    Bulk { chunk_bytes: usize },
    /// HTTP/2 with prior knowledge (h2c), closed loop: `streams` requests in flight on each of
    /// `connections`. Driven by nghttp2's `h2load`, a client we did not write; labtool's
    /// client refuses it.
    H2 { connections: usize, streams: usize },
}

/// The one JSON line `labtool load-client` prints at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Completed in the measured phase: round trips, responses, connections, or bulk transfers.
    pub operations: u64,
    /// Length of the measured phase.
    pub elapsed_ns: u64,
    /// Payload bytes sent in the measured phase.
    pub bytes: u64,
    /// TCP connections opened, warm-up included: what a proxy in the path must have counted.
    pub connections: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Per-operation latency in nanoseconds ([`histogram::encode`]); open loop: from the
    /// intended send time, so a stall delays every request scheduled behind it.
    pub latency: String,
    /// Time for `connect()` to return, in nanoseconds (new-connection workload only).
    pub connect_latency: Option<String>,
}
