//! `labtool load-client`: runs one [`LoadSpec`] and reports a [`LoadReport`].
//!
//! Blocking sockets, one thread per connection (or per closed loop): open-loop sends are timed
//! with `nanosleep` at 1 ns timer slack, which tokio's millisecond timer wheel could not do.
//! Every worker warms up, then all wait while the caller snapshots its counters, then all
//! measure from one common start instant.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::path::Path;
use std::sync::{Barrier, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use hdrhistogram::Histogram;

use super::server::find;
use super::{
    BULK_PREFACE, ECHO_PREFACE, LoadReport, LoadSpec, SERVER_LOCAL_HEADER, WARM_LINE, Workload,
    histogram,
};
use crate::tools::polled::PolledStream;

/// Bounds every connect, read and write: a stalled path fails the run instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the client waits for the caller's start file after warming up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const KEEP_ALIVE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
const CLOSING_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

/// Runs the workload; prints [`WARM_LINE`] to `announce` between warm-up and measurement.
pub fn run(spec: &LoadSpec, announce: &mut impl Write) -> Result<LoadReport> {
    // Default slack (50 µs) would delay every open-loop send by that much.
    rustix::thread::set_current_timer_slack(NonZeroU64::new(1))
        .context("setting the timer slack")?;
    let workers = match spec.workload {
        Workload::PingPong { .. } | Workload::Bulk { .. } => 1,
        Workload::Http { connections, .. } => connections,
        Workload::ConnectPerRequest { concurrency } => concurrency,
        Workload::H2 { .. } => bail!("the h2 workload is driven by h2load, not labtool"),
    };
    ensure!(workers > 0, "the workload needs at least one connection");
    if let Workload::Http {
        rate: Some(rate), ..
    } = spec.workload
    {
        ensure!(rate.is_finite() && rate > 0.0, "the rate must be positive");
    }
    let gate = StartGate::new(workers);
    let (tallies, waited) = thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|index| {
                let gate = &gate;
                scope.spawn(move || run_worker(spec, index, workers, gate))
            })
            .collect();
        gate.all_warm.wait();
        let waited = writeln!(announce, "{WARM_LINE}")
            .and_then(|()| announce.flush())
            .map_err(anyhow::Error::from)
            .and_then(|()| wait_for_start_file(spec.start_file.as_deref()));
        // Released even when the wait failed: the workers must not block forever.
        gate.release(Instant::now());
        let tallies: Result<Vec<Tally>> = handles
            .into_iter()
            .map(|handle| handle.join().map_err(|_| anyhow!("a load worker panicked")))
            .collect();
        (tallies, waited)
    });
    let mut total = Tally::default();
    for tally in tallies? {
        total.absorb(tally);
    }
    if let Err(error) = waited {
        total.fail(error);
    }
    total.into_report(*gate.start.get().expect("released above"))
}

/// Workers meet here after warming up; the main thread picks the common start instant.
struct StartGate {
    all_warm: Barrier,
    released: Barrier,
    start: OnceLock<Instant>,
}

impl StartGate {
    fn new(workers: usize) -> Self {
        Self {
            all_warm: Barrier::new(workers + 1),
            released: Barrier::new(workers + 1),
            start: OnceLock::new(),
        }
    }

    fn release(&self, start: Instant) {
        let _ = self.start.set(start);
        self.released.wait();
    }

    /// Worker side: reports warm, returns the start instant once released.
    fn wait_for_start(&self) -> Instant {
        self.all_warm.wait();
        self.released.wait();
        *self.start.get().expect("set before release")
    }
}

fn wait_for_start_file(path: Option<&Path>) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let deadline = Instant::now() + START_TIMEOUT;
    while !path.exists() {
        ensure!(
            Instant::now() < deadline,
            "start file {} did not appear within {START_TIMEOUT:?}",
            path.display()
        );
        thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// What a worker counted. The warm-up's tally is kept only for connections and errors.
struct Tally {
    operations: u64,
    bytes: u64,
    connections: u64,
    errors: u64,
    first_error: Option<String>,
    latency: Histogram<u64>,
    connect_latency: Histogram<u64>,
    finished: Option<Instant>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            operations: 0,
            bytes: 0,
            connections: 0,
            errors: 0,
            first_error: None,
            latency: histogram::new_latency(),
            connect_latency: histogram::new_latency(),
            finished: None,
        }
    }
}

