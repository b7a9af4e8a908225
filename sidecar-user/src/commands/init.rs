//! `sidecar init`: the privileged step that installs capture for a pod, then exits.
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use ipnet::IpNet;
use sidecar_common::{
    DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT, DEFAULT_SHORTCUT_CONNECTIONS, PinLayout,
};

use sidecar_capture::{
    bpffs,
    capture_settings::{CaptureSettings, PortRanges, WhenProxyDown, parse_cidr},
    cgroup::Cgroup,
    ebpf_capture, iptables_capture,
    pod_annotations::{self, FailPolicy},
    pod_netns, probe,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// eBPF programs on the pod's cgroup (no iptables rule anywhere).
    Ebpf,
    /// istio-init style nat rules in the current network namespace (the comparison baseline).
    Iptables,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// The pod's cgroup v2 directory: absolute, or relative to the cgroup v2 mount; `auto`:
    /// the parent of this process's own cgroup (run from a container of the pod).
    #[arg(long, value_parser = parse_cgroup_arg)]
    pub cgroup: Option<CgroupArg>,
    /// With `--cgroup auto`: where the host's cgroup v2 tree is mounted (default: every cgroup2
    /// mount here, the latest first).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// The downward API file of the pod's annotations: Istio's
    /// `traffic.sidecar.istio.io/exclude{Outbound,Inbound}Ports`, `excludeOutboundIPRanges` add
    /// to the exclusions given here, `sidecar.ebpf/fail-policy` overrides --fail-policy and
    /// `sidecar.ebpf/when-proxy-down` --when-proxy-down.
    #[arg(long)]
    pub annotations_file: Option<PathBuf>,
    /// When capture cannot be installed: `closed` exits non-zero (the pod does not start),
    /// `open` reports the error and exits 0 (the app runs uncaptured).
    #[arg(long, value_enum, default_value = "closed")]
    pub fail_policy: FailPolicy,
    #[arg(long, value_enum, default_value = "ebpf")]
    pub mode: Mode,
    /// The proxy's outbound listener port on loopback.
    #[arg(long, default_value_t = DEFAULT_OUTBOUND_PORT)]
    pub outbound_port: u16,
    /// Sockets of this UID are never captured ("none" to disable).
    #[arg(long, default_value = "1337", value_parser = parse_id)]
    pub proxy_uid: IdOption,
    /// Sockets of this GID are never captured ("none" to disable).
    #[arg(long, default_value = "1337", value_parser = parse_id)]
    pub proxy_gid: IdOption,
    /// Destination ports that go direct: `22,8000-8100`.
    #[arg(long, default_value = "")]
    pub exclude_ports: PortRanges,
    /// Destination CIDRs that go direct (repeatable or comma-separated), IPv4 or IPv6.
    #[arg(long, value_delimiter = ',', value_parser = parse_cidr)]
    pub exclude_cidrs: Vec<IpNet>,
    /// eBPF mode, when the proxy runs in a sibling cgroup: answer its SO_ORIGINAL_DST there.
    #[arg(long)]
    pub proxy_cgroup: Option<PathBuf>,
    /// The proxy's inbound listener port: inbound connections to the pod are steered to it.
    #[arg(long, default_value_t = DEFAULT_INBOUND_PORT)]
    pub inbound_port: u16,
    /// Leave inbound connections alone (capture outbound only).
    #[arg(long)]
    pub no_inbound_capture: bool,
    /// Local ports whose inbound connections go straight to the app: `22,8000-8100`
    /// (the ports the proxy serves on the pod's addresses, 15020 and 15021, always are).
    #[arg(long, default_value = "")]
    pub exclude_inbound_ports: PortRanges,
    /// eBPF mode: the pod's network namespace for inbound capture, e.g. /run/netns/NAME or
    /// /proc/PID/ns/net (default: this process's). The host's is refused, however named.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Capture inbound traffic even if the namespace is the host's (a node's own inbound
    /// connections would all go to the proxy, or be refused without one).
    #[arg(long)]
    pub allow_host_netns: bool,
    /// eBPF mode: short-circuit the loopback hop between the app and its proxy with sockmap
    /// (sk_msg redirect on a sockhash): less CPU per message, a little more per connection.
    /// Only for apps with nonblocking sockets: the kernel can fail a blocking read with EAGAIN
    /// on a socket in a sockmap (docs/ARCHITECTURE.md).
    #[arg(long)]
    pub sockmap: bool,
    /// With --sockmap: how many app-proxy connections the shortcut holds at once (its socket
    /// hash is sized for this, 32 bytes of kernel memory per connection; a connection beyond it
    /// stays on TCP). Raised by a later init, never lowered while sockets may be in it.
    #[arg(long, default_value_t = DEFAULT_SHORTCUT_CONNECTIONS, requires = "sockmap")]
    pub sockmap_max_connections: u32,
    /// What the app's outbound connects get while no proxy listens (crashed, restarting):
    /// `refuse` fails them at once with ECONNREFUSED, as under Istio's iptables; `direct` sends
    /// them to their destination uncaptured (fail open: no mTLS, no mesh policy). eBPF mode
    /// only. Inbound connections are refused either way.
    #[arg(long, value_enum, default_value = "refuse")]
    pub when_proxy_down: WhenProxyDown,
    /// Where bpffs is (mounted there if it is not).
    #[arg(long, default_value = bpffs::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

/// `--cgroup`: a path, or `auto` for the pod cgroup of this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupArg {
    Auto,
    Path(PathBuf),
}

