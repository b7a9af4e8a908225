//! Readiness waits, run from a thread inside the pod's network namespace.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::lab::Pod;
use crate::tools::http::{self, HttpResponse, HttpTarget};

const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The state column value of a listening socket in /proc/net/tcp.
const TCP_LISTEN: &str = "0A";

/// Waits until a TCP socket in `pod` listens on `addr` (or on the wildcard address of the
/// same port). Reads the namespace's socket tables instead of connecting, so the listener
/// (maybe a proxy) never sees a probe connection.
pub fn wait_for_tcp(pod: &Pod, addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    pod.run_in_netns(|| {
        loop {
            // thread-self: /proc/net would show the netns of the process's main thread.
            let ipv4_table = read_socket_table("/proc/thread-self/net/tcp")?;
            let ipv6_table = read_socket_table("/proc/thread-self/net/tcp6")?;
            let mut listeners =
                listening_sockets(&ipv4_table).chain(listening_sockets(&ipv6_table));
            if listeners.any(|listener| accepts(listener, addr)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "nothing listens on {addr} in netns {} after {timeout:?}",
                    pod.netns()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    })?
}

/// Polls `url` (http://ip:port/path) from inside `pod` until it answers 2xx; returns that
/// response. Requests come from no lab cgroup, so the sidecar never redirects them.
pub fn wait_for_http_ok(pod: &Pod, url: &str, timeout: Duration) -> Result<HttpResponse> {
    let target = HttpTarget::parse(url)?;
    let deadline = Instant::now() + timeout;
    pod.run_in_netns(|| {
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt_timeout = remaining
                .min(Duration::from_secs(1))
                .max(Duration::from_millis(10));
            let failure = match http::get(&target, attempt_timeout) {
                Ok(response) if response.is_success() => return Ok(response),
                Ok(response) => format!("status {}: {}", response.status, response.body.trim()),
                Err(error) => format!("{error:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{url} in netns {} not OK after {timeout:?}: {failure}",
                    pod.netns()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    })?
}

/// A socket table's text; empty when the protocol is disabled (no tcp6 without IPv6).
fn read_socket_table(path: &str) -> Result<String> {
    match fs::read_to_string(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        result => result.with_context(|| format!("reading {path}")),
    }
}

/// Local addresses of listening sockets in a /proc/net/tcp or /proc/net/tcp6 table.
fn listening_sockets(table: &str) -> impl Iterator<Item = SocketAddr> + '_ {
    table.lines().skip(1).filter_map(|row| {
        let mut columns = row.split_whitespace();
        let local = columns.nth(1)?;
        let state = columns.nth(1)?;
        (state == TCP_LISTEN)
            .then(|| parse_proc_socket_addr(local))
            .flatten()
    })
}

/// `0100007F:1F90` or a 32-digit IPv6 form: the address is printed as native-endian 32-bit
/// words of the network-order bytes, the port as a plain hex number.
fn parse_proc_socket_addr(text: &str) -> Option<SocketAddr> {
    let (address_hex, port_hex) = text.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for word in address_hex.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::from(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => IpAddr::from(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether a socket listening on `listener` takes connections to `target`. An IPv6 wildcard
/// is assumed dual-stack (Linux's default), since the tables do not show IPV6_V6ONLY.
fn accepts(listener: SocketAddr, target: SocketAddr) -> bool {
    let target_ip = target.ip().to_canonical();
    let listener_ip = listener.ip().to_canonical();
    listener.port() == target.port()
        && (listener_ip == target_ip
            || match listener_ip {
                IpAddr::V4(ip) => ip.is_unspecified() && target_ip.is_ipv4(),
                IpAddr::V6(ip) => ip.is_unspecified(),
            })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows as an x86_64 (little-endian) kernel prints them.
    const TCP_TABLE: &str = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 ffff 100 0 0 10 0
   1: 020012C6:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 2 1 ffff 100 0 0 10 0
   2: 020012C6:1F90 010012C6:9C40 01 00000000:00000000 00:00000000 00000000     0        0 3 1 ffff 100 0 0 10 0
";

    const TCP6_TABLE: &str = "\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 ffff 100 0 0 10 0
   1: 0000000000000000FFFF0000020012C6:0051 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5 1 ffff 100 0 0 10 0
";

    #[cfg(target_endian = "little")]
    #[test]
    fn lists_only_listening_sockets() {
        let ipv4: Vec<_> = listening_sockets(TCP_TABLE).collect();
        assert_eq!(
            ipv4,
            [
                "127.0.0.1:15001".parse().unwrap(),
                "198.18.0.2:8080".parse().unwrap()
            ]
        );
        let ipv6: Vec<_> = listening_sockets(TCP6_TABLE).collect();
        assert_eq!(
            ipv6,
            [
                "[::]:80".parse().unwrap(),
                "[::ffff:198.18.0.2]:81".parse().unwrap()
            ]
        );
    }

    #[test]
    fn matches_exact_wildcard_and_mapped_addresses() {
        let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
        assert!(accepts(addr("198.18.0.2:80"), addr("198.18.0.2:80")));
        assert!(!accepts(addr("198.18.0.2:80"), addr("198.18.0.2:81")));
        assert!(!accepts(addr("127.0.0.1:80"), addr("198.18.0.2:80")));
        assert!(accepts(addr("0.0.0.0:80"), addr("198.18.0.2:80")));
        assert!(accepts(addr("0.0.0.0:80"), addr("[::ffff:198.18.0.2]:80")));
        assert!(!accepts(addr("0.0.0.0:80"), addr("[fd18::2]:80")));
        assert!(accepts(addr("[::]:80"), addr("198.18.0.2:80")));
        assert!(accepts(addr("[::]:80"), addr("[fd18::2]:80")));
        assert!(accepts(
            addr("[::ffff:198.18.0.2]:80"),
            addr("198.18.0.2:80")
        ));
    }
}
