//! `sidecar proxy`: the L4 proxy captured connections are sent to, outbound (15001) and inbound
//! (15006), with mTLS between sidecars when a mesh config is given. No `unsafe` and no BPF
//! library here: what it asks of the capture goes through a [`CaptureProbe`] the binary gives.
//! One folder per concern (docs/ARCHITECTURE.md, "Where each concern lives"):
//!
//! - `args`: command-line options, validated into one `ProxyConfig`;
//! - `outbound`, `inbound`: the per-connection logic of each side; `inputs`: what both share
//!   (metrics, timeouts, mesh, drain, the capture) and how each connection enters;
//! - `accept/`: listeners and accept loops (`listener`), each listener's cap on open connections
//!   (`connection_limit`), where a connection was going (`orig_dst`: SO_ORIGINAL_DST, the local
//!   address under sk_lookup, or fixed);
//! - `io/`: moving bytes: `upstream` dials (passthrough source address), `relay` relays or
//!   refuses, `splice` is the zero-copy relay of plain TCP (splice(2) through pooled pipes),
//!   `copy` the counted copy (TLS), `deadlines` the idle and request-headers timeouts of
//!   downstream connections, `keepalive` TCP keepalive;
//! - `detect/`: what a connection carries, from its first bytes within bounds: a mesh
//!   ClientHello (`client_hello`), HTTP/1 or HTTP/2 (`http`); `tls/`: rustls configs, SPIFFE
//!   checks, TLS origination and termination, certificate issuing;
//! - `mesh/`: the compiled snapshot connections use, its load and hot-reload (`reload`), SPIFFE
//!   IDs (`identity`), allow rules (`authz`), the YAML file (`config`);
//! - `http/`: HTTP routing, retries, pools, circuit breaking, request
//!   metrics (docs/ROUTING.md), and inbound HTTP to the app;
//! - `telemetry/`: Istio TCP metrics, failure and reload counters, certificate expiry
//!   (`metrics`); the access log (`access_log`) and its lines (`access_line`, formatted straight
//!   into the log buffer); the tracing subscriber, its level changeable at runtime (`logging`),
//!   and its output buffered (`log_buffer`: one `write` per batch of lines);
//! - `admin/`: `/stats/prometheus`, `/healthz/ready` and the localhost admin endpoints
//!   (`/config_dump`, `/logging`, `/quitquitquit`, `/stats`) on a separate thread; `caller`: who
//!   calls them (only root, the proxy's user and the allowed UIDs may change the proxy);
//!   `app_health`: the kubelet's probes of the app, performed by the proxy;
//! - `capture/`: what the proxy asks of the capture ([`CaptureProbe`]); `health`: whether this
//!   pod's capture is in place;
//! - `lifecycle/`: stopping without cutting the app's last requests (`drain`), stopping once the
//!   app is done (`idle_exit`, `--exit-when-idle-after`).
#![forbid(unsafe_code)]

mod accept;
mod admin;
mod args;
mod capture;
mod detect;
pub mod http;
mod inbound;
mod inputs;
mod io;
mod lifecycle;
pub mod mesh;
mod outbound;
pub mod telemetry;
pub mod tls;

/// The test rig of the component tests (`tests/components`) and the unit tests.
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::{
    future::pending,
    num::NonZeroUsize,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

pub use args::ProxyArgs;
pub use capture::CaptureProbe;

use self::{
    accept::connection_limit::{ConnectionLimit, WhenFull, data_path_cap},
    accept::listener::{AcceptLoops, Accepting, bind_listeners, local_addrs},
    accept::orig_dst::{ExplicitOrigDst, InboundOrigDst, OriginalDst, SockoptOrigDst},
    admin::{AdminAddrs, AdminState},
    args::{OrigDstSource, ProxyConfig},
    http::{AppPool, Upstreams},
    inbound::InboundProxy,
    inputs::{Entrance, ProxyInputs},
    lifecycle::drain::{Drain, StopRequests},
    lifecycle::idle_exit::AppActivity,
    mesh::reload::MeshSource,
    mesh::{Mesh, MeshHandle},
    outbound::OutboundProxy,
    telemetry::logging::LogLevel,
    telemetry::metrics::{Direction, LocalWorkload, Metrics},
};

/// How long each step of a connection may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect to the upstream.
    pub connect: Duration,
    /// A whole mTLS handshake, either side (and, on STRICT ports, the wait for a ClientHello).
    pub tls_handshake: Duration,
    /// PERMISSIVE ports: the wait for a client's first bytes.
    pub sniff: Duration,
    /// A downstream connection with no byte either way for this long is closed.
    pub idle: Duration,
    /// HTTP/1 (served and admin): a request's headers must be complete this long after their
    /// first byte.
    pub request_headers: Duration,
    /// TCP keepalive on proxied connections: idle time before the first probe (`None`: off).
    pub tcp_keepalive: Option<Duration>,
}

