//! Bounded protocol detection on inbound connections: is this a mesh mTLS ClientHello (TLS
//! handshake record, ClientHello, our ALPN), some other TLS, or anything else? The bytes read
//! are kept and replayed to whoever handles the connection next.
//!
//! Bounded twice: a client that sends nothing (server-speaks-first protocols such as MySQL or
//! SMTP) is treated as plaintext after `first_bytes_timeout`, and a ClientHello must be complete
//! within `hello_timeout`. Only the first TLS record is looked at; our own clients never
//! fragment a ClientHello.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    time::{Instant, timeout_at},
};

use crate::tls::MESH_ALPN;

const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXTENSION_ALPN: u16 = 16;
const RECORD_HEADER_LEN: usize = 5;
/// TLS 1.3 caps a plaintext record at 2^14 bytes.
const MAX_RECORD_LEN: usize = 1 << 14;

/// What the first bytes of a connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// A ClientHello offering our ALPN: sidecar-to-sidecar mTLS.
    MeshTls,
    /// A TLS ClientHello without our ALPN: the app's own TLS.
    Tls,
    /// Anything else, including nothing at all.
    Plaintext,
}

impl Protocol {
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::MeshTls => "mesh_tls",
            Protocol::Tls => "tls",
            Protocol::Plaintext => "plaintext",
        }
    }
}

/// The verdict, and the bytes read to reach it.
pub struct Sniffed {
    pub protocol: Protocol,
    pub prefix: Vec<u8>,
}

/// Reads just enough of `stream` to classify it.
pub async fn sniff<S: AsyncRead + Unpin>(
    stream: &mut S,
    first_bytes_timeout: Duration,
    hello_timeout: Duration,
) -> io::Result<Sniffed> {
    let started = Instant::now();
    let mut prefix = Vec::with_capacity(1024);
    loop {
        let needed = match classify(&prefix) {
            Verdict::Known(protocol) => return Ok(Sniffed { protocol, prefix }),
            Verdict::NeedBytes(needed) => needed,
        };
        let deadline = started
            + if prefix.is_empty() {
                first_bytes_timeout
            } else {
                hello_timeout
            };
        let mut chunk = vec![0u8; needed - prefix.len()];
        match timeout_at(deadline, stream.read(&mut chunk)).await {
            // Silence, end of stream or a stalled ClientHello: not something we terminate.
            Err(_) | Ok(Ok(0)) => {
                return Ok(Sniffed {
                    protocol: if prefix.is_empty() {
                        Protocol::Plaintext
                    } else {
                        stalled(&prefix)
                    },
                    prefix,
                });
            }
            Ok(Ok(read)) => prefix.extend_from_slice(&chunk[..read]),
            Ok(Err(error)) => return Err(error),
        }
    }
}

/// An incomplete prefix that stopped arriving.
fn stalled(prefix: &[u8]) -> Protocol {
    if prefix[0] == CONTENT_TYPE_HANDSHAKE {
        Protocol::Tls
    } else {
        Protocol::Plaintext
    }
}

enum Verdict {
    Known(Protocol),
    /// Undecided until the prefix is this long.
    NeedBytes(usize),
}

fn classify(prefix: &[u8]) -> Verdict {
    let Some(&content_type) = prefix.first() else {
        return Verdict::NeedBytes(RECORD_HEADER_LEN);
    };
    if content_type != CONTENT_TYPE_HANDSHAKE {
        return Verdict::Known(Protocol::Plaintext);
    }
    if prefix.len() < RECORD_HEADER_LEN {
        return Verdict::NeedBytes(RECORD_HEADER_LEN);
    }
    // Record: type, legacy version 3.x, length.
    let record_len = usize::from(u16::from_be_bytes([prefix[3], prefix[4]]));
    if prefix[1] != 3 || record_len == 0 || record_len > MAX_RECORD_LEN {
        return Verdict::Known(Protocol::Plaintext);
    }
    let record_end = RECORD_HEADER_LEN + record_len;
    if prefix.len() < record_end {
        return Verdict::NeedBytes(record_end);
    }
    let offers_mesh_alpn = client_hello_alpn(&prefix[RECORD_HEADER_LEN..record_end])
        .is_some_and(|protocols| protocols.contains(&MESH_ALPN));
    Verdict::Known(if offers_mesh_alpn {
        Protocol::MeshTls
    } else {
        Protocol::Tls
    })
}

/// The ALPN protocols a ClientHello (a whole handshake message in `record`) offers; `None` if
/// it is not a ClientHello, is malformed, is fragmented, or has no ALPN extension.
fn client_hello_alpn(record: &[u8]) -> Option<Vec<&[u8]>> {
    let mut message = Reader(record);
    if message.u8()? != HANDSHAKE_CLIENT_HELLO {
        return None;
    }
    let hello_len = message.u24()?;
    let mut hello = Reader(message.take(hello_len)?);
    hello.take(2 + 32)?; // legacy_version, random
    hello.vec_u8()?; // legacy_session_id
    hello.vec_u16()?; // cipher_suites
    hello.vec_u8()?; // legacy_compression_methods
    let mut extensions = Reader(hello.vec_u16()?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let body = extensions.vec_u16()?;
        if kind == EXTENSION_ALPN {
            let mut list = Reader(Reader(body).vec_u16()?);
            let mut protocols = Vec::new();
            while !list.0.is_empty() {
                protocols.push(list.vec_u8()?);
            }
            return Some(protocols);
        }
    }
    None
}

