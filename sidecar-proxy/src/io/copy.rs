//! Bidirectional copy that counts bytes as they flow and propagates half-close.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes moved in each direction, as seen from the app.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// App -> upstream.
    pub received: u64,
    /// Upstream -> app.
    pub sent: u64,
}

/// Copies between the app and the upstream until both directions end. When one side finishes
/// sending, the other side's write half is shut down (a FIN), so request/response protocols
/// that half-close keep working. Bytes reach the counters as they are read, so long-lived
/// connections are visible before they close. The totals are returned even on error.
pub async fn copy_counted<A, U>(
    app: &mut A,
    upstream: &mut U,
    received_bytes: IntCounter,
    sent_bytes: IntCounter,
) -> (Transferred, io::Result<()>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut app = CountReads::new(app, received_bytes);
    let mut upstream = CountReads::new(upstream, sent_bytes);
    let result = tokio::io::copy_bidirectional(&mut app, &mut upstream).await;
    let transferred = Transferred {
        received: app.total,
        sent: upstream.total,
    };
    (transferred, result.map(drop))
}

/// Counts every byte read from the inner stream; writes pass through untouched.
struct CountReads<'a, S> {
    inner: &'a mut S,
    counter: IntCounter,
    total: u64,
}

impl<'a, S> CountReads<'a, S> {
    fn new(inner: &'a mut S, counter: IntCounter) -> Self {
        CountReads {
            inner,
            counter,
            total: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountReads<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        this.total += read;
        this.counter.inc_by(read);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountReads<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test]
    async fn counts_both_directions_and_propagates_eof() -> io::Result<()> {
        let (mut app_peer, mut app) = duplex(64);
        let (mut upstream, mut upstream_peer) = duplex(64);
        let received = IntCounter::new("r", "r").map_err(io::Error::other)?;
        let sent = IntCounter::new("s", "s").map_err(io::Error::other)?;
        let copy = tokio::spawn({
            let (received, sent) = (received.clone(), sent.clone());
            async move { copy_counted(&mut app, &mut upstream, received, sent).await }
        });

        app_peer.write_all(b"request").await?;
        app_peer.shutdown().await?;
        let mut request = Vec::new();
        upstream_peer.read_to_end(&mut request).await?;
        assert_eq!(request, b"request");

        upstream_peer.write_all(b"a longer response").await?;
        upstream_peer.shutdown().await?;
        let mut response = Vec::new();
        app_peer.read_to_end(&mut response).await?;
        assert_eq!(response, b"a longer response");

        let (transferred, result) = copy.await.map_err(io::Error::other)?;
        result?;
        assert_eq!(
            transferred,
            Transferred {
                received: 7,
                sent: 17
            }
        );
        assert_eq!((received.get(), sent.get()), (7, 17));
        Ok(())
    }
}
