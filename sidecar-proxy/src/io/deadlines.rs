//! Deadlines on a downstream connection the proxy relays or serves, checked by the stream
//! itself (so they follow it through an HTTP upgrade):
//! - idle: no byte either way for this long closes it (Envoy's `idle_timeout` of TCP proxying
//!   and of HTTP connections, both 1 h by default in Istio);
//! - request headers (HTTP/1): a request's head not complete within this long of its *first*
//!   byte closes it (Envoy's `request_headers_timeout`). Counted from the first byte, not from
//!   the end of the previous response, so an idle keep-alive connection is left to the idle
//!   timeout: closing it sooner would race the app reusing it.
//!
//! Expiry surfaces as an `io::Error` of kind `TimedOut` from a read, which ends whatever copies
//! or serves the stream; [`expired`] tells it apart from other errors.
use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep, sleep_until},
};

use crate::{io::relay::IntoTcp, telemetry::metrics::DownstreamTimeout};

/// Why a [`Deadlines`] stream ended.
#[derive(Debug, thiserror::Error)]
pub enum Expired {
    #[error("no byte either way for {0:?} (idle timeout)")]
    Idle(Duration),
    #[error("a request's headers were not complete within {0:?} of their first byte")]
    RequestHeaders(Duration),
}

impl Expired {
    pub const fn timeout(&self) -> DownstreamTimeout {
        match self {
            Expired::Idle(_) => DownstreamTimeout::Idle,
            Expired::RequestHeaders(_) => DownstreamTimeout::RequestHeaders,
        }
    }
}

/// The deadline that ended `error`'s stream, if one did (looked for along the error's sources,
/// so a hyper error wrapping the stream's read error is recognised too).
pub fn expired<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Expired> {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(expired) = error.downcast_ref::<Expired>() {
            return Some(expired);
        }
        if let Some(expired) = error
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<Expired>())
        {
            return Some(expired);
        }
        source = error.source();
    }
    None
}

/// Where the requests of an HTTP/1 connection are, told by the server (request started,
/// response finished, upgraded) and by the stream (a byte read).
#[derive(Debug, Default)]
pub struct RequestHeads(Mutex<HeadState>);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum HeadState {
    /// Between requests: the next byte read starts a head.
    #[default]
    Waiting,
    /// A head started arriving at this instant.
    Reading(Instant),
    /// This many requests are being served (their bodies may still be arriving).
    Serving(u32),
    /// The connection carries another protocol now: no more heads.
    Upgraded,
}

impl RequestHeads {
    fn state(&self) -> std::sync::MutexGuard<'_, HeadState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request's head is complete; it is served until the returned guard is dropped (with
    /// the response's body).
    pub fn request_started(self: &Arc<Self>) -> Serving {
        let mut state = self.state();
        *state = match *state {
            HeadState::Serving(requests) => HeadState::Serving(requests + 1),
            HeadState::Upgraded => HeadState::Upgraded,
            HeadState::Waiting | HeadState::Reading(_) => HeadState::Serving(1),
        };
        Serving(self.clone())
    }

    /// The connection switched protocols (`101`): what follows is not HTTP/1.
    pub fn upgraded(&self) {
        *self.state() = HeadState::Upgraded;
    }

    fn byte_read(&self, now: Instant) {
        let mut state = self.state();
        if *state == HeadState::Waiting {
            *state = HeadState::Reading(now);
        }
    }

    fn reading_since(&self) -> Option<Instant> {
        match *self.state() {
            HeadState::Reading(since) => Some(since),
            _ => None,
        }
    }
}

/// One request being served; the connection waits for the next head once none is.
pub struct Serving(Arc<RequestHeads>);

impl Drop for Serving {
    fn drop(&mut self) {
        let mut state = self.0.state();
        if let HeadState::Serving(requests) = *state {
            *state = if requests > 1 {
                HeadState::Serving(requests - 1)
            } else {
                HeadState::Waiting
            };
        }
    }
}

/// A stream closed (by a read error) once idle for `idle`, or once a request's head is late.
pub struct Deadlines<S> {
    inner: S,
    idle: Duration,
    last_activity: Instant,
    request_heads: Option<(Arc<RequestHeads>, Duration)>,
    /// Armed at the earliest deadline, or earlier (then re-armed when it fires).
    timer: Pin<Box<Sleep>>,
}

impl<S> Deadlines<S> {
    pub fn new(inner: S, idle: Duration) -> Self {
        let now = Instant::now();
        Deadlines {
            inner,
            idle,
            last_activity: now,
            request_heads: None,
            timer: Box::pin(sleep_until(now + idle)),
        }
    }