fn parse_cgroup_arg(text: &str) -> Result<CgroupArg, String> {
    match text {
        "" => Err("empty --cgroup: give a path or `auto`".to_string()),
        "auto" => Ok(CgroupArg::Auto),
        path => Ok(CgroupArg::Path(PathBuf::from(path))),
    }
}

/// A UID/GID, or none (clap needs a concrete type: `Option` would mean "flag omitted").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdOption(pub Option<u32>);

fn parse_id(text: &str) -> Result<IdOption, String> {
    if text == "none" {
        return Ok(IdOption(None));
    }
    match text.parse::<u32>() {
        Ok(id) if id != u32::MAX => Ok(IdOption(Some(id))),
        _ => Err(format!("invalid id '{text}': expected a number or 'none'")),
    }
}

impl InitArgs {
    pub fn settings(&self) -> CaptureSettings {
        CaptureSettings {
            outbound_port: self.outbound_port,
            proxy_uid: self.proxy_uid.0,
            proxy_gid: self.proxy_gid.0,
            excluded_ports: self.exclude_ports.clone(),
            excluded_cidrs: self.exclude_cidrs.clone(),
            inbound_port: (!self.no_inbound_capture).then_some(self.inbound_port),
            excluded_inbound_ports: self.exclude_inbound_ports.clone(),
            when_proxy_down: self.when_proxy_down,
        }
    }
}

pub fn run(mut args: InitArgs) -> Result<()> {
    if let Some(path) = &args.annotations_file {
        args.apply(pod_annotations::read_overrides(path)?);
    }
    match (install(&args), args.fail_policy) {
        (Err(error), FailPolicy::Open) => {
            eprintln!(
                "sidecar init: error: {error:#}\nsidecar init: fail policy is open: exiting 0, \
                 this pod's traffic is NOT captured"
            );
            Ok(())
        }
        (result, _) => result,
    }
}

impl InitArgs {
    /// Adds a pod's annotation settings to the command line's.
    fn apply(&mut self, overrides: pod_annotations::PodOverrides) {
        self.exclude_ports.0.extend(overrides.exclude_ports.0);
        self.exclude_inbound_ports
            .0
            .extend(overrides.exclude_inbound_ports.0);
        self.exclude_cidrs.extend(overrides.exclude_cidrs);
        if let Some(policy) = overrides.fail_policy {
            self.fail_policy = policy;
        }
        if let Some(choice) = overrides.when_proxy_down {
            self.when_proxy_down = choice;
        }
    }
}

fn install(args: &InitArgs) -> Result<()> {
    super::require_root("sidecar init")?;
    if args.outbound_port == 0 {
        bail!("invalid --outbound-port 0");
    }
    if args.inbound_port == 0 || args.inbound_port == args.outbound_port {
        bail!(
            "invalid --inbound-port {}: it must be a port other than the outbound port",
            args.inbound_port
        );
    }
    if args.sockmap && args.mode != Mode::Ebpf {
        bail!("--sockmap needs --mode ebpf: the shortcut is a sockmap, iptables has none");
    }
    if args.when_proxy_down == WhenProxyDown::Direct && args.mode != Mode::Ebpf {
        bail!(
            "--when-proxy-down direct (or the pod annotation {}) needs --mode ebpf: iptables \
             REDIRECT rules send every connect to the proxy's port whether it listens or not \
             (refused while it is down, as under Istio)",
            pod_annotations::WHEN_PROXY_DOWN
        );
    }
    let settings = args.settings();
    match args.mode {
        Mode::Ebpf => {
            settings
                .check_ebpf_capacities()
                .map_err(anyhow::Error::msg)?;
            init_ebpf(args, &settings)
        }
        Mode::Iptables => {
            // init runs inside the pod's network namespace in this mode.
            pod_netns::prepare(None, &settings.proxy_ports())?;
            iptables_capture::install(&settings)?;
            println!(
                "sidecar init: iptables capture installed in this network namespace \
                 (outbound -> 127.0.0.1:{}, inbound -> {})",
                settings.outbound_port,
                inbound_text(&settings)
            );
            Ok(())
        }
    }
}

