//! `sidecar node-agent`: collects the capture of every deleted pod on this node by itself, and
//! never touches a live pod's. Runs as a DaemonSet (deploy/kubernetes/node-agent/).
//!
//! The parent directory of each live capture's cgroup is watched (inotify: cgroupfs reports a
//! removed directory to its parent's watch, not to a watch on the directory itself): the
//! removal of a captured cgroup collects that capture at once. New captures are noticed by listing the pin directories (cheap, no cgroup walk)
//! every `--rescan-interval`; a full sweep (one walk of the cgroup tree) every
//! `--sweep-interval` is the backstop for anything the watch missed (a capture installed and
//! deleted between two rescans, an agent restart).
//!
//! Each rescan also reads every live capture's count of refused binds of the proxy's ports
//! (the kernel only counts them: a log call would double the guard programs' size in every
//! pod) and logs the pods where it grew: a process of the app tried to take the proxy's place.
use std::{
    collections::{BTreeSet, HashMap},
    convert::Infallible,
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use clap::Args;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Bytes, header::CONTENT_TYPE, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::mpsc};

use sidecar_common::{Counter, PinLayout};

use sidecar_capture::{bpffs, captures, ebpf_capture, kernel_memory::KernelMemory};

#[derive(Args, Debug)]
pub struct NodeAgentArgs {
    /// Where `/stats/prometheus` and `/healthz/ready` are served.
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// How often new captures are looked for (a listing of the pin directories).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub rescan_interval: Duration,
    /// How often every capture is checked against the cgroup tree (the backstop).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,
    #[arg(long, default_value = bpffs::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

pub fn run(args: NodeAgentArgs) -> Result<()> {
    super::require_root("sidecar node-agent")?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(agent(args))
}

async fn agent(args: NodeAgentArgs) -> Result<()> {
    let metrics = Arc::new(AgentMetrics::new()?);
    let listener = TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_addr))?;
    println!(
        "sidecar node-agent: metrics on http://{}/stats/prometheus, collecting deleted pods' \
         captures under {}",
        listener.local_addr()?,
        PinLayout::new(&args.bpffs).sidecar_dir().display()
    );
    tokio::spawn(serve(listener, metrics.clone()));

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let watcher = RecommendedWatcher::new(
        move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                for path in event.paths {
                    let _ = events_tx.send(path);
                }
            }
        },
        notify::Config::default(),
    )
    .context("cannot watch cgroup directories (inotify)")?;
    let mut agent = Agent {
        pins: PinLayout::new(&args.bpffs),
        watcher,
        watched: HashMap::new(),
        parents: HashMap::new(),
        refused_binds: HashMap::new(),
        gauges_stale: true,
        metrics,
    };
    let mut rescan = tokio::time::interval(args.rescan_interval);
    let mut sweep = tokio::time::interval(args.sweep_interval);
    let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = sweep.tick() => agent.sweep(),
            _ = rescan.tick() => agent.rescan(),
            Some(path) = events.recv() => agent.on_cgroup_event(&path),
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    println!("sidecar node-agent: stopped");
    Ok(())
}

/// The captures being watched, by cgroup id, with their cgroup directory.
struct Agent {
    pins: PinLayout,
    watcher: RecommendedWatcher,
    watched: HashMap<u64, PathBuf>,
    /// Watched parent directories, with how many watched cgroups each has.
    parents: HashMap<PathBuf, usize>,
    /// Refused binds of the proxy's ports last seen, per capture.
    refused_binds: HashMap<u64, u64>,
    /// Something changed since the gauges were last computed (they walk every loaded program,
    /// so a burst of collections refreshes them once, at the next rescan).
    gauges_stale: bool,
    metrics: Arc<AgentMetrics>,
}