    /// Also closes the stream when a request's head is not complete within `timeout` of its
    /// first byte; `heads` is told by the server when requests start and end.
    pub fn with_request_headers_timeout(
        mut self,
        heads: Arc<RequestHeads>,
        timeout: Duration,
    ) -> Self {
        self.request_heads = Some((heads, timeout));
        self
    }

    fn next_deadline(&self) -> (Instant, Expired) {
        let idle = (self.last_activity + self.idle, Expired::Idle(self.idle));
        let head = self.request_heads.as_ref().and_then(|(heads, timeout)| {
            let since = heads.reading_since()?;
            Some((since + *timeout, Expired::RequestHeaders(*timeout)))
        });
        match head {
            Some(head) if head.0 < idle.0 => head,
            _ => idle,
        }
    }

    /// Pending until the earliest deadline, then the error that ends the stream.
    fn poll_expiry(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            let (due, expired) = self.next_deadline();
            if Instant::now() >= due {
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, expired));
            }
            // Activity only moves the idle deadline later: the timer is re-armed when it fires
            // early, not on every read.
            if due < self.timer.deadline() || self.timer.is_elapsed() {
                self.timer.as_mut().reset(due);
            }
            ready!(self.timer.as_mut().poll(cx));
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Deadlines<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let now = Instant::now();
                    this.last_activity = now;
                    if let Some((heads, _)) = &this.request_heads {
                        heads.byte_read(now);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => this.poll_expiry(cx).map(Err),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deadlines<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        if written > 0 {
            this.last_activity = Instant::now();
        }
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        if written > 0 {
            this.last_activity = Instant::now();
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: IntoTcp> IntoTcp for Deadlines<S> {
    fn into_tcp(self) -> TcpStream {
        self.inner.into_tcp()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn activity_either_way_postpones_the_idle_deadline() {
        let (mut peer, stream) = duplex(64);
        let mut stream = Deadlines::new(stream, Duration::from_secs(10));
        let started = Instant::now();
        let mut buf = [0u8; 8];
        tokio::time::advance(Duration::from_secs(6)).await;
        peer.write_all(b"x").await.expect("write");
        assert_eq!(stream.read(&mut buf).await.expect("a byte"), 1);
        tokio::time::advance(Duration::from_secs(6)).await;
        stream.write_all(b"y").await.expect("write");
        let error = stream.read(&mut buf).await.expect_err("idle");
        assert!(matches!(expired(&error), Some(Expired::Idle(_))), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(22));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_head_must_be_complete_within_its_timeout_of_its_first_byte() {
        let (mut peer, stream) = duplex(64);
        let heads = Arc::new(RequestHeads::default());
        let mut stream = Deadlines::new(stream, Duration::from_secs(3600))
            .with_request_headers_timeout(heads.clone(), Duration::from_secs(10));
        let mut buf = [0u8; 64];

        // An idle keep-alive connection is the idle timeout's business, however long.
        tokio::time::advance(Duration::from_secs(600)).await;
        peer.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        assert!(stream.read(&mut buf).await.expect("the first line") > 0);
        let serving = heads.request_started();
        // A slow response is not a slow head.
        tokio::time::advance(Duration::from_secs(60)).await;
        drop(serving);

        peer.write_all(b"GET /next HTTP/1.1\r\n")
            .await
            .expect("write");
        let started = Instant::now();
        assert!(stream.read(&mut buf).await.expect("the next line") > 0);
        let error = stream.read(&mut buf).await.expect_err("late head");
        assert!(
            matches!(expired(&error), Some(Expired::RequestHeaders(_))),
            "{error}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn an_upgraded_connection_has_no_head_deadline() {
        let (mut peer, stream) = duplex(64);
        let heads = Arc::new(RequestHeads::default());
        let mut stream = Deadlines::new(stream, Duration::from_secs(3600))
            .with_request_headers_timeout(heads.clone(), Duration::from_secs(10));
        let mut buf = [0u8; 64];
        peer.write_all(b"GET /ws HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        assert!(stream.read(&mut buf).await.expect("the request") > 0);
        let serving = heads.request_started();
        heads.upgraded();
        drop(serving);
        peer.write_all(b"frame").await.expect("write");
        assert!(stream.read(&mut buf).await.expect("a frame") > 0);
        let started = Instant::now();
        let error = stream.read(&mut buf).await.expect_err("idle");
        assert!(matches!(expired(&error), Some(Expired::Idle(_))), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(3600));
    }
}
