//! Bodies on their way through: one boxed type for every body the proxy sends, and a wrapper
//! that counts bytes and reports the request when the body ends (or is dropped: the client left).
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};
use hyper::body::{Body, Frame, SizeHint};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Told how a body ended.
pub trait BodyEnd: Send + 'static {
    /// `error`: the stream failed midway (the upstream reset).
    fn ended(self, error: Option<&BoxError>);
}

/// Counts the data bytes of `inner` into `counted`; calls `on_end` once, at the end of the
/// stream or on a failure. Dropped earlier (the reader went away), `on_end` is dropped unused,
/// which is for it to notice.
pub struct Counted<E: BodyEnd> {
    inner: ProxyBody,
    counted: Arc<AtomicU64>,
    on_end: Option<E>,
}

impl<E: BodyEnd> Counted<E> {
    pub fn new(inner: ProxyBody, counted: Arc<AtomicU64>, on_end: Option<E>) -> Self {
        let mut counted_body = Counted {
            inner,
            counted,
            on_end,
        };
        if counted_body.inner.is_end_stream() {
            counted_body.finish(None);
        }
        counted_body
    }

    fn finish(&mut self, error: Option<&BoxError>) {
        if let Some(on_end) = self.on_end.take() {
            on_end.ended(error);
        }
    }
}

impl<E: BodyEnd + Unpin> Body for Counted<E> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.counted.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if this.inner.is_end_stream() {
                    this.finish(None);
                }
            }
            Poll::Ready(Some(Err(error))) => this.finish(Some(error)),
            Poll::Ready(None) => this.finish(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// No end to report.
pub struct Untracked;

impl BodyEnd for Untracked {
    fn ended(self, _error: Option<&BoxError>) {}
}
