//! `/stats/prometheus` and the app's kubelet probes `/app-health/...` (15020), `/healthz/ready` (15021) and the admin endpoints (localhost
//! 15000: `/config_dump`, `/logging`, `/quitquitquit`, `/stats`, `/ready`), served from a thread
//! of their own so scrapes never compete with the data path (as ztunnel keeps its admin runtime
//! apart).
//!
//! Bounded: each listener holds at most `max_connections` (the oldest closes to make room, see
//! `connection_limit`), and a request's headers must arrive within `request_headers_timeout`,
//! which also closes keep-alive connections left idle that long (hyper's header timer starts
//! when the connection waits for a request): probes and scrapers reconnect at no cost.
//!
//! Requests that change the proxy (`POST /quitquitquit`, `POST /logging?level=`) are served to
//! root, the proxy's own user and `--admin-allowed-uids` only (`caller`): the app shares
//! the pod's loopback.
//! Reads stay open to the pod, as Istio's admin port is: they show the pod's own routes,
//! identity (a public certificate's name, no key) and counters.
//!
//! `app_health`: the kubelet's probes of the app, rewritten by `inject` under STRICT, performed
//! here.
pub(crate) mod app_health;
pub(crate) mod caller;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::Context;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, Uri,
    body::{Bytes, Incoming},
    header::{CONNECTION, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::TEXT_FORMAT;
use tokio::{net::TcpListener, sync::Notify};
use tracing::{debug, error, info, warn};

use self::app_health::{APP_HEALTH_PREFIX, AppProbers};
use super::{
    accept::connection_limit::{Admission, ConnectionLimit, WhenFull},
    capture::CaptureProbe,
    mesh::MeshHandle,
    telemetry::logging::LogLevel,
    telemetry::metrics::{DownstreamTimeout, Metrics},
};

pub const METRICS_PATH: &str = "/stats/prometheus";
pub const READY_PATH: &str = "/healthz/ready";
const CONFIG_DUMP_PATH: &str = "/config_dump";
const LOGGING_PATH: &str = "/logging";
const QUIT_PATH: &str = "/quitquitquit";
const STATS_PATH: &str = "/stats";
const ADMIN_READY_PATH: &str = "/ready";
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// The endpoints that change the proxy, when POSTed.
const CHANGING_PATHS: [&str; 2] = [QUIT_PATH, LOGGING_PATH];

/// Which endpoints a listener answers; the others are 404 there.
#[derive(Debug, Clone, Copy, Default)]
struct Routes {
    metrics: bool,
    ready: bool,
    /// The localhost-only admin endpoints (which include the other two).
    admin: bool,
}

impl Routes {
    /// The listener's name in metrics: its groups, e.g. `ready` or `metrics+ready`.
    fn listener_name(self) -> String {
        [
            (self.admin, "admin"),
            (self.metrics, "metrics"),
            (self.ready, "ready"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join("+")
    }
}

/// Turns on one group of endpoints on a listener.
type EnableRoutes = fn(&mut Routes);

/// Where each group of endpoints is served, and how much each listener may hold.
pub struct AdminAddrs {
    pub metrics: SocketAddr,
    pub ready: SocketAddr,
    pub admin: SocketAddr,
    /// Connections each listener holds at most.
    pub max_connections: usize,
    pub request_headers_timeout: Duration,
}

/// The number of distinct admin listeners (the three groups may share addresses).
pub fn listener_count(addrs: &AdminAddrs) -> usize {
    let mut distinct = vec![addrs.metrics, addrs.ready, addrs.admin];
    distinct.sort();
    distinct.dedup();
    distinct.len()
}

/// What the admin endpoints report on and act upon.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// False until every listener is bound (and again while shutting down).
    pub ready: Arc<AtomicBool>,
    /// False while this pod's capture is missing (`capture/health.rs`): not ready either.
    pub capture_ok: Arc<AtomicBool>,
    pub log_level: LogLevel,
    /// The level last set, for `GET /logging`.
    pub log_directives: Mutex<String>,
    /// Set once the mesh config is loaded: what `/config_dump` shows.
    pub mesh: OnceLock<Arc<MeshHandle>>,
    /// Notified by `POST /quitquitquit`, once its answer is sent.
    pub quit: Arc<Notify>,
    /// Who may change the proxy besides root and the proxy's own user.
    pub allowed_uids: Vec<u32>,
    /// Where the capture's pinned maps are, for the BPF counters in `/stats`.
    pub bpffs: PathBuf,
    /// Reads those counters.
    pub capture: Arc<dyn CaptureProbe>,
    /// The app's kubelet probes, answered on the metrics port (`/app-health/...`).
    pub app_probers: Option<Arc<AppProbers>>,
}

/// Binds the admin addresses now, so a port conflict fails startup, then serves them on a
/// dedicated thread with its own current-thread runtime. The thread lives as long as the
/// process.
pub fn start(addrs: &AdminAddrs, state: Arc<AdminState>) -> anyhow::Result<()> {
    // One listener serves several groups when they share an address.
    let mut bindings: Vec<(SocketAddr, Routes)> = Vec::new();
    let groups: [(SocketAddr, EnableRoutes); 3] = [
        (addrs.metrics, |r| r.metrics = true),
        (addrs.ready, |r| r.ready = true),
        (addrs.admin, |r| r.admin = true),
    ];
    for (addr, enable) in groups {
        match bindings.iter_mut().find(|(bound, _)| *bound == addr) {
            Some((_, routes)) => enable(routes),
            None => {
                let mut routes = Routes::default();
                enable(&mut routes);
                bindings.push((addr, routes));
            }
        }
    }
    let listeners = bindings
        .into_iter()
        .map(|(addr, routes)| {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot bind admin address {addr}"))?;
            listener.set_nonblocking(true)?;
            info!(%addr, metrics = routes.metrics, ready = routes.ready, admin = routes.admin, "admin listening");
            let name = routes.listener_name();
            let metrics = state.metrics.listener(&name, addrs.max_connections);
            let limit = ConnectionLimit::new(addrs.max_connections, WhenFull::CloseOldest, metrics);
            Ok((listener, routes, limit))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for path in CHANGING_PATHS {
        state.metrics.admin_refusals(path);
    }
    let request_headers_timeout = addrs.request_headers_timeout;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build the admin runtime")?;
    thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut servers = tokio::task::JoinSet::new();
                for (listener, routes, limit) in listeners {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            let serving = Serving {
                                routes,
                                limit,
                                request_headers_timeout,
                            };
                            servers.spawn(serve(listener, serving, state.clone()));
                        }
                        Err(error) => error!(%error, "cannot register an admin listener"),
                    }
                }
                while servers.join_next().await.is_some() {}
            });
        })
        .context("cannot spawn the admin thread")?;
    Ok(())
}