fn init_ebpf(args: &InitArgs, settings: &CaptureSettings) -> Result<()> {
    let cgroup = match &args.cgroup {
        Some(CgroupArg::Path(path)) => Cgroup::resolve(path)?,
        Some(CgroupArg::Auto) => Cgroup::pod_of_self(args.cgroup_root.as_deref())?,
        None => bail!(
            "--cgroup is required in ebpf mode: the pod's cgroup v2 directory to attach to \
             (or `auto` from a container of the pod)"
        ),
    };
    let proxy_cgroup = args
        .proxy_cgroup
        .as_deref()
        .map(Cgroup::resolve)
        .transpose()?;
    if args.sockmap_max_connections == 0 {
        bail!("invalid --sockmap-max-connections 0");
    }
    let netns_path = match (&args.netns, settings.inbound_port) {
        (Some(path), _) => path.clone(),
        (None, Some(_)) => PathBuf::from("/proc/self/ns/net"),
        (None, None) => PathBuf::new(),
    };
    if settings.inbound_port.is_some() && !args.allow_host_netns {
        refuse_host_netns(&netns_path)?;
    }
    let netns = match settings.inbound_port {
        Some(_) => Some(std::fs::File::open(&netns_path).with_context(|| {
            format!(
                "cannot open network namespace {} (--netns)",
                netns_path.display()
            )
        })?),
        None => None,
    };
    probe::require_ebpf_capture_support(probe::Options {
        inbound: settings.inbound_port.is_some(),
        sockmap: args.sockmap,
    })?;
    if let Some(netns) = &netns {
        pod_netns::prepare(Some(netns), &settings.proxy_ports())?;
    }
    bpffs::ensure_mounted(&args.bpffs)?;
    // Held until init exits: a concurrent init or cleanup waits for a complete capture.
    let layout = PinLayout::new(&args.bpffs);
    let _lock = bpffs::lock(&layout)?;
    let pin_dir = layout.capture_dir(cgroup.id);
    let target = ebpf_capture::EbpfTarget {
        cgroup: &cgroup,
        proxy_cgroup: proxy_cgroup.as_ref(),
        shortcut_connections: args.sockmap_max_connections,
        netns: netns.as_ref().map(|file| (file, netns_path.as_path())),
        sockmap_shortcut: args.sockmap,
    };
    ebpf_capture::install(&target, settings, &pin_dir)?;
    println!(
        "sidecar init: eBPF capture attached to {} (outbound -> loopback:{}, inbound -> {}{}), pinned in {}",
        cgroup.path.display(),
        settings.outbound_port,
        inbound_text(settings),
        if args.sockmap {
            ", sockmap shortcut on"
        } else {
            ""
        },
        pin_dir.display()
    );
    Ok(())
}

/// The initial ("host") network namespace's fixed inode (`PROC_NET_INIT_INO`, recent kernels).
const INIT_NET_INODE: u64 = 0xEFFF_FFF9;
/// The initial PID namespace's fixed inode (`PROC_PID_INIT_INO`, every kernel since 3.8).
const INIT_PID_NS_INODE: u64 = 0xEFFF_FFFC;

/// Refuses the host's ("initial") network namespace: run outside a pod (on a node, in a lab,
/// or in a pod that ended up with hostNetwork), capturing the host's inbound traffic by
/// accident would cut the node off. The host's is recognised by its fixed inode (kernels from
/// 6.x give the initial namespace one), or, on older kernels, by being PID 1's when PID 1 is
/// the host's: in a container's own PID namespace, PID 1 is the pod's and proves nothing.
fn refuse_host_netns(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let identity = |path: &std::path::Path| std::fs::metadata(path).map(|m| (m.dev(), m.ino()));
    let target = identity(path)
        .with_context(|| format!("cannot open network namespace {} (--netns)", path.display()))?;
    let in_initial_pid_ns = identity(std::path::Path::new("/proc/self/ns/pid"))
        .is_ok_and(|(_, inode)| inode == INIT_PID_NS_INODE);
    let is_pid1s = in_initial_pid_ns
        && identity(std::path::Path::new("/proc/1/ns/net")).is_ok_and(|init| init == target);
    if target.1 == INIT_NET_INODE || is_pid1s {
        bail!(
            "refusing to capture inbound traffic of the host's network namespace ({}): pass \
             --netns PATH of the pod's namespace, --no-inbound-capture, or \
             --allow-host-netns if the host's is really meant",
            path.display()
        );
    }
    Ok(())
}

