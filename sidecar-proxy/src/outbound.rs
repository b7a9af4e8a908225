//! The outbound side: accept a captured connection, find where it was going, and tell what it
//! speaks (the port's configured protocol, or bounded detection). HTTP goes to the HTTP proxy
//! (routing, retries, request metrics); anything else is relayed as TCP to the original
//! destination, with mTLS when the mesh config says it is a mesh workload.
use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    accept::listener::Handler,
    detect::client_hello::Rewound,
    http::{self, AppProtocol, PortProtocol, Raced, Upstreams, detect_racing_server},
    inputs::{Entrance, ProxyInputs},
    io::relay::relay,
    io::upstream::{self, MeshOffer},
    lifecycle::idle_exit::AppActivity,
    telemetry::metrics::{Direction, FailureReason, SecurityPolicy, TcpLabels},
};

const DIRECTION: Direction = Direction::Outbound;

pub struct OutboundProxy {
    pub inputs: Arc<ProxyInputs>,
    pub entrance: Entrance,
    /// Pools, balancers and breakers of the HTTP destinations; they outlive config reloads.
    pub upstreams: Upstreams,
    /// The app's open connections, with `--exit-when-idle-after`.
    pub app_activity: Option<Arc<AppActivity>>,
}

impl Handler for OutboundProxy {
    async fn handle(self: Arc<Self>, app: TcpStream, peer: SocketAddr) {
        let _open = self.app_activity.as_ref().map(|activity| activity.opened());
        let Some((mut app, orig_dst, mut log)) = self.inputs.enter(&self.entrance, app, peer)
        else {
            return;
        };

        // One snapshot for the connection's TCP handling; HTTP takes one per request.
        let mesh = self.inputs.mesh.current();
        let mut client_prefix = Vec::new();
        let detected = match mesh.routes().config().port_protocol(orig_dst.port()) {
            PortProtocol::Http => Raced::Http(AppProtocol::Http1),
            PortProtocol::Http2 => Raced::Http(AppProtocol::Http2),
            PortProtocol::Tcp => Raced::Opaque {
                upstream: None,
                greeting: Vec::new(),
            },
            PortProtocol::Detect => {
                // A server that speaks first (MySQL, SMTP) ends detection with its greeting.
                let establishing =
                    upstream::establish(orig_dst, &mesh, &self.inputs.timeouts, MeshOffer::Bytes);
                let sniff = self.inputs.timeouts.sniff;
                match detect_racing_server(&mut app, &mut client_prefix, sniff, establishing).await
                {
                    Ok(detected) => detected,
                    Err(error) => {
                        return self
                            .inputs
                            .refuse(app, &log, FailureReason::SniffFailed, error);
                    }
                }
            }
        };
        let downstream = Rewound::new(client_prefix, app);
        match detected {
            Raced::Http(protocol) => {
                http::serve(self.clone(), downstream, protocol, peer, orig_dst).await;
            }
            Raced::Opaque {
                upstream: raced,
                greeting,
            } => {
                let established = match raced {
                    Some(established) => established,
                    None => {
                        upstream::establish(
                            orig_dst,
                            &mesh,
                            &self.inputs.timeouts,
                            MeshOffer::Bytes,
                        )
                        .await
                    }
                };
                let established = match established {
                    Ok(established) => established,
                    Err(failure) => {
                        return self
                            .inputs
                            .refuse(downstream, &log, failure.reason, failure.error);
                    }
                };
                let mut labels = TcpLabels::new(DIRECTION, &self.inputs.local);
                if let Some(mtls) = &established.mtls {
                    labels = labels
                        .with_mutual_tls(&mtls.local, &mtls.peer)
                        .with_destination_workload(&mtls.workload);
                    log.dst_workload = Some(mtls.workload.clone());
                    log.src_principal = Some(mtls.local.clone());
                    log.dst_principal = Some(mtls.peer.clone());
                    log.security_policy = SecurityPolicy::MutualTls;
                }
                let upstream = Rewound::new(greeting, established.io);
                let counters = self.inputs.metrics.tcp(&labels);
                relay(
                    downstream,
                    upstream,
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

impl OutboundProxy {
    /// Closes, at each reload, the pooled upstream connections made under a mesh policy the
    /// new snapshot no longer gives their destination. (A request never reuses one anyway;
    /// this closes them at once instead of at their idle timeout.) Runs while the proxy does.
    pub async fn close_stale_connections(self: Arc<Self>) {
        let mut reloads = self.inputs.mesh.subscribe();
        while reloads.changed().await.is_ok() {
            let mesh = reloads.borrow_and_update().clone();
            self.upstreams.close_stale(&mesh);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{future::pending, time::Duration};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
        time::timeout,
    };

    use super::*;
    use crate::{
        Timeouts,
        accept::connection_limit::{ConnectionLimit, WhenFull},
        accept::listener::{AcceptLoops, Accepting, bind_listeners, local_addrs},
        accept::orig_dst::SockoptOrigDst,
        lifecycle::drain::Drain,
        telemetry::metrics::Metrics,
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

        let total = requests.iter().map(|r| r.len() as u64).sum();
        let series = [
            ("connection_security_policy", "none"),
            ("destination_principal", "unknown"),
            ("destination_service", "unknown"),
            ("destination_workload", "unknown"),
            ("reporter", "source"),
            ("request_protocol", "tcp"),
            ("source_principal", "unknown"),
            ("source_workload", "client"),
            ("source_workload_namespace", "test-ns"),
        ];
        for (name, expected) in [
            ("istio_tcp_connections_opened_total", 3),
            ("istio_tcp_connections_closed_total", 3),
            ("istio_tcp_received_bytes_total", total),
            ("istio_tcp_sent_bytes_total", total),
        ] {
            assert_eq!(metric(&metrics, name, &series), expected, "{name}");
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_full_side_resets_new_connections_and_counts_them() -> anyhow::Result<()> {
        let echo = start_streaming_echo().await?;
        let listeners = bind_listeners(DIRECTION, &[LOCALHOST], 0)?;
        let addr = listeners[0].local_addr()?;
        let metrics = Arc::new(Metrics::new(&local("client"))?);
        let drain = Arc::new(Drain::default());
        let proxy = OutboundProxy {
            inputs: Arc::new(ProxyInputs {
                mesh: plaintext_mesh(),
                metrics: metrics.clone(),
                local: local("client"),
                timeouts: timeouts(),
                drain: drain.clone(),
                capture: Arc::new(NoCapture),
            }),
            entrance: Entrance {
                direction: DIRECTION,
                orig_dst: Arc::new(crate::accept::orig_dst::ExplicitOrigDst(echo)),
                listen_addrs: local_addrs(&listeners)?,
            },
            upstreams: Upstreams::default(),
            app_activity: None,
        };
        let side = metrics.listener(DIRECTION.name(), 1);
        let accepting = Accepting {
            limit: ConnectionLimit::new(1, WhenFull::RefuseNew, side.clone()),
            tcp_keepalive: None,
            relisten: None,
            drain,
        };
        let mut loops = AcceptLoops::default();
        loops.add(listeners, Arc::new(proxy), accepting);
        tokio::spawn(loops.run_until(pending()));

        let mut first = TcpStream::connect(addr).await?;
        assert_eq!(echo_chunk(&mut first, b"held").await?, b"held");
        expect_refused(addr, b"").await?;
        assert_eq!(side.overflow.get(), 1);
        assert_eq!(side.connections.get(), 1);
        drop(first);
        wait_until("the held connection is counted out", || {
            side.connections.get() == 0
        })
        .await;
        let mut next = TcpStream::connect(addr).await?;
        assert_eq!(echo_chunk(&mut next, b"room again").await?, b"room again");
        Ok(())
    }

    #[tokio::test]
    async fn a_relayed_connection_carries_on_while_draining_and_holds_the_drain()
    -> anyhow::Result<()> {
        let echo = start_streaming_echo().await?;
        let metrics = Arc::new(Metrics::new(&local("client"))?);
        let proxy = start_outbound(|_| echo, plaintext_mesh(), metrics, timeouts())?;
        let mut relayed = TcpStream::connect(proxy.addr).await?;
        assert_eq!(echo_chunk(&mut relayed, b"before").await?, b"before");

        let drain = proxy.drain.clone();
        let drained =
            tokio::spawn(async move { drain.run(Duration::from_secs(30), pending()).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(echo_chunk(&mut relayed, b"during").await?, b"during");
        // A new connection is still served.
        let mut late = TcpStream::connect(proxy.addr).await?;
        assert_eq!(echo_chunk(&mut late, b"late").await?, b"late");
        drop(late);
        assert!(!drained.is_finished(), "a relayed connection is open");
        drop(relayed);
        timeout(PATIENCE, drained).await??;
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
        let drain = Arc::new(Drain::default());
        let proxy = OutboundProxy {
            inputs: Arc::new(ProxyInputs {
                mesh: plaintext_mesh(),
                metrics: metrics.clone(),
                local: local("client"),
                timeouts: timeouts(),
                drain: drain.clone(),
                capture: Arc::new(NoCapture),
            }),
            entrance: Entrance {
                direction: DIRECTION,
                orig_dst: Arc::new(SockoptOrigDst),
                listen_addrs: local_addrs(&listeners)?,
            },
            upstreams: Upstreams::default(),
            app_activity: None,
        };
        let mut loops = AcceptLoops::default();
        loops.add(
            listeners,
            Arc::new(proxy),
            accepting(&metrics, DIRECTION, &drain),
        );
        tokio::spawn(loops.run_until(pending()));
        expect_refused(addr, b"").await?;
        wait_until("the failure is counted", || {
            failures(&metrics, FailureReason::OrigDstUnknown) == 1
        })
        .await;
        Ok(())
    }
}
