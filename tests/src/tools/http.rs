//! Just enough HTTP/1.1 for `labtool http-server`, `labtool http-get` and
//! [`crate::wait_for_http_ok`]: GET only, bodies framed by Content-Length. The server answers
//! `GET /delay/<ms>` that many milliseconds late: a slow app, for requests in flight.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

/// Longest request head the server accepts, so a broken client cannot grow memory forever.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Requests under this path are answered after the milliseconds that follow it.
const DELAY_PREFIX: &str = "/delay/";
/// Pause between the attempts of [`get_with_retries`].
const RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Where an `http://host[:port]/path` URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    pub addr: SocketAddr,
    /// `host[:port]` as written, sent as the Host header.
    pub authority: String,
    pub path: String,
}

impl HttpTarget {
    pub fn parse(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url:?}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, "/"),
        };
        let addr =
            resolve(authority).with_context(|| format!("resolving {authority:?} in {url:?}"))?;
        Ok(Self {
            addr,
            authority: authority.to_owned(),
            path: path.to_owned(),
        })
    }
}

fn resolve(authority: &str) -> Result<SocketAddr> {
    if let Ok(addr) = authority.parse() {
        return Ok(addr);
    }
    let bare_host = authority
        .strip_prefix('[')
        .and_then(|host| host.strip_suffix(']'));
    if let Ok(ip) = bare_host.unwrap_or(authority).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 80));
    }
    let with_port = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    with_port.to_socket_addrs()?.next().context("no address")
}

/// A response as `labtool http-get` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

impl HttpResponse {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// One GET with `Connection: close`, bounded by `timeout` overall.
pub fn get(target: &HttpTarget, timeout: Duration) -> Result<HttpResponse> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&target.addr, timeout)
        .with_context(|| format!("connecting to {}", target.addr))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: labtool\r\nConnection: close\r\n\r\n",
        target.path, target.authority
    )
    .with_context(|| format!("sending request to {}", target.addr))?;
    let mut received = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(response) = parse_response(&received, false)? {
            return Ok(response);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !remaining.is_zero(),
            "no complete response from {} within {timeout:?}",
            target.addr
        );
        stream.set_read_timeout(Some(remaining))?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return parse_response(&received, true)?
                    .context("connection closed before a complete response");
            }
            Ok(read) => received.extend_from_slice(&chunk[..read]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("reading response from {}", target.addr));
            }
        }
    }
}

/// [`get`], attempted again every 100 ms while it gets no response at all (refused, reset, or
/// closed early), for up to `retry_for`: an app that may start before its proxy listens, as
/// in a pod without native sidecars. A response of any status ends it.
pub fn get_with_retries(
    target: &HttpTarget,
    timeout: Duration,
    retry_for: Duration,
) -> Result<HttpResponse> {
    let deadline = Instant::now() + retry_for;
    loop {
        match get(target, timeout) {
            Err(error) if Instant::now() < deadline => {
                eprintln!("http-get: {error:#}; trying again");
                thread::sleep(RETRY_INTERVAL);
            }
            answer => return answer,
        }
    }
}

