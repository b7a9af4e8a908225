//! `sidecar proxy`: the L4 proxy captured outbound connections are redirected to.
//!
//! - `args`: command-line options, validated into one `ProxyConfig`;
//! - `orig_dst`: where a connection was going (SO_ORIGINAL_DST, the BPF index, or fixed);
//! - `outbound`: listeners, the accept loop and the per-connection logic;
//! - `copy`: bidirectional relay with half-close and live byte counting;
//! - `metrics`: Istio TCP metrics and failure counters in a private registry;
//! - `admin`: `/stats/prometheus` and `/healthz/ready` on a separate thread;
//! - `logging`: the tracing subscriber.
mod admin;
mod args;
mod copy;
mod logging;
mod metrics;
mod orig_dst;
mod outbound;

use std::{
    future::Future,
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

pub use args::ProxyArgs;

use self::{
    admin::AdminState,
    args::{OrigDstSource, ProxyConfig},
    metrics::{Metrics, TcpLabels},
    orig_dst::{BpfMapOrigDst, ExplicitOrigDst, OriginalDst, SockoptOrigDst},
    outbound::OutboundProxy,
};

/// Runs the proxy until SIGTERM or SIGINT.
pub fn run(args: ProxyArgs) -> anyhow::Result<()> {
    logging::init(args.log_format)?;
    let config = ProxyConfig::try_from(&args)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("proxy-worker");
    if let Some(threads) = args.worker_threads {
        runtime.worker_threads(threads.get());
    }
    let runtime = runtime.build().context("cannot build the proxy runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: ProxyConfig) -> anyhow::Result<()> {
    // Opened first: a missing or unreadable map is a configuration error to report at once.
    let orig_dst = original_dst(&config.orig_dst)?;
    let labels = TcpLabels::outbound(&config.workload_name, &config.workload_namespace);
    let metrics = Arc::new(Metrics::new(&labels).context("cannot register metrics")?);
    let ready = Arc::new(AtomicBool::new(false));

    // Admin first, so probes get a clear 503 (not a refused connect) while we start.
    let admin_state = AdminState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    admin::start(config.metrics_addr, config.ready_addr, admin_state)?;

    // Registered before readiness, so a signal arriving right after is not lost.
    let shutdown = shutdown_signal().context("cannot install signal handlers")?;

    let listeners = outbound::bind_listeners(&config.outbound_bind, config.outbound_port).await?;
    let orig_dst_source = orig_dst.mode().name();
    let proxy = OutboundProxy::new(listeners, orig_dst, metrics, config.connect_timeout)?;
    ready.store(true, Ordering::Release);
    info!(orig_dst_source, "ready: all outbound listeners are bound");

    proxy
        .serve(async {
            shutdown.await;
            // Fail readiness first, so nothing new is routed here while we stop.
            ready.store(false, Ordering::Release);
        })
        .await;
    info!("proxy stopped");
    Ok(())
}

fn original_dst(source: &OrigDstSource) -> anyhow::Result<Arc<dyn OriginalDst>> {
    Ok(match source {
        OrigDstSource::Sockopt => Arc::new(SockoptOrigDst),
        OrigDstSource::BpfMap(path) => Arc::new(
            BpfMapOrigDst::open(path)
                .with_context(|| format!("cannot open the pinned BPF map {}", path.display()))?,
        ),
        OrigDstSource::Explicit(target) => Arc::new(ExplicitOrigDst(*target)),
    })
}

/// Completes on the first SIGTERM or SIGINT.
fn shutdown_signal() -> io::Result<impl Future<Output = ()>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => info!("SIGTERM received"),
            _ = interrupt.recv() => info!("SIGINT received"),
        }
    })
}
