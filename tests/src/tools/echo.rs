//! The echo protocol behind `labtool echo-server` and `labtool connect`.
//!
//! The client sends a payload and half-closes; the server reads to EOF, then answers with one
//! JSON line describing what it saw ([`EchoServerReport`]) followed by the bytes it received.
//! That checks both addressing (who the server thinks it talks to) and half-close through a
//! proxy.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

use super::polled::PolledStream;
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// What the echo server saw on one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoServerReport {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub received: u64,
}

/// The one JSON line `labtool connect` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectReport {
    /// The client socket's own address.
    pub local: SocketAddr,
    /// What getpeername() said on the client socket.
    pub peer: SocketAddr,
    pub server: EchoServerReport,
    /// The reply echoed exactly the bytes sent.
    pub echo_ok: bool,
}

impl ConnectReport {
    /// Parses the output of a `labtool connect` run; a failed run is an error carrying stderr.
    pub fn from_output(output: &Output) -> Result<Self> {
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            bail!(
                "labtool connect failed ({}): {}{}",
                output.status,
                stderr.trim(),
                stdout.trim()
            );
        }
        let line = stdout
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .unwrap_or("");
        serde_json::from_str(line).with_context(|| {
            format!(
                "parsing labtool connect output {line:?} (stderr: {})",
                stderr.trim()
            )
        })
    }
}

/// Why `labtool connect` failed.
#[derive(Debug)]
pub enum EchoClientError {
    Io {
        action: &'static str,
        addr: SocketAddr,
        error: io::Error,
    },
    BadReply(String),
}

impl fmt::Display for EchoClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The kind comes first, in words tests can match ("connection refused").
            Self::Io {
                action,
                addr,
                error,
            } => {
                write!(
                    f,
                    "{} while {action} {addr}: {error}",
                    error_kind_text(error)
                )
            }
            Self::BadReply(problem) => write!(f, "bad reply: {problem}"),
        }
    }
}

impl std::error::Error for EchoClientError {}

fn error_kind_text(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::TimedOut => "timed out".to_owned(),
        kind => kind.to_string(),
    }
}

