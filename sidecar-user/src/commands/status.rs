//! `sidecar status`: what is attached where, with the counters, read back from the kernel.
use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::programs::links::{FdLink, PinnedLink};
use clap::Args;
use serde::Serialize;

use sidecar_common::map_names;

use sidecar_capture::{
    bpffs,
    capture_settings::WhenProxyDown,
    captures,
    ebpf_capture::{self, AttachPoint, Hook, NETNS_HOOK, POD_HOOKS, PROXY_HOOKS},
    iptables_capture,
    kernel_memory::KernelMemory,
    sys,
};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = bpffs::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

#[derive(Serialize)]
pub struct Status {
    pub ebpf: Vec<CgroupCapture>,
    /// iptables-mode rules in this network namespace, with packet counters.
    pub iptables: Vec<String>,
}

#[derive(Serialize)]
pub struct CgroupCapture {
    pub cgroup_id: u64,
    /// None when the cgroup no longer exists (a deleted pod's capture: `sidecar cleanup
    /// --stale` removes it, and `sidecar node-agent` does so by itself).
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub outbound_port: u32,
    pub proxy_uid: Option<u32>,
    pub proxy_gid: Option<u32>,
    pub excluded_ports: String,
    /// The proxy's inbound port, when inbound capture is on.
    pub inbound_port: Option<u32>,
    /// Including the proxy's own ports, which are always excluded.
    pub excluded_inbound_ports: String,
    pub excluded_cidrs: Vec<String>,
    /// The app-proxy loopback hop is short-circuited with sockmap (`init --sockmap`).
    pub sockmap_shortcut: bool,
    /// What outbound connects get while no proxy listens (`init --when-proxy-down`).
    pub when_proxy_down: WhenProxyDown,
    /// Pinned link name -> attached program IDs the kernel reports for that hook.
    pub links: Vec<LinkStatus>,
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Original destinations waiting for the proxy's end of their handshake (0 at rest).
    pub pending_handoffs: usize,
    /// Kernel memory of this capture's programs and maps (their `memlock`), node-wide maps
    /// excluded; socket storage is charged to each socket, not here.
    pub kernel_memory_bytes: u64,
}

#[derive(Serialize)]
pub struct LinkStatus {
    pub pin: String,
    /// PodCgroup, ProxyCgroup or Netns.
    pub attached_to: String,
    pub program: String,
    /// The kernel's ids for the pinned link and the program it attaches.
    pub link_id: u32,
    pub program_id: u32,
    /// Program IDs the kernel has attached to the cgroup for this hook (ours and others').
    pub attached_program_ids: Vec<u32>,
}

pub fn run(args: StatusArgs) -> Result<()> {
    super::require_root("sidecar status")?;
    let status = collect(&args.bpffs)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_text(&status);
    }
    Ok(())
}

fn collect(bpffs_root: &Path) -> Result<Status> {
    let mut ebpf = Vec::new();
    let memory = KernelMemory::scan(&bpffs::node_dir(bpffs_root))?;
    for capture in captures::list(bpffs_root)? {
        // A capture being installed or removed right now may be half there: say so and go on.
        match describe_cgroup(&capture, &memory) {
            Ok(described) => ebpf.push(described),
            Err(e) => eprintln!(
                "sidecar status: skipping {}: {e:#}",
                capture.pin_dir.display()
            ),
        }
    }
    let iptables = iptables_capture::describe()
        .into_iter()
        .map(|(family, rules)| format!("{family:?}:\n{rules}"))
        .collect();
    Ok(Status { ebpf, iptables })
}