fn inbound_text(settings: &CaptureSettings) -> String {
    match settings.inbound_port {
        Some(port) => format!("port {port}"),
        None => "not captured".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use sidecar_common::DEFAULT_PROXY_ID;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    #[test]
    fn defaults_follow_istio() {
        let cli = Cli::try_parse_from(["init", "--cgroup", "/pod"]).unwrap();
        let settings = cli.init.settings();
        assert_eq!(settings.outbound_port, 15001);
        assert_eq!(settings.proxy_uid, Some(DEFAULT_PROXY_ID));
        assert_eq!(settings.proxy_gid, Some(DEFAULT_PROXY_ID));
        assert!(settings.excluded_ports.0.is_empty());
        assert_eq!(cli.init.mode, Mode::Ebpf);
        assert_eq!(settings.inbound_port, Some(15006));
        assert_eq!(settings.when_proxy_down, WhenProxyDown::Refuse);
        let inbound = settings.inbound_exclusions().to_string();
        assert_eq!(inbound, "15001,15006,15020-15021");
    }

    #[test]
    fn parses_exclusions_and_none_ids() {
        let cli = Cli::try_parse_from([
            "init",
            "--exclude-ports",
            "22,9000-9100",
            "--exclude-cidrs",
            "10.0.0.0/8,fd00::/8",
            "--exclude-cidrs",
            "192.0.2.1",
            "--proxy-uid",
            "none",
            "--mode",
            "iptables",
        ])
        .unwrap();
        let settings = cli.init.settings();
        assert_eq!(settings.excluded_ports.to_string(), "22,9000-9100");
        assert_eq!(settings.excluded_cidrs.len(), 3);
        assert_eq!(settings.proxy_uid, None);
    }

    #[test]
    fn bad_input_is_rejected_with_the_reason() {
        let err = |args: &[&str]| {
            let mut argv = vec!["init"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(err(&["--exclude-ports", "99999"]).contains("invalid port '99999'"));
        assert!(err(&["--exclude-cidrs", "10.1.2.3/8"]).contains("host bits"));
        assert!(err(&["--exclude-cidrs", "banana"]).contains("invalid CIDR"));
        assert!(err(&["--proxy-uid", "root"]).contains("invalid id"));
        assert!(err(&["--mode", "nft"]).contains("invalid value 'nft'"));
        assert!(err(&["--cgroup", ""]).contains("empty --cgroup"));
        assert!(err(&["--fail-policy", "maybe"]).contains("invalid value 'maybe'"));
        assert!(err(&["--when-proxy-down", "open"]).contains("invalid value 'open'"));
    }

    #[test]
    fn cgroup_auto_and_annotations_are_understood() {
        let mut cli = Cli::try_parse_from([
            "init",
            "--cgroup",
            "auto",
            "--exclude-ports",
            "22",
            "--exclude-cidrs",
            "192.0.2.0/24",
        ])
        .unwrap();
        assert_eq!(cli.init.cgroup, Some(CgroupArg::Auto));
        assert_eq!(cli.init.fail_policy, FailPolicy::Closed);
        cli.init.apply(pod_annotations::PodOverrides {
            exclude_ports: "5432".parse().unwrap(),
            exclude_inbound_ports: "9090".parse().unwrap(),
            exclude_cidrs: vec![parse_cidr("10.0.0.0/8").unwrap()],
            fail_policy: Some(FailPolicy::Open),
            when_proxy_down: Some(WhenProxyDown::Direct),
        });
        let settings = cli.init.settings();
        assert_eq!(settings.excluded_ports.to_string(), "22,5432");
        assert_eq!(settings.excluded_inbound_ports.to_string(), "9090");
        assert_eq!(settings.excluded_cidrs.len(), 2);
        assert_eq!(cli.init.fail_policy, FailPolicy::Open);
        assert_eq!(settings.when_proxy_down, WhenProxyDown::Direct);
    }
}
