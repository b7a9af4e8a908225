//! The inbound side: accept a connection for the app, find the port it was for, apply the
//! port's mode (STRICT: mesh mTLS only; PERMISSIVE: mTLS or plaintext, told apart by a bounded
//! sniff), terminate mTLS and authorize the peer, all once for the connection; then tell what
//! the peer speaks (the port's declared protocol, or bounded detection racing the app's
//! greeting). A port with `tls` terminates TLS for any client with its own certificate (mesh
//! mTLS still recognised by its ALPN) and refuses plaintext. HTTP is served request by request
//! (`http::inbound`: pooled connections to the app, the port's rate limit, the destination's
//! request metrics, access lines); anything else is relayed as TCP. Either way the app is
//! reached at the original destination (or the port's `forwardTo` loopback address) from the
//! passthrough address.
use std::{fmt::Display, net::SocketAddr, sync::Arc};

use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::timeout,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::{
    Timeouts,
    accept::listener::{Handler, is_own_listener},
    accept::orig_dst::OriginalDst,
    capture::CaptureProbe,
    http::{
        self, AppPool, AppProtocol, PortProtocol, Raced, detect_racing_server,
        inbound::InboundConnection, metrics::InboundLabels, route_policy::RateLimiter,
    },
    io::relay::{Close, IntoTcp, record_refusal, refuse, relay},
    io::upstream::{self, Source},
    lifecycle::drain::Drain,
    mesh::authz::Authorization,
    mesh::identity::SpiffeId,
    mesh::{MeshHandle, MeshTls},
    mesh_config::InboundMode,
    sniff::{Protocol, Rewound, sniff},
    telemetry::access_log::AccessLog,
    telemetry::metrics::{
        Direction, FailureReason, LocalWorkload, Metrics, SecurityPolicy, TcpLabels,
    },
    tls,
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
    /// Keep-alive connections to the app, for HTTP.
    pub app_pool: Arc<AppPool>,
    /// Tells HTTP connections to finish while the proxy drains; serves upgraded connections.
    pub drain: Arc<Drain>,
    /// Asked whether a plain relay may splice (the capture's sockmap shortcut).
    pub capture: Arc<dyn CaptureProbe>,
}

/// A connection its port's mode and allow rules let in, and what serving it needs.
struct Admitted {
    peer: SocketAddr,
    orig_dst: SocketAddr,
    /// Where the app is reached: the original destination, or the port's `forwardTo`.
    app: SocketAddr,
    /// The port's `rateLimit`, for its HTTP requests.
    rate_limiter: Option<Arc<RateLimiter>>,
    /// (the peer, us), when the connection is mesh mTLS.
    mutual_tls: Option<(SpiffeId, SpiffeId)>,
    /// From the config the connection began with: the port's declared protocol, and whether
    /// HTTP requests get access lines.
    port_protocol: PortProtocol,
    access_log: bool,
    log: AccessLog,
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
        let server_tls = mesh.server_tls(orig_dst.port());
        // A STRICT or `tls` port accepts nothing but a ClientHello, so it can afford to wait for
        // one; a PERMISSIVE port must not stall a server-speaks-first protocol.
        let first_bytes_timeout = match policy.mode {
            _ if server_tls.is_some() => self.timeouts.tls_handshake,
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
        let routes = mesh.routes();
        let app = match policy.forward_to {
            Some(loopback) => SocketAddr::new(loopback, orig_dst.port()),
            None => orig_dst,
        };
        let admitted = |log| Admitted {
            peer,
            orig_dst,
            app,
            rate_limiter: mesh.inbound_rate_limiter(orig_dst.port()),
            mutual_tls: None,
            port_protocol: routes.config().port_protocol(orig_dst.port()),
            access_log: routes.config().access_log,
            log,
        };

        match (sniffed.protocol, mesh.tls()) {
            (Protocol::MeshTls, Some(local_tls)) => {
                let downstream = Rewound::new(sniffed.prefix, downstream);
                let authorization = &policy.authorization;
                self.terminate_mtls(downstream, local_tls, authorization, admitted(log))
                    .await;
            }
            // Clients outside the mesh have no SPIFFE ID (even with a client certificate): they
            // are authorized as plaintext peers are.
            (Protocol::Tls, _) if let Some(server_tls) = server_tls => {
                if let Err(denial) = policy.authorization.check(None) {
                    return self.refuse(downstream, &log, FailureReason::Unauthorized, denial);
                }
                let downstream = Rewound::new(sniffed.prefix, downstream);
                self.terminate_server_tls(downstream, server_tls.clone(), admitted(log))
                    .await;
            }
            _ if server_tls.is_some() => {
                let error = "the port serves TLS (`tls`): plaintext is refused";
                self.refuse(downstream, &log, FailureReason::PlaintextRefused, error);
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
                // Silent for the whole sniff: a protocol whose server speaks first.
                let client_silent = sniffed.prefix.is_empty();
                self.serve(downstream, sniffed.prefix, client_silent, admitted(log))
                    .await;
            }
        }
    }
}

impl InboundProxy {
    /// The server side of a TLS handshake within the handshake timeout; a failure is refused
    /// (and logged, counted) here.
    async fn accept_tls(
        &self,
        downstream: Rewound<TcpStream>,
        config: Arc<ServerConfig>,
        log: &AccessLog,
    ) -> Option<TlsStream<Rewound<TcpStream>>> {
        let handshake = TlsAcceptor::from(config).accept(downstream).into_fallible();
        match timeout(self.timeouts.tls_handshake, handshake).await {
            Ok(Ok(tls_stream)) => Some(tls_stream),
            Ok(Err((error, downstream))) => {
                // FIN, not RST: the alert saying why must reach the client first.
                let reason = tls::failure_reason(&error);
                refuse(
                    &self.metrics,
                    log,
                    reason,
                    tls::describe(&error),
                    downstream,
                    Close::Graceful,
                );
                None
            }
            Err(_elapsed) => {
                let error = format!("no handshake within {:?}", self.timeouts.tls_handshake);
                record_refusal(
                    &self.metrics,
                    log,
                    FailureReason::TlsHandshakeTimeout,
                    error,
                );
                None
            }
        }
    }

