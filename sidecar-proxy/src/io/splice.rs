//! The relay of plain TCP (no TLS on either end): bytes go socket -> pipe -> socket with
//! splice(2) and never enter user space, as HAProxy relays `mode tcp`. TLS and HTTP are copied
//! (`copy`), as they must be: the proxy reads them.
//!
//! Each direction borrows a pipe from a process-wide pool only while it has bytes in flight
//! and gives it back, empty, when its source has nothing more to read: an idle connection
//! holds no pipe, so the thousands of connections that wait cost neither descriptors nor pipe
//! buffers (which the kernel charges to the proxy's user, a budget every proxy of the node
//! running as that user shares). A pipe that a splice fills is carrying a bulk transfer: it
//! grows to 1 MiB while lent, and shrinks back before it is kept for the next one. The pool is
//! bounded ([`max_pipes`], whose descriptors the connection caps set aside); a direction that
//! finds it empty, or whose socket the kernel cannot splice, copies through a buffer instead,
//! so a relay never waits for a pipe.
//!
//! Same contract as the copying relay: bytes are counted as they are read, a side that
//! finishes sending gets its FIN passed on while the other direction carries on, an error
//! ends both directions, and no byte moving either way for the idle timeout ends the relay
//! with [`Expired::Idle`].
//!
//! Not for sockets in the sockmap shortcut (`init --sockmap`): what the shortcut delivers
//! waits in the socket's sockmap queue, which only recvmsg(2) reads; splice(2) reads the TCP
//! queue and would never see it. [`can_splice`] asks the capture whether the shortcut is off.
use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use prometheus::IntCounter;
use rustix::{
    io::Errno,
    net::Shutdown,
    pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice},
    process::{Resource, getrlimit},
};
use sidecar_common::CaptureStatus;
use tokio::{
    io::Interest,
    net::TcpStream,
    time::{Instant, sleep_until},
};
use tracing::debug;

use crate::{
    accept::connection_limit::max_pipes, capture::CaptureProbe, io::copy::Transferred,
    io::deadlines::Expired,
};

/// A new pipe's size: the kernel's default (16 pages, which hold 16 of a TCP stream's page
/// fragments, 64 KiB or more), charged to the user's pipe budget whether used or not.
const PIPE_SIZE: usize = 64 * 1024;
/// What a pipe grows to (F_SETPIPE_SZ) while it carries a bulk transfer, the most an
/// unprivileged process may ask: measured here on loopback to veth, it took the proxy's CPU
/// per GB from ~375 ms at 64 KiB to ~265 ms at 256 KiB and ~215 ms at 1 MiB.
const BULK_PIPE_SIZE: usize = 1 << 20;
/// Asked of each splice from a socket: as much as the pipe holds.
const SPLICE_LEN: usize = BULK_PIPE_SIZE;
/// MOVE: pages are handed over, not copied, where the kernel can. NONBLOCK: the pipe never
/// blocks (the sockets are nonblocking already; readiness comes from tokio).
const FLAGS: SpliceFlags = SpliceFlags::MOVE.union(SpliceFlags::NONBLOCK);
/// Pipes kept open, empty and at [`PIPE_SIZE`], for the next transfers; beyond this a returned
/// pipe is closed. Few: every proxy of the node running as the same user shares the budget
/// they are charged to (`fs.pipe-user-pages-soft`, 64 MiB: past it, new pipes get 2 pages).
const IDLE_PIPES: usize = 8;
/// The buffer of a direction that copies instead, held (like a pipe) only while bytes are in
/// flight. Measured here, 64 KiB took a copying proxy's CPU per GB from ~800 ms (tokio's
/// 8 KiB) to ~450 ms.
const COPY_BUFFER: usize = 64 * 1024;

/// One end of a plain relay: its socket, and the bytes already read from it that the other
/// end has yet to get (a sniffed prefix, a server's greeting).
pub struct WireEnd {
    pub stream: TcpStream,
    pub unread: Vec<u8>,
}

