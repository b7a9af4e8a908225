//! A gRPC health server (`grpc.health.v1.Health/Check` over h2c) that answers a fixed status:
//! the app behind a kubelet `grpc` probe. The protobuf is framed by hand: the response is one
//! varint field.
use std::{
    collections::VecDeque,
    convert::Infallible,
    net::TcpListener,
    pin::Pin,
    task::{Context, Poll},
};

use anyhow::Result;
use hyper::{
    Request, Response,
    body::{Body, Bytes, Frame, Incoming},
    header::{CONTENT_TYPE, HeaderMap, HeaderValue},
    server::conn::http2,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};

pub const HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// Serves until killed; `status` is `grpc.health.v1.HealthCheckResponse.ServingStatus`
/// (1 SERVING, 2 NOT_SERVING).
pub fn serve(listener: TcpListener, status: u8) -> Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| async move {
                    Ok::<_, Infallible>(answer(request.uri().path(), status))
                });
                let _ = http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

fn answer(path: &str, status: u8) -> Response<Frames> {
    let mut frames = VecDeque::new();
    let mut trailers = HeaderMap::new();
    if path == HEALTH_CHECK_PATH {
        // Not compressed, 2 bytes long, field 1 (varint) = status.
        frames.push_back(Frame::data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status])));
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
    } else {
        trailers.insert("grpc-status", HeaderValue::from_static("12")); // UNIMPLEMENTED
    }
    frames.push_back(Frame::trailers(trailers));
    let mut response = Response::new(Frames(frames));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// A body of frames all ready up front: the message, then the trailers gRPC needs.
struct Frames(VecDeque<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}