/// How one admin listener serves its connections.
struct Serving {
    routes: Routes,
    limit: Arc<ConnectionLimit>,
    request_headers_timeout: Duration,
}

async fn serve(listener: TcpListener, serving: Serving, state: Arc<AdminState>) {
    let Serving {
        routes,
        limit,
        request_headers_timeout,
    } = serving;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "admin accept failed");
                // Typically out of file descriptors: back off instead of spinning.
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let (admitted, closed_oldest) = match limit.admit() {
            Admission::Admitted(admitted) => (admitted, false),
            Admission::AdmittedAfterClosingOldest(admitted) => (admitted, true),
            Admission::Refused => continue,
        };
        let local = stream.local_addr();
        let state = state.clone();
        // The address the client dialled (unmapped from a dual-stack listener's form): for
        // the kubelet's app probes, the pod's own.
        let local = local.map_err(|error| error.to_string());
        let local_ip = local.as_ref().ok().map(|addr| addr.ip().to_canonical());
        let metrics = limit.metrics().clone();
        let quit = state.quit.clone();
        // Set when this connection carried an accepted `POST /quitquitquit`.
        let quit_accepted = Arc::new(AtomicBool::new(false));
        let quit_after_answer = quit_accepted.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                let local = local.clone();
                let quit_accepted = quit_accepted.clone();
                async move {
                    let path = request.uri().path();
                    if let (Some(probers), Some(pod_ip)) = (&state.app_probers, local_ip)
                        && routes.metrics
                        && path.starts_with(APP_HEALTH_PREFIX)
                    {
                        return Ok::<_, Infallible>(probers.check(path, pod_ip).await);
                    }
                    let caller = || caller::uid_of(local.clone()?, peer);
                    let response = respond(request.method(), request.uri(), routes, &state, caller);
                    if response.extensions().get::<QuitAccepted>().is_some() {
                        quit_accepted.store(true, Ordering::Release);
                    }
                    Ok(response)
                }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(request_headers_timeout);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = connection => match served {
                    Err(error) if error.is_timeout() => {
                        metrics.record_timeout(DownstreamTimeout::RequestHeaders);
                        debug!(%peer, "admin connection closed: no complete request in time");
                    }
                    Err(error) => debug!(%error, "admin connection ended with an error"),
                    Ok(()) => {}
                },
                () = admitted.closed_to_make_room() => {
                    debug!(%peer, "admin connection closed to make room for a newer one");
                }
            }
            // Only now: the caller has its answer before the proxy stops.
            if quit_after_answer.load(Ordering::Acquire) {
                quit.notify_one();
            }
        });
        if closed_oldest {
            // Lets the closed connection's task drop its socket before the next accept, so the
            // listener's descriptors stay at its cap while a flood goes on.
            tokio::task::yield_now().await;
        }
    }
}

