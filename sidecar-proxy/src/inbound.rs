//! The inbound side: accept a connection for the app, find the port it was for, apply the
//! port's mode (STRICT: mesh mTLS only; PERMISSIVE: mTLS or plaintext, told apart by a bounded
//! sniff), terminate mTLS and authorize the peer, all once for the connection; then tell what
//! the peer speaks (the port's declared protocol, or bounded detection racing the app's
//! greeting). A port with `tls` terminates TLS for any client with its own certificate (mesh
//! mTLS still recognised by its ALPN) and refuses plaintext. A peer's sidecar may open its
//! HTTP/2 connection carrying HTTP/1.1 requests (ALPN `MESH_H2_ALPN`; not on a `tcp` port).
//! HTTP is served request by request (`http::inbound`: pooled connections to the app, the
//! port's rate limit, the destination's request metrics, access lines); anything else is
//! relayed as TCP. Either way the app is reached at the original destination (or the port's
//! `forwardTo` loopback address) from the passthrough address.
use std::{net::SocketAddr, sync::Arc};

use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::timeout,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::{
    accept::listener::Handler,
    detect::client_hello::{Protocol, Rewound, sniff},
    http::{
        self, AppPool, AppProtocol, PortProtocol, Raced, detect_racing_server,
        inbound::InboundConnection, metrics::InboundLabels, route_policy::RateLimiter,
    },
    inputs::{Entrance, ProxyInputs},
    io::relay::{Close, IntoTcp, record_refusal, refuse, relay},
    io::upstream::{self, Source},
    mesh::MeshTls,
    mesh::authz::Authorization,
    mesh::config::InboundMode,
    mesh::identity::SpiffeId,
    telemetry::access_log::AccessLog,
    telemetry::metrics::{Direction, FailureReason, SecurityPolicy, TcpLabels},
    tls::{self, MESH_H2_ALPN},
};

const DIRECTION: Direction = Direction::Inbound;

pub struct InboundProxy {
    pub inputs: Arc<ProxyInputs>,
    pub entrance: Entrance,
    /// Keep-alive connections to the app, for HTTP.
    pub app_pool: Arc<AppPool>,
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
    /// The peer's sidecar opened it to carry HTTP/1.1 requests over HTTP/2 (mesh mTLS with
    /// [`MESH_H2_ALPN`]): their marks are honoured.
    carrying_http1: bool,
    /// From the config the connection began with: the port's declared protocol, and whether
    /// HTTP requests get access lines.
    port_protocol: PortProtocol,
    access_log: bool,
    log: AccessLog,
}

