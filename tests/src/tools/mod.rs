//! The TCP and HTTP tools behind the `labtool` binary, kept in the library so they can be
//! unit-tested on loopback and their JSON types reused by integration tests.

pub mod echo;
pub mod grpc_health;
pub mod http;
pub mod load;
pub mod polled;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};

use anyhow::{Context, Result};

/// Binds every address, then prints `listening <addr>` per listener (flushed) so a test can
/// wait for readiness. Binding all first means the lines appear only once all are ready.
pub fn bind_and_announce(addrs: &[SocketAddr], out: &mut impl Write) -> Result<Vec<TcpListener>> {
    let listeners = addrs
        .iter()
        .map(|addr| TcpListener::bind(addr).with_context(|| format!("binding {addr}")))
        .collect::<Result<Vec<_>>>()?;
    for listener in &listeners {
        writeln!(out, "listening {}", listener.local_addr()?)?;
    }
    out.flush()?;
    Ok(listeners)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announces_the_bound_address_including_an_ephemeral_port() {
        let mut out = Vec::new();
        let listeners = bind_and_announce(&["127.0.0.1:0".parse().unwrap()], &mut out).unwrap();
        let port = listeners[0].local_addr().unwrap().port();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("listening 127.0.0.1:{port}\n")
        );
    }
}