    async fn terminate_mtls(
        &self,
        downstream: Rewound<TcpStream>,
        local_tls: &MeshTls,
        authorization: &Authorization,
        mut admitted: Admitted,
    ) {
        let log = &mut admitted.log;
        log.dst_principal = Some(local_tls.identity.clone());
        let Some(tls_stream) = self
            .accept_tls(downstream, local_tls.server_config.clone(), log)
            .await
        else {
            return;
        };
        self.metrics
            .record_inbound_handshake(tls::handshake_kind(tls_stream.get_ref().1));
        let Some(client_identity) = tls::peer_identity(tls_stream.get_ref().1) else {
            // The verifier requires a SPIFFE ID, so this cannot happen; never proxy unchecked.
            let error = "the verified client certificate has no SPIFFE ID";
            return self.refuse(tls_stream, log, FailureReason::PeerIdentityMismatch, error);
        };
        log.src_principal = Some(client_identity.clone());
        log.security_policy = SecurityPolicy::MutualTls;
        if let Err(denial) = authorization.check(Some(&client_identity)) {
            return self.refuse(tls_stream, log, FailureReason::Unauthorized, denial);
        }
        admitted.mutual_tls = Some((client_identity, local_tls.identity.clone()));
        self.serve(tls_stream, Vec::new(), false, admitted).await;
    }

    /// TLS with the port's own certificate, for a client outside the mesh; then served as a
    /// plaintext peer's connection, in the protocol ALPN agreed on if any.
    async fn terminate_server_tls(
        &self,
        downstream: Rewound<TcpStream>,
        server_config: Arc<ServerConfig>,
        mut admitted: Admitted,
    ) {
        let Some(tls_stream) = self
            .accept_tls(downstream, server_config, &admitted.log)
            .await
        else {
            return;
        };
        match tls_stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => admitted.port_protocol = PortProtocol::Http2,
            Some(b"http/1.1") => admitted.port_protocol = PortProtocol::Http,
            _ => {}
        }
        self.serve(tls_stream, Vec::new(), false, admitted).await;
    }

    /// Serves an admitted connection whose first bytes (`prefix`) were read: as HTTP when the
    /// port declares it or detection finds it, else relayed as TCP. `client_silent`: the peer
    /// said nothing for the whole sniff, so its server speaks first (no detection).
    async fn serve<D>(
        &self,
        mut downstream: D,
        mut prefix: Vec<u8>,
        client_silent: bool,
        admitted: Admitted,
    ) where
        D: AsyncRead + AsyncWrite + Send + Unpin + IntoTcp + 'static,
    {
        let not_http = Raced::Opaque {
            upstream: None,
            greeting: Vec::new(),
        };
        let detected = match admitted.port_protocol {
            PortProtocol::Http => Raced::Http(AppProtocol::Http1),
            PortProtocol::Http2 => Raced::Http(AppProtocol::Http2),
            PortProtocol::Tcp => not_http,
            PortProtocol::Detect if client_silent => not_http,
            PortProtocol::Detect => {
                let app = upstream::connect(admitted.app, Source::Passthrough, &self.timeouts);
                match detect_racing_server(&mut downstream, &mut prefix, self.timeouts.sniff, app)
                    .await
                {
                    Ok(detected) => detected,
                    Err(error) => {
                        let log = &admitted.log;
                        return self.refuse(downstream, log, FailureReason::SniffFailed, error);
                    }
                }
            }
        };
        let downstream = Rewound::new(prefix, downstream);
        let Admitted {
            peer,
            orig_dst,
            app,
            rate_limiter,
            mutual_tls,
            access_log,
            mut log,
            ..
        } = admitted;
        let mutual_tls = mutual_tls.as_ref().map(|(peer, us)| (peer, us));
        match detected {
            Raced::Http(protocol) => {
                let connection = InboundConnection {
                    metrics: self.metrics.clone(),
                    app_pool: self.app_pool.clone(),
                    timeouts: self.timeouts,
                    drain: self.drain.clone(),
                    peer,
                    orig_dst,
                    app,
                    rate_limiter,
                    access_log,
                    labels: InboundLabels::new(&self.local, mutual_tls),
                };
                http::inbound::serve(connection, downstream, protocol, log).await;
            }
            Raced::Opaque { upstream, greeting } => {
                // To the app at the original destination (its pod IP, not 127.0.0.1: apps
                // bound to the pod IP must work) unless the port says `forwardTo`, from the
                // passthrough address.
                let connected = match upstream {
                    Some(connected) => connected,
                    None => upstream::connect(app, Source::Passthrough, &self.timeouts).await,
                };
                let app = match connected {
                    Ok(app) => app,
                    Err(failure) => {
                        return self.refuse(downstream, &log, failure.reason, failure.error);
                    }
                };
                let mut labels = TcpLabels::new(DIRECTION, &self.local);
                if let Some((peer, us)) = mutual_tls {
                    labels = labels.with_mutual_tls(peer, us);
                }
                let counters = self.metrics.tcp(&labels);
                let app = Rewound::new(greeting, app);
                relay(
                    downstream,
                    app,
                    counters,
                    &self.metrics,
                    &mut log,
                    self.timeouts.idle,
                    &*self.capture,
                )
                .await;
            }
        }
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