/// The response in `bytes` if complete; `None` if more is needed. At EOF an incomplete
/// response is an error.
fn parse_response(bytes: &[u8], at_eof: bool) -> Result<Option<HttpResponse>> {
    let Some(head_end) = bytes.windows(4).position(|window| window == b"\r\n\r\n") else {
        ensure!(
            !at_eof,
            "connection closed after {} bytes, before the end of the response head",
            bytes.len()
        );
        return Ok(None);
    };
    let head = std::str::from_utf8(&bytes[..head_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<_> = lines.filter_map(parse_header).collect();
    if header(&headers, "transfer-encoding").is_some_and(|coding| coding.contains("chunked")) {
        bail!("chunked responses are not supported");
    }
    let body = &bytes[head_end + 4..];
    let body = match header(&headers, "content-length") {
        Some(length) => {
            let length: usize = length
                .parse()
                .with_context(|| format!("bad Content-Length {length:?}"))?;
            if body.len() < length {
                ensure!(
                    !at_eof,
                    "connection closed after {} of {length} body bytes",
                    body.len()
                );
                return Ok(None);
            }
            &body[..length]
        }
        None if at_eof => body,
        None => return Ok(None),
    };
    Ok(Some(HttpResponse {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    }))
}

/// `Name: value` with the name lowercased for lookups.
fn parse_header(line: &str) -> Option<(String, String)> {
    let (name, value) = line.split_once(':')?;
    Some((name.trim().to_ascii_lowercase(), value.trim().to_owned()))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// Accepts forever, one thread per connection, answering every GET with a greeting that
/// names this server and both ends of the connection.
pub fn serve(listener: TcpListener, name: &str) {
    let name: Arc<str> = Arc::from(name);
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let name = Arc::clone(&name);
                thread::spawn(move || {
                    if let Err(error) = serve_connection(stream, &name) {
                        eprintln!("http-server: {error:#}");
                    }
                });
            }
            Err(error) => {
                eprintln!("http-server: accept: {error}");
                // Do not spin on a persistent error such as EMFILE.
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve_connection(stream: TcpStream, name: &str) -> Result<()> {
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    while let Some(request) =
        read_request(&mut reader).with_context(|| format!("request from {peer}"))?
    {
        let keep_alive = request.keeps_alive();
        if let Some(delay) = request.delay() {
            thread::sleep(delay);
        }
        let (status, body) = if request.method == "GET" {
            (
                "200 OK",
                format!("hello from {name}: you are {peer} and I am {local}\n"),
            )
        } else {
            (
                "405 Method Not Allowed",
                "only GET is supported\n".to_owned(),
            )
        };
        write!(
            writer,
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if keep_alive { "keep-alive" } else { "close" }
        )
        .with_context(|| format!("answering {peer}"))?;
        if !keep_alive {
            break;
        }
    }
    Ok(())
}

#[derive(Debug)]
struct Request {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn keeps_alive(&self) -> bool {
        let connection = header(&self.headers, "connection")
            .unwrap_or_default()
            .to_ascii_lowercase();
        if self.version == "HTTP/1.0" {
            connection.contains("keep-alive")
        } else {
            !connection.contains("close")
        }
    }

    /// How long `GET /delay/<ms>` asks the answer to wait.
    fn delay(&self) -> Option<Duration> {
        let ms = self.target.strip_prefix(DELAY_PREFIX)?;
        ms.parse().ok().map(Duration::from_millis)
    }
}

/// Reads one request head and skips its body; `None` when the client closed between requests.
fn read_request(reader: &mut impl BufRead) -> Result<Option<Request>> {
    let mut lines = Vec::new();
    let mut head_bytes = 0;
    loop {
        let mut line = String::new();
        let limit = (MAX_HEAD_BYTES - head_bytes) as u64;
        let read = reader.by_ref().take(limit).read_line(&mut line)?;
        if read == 0 {
            ensure!(
                lines.is_empty() && head_bytes == 0,
                "connection closed inside a request head"
            );
            return Ok(None);
        }
        head_bytes += read;
        ensure!(
            head_bytes < MAX_HEAD_BYTES,
            "request head longer than {MAX_HEAD_BYTES} bytes"
        );
        let line = line.trim_end_matches(['\r', '\n']);
        match (line.is_empty(), lines.is_empty()) {
            (true, true) => continue, // stray CRLF between requests
            (true, false) => break,
            (false, _) => lines.push(line.to_owned()),
        }
    }
    let mut request_line = lines[0].split_whitespace();
    let (Some(method), Some(target), Some(version)) = (
        request_line.next(),
        request_line.next(),
        request_line.next(),
    ) else {
        bail!("bad request line {:?}", lines[0]);
    };
    let headers: Vec<_> = lines[1..]
        .iter()
        .filter_map(|line| parse_header(line))
        .collect();
    if header(&headers, "transfer-encoding").is_some() {
        bail!("request bodies with Transfer-Encoding are not supported");
    }
    if let Some(length) = header(&headers, "content-length") {
        let length: u64 = length
            .parse()
            .with_context(|| format!("bad Content-Length {length:?}"))?;
        io::copy(&mut reader.by_ref().take(length), &mut io::sink())?;
    }
    Ok(Some(Request {
        method: method.to_owned(),
        target: target.to_owned(),
        version: version.to_owned(),
        headers,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start_server(name: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || serve(listener, name));
        addr
    }

    #[test]
    fn parses_urls_with_ipv4_ipv6_and_default_port() {
        let target = HttpTarget::parse("http://198.18.0.2:8080/health").unwrap();
        assert_eq!(target.addr, "198.18.0.2:8080".parse().unwrap());
        assert_eq!(target.authority, "198.18.0.2:8080");
        assert_eq!(target.path, "/health");
        let target = HttpTarget::parse("http://[fd18::2]:81").unwrap();
        assert_eq!(target.addr, "[fd18::2]:81".parse().unwrap());
        assert_eq!(target.path, "/");
        assert_eq!(
            HttpTarget::parse("http://[::1]/x").unwrap().addr,
            "[::1]:80".parse().unwrap()
        );
        assert_eq!(
            HttpTarget::parse("http://127.0.0.1").unwrap().addr,
            "127.0.0.1:80".parse().unwrap()
        );
        assert!(HttpTarget::parse("https://127.0.0.1/").is_err());
    }

    #[test]
    fn parses_responses_only_once_complete() {
        let full = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_response(&full[..20], false).unwrap(), None);
        assert_eq!(
            parse_response(&full[..full.len() - 1], false).unwrap(),
            None
        );
        assert!(parse_response(&full[..full.len() - 1], true).is_err());
        let response = parse_response(full, false).unwrap().unwrap();
        assert_eq!(
            response,
            HttpResponse {
                status: 200,
                body: "hello".to_owned()
            }
        );
        let unframed = b"HTTP/1.0 503 Service Unavailable\r\n\r\nbusy";
        assert_eq!(parse_response(unframed, false).unwrap(), None);
        assert_eq!(parse_response(unframed, true).unwrap().unwrap().status, 503);
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert!(parse_response(chunked, false).is_err());
    }

    #[test]
    fn server_greets_with_both_addresses() {
        let addr = start_server("backend");
        let target = HttpTarget::parse(&format!("http://{addr}/")).unwrap();
        let response = get(&target, Duration::from_secs(5)).unwrap();
        assert!(response.is_success());
        assert!(
            response
                .body
                .starts_with("hello from backend: you are 127.0.0.1:"),
            "{}",
            response.body
        );
        assert!(
            response.body.ends_with(&format!(" and I am {addr}\n")),
            "{}",
            response.body
        );
    }

    #[test]
    fn server_keeps_the_connection_alive_between_requests() {
        let addr = start_server("keepalive");
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        let mut replies = String::new();
        stream.read_to_string(&mut replies).unwrap();
        assert_eq!(replies.matches("HTTP/1.1 200 OK").count(), 2, "{replies}");
        assert_eq!(replies.matches("HTTP/1.1 405").count(), 1, "{replies}");
        assert!(
            replies.trim_end().ends_with(&format!("I am {addr}")),
            "{replies}"
        );
    }

    #[test]
    fn http_1_0_closes_unless_asked_to_keep_alive() {
        let request = |version: &str, connection: Option<&str>| Request {
            method: "GET".to_owned(),
            target: "/".to_owned(),
            version: version.to_owned(),
            headers: connection
                .map(|value| ("connection".to_owned(), value.to_owned()))
                .into_iter()
                .collect(),
        };
        assert!(!request("HTTP/1.0", None).keeps_alive());
        assert!(request("HTTP/1.0", Some("Keep-Alive")).keeps_alive());
        assert!(request("HTTP/1.1", None).keeps_alive());
        assert!(!request("HTTP/1.1", Some("close")).keeps_alive());
    }

    #[test]
    fn server_answers_delay_paths_that_late() {
        let addr = start_server("slow");
        let target = HttpTarget::parse(&format!("http://{addr}/delay/300")).unwrap();
        let started = Instant::now();
        let response = get(&target, Duration::from_secs(5)).unwrap();
        assert!(response.is_success());
        assert!(started.elapsed() >= Duration::from_millis(300));
        let prompt = HttpTarget::parse(&format!("http://{addr}/delay/soon")).unwrap();
        let started = Instant::now();
        assert!(get(&prompt, Duration::from_secs(5)).unwrap().is_success());
        assert!(started.elapsed() < Duration::from_millis(300));
    }

    #[test]
    fn get_with_retries_waits_for_a_server_that_starts_late() {
        let reserved = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = reserved.local_addr().unwrap();
        drop(reserved);
        let target = HttpTarget::parse(&format!("http://{addr}/")).unwrap();
        assert!(
            get(&target, Duration::from_secs(1)).is_err(),
            "nothing listens yet"
        );
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            serve(TcpListener::bind(addr).unwrap(), "late");
        });
        let response =
            get_with_retries(&target, Duration::from_secs(1), Duration::from_secs(5)).unwrap();
        assert!(
            response.body.starts_with("hello from late"),
            "{}",
            response.body
        );
        assert!(
            get_with_retries(
                &HttpTarget::parse("http://127.0.0.1:1/").unwrap(),
                Duration::from_secs(1),
                Duration::from_millis(200)
            )
            .is_err(),
            "gives up after its time"
        );
    }
}
