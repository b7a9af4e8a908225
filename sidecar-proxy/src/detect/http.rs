//! Bounded protocol detection: HTTP/1.x (a request line), HTTP/2 with prior knowledge (the
//! connection preface), anything else is opaque TCP. The bytes read are replayed to whoever
//! handles the connection. [`detect_racing_server`] also lets a server that speaks first end
//! detection at once.
use std::{future::Future, io, pin::pin, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt},
    time::{Instant, timeout_at},
};

use crate::{io::upstream::ConnectFailure, telemetry::metrics::FailureReason};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Clients that speak first (HTTP, TLS) write right after connecting: waiting this long for
/// them before also connecting upstream spares the upstream a connection opened for nothing.
const CLIENT_FIRST_GRACE: Duration = Duration::from_millis(20);
/// Enough for any greeting a server-speaks-first protocol sends in its first segment.
const SERVER_GREETING_BUFFER: usize = 16 * 1024;
/// CONNECT is left out: a tunnel request is opaque to a transparent proxy.
const METHODS: [&[u8]; 8] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    Http1,
    Http2,
    Opaque,
}

/// `None`: the prefix is not enough to tell.
pub fn classify(prefix: &[u8]) -> Option<AppProtocol> {
    if prefix.starts_with(H2_PREFACE) {
        return Some(AppProtocol::Http2);
    }
    if METHODS.iter().any(|method| prefix.starts_with(method)) {
        return Some(AppProtocol::Http1);
    }
    let could_still_be = |candidate: &[u8]| candidate.starts_with(prefix);
    if prefix.is_empty() || could_still_be(H2_PREFACE) || METHODS.iter().any(|m| could_still_be(m))
    {
        return None;
    }
    Some(AppProtocol::Opaque)
}

/// Reads `stream` into `prefix` until its protocol is known, `wait` has passed (a silent
/// client: opaque) or it ends. Cancel-safe: dropped midway, `prefix` holds every byte read.
pub async fn detect<S: AsyncRead + Unpin>(
    stream: &mut S,
    prefix: &mut Vec<u8>,
    wait: Duration,
) -> io::Result<AppProtocol> {
    let deadline = Instant::now() + wait;
    let mut chunk = [0u8; 64];
    loop {
        if let Some(protocol) = classify(prefix) {
            return Ok(protocol);
        }
        match timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) | Ok(Ok(0)) => return Ok(AppProtocol::Opaque),
            Ok(Ok(read)) => prefix.extend_from_slice(&chunk[..read]),
            Ok(Err(error)) => return Err(error),
        }
    }
}

/// How detection raced against the server ended.
pub enum Raced<U> {
    Http(AppProtocol),
    /// Not HTTP: relay to the upstream (`None`: not connected yet), sending what it already
    /// said (a greeting) first.
    Opaque {
        upstream: Option<Result<U, ConnectFailure>>,
        greeting: Vec<u8>,
    },
}