/// The answer to one request; `caller` tells the UID of whoever sent it (looked up only for
/// requests that change the proxy).
fn respond(
    method: &Method,
    uri: &Uri,
    routes: Routes,
    state: &AdminState,
    caller: impl FnOnce() -> Result<u32, String>,
) -> Response<Full<Bytes>> {
    let path = uri.path();
    let admin_endpoint = routes.admin
        && [
            CONFIG_DUMP_PATH,
            LOGGING_PATH,
            QUIT_PATH,
            STATS_PATH,
            ADMIN_READY_PATH,
        ]
        .contains(&path);
    let endpoint_exists = admin_endpoint
        || ((routes.metrics || routes.admin) && path == METRICS_PATH)
        || (routes.ready && path == READY_PATH);
    if !endpoint_exists {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    // Changes are POSTs (a stray GET or a crawler must not stop the proxy); reads are GETs.
    let changes = path == QUIT_PATH || (path == LOGGING_PATH && uri.query().is_some());
    let allowed = if changes {
        method == Method::POST
    } else {
        method == Method::GET || method == Method::HEAD
    };
    if !allowed {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    if changes && let Some(refusal) = refuse_change(path, state, caller) {
        return refusal;
    }
    match path {
        READY_PATH | ADMIN_READY_PATH => {
            if !state.capture_ok.load(Ordering::Acquire) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: this pod's capture is gone\n",
                )
            } else if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        CONFIG_DUMP_PATH => config_dump(state),
        LOGGING_PATH => logging(uri.query(), state),
        QUIT_PATH => {
            info!("POST /quitquitquit: stopping once answered");
            let mut response = text(StatusCode::OK, "OK\n");
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            response.extensions_mut().insert(QuitAccepted);
            response
        }
        STATS_PATH => match state.metrics.render() {
            Ok(metrics) => owned_text(
                StatusCode::OK,
                state.capture.counters(&state.bpffs) + &metrics,
            ),
            Err(error) => {
                error!(%error, "cannot render metrics");
                text(StatusCode::INTERNAL_SERVER_ERROR, "cannot render metrics\n")
            }
        },
        _ => prometheus(state),
    }
}

/// Marks the answer to an accepted `POST /quitquitquit`: the proxy stops once it is sent (and
/// the connection closed, which its `Connection: close` asks for).
#[derive(Debug, Clone, Copy)]
struct QuitAccepted;

/// Root, the proxy's own user and the allowed UIDs may change the proxy; anyone else gets this
/// 403, counted and logged.
fn refuse_change(
    path: &str,
    state: &AdminState,
    caller: impl FnOnce() -> Result<u32, String>,
) -> Option<Response<Full<Bytes>>> {
    let who = match caller() {
        Ok(uid) if caller::may_change_the_proxy(uid, &state.allowed_uids) => return None,
        Ok(uid) => format!("the caller is UID {uid}"),
        Err(error) => format!("the caller cannot be identified: {error}"),
    };
    state.metrics.admin_refusals(path).inc();
    warn!(
        path,
        caller = who,
        "admin request refused: it changes the proxy"
    );
    Some(owned_text(
        StatusCode::FORBIDDEN,
        format!(
            "forbidden: POST {path} changes the proxy, which only root, the proxy's own user (UID {}) and --admin-allowed-uids may do; {who}\n",
            rustix::process::geteuid().as_raw()
        ),
    ))
}

fn prometheus(state: &AdminState) -> Response<Full<Bytes>> {
    match state.metrics.render() {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT));
            response
        }
        Err(error) => {
            error!(%error, "cannot render metrics");
            text(StatusCode::INTERNAL_SERVER_ERROR, "cannot render metrics\n")
        }
    }
}

