//! The outbound side: accept a captured connection, find where it was going, and connect
//! there: with mTLS when the mesh config says the destination is a mesh workload, plainly
//! otherwise; then relay both ways.
use std::{net::SocketAddr, sync::Arc};

use rustls::pki_types::ServerName;
use tokio::{net::TcpStream, time::timeout};
use tokio_rustls::TlsConnector;

use super::{
    Timeouts,
    access_log::AccessLog,
    listener::{Handler, is_own_listener},
    mesh::{MeshDestination, MeshHandle, MeshTls},
    metrics::{Direction, FailureReason, LocalWorkload, Metrics, SecurityPolicy, TcpLabels},
    orig_dst::OriginalDst,
    relay::{Close, refuse, relay},
    tls,
    upstream::{self, Source},
};

const DIRECTION: Direction = Direction::Outbound;

pub struct OutboundProxy {
    pub orig_dst: Arc<dyn OriginalDst>,
    pub mesh: Arc<MeshHandle>,
    pub metrics: Arc<Metrics>,
    pub local: LocalWorkload,
    pub timeouts: Timeouts,
    /// The proxy's own listeners, to recognise a connection aimed back at the proxy.
    pub listen_addrs: Vec<SocketAddr>,
}

impl Handler for OutboundProxy {
    async fn handle(self: Arc<Self>, app: TcpStream, peer: SocketAddr) {
        let mut log = AccessLog::new(DIRECTION, peer, "unknown");
        let orig_dst = match self.orig_dst.lookup(&app) {
            Ok((addr, source)) => {
                log.orig_dst_source = source;
                addr
            }
            Err(error) => return self.refuse(app, &log, FailureReason::OrigDstUnknown, error),
        };
        log.orig_dst = Some(orig_dst);

        if is_own_listener(&self.listen_addrs, orig_dst, &app) {
            let error = format!("{orig_dst} is this proxy's outbound listener");
            return self.refuse(app, &log, FailureReason::Loop, error);
        }

        // One snapshot for the whole connection: a reload midway changes nothing here.
        let mesh = self.mesh.current();
        let mesh_route = mesh
            .tls()
            .and_then(|tls| Some((tls, tls.destination(orig_dst)?)));

        let upstream = match upstream::connect(orig_dst, Source::Any, self.timeouts.connect).await {
            Ok(upstream) => upstream,
            Err(failure) => return self.refuse(app, &log, failure.reason, failure.error),
        };

        let labels = TcpLabels::new(DIRECTION, &self.local);
        match mesh_route {
            None => {
                let counters = self.metrics.tcp(&labels);
                relay(app, upstream, counters, &self.metrics, &log).await;
            }
            Some((local_tls, destination)) => {
                self.originate_mtls(
                    app,
                    upstream,
                    orig_dst,
                    (local_tls, destination),
                    labels,
                    log,
                )
                .await;
            }
        }
    }
}

impl OutboundProxy {
    async fn originate_mtls(
        &self,
        app: TcpStream,
        upstream: TcpStream,
        orig_dst: SocketAddr,
        (local_tls, destination): (&MeshTls, &MeshDestination),
        labels: TcpLabels,
        mut log: AccessLog,
    ) {
        log.dst_workload = Some(destination.workload.name.clone());
        log.src_principal = Some(local_tls.identity.clone());
        // Mesh peers are checked by SPIFFE ID; the IP only satisfies the API (no SNI is sent).
        let server_name = ServerName::IpAddress(orig_dst.ip().into());
        let connector = TlsConnector::from(destination.client_config.clone());
        let handshake = connector.connect(server_name, upstream).into_fallible();
        let tls_stream = match timeout(self.timeouts.tls_handshake, handshake).await {
            Ok(Ok(tls_stream)) => tls_stream,
            Ok(Err((error, _upstream))) => {
                // Our alert is on its way to the server; the app gets a reset.
                let reason = tls::failure_reason(&error);
                return self.refuse(app, &log, reason, tls::describe(&error));
            }
            Err(_elapsed) => {
                let error = format!("no handshake within {:?}", self.timeouts.tls_handshake);
                return self.refuse(app, &log, FailureReason::TlsHandshakeTimeout, error);
            }
        };
        let Some(server_identity) = tls::peer_identity(tls_stream.get_ref().1) else {
            // The verifier accepted a SPIFFE ID, so this cannot happen; never proxy unchecked.
            let error = "the verified server certificate has no SPIFFE ID";
            return self.refuse(app, &log, FailureReason::PeerIdentityMismatch, error);
        };
        let labels = labels
            .with_mutual_tls(&local_tls.identity, &server_identity)
            .with_destination_workload(&destination.workload.name);
        log.dst_principal = Some(server_identity);
        log.security_policy = SecurityPolicy::MutualTls;
        let counters = self.metrics.tcp(&labels);
        relay(app, tls_stream, counters, &self.metrics, &log).await;
    }

