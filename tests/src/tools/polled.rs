//! TCP streams used the way event-loop programs (tokio, Go, nginx, Envoy) use theirs: the
//! socket is nonblocking, and a read or write that would block waits for readiness with
//! poll(2), then tries again.
//!
//! Why not plain blocking sockets: with the optional sockmap shortcut (`init --sockmap`) the
//! app's socket reads through the kernel's sockmap receive path, which returns EAGAIN to a
//! *blocking* reader woken without data (e.g. by the ACK of its own FIN) instead of waiting
//! again. Event-loop programs retry such a read; the lab's tools behave like them, so every
//! capture mode is exercised and measured with the same I/O pattern.
use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsFd,
    time::{Duration, Instant},
};

use rustix::event::{PollFd, PollFlags, Timespec, poll};

pub struct PolledStream {
    stream: TcpStream,
    /// How long one read or write may wait for readiness (None: forever).
    timeout: Option<Duration>,
}

impl PolledStream {
    /// Makes `stream` nonblocking; each operation then waits at most `timeout`.
    pub fn new(stream: TcpStream, timeout: Option<Duration>) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self { stream, timeout })
    }

    /// Connects within `timeout`, which then bounds each operation.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Self> {
        Self::new(TcpStream::connect_timeout(&addr, timeout)?, Some(timeout))
    }

    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.stream.set_nodelay(nodelay)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.stream.shutdown(how)
    }

    /// Fills `buf` with the first bytes waiting to be read without consuming them, or returns
    /// `UnexpectedEof` if the peer closes first.
    pub fn peek_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        loop {
            let peeked = self.retry(PollFlags::IN, |stream| stream.peek(buf))?;
            if peeked == buf.len() {
                return Ok(());
            }
            if peeked == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            // Part of the bytes are here: wait for the rest rather than spin.
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// The socket, still nonblocking (for an event loop to take over).
    pub fn into_inner(self) -> TcpStream {
        self.stream
    }

    /// Waits until the socket is ready for `events` (or has an error or hang-up to report,
    /// which the next attempt then returns).
    fn wait(&self, events: PollFlags) -> io::Result<()> {
        let deadline = self.timeout.map(|timeout| Instant::now() + timeout);
        loop {
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if remaining.is_some_and(|r| r.is_zero()) {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let timespec = remaining.map(|r| Timespec::try_from(r).expect("timeout fits"));
            let fd = self.stream.as_fd();
            let mut fds = [PollFd::new(&fd, events)];
            match poll(&mut fds, timespec.as_ref()) {
                Ok(0) => continue, // the deadline check above reports the timeout
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(errno) => return Err(errno.into()),
            }
        }
    }

    fn retry<T>(
        &mut self,
        events: PollFlags,
        mut op: impl FnMut(&mut TcpStream) -> io::Result<T>,
    ) -> io::Result<T> {
        loop {
            match op(&mut self.stream) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => self.wait(events)?,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                result => return result,
            }
        }
    }
}

impl Read for PolledStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.retry(PollFlags::IN, |stream| stream.read(buf))
    }
}

impl Write for PolledStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.retry(PollFlags::OUT, |stream| stream.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, thread};

    use super::*;

    #[test]
    fn reads_and_writes_wait_for_readiness() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut stream = PolledStream::new(stream, None).unwrap();
            let mut received = Vec::new();
            stream.read_to_end(&mut received).unwrap();
            // More than a socket buffer: writes must wait for the client to read.
            stream.write_all(&vec![7u8; 4 << 20]).unwrap();
            received
        });
        let mut client = PolledStream::connect(addr, Duration::from_secs(5)).unwrap();
        thread::sleep(Duration::from_millis(50)); // the first read must wait
        client.write_all(b"hello").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        assert_eq!(reply.len(), 4 << 20);
        assert_eq!(server.join().unwrap(), b"hello");
    }

    #[test]
    fn a_silent_peer_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = PolledStream::connect(addr, Duration::from_millis(100)).unwrap();
        let began = Instant::now();
        let error = client.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(began.elapsed() >= Duration::from_millis(100));
        drop(listener);
    }
}
