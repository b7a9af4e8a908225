//! HAProxy as a peer transparent proxy (scenarios H1 and H1-http): Debian's build, dialling the
//! original destination that iptables REDIRECT recorded (`server 0.0.0.0:0`), in `mode tcp`
//! (the peer of the opaque scenarios) or `mode http` (the peer of the HTTP-aware ones).

use std::{
    io::{Read, Write},
    os::unix::{fs::chown, net::UnixStream},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use super::scenario::OUTBOUND_PORT;

pub struct HaproxyFiles {
    pub config: PathBuf,
    pub stats_socket: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tcp,
    Http,
}

/// `mode http` as a sidecar would run it: keep-alive both sides, server connections shared by
/// every client connection (`http-reuse always`, as Envoy's and our sidecar's pools do), a
/// request id and x-forwarded-for added (our sidecar adds both), HTTP/2 clients (detected by
/// their preface) sent to the server as HTTP/2, HTTP/1.1 ones as HTTP/1.1 (as our sidecar
/// does).
const HTTP_DEFAULTS: &str = "defaults
    mode http
    option forwardfor
    http-reuse always
    unique-id-format %{+X}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid
    unique-id-header x-request-id
    timeout connect 10s
    timeout client 1m
    timeout server 1m
    timeout http-request 10s
";

const TCP_DEFAULTS: &str = "defaults
    mode tcp
    timeout connect 10s
    timeout client 1m
    timeout server 1m
";

/// Writes the configuration into `lab_dir/haproxy/`, a directory the proxy user owns (HAProxy
/// creates its stats socket there).
pub fn write_config(lab_dir: &Path, proxy_id: u32, mode: Mode) -> Result<HaproxyFiles> {
    let dir = lab_dir.join("haproxy");
    std::fs::create_dir_all(&dir)?;
    chown(&dir, Some(proxy_id), Some(proxy_id))?;
    let files = HaproxyFiles {
        config: dir.join("haproxy.cfg"),
        stats_socket: dir.join("stats.sock"),
    };
    let (defaults, h2_backend) = match mode {
        Mode::Tcp => (TCP_DEFAULTS, ""),
        Mode::Http => (
            HTTP_DEFAULTS,
            "    use_backend original_destination_h2 if { req.ver 2.0 }\n",
        ),
    };
    let h2_server = if mode == Mode::Http {
        "\nbackend original_destination_h2\n    server original 0.0.0.0:0 proto h2\n"
    } else {
        ""
    };
    // One thread, like the sidecar's `--worker-threads 1`; no access log (HAProxy's default).
    let config = format!(
        "global
    nbthread 1
    maxconn 4096
    stats socket {socket} mode 600 level user

{defaults}
frontend outbound
    bind 127.0.0.1:{OUTBOUND_PORT}
    # Without an original destination HAProxy's destination is its own listener: it would
    # dial itself until maxconn is exhausted.
    tcp-request connection reject if {{ dst_port {OUTBOUND_PORT} }}
{h2_backend}    default_backend original_destination

backend original_destination
    server original 0.0.0.0:0
{h2_server}",
        socket = files.stats_socket.display()
    );
    std::fs::write(&files.config, config)?;
    Ok(files)
}

/// A running total of the `outbound` frontend in `show stat`.
#[derive(Clone, Copy)]
pub enum Total {
    /// Connections accepted (`conn_tot`).
    Connections,
    /// HTTP requests received (`req_tot`, `mode http` only).
    Requests,
}

impl Total {
    fn column(self) -> &'static str {
        match self {
            Total::Connections => "conn_tot",
            Total::Requests => "req_tot",
        }
    }
}

/// The `outbound` frontend's `total` so far.
pub fn frontend_total(stats_socket: &Path, total: Total) -> Result<u64> {
    let mut socket = UnixStream::connect(stats_socket)
        .with_context(|| format!("connecting to {}", stats_socket.display()))?;
    socket.write_all(b"show stat\n")?;
    let mut csv = String::new();
    socket.read_to_string(&mut csv)?;
    frontend_column(&csv, "outbound", total.column())
}

fn frontend_column(csv: &str, frontend: &str, name: &str) -> Result<u64> {
    let mut lines = csv.lines();
    let header = lines
        .next()
        .and_then(|line| line.strip_prefix("# "))
        .context("no header in HAProxy's `show stat`")?;
    let columns: Vec<&str> = header.split(',').collect();
    let column = |name: &str| {
        columns
            .iter()
            .position(|column| *column == name)
            .with_context(|| format!("no {name} column in HAProxy's `show stat`"))
    };
    let (proxy, service, total) = (column("pxname")?, column("svname")?, column(name)?);
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.get(proxy) == Some(&frontend) && fields.get(service) == Some(&"FRONTEND") {
            let value = fields.get(total).copied().unwrap_or_default();
            return value
                .parse()
                .with_context(|| format!("{name} {value:?} of {frontend}"));
        }
    }
    bail!("no FRONTEND row for {frontend} in HAProxy's `show stat`")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_frontend_totals() {
        let csv = "# pxname,svname,qcur,conn_tot,req_tot,\n\
                   outbound,FRONTEND,,42,40,\n\
                   original_destination,original,0,,,\n";
        assert_eq!(frontend_column(csv, "outbound", "conn_tot").unwrap(), 42);
        assert_eq!(frontend_column(csv, "outbound", "req_tot").unwrap(), 40);
        assert!(frontend_column(csv, "inbound", "conn_tot").is_err());
        assert!(frontend_column(csv, "outbound", "bytes_in").is_err());
    }
}