/// A bounds-checked cursor over TLS wire encoding.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if self.0.len() < len {
            return None;
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let bytes = self.take(2)?;
        Some(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u24(&mut self) -> Option<usize> {
        let bytes = self.take(3)?;
        Some(usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]))
    }

    fn vec_u8(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    fn vec_u16(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }
}

/// A stream whose first reads return `prefix` (the sniffed bytes); writes go straight through.
pub struct Rewound<S> {
    prefix: Vec<u8>,
    position: usize,
    inner: S,
}

impl<S> Rewound<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Rewound {
            prefix,
            position: 0,
            inner,
        }
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The prefix not read yet, and the stream.
    pub fn into_parts(mut self) -> (Vec<u8>, S) {
        self.prefix.drain(..self.position);
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewound<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let unread = &this.prefix[this.position..];
        if unread.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let len = unread.len().min(buf.remaining());
        buf.put_slice(&unread[..len]);
        this.position += len;
        if this.position == this.prefix.len() {
            this.prefix = Vec::new();
            this.position = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewound<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::{ClientConfig, ClientConnection, RootCertStore, pki_types::ServerName};
    use tokio::io::{AsyncWriteExt, duplex};

    use super::*;

    const QUICK: Duration = Duration::from_millis(100);
    const PATIENT: Duration = Duration::from_secs(5);

    /// The first flight of a real rustls client offering `alpn`.
    fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3")
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = ServerName::try_from("server.example").expect("name");
        let mut connection = ClientConnection::new(Arc::new(config), name).expect("client");
        let mut hello = Vec::new();
        connection.write_tls(&mut hello).expect("ClientHello");
        hello
    }

    async fn sniff_bytes(bytes: &[u8]) -> Sniffed {
        let (mut client, mut server) = duplex(64 * 1024);
        client.write_all(bytes).await.expect("write");
        sniff(&mut server, QUICK, PATIENT).await.expect("sniff")
    }

    #[tokio::test]
    async fn client_hellos_are_told_apart_by_alpn() {
        let mesh = client_hello(&[b"h2", MESH_ALPN]);
        let sniffed = sniff_bytes(&mesh).await;
        assert_eq!(sniffed.protocol, Protocol::MeshTls);
        assert_eq!(
            sniffed.prefix, mesh,
            "exactly the ClientHello record is consumed"
        );

        let app_tls = client_hello(&[b"h2", b"http/1.1"]);
        assert_eq!(sniff_bytes(&app_tls).await.protocol, Protocol::Tls);
        assert_eq!(
            sniff_bytes(&client_hello(&[])).await.protocol,
            Protocol::Tls
        );
        // A prefix of our value is not our value.
        assert_eq!(
            sniff_bytes(&client_hello(&[b"sidecar-mesh"]))
                .await
                .protocol,
            Protocol::Tls
        );
    }

    #[tokio::test]
    async fn plaintext_is_recognised_from_its_first_byte() {
        let sniffed = sniff_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(sniffed.protocol, Protocol::Plaintext);
        assert!(!sniffed.prefix.is_empty());
        assert!(b"GET / HTTP/1.1".starts_with(&sniffed.prefix));
    }

    #[tokio::test]
    async fn a_silent_client_is_plaintext_after_the_short_timeout() {
        // Server-speaks-first: the client waits for a banner and sends nothing.
        let (_client, mut server) = duplex(1024);
        let started = Instant::now();
        let sniffed = sniff(&mut server, QUICK, PATIENT).await.expect("sniff");
        let waited = started.elapsed();
        assert_eq!(sniffed.protocol, Protocol::Plaintext);
        assert!(sniffed.prefix.is_empty());
        assert!(waited >= QUICK && waited < PATIENT, "waited {waited:?}");
    }

    #[tokio::test]
    async fn an_immediate_close_is_plaintext() {
        let (client, mut server) = duplex(1024);
        drop(client);
        let sniffed = sniff(&mut server, PATIENT, PATIENT).await.expect("sniff");
        assert_eq!(sniffed.protocol, Protocol::Plaintext);
    }

    #[tokio::test]
    async fn a_client_hello_trickling_in_byte_by_byte_is_still_found() {
        let hello = client_hello(&[MESH_ALPN]);
        let (mut client, mut server) = duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            for byte in hello {
                client.write_all(&[byte]).await?;
                tokio::task::yield_now().await;
            }
            Ok::<_, io::Error>(client)
        });
        let sniffed = sniff(&mut server, PATIENT, PATIENT).await.expect("sniff");
        assert_eq!(sniffed.protocol, Protocol::MeshTls);
        let _client = writer.await.expect("join").expect("write");
    }

    #[tokio::test]
    async fn a_stalled_client_hello_gives_up_at_the_hello_timeout() {
        let hello = client_hello(&[MESH_ALPN]);
        let (mut client, mut server) = duplex(64 * 1024);
        client.write_all(&hello[..20]).await.expect("write");
        let sniffed = sniff(&mut server, QUICK, QUICK).await.expect("sniff");
        assert_eq!(sniffed.protocol, Protocol::Tls);
        assert_eq!(sniffed.prefix, hello[..20]);
    }

    #[tokio::test]
    async fn malformed_records_are_not_tls() {
        for bytes in [
            &[0x16, 0x09, 0x01, 0x00, 0x10][..], // version 9.x
            &[0x16, 0x03, 0x01, 0xff, 0xff],     // longer than a record may be
            &[0x16, 0x03, 0x01, 0x00, 0x00],     // empty record
        ] {
            assert_eq!(
                sniff_bytes(bytes).await.protocol,
                Protocol::Plaintext,
                "{bytes:?}"
            );
        }
        // A handshake record that is not a ClientHello (a ServerHello).
        let mut server_hello = client_hello(&[MESH_ALPN]);
        server_hello[5] = 0x02;
        assert_eq!(sniff_bytes(&server_hello).await.protocol, Protocol::Tls);
        // Lengths pointing past the end are caught, not trusted.
        let mut truncated = client_hello(&[MESH_ALPN]);
        truncated[8] = 0xff;
        assert_eq!(sniff_bytes(&truncated).await.protocol, Protocol::Tls);
    }

    /// Hands out its bytes at most `CHUNK` at a time, as a slow network does.
    struct Chunked<'a>(&'a [u8]);

    impl AsyncRead for Chunked<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            const CHUNK: usize = 7;
            let len = self.0.len().min(CHUNK).min(buf.remaining());
            let (head, rest) = self.0.split_at(len);
            buf.put_slice(head);
            self.0 = rest;
            Poll::Ready(Ok(()))
        }
    }

    /// Fuzz target `client_hello` (`cargo xtask fuzz`; under `cargo test`: its corpus and a
    /// second of random inputs). Whatever a client sends, and however it is split across
    /// reads, the verdict is the same, the sniffer keeps only bytes it was given, never more
    /// than one record, and never reads past the ClientHello record.
    #[test]
    fn fuzz_client_hello() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        bolero::check!(name = "client_hello").for_each(|input: &[u8]| {
            let whole = runtime
                .block_on(sniff(&mut &input[..], PATIENT, PATIENT))
                .expect("a slice cannot fail to read");
            let chunked = runtime
                .block_on(sniff(&mut Chunked(input), PATIENT, PATIENT))
                .expect("a slice cannot fail to read");
            assert_eq!(whole.protocol, chunked.protocol);
            assert_eq!(whole.prefix, chunked.prefix);
            assert!(input.starts_with(&whole.prefix));
            assert!(whole.prefix.len() <= RECORD_HEADER_LEN + MAX_RECORD_LEN);

            // The verdict on a prefix stands however many bytes follow, a verdict still pending
            // asks for more bytes than it has, and no more is read than was asked for.
            let mut decided = None;
            let mut asked = 0;
            for end in 0..=input.len() {
                match classify(&input[..end]) {
                    Verdict::Known(protocol) => {
                        decided = Some((protocol, end));
                        break;
                    }
                    Verdict::NeedBytes(needed) => {
                        assert!(needed > end && needed <= RECORD_HEADER_LEN + MAX_RECORD_LEN);
                        asked = asked.max(needed);
                    }
                }
            }
            match decided {
                Some((protocol, end)) => {
                    assert_eq!(whole.protocol, protocol);
                    assert!(matches!(classify(input), Verdict::Known(p) if p == protocol));
                    assert!(whole.prefix.len() <= asked.max(end));
                    if protocol != Protocol::Plaintext {
                        assert_eq!(whole.prefix.len(), end, "read past the ClientHello record");
                    }
                }
                // The stream ended first: everything was read.
                None => assert_eq!(whole.prefix, input),
            }
        });
    }

    #[tokio::test]
    async fn a_rewound_stream_gives_back_what_it_has_not_replayed() {
        let (_client, server) = duplex(1024);
        let mut rewound = Rewound::new(b"hello".to_vec(), server);
        let mut first = [0u8; 2];
        rewound.read_exact(&mut first).await.expect("read");
        let (unread, _server) = rewound.into_parts();
        assert_eq!(unread, b"llo");
    }

    #[tokio::test]
    async fn rewound_streams_replay_the_prefix_then_the_rest() {
        let (mut client, server) = duplex(1024);
        client.write_all(b" world").await.expect("write");
        drop(client);
        let mut rewound = Rewound::new(b"hello".to_vec(), server);
        let mut all = Vec::new();
        rewound.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, b"hello world");
    }
}
