//! The writes of a multiplexed (HTTP/2) connection gathered into one system call per poll of
//! the future serving it.
//!
//! h2 keeps a DATA frame's payload of 256 bytes or more aside, to write it without copying, and
//! must write it out before it takes the next frame: a served connection answering four streams
//! at once wrote four times (one `writev` per response), where HAProxy writes once. Each write
//! of a small message costs the sender and the receiver a trip through the TCP stack, and wakes
//! the peer once more. [`gather`] puts a buffer under the connection: its writes are copied in
//! (a full DATA frame, bulk, passes without a copy) and its flushes pass, and
//! [`Flusher::after_each_poll`], wrapped around the future serving the connection, writes the
//! buffer out each time that future has done all it could in one poll. Everything the
//! connection queued in that poll leaves together, as an event loop's proxy (HAProxy, Envoy)
//! writes at the end of its loop's turn.
//!
//! Nothing waits for a later poll: every poll ends with the buffer written, or with the socket
//! full (the task is then woken when it has room). A write error is kept and surfaced to the
//! connection by its next write or flush, so it ends as it would have. A connection that ends
//! without a shutdown (h2 closes at once when its client half-closes) still has its last
//! frames written out, for a bounded time.
use std::{
    future::{Future, poll_fn},
    io::{self, IoSlice},
    pin::{Pin, pin},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

/// Bytes gathered beyond this are written out at once, not at the end of the poll: a bound on
/// the buffer, and backpressure when the socket is full.
const HIGH_WATER: usize = 64 * 1024;
/// A write this large (a full DATA frame: bulk) is not copied: the gathered bytes are written
/// out, then it is, as it comes.
const PASS_THROUGH: usize = 16 * 1024;
/// The buffer keeps up to this much room between polls (a few responses' worth): an idle
/// connection does not hold the largest burst it ever sent.
const KEPT_CAPACITY: usize = 8 * 1024;
/// How long the frames a connection queued before it ended may take to leave.
const LAST_WRITE_OUT: Duration = Duration::from_secs(5);

/// The connection's side of the buffer: what hyper reads from and writes to.
pub struct GatheredWrites<IO>(Arc<Mutex<Gathered<IO>>>);

/// The serving side of the buffer: writes out what the connection gathered.
pub struct Flusher<IO>(Arc<Mutex<Gathered<IO>>>);

struct Gathered<IO> {
    io: IO,
    pending: Vec<u8>,
    /// Bytes of `pending` already written (a partial write).
    written: usize,
    /// A write out failed: the connection gets this error from its next write or flush.
    failed: Option<io::ErrorKind>,
}

/// Splits `io` into the stream the connection is served on and the [`Flusher`] that writes out
/// what it gathers.
pub fn gather<IO>(io: IO) -> (GatheredWrites<IO>, Flusher<IO>) {
    let shared = Arc::new(Mutex::new(Gathered {
        io,
        pending: Vec::new(),
        written: 0,
        failed: None,
    }));
    (GatheredWrites(shared.clone()), Flusher(shared))
}

fn lock<IO>(shared: &Mutex<Gathered<IO>>) -> MutexGuard<'_, Gathered<IO>> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<IO: AsyncWrite + Unpin> Gathered<IO> {
    /// Writes out the gathered bytes, as far as the socket takes them.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let unwritten = &self.pending[self.written..];
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, unwritten))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.pending.shrink_to(KEPT_CAPACITY);
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    fn failure(&self) -> io::Result<()> {
        self.failed.map_or(Ok(()), |kind| Err(kind.into()))
    }

    /// Takes `bufs` (`total` bytes): gathered, or written through when large (after the bytes
    /// gathered before them). Past the high-water mark the gathered bytes are written out
    /// first (pending while the socket is full).
    fn poll_take(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
        total: usize,
    ) -> Poll<io::Result<usize>> {
        self.failure()?;
        if total >= PASS_THROUGH {
            ready!(self.poll_write_out(cx))?;
            return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        }
        if self.pending.len() + total > HIGH_WATER {
            ready!(self.poll_write_out(cx))?;
        }
        for buf in bufs {
            self.pending.extend_from_slice(buf);
        }
        Poll::Ready(Ok(total))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for GatheredWrites<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.0).io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for GatheredWrites<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        lock(&self.0).poll_take(cx, &[IoSlice::new(buf)], buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total = bufs.iter().map(|buf| buf.len()).sum();
        lock(&self.0).poll_take(cx, bufs, total)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Passes: the serving future writes the bytes out after this poll.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(lock(&self.0).failure())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut gathered = lock(&self.0);
        gathered.failure()?;
        ready!(gathered.poll_write_out(cx))?;
        Pin::new(&mut gathered.io).poll_shutdown(cx)
    }
}

impl<IO: AsyncWrite + Unpin> Flusher<IO> {
    /// Runs `serving` (the future driving the connection), writing out what it gathered after
    /// each of its polls, and once it has ended, what is left (for at most [`LAST_WRITE_OUT`]).
    pub async fn after_each_poll<F: Future>(&self, serving: F) -> F::Output {
        let mut serving = pin!(serving);
        let served = poll_fn(|cx| {
            let polled = serving.as_mut().poll(cx);
            let _ = self.write_out(cx);
            polled
        })
        .await;
        let _ = tokio::time::timeout(LAST_WRITE_OUT, poll_fn(|cx| self.write_out(cx))).await;
        served
    }