/// Whether this pod's capture says no socket of it is in the sockmap shortcut, asked on
/// `stream` (the capture's getsockopt program answers on any socket of the pod). No capture
/// program (iptables, or none) has no shortcut either; a capture that does not say (an older
/// program) or an error is taken as a possible shortcut: copying is always correct.
pub fn can_splice(stream: &TcpStream, capture: &dyn CaptureProbe) -> bool {
    match capture.status_of(stream.as_fd()) {
        Ok(None) => true,
        Ok(Some(status)) => status.flags & CaptureStatus::SHORTCUT_OFF != 0,
        Err(error) => {
            debug!(%error, "cannot ask the capture about the sockmap shortcut; copying");
            false
        }
    }
}

/// The process's pipes, bounded by the open-file limit in force when the first relay starts
/// (the proxy raises it before it accepts anything).
pub fn pipes() -> &'static PipePool {
    static PIPES: OnceLock<PipePool> = OnceLock::new();
    PIPES.get_or_init(|| PipePool::new(max_pipes(getrlimit(Resource::Nofile).current)))
}

/// Relays between the two ends until both directions end, nothing moves for `idle`, or one
/// fails; splicing through pipes from `pipes`, or copying when `None`. Counts bytes read from
/// `downstream` under `received_bytes` and from `upstream` under `sent_bytes`; the totals are
/// returned even on error. The sockets stay the caller's, to close or reset.
pub async fn relay_wire(
    downstream: &mut WireEnd,
    upstream: &mut WireEnd,
    counters: [IntCounter; 2],
    idle: Duration,
    pipes: Option<&PipePool>,
) -> (Transferred, io::Result<()>) {
    let [received_bytes, sent_bytes] = counters;
    let activity = Activity::new();
    let (received, sent) = (AtomicU64::new(0), AtomicU64::new(0));
    let to_upstream = Direction {
        from: &downstream.stream,
        to: &upstream.stream,
        counter: &received_bytes,
        total: &received,
        activity: &activity,
    };
    let to_downstream = Direction {
        from: &upstream.stream,
        to: &downstream.stream,
        counter: &sent_bytes,
        total: &sent,
        activity: &activity,
    };
    let both = async {
        tokio::try_join!(
            to_upstream.run(std::mem::take(&mut downstream.unread), pipes),
            to_downstream.run(std::mem::take(&mut upstream.unread), pipes),
        )
    };
    let result = tokio::select! {
        result = both => result.map(drop),
        expired = activity.idle_for(idle) => Err(expired),
    };
    let transferred = Transferred {
        received: received.load(Ordering::Relaxed),
        sent: sent.load(Ordering::Relaxed),
    };
    (transferred, result)
}

/// When a byte last moved, either way.
struct Activity {
    start: Instant,
    /// Nanoseconds from `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn moved(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(nanos, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `idle`, with the error that ends the relay.
    async fn idle_for(&self, idle: Duration) -> io::Error {
        loop {
            let last = self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed));
            let Some(due) = last.checked_add(idle) else {
                return std::future::pending().await;
            };
            if Instant::now() >= due {
                return io::Error::new(io::ErrorKind::TimedOut, Expired::Idle(idle));
            }
            sleep_until(due).await;
        }
    }
}

/// One direction: reads `from`, writes `to`.
struct Direction<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    counter: &'a IntCounter,
    total: &'a AtomicU64,
    activity: &'a Activity,
}

