//! The inbound side: accept a connection for the app, find the port it was for, apply the
//! port's mode (STRICT: mesh mTLS only; PERMISSIVE: mTLS or plaintext, told apart by a bounded
//! sniff), terminate mTLS, authorize the peer, and forward to the app at the original
//! destination from the passthrough source address.
use std::{fmt::Display, net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::timeout,
};
use tokio_rustls::TlsAcceptor;

use super::{
    Timeouts,
    access_log::AccessLog,
    authz::Authorization,
    listener::{Handler, is_own_listener},
    mesh::{MeshHandle, MeshTls},
    mesh_config::InboundMode,
    metrics::{Direction, FailureReason, LocalWorkload, Metrics, SecurityPolicy, TcpLabels},
    orig_dst::OriginalDst,
    relay::{Close, IntoTcp, record_refusal, refuse, relay},
    sniff::{Protocol, Rewound, sniff},
    tls,
    upstream::{self, Source},
};

const DIRECTION: Direction = Direction::Inbound;

pub struct InboundProxy {
    pub orig_dst: Arc<dyn OriginalDst>,
    pub mesh: Arc<MeshHandle>,
    pub metrics: Arc<Metrics>,
    pub local: LocalWorkload,
    pub timeouts: Timeouts,
    /// The proxy's own listeners, to recognise a connection aimed back at the proxy.
    pub listen_addrs: Vec<SocketAddr>,
}

impl Handler for InboundProxy {
    async fn handle(self: Arc<Self>, mut downstream: TcpStream, peer: SocketAddr) {
        let mut log = AccessLog::new(DIRECTION, peer, "unknown");
        let orig_dst = match self.orig_dst.lookup(&downstream) {
            Ok((addr, source)) => {
                log.orig_dst_source = source;
                addr
            }
            Err(error) => {
                return self.refuse(downstream, &log, FailureReason::OrigDstUnknown, error);
            }
        };
        log.orig_dst = Some(orig_dst);
        if is_own_listener(&self.listen_addrs, orig_dst, &downstream) {
            let error = format!("{orig_dst} is this proxy's inbound listener");
            return self.refuse(downstream, &log, FailureReason::Loop, error);
        }

        // One snapshot for the whole connection: a reload midway changes nothing here.
        let mesh = self.mesh.current();
        let policy = mesh.inbound_policy(orig_dst.port());
        log.inbound_mode = Some(policy.mode);
        // A STRICT port accepts nothing but a ClientHello, so it can afford to wait for one; a
        // PERMISSIVE port must not stall a server-speaks-first protocol.
        let first_bytes_timeout = match policy.mode {
            InboundMode::Strict => self.timeouts.tls_handshake,
            InboundMode::Permissive => self.timeouts.sniff,
        };
        let sniffed = match sniff(
            &mut downstream,
            first_bytes_timeout,
            self.timeouts.tls_handshake,
        )
        .await
        {
            Ok(sniffed) => sniffed,
            Err(error) => {
                return self.refuse(downstream, &log, FailureReason::SniffFailed, error);
            }
        };
        log.protocol = Some(sniffed.protocol);
        let downstream = Rewound::new(sniffed.prefix, downstream);
        let labels = TcpLabels::new(DIRECTION, &self.local);

        match (sniffed.protocol, mesh.tls()) {
            (Protocol::MeshTls, Some(local_tls)) => {
                self.terminate_mtls(
                    downstream,
                    orig_dst,
                    local_tls,
                    &policy.authorization,
                    labels,
                    log,
                )
                .await;
            }
            (protocol, _) if policy.mode == InboundMode::Strict => {
                let error = match protocol {
                    Protocol::Tls => "TLS without the mesh ALPN is not mesh mTLS",
                    _ => "not a mesh mTLS ClientHello",
                };
                self.refuse(downstream, &log, FailureReason::PlaintextRefused, error);
            }
            // PERMISSIVE: plaintext, or the app's own TLS, passes through as it is.
            _ => {
                if let Err(denial) = policy.authorization.check(None) {
                    return self.refuse(downstream, &log, FailureReason::Unauthorized, denial);
                }
                self.forward(downstream, orig_dst, labels, log).await;
            }
        }
    }
}

impl InboundProxy {
    async fn terminate_mtls(
        &self,
        downstream: Rewound<TcpStream>,
        orig_dst: SocketAddr,
        local_tls: &MeshTls,
        authorization: &Authorization,
        labels: TcpLabels,
        mut log: AccessLog,
    ) {
        log.dst_principal = Some(local_tls.identity.clone());
        let acceptor = TlsAcceptor::from(local_tls.server_config.clone());
        let handshake = acceptor.accept(downstream).into_fallible();
        let tls_stream = match timeout(self.timeouts.tls_handshake, handshake).await {
            Ok(Ok(tls_stream)) => tls_stream,
            Ok(Err((error, downstream))) => {
                // FIN, not RST: the alert saying why must reach the client first.
                let reason = tls::failure_reason(&error);
                return refuse(
                    &self.metrics,
                    &log,
                    reason,
                    tls::describe(&error),
                    downstream,
                    Close::Graceful,
                );
            }
            Err(_elapsed) => {
                let error = format!("no handshake within {:?}", self.timeouts.tls_handshake);
                return record_refusal(
                    &self.metrics,
                    &log,
                    FailureReason::TlsHandshakeTimeout,
                    error,
                );
            }
        };
        self.metrics
            .record_inbound_handshake(tls::handshake_kind(tls_stream.get_ref().1));
        let Some(client_identity) = tls::peer_identity(tls_stream.get_ref().1) else {
            // The verifier requires a SPIFFE ID, so this cannot happen; never proxy unchecked.
            let error = "the verified client certificate has no SPIFFE ID";
            return self.refuse(tls_stream, &log, FailureReason::PeerIdentityMismatch, error);
        };
        log.src_principal = Some(client_identity.clone());
        log.security_policy = SecurityPolicy::MutualTls;
        if let Err(denial) = authorization.check(Some(&client_identity)) {
            return self.refuse(tls_stream, &log, FailureReason::Unauthorized, denial);
        }
        let labels = labels.with_mutual_tls(&client_identity, &local_tls.identity);
        self.forward(tls_stream, orig_dst, labels, log).await;
    }

    /// To the app at the original destination (its pod IP, not 127.0.0.1: apps bound to the
    /// pod IP must work), from the passthrough address so capture lets it through.
    async fn forward<D>(
        &self,
        downstream: D,
        orig_dst: SocketAddr,
        labels: TcpLabels,
        mut log: AccessLog,
    ) where
        D: AsyncRead + AsyncWrite + Unpin + IntoTcp,
    {
        let upstream = match upstream::connect(orig_dst, Source::Passthrough, &self.timeouts).await
        {
            Ok(upstream) => upstream,
            Err(failure) => {
                return self.refuse(downstream, &log, failure.reason, failure.error);
            }
        };
        let counters = self.metrics.tcp(&labels);
        relay(
            downstream,
            upstream,
            counters,
            &self.metrics,
            &mut log,
            self.timeouts.idle,
        )
        .await;
    }

    fn refuse(
        &self,
        stream: impl IntoTcp,
        log: &AccessLog,
        reason: FailureReason,
        error: impl Display,
    ) {
        refuse(&self.metrics, log, reason, error, stream, Close::Reset);
    }
}