    /// Ready once everything gathered is written and flushed, or writing failed.
    fn write_out(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut gathered = lock(&self.0);
        if gathered.failed.is_some() {
            return Poll::Ready(());
        }
        let written = match gathered.poll_write_out(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut gathered.io).poll_flush(cx),
            other => other,
        };
        let Poll::Ready(result) = written else {
            return Poll::Pending;
        };
        if let Err(error) = result {
            debug!(%error, "writing out an HTTP/2 connection's frames failed");
            gathered.failed = Some(error.kind());
            // The connection learns of it from its next write or flush: poll it again.
            cx.waker().wake_by_ref();
        }
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A socket that counts its writes and takes at most `room` bytes at a time.
    struct Socket {
        received: Vec<u8>,
        writes: usize,
        room: usize,
        broken: bool,
        /// Woken when it has room again.
        waiting: Option<Waker>,
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.broken {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            if self.room == 0 {
                self.waiting = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.received.extend_from_slice(&buf[..n]);
            self.writes += 1;
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn socket(room: usize) -> Socket {
        Socket {
            received: Vec::new(),
            writes: 0,
            room,
            broken: false,
            waiting: None,
        }
    }

    fn writes(flusher: &Flusher<Socket>) -> usize {
        lock(&flusher.0).io.writes
    }

    fn received(flusher: &Flusher<Socket>) -> Vec<u8> {
        lock(&flusher.0).io.received.clone()
    }

    #[tokio::test]
    async fn four_writes_and_flushes_in_one_poll_leave_in_one_write() {
        let socket = socket(usize::MAX);
        let (mut stream, flusher) = gather(socket);
        let serving = async {
            for response in [b"one ", b"two ", b"six ", b"ten "] {
                stream.write_all(response).await.unwrap();
                stream.flush().await.unwrap();
            }
        };
        flusher.after_each_poll(serving).await;
        assert_eq!(received(&flusher), b"one two six ten ");
        assert_eq!(writes(&flusher), 1);
    }

    #[tokio::test]
    async fn bytes_gathered_past_the_high_water_mark_are_written_at_once() {
        let socket = socket(usize::MAX);
        let (mut stream, flusher) = gather(socket);
        let frame = vec![7u8; PASS_THROUGH - 1];
        for _ in 0..HIGH_WATER / frame.len() {
            stream.write_all(&frame).await.unwrap();
        }
        assert_eq!(writes(&flusher), 0);
        stream.write_all(&frame).await.unwrap();
        // Written before any end of poll: the frames gathered before this one.
        assert_eq!(writes(&flusher), 1);
        assert_eq!(
            received(&flusher).len(),
            HIGH_WATER / frame.len() * frame.len()
        );
        flusher.after_each_poll(async {}).await;
        assert_eq!(writes(&flusher), 2);
    }

    #[tokio::test]
    async fn a_full_frame_is_written_through_after_the_bytes_gathered_before_it() {
        let socket = socket(usize::MAX);
        let (mut stream, flusher) = gather(socket);
        let frame = vec![7u8; PASS_THROUGH];
        stream.write_all(b"head").await.unwrap();
        stream.write_all(&frame).await.unwrap();
        assert_eq!(writes(&flusher), 2);
        let mut expected = b"head".to_vec();
        expected.extend_from_slice(&frame);
        assert_eq!(received(&flusher), expected);
    }

    #[test]
    fn a_full_socket_holds_the_rest_until_it_has_room() {
        let socket = socket(3);
        let (mut stream, flusher) = gather(socket);
        let mut cx = Context::from_waker(Waker::noop());
        let wrote = Pin::new(&mut stream).poll_write(&mut cx, b"abcdef");
        assert!(matches!(wrote, Poll::Ready(Ok(6))));
        let _ = flusher.write_out(&mut cx);
        assert_eq!(received(&flusher), b"abc");
        lock(&flusher.0).io.room = 10;
        let _ = flusher.write_out(&mut cx);
        assert_eq!(received(&flusher), b"abcdef");
    }

    #[test]
    fn a_failed_write_out_fails_the_connection_s_next_write_and_flush() {
        let mut socket = socket(usize::MAX);
        socket.broken = true;
        let (mut stream, flusher) = gather(socket);
        let mut cx = Context::from_waker(Waker::noop());
        let _ = Pin::new(&mut stream).poll_write(&mut cx, b"lost");
        let _ = flusher.write_out(&mut cx);
        let flushed = Pin::new(&mut stream).poll_flush(&mut cx);
        assert!(
            matches!(flushed, Poll::Ready(Err(ref e)) if e.kind() == io::ErrorKind::ConnectionReset)
        );
        let wrote = Pin::new(&mut stream).poll_write(&mut cx, b"more");
        assert!(matches!(wrote, Poll::Ready(Err(_))));
    }

    #[tokio::test]
    async fn frames_left_when_the_connection_ends_are_written_once_the_socket_has_room() {
        let socket = socket(0);
        let (mut stream, flusher) = gather(socket);
        let room_later = {
            let shared = flusher.0.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let mut gathered = lock(&shared);
                gathered.io.room = usize::MAX;
                if let Some(waker) = gathered.io.waiting.take() {
                    waker.wake();
                }
            })
        };
        // The serving future ends at once (as h2 does when its client half-closes).
        flusher
            .after_each_poll(async { stream.write_all(b"last frames").await.unwrap() })
            .await;
        assert_eq!(received(&flusher), b"last frames");
        room_later.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_writes_out_the_gathered_bytes_first() {
        let socket = socket(usize::MAX);
        let (mut stream, flusher) = gather(socket);
        stream.write_all(b"goaway").await.unwrap();
        stream.shutdown().await.unwrap();
        assert_eq!(received(&flusher), b"goaway");
    }
}
