//! Dialling the upstream: a bounded connect, classified failures, and for inbound the reserved
//! source address that capture lets through (Istio's 127.0.0.6 and ::6).
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use rustix::net::sockopt;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpSocket, TcpStream},
    time::timeout,
};
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::{
    Timeouts, io::keepalive, mesh::Mesh, mesh::identity::SpiffeId,
    telemetry::metrics::FailureReason, tls,
};

/// Source of the inbound proxy's connections to the app; both capture modes skip it, and only
/// it: never the real localhost, which apps trust.
pub const PASSTHROUGH_SOURCE_V4: Ipv4Addr =
    Ipv4Addr::from_octets(sidecar_common::PASSTHROUGH_SOURCE_V4);
/// The IPv6 counterpart, `::6`, which `sidecar init` adds to the pod's `lo`.
pub const PASSTHROUGH_SOURCE_V6: Ipv6Addr =
    Ipv6Addr::from_octets(sidecar_common::PASSTHROUGH_SOURCE_V6);

/// Where upstream connections come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Whatever the kernel picks (outbound: the proxy's UID/cgroup exempts it from capture).
    Any,
    /// The reserved passthrough address (inbound: forwarding to the app on the pod IP).
    Passthrough,
}

/// An upstream connect that failed, with the reason to count.
#[derive(Debug, Clone)]
pub struct ConnectFailure {
    pub reason: FailureReason,
    pub error: String,
}

/// A byte stream to an upstream, plain TCP or mesh mTLS.
pub trait UpstreamIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The TCP socket under it, to reset it.
    fn into_tcp_stream(self: Box<Self>) -> TcpStream;
    /// The TCP socket when nothing sits between it and the relay (no TLS), to splice it.
    fn into_plain_tcp(self: Box<Self>) -> Result<TcpStream, Box<dyn UpstreamIo>>;
}

impl UpstreamIo for TcpStream {
    fn into_tcp_stream(self: Box<Self>) -> TcpStream {
        *self
    }

    fn into_plain_tcp(self: Box<Self>) -> Result<TcpStream, Box<dyn UpstreamIo>> {
        Ok(*self)
    }
}

impl UpstreamIo for tokio_rustls::client::TlsStream<TcpStream> {
    fn into_tcp_stream(self: Box<Self>) -> TcpStream {
        self.into_inner().0
    }

    fn into_plain_tcp(self: Box<Self>) -> Result<TcpStream, Box<dyn UpstreamIo>> {
        Err(self)
    }
}

/// Who the two ends of an mTLS upstream connection proved to be.
#[derive(Debug, Clone)]
pub struct MutualTls {
    pub local: SpiffeId,
    pub peer: SpiffeId,
    /// The mesh workload the destination belongs to (from the mesh config).
    pub workload: String,
}

/// An upstream connection ready for the app's bytes.
pub struct Established {
    pub io: Box<dyn UpstreamIo>,
    /// `None`: plaintext (the destination is not a mesh workload).
    pub mtls: Option<MutualTls>,
    /// The peer's sidecar agreed to take HTTP/1.1 requests carried over HTTP/2 on it.
    pub carrying_http1: bool,
}

/// What a connection to a mesh workload offers in its mTLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshOffer {
    /// Mesh mTLS for the app's bytes as they are.
    Bytes,
    /// Mesh mTLS for an HTTP/2 connection that carries HTTP/1.1 requests too, if the peer's
    /// sidecar agrees ([`tls::MESH_H2_ALPN`]).
    CarryingHttp1,
}

