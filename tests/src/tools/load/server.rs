//! `labtool load-server`: the benchmark's server (protocols in the module docs).
//!
//! A fixed pool of threads each accepts and serves one connection at a time: no thread is
//! spawned per connection, so connection churn costs the server the same in every scenario.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};

use crate::tools::polled::PolledStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{
    BULK_PREFACE, ECHO_PREFACE, SERVER_LOCAL_HEADER,
    h2_server::{self, H2_PREFACE_START},
};
use crate::tools::echo::payload;

/// Longest request head accepted, so a broken client cannot grow memory forever.
const MAX_HEAD_BYTES: usize = 16 * 1024;
const IO_CHUNK: usize = 64 * 1024;

/// Serves `listener` forever with `threads` threads; HTTP bodies are `body_bytes` long.
pub fn serve(listener: TcpListener, body_bytes: usize, threads: usize) {
    let listener = Arc::new(listener);
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let listener = Arc::clone(&listener);
            thread::spawn(move || accept_loop(&listener, body_bytes))
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
}

fn accept_loop(listener: &TcpListener, body_bytes: usize) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(error) = serve_connection(stream, body_bytes) {
                    eprintln!("load-server: connection from {peer}: {error:#}");
                }
            }
            Err(error) => {
                eprintln!("load-server: accept: {error}");
                // Do not spin on a persistent error such as EMFILE.
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve_connection(stream: TcpStream, body_bytes: usize) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut stream = PolledStream::new(stream, None)?;
    let local = stream.local_addr()?;
    let mut preface = [0u8; 4];
    match stream.peek_exact(&mut preface) {
        Ok(()) => {}
        // A connect-only probe (readiness checks) sends nothing.
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
        Err(error) => return Err(error).context("reading the preface"),
    }
    // hyper reads the HTTP/2 preface itself; the other protocols start after these bytes.
    if &preface == H2_PREFACE_START {
        return h2_server::serve(stream.into_inner(), &local.to_string(), body_bytes);
    }
    stream.read_exact(&mut preface)?;
    match &preface {
        b"GET " => serve_http(stream, preface, &local.to_string(), body_bytes),
        ECHO_PREFACE => {
            stream.write_all(format!("{local}\n").as_bytes())?;
            echo(stream)
        }
        BULK_PREFACE => {
            stream.write_all(format!("{local}\n").as_bytes())?;
            let received = io::copy(&mut stream, &mut io::sink()).context("reading bulk data")?;
            stream.write_all(format!("{received}\n").as_bytes())?;
            Ok(())
        }
        other => bail!("unknown preface {:?}", String::from_utf8_lossy(other)),
    }
}

fn echo(mut stream: PolledStream) -> Result<()> {
    let mut buffer = vec![0u8; IO_CHUNK];
    loop {
        let read = stream.read(&mut buffer).context("reading")?;
        if read == 0 {
            return Ok(());
        }
        stream.write_all(&buffer[..read]).context("echoing")?;
    }
}

/// Answers GETs (pipelined or not) until the client closes or asks to close; each response
/// is written with one `write` call, preformatted once per connection.
fn serve_http(
    mut stream: PolledStream,
    preface: [u8; 4],
    local: &str,
    body_bytes: usize,
) -> Result<()> {
    let keep_alive = response(local, body_bytes, false);
    let closing = response(local, body_bytes, true);
    let mut pending = preface.to_vec();
    let mut chunk = vec![0u8; IO_CHUNK];
    loop {
        while let Some(head_end) = find(&pending, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..head_end]).to_ascii_lowercase();
            if !head.starts_with("get ") {
                bail!("only GET without a body is supported, got {head:?}");
            }
            let close = head.contains("\r\nconnection: close");
            stream.write_all(if close { &closing } else { &keep_alive })?;
            if close {
                return Ok(());
            }
            pending.drain(..head_end + 4);
        }
        if pending.len() > MAX_HEAD_BYTES {
            bail!("request head longer than {MAX_HEAD_BYTES} bytes");
        }
        let read = stream.read(&mut chunk).context("reading a request")?;
        if read == 0 {
            if pending.is_empty() {
                return Ok(());
            }
            bail!("connection closed inside a request head");
        }
        pending.extend_from_slice(&chunk[..read]);
    }
}

fn response(local: &str, body_bytes: usize, close: bool) -> Vec<u8> {
    let connection = if close { "close" } else { "keep-alive" };
    let mut bytes = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {body_bytes}\r\nConnection: {connection}\r\n{SERVER_LOCAL_HEADER}: {local}\r\n\r\n"
    )
    .into_bytes();
    bytes.extend_from_slice(&payload(body_bytes));
    bytes
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
