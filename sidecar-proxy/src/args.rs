//! Command-line options of `sidecar proxy`, parsed once into a validated [`ProxyConfig`].
use std::{
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    num::NonZeroUsize,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::Args;
use sidecar_common::{DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT};

use super::{
    Timeouts, accept::orig_dst::OrigDstMode, admin::app_health::AppProbers,
    capture::health::CaptureCheck, telemetry::logging::LogFormat, tls,
};

#[derive(Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Port the captured outbound connections are redirected to.
    #[arg(long, default_value_t = DEFAULT_OUTBOUND_PORT)]
    pub outbound_port: u16,

    /// Addresses the outbound listener binds, comma separated. An IPv6 address that cannot be
    /// bound because IPv6 is disabled is skipped with a warning.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,::1")]
    pub outbound_bind: Vec<IpAddr>,

    /// Port the captured inbound connections are steered (sk_lookup) or redirected to.
    #[arg(long, default_value_t = DEFAULT_INBOUND_PORT)]
    pub inbound_port: u16,

    /// Addresses the inbound listener binds, comma separated (IPv6 ones are IPv6-only).
    #[arg(long, value_delimiter = ',', default_value = "0.0.0.0,::")]
    pub inbound_bind: Vec<IpAddr>,

    /// Mesh config (YAML; see docs/MESH_CONFIG.md and docs/ROUTING.md): identity files, mesh
    /// workloads, inbound policy, HTTP routing. Watched and reloaded on change. Without it:
    /// plaintext only, inbound PERMISSIVE, HTTP passed through.
    #[arg(long, value_name = "PATH")]
    pub mesh_config: Option<PathBuf>,

    /// How long a PERMISSIVE inbound port waits for a client's first bytes before treating
    /// the connection as plaintext, and outbound protocol detection for the first bytes of
    /// either side before treating it as TCP (server-speaks-first protocols: the client sends
    /// nothing).
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub sniff_timeout: Duration,

    /// Give up on an mTLS handshake (either side) after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// How the original destination of an accepted outbound connection is learned.
    #[arg(long, value_enum, default_value_t = OrigDstMode::Sockopt)]
    pub orig_dst: OrigDstMode,

    /// Upstream for every connection (with `--orig-dst explicit` only).
    #[arg(long, value_name = "HOST:PORT")]
    pub target: Option<String>,

    /// Give up on an upstream connect after this long (e.g. `10s`, `500ms`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Close a downstream connection (relayed TCP, served HTTP) after this long without a byte
    /// either way (Istio's default TCP and HTTP idle timeout).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Close an HTTP/1 connection (the app's, captured; and the readiness, metrics and admin
    /// ports') whose request headers are not complete this long after their first byte. On the
    /// readiness, metrics and admin ports it also closes keep-alive connections idle that long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub request_headers_timeout: Duration,

    /// TCP keepalive on proxied connections (both ends): idle time before the first probe,
    /// then 9 probes 75 s apart; `0s` turns it off.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub tcp_keepalive: Duration,

    /// Connections each data-path side (outbound, inbound) holds at once; beyond, new ones are
    /// reset and counted (`sidecar_listener_overflow_total`). `auto`: what the open-file limit
    /// leaves once the admin listeners are full, at two descriptors a connection.
    #[arg(long, default_value = "auto", value_parser = parse_connection_cap)]
    pub max_connections: ConnectionCap,

    /// Connections each readiness, metrics and admin listener holds at once; beyond, the
    /// oldest is closed to make room.
    #[arg(long, default_value_t = NonZeroUsize::new(128).expect("non-zero"))]
    pub max_admin_connections: NonZeroUsize,

    /// Where `/stats/prometheus` is served.
    #[arg(long, default_value = "127.0.0.1:15020")]
    pub metrics_addr: SocketAddr,

    /// Where `/healthz/ready` is served.
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub ready_addr: SocketAddr,

    /// Where the admin endpoints are served (`/config_dump`, `/logging`, `POST /quitquitquit`,
    /// `/stats`); keep it on localhost: they change and stop the proxy.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// On SIGTERM, SIGINT or `POST /quitquitquit`, how long the proxy drains at most: readiness
    /// fails at once, listeners stay open, HTTP connections are asked to close; the proxy exits
    /// as soon as no connection is left, or when this is over (Istio's
    /// `terminationDrainDuration` with `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`). A second signal
    /// exits at once. `0s`: exit at once.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_duration: Duration,

    /// Drain and exit once the app has had no outbound connection open for this long, after
    /// its first: for a Job's pod without native sidecars (podman, plain containers), whose
    /// proxy would otherwise keep the pod running after the app is done.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub exit_when_idle_after: Option<Duration>,

    /// UIDs besides root and the proxy's own that may stop the proxy and change its logging
    /// (`POST /quitquitquit`, `POST /logging`), comma separated: e.g. the app of a Job on a
    /// cluster without native sidecars, which stops its proxy when done.
    #[arg(long, value_delimiter = ',')]
    pub admin_allowed_uids: Vec<u32>,

    /// bpffs mount holding the capture's pinned maps, for the kernel counters in `/stats`.
    #[arg(long, default_value = sidecar_common::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,

    /// Whether this pod's eBPF capture is checked (not ready while it is missing): `auto` once
    /// it has been seen, `ebpf` from the start, `off`.
    #[arg(long, value_enum, default_value_t = CaptureCheck::Auto)]
    pub capture_check: CaptureCheck,

    /// How often the capture is checked.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub capture_check_interval: Duration,

    /// This workload's name, for metric labels.
    #[arg(long, env = "POD_NAME", default_value = "unknown")]
    pub workload_name: String,

    /// This workload's namespace, for metric labels.
    #[arg(long, env = "POD_NAMESPACE", default_value = "unknown")]
    pub workload_namespace: String,

    /// Log line format; the level comes from `RUST_LOG` (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Data-path worker threads (default: one per core).
    #[arg(long)]
    pub worker_threads: Option<NonZeroUsize>,

    /// The app's kubelet probes, which `sidecar inject` rewrote to
    /// `:15020/app-health/<container>/<livez|readyz|startupz>`: JSON of path -> original probe
    /// (`httpGet`, `tcpSocket` or `grpc`, and `timeoutSeconds`), as Istio's
    /// `ISTIO_KUBE_APP_PROBERS`. The proxy performs them against the app.
    #[arg(long, env = "SIDECAR_APP_PROBERS", value_name = "JSON")]
    pub app_probers: Option<String>,
}