/// The routing config and identity in force, as JSON.
fn config_dump(state: &AdminState) -> Response<Full<Bytes>> {
    let dump = match state.mesh.get() {
        None => serde_json::json!({ "loaded": false }),
        Some(handle) => {
            let mesh = handle.current();
            serde_json::json!({
                "loaded": true,
                "identity": mesh.tls().map(|tls| tls.identity.to_string()),
                "http": mesh.routes().config(),
            })
        }
    };
    match serde_json::to_vec_pretty(&dump) {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(error) => owned_text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the config: {error}\n"),
        ),
    }
}

/// `GET /logging`: the level in force; `POST /logging?level=debug,access=off`: a new one.
fn logging(query: Option<&str>, state: &AdminState) -> Response<Full<Bytes>> {
    let mut directives = state
        .log_directives
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let Some(query) = query else {
        return owned_text(StatusCode::OK, format!("level: {directives}\n"));
    };
    let level = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("level="))
        .map(|level| level.replace("%2C", ",").replace("%3D", "="));
    let Some(level) = level else {
        return text(
            StatusCode::BAD_REQUEST,
            "expected ?level=<RUST_LOG directives>\n",
        );
    };
    match state.log_level.set(&level) {
        Ok(()) => {
            info!(level, "log level changed");
            level.clone_into(&mut directives);
            owned_text(StatusCode::OK, format!("level: {level}\n"))
        }
        Err(error) => owned_text(StatusCode::BAD_REQUEST, format!("{error}\n")),
    }
}

