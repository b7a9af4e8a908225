//! Small TCP/HTTP tools that integration tests and the demo run inside lab pods.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use sidecar_tests::tools::load::{self, LoadSpec};
use sidecar_tests::tools::{bind_and_announce, echo, grpc_health, http};

#[derive(Parser)]
#[command(
    name = "labtool",
    about = "TCP and HTTP helpers for the sidecar's network-namespace lab"
)]
struct Cli {
    #[command(subcommand)]
    tool: Tool,
}

#[derive(Subcommand)]
enum Tool {
    /// Per connection: read to EOF, answer one JSON report line, echo the bytes, close.
    EchoServer {
        #[arg(long = "listen", required = true, value_name = "ADDR")]
        listen: Vec<SocketAddr>,
    },
    /// Send a payload to an echo server, half-close, check the echo; print one JSON line.
    Connect {
        addr: SocketAddr,
        #[arg(long, default_value_t = 64)]
        payload_bytes: usize,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Answer every GET with `hello from NAME: you are <peer> and I am <local>`;
    /// `GET /delay/<ms>` that many milliseconds late.
    HttpServer {
        #[arg(long = "listen", required = true, value_name = "ADDR")]
        listen: Vec<SocketAddr>,
        #[arg(long)]
        name: String,
    },
    /// GET an http:// URL and print `{"status":..,"body":..}`; fails only without a response.
    HttpGet {
        url: String,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Try again every 100 ms while there is no response at all, for up to this long (an
        /// app that may start before its proxy).
        #[arg(long, default_value_t = 0)]
        retry_for_ms: u64,
    },
    /// A gRPC health service (h2c) answering SERVING, or NOT_SERVING with `--not-serving`.
    GrpcHealthServer {
        #[arg(long = "listen", required = true, value_name = "ADDR")]
        listen: Vec<SocketAddr>,
        #[arg(long)]
        not_serving: bool,
    },
    /// The benchmark's server: HTTP with fixed-size bodies, echo and bulk on one port.
    LoadServer {
        #[arg(long = "listen", required = true, value_name = "ADDR")]
        listen: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        /// Connections served at once (one thread each, started up front).
        #[arg(long, default_value_t = 128)]
        threads: usize,
    },
    /// The benchmark's load generator: runs a JSON `LoadSpec`, prints one JSON `LoadReport`.
    LoadClient {
        #[arg(long, value_parser = parse_spec)]
        spec: LoadSpec,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (name, result) = match cli.tool {
        Tool::EchoServer { listen } => ("echo-server", serve_all(&listen, echo::serve)),
        Tool::Connect {
            addr,
            payload_bytes,
            timeout_ms,
        } => (
            "connect",
            connect(addr, payload_bytes, Duration::from_millis(timeout_ms)),
        ),
        Tool::HttpServer { listen, name } => (
            "http-server",
            serve_all(&listen, move |listener| http::serve(listener, &name)),
        ),
        Tool::HttpGet {
            url,
            timeout_ms,
            retry_for_ms,
        } => (
            "http-get",
            http_get(
                &url,
                Duration::from_millis(timeout_ms),
                Duration::from_millis(retry_for_ms),
            ),
        ),
        Tool::GrpcHealthServer {
            listen,
            not_serving,
        } => (
            "grpc-health-server",
            serve_all(&listen, move |listener| {
                let status = if not_serving { 2 } else { 1 };
                if let Err(error) = grpc_health::serve(listener, status) {
                    eprintln!("labtool grpc-health-server: {error:#}");
                }
            }),
        ),
        Tool::LoadServer {
            listen,
            body_bytes,
            threads,
        } => (
            "load-server",
            serve_all(&listen, move |listener| {
                load::server::serve(listener, body_bytes, threads)
            }),
        ),
        Tool::LoadClient { spec } => ("load-client", load_client(&spec)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("labtool {name}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Serves every listener on its own thread until killed.
fn serve_all(
    addrs: &[SocketAddr],
    serve: impl Fn(TcpListener) + Clone + Send + 'static,
) -> Result<()> {
    let listeners = bind_and_announce(addrs, &mut io::stdout())?;
    let servers: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let serve = serve.clone();
            thread::spawn(move || serve(listener))
        })
        .collect();
    for server in servers {
        if server.join().is_err() {
            bail!("a server thread panicked");
        }
    }
    Ok(())
}

fn connect(addr: SocketAddr, payload_bytes: usize, timeout: Duration) -> Result<()> {
    let report = echo::connect_and_echo(addr, payload_bytes, timeout)?;
    println!("{}", serde_json::to_string(&report)?);
    if !report.echo_ok {
        bail!(
            "the echo differs from the {payload_bytes} bytes sent (server received {})",
            report.server.received
        );
    }
    Ok(())
}

fn http_get(url: &str, timeout: Duration, retry_for: Duration) -> Result<()> {
    let response = http::get_with_retries(&http::HttpTarget::parse(url)?, timeout, retry_for)?;
    println!("{}", serde_json::to_string(&response)?);
    Ok(())
}

fn parse_spec(text: &str) -> Result<LoadSpec, String> {
    serde_json::from_str(text).map_err(|error| error.to_string())
}

/// Errors inside the run are reported in the JSON line (the caller's gates read them); only a
/// run that could not produce a report fails the command.
fn load_client(spec: &LoadSpec) -> Result<()> {
    let report = load::client::run(spec, &mut io::stdout())?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