/// Reads its stream: a server's greeting, read while the client's protocol is being detected.
impl AsyncRead for Established {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

/// Connects to `addr` and, when the mesh config says it is a mesh workload, originates mTLS
/// (offering `offer`) and checks its SPIFFE identity.
pub async fn establish(
    addr: SocketAddr,
    mesh: &Mesh,
    timeouts: &Timeouts,
    offer: MeshOffer,
) -> Result<Established, ConnectFailure> {
    let stream = connect(addr, Source::Any, timeouts).await?;
    let Some((local_tls, destination)) = mesh
        .tls()
        .and_then(|tls| Some((tls, tls.destination(addr)?)))
    else {
        return Ok(Established {
            io: Box::new(stream),
            mtls: None,
            carrying_http1: false,
        });
    };
    // Mesh peers are checked by SPIFFE ID; the IP only satisfies the API (no SNI is sent).
    let server_name = ServerName::IpAddress(addr.ip().into());
    let connector = TlsConnector::from(destination.client_config.clone());
    let handshake = match offer {
        MeshOffer::Bytes => connector.connect(server_name, stream),
        MeshOffer::CarryingHttp1 => connector
            .with_alpn(vec![tls::MESH_H2_ALPN.to_vec(), tls::MESH_ALPN.to_vec()])
            .connect(server_name, stream),
    }
    .into_fallible();
    let tls_stream = match timeout(timeouts.tls_handshake, handshake).await {
        Ok(Ok(tls_stream)) => tls_stream,
        // Our alert is on its way to the server.
        Ok(Err((error, _upstream))) => {
            return Err(ConnectFailure {
                reason: tls::failure_reason(&error),
                error: tls::describe(&error),
            });
        }
        Err(_elapsed) => {
            return Err(ConnectFailure {
                reason: FailureReason::TlsHandshakeTimeout,
                error: format!("no handshake within {:?}", timeouts.tls_handshake),
            });
        }
    };
    let Some(peer) = tls::peer_identity(tls_stream.get_ref().1) else {
        // The verifier accepted a SPIFFE ID, so this cannot happen; never proxy unchecked.
        return Err(ConnectFailure {
            reason: FailureReason::PeerIdentityMismatch,
            error: "the verified server certificate has no SPIFFE ID".into(),
        });
    };
    let carrying_http1 = tls_stream.get_ref().1.alpn_protocol() == Some(tls::MESH_H2_ALPN);
    Ok(Established {
        io: Box::new(tls_stream),
        carrying_http1,
        mtls: Some(MutualTls {
            local: local_tls.identity.clone(),
            peer,
            workload: destination.policy.workload.name.clone(),
        }),
    })
}

/// Connects within the connect timeout; the connection gets TCP keepalive as configured.
pub async fn connect(
    addr: SocketAddr,
    source: Source,
    timeouts: &Timeouts,
) -> Result<TcpStream, ConnectFailure> {
    let stream = dial(addr, source, timeouts.connect).await?;
    keepalive::enable(&stream, timeouts.tcp_keepalive);
    Ok(stream)
}

/// Connects within `connect_timeout`, for a short exchange (no keepalive).
pub async fn dial(
    addr: SocketAddr,
    source: Source,
    connect_timeout: Duration,
) -> Result<TcpStream, ConnectFailure> {
    let attempt = async {
        let socket = match source {
            Source::Any => new_socket(addr)?,
            Source::Passthrough => passthrough_socket(addr)?,
        };
        socket.connect(addr).await
    };
    match timeout(connect_timeout, attempt).await {
        Ok(Ok(stream)) => {
            // Relayed small writes must not wait for Nagle: the app already chose its batching.
            if let Err(error) = stream.set_nodelay(true) {
                debug!(%error, "cannot set TCP_NODELAY");
            }
            Ok(stream)
        }
        Ok(Err(error)) => Err(ConnectFailure {
            reason: if error.kind() == io::ErrorKind::ConnectionRefused {
                FailureReason::ConnectRefused
            } else {
                FailureReason::ConnectError
            },
            error: error.to_string(),
        }),
        Err(_elapsed) => Err(ConnectFailure {
            reason: FailureReason::ConnectTimeout,
            error: format!("no answer within {connect_timeout:?}"),
        }),
    }
}

fn new_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
}

fn passthrough_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = new_socket(addr)?;
    let source = match addr {
        SocketAddr::V4(_) => IpAddr::V4(PASSTHROUGH_SOURCE_V4),
        SocketAddr::V6(_) => IpAddr::V6(PASSTHROUGH_SOURCE_V6),
    };
    socket.bind(SocketAddr::new(source, 0)).map_err(|error| {
        if error.raw_os_error() == Some(rustix::io::Errno::ADDRNOTAVAIL.raw_os_error()) {
            io::Error::new(
                error.kind(),
                format!(
                    "passthrough source {source} is not an address of this pod's lo \
                     (`sidecar init` adds ::6): {error}"
                ),
            )
        } else {
            error
        }
    })?;
    Ok(socket)
}

/// Closes with RST instead of FIN: a zero linger makes close() abort the connection, so the
/// peer fails fast as on a refused connect instead of waiting on a half-open one.
pub fn reset(stream: TcpStream) {
    if let Err(error) = sockopt::set_socket_linger(&stream, Some(Duration::ZERO)) {
        debug!(%error, "cannot set SO_LINGER; closing with FIN instead of RST");
    }
    drop(stream);
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn passthrough_connections_come_from_the_reserved_address() -> anyhow::Result<()> {
        let app = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = app.local_addr()?;
        let _upstream = connect(addr, Source::Passthrough, &crate::testing::timeouts())
            .await
            .map_err(|failure| anyhow::anyhow!(failure.error))?;
        let (_accepted, peer) = app.accept().await?;
        assert_eq!(peer.ip(), IpAddr::V4(PASSTHROUGH_SOURCE_V4));
        Ok(())
    }
}
