//! `sidecar status`: what is attached where, with the counters, read back from the kernel.
use std::{os::fd::AsFd, path::PathBuf};

use anyhow::{Context, Result};
use aya::programs::links::{FdLink, PinnedLink};
use clap::Args;
use sidecar_common::{AttachPoint, CaptureReport, LinkReport, PinLayout, StatusReport, map_names};

use sidecar_capture::{
    bpffs, captures,
    ebpf_capture::{self, Hook, NETNS_HOOK, POD_HOOKS, PROXY_HOOKS},
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

pub fn run(args: StatusArgs) -> Result<()> {
    super::require_root("sidecar status")?;
    let status = collect(&PinLayout::new(&args.bpffs))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{status}");
    }
    Ok(())
}

fn collect(layout: &PinLayout) -> Result<StatusReport> {
    let mut ebpf = Vec::new();
    let memory = KernelMemory::scan(&layout.node_dir())?;
    for capture in captures::list(layout)? {
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
    Ok(StatusReport { ebpf, iptables })
}

fn describe_cgroup(capture: &captures::Capture, memory: &KernelMemory) -> Result<CaptureReport> {
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
        links.push(LinkReport {
            pin,
            attached_to: point,
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
    Ok(CaptureReport {
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
        when_proxy_down: config.when_proxy_down(),
        links,
        counters,
        pending_handoffs: ebpf_capture::read_pending_handoffs(pin_dir)? as u64,
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
        .find(|(hook, point)| pin == PinLayout::link_pin_name(hook.program, *point))
}