impl Tally {
    fn fail(&mut self, error: anyhow::Error) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| format!("{error:#}"));
    }

    fn absorb(&mut self, other: Tally) {
        self.operations += other.operations;
        self.bytes += other.bytes;
        self.connections += other.connections;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latency
            .add(&other.latency)
            .expect("histograms with the same bounds");
        self.connect_latency
            .add(&other.connect_latency)
            .expect("histograms with the same bounds");
        self.finished = self.finished.max(other.finished);
    }

    /// Warm-up connections and errors count too: the proxy saw them.
    fn with_warmup(mut self, warmup: Tally) -> Tally {
        self.connections += warmup.connections;
        self.errors += warmup.errors;
        self.first_error = warmup.first_error.or(self.first_error);
        self
    }

    fn into_report(self, start: Instant) -> Result<LoadReport> {
        let finished = self.finished.unwrap_or(start);
        Ok(LoadReport {
            operations: self.operations,
            elapsed_ns: finished.saturating_duration_since(start).as_nanos() as u64,
            bytes: self.bytes,
            connections: self.connections,
            errors: self.errors,
            first_error: self.first_error,
            latency: histogram::encode(&self.latency)?,
            connect_latency: if self.connect_latency.is_empty() {
                None
            } else {
                Some(histogram::encode(&self.connect_latency)?)
            },
        })
    }
}

/// When each operation is sent within a phase.
#[derive(Clone, Copy)]
enum Schedule {
    /// The next operation as soon as the previous one completes.
    Closed,
    /// Operation `i` is due at `phase start + offset + i * interval`.
    Open {
        interval: Duration,
        offset: Duration,
    },
}

fn run_worker(spec: &LoadSpec, index: usize, workers: usize, gate: &StartGate) -> Tally {
    match spec.workload {
        Workload::PingPong { message_bytes } => {
            let message = crate::tools::echo::payload(message_bytes);
            let mut reply = vec![0u8; message_bytes];
            repeat_operation(
                spec,
                gate,
                Schedule::Closed,
                |tally| open_checked(spec, ECHO_PREFACE, tally),
                |stream, _| {
                    stream.write_all(&message).context("sending")?;
                    stream.read_exact(&mut reply).context("reading the echo")?;
                    ensure!(reply == message, "the echo differs from the message");
                    Ok(())
                },
            )
        }
        Workload::Http { rate, .. } => {
            let schedule = match rate {
                None => Schedule::Closed,
                Some(rate) => Schedule::Open {
                    interval: Duration::from_secs_f64(workers as f64 / rate),
                    offset: Duration::from_secs_f64(index as f64 / rate),
                },
            };
            repeat_operation(
                spec,
                gate,
                schedule,
                |tally| HttpConnection::open(spec, tally),
                |connection, _| connection.exchange(KEEP_ALIVE_REQUEST, spec.expect_server),
            )
        }
        Workload::ConnectPerRequest { .. } => repeat_operation(
            spec,
            gate,
            Schedule::Closed,
            |_| Ok(()),
            |(), tally| {
                let mut connection = HttpConnection::open(spec, tally)?;
                connection.exchange(CLOSING_REQUEST, spec.expect_server)
            },
        ),
        Workload::Bulk { chunk_bytes } => {
            let mut warm = Tally::default();
            let warm_until = Instant::now() + Duration::from_millis(spec.warmup_ms);
            if let Err(error) = transfer(spec, chunk_bytes, warm_until, &mut warm) {
                warm.fail(error);
            }
            let start = gate.wait_for_start();
            let mut measured = Tally::default();
            let until = start + Duration::from_millis(spec.duration_ms);
            if let Err(error) = transfer(spec, chunk_bytes, until, &mut measured) {
                measured.fail(error);
            }
            measured.finished = Some(Instant::now());
            measured.with_warmup(warm)
        }
        Workload::H2 { .. } => unreachable!("refused by `run`"),
    }
}

/// Sets up per-worker state, runs `operation` through the warm-up, waits at the gate, then
/// runs it through the measured phase. A failure stops this worker (the run is invalid anyway).
fn repeat_operation<S>(
    spec: &LoadSpec,
    gate: &StartGate,
    schedule: Schedule,
    setup: impl FnOnce(&mut Tally) -> Result<S>,
    mut operation: impl FnMut(&mut S, &mut Tally) -> Result<()>,
) -> Tally {
    let warm_start = Instant::now();
    let mut warm = Tally::default();
    let warmed = setup(&mut warm).and_then(|mut state| {
        let until = warm_start + Duration::from_millis(spec.warmup_ms);
        drive(
            &mut warm,
            &mut state,
            &mut operation,
            schedule,
            warm_start,
            until,
        )?;
        Ok(state)
    });
    let warmed = warmed.map_err(|error| warm.fail(error)).ok();
    let start = gate.wait_for_start();
    let mut measured = Tally::default();
    if let Some(mut state) = warmed {
        let until = start + Duration::from_millis(spec.duration_ms);
        if let Err(error) = drive(
            &mut measured,
            &mut state,
            &mut operation,
            schedule,
            start,
            until,
        ) {
            measured.fail(error);
        }
    }
    measured.finished = Some(Instant::now());
    measured.with_warmup(warm)
}

