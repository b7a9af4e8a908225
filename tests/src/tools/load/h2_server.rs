//! HTTP/2 with prior knowledge (h2c) for `labtool load-server`: the same fixed-size body and
//! `x-server-local` header as its HTTP/1.1 responses, served by hyper on the worker thread
//! that accepted the connection, so h2 connections cost the server what HTTP/1.1 ones do.

use std::{cell::OnceCell, convert::Infallible, net::TcpStream};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::runtime::Runtime;

use super::SERVER_LOCAL_HEADER;
use crate::tools::echo::payload;

/// The first bytes of every HTTP/2 connection preface.
pub const H2_PREFACE_START: &[u8; 4] = b"PRI ";

thread_local! {
    /// One runtime per worker thread, built on its first h2 connection.
    static RUNTIME: OnceCell<Runtime> = const { OnceCell::new() };
}

/// Serves every stream of `stream` (nonblocking, its preface unread) until the client closes.
pub fn serve(stream: TcpStream, local: &str, body_bytes: usize) -> Result<()> {
    let body = Bytes::from(payload(body_bytes));
    let local = local.to_owned();
    RUNTIME.with(|cell| {
        if cell.get().is_none() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the h2 runtime")?;
            let _ = cell.set(runtime);
        }
        let runtime = cell.get().expect("set above");
        runtime.block_on(async move {
            let stream = tokio::net::TcpStream::from_std(stream)?;
            let service = service_fn(move |_request: Request<Incoming>| {
                let response = Response::builder()
                    .header("content-type", "application/octet-stream")
                    .header(SERVER_LOCAL_HEADER, local.as_str())
                    .body(Full::new(body.clone()))
                    .expect("a valid response");
                async move { Ok::<_, Infallible>(response) }
            });
            http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
                .context("serving h2c")
        })
    })
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, thread};

    use http_body_util::{BodyExt, Empty};
    use hyper::client::conn::http2;

    use super::*;
    use crate::tools::load::server;

    #[tokio::test]
    async fn the_load_server_answers_h2c_like_http1() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || server::serve(listener, 1024, 4));
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        for _ in 0..3 {
            let request = Request::get(format!("http://{addr}/"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            let local = response.headers()[SERVER_LOCAL_HEADER].to_str().unwrap();
            assert_eq!(local, addr.to_string());
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, payload(1024));
        }
    }
}