impl Agent {
    /// Watches captures that appeared since the last look (their cgroup is found with one walk
    /// of the tree, only when there are new ones) and forgets the ones removed by others.
    fn rescan(&mut self) {
        let present: BTreeSet<u64> = captures::ids(&self.pins).into_iter().collect();
        let gone: Vec<u64> = self
            .watched
            .keys()
            .filter(|id| !present.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.forget(id);
        }
        if present.iter().any(|id| !self.watched.contains_key(id)) {
            self.sweep();
        }
        if self.gauges_stale {
            self.update_gauges();
        }
        self.report_refused_binds();
    }

    /// Logs and counts the binds of a proxy port refused in each pod since the last look.
    fn report_refused_binds(&mut self) {
        for (id, cgroup) in &self.watched {
            let pin_dir = self.pins.capture_dir(*id);
            let Ok(now) = ebpf_capture::read_counter(&pin_dir, Counter::ProxyPortBindRefused)
            else {
                continue; // removed meanwhile: the next rescan forgets it
            };
            let seen = self.refused_binds.entry(*id).or_insert(0);
            if now > *seen {
                eprintln!(
                    "sidecar node-agent: pod cgroup {}: {} bind(s) of the proxy's ports by \
                     another process than the proxy refused (a process of the app tried to \
                     take the proxy's place)",
                    cgroup.display(),
                    now - *seen
                );
                self.metrics.refused_binds.inc_by(now - *seen);
                *seen = now;
            }
        }
    }

    /// Checks every capture against the cgroup tree: collects the stale ones, watches the rest.
    fn sweep(&mut self) {
        let all = match captures::list(&self.pins) {
            Ok(all) => all,
            Err(error) => {
                eprintln!("sidecar node-agent: cannot list captures: {error:#}");
                self.metrics.errors.inc();
                return;
            }
        };
        for capture in all {
            match &capture.cgroup {
                None => self.collect(capture.cgroup_id, &capture.pin_dir),
                Some(cgroup) if !self.watched.contains_key(&capture.cgroup_id) => {
                    self.watch(capture.cgroup_id, cgroup);
                }
                Some(_) => {}
            }
        }
        self.update_gauges();
    }

    /// An inotify event in a watched parent directory: collects the capture of the cgroup it
    /// names if that cgroup is gone.
    fn on_cgroup_event(&mut self, path: &Path) {
        let Some((&id, cgroup)) = self.watched.iter().find(|(_, dir)| dir.as_path() == path) else {
            return;
        };
        // Gone, or the path now names another cgroup: ids are never reused.
        if std::fs::metadata(cgroup).is_ok_and(|meta| meta.ino() == id) {
            return;
        }
        self.collect(id, &self.pins.capture_dir(id));
    }

    fn collect(&mut self, id: u64, pin_dir: &Path) {
        self.forget(id);
        let removed = bpffs::lock(&self.pins).and_then(|lock| {
            let mut removed = captures::remove(pin_dir, &lock)?;
            removed.extend(captures::remove_node_state_if_unused(&self.pins, &lock)?);
            Ok(removed)
        });
        match removed {
            Ok(removed) if !removed.is_empty() => {
                self.metrics.collected.inc();
                println!(
                    "sidecar node-agent: collected the capture of deleted cgroup {id} ({} pins)",
                    removed.len()
                );
            }
            Ok(_) => {} // removed by someone else meanwhile
            Err(error) => {
                self.metrics.errors.inc();
                eprintln!("sidecar node-agent: cannot collect cgroup {id}: {error:#}");
            }
        }
    }

    fn watch(&mut self, id: u64, cgroup: &Path) {
        let Some(parent) = cgroup.parent() else {
            return;
        };
        let watchers = self.parents.entry(parent.to_path_buf()).or_default();
        if *watchers == 0
            && let Err(error) = self.watcher.watch(parent, RecursiveMode::NonRecursive)
        {
            // Removed between the walk and now: the next sweep collects its captures.
            eprintln!(
                "sidecar node-agent: cannot watch {}: {error}",
                parent.display()
            );
            self.metrics.errors.inc();
            return;
        }
        *watchers += 1;
        self.watched.insert(id, cgroup.to_path_buf());
        self.gauges_stale = true;
    }