impl Direction<'_> {
    /// Moves everything until `from` ends, then shuts `to` down for writing (a FIN).
    async fn run(self, unread: Vec<u8>, pipes: Option<&PipePool>) -> io::Result<()> {
        if !unread.is_empty() {
            self.read(unread.len());
            self.write_all(&unread).await?;
        }
        let mut splicing = pipes;
        let mut pipe: Option<Lent> = None;
        let mut buffer = Vec::new();
        let give_back = |pipe: &mut Option<Lent>| {
            if let (Some(pool), Some(lent)) = (pipes, pipe.take()) {
                pool.give_back(lent);
            }
        };
        loop {
            if pipe.is_none() {
                pipe = splicing.and_then(PipePool::lend);
            }
            let read = match pipe.as_mut() {
                Some(pipe) => self.splice_in(pipe),
                None => {
                    buffer.clear();
                    buffer.reserve(COPY_BUFFER);
                    self.from.try_read_buf(&mut buffer)
                }
            };
            match read {
                Ok(0) => {
                    give_back(&mut pipe);
                    return Ok(rustix::net::shutdown(self.to, Shutdown::Write)?);
                }
                Ok(read) => {
                    self.read(read);
                    match pipe.as_mut() {
                        Some(pipe) => self.splice_out(pipe).await?,
                        None => self.write_all(&buffer[..read]).await?,
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing to read: the (empty) pipe goes back, the buffer is freed.
                    give_back(&mut pipe);
                    buffer = Vec::new();
                    self.from.readable().await?;
                }
                Err(error) if pipe.is_some() && cannot_splice(&error) => {
                    // Nothing was read: copying from here on loses no byte.
                    debug!(%error, "cannot splice this socket; copying");
                    splicing = None;
                    give_back(&mut pipe);
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn read(&self, bytes: usize) {
        let bytes = bytes as u64;
        self.total.fetch_add(bytes, Ordering::Relaxed);
        self.counter.inc_by(bytes);
        self.activity.moved();
    }

    /// From the socket into the (empty) pipe: `WouldBlock` when there is nothing to read.
    fn splice_in(&self, lent: &mut Lent) -> io::Result<usize> {
        let read = self.from.try_io(Interest::READABLE, || {
            Ok(splice(
                self.from,
                None,
                &lent.pipe.write,
                None,
                SPLICE_LEN,
                FLAGS,
            )?)
        })?;
        lent.filled(read);
        Ok(read)
    }

    /// Empties the pipe into the socket.
    async fn splice_out(&self, lent: &mut Lent) -> io::Result<()> {
        while lent.pending > 0 {
            let written = self
                .to
                .async_io(Interest::WRITABLE, || {
                    Ok(splice(
                        &lent.pipe.read,
                        None,
                        self.to,
                        None,
                        lent.pending,
                        FLAGS,
                    )?)
                })
                .await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            lent.pending -= written;
            self.activity.moved();
        }
        Ok(())
    }

    async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let written = self
                .to
                .async_io(Interest::WRITABLE, || {
                    Ok(rustix::io::write(self.to, bytes)?)
                })
                .await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            bytes = &bytes[written..];
            self.activity.moved();
        }
        Ok(())
    }
}

/// The kernel cannot splice this socket (or a seccomp filter forbids splice): copy instead.
fn cannot_splice(error: &io::Error) -> bool {
    [Errno::INVAL, Errno::NOSYS, Errno::PERM, Errno::OPNOTSUPP]
        .map(|errno| Some(errno.raw_os_error()))
        .contains(&error.raw_os_error())
}

/// A bounded pool of pipes.
pub struct PipePool {
    idle: Mutex<Vec<Pipe>>,
    /// Pipes open, idle or lent (each decrements it when closed).
    open: Arc<AtomicUsize>,
    max: usize,
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    open: Arc<AtomicUsize>,
}

/// A pipe lent to one direction, with the bytes it holds.
struct Lent {
    pipe: Pipe,
    pending: usize,
    size: PipeSize,
}

/// Where a lent pipe's size stands: it grows once a splice fills it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PipeSize {
    Default,
    Grown,
    /// The kernel refused (the user's pipe budget is spent): not asked again.
    Refused,
}

impl Lent {
    /// A splice moved `read` bytes into the pipe: one that filled its default size is a bulk
    /// transfer, which a bigger pipe carries in fewer splices.
    fn filled(&mut self, read: usize) {
        self.pending += read;
        if self.size == PipeSize::Default && read >= PIPE_SIZE {
            self.size = match fcntl_setpipe_size(&self.pipe.write, BULK_PIPE_SIZE) {
                Ok(_) => PipeSize::Grown,
                Err(error) => {
                    debug!(%error, "cannot grow a pipe; keeping its size");
                    PipeSize::Refused
                }
            };
        }
    }
}

impl PipePool {
    pub fn new(max: usize) -> Self {
        PipePool {
            idle: Mutex::new(Vec::new()),
            open: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// A pipe, or `None` when `max` are open or the kernel refuses one.
    fn lend(&self) -> Option<Lent> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let pipe = match idle {
            Some(pipe) => pipe,
            None => {
                self.open
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                        (open < self.max).then_some(open + 1)
                    })
                    .ok()?;
                match Pipe::new(self.open.clone()) {
                    Ok(pipe) => pipe,
                    Err(error) => {
                        self.open.fetch_sub(1, Ordering::Relaxed);
                        debug!(%error, "cannot open a pipe; copying");
                        return None;
                    }
                }
            }
        };
        Some(Lent {
            pipe,
            pending: 0,
            size: PipeSize::Default,
        })
    }

    /// Keeps an empty pipe, at its default size, for the next transfer, or closes it. (A pipe
    /// that is not empty is never given back: its bytes belong to a relay that ended.)
    fn give_back(&self, lent: Lent) {
        if lent.pending > 0 {
            return;
        }
        if lent.size == PipeSize::Grown
            && let Err(error) = fcntl_setpipe_size(&lent.pipe.write, PIPE_SIZE)
        {
            debug!(%error, "cannot shrink a pipe; closing it");
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_PIPES {
            idle.push(lent.pipe);
        }
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Pipe {
    /// A new pipe, already counted in `open`.
    fn new(open: Arc<AtomicUsize>) -> io::Result<Self> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        Ok(Pipe { read, write, open })
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        time::timeout,
    };

    use rustix::pipe::fcntl_getpipe_size;

    use super::*;
    use crate::{
        io::deadlines,
        testing::{PATIENCE, socket_pair},
    };

    const SIZES: [usize; 5] = [0, 1, 65_535, 1_000_003, 16 * 1024 * 1024];

    /// The relay between a client and a server: (client, server, relay end result).
    struct Rig {
        client: TcpStream,
        server: TcpStream,
        relay: tokio::task::JoinHandle<(Transferred, io::Result<()>, [IntCounter; 2])>,
    }

    async fn rig(pipes: Option<&'static PipePool>, idle: Duration) -> io::Result<Rig> {
        rig_with_unread(pipes, idle, Vec::new(), Vec::new()).await
    }

    async fn rig_with_unread(
        pipes: Option<&'static PipePool>,
        idle: Duration,
        client_unread: Vec<u8>,
        server_unread: Vec<u8>,
    ) -> io::Result<Rig> {
        let (client, downstream) = socket_pair().await?;
        let (upstream, server) = socket_pair().await?;
        let counters = [
            IntCounter::new("received", "r").map_err(io::Error::other)?,
            IntCounter::new("sent", "s").map_err(io::Error::other)?,
        ];
        let relay = tokio::spawn(async move {
            let mut downstream = WireEnd {
                stream: downstream,
                unread: client_unread,
            };
            let mut upstream = WireEnd {
                stream: upstream,
                unread: server_unread,
            };
            let (transferred, result) = relay_wire(
                &mut downstream,
                &mut upstream,
                counters.clone(),
                idle,
                pipes,
            )
            .await;
            (transferred, result, counters)
        });
        Ok(Rig {
            client,
            server,
            relay,
        })
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Sends `bytes` and half-closes, while reading everything the peer sends.
    async fn exchange(stream: TcpStream, bytes: Vec<u8>) -> io::Result<Vec<u8>> {
        let (mut reader, mut writer) = stream.into_split();
        let send = async move {
            writer.write_all(&bytes).await?;
            writer.shutdown().await?;
            Ok::<_, io::Error>(writer)
        };
        let receive = async move {
            let mut received = Vec::new();
            reader.read_to_end(&mut received).await?;
            Ok::<_, io::Error>(received)
        };
        let (_writer, received) = tokio::try_join!(send, receive)?;
        Ok(received)
    }

    fn leaked_pool(max: usize) -> &'static PipePool {
        Box::leak(Box::new(PipePool::new(max)))
    }

    /// Every size, both ways at once, exact bytes and counters; `pipes` says how.
    async fn byte_exact_both_ways(pipes: Option<&'static PipePool>) -> anyhow::Result<()> {
        for size in SIZES {
            let rig = rig(pipes, PATIENCE).await?;
            let (up, down) = (pattern(size, 0), pattern(size, 0x5a));
            let (at_server, at_client) = timeout(PATIENCE * 4, async {
                tokio::try_join!(
                    exchange(rig.server, down.clone()),
                    exchange(rig.client, up.clone())
                )
            })
            .await??;
            assert!(at_server == up, "{size} bytes up: differ");
            assert!(at_client == down, "{size} bytes down: differ");
            let (transferred, result, [received, sent]) = rig.relay.await?;
            result?;
            let size = size as u64;
            assert_eq!(
                transferred,
                Transferred {
                    received: size,
                    sent: size
                }
            );
            assert_eq!((received.get(), sent.get()), (size, size));
        }
        Ok(())
    }

    #[tokio::test]
    async fn spliced_transfers_are_byte_exact_both_ways_at_once() -> anyhow::Result<()> {
        let pipes = leaked_pool(8);
        byte_exact_both_ways(Some(pipes)).await?;
        // The bytes went through pipes, and every pipe came back empty to be kept.
        assert!(pipes.open() > 0, "no pipe was used");
        assert!(pipes.open() <= IDLE_PIPES.min(8));
        let idle = pipes.idle.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        assert_eq!(pipes.open(), idle.len());
        for pipe in idle.iter() {
            assert_eq!(fcntl_getpipe_size(&pipe.write)?, PIPE_SIZE, "kept grown");
        }
        Ok(())
    }

    #[test]
    fn a_pipe_grows_for_bulk_and_is_kept_at_its_default_size() -> anyhow::Result<()> {
        let pipes = PipePool::new(2);
        let mut small = pipes.lend().ok_or_else(|| anyhow::anyhow!("a pipe"))?;
        small.filled(1500);
        assert_eq!(fcntl_getpipe_size(&small.pipe.write)?, PIPE_SIZE);
        let mut bulk = pipes.lend().ok_or_else(|| anyhow::anyhow!("a pipe"))?;
        bulk.filled(PIPE_SIZE);
        assert_eq!(fcntl_getpipe_size(&bulk.pipe.write)?, BULK_PIPE_SIZE);
        assert!(pipes.lend().is_none(), "beyond the bound");

        // Given back empty: kept, at the default size.
        bulk.pending = 0;
        pipes.give_back(bulk);
        let again = pipes
            .lend()
            .ok_or_else(|| anyhow::anyhow!("the kept pipe"))?;
        assert_eq!(fcntl_getpipe_size(&again.pipe.write)?, PIPE_SIZE);
        // Given back with bytes in it: closed, never lent to another relay.
        pipes.give_back(small);
        assert_eq!(pipes.open(), 1);
        drop(again);
        assert_eq!(pipes.open(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn without_a_pipe_to_be_had_the_bytes_are_copied_exactly() -> anyhow::Result<()> {
        let exhausted = leaked_pool(0);
        byte_exact_both_ways(Some(exhausted)).await?;
        assert_eq!(exhausted.open(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn copied_transfers_are_byte_exact_both_ways_at_once() -> anyhow::Result<()> {
        byte_exact_both_ways(None).await
    }

    #[tokio::test]
    async fn relays_share_a_pool_too_small_for_them_all() -> anyhow::Result<()> {
        let pipes = leaked_pool(1);
        let size = 4 * 1024 * 1024;
        let mut relays = Vec::new();
        for seed in 0..3u8 {
            let rig = rig(Some(pipes), PATIENCE).await?;
            relays.push(tokio::spawn(async move {
                let (up, down) = (pattern(size, seed), pattern(size, !seed));
                let (at_server, at_client) = tokio::try_join!(
                    exchange(rig.server, down.clone()),
                    exchange(rig.client, up.clone())
                )?;
                let (transferred, result, _) = rig.relay.await.map_err(io::Error::other)?;
                result?;
                Ok::<_, io::Error>((at_server == up, at_client == down, transferred))
            }));
        }
        for relay in relays {
            let (up_exact, down_exact, transferred) = timeout(PATIENCE * 4, relay).await???;
            assert!(up_exact && down_exact);
            assert_eq!(transferred.received, size as u64);
            assert_eq!(transferred.sent, size as u64);
        }
        assert!(pipes.open() <= 1);
        Ok(())
    }

    #[tokio::test]
    async fn bytes_read_before_the_relay_go_first() -> anyhow::Result<()> {
        let rig = rig_with_unread(
            Some(leaked_pool(2)),
            PATIENCE,
            b"sniffed ".to_vec(),
            b"greeting ".to_vec(),
        )
        .await?;
        let (at_server, at_client) = tokio::try_join!(
            exchange(rig.server, b"response".to_vec()),
            exchange(rig.client, b"request".to_vec())
        )?;
        assert_eq!(at_server, b"sniffed request");
        assert_eq!(at_client, b"greeting response");
        let (transferred, result, [received, sent]) = rig.relay.await?;
        result?;
        assert_eq!((transferred.received, transferred.sent), (15, 17));
        assert_eq!((received.get(), sent.get()), (15, 17));
        Ok(())
    }

    /// One side finishes sending; the other direction keeps going until it finishes too.
    async fn half_close(client_first: bool) -> anyhow::Result<()> {
        let rig = rig(Some(leaked_pool(2)), PATIENCE).await?;
        let (mut first, mut second) = if client_first {
            (rig.client, rig.server)
        } else {
            (rig.server, rig.client)
        };
        first.write_all(b"question").await?;
        first.shutdown().await?;
        let mut question = Vec::new();
        timeout(PATIENCE, second.read_to_end(&mut question)).await??;
        assert_eq!(question, b"question", "the FIN arrived after the bytes");
        // The other way still works after the FIN, for as long as the other side sends.
        let answer = pattern(300_000, 7);
        second.write_all(&answer).await?;
        let mut head = vec![0u8; 1000];
        timeout(PATIENCE, first.read_exact(&mut head)).await??;
        assert!(!rig.relay.is_finished());
        second.shutdown().await?;
        let mut rest = Vec::new();
        timeout(PATIENCE, first.read_to_end(&mut rest)).await??;
        head.extend(rest);
        assert!(head == answer, "the answer differs");
        let (transferred, result, _) = timeout(PATIENCE, rig.relay).await??;
        result?;
        let (client_sent, server_sent) = if client_first {
            (8, 300_000)
        } else {
            (300_000, 8)
        };
        assert_eq!(transferred.received, client_sent);
        assert_eq!(transferred.sent, server_sent);
        Ok(())
    }

    #[tokio::test]
    async fn a_client_half_close_leaves_the_response_flowing() -> anyhow::Result<()> {
        half_close(true).await
    }

    #[tokio::test]
    async fn a_server_half_close_leaves_the_request_flowing() -> anyhow::Result<()> {
        half_close(false).await
    }

    #[tokio::test]
    async fn a_reset_ends_the_relay_with_an_error_and_exact_counts() -> anyhow::Result<()> {
        let rig = rig(Some(leaked_pool(2)), PATIENCE).await?;
        let (mut client, mut server) = (rig.client, rig.server);
        client.write_all(b"partial").await?;
        let mut partial = [0u8; 7];
        timeout(PATIENCE, server.read_exact(&mut partial)).await??;
        // Closed with unread bytes and a zero linger: a RST.
        rustix::net::sockopt::set_socket_linger(&client, Some(Duration::ZERO))?;
        drop(client);
        let (transferred, result, [received, _]) = timeout(PATIENCE, rig.relay).await??;
        let error = result.expect_err("a reset is an error, not an end");
        assert!(
            matches!(
                error.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{error}"
        );
        assert_eq!(transferred.received, 7);
        assert_eq!(received.get(), 7);
        Ok(())
    }

    #[tokio::test]
    async fn nothing_moving_for_the_idle_timeout_ends_the_relay() -> anyhow::Result<()> {
        let idle = Duration::from_millis(300);
        let rig = rig(Some(leaked_pool(2)), idle).await?;
        let (mut client, mut server) = (rig.client, rig.server);
        // Bytes every 50 ms keep it open well past the timeout...
        let started = Instant::now();
        while started.elapsed() < idle * 3 {
            client.write_all(b"tick").await?;
            let mut tick = [0u8; 4];
            timeout(PATIENCE, server.read_exact(&mut tick)).await??;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!rig.relay.is_finished());
        // ...and nothing for the timeout closes it, as an idle timeout.
        let silent = Instant::now();
        let (_, result, _) = timeout(PATIENCE, rig.relay).await??;
        assert!(silent.elapsed() >= idle - Duration::from_millis(60));
        let error = result.expect_err("idle");
        assert!(
            matches!(deadlines::expired(&error), Some(Expired::Idle(_))),
            "{error}"
        );
        Ok(())
    }
}