fn describe_cgroup(capture: &captures::Capture, memory: &KernelMemory) -> Result<CgroupCapture> {
    let (cgroup_id, pin_dir) = (capture.cgroup_id, capture.pin_dir.as_path());
    let config = ebpf_capture::read_config(pin_dir).with_context(|| {
        format!(
            "cannot read the configuration pinned in {}",
            pin_dir.display()
        )
    })?;
    let cgroup = capture.cgroup.clone();
    let cgroup_file = cgroup.as_ref().and_then(|p| std::fs::File::open(p).ok());
    let mut links = Vec::new();
    for entry in std::fs::read_dir(pin_dir)?.flatten() {
        let pin = entry.file_name().to_string_lossy().into_owned();
        let Some((hook, point)) = hook_of_pin(&pin) else {
            continue;
        };
        // Only the pod-cgroup hooks can be queried on the pod's cgroup.
        let attached_program_ids = match (&cgroup_file, point) {
            (Some(file), AttachPoint::PodCgroup) => {
                sys::prog_query(file.as_fd(), hook.attach_type as u32).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        let info = PinnedLink::from_pin(entry.path())
            .map_err(anyhow::Error::from)
            .and_then(|link| Ok(FdLink::from(link).info()?))
            .with_context(|| format!("cannot read pinned link {pin}"))?;
        links.push(LinkStatus {
            pin,
            attached_to: format!("{point:?}"),
            program: hook.program.to_string(),
            link_id: info.id(),
            program_id: info.program_id(),
            attached_program_ids,
        });
    }
    links.sort_by(|a, b| a.pin.cmp(&b.pin));
    let counters = ebpf_capture::read_counters(pin_dir)?
        .into_iter()
        .map(|(counter, value)| (counter.name().to_string(), value))
        .collect();
    let ports =
        |map| -> Result<String> { Ok(ebpf_capture::read_port_ranges(pin_dir, map)?.to_string()) };
    Ok(CgroupCapture {
        cgroup_id,
        cgroup,
        pin_dir: pin_dir.to_path_buf(),
        outbound_port: config.outbound_port,
        proxy_uid: (config.proxy_uid != sidecar_common::NO_ID).then_some(config.proxy_uid),
        proxy_gid: (config.proxy_gid != sidecar_common::NO_ID).then_some(config.proxy_gid),
        excluded_ports: ports(map_names::EXCLUDED_PORTS)?,
        inbound_port: (config.inbound_port != 0).then_some(config.inbound_port),
        excluded_inbound_ports: ports(map_names::EXCLUDED_INBOUND_PORTS)?,
        excluded_cidrs: ebpf_capture::read_excluded_cidrs(pin_dir)?
            .iter()
            .map(|n| n.to_string())
            .collect(),
        sockmap_shortcut: config.flags & sidecar_common::CaptureConfig::SOCKMAP_SHORTCUT != 0,
        when_proxy_down: ebpf_capture::when_proxy_down_of(&config),
        links,
        counters,
        pending_handoffs: ebpf_capture::read_pending_handoffs(pin_dir)?,
        kernel_memory_bytes: memory.of_capture(pin_dir)?,
    })
}

/// Which hook a link pin belongs to, and where it is attached.
fn hook_of_pin(pin: &str) -> Option<(&'static Hook, AttachPoint)> {
    let pod = POD_HOOKS.iter().map(|hook| (hook, AttachPoint::PodCgroup));
    let proxy = PROXY_HOOKS
        .into_iter()
        .map(|hook| (hook, AttachPoint::ProxyCgroup));
    pod.chain(proxy)
        .chain([(NETNS_HOOK, AttachPoint::Netns)])
        .find(|(hook, point)| pin == ebpf_capture::link_pin_name(hook.program, *point))
}

fn print_text(status: &Status) {
    if status.ebpf.is_empty() {
        println!("eBPF capture: none installed");
    }
    for capture in &status.ebpf {
        let cgroup = capture
            .cgroup
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| {
                "<cgroup gone: a deleted pod's capture, `sidecar cleanup --stale` removes it>"
                    .into()
            });
        println!("eBPF capture on {cgroup} (cgroup id {})", capture.cgroup_id);
        println!("  pins:           {}", capture.pin_dir.display());
        println!("  outbound port:  {}", capture.outbound_port);
        let id = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "none".into());
        println!(
            "  proxy uid/gid:  {}/{}",
            id(capture.proxy_uid),
            id(capture.proxy_gid)
        );
        println!("  excluded ports: {}", or_none(&capture.excluded_ports));
        match capture.inbound_port {
            Some(port) => println!(
                "  inbound port:   {port}, excluded local ports {}",
                capture.excluded_inbound_ports
            ),
            None => println!("  inbound port:   none (inbound not captured)"),
        }
        println!(
            "  excluded cidrs: {}",
            or_none(&capture.excluded_cidrs.join(","))
        );
        let shortcut = if capture.sockmap_shortcut {
            "on"
        } else {
            "off"
        };
        println!("  sockmap shortcut: {shortcut}");
        println!("  when proxy down: {}", capture.when_proxy_down.name());
        for link in &capture.links {
            println!(
                "  {:<20} link {:<4} program {:<4} on {}",
                link.program, link.link_id, link.program_id, link.attached_to
            );
        }
        let counters: Vec<String> = capture
            .counters
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("  counters:       {}", counters.join(" "));
        println!("  pending handoffs: {}", capture.pending_handoffs);
        println!(
            "  kernel memory:  {:.1} KiB (programs and maps, memlock)",
            capture.kernel_memory_bytes as f64 / 1024.0
        );
    }
    if status.iptables.is_empty() {
        println!("iptables capture (this netns): none installed");
    }
    for rules in &status.iptables {
        println!("iptables capture (this netns): {rules}");
    }
}

fn or_none(text: &str) -> &str {
    if text.is_empty() { "none" } else { text }
}