/// The deterministic payload: a byte ramp modulo a prime, so shifted or repeated chunks
/// never look right by accident.
pub fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Accepts forever, one thread per connection; prints each [`EchoServerReport`] to stdout.
pub fn serve(listener: TcpListener) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                thread::spawn(move || {
                    if let Err(error) = answer(stream) {
                        eprintln!("echo-server: {error:#}");
                    }
                });
            }
            Err(error) => {
                eprintln!("echo-server: accept: {error}");
                // Do not spin on a persistent error such as EMFILE.
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn answer(stream: TcpStream) -> Result<()> {
    let mut stream = PolledStream::new(stream, None)?;
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;
    let mut received = Vec::new();
    stream
        .read_to_end(&mut received)
        .with_context(|| format!("reading from {peer}"))?;
    let report = EchoServerReport {
        local,
        peer,
        received: received.len() as u64,
    };
    let line = serde_json::to_string(&report)?;
    let mut reply = Vec::with_capacity(line.len() + 1 + received.len());
    reply.extend_from_slice(line.as_bytes());
    reply.push(b'\n');
    reply.extend_from_slice(&received);
    stream
        .write_all(&reply)
        .with_context(|| format!("replying to {peer}"))?;
    stream
        .shutdown(Shutdown::Write)
        .with_context(|| format!("closing towards {peer}"))?;
    println!("{line}");
    Ok(())
}

/// Connects, sends `payload_bytes` of [`payload`], half-closes, reads the whole reply and
/// checks the echo. The whole exchange is bounded by `timeout`.
pub fn connect_and_echo(
    addr: SocketAddr,
    payload_bytes: usize,
    timeout: Duration,
) -> Result<ConnectReport, EchoClientError> {
    let deadline = Instant::now() + timeout;
    let io_error = |action| {
        move |error| EchoClientError::Io {
            action,
            addr,
            error,
        }
    };
    let mut stream = PolledStream::connect(addr, timeout).map_err(io_error("connecting to"))?;
    let local = stream
        .local_addr()
        .map_err(io_error("reading local address of"))?;
    let peer = stream
        .peer_addr()
        .map_err(io_error("reading peer address of"))?;
    let sent = payload(payload_bytes);
    stream.write_all(&sent).map_err(io_error("sending to"))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(io_error("half-closing towards"))?;
    let reply = read_until_eof(&mut stream, deadline).map_err(io_error("reading reply from"))?;

    let Some(newline) = reply.iter().position(|&byte| byte == b'\n') else {
        let start = String::from_utf8_lossy(&reply[..reply.len().min(200)]).into_owned();
        return Err(EchoClientError::BadReply(format!(
            "{} bytes without a report line: {start:?}",
            reply.len()
        )));
    };
    let server: EchoServerReport = serde_json::from_slice(&reply[..newline]).map_err(|error| {
        let line = String::from_utf8_lossy(&reply[..newline]).into_owned();
        EchoClientError::BadReply(format!("report line {line:?}: {error}"))
    })?;
    let echoed = &reply[newline + 1..];
    let echo_ok = echoed == sent.as_slice() && server.received == sent.len() as u64;
    Ok(ConnectReport {
        local,
        peer,
        server,
        echo_ok,
    })
}

fn read_until_eof(stream: &mut PolledStream, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut reply = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_timeout(Some(remaining));
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(reply),
            Ok(read) => reply.extend_from_slice(&chunk[..read]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || serve(listener));
        addr
    }

    #[test]
    fn payload_is_deterministic_and_not_periodic_in_powers_of_two() {
        let bytes = payload(600);
        assert_eq!(bytes, payload(600));
        assert_eq!(bytes[250], 250);
        assert_eq!(bytes[251], 0);
        assert_ne!(bytes[..256], bytes[256..512]);
    }

    #[test]
    fn echoes_the_payload_after_the_report_line() {
        let addr = start_server();
        let report = connect_and_echo(addr, 100_000, Duration::from_secs(5)).unwrap();
        assert!(report.echo_ok);
        assert_eq!(report.peer, addr);
        assert_eq!(report.server.local, addr);
        assert_eq!(report.server.peer, report.local);
        assert_eq!(report.server.received, 100_000);
    }

    #[test]
    fn handles_an_empty_payload() {
        let report = connect_and_echo(start_server(), 0, Duration::from_secs(5)).unwrap();
        assert!(report.echo_ok);
        assert_eq!(report.server.received, 0);
    }

    #[test]
    fn names_the_error_kind_when_refused() {
        // Bind then drop: the port is very likely closed right after.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let error = connect_and_echo(addr, 8, Duration::from_secs(2)).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("connection refused while connecting to"),
            "{error}"
        );
    }

    #[test]
    fn times_out_when_the_server_never_answers() {
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let error = connect_and_echo(silent.local_addr().unwrap(), 8, Duration::from_millis(300))
            .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("timed out while reading reply"),
            "{error}"
        );
    }

    #[test]
    fn rejects_a_reply_without_report_line() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // Read first: closing with unread data would reset the connection instead.
            stream.read_to_end(&mut Vec::new()).unwrap();
            stream.write_all(b"garbage").unwrap();
        });
        let error = connect_and_echo(addr, 8, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(error, EchoClientError::BadReply(_)), "{error}");
    }

    #[test]
    fn report_serializes_addresses_as_strings() {
        let report = EchoServerReport {
            local: "[fd18::2]:8080".parse().unwrap(),
            peer: "198.18.0.1:40000".parse().unwrap(),
            received: 3,
        };
        assert_eq!(
            serde_json::to_string(&report).unwrap(),
            r#"{"local":"[fd18::2]:8080","peer":"198.18.0.1:40000","received":3}"#
        );
    }
}
