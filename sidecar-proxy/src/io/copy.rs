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

/// Each direction's buffer: the largest plaintext a TLS record carries, so a full buffer is one
/// record and one system call each way (tokio's default, 8 KiB, made two of each per 16 KiB).
/// 32 KiB per copied connection, allocated when its relay starts.
const COPY_BUFFER: usize = 16 * 1024;

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
    let result =
        tokio::io::copy_bidirectional_with_sizes(&mut app, &mut upstream, COPY_BUFFER, COPY_BUFFER)
            .await;
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

    /// An upstream that has nothing to say and remembers the size of every write it gets.
    #[derive(Default)]
    struct WriteSizes(Vec<usize>);

    impl AsyncRead for WriteSizes {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for WriteSizes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().0.push(buf.len());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn sixteen_kib_from_the_app_go_upstream_in_one_write() -> io::Result<()> {
        let (mut app_peer, mut app) = duplex(64 * 1024);
        app_peer.write_all(&[1; 16 * 1024]).await?;
        app_peer.shutdown().await?;
        let mut upstream = WriteSizes::default();
        let counter = || IntCounter::new("c", "c").map_err(io::Error::other);
        let (transferred, result) =
            copy_counted(&mut app, &mut upstream, counter()?, counter()?).await;
        result?;
        assert_eq!(transferred.received, 16 * 1024);
        // Over mTLS, a write is a record: one full record, not two halves.
        assert_eq!(upstream.0, [16 * 1024]);
        Ok(())
    }

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
