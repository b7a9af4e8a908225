//! What the proxy tells about its work: Istio's TCP metrics, failure and reload counters,
//! certificate expiry (`metrics`); the access log of relayed and refused connections
//! (`access_log`) and the lines of every access log, formatted straight into the log buffer
//! (`access_line`); the tracing subscriber, its level changeable at runtime (`logging`), and its
//! output, buffered: one `write` per batch of lines, not per request (`log_buffer`).
pub(crate) mod access_line;
pub(crate) mod access_log;
pub(crate) mod log_buffer;
pub(crate) mod logging;
pub mod metrics;