    fn refuse(
        &self,
        app: TcpStream,
        log: &AccessLog,
        reason: FailureReason,
        error: impl std::fmt::Display,
    ) {
        refuse(&self.metrics, log, reason, error, app, Close::Reset);
    }
}

#[cfg(test)]
mod tests {
    use std::{future::pending, time::Duration};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::proxy::{
        listener::{AcceptLoops, bind_listeners, local_addrs},
        orig_dst::SockoptOrigDst,
        testing::*,
    };

    /// A plaintext proxy on an ephemeral loopback port sending everything to `target`.
    fn start_proxy(
        target: impl FnOnce(SocketAddr) -> SocketAddr,
    ) -> anyhow::Result<(SocketAddr, Arc<Metrics>)> {
        start_proxy_with_timeout(target, PATIENCE)
    }

    fn start_proxy_with_timeout(
        target: impl FnOnce(SocketAddr) -> SocketAddr,
        connect: Duration,
    ) -> anyhow::Result<(SocketAddr, Arc<Metrics>)> {
        let metrics = Arc::new(Metrics::new(&local("client"))?);
        let timeouts = Timeouts {
            connect,
            ..timeouts()
        };
        let running = start_outbound(target, plaintext_mesh(), metrics, timeouts)?;
        Ok((running.addr, running.metrics))
    }

    fn failures(metrics: &Metrics, reason: FailureReason) -> u64 {
        metrics.failure_count(DIRECTION, reason)
    }

    fn opened(metrics: &Metrics) -> u64 {
        metrics
            .tcp(&TcpLabels::new(DIRECTION, &local("client")))
            .opened
            .get()
    }

    #[tokio::test]
    async fn client_half_close_still_gets_the_full_response() -> anyhow::Result<()> {
        let echo = start_echo_after_eof().await?;
        let (proxy, _metrics) = start_proxy(|_| echo)?;
        // Large enough to span many reads and socket buffers.
        let request: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
        // The server answers only after the client's FIN, so this proves FIN (not RST) reached it.
        assert_eq!(round_trip(proxy, &request).await?, request);
        Ok(())
    }

    #[tokio::test]
    async fn server_closing_first_reaches_the_client_as_eof() -> anyhow::Result<()> {
        let server = TcpListener::bind((LOCALHOST, 0)).await?;
        let server_addr = server.local_addr()?;
        tokio::spawn(async move {
            if let Ok((mut stream, _)) = server.accept().await {
                let _ = stream.write_all(b"banner").await;
                // Dropped here: a clean close with nothing unread, so the server sends FIN.
            }
        });
        let (proxy, _metrics) = start_proxy(|_| server_addr)?;

        let mut client = TcpStream::connect(proxy).await?;
        let mut received = Vec::new();
        timeout(PATIENCE, client.read_to_end(&mut received)).await??;
        assert_eq!(received, b"banner");
        Ok(())
    }

    #[tokio::test]
    async fn refused_upstream_resets_the_client_and_is_counted() -> anyhow::Result<()> {
        let closed = TcpListener::bind((LOCALHOST, 0)).await?.local_addr()?;
        let (proxy, metrics) = start_proxy(|_| closed)?;
        expect_refused(proxy, b"").await?;
        wait_until("the refusal is counted", || {
            failures(&metrics, FailureReason::ConnectRefused) == 1
        })
        .await;
        assert_eq!(opened(&metrics), 0);
        Ok(())
    }