/// `--max-connections`: a number, or sized from the open-file limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionCap {
    Auto,
    Fixed(NonZeroUsize),
}

fn parse_connection_cap(value: &str) -> Result<ConnectionCap, String> {
    if value == "auto" {
        return Ok(ConnectionCap::Auto);
    }
    value
        .parse()
        .map(ConnectionCap::Fixed)
        .map_err(|_| format!("expected `auto` or a number of connections above 0, not {value:?}"))
}

/// Where the original destination comes from, with the argument each source needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrigDstSource {
    Sockopt,
    Explicit(SocketAddr),
}

/// Everything the proxy needs, checked for consistency.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub outbound_port: u16,
    pub outbound_bind: Vec<IpAddr>,
    pub inbound_port: u16,
    pub inbound_bind: Vec<IpAddr>,
    pub mesh_config: Option<PathBuf>,
    pub orig_dst: OrigDstSource,
    pub timeouts: Timeouts,
    pub metrics_addr: SocketAddr,
    pub ready_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Per data-path side; `None`: sized from the open-file limit at start.
    pub max_connections: Option<usize>,
    pub max_admin_connections: usize,
    pub drain_duration: Duration,
    pub exit_when_idle_after: Option<Duration>,
    pub admin_allowed_uids: Vec<u32>,
    pub bpffs: PathBuf,
    pub capture_check: CaptureCheck,
    pub capture_check_interval: Duration,
    pub workload_name: String,
    pub workload_namespace: String,
    /// `--app-probers`, checked.
    pub app_probers: Option<Arc<AppProbers>>,
}