/// Runs the proxy until it is asked to stop and has drained, asking `capture` about this pod's
/// capture.
pub fn run(args: ProxyArgs, capture: Arc<dyn CaptureProbe>) -> anyhow::Result<()> {
    let (log_level, log_output) = telemetry::logging::init(args.log_format)?;
    // Held to the end of `run`, so every line is written out before the process exits.
    let _flush_at_exit = log_output.flush_at_exit();
    let config = ProxyConfig::try_from(&args)?;
    // One worker: a single-threaded scheduler (as linkerd2-proxy on one core), which spares
    // the multi-threaded one's cross-thread queues and wake-ups no other worker could take.
    let workers = args.worker_threads.map(NonZeroUsize::get);
    let single_threaded = workers == Some(1);
    let mut runtime = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        workers => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if let Some(workers) = workers {
                runtime.worker_threads(workers);
            }
            runtime
        }
    };
    runtime
        .enable_all()
        .thread_name("proxy-worker")
        // A worker with nothing left to do writes the lines of what it just did.
        .on_thread_park(move || log_output.flush_now());
    let runtime = runtime.build().context("cannot build the proxy runtime")?;
    if !single_threaded {
        return runtime.block_on(serve(config, log_level, capture));
    }
    // The one worker is a thread of the workers' name too (profiles tell threads by name).
    std::thread::Builder::new()
        .name("proxy-worker".into())
        .spawn(move || runtime.block_on(serve(config, log_level, capture)))
        .context("cannot start the proxy worker")?
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Raises the soft limit on open files to the hard one, as Envoy and Go programs do: every
/// proxied connection holds two descriptors, and the usual soft limit of 1024 would cap the
/// proxy at about 500 connections while the hard limit allows far more. Returns the limit in
/// force (`None`: unlimited), which the listeners' caps are sized from.
fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return limit.current;
    }
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        ..limit
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            info!(
                from = ?limit.current,
                to = ?limit.maximum,
                "raised the open file limit to its hard limit"
            );
            limit.maximum
        }
        Err(error) => {
            warn!(%error, "cannot raise the open file limit");
            limit.current
        }
    }
}