impl Handler for InboundProxy {
    async fn handle(self: Arc<Self>, downstream: TcpStream, peer: SocketAddr) {
        let Some((mut downstream, orig_dst, mut log)) =
            self.inputs.enter(&self.entrance, downstream, peer)
        else {
            return;
        };

        // One snapshot for the whole connection: a reload midway changes nothing here.
        let mesh = self.inputs.mesh.current();
        let policy = mesh.inbound_policy(orig_dst.port());
        log.inbound_mode = Some(policy.mode);
        let server_tls = mesh.server_tls(orig_dst.port());
        // A STRICT or `tls` port accepts nothing but a ClientHello, so it can afford to wait for
        // one; a PERMISSIVE port must not stall a server-speaks-first protocol.
        let first_bytes_timeout = match policy.mode {
            _ if server_tls.is_some() => self.inputs.timeouts.tls_handshake,
            InboundMode::Strict => self.inputs.timeouts.tls_handshake,
            InboundMode::Permissive => self.inputs.timeouts.sniff,
        };
        let sniffed = match sniff(
            &mut downstream,
            first_bytes_timeout,
            self.inputs.timeouts.tls_handshake,
        )
        .await
        {
            Ok(sniffed) => sniffed,
            Err(error) => {
                return self
                    .inputs
                    .refuse(downstream, &log, FailureReason::SniffFailed, error);
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
            carrying_http1: false,
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
                    return self.inputs.refuse(
                        downstream,
                        &log,
                        FailureReason::Unauthorized,
                        denial,
                    );
                }
                let downstream = Rewound::new(sniffed.prefix, downstream);
                self.terminate_server_tls(downstream, server_tls.clone(), admitted(log))
                    .await;
            }
            _ if server_tls.is_some() => {
                let error = "the port serves TLS (`tls`): plaintext is refused";
                self.inputs
                    .refuse(downstream, &log, FailureReason::PlaintextRefused, error);
            }
            (protocol, _) if policy.mode == InboundMode::Strict => {
                let error = match protocol {
                    Protocol::Tls => "TLS without the mesh ALPN is not mesh mTLS",
                    _ => "not a mesh mTLS ClientHello",
                };
                self.inputs
                    .refuse(downstream, &log, FailureReason::PlaintextRefused, error);
            }
            // PERMISSIVE: plaintext, or the app's own TLS, passes through as it is.
            _ => {
                if let Err(denial) = policy.authorization.check(None) {
                    return self.inputs.refuse(
                        downstream,
                        &log,
                        FailureReason::Unauthorized,
                        denial,
                    );
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
    /// (and logged, counted) here. Boxed: the stream is 1.2 KiB, and each layer serving it
    /// keeps its own copy of its arguments in its future, so unboxed it sized every inbound
    /// TLS connection's task several times over.
    async fn accept_tls(
        &self,
        downstream: Rewound<TcpStream>,
        config: Arc<ServerConfig>,
        log: &AccessLog,
    ) -> Option<Box<TlsStream<Rewound<TcpStream>>>> {
        let handshake = TlsAcceptor::from(config).accept(downstream).into_fallible();
        match timeout(self.inputs.timeouts.tls_handshake, handshake).await {
            Ok(Ok(tls_stream)) => Some(Box::new(tls_stream)),
            Ok(Err((error, downstream))) => {
                // FIN, not RST: the alert saying why must reach the client first.
                let reason = tls::failure_reason(&error);
                refuse(
                    &self.inputs.metrics,
                    log,
                    reason,
                    tls::describe(&error),
                    downstream,
                    Close::Graceful,
                );
                None
            }
            Err(_elapsed) => {
                let error = format!(
                    "no handshake within {:?}",
                    self.inputs.timeouts.tls_handshake
                );
                record_refusal(
                    &self.inputs.metrics,
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
        // A port declared `tcp` is relayed as it is: never HTTP/2 the peer's sidecar made.
        let configs = &local_tls.server_configs;
        let config = match admitted.port_protocol {
            PortProtocol::Tcp => configs.mesh.clone(),
            _ => configs.carrying.clone(),
        };
        let Some(tls_stream) = self.accept_tls(downstream, config, log).await else {
            return;
        };
        self.inputs
            .metrics
            .record_inbound_handshake(tls::handshake_kind(tls_stream.get_ref().1));
        let Some(client_identity) = tls::peer_identity(tls_stream.get_ref().1) else {
            // The verifier requires a SPIFFE ID, so this cannot happen; never proxy unchecked.
            let error = "the verified client certificate has no SPIFFE ID";
            return self
                .inputs
                .refuse(tls_stream, log, FailureReason::PeerIdentityMismatch, error);
        };
        log.src_principal = Some(client_identity.clone());
        log.security_policy = SecurityPolicy::MutualTls;
        if let Err(denial) = authorization.check(Some(&client_identity)) {
            return self
                .inputs
                .refuse(tls_stream, log, FailureReason::Unauthorized, denial);
        }
        admitted.mutual_tls = Some((client_identity, local_tls.identity.clone()));
        if tls_stream.get_ref().1.alpn_protocol() == Some(MESH_H2_ALPN) {
            admitted.carrying_http1 = true;
            admitted.port_protocol = PortProtocol::Http2;
        }
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
                let app =
                    upstream::connect(admitted.app, Source::Passthrough, &self.inputs.timeouts);
                match detect_racing_server(
                    &mut downstream,
                    &mut prefix,
                    self.inputs.timeouts.sniff,
                    app,
                )
                .await
                {
                    Ok(detected) => detected,
                    Err(error) => {
                        let log = &admitted.log;
                        return self.inputs.refuse(
                            downstream,
                            log,
                            FailureReason::SniffFailed,
                            error,
                        );
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
            carrying_http1,
            access_log,
            mut log,
            ..
        } = admitted;
        let mutual_tls = mutual_tls.as_ref().map(|(peer, us)| (peer, us));
        match detected {
            Raced::Http(protocol) => {
                let connection = InboundConnection {
                    inputs: self.inputs.clone(),
                    app_pool: self.app_pool.clone(),
                    peer,
                    orig_dst,
                    app,
                    rate_limiter,
                    access_log,
                    labels: InboundLabels::new(&self.inputs.local, mutual_tls),
                    carrying_http1,
                };
                http::inbound::serve(connection, downstream, protocol, log).await;
            }
            Raced::Opaque { upstream, greeting } => {
                // To the app at the original destination (its pod IP, not 127.0.0.1: apps
                // bound to the pod IP must work) unless the port says `forwardTo`, from the
                // passthrough address.
                let connected = match upstream {
                    Some(connected) => connected,
                    None => {
                        upstream::connect(app, Source::Passthrough, &self.inputs.timeouts).await
                    }
                };
                let app = match connected {
                    Ok(app) => app,
                    Err(failure) => {
                        return self
                            .inputs
                            .refuse(downstream, &log, failure.reason, failure.error);
                    }
                };
                let mut labels = TcpLabels::new(DIRECTION, &self.inputs.local);
                if let Some((peer, us)) = mutual_tls {
                    labels = labels.with_mutual_tls(peer, us);
                }
                let counters = self.inputs.metrics.tcp(&labels);
                let app = Rewound::new(greeting, app);
                relay(
                    downstream,
                    app,
                    counters,
                    &self.inputs.metrics,
                    &mut log,
                    self.inputs.timeouts.idle,
                    &*self.inputs.capture,
                )
                .await;
            }
        }
    }
}
