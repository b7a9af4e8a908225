//! Small vectored writes sent as one buffer. hyper writes an HTTP/1 message as its head and its
//! body, two slices of one `writev`; the kernel's `writev` path (the VFS, importing the iovec
//! array) costs more than `send`'s, once per request each way. Up to [`SMALL`] bytes are copied
//! into one buffer (the worker thread's) and written with `poll_write` (a TCP stream's `send`);
//! larger writes stay vectored, without a copy.
use std::{
    cell::RefCell,
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A typical response's head and a few KiB of body.
const SMALL: usize = 4 * 1024;

thread_local! {
    /// Where a small write is joined: one per worker thread, reused (not zeroed per write).
    static JOINED: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(SMALL));
}

/// `IO`, whose vectored writes of up to [`SMALL`] bytes leave as one plain write.
pub struct SmallWritesJoined<IO>(pub IO);

impl<IO: AsyncRead + Unpin> AsyncRead for SmallWritesJoined<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for SmallWritesJoined<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let [one] = bufs {
            return Pin::new(&mut self.0).poll_write(cx, one);
        }
        let total: usize = bufs.iter().map(|buf| buf.len()).sum();
        if total > SMALL {
            return Pin::new(&mut self.0).poll_write_vectored(cx, bufs);
        }
        JOINED.with(|joined| {
            // Taken already: a joining stream under this one (none is), left vectored.
            let Ok(mut joined) = joined.try_borrow_mut() else {
                return Pin::new(&mut self.0).poll_write_vectored(cx, bufs);
            };
            joined.clear();
            for buf in bufs {
                joined.extend_from_slice(buf);
            }
            Pin::new(&mut self.0).poll_write(cx, &joined)
        })
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Records each write: its bytes, and whether it came vectored.
    #[derive(Default)]
    struct Socket {
        writes: Vec<(bool, Vec<u8>)>,
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.push((false, buf.to_vec()));
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let bytes: Vec<u8> = bufs.iter().flat_map(|buf| buf.iter().copied()).collect();
            let len = bytes.len();
            self.writes.push((true, bytes));
            Poll::Ready(Ok(len))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_head_and_a_small_body_leave_in_one_plain_write() {
        let mut stream = SmallWritesJoined(Socket::default());
        let slices = [
            IoSlice::new(b"HTTP/1.1 200 OK\r\n\r\n"),
            IoSlice::new(b"hello"),
        ];
        let written = stream.write_vectored(&slices).await.unwrap();
        assert_eq!(written, 24);
        assert_eq!(
            stream.0.writes,
            [(false, b"HTTP/1.1 200 OK\r\n\r\nhello".to_vec())]
        );
        let written = stream
            .write_vectored(&[IoSlice::new(b"one")])
            .await
            .unwrap();
        assert_eq!(written, 3);
        assert_eq!(stream.0.writes[1], (false, b"one".to_vec()));
    }

    #[tokio::test]
    async fn a_large_body_stays_vectored() {
        let mut stream = SmallWritesJoined(Socket::default());
        let body = vec![1u8; SMALL];
        let slices = [IoSlice::new(b"head"), IoSlice::new(&body)];
        let written = stream.write_vectored(&slices).await.unwrap();
        assert_eq!(written, 4 + SMALL);
        assert_eq!(stream.0.writes.len(), 1);
        assert!(stream.0.writes[0].0, "vectored");
    }
}