impl TryFrom<&ProxyArgs> for ProxyConfig {
    type Error = anyhow::Error;

    fn try_from(args: &ProxyArgs) -> anyhow::Result<Self> {
        if args.outbound_bind.is_empty() {
            bail!("--outbound-bind needs at least one address");
        }
        if args.inbound_bind.is_empty() {
            bail!("--inbound-bind needs at least one address");
        }
        if args.inbound_port == args.outbound_port {
            bail!(
                "--inbound-port and --outbound-port are both {}: they must differ",
                args.inbound_port
            );
        }
        for (flag, value) in [
            ("--idle-timeout", args.idle_timeout),
            ("--request-headers-timeout", args.request_headers_timeout),
            (
                "--exit-when-idle-after",
                args.exit_when_idle_after.unwrap_or(Duration::MAX),
            ),
        ] {
            if value.is_zero() {
                bail!("{flag} must be above 0");
            }
        }
        // An option that would be silently ignored is almost always a mistake in a manifest.
        if args.target.is_some() && args.orig_dst != OrigDstMode::Explicit {
            bail!("--target is only valid with --orig-dst explicit");
        }
        let orig_dst = match args.orig_dst {
            OrigDstMode::Sockopt => OrigDstSource::Sockopt,
            OrigDstMode::Explicit => match &args.target {
                Some(target) => OrigDstSource::Explicit(resolve_target(target)?),
                None => bail!("--orig-dst explicit requires --target HOST:PORT"),
            },
        };
        Ok(ProxyConfig {
            outbound_port: args.outbound_port,
            outbound_bind: args.outbound_bind.clone(),
            inbound_port: args.inbound_port,
            inbound_bind: args.inbound_bind.clone(),
            mesh_config: args.mesh_config.clone(),
            orig_dst,
            timeouts: Timeouts {
                connect: args.connect_timeout,
                tls_handshake: args.tls_handshake_timeout,
                sniff: args.sniff_timeout,
                idle: args.idle_timeout,
                request_headers: args.request_headers_timeout,
                tcp_keepalive: Some(args.tcp_keepalive).filter(|idle| !idle.is_zero()),
            },
            metrics_addr: args.metrics_addr,
            ready_addr: args.ready_addr,
            admin_addr: args.admin_addr,
            max_connections: match args.max_connections {
                ConnectionCap::Auto => None,
                ConnectionCap::Fixed(max) => Some(max.get()),
            },
            max_admin_connections: args.max_admin_connections.get(),
            drain_duration: args.drain_duration,
            exit_when_idle_after: args.exit_when_idle_after,
            admin_allowed_uids: args.admin_allowed_uids.clone(),
            bpffs: args.bpffs.clone(),
            capture_check: args.capture_check,
            capture_check_interval: args.capture_check_interval,
            workload_name: args.workload_name.clone(),
            workload_namespace: args.workload_namespace.clone(),
            app_probers: args
                .app_probers
                .as_deref()
                .map(|json| AppProbers::parse(json, &tls::crypto_provider()).map(Arc::new))
                .transpose()?,
        })
    }
}