/// Runs operations from `from` to `until`, recording each one's latency.
fn drive<S>(
    tally: &mut Tally,
    state: &mut S,
    operation: &mut impl FnMut(&mut S, &mut Tally) -> Result<()>,
    schedule: Schedule,
    from: Instant,
    until: Instant,
) -> Result<()> {
    for sent in 0u32.. {
        let began = match schedule {
            Schedule::Closed => Instant::now(),
            Schedule::Open { interval, offset } => from + offset + interval * sent,
        };
        if began >= until {
            break;
        }
        if let Some(early) = began.checked_duration_since(Instant::now()) {
            thread::sleep(early);
        }
        operation(state, tally)?;
        tally
            .latency
            .saturating_record(began.elapsed().as_nanos() as u64);
        tally.operations += 1;
    }
    Ok(())
}

/// Connects, sends `preface`, reads the server's address line and checks it.
fn open_checked(spec: &LoadSpec, preface: &[u8; 4], tally: &mut Tally) -> Result<PolledStream> {
    let mut stream = connect(spec.connect_to, tally)?;
    stream.write_all(preface).context("sending the preface")?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        stream
            .read_exact(&mut byte)
            .context("reading the server's address line")?;
        line.push(byte[0]);
        ensure!(line.len() < 128, "the server's address line is too long");
    }
    check_server(String::from_utf8_lossy(&line).trim(), spec.expect_server)?;
    Ok(stream)
}