    #[tokio::test]
    async fn unanswered_upstream_times_out_and_is_counted() -> anyhow::Result<()> {
        // A listener that never accepts: once its queue is full, further SYNs go unanswered.
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((LOCALHOST, 0).into())?;
        let silent = socket.listen(0)?;
        let silent_addr = silent.local_addr()?;
        let mut queued = Vec::new();
        while let Ok(connected) =
            timeout(Duration::from_millis(200), TcpStream::connect(silent_addr)).await
        {
            queued.push(connected?);
            assert!(queued.len() < 16, "the listen queue never filled up");
        }

        let (proxy, metrics) =
            start_proxy_with_timeout(|_| silent_addr, Duration::from_millis(300))?;
        let started = std::time::Instant::now();
        expect_refused(proxy, b"").await?;
        assert!(started.elapsed() < PATIENCE);
        wait_until("the timeout is counted", || {
            failures(&metrics, FailureReason::ConnectTimeout) == 1
        })
        .await;
        Ok(())
    }

    #[tokio::test]
    async fn connection_to_the_proxy_itself_is_refused_as_a_loop() -> anyhow::Result<()> {
        let (proxy, metrics) = start_proxy(|own_addr| own_addr)?;
        expect_refused(proxy, b"").await?;
        wait_until("the loop is counted", || {
            failures(&metrics, FailureReason::Loop) == 1
        })
        .await;
        assert_eq!(opened(&metrics), 0);
        Ok(())
    }

    #[tokio::test]
    async fn metrics_count_connections_and_bytes() -> anyhow::Result<()> {
        let echo = start_echo_after_eof().await?;
        let (proxy, metrics) = start_proxy(|_| echo)?;
        let requests: [&[u8]; 3] = [b"one", b"second request", &[7u8; 10_000]];
        for request in requests {
            assert_eq!(round_trip(proxy, request).await?, request);
        }
        let closed = metrics
            .tcp(&TcpLabels::new(DIRECTION, &local("client")))
            .closed;
        wait_until("every connection is closed", || closed.get() == 3).await;

        let total: usize = requests.iter().map(|r| r.len()).sum();
        let text = metrics.render()?;
        let labels = concat!(
            r#"{connection_security_policy="none",destination_principal="unknown","#,
            r#"destination_service="unknown",destination_workload="unknown","#,
            r#"reporter="source",request_protocol="tcp",source_principal="unknown","#,
            r#"source_workload="client",source_workload_namespace="test-ns"}"#
        );
        for expected in [
            format!("istio_tcp_connections_opened_total{labels} 3"),
            format!("istio_tcp_connections_closed_total{labels} 3"),
            format!("istio_tcp_received_bytes_total{labels} {total}"),
            format!("istio_tcp_sent_bytes_total{labels} {total}"),
        ] {
            assert!(
                text.lines().any(|line| line == expected),
                "missing {expected} in\n{text}"
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn binding_fails_when_nothing_binds() {
        // TEST-NET-1 is never a local address.
        let unreachable = std::net::IpAddr::from([192, 0, 2, 1]);
        assert!(bind_listeners(DIRECTION, &[unreachable], 0).is_err());
    }

    #[tokio::test]
    async fn an_unknown_original_destination_is_refused_and_counted() -> anyhow::Result<()> {
        // A connection nobody redirected: SO_ORIGINAL_DST has no answer.
        let listeners = bind_listeners(DIRECTION, &[LOCALHOST], 0)?;
        let addr = listeners[0].local_addr()?;
        let metrics = Arc::new(Metrics::new(&local("client"))?);
        let proxy = OutboundProxy {
            orig_dst: Arc::new(SockoptOrigDst),
            mesh: plaintext_mesh(),
            metrics: metrics.clone(),
            local: local("client"),
            timeouts: timeouts(),
            listen_addrs: local_addrs(&listeners)?,
        };
        let mut loops = AcceptLoops::default();
        loops.add(listeners, Arc::new(proxy));
        tokio::spawn(loops.run_until(pending()));
        expect_refused(addr, b"").await?;
        wait_until("the failure is counted", || {
            failures(&metrics, FailureReason::OrigDstUnknown) == 1
        })
        .await;
        Ok(())
    }
}
