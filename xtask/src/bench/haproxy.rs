//! HAProxy as a peer transparent proxy (scenario H1): Debian's build, `mode tcp`, dialling the
//! original destination that iptables REDIRECT recorded (`server 0.0.0.0:0`).

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

/// Writes the configuration into `lab_dir/haproxy/`, a directory the proxy user owns (HAProxy
/// creates its stats socket there).
pub fn write_config(lab_dir: &Path, proxy_id: u32) -> Result<HaproxyFiles> {
    let dir = lab_dir.join("haproxy");
    std::fs::create_dir_all(&dir)?;
    chown(&dir, Some(proxy_id), Some(proxy_id))?;
    let files = HaproxyFiles {
        config: dir.join("haproxy.cfg"),
        stats_socket: dir.join("stats.sock"),
    };
    // One thread, like the sidecar's `--worker-threads 1`; no access log (HAProxy's default).
    let config = format!(
        "global
    nbthread 1
    maxconn 4096
    stats socket {socket} mode 600 level user

defaults
    mode tcp
    timeout connect 10s
    timeout client 1m
    timeout server 1m

frontend outbound
    bind 127.0.0.1:{OUTBOUND_PORT}
    # Without an original destination HAProxy's destination is its own listener: it would
    # dial itself until maxconn is exhausted.
    tcp-request connection reject if {{ dst_port {OUTBOUND_PORT} }}
    default_backend original_destination

backend original_destination
    server original 0.0.0.0:0
",
        socket = files.stats_socket.display()
    );
    std::fs::write(&files.config, config)?;
    Ok(files)
}

/// Connections the `outbound` frontend has accepted (`conn_tot` of `show stat`).
pub fn frontend_connections(stats_socket: &Path) -> Result<u64> {
    let mut socket = UnixStream::connect(stats_socket)
        .with_context(|| format!("connecting to {}", stats_socket.display()))?;
    socket.write_all(b"show stat\n")?;
    let mut csv = String::new();
    socket.read_to_string(&mut csv)?;
    conn_tot(&csv, "outbound")
}

fn conn_tot(csv: &str, frontend: &str) -> Result<u64> {
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
    let (proxy, service, total) = (column("pxname")?, column("svname")?, column("conn_tot")?);
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.get(proxy) == Some(&frontend) && fields.get(service) == Some(&"FRONTEND") {
            let value = fields.get(total).copied().unwrap_or_default();
            return value
                .parse()
                .with_context(|| format!("conn_tot {value:?} of {frontend}"));
        }
    }
    bail!("no FRONTEND row for {frontend} in HAProxy's `show stat`")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_frontend_connection_total() {
        let csv = "# pxname,svname,qcur,conn_tot,\n\
                   outbound,FRONTEND,,42,\n\
                   original_destination,original,0,,\n";
        assert_eq!(conn_tot(csv, "outbound").unwrap(), 42);
        assert!(conn_tot(csv, "inbound").is_err());
    }
}
