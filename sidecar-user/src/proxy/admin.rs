//! `/stats/prometheus` and `/healthz/ready`, served from a thread of their own so scrapes
//! never compete with the data path (as ztunnel keeps its admin runtime apart).
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::Context;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus::TEXT_FORMAT;
use tokio::net::TcpListener;
use tracing::{debug, error, info, warn};

use super::metrics::Metrics;

pub const METRICS_PATH: &str = "/stats/prometheus";
pub const READY_PATH: &str = "/healthz/ready";
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Which endpoints a listener answers; the others are 404 there.
#[derive(Debug, Clone, Copy, Default)]
struct Routes {
    metrics: bool,
    ready: bool,
}

/// What the admin endpoints report on.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// False until every listener is bound (and again while shutting down).
    pub ready: Arc<AtomicBool>,
}

/// Binds the admin addresses now, so a port conflict fails startup, then serves them on a
/// dedicated thread with its own current-thread runtime. The thread lives as long as the
/// process.
pub fn start(
    metrics_addr: SocketAddr,
    ready_addr: SocketAddr,
    state: AdminState,
) -> anyhow::Result<()> {
    // One listener serves both endpoints when they share an address.
    let mut bindings: Vec<(SocketAddr, Routes)> = vec![(
        metrics_addr,
        Routes {
            metrics: true,
            ready: false,
        },
    )];
    match bindings.iter_mut().find(|(addr, _)| *addr == ready_addr) {
        Some((_, routes)) => routes.ready = true,
        None => bindings.push((
            ready_addr,
            Routes {
                metrics: false,
                ready: true,
            },
        )),
    }
    let listeners = bindings
        .into_iter()
        .map(|(addr, routes)| {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot bind admin address {addr}"))?;
            listener.set_nonblocking(true)?;
            info!(%addr, metrics = routes.metrics, ready = routes.ready, "admin listening");
            Ok((listener, routes))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build the admin runtime")?;
    let state = Arc::new(state);
    thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut servers = tokio::task::JoinSet::new();
                for (listener, routes) in listeners {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            servers.spawn(serve(listener, routes, state.clone()));
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

async fn serve(listener: TcpListener, routes: Routes, state: Arc<AdminState>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                warn!(%error, "admin accept failed");
                // Typically out of file descriptors: back off instead of spinning.
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = respond(request.method(), request.uri().path(), routes, &state);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%error, "admin connection ended with an error");
            }
        });
    }
}

fn respond(
    method: &Method,
    path: &str,
    routes: Routes,
    state: &AdminState,
) -> Response<Full<Bytes>> {
    let endpoint_exists =
        (routes.metrics && path == METRICS_PATH) || (routes.ready && path == READY_PATH);
    if !endpoint_exists {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    if path == READY_PATH {
        return if state.ready.load(Ordering::Acquire) {
            text(StatusCode::OK, "ready\n")
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        };
    }
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
    use crate::proxy::metrics::LocalWorkload;

    fn state() -> anyhow::Result<AdminState> {
        Ok(AdminState {
            metrics: Arc::new(Metrics::new(&LocalWorkload {
                name: "w".into(),
                namespace: "ns".into(),
            })?),
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    const BOTH: Routes = Routes {
        metrics: true,
        ready: true,
    };

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
        let (metrics_addr, ready_addr) = (free_port()?, free_port()?);
        let state = state()?;
        let ready = state.ready.clone();
        start(metrics_addr, ready_addr, state)?;

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
        Ok(())
    }
}