async fn serve(
    config: ProxyConfig,
    log_level: LogLevel,
    capture: Arc<dyn CaptureProbe>,
) -> anyhow::Result<()> {
    let open_file_limit = raise_open_file_limit();
    // Opened first: a missing or unreadable map is a configuration error to report at once.
    let orig_dst = original_dst(&config.orig_dst)?;
    let local = LocalWorkload {
        name: config.workload_name.clone(),
        namespace: config.workload_namespace.clone(),
    };
    let metrics = Arc::new(Metrics::new(&local).context("cannot register metrics")?);
    let ready = Arc::new(AtomicBool::new(false));

    // Admin first, so probes get a clear 503 (not a refused connect) while we start.
    let quit = Arc::new(Notify::new());
    let capture_ok = Arc::new(AtomicBool::new(true));
    let (reinstalled, reinstalls) = watch::channel(0u64);
    tokio::spawn(capture::health::watch(capture::health::Watch {
        mode: config.capture_check,
        interval: config.capture_check_interval,
        metrics: metrics.clone(),
        capture_ok: capture_ok.clone(),
        reinstalled,
        capture: capture.clone(),
    }));
    let admin_state = Arc::new(AdminState {
        metrics: metrics.clone(),
        ready: ready.clone(),
        log_level,
        log_directives: Mutex::new(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())),
        mesh: OnceLock::new(),
        quit: quit.clone(),
        allowed_uids: config.admin_allowed_uids.clone(),
        bpffs: config.bpffs.clone(),
        capture: capture.clone(),
        app_probers: config.app_probers.clone(),
        capture_ok: capture_ok.clone(),
    });
    let admin_addrs = AdminAddrs {
        metrics: config.metrics_addr,
        ready: config.ready_addr,
        admin: config.admin_addr,
        max_connections: config.max_admin_connections,
        request_headers_timeout: config.timeouts.request_headers,
    };
    admin::start(&admin_addrs, admin_state.clone())?;
    let data_path_cap = config.max_connections.unwrap_or_else(|| {
        let admin_fds = admin::listener_count(&admin_addrs) * config.max_admin_connections;
        data_path_cap(open_file_limit, admin_fds)
    });
    info!(
        open_file_limit = ?open_file_limit,
        max_connections_per_side = data_path_cap,
        max_admin_connections = config.max_admin_connections,
        "connection caps"
    );

    // Registered before readiness, so a signal arriving right after is not lost.
    let mut stop = StopRequests::install(quit).context("cannot install signal handlers")?;

    // Before any listener: a bad mesh config fails startup instead of serving half a mesh.
    let mesh = match &config.mesh_config {
        Some(path) => {
            let source = MeshSource::load(path, tls::crypto_provider(), metrics.clone())?;
            let handle = source.handle();
            mesh::reload::spawn_watcher(source)?;
            handle
        }
        None => {
            info!("no --mesh-config: plaintext only, every inbound port PERMISSIVE");
            Arc::new(MeshHandle::new(Mesh::plaintext()))
        }
    };
    admin_state.mesh.get_or_init(|| mesh.clone());
    let drain = Arc::new(Drain::default());
    let app_activity = config
        .exit_when_idle_after
        .map(|period| Arc::new(AppActivity::new(period)));
    let outbound_listeners = bind_listeners(
        Direction::Outbound,
        &config.outbound_bind,
        config.outbound_port,
    )?;
    let inbound_listeners = bind_listeners(
        Direction::Inbound,
        &config.inbound_bind,
        config.inbound_port,
    )?;
    // One set for both sides.
    let inputs = Arc::new(ProxyInputs {
        mesh,
        metrics,
        local,
        timeouts: config.timeouts,
        drain: drain.clone(),
        capture,
    });
    let outbound = Arc::new(OutboundProxy {
        inputs: inputs.clone(),
        entrance: Entrance {
            direction: Direction::Outbound,
            orig_dst,
            listen_addrs: local_addrs(&outbound_listeners)?,
        },
        upstreams: Upstreams::default(),
        app_activity: app_activity.clone(),
    });
    tokio::spawn(outbound.clone().close_stale_connections());
    let inbound = InboundProxy {
        inputs,
        entrance: Entrance {
            direction: Direction::Inbound,
            orig_dst: Arc::new(InboundOrigDst {
                inbound_port: config.inbound_port,
            }),
            listen_addrs: local_addrs(&inbound_listeners)?,
        },
        app_pool: Arc::new(AppPool::default()),
    };
    let accepting = |direction: Direction| Accepting {
        limit: ConnectionLimit::new(
            data_path_cap,
            WhenFull::RefuseNew,
            admin_state
                .metrics
                .listener(direction.name(), data_path_cap),
        ),
        tcp_keepalive: config.timeouts.tcp_keepalive,
        relisten: Some(reinstalls.clone()),
        drain: drain.clone(),
    };
    let mut accept_loops = AcceptLoops::default();
    accept_loops.add(outbound_listeners, outbound, accepting(Direction::Outbound));
    accept_loops.add(
        inbound_listeners,
        Arc::new(inbound),
        accepting(Direction::Inbound),
    );
    ready.store(true, Ordering::Release);
    info!(
        outbound_port = config.outbound_port,
        inbound_port = config.inbound_port,
        "ready: all listeners are bound"
    );

    let app_done = async {
        match &app_activity {
            Some(activity) => activity.done().await,
            None => pending().await,
        }
    };
    accept_loops
        .run_until(async {
            let why = tokio::select! {
                why = stop.next() => why,
                () = app_done => "--exit-when-idle-after",
            };
            info!(why, "stopping");
            // Fail readiness first, so nothing new is routed here while we drain.
            ready.store(false, Ordering::Release);
            drain.run(config.drain_duration, stop.next()).await;
        })
        .await;
    info!("proxy stopped");
    Ok(())
}

fn original_dst(source: &OrigDstSource) -> anyhow::Result<Arc<dyn OriginalDst>> {
    Ok(match source {
        OrigDstSource::Sockopt => Arc::new(SockoptOrigDst),
        OrigDstSource::Explicit(target) => Arc::new(ExplicitOrigDst(*target)),
    })
}