    fn forget(&mut self, id: u64) {
        self.gauges_stale = true;
        self.refused_binds.remove(&id);
        let Some(cgroup) = self.watched.remove(&id) else {
            return;
        };
        let Some(parent) = cgroup.parent() else {
            return;
        };
        if let Some(watchers) = self.parents.get_mut(parent) {
            *watchers -= 1;
            if *watchers == 0 {
                self.parents.remove(parent);
                let _ = self.watcher.unwatch(parent);
            }
        }
    }

    fn update_gauges(&mut self) {
        self.gauges_stale = false;
        let ids = captures::ids(&self.pins);
        let live = self.watched.len() as i64;
        let all = ids.len() as i64;
        self.metrics.captures.with_label_values(&["live"]).set(live);
        self.metrics
            .captures
            .with_label_values(&["stale"])
            .set((all - live).max(0));
        let node_dir = self.pins.node_dir();
        let memory = KernelMemory::scan(&node_dir).and_then(|memory| {
            let mut total = memory.of_node_state(&node_dir)?;
            for id in ids {
                total += memory.of_capture(&self.pins.capture_dir(id))?;
            }
            Ok(total)
        });
        match memory {
            Ok(bytes) => self.metrics.kernel_memory.set(bytes as i64),
            Err(error) => eprintln!("sidecar node-agent: cannot measure kernel memory: {error:#}"),
        }
    }
}

/// The agent's own metrics.
struct AgentMetrics {
    registry: Registry,
    captures: IntGaugeVec,
    collected: IntCounter,
    errors: IntCounter,
    kernel_memory: IntGauge,
    refused_binds: IntCounter,
}

impl AgentMetrics {
    fn new() -> Result<AgentMetrics> {
        let registry = Registry::new();
        let captures = IntGaugeVec::new(
            Opts::new(
                "sidecar_node_captures",
                "eBPF captures on this node: live (their pod's cgroup exists) or stale (gone, \
                 not collected yet).",
            ),
            &["state"],
        )?;
        let collected = IntCounter::new(
            "sidecar_node_captures_collected_total",
            "Captures of deleted pods removed by the agent.",
        )?;
        let errors = IntCounter::new(
            "sidecar_node_agent_errors_total",
            "Captures the agent could not list or collect (see its log).",
        )?;
        let kernel_memory = IntGauge::new(
            "sidecar_node_kernel_memory_bytes",
            "Kernel memory (memlock) of every capture's programs and maps, and of the node-wide \
             maps.",
        )?;
        registry.register(Box::new(captures.clone()))?;
        registry.register(Box::new(collected.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        let refused_binds = IntCounter::new(
            "sidecar_node_proxy_port_binds_refused_total",
            "Binds of a proxy port (inbound, outbound) by another process than the proxy, \
             refused by the kernel, in the pods the agent watches (each counted from its install).",
        )?;
        registry.register(Box::new(kernel_memory.clone()))?;
        registry.register(Box::new(refused_binds.clone()))?;
        for state in ["live", "stale"] {
            captures.with_label_values(&[state]);
        }
        Ok(AgentMetrics {
            registry,
            captures,
            collected,
            errors,
            kernel_memory,
            refused_binds,
        })
    }
}

async fn serve(listener: TcpListener, metrics: Arc<AgentMetrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Typically out of file descriptors: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let response = respond(request.uri().path(), &metrics);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(path: &str, metrics: &AgentMetrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/stats/prometheus" => {
            match TextEncoder::new().encode_to_string(&metrics.registry.gather()) {
                Ok(text) => (StatusCode::OK, prometheus::TEXT_FORMAT, text),
                Err(error) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{error}\n"),
                ),
            }
        }
        "/healthz/ready" => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}