fn connect(addr: SocketAddr, tally: &mut Tally) -> Result<PolledStream> {
    let began = Instant::now();
    let stream =
        PolledStream::connect(addr, IO_TIMEOUT).with_context(|| format!("connecting to {addr}"))?;
    tally
        .connect_latency
        .saturating_record(began.elapsed().as_nanos() as u64);
    tally.connections += 1;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The server must have been reached at `expected` (IPv4-mapped and plain IPv4 compare equal).
fn check_server(reported: &str, expected: SocketAddr) -> Result<()> {
    let reported: SocketAddr = reported
        .parse()
        .with_context(|| format!("the server reported {reported:?}, not an address"))?;
    let canonical = |addr: SocketAddr| (addr.ip().to_canonical(), addr.port());
    ensure!(
        canonical(reported) == canonical(expected),
        "wrong destination: the server was reached at {reported}, the client dialled {expected}"
    );
    Ok(())
}

/// One HTTP/1.1 connection; responses are framed by Content-Length.
struct HttpConnection {
    stream: PolledStream,
    received: Vec<u8>,
    destination_checked: bool,
}

impl HttpConnection {
    fn open(spec: &LoadSpec, tally: &mut Tally) -> Result<Self> {
        Ok(Self {
            stream: connect(spec.connect_to, tally)?,
            received: Vec::with_capacity(4096),
            destination_checked: false,
        })
    }

    /// Sends `request` and reads one complete 200 response; checks the server's address on the
    /// connection's first response.
    fn exchange(&mut self, request: &[u8], expect_server: SocketAddr) -> Result<()> {
        self.stream
            .write_all(request)
            .context("sending a request")?;
        self.received.clear();
        let mut chunk = [0u8; 8192];
        let mut framing: Option<(usize, usize)> = None; // (head length, body length)
        loop {
            if let Some((head, body)) = framing
                && self.received.len() >= head + body
            {
                ensure!(
                    self.received.len() == head + body,
                    "bytes after the response (no request was pipelined)"
                );
                return Ok(());
            }
            let read = self.stream.read(&mut chunk).context("reading a response")?;
            if read == 0 {
                bail!("connection closed before a complete response");
            }
            self.received.extend_from_slice(&chunk[..read]);
            if framing.is_none()
                && let Some(head_end) = find(&self.received, b"\r\n\r\n")
            {
                let head = String::from_utf8_lossy(&self.received[..head_end]).to_ascii_lowercase();
                framing = Some((head_end + 4, self.check_head(&head, expect_server)?));
            }
        }
    }

    /// Checks the status (and the server's address once); returns the body length.
    fn check_head(&mut self, head: &str, expect_server: SocketAddr) -> Result<usize> {
        ensure!(
            head.starts_with("http/1.1 200 "),
            "unexpected response {:?}",
            head.lines().next().unwrap_or_default()
        );
        let header = |name: &str| {
            head.split("\r\n")
                .filter_map(|line| line.split_once(':'))
                .find(|(key, _)| key.trim() == name)
                .map(|(_, value)| value.trim())
        };
        if !self.destination_checked {
            let local = header(SERVER_LOCAL_HEADER)
                .with_context(|| format!("no {SERVER_LOCAL_HEADER} header in the response"))?;
            check_server(local, expect_server)?;
            self.destination_checked = true;
        }
        header("content-length")
            .context("no content-length in the response")?
            .parse()
            .context("bad content-length")
    }
}

/// One bulk transfer: writes `chunk_bytes` chunks until `until`, half-closes, and checks the
/// server's count of bytes received.
fn transfer(spec: &LoadSpec, chunk_bytes: usize, until: Instant, tally: &mut Tally) -> Result<()> {
    let mut stream = open_checked(spec, BULK_PREFACE, tally)?;
    let chunk = crate::tools::echo::payload(chunk_bytes);
    let mut sent = 0u64;
    while Instant::now() < until {
        stream.write_all(&chunk).context("sending bulk data")?;
        sent += chunk.len() as u64;
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .context("half-closing")?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .context("reading the server's byte count")?;
    let received: u64 = answer
        .trim()
        .parse()
        .with_context(|| format!("bad byte count {answer:?}"))?;
    ensure!(
        received == sent,
        "the server received {received} of {sent} bytes"
    );
    tally.bytes += sent;
    tally.operations += 1;
    Ok(())
}

/// Reads a report written by [`run`] from the client's output (its last line).
pub fn report_from_output(stdout: &str) -> Result<LoadReport> {
    let line = stdout
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("parsing load-client output {line:?}"))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::tools::load::{histogram, server};

    fn start_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || server::serve(listener, 1024, 16));
        addr
    }

    fn spec(workload: Workload, server: SocketAddr) -> LoadSpec {
        LoadSpec {
            workload,
            connect_to: server,
            expect_server: server,
            warmup_ms: 20,
            duration_ms: 100,
            start_file: None,
        }
    }

    fn run_ok(spec: &LoadSpec) -> LoadReport {
        let mut announced = Vec::new();
        let report = run(spec, &mut announced).unwrap();
        assert_eq!(announced, b"warm\n");
        assert_eq!(report.errors, 0, "{:?}", report.first_error);
        assert!(report.operations > 0);
        report
    }

    #[test]
    fn every_workload_runs_against_the_server() {
        let server = start_server();
        let ping = run_ok(&spec(Workload::PingPong { message_bytes: 64 }, server));
        assert_eq!(ping.connections, 1);
        let latency = histogram::decode(&ping.latency).unwrap();
        assert_eq!(latency.len(), ping.operations);

        let open = Workload::Http {
            connections: 4,
            rate: Some(2000.0),
        };
        let http = run_ok(&spec(open, server));
        assert_eq!(http.connections, 4);
        // 100 ms at 2000/s, give or take the schedule's edges.
        assert!(
            (190..=210).contains(&http.operations),
            "{}",
            http.operations
        );

        let crr = run_ok(&spec(
            Workload::ConnectPerRequest { concurrency: 2 },
            server,
        ));
        assert!(crr.connections > crr.operations);
        assert!(crr.connect_latency.is_some());

        let bulk = run_ok(&spec(Workload::Bulk { chunk_bytes: 65536 }, server));
        assert_eq!((bulk.operations, bulk.connections), (1, 2));
        assert!(bulk.bytes > 0);
    }

    #[test]
    fn a_wrong_destination_is_an_error() {
        let server = start_server();
        let mut wrong = spec(Workload::ConnectPerRequest { concurrency: 1 }, server);
        wrong.expect_server = "198.18.0.9:8080".parse().unwrap();
        let report = run(&wrong, &mut Vec::new()).unwrap();
        assert!(report.errors > 0);
        let error = report.first_error.unwrap();
        assert!(error.contains("wrong destination"), "{error}");
    }

    #[test]
    fn waits_for_the_start_file() {
        let server = start_server();
        let file = std::env::temp_dir().join(format!("load-start-{}", std::process::id()));
        let mut waiting = spec(Workload::PingPong { message_bytes: 8 }, server);
        waiting.start_file = Some(file.clone());
        let creator = thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            std::fs::write(&file, b"").unwrap();
            file
        });
        let began = Instant::now();
        run_ok(&waiting);
        assert!(began.elapsed() >= Duration::from_millis(200));
        std::fs::remove_file(creator.join().unwrap()).unwrap();
    }
}