/// Resolves `HOST:PORT` once at startup; the first address wins.
fn resolve_target(target: &str) -> anyhow::Result<SocketAddr> {
    target
        .to_socket_addrs()
        .with_context(|| format!("--target {target}: expected HOST:PORT"))?
        .next()
        .with_context(|| format!("--target {target}: the host has no address"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        proxy: ProxyArgs,
    }

    fn config(args: &[&str]) -> anyhow::Result<ProxyConfig> {
        let cli = Cli::try_parse_from(std::iter::once("proxy").chain(args.iter().copied()))?;
        ProxyConfig::try_from(&cli.proxy)
    }

    #[test]
    fn defaults_follow_istio_ports() -> anyhow::Result<()> {
        let config = config(&[])?;
        assert_eq!(config.outbound_port, 15001);
        assert_eq!(
            config.outbound_bind,
            vec![
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
            ]
        );
        assert_eq!(config.inbound_port, 15006);
        assert_eq!(
            config.inbound_bind,
            vec![
                IpAddr::from([0, 0, 0, 0]),
                IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
            ]
        );
        assert_eq!(config.mesh_config, None);
        assert_eq!(config.orig_dst, OrigDstSource::Sockopt);
        assert_eq!(
            config.timeouts,
            Timeouts {
                connect: Duration::from_secs(10),
                tls_handshake: Duration::from_secs(10),
                sniff: Duration::from_millis(200),
                idle: Duration::from_secs(3600),
                request_headers: Duration::from_secs(10),
                tcp_keepalive: Some(Duration::from_secs(300)),
            }
        );
        assert_eq!(
            config.max_connections, None,
            "sized from the open-file limit"
        );
        assert_eq!(config.max_admin_connections, 128);
        assert_eq!(config.drain_duration, Duration::from_secs(5));
        assert_eq!(config.exit_when_idle_after, None);
        assert_eq!(config.metrics_addr, "127.0.0.1:15020".parse()?);
        assert_eq!(config.ready_addr, "0.0.0.0:15021".parse()?);
        Ok(())
    }

    #[test]
    fn each_source_requires_its_argument_and_only_it() -> anyhow::Result<()> {
        assert!(config(&["--orig-dst", "explicit"]).is_err());
        assert!(config(&["--target", "127.0.0.1:80"]).is_err());
        assert!(config(&["--orig-dst", "explicit", "--target", "no-port"]).is_err());

        let explicit = config(&["--orig-dst", "explicit", "--target", "127.0.0.1:8080"])?;
        assert_eq!(
            explicit.orig_dst,
            OrigDstSource::Explicit("127.0.0.1:8080".parse()?)
        );
        Ok(())
    }

    #[test]
    fn limits_are_checked() -> anyhow::Result<()> {
        let set = config(&[
            "--max-connections",
            "500",
            "--tcp-keepalive",
            "0s",
            "--idle-timeout",
            "90s",
            "--admin-allowed-uids",
            "1000,1001",
        ])?;
        assert_eq!(set.max_connections, Some(500));
        assert_eq!(set.admin_allowed_uids, [1000, 1001]);
        assert_eq!(set.timeouts.tcp_keepalive, None);
        assert_eq!(set.timeouts.idle, Duration::from_secs(90));
        for bad in [
            &["--max-connections", "0"][..],
            &["--max-connections", "many"],
            &["--max-admin-connections", "0"],
            &["--idle-timeout", "0s"],
            &["--request-headers-timeout", "0s"],
            &["--admin-allowed-uids", "app"],
        ] {
            assert!(config(bad).is_err(), "{bad:?}");
        }
        Ok(())
    }

    #[test]
    fn the_drain_and_the_idle_exit_are_durations() -> anyhow::Result<()> {
        let set = config(&["--drain-duration", "0s", "--exit-when-idle-after", "30s"])?;
        assert_eq!(set.drain_duration, Duration::ZERO, "exit at once");
        assert_eq!(set.exit_when_idle_after, Some(Duration::from_secs(30)));
        for bad in [
            &["--drain-duration", "soon"][..],
            &["--exit-when-idle-after", "0s"],
            &["--exit-when-idle-after", "5"],
        ] {
            assert!(config(bad).is_err(), "{bad:?}");
        }
        Ok(())
    }

    #[test]
    fn inbound_and_outbound_ports_must_differ() {
        let error = config(&["--inbound-port", "15001"]).expect_err("same port");
        assert!(error.to_string().contains("must differ"), "{error}");
        assert!(config(&["--inbound-bind", ""]).is_err());
    }
}
