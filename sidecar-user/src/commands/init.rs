//! `sidecar init`: the privileged step that installs capture for a pod, then exits.
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use ipnet::IpNet;
use sidecar_common::{DEFAULT_OUTBOUND_PORT, MAX_TRACKED_CONNECTIONS};

use crate::{
    bpffs,
    capture_settings::{CaptureSettings, PortRanges, parse_cidr},
    cgroup::Cgroup,
    ebpf_capture, iptables_capture, probe,
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
    /// The pod's cgroup v2 directory: absolute, or relative to the cgroup v2 mount.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
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
    /// eBPF mode: how many redirected connections can be open at once (the original-destination
    /// index; a connection beyond it is reset and counted as an error). Set on first install.
    #[arg(long, default_value_t = MAX_TRACKED_CONNECTIONS)]
    pub max_tracked_connections: u32,
    /// Where bpffs is (mounted there if it is not).
    #[arg(long, default_value = bpffs::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
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
        }
    }
}

pub fn run(args: InitArgs) -> Result<()> {
    super::require_root("sidecar init")?;
    if args.outbound_port == 0 {
        bail!("invalid --outbound-port 0");
    }
    let settings = args.settings();
    match args.mode {
        Mode::Ebpf => init_ebpf(&args, &settings),
        Mode::Iptables => {
            iptables_capture::install(&settings)?;
            println!(
                "sidecar init: iptables capture installed in this network namespace \
                 (outbound -> 127.0.0.1:{})",
                settings.outbound_port
            );
            Ok(())
        }
    }
}

fn init_ebpf(args: &InitArgs, settings: &CaptureSettings) -> Result<()> {
    let Some(path) = &args.cgroup else {
        bail!("--cgroup is required in ebpf mode: the pod's cgroup v2 directory to attach to");
    };
    let cgroup = Cgroup::resolve(path)?;
    let proxy_cgroup = args
        .proxy_cgroup
        .as_deref()
        .map(Cgroup::resolve)
        .transpose()?;
    probe::require_ebpf_capture_support()?;
    bpffs::ensure_mounted(&args.bpffs)?;
    let pin_dir = bpffs::pin_dir(&args.bpffs, cgroup.id);
    if args.max_tracked_connections == 0 {
        bail!("invalid --max-tracked-connections 0");
    }
    let target = ebpf_capture::EbpfTarget {
        cgroup: &cgroup,
        proxy_cgroup: proxy_cgroup.as_ref(),
        max_tracked_connections: args.max_tracked_connections,
    };
    ebpf_capture::install(&target, settings, &pin_dir)?;
    println!(
        "sidecar init: eBPF capture attached to {} (outbound -> loopback:{}), pinned in {}",
        cgroup.path.display(),
        settings.outbound_port,
        pin_dir.display()
    );
    Ok(())
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
    }
}