/// [`detect`], connecting upstream (`connect`) in parallel once the client has been silent for
/// [`CLIENT_FIRST_GRACE`]: detection ends as soon as the client's first bytes tell, or the
/// server speaks first (MySQL, SMTP: their clients wait for a greeting), or the bounded wait is
/// over. A parallel connection made for a client that turns out to speak HTTP is closed
/// unused: HTTP is forwarded request by request.
pub async fn detect_racing_server<S, U, C>(
    client: &mut S,
    prefix: &mut Vec<u8>,
    wait: Duration,
    connect: C,
) -> io::Result<Raced<U>>
where
    S: AsyncRead + Unpin,
    U: AsyncRead + Unpin,
    C: Future<Output = Result<U, ConnectFailure>>,
{
    let opaque = |upstream| Raced::Opaque {
        upstream,
        greeting: Vec::new(),
    };
    let mut detection = pin!(detect(client, prefix, wait));
    let grace = CLIENT_FIRST_GRACE.min(wait);
    if let Ok(verdict) = tokio::time::timeout(grace, &mut detection).await {
        return Ok(match verdict? {
            AppProtocol::Opaque => opaque(None),
            http => Raced::Http(http),
        });
    }
    let mut connecting = pin!(connect);
    let connected = tokio::select! {
        biased;
        verdict = &mut detection => {
            return Ok(match verdict? {
                AppProtocol::Opaque => opaque(Some(connecting.await)),
                http => Raced::Http(http),
            });
        }
        connected = &mut connecting => connected,
    };
    let mut upstream = match connected {
        Ok(upstream) => upstream,
        // The client may still speak HTTP, which is forwarded on connections of its own.
        Err(failure) => {
            return Ok(match detection.await? {
                AppProtocol::Opaque => opaque(Some(Err(failure))),
                http => Raced::Http(http),
            });
        }
    };
    let mut greeting = vec![0u8; SERVER_GREETING_BUFFER];
    tokio::select! {
        biased;
        verdict = &mut detection => Ok(match verdict? {
            AppProtocol::Opaque => opaque(Some(Ok(upstream))),
            http => Raced::Http(http),
        }),
        read = upstream.read(&mut greeting) => Ok(match read {
            Ok(read) => {
                greeting.truncate(read);
                Raced::Opaque { upstream: Some(Ok(upstream)), greeting }
            }
            Err(error) => opaque(Some(Err(ConnectFailure {
                reason: FailureReason::ConnectError,
                error: format!("the upstream failed before the client spoke: {error}"),
            }))),
        }),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncWriteExt, duplex};

    use super::*;

    #[test]
    fn request_lines_and_the_preface_are_recognised() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(AppProtocol::Http1));
        assert_eq!(classify(b"DELETE /x"), Some(AppProtocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(AppProtocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET/"), Some(AppProtocol::Opaque));
        assert_eq!(classify(b"\x16\x03\x01"), Some(AppProtocol::Opaque));
        assert_eq!(classify(b"CONNECT x:443"), Some(AppProtocol::Opaque));
        assert_eq!(classify(b"SSH-2.0"), Some(AppProtocol::Opaque));
    }

    /// Fuzz target `http_detection` (`cargo xtask fuzz`; under `cargo test`: its corpus and a
    /// second of random inputs). Whatever an app sends, detection keeps only bytes it was
    /// given, stops within a bounded prefix, and its verdict is the one the whole input gets
    /// (a verdict on a prefix stands however many bytes follow).
    #[test]
    fn fuzz_http_detection() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        bolero::check!(name = "http_detection").for_each(|input: &[u8]| {
            let mut prefix = Vec::new();
            let detected = runtime
                .block_on(detect(&mut &input[..], &mut prefix, Duration::from_secs(5)))
                .expect("a slice cannot fail to read");
            assert!(input.starts_with(&prefix));
            // Decided by the preface's length at the latest, plus one read.
            assert!(
                prefix.len() < H2_PREFACE.len() + 64,
                "read {} bytes",
                prefix.len()
            );
            // Undecided at the end of the stream: opaque.
            assert_eq!(detected, classify(input).unwrap_or(AppProtocol::Opaque));
            if let Some(decided) = classify(&prefix) {
                assert_eq!(decided, detected);
            }
        });
    }

    #[tokio::test]
    async fn a_server_greeting_ends_the_detection_of_a_silent_client() -> io::Result<()> {
        let (_silent, mut client) = duplex(1024);
        let (mut server, upstream) = duplex(1024);
        server.write_all(b"220 ready\r\n").await?;
        let mut prefix = Vec::new();
        let connect = async { Ok(upstream) };
        let raced =
            detect_racing_server(&mut client, &mut prefix, Duration::from_secs(60), connect)
                .await?;
        let Raced::Opaque {
            upstream: Some(Ok(_)),
            greeting,
        } = raced
        else {
            panic!("not relayed with the greeting");
        };
        assert_eq!(greeting, b"220 ready\r\n");
        Ok(())
    }

    #[tokio::test]
    async fn a_client_speaking_http_needs_no_upstream() -> io::Result<()> {
        let (mut writer, mut client) = duplex(1024);
        writer.write_all(b"GET / HTTP/1.1\r\n").await?;
        let mut prefix = Vec::new();
        let never = std::future::pending::<Result<tokio::io::DuplexStream, ConnectFailure>>();
        let raced =
            detect_racing_server(&mut client, &mut prefix, Duration::from_secs(60), never).await?;
        assert!(matches!(raced, Raced::Http(AppProtocol::Http1)));
        Ok(())
    }

    #[tokio::test]
    async fn a_request_split_across_reads_is_found_and_kept() -> io::Result<()> {
        let (mut client, mut server) = duplex(1024);
        let writer = tokio::spawn(async move {
            for part in [&b"PO"[..], b"ST /x HTTP/1.1\r\n"] {
                client.write_all(part).await?;
                tokio::task::yield_now().await;
            }
            Ok::<_, io::Error>(client)
        });
        let mut prefix = Vec::new();
        let protocol = detect(&mut server, &mut prefix, Duration::from_secs(5)).await?;
        assert_eq!(protocol, AppProtocol::Http1);
        assert!(b"POST /x HTTP/1.1\r\n".starts_with(&prefix));
        let _client = writer.await??;
        Ok(())
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_at_the_deadline() -> io::Result<()> {
        let (_client, mut server) = duplex(1024);
        let started = Instant::now();
        let mut prefix = Vec::new();
        let protocol = detect(&mut server, &mut prefix, Duration::from_millis(50)).await?;
        assert_eq!(protocol, AppProtocol::Opaque);
        assert!(prefix.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(50));
        Ok(())
    }
}