fn owned_text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{telemetry::metrics::LocalWorkload, testing::NoCapture};

    fn state() -> anyhow::Result<AdminState> {
        Ok(AdminState {
            metrics: Arc::new(Metrics::new(&LocalWorkload {
                name: "w".into(),
                namespace: "ns".into(),
            })?),
            ready: Arc::new(AtomicBool::new(false)),
            capture_ok: Arc::new(AtomicBool::new(true)),
            log_level: LogLevel::detached(),
            log_directives: Mutex::new("info".into()),
            mesh: OnceLock::new(),
            quit: Arc::new(Notify::new()),
            allowed_uids: vec![4244],
            bpffs: PathBuf::from("/nonexistent-bpffs"),
            capture: Arc::new(NoCapture),
            app_probers: None,
        })
    }

    const BOTH: Routes = Routes {
        metrics: true,
        ready: true,
        admin: false,
    };
    const ADMIN: Routes = Routes {
        metrics: false,
        ready: false,
        admin: true,
    };

    fn respond(
        method: &Method,
        uri: &str,
        routes: Routes,
        state: &AdminState,
    ) -> Response<Full<Bytes>> {
        // Root calls, unless a test says otherwise.
        super::respond(
            method,
            &uri.parse().expect("a valid URI"),
            routes,
            state,
            || Ok(0),
        )
    }

    async fn body_text(response: Response<Full<Bytes>>) -> String {
        use http_body_util::BodyExt;
        let bytes = response
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn admin_endpoints_dump_change_level_quit_and_report_bpf() -> anyhow::Result<()> {
        let state = state()?;
        assert_eq!(
            respond(&Method::GET, CONFIG_DUMP_PATH, BOTH, &state).status(),
            StatusCode::NOT_FOUND
        );
        state
            .mesh
            .get_or_init(|| Arc::new(MeshHandle::new(super::super::mesh::Mesh::plaintext())));
        let dump = body_text(respond(&Method::GET, CONFIG_DUMP_PATH, ADMIN, &state)).await;
        let dump: serde_json::Value = serde_json::from_str(&dump)?;
        assert_eq!(dump["http"]["accessLog"], false, "{dump}");

        let get_level = respond(&Method::GET, "/logging?level=debug", ADMIN, &state);
        assert_eq!(
            get_level.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "changes are POSTs"
        );
        let set = respond(&Method::POST, "/logging?level=debug", ADMIN, &state);
        assert_eq!(set.status(), StatusCode::OK);
        assert_eq!(
            body_text(respond(&Method::GET, LOGGING_PATH, ADMIN, &state)).await,
            "level: debug\n"
        );
        let bad = respond(&Method::POST, "/logging?level=debug=x=y", ADMIN, &state);
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

        assert_eq!(
            respond(&Method::GET, QUIT_PATH, ADMIN, &state).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let quit = respond(&Method::POST, QUIT_PATH, ADMIN, &state);
        assert_eq!(quit.status(), StatusCode::OK);
        assert!(quit.extensions().get::<QuitAccepted>().is_some());
        assert_eq!(quit.headers()[CONNECTION], "close");

        let stats = body_text(respond(&Method::GET, STATS_PATH, ADMIN, &state)).await;
        assert!(
            stats.starts_with("bpf: unavailable: no capture under /nonexistent-bpffs"),
            "{stats}"
        );
        assert!(stats.contains("istio_tcp_connections_opened_total"));
        Ok(())
    }

    #[tokio::test]
    async fn changes_are_refused_to_other_users_and_unknown_callers() -> anyhow::Result<()> {
        let state = state()?;
        let other_user = if rustix::process::geteuid().as_raw() == 4242 {
            4243
        } else {
            4242
        };
        let uri: Uri = QUIT_PATH.parse()?;
        let refused = super::respond(&Method::POST, &uri, ADMIN, &state, || Ok(other_user));
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert!(
            refused.extensions().get::<QuitAccepted>().is_none(),
            "a refused quit must not stop the proxy"
        );
        assert!(
            body_text(refused)
                .await
                .contains(&format!("UID {other_user}"))
        );
        let unknown = super::respond(&Method::POST, &uri, ADMIN, &state, || {
            Err("no socket".into())
        });
        assert_eq!(unknown.status(), StatusCode::FORBIDDEN);
        let level: Uri = "/logging?level=debug".parse()?;
        let refused = super::respond(&Method::POST, &level, ADMIN, &state, || Ok(other_user));
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert_eq!(state.metrics.admin_refusals(QUIT_PATH).get(), 2);
        assert_eq!(state.metrics.admin_refusals(LOGGING_PATH).get(), 1);
        // Reads need no identity.
        let read = super::respond(&Method::GET, &LOGGING_PATH.parse()?, ADMIN, &state, || {
            Err("never asked".into())
        });
        assert_eq!(read.status(), StatusCode::OK);
        // A UID allowed by `--admin-allowed-uids`.
        let allowed = super::respond(&Method::POST, &level, ADMIN, &state, || Ok(4244));
        assert_eq!(allowed.status(), StatusCode::OK);
        Ok(())
    }

    #[test]
    fn ready_is_503_until_the_flag_is_set() -> anyhow::Result<()> {
        let state = state()?;
        let before = respond(&Method::GET, READY_PATH, BOTH, &state);
        assert_eq!(before.status(), StatusCode::SERVICE_UNAVAILABLE);
        state.ready.store(true, Ordering::Release);
        let after = respond(&Method::GET, READY_PATH, BOTH, &state);
        assert_eq!(after.status(), StatusCode::OK);
        Ok(())
    }

    #[test]
    fn routes_limit_each_listener_to_its_endpoint() -> anyhow::Result<()> {
        let state = state()?;
        let ready_only = Routes {
            metrics: false,
            ready: true,
            admin: false,
        };
        let status = |path, routes| respond(&Method::GET, path, routes, &state).status();
        assert_eq!(status(METRICS_PATH, ready_only), StatusCode::NOT_FOUND);
        assert_eq!(status("/", BOTH), StatusCode::NOT_FOUND);
        assert_eq!(status(METRICS_PATH, BOTH), StatusCode::OK);
        let post = respond(&Method::POST, READY_PATH, BOTH, &state);
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        let metrics = respond(&Method::GET, METRICS_PATH, BOTH, &state);
        assert_eq!(metrics.headers()[CONTENT_TYPE], TEXT_FORMAT);
        Ok(())
    }

    async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
            .await??;
        Ok(response)
    }

    #[tokio::test]
    async fn serves_http_from_its_own_thread() -> anyhow::Result<()> {
        // Reserve two free ports, then hand them to the admin server.
        let free_port = || -> anyhow::Result<SocketAddr> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
        };
        let (metrics_addr, ready_addr, admin_addr) = (free_port()?, free_port()?, free_port()?);
        let state = Arc::new(state()?);
        let ready = state.ready.clone();
        let proxy_metrics = state.metrics.clone();
        let addrs = AdminAddrs {
            metrics: metrics_addr,
            ready: ready_addr,
            admin: admin_addr,
            max_connections: 2,
            // Long enough that the held connections below are still waiting when the third
            // one comes, on a loaded machine too.
            request_headers_timeout: Duration::from_millis(1500),
        };
        start(&addrs, state.clone())?;
        assert!(
            get(admin_addr, ADMIN_READY_PATH)
                .await?
                .starts_with("HTTP/1.1 503")
        );

        assert!(
            get(ready_addr, READY_PATH)
                .await?
                .starts_with("HTTP/1.1 503")
        );
        ready.store(true, Ordering::Release);
        let response = get(ready_addr, READY_PATH).await?;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("ready\n"));

        let metrics = get(metrics_addr, METRICS_PATH).await?;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains("istio_tcp_connections_opened_total"));
        assert!(
            get(metrics_addr, READY_PATH)
                .await?
                .starts_with("HTTP/1.1 404")
        );

        // Half a request line: closed once the headers are late.
        let mut slow = tokio::net::TcpStream::connect(ready_addr).await?;
        slow.write_all(b"GET /healthz/re").await?;
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await??;
        assert!(started.elapsed() >= Duration::from_millis(1400));
        // Counted once the connection's task has its error, just after the socket closed.
        let ready_listener = proxy_metrics.listener("ready", 2);
        let counted = async {
            while ready_listener.timeout_count(DownstreamTimeout::RequestHeaders) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(1), counted).await?;

        // Full (two connections held): the oldest is closed, the newest is served.
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = tokio::net::TcpStream::connect(ready_addr).await?;
            stream.write_all(b"GET /he").await?;
            held.push(stream);
        }
        assert!(
            get(ready_addr, READY_PATH)
                .await?
                .starts_with("HTTP/1.1 200")
        );
        // Closed: with FIN, or with RST when its half request was still unread.
        let mut closed = Vec::new();
        match tokio::time::timeout(Duration::from_secs(1), held[0].read_to_end(&mut closed)).await?
        {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(error) => return Err(error.into()),
        }
        assert!(proxy_metrics.listener("ready", 2).overflow.get() >= 1);

        // This process is the proxy's own user: it may change the level, and stop the proxy.
        let post = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(admin_addr).await?;
            let request = format!("POST {path} HTTP/1.1\r\nHost: test\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            anyhow::Ok(stream)
        };
        let mut stream = post("/logging?level=info").await?;
        let mut response = [0u8; 15];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut response)).await??;
        assert_eq!(&response, b"HTTP/1.1 200 OK");
        // The stop waits for the caller to have the whole answer (the connection closed).
        let mut stream = post(QUIT_PATH).await?;
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
            .await??;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("OK\n"), "{response}");
        tokio::time::timeout(Duration::from_secs(1), state.quit.notified()).await?;
        Ok(())
    }
}
