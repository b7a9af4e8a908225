//! eBPF capture: load the programs, write the configuration, attach them to the pod's cgroup
//! as bpf_links and pin everything under one directory per cgroup, so capture stays active
//! after `sidecar init` exits.
//!
//! Re-running init reuses the pinned maps (so live connections keep their original
//! destination and the counters keep counting) and swaps each link in place with a rename,
//! so there is never a moment with no program or with two of ours attached for long.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SockOps},
};
use aya_obj::generated::bpf_attach_type::{
    self, BPF_CGROUP_GETSOCKOPT, BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET4_GETPEERNAME,
    BPF_CGROUP_INET6_CONNECT, BPF_CGROUP_INET6_GETPEERNAME, BPF_CGROUP_SOCK_OPS, BPF_SK_LOOKUP,
    BPF_SK_MSG_VERDICT,
};
use ipnet::IpNet;
use sidecar_common::{CaptureConfig, Counter, NO_ID, map_names};

use crate::{capture_settings::CaptureSettings, cgroup::Cgroup, sys};

static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("SIDECAR_BPF_OBJECT"));

/// A program of the object and how it attaches.
pub struct Hook {
    pub program: &'static str,
    pub attach_type: bpf_attach_type,
    /// For error messages: what the kernel must support.
    pub feature: &'static str,
}

/// Every hook attached to the pod's cgroup.
pub const POD_HOOKS: &[Hook] = &[
    Hook {
        program: "connect4",
        attach_type: BPF_CGROUP_INET4_CONNECT,
        feature: "cgroup/connect4 (Linux 4.17+)",
    },
    Hook {
        program: "connect6",
        attach_type: BPF_CGROUP_INET6_CONNECT,
        feature: "cgroup/connect6 (Linux 4.17+)",
    },
    Hook {
        program: "getpeername4",
        attach_type: BPF_CGROUP_INET4_GETPEERNAME,
        feature: "cgroup/getpeername4 (Linux 5.8+)",
    },
    Hook {
        program: "getpeername6",
        attach_type: BPF_CGROUP_INET6_GETPEERNAME,
        feature: "cgroup/getpeername6 (Linux 5.8+)",
    },
    Hook {
        program: "track_sockets",
        attach_type: BPF_CGROUP_SOCK_OPS,
        feature: "sock_ops (Linux 4.13+)",
    },
    Hook {
        program: "getsockopt_orig_dst",
        attach_type: BPF_CGROUP_GETSOCKOPT,
        feature: "cgroup/getsockopt (Linux 5.3+)",
    },
];

/// Hooks also attached to a proxy living in a sibling cgroup: its `SO_ORIGINAL_DST` is
/// answered there, and its inbound listener is registered when it calls listen().
pub const PROXY_HOOKS: [&Hook; 2] = [&POD_HOOKS[5], &POD_HOOKS[4]];

/// Inbound capture, attached to the pod's network namespace.
pub const NETNS_HOOK: &Hook = &Hook {
    program: "steer_inbound",
    attach_type: BPF_SK_LOOKUP,
    feature: "sk_lookup (Linux 5.9+)",
};

/// The sockmap shortcut's verdict program, attached to `SHORTCUT_SOCKETS` (`init --sockmap`).
pub const SHORTCUT_HOOK: &Hook = &Hook {
    program: "shortcut_loopback",
    attach_type: BPF_SK_MSG_VERDICT,
    feature: "sk_msg (Linux 4.17+)",
};

/// Maps that are pinned (and reused by a later init).
const PINNED_MAPS: &[&str] = &[
    map_names::CONFIG,
    map_names::COUNTERS,
    map_names::EXCLUDED_PORTS,
    map_names::EXCLUDED_INBOUND_PORTS,
    map_names::INBOUND_LISTENERS,
    map_names::EXCLUDED_CIDR4,
    map_names::EXCLUDED_CIDR6,
    map_names::ORIG_DST,
    map_names::ORIG_DST_BY_PEER,
    // Reused, never replaced: freeing the socket hash would drop the bytes still queued on
    // its sockets.
    map_names::SHORTCUT_SOCKETS,
    map_names::SHORTCUT_FALLBACK,
];

/// Where a hook is attached, which also names its link pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachPoint {
    PodCgroup,
    ProxyCgroup,
    Netns,
}

pub fn link_pin_name(program: &str, point: AttachPoint) -> String {
    match point {
        AttachPoint::PodCgroup | AttachPoint::Netns => format!("link_{program}"),
        AttachPoint::ProxyCgroup => format!("link_{program}_proxy_cgroup"),
    }
}

pub fn map_pin_path(pin_dir: &Path, map: &str) -> PathBuf {
    pin_dir.join(format!("map_{map}"))
}

/// Where and how the eBPF capture attaches.
#[derive(Clone, Copy)]
pub struct EbpfTarget<'a> {
    /// The pod's cgroup: every hook attaches here.
    pub cgroup: &'a Cgroup,
    /// A proxy in a sibling cgroup gets the SO_ORIGINAL_DST answer there too.
    pub proxy_cgroup: Option<&'a Cgroup>,
    /// Capacity of the original-destination index (concurrent redirected connections).
    pub max_tracked_connections: u32,
    /// The pod's network namespace (an open `/proc/<pid>/ns/net` or `/run/netns/<name>`),
    /// for inbound capture; `None` when inbound capture is off.
    pub netns: Option<(&'a std::fs::File, &'a Path)>,
    /// Short-circuit the app-proxy loopback hop with sockmap.
    pub sockmap_shortcut: bool,
}

/// Installs (or replaces) the capture for `cgroup`. On failure nothing new stays attached
/// and a previous installation is left as it was.
pub fn install(target: &EbpfTarget<'_>, settings: &CaptureSettings, pin_dir: &Path) -> Result<()> {
    let fresh = !pin_dir.exists();
    let result = install_inner(target, settings, pin_dir);
    if result.is_err() && fresh {
        // Maps were created and pinned by the loader: a failed first install leaves nothing.
        let _ = remove_pins(pin_dir);
    }
    result
}

fn install_inner(
    target: &EbpfTarget<'_>,
    settings: &CaptureSettings,
    pin_dir: &Path,
) -> Result<()> {
    let EbpfTarget {
        cgroup,
        proxy_cgroup,
        max_tracked_connections,
        netns,
        sockmap_shortcut,
    } = *target;
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("cannot create pin directory {}", pin_dir.display()))?;
    let mut ebpf = load(pin_dir, max_tracked_connections)?;
    if sockmap_shortcut {
        attach_shortcut(&mut ebpf)?;
    }
    configure(&mut ebpf, settings, sockmap_shortcut)?;

    let mut links: Vec<(String, OwnedFd)> = Vec::new();
    let cgroup_fd = cgroup.open()?;
    for hook in POD_HOOKS {
        let link = attach(&mut ebpf, hook, cgroup_fd.as_fd(), &cgroup.path)?;
        links.push((link_pin_name(hook.program, AttachPoint::PodCgroup), link));
    }
    if let Some(proxy) = proxy_cgroup {
        let proxy_fd = proxy.open()?;
        for hook in PROXY_HOOKS {
            let link = attach(&mut ebpf, hook, proxy_fd.as_fd(), &proxy.path)?;
            links.push((link_pin_name(hook.program, AttachPoint::ProxyCgroup), link));
        }
    }
    if let Some((netns_file, netns_path)) = netns {
        let link = attach(&mut ebpf, NETNS_HOOK, netns_file.as_fd(), netns_path)?;
        links.push((link_pin_name(NETNS_HOOK.program, AttachPoint::Netns), link));
    }
    swap_in_links(pin_dir, links)
}

fn load(pin_dir: &Path, max_tracked_connections: u32) -> Result<Ebpf> {
    let paths: Vec<(&str, PathBuf)> = PINNED_MAPS
        .iter()
        .map(|name| (*name, map_pin_path(pin_dir, name)))
        .collect();
    let mut loader = EbpfLoader::new();
    // Applies when the index is created; a reused pinned index keeps its capacity.
    loader.map_max_entries(map_names::ORIG_DST_BY_PEER, max_tracked_connections);
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(BPF_OBJECT)
        .map_err(|e| anyhow!("cannot load the BPF object: {e}"))?;
    for hook in POD_HOOKS.iter().chain([NETNS_HOOK]) {
        load_program(&mut ebpf, hook)?;
    }
    Ok(ebpf)
}

fn load_program(ebpf: &mut Ebpf, hook: &Hook) -> Result<()> {
    let program = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| anyhow!("program {} missing from the BPF object", hook.program))?;
    let loaded = match hook.attach_type {
        BPF_CGROUP_SOCK_OPS => <&mut SockOps>::try_from(program)?.load(),
        BPF_CGROUP_GETSOCKOPT => <&mut CgroupSockopt>::try_from(program)?.load(),
        BPF_SK_LOOKUP => <&mut SkLookup>::try_from(program)?.load(),
        BPF_SK_MSG_VERDICT => <&mut SkMsg>::try_from(program)?.load(),
        _ => <&mut CgroupSockAddr>::try_from(program)?.load(),
    };
    loaded.map_err(|e| {
        anyhow!(
            "the kernel refused program {} ({}; an older kernel lacks it): {e:#}",
            hook.program,
            hook.feature
        )
    })
}

/// Attaches `hook` to a cgroup or a network namespace (`target`, named by `target_path`).
fn attach(
    ebpf: &mut Ebpf,
    hook: &Hook,
    target: std::os::fd::BorrowedFd<'_>,
    target_path: &Path,
) -> Result<OwnedFd> {
    let program = ebpf
        .program(hook.program)
        .ok_or_else(|| anyhow!("program {} missing from the BPF object", hook.program))?;
    let prog_fd = program.fd()?;
    sys::link_create(prog_fd.as_fd(), target, hook.attach_type as u32).with_context(|| {
        format!(
            "cannot attach {} to {} (needs bpf_link, Linux 5.7+, and {})",
            hook.program,
            target_path.display(),
            hook.feature
        )
    })
}

/// Loads the shortcut's verdict program and attaches it to the (pinned) socket hash, before
/// the configuration turns the shortcut on: sockets entering the hash take the program the
/// hash has at that moment.
fn attach_shortcut(ebpf: &mut Ebpf) -> Result<()> {
    load_program(ebpf, SHORTCUT_HOOK)?;
    let prog_fd = ebpf
        .program(SHORTCUT_HOOK.program)
        .ok_or_else(|| anyhow!("program {} missing", SHORTCUT_HOOK.program))?
        .fd()?
        .try_clone()?;
    let aya::maps::Map::SockHash(sockets) = map(ebpf, map_names::SHORTCUT_SOCKETS)? else {
        bail!("map {} is not a sockhash", map_names::SHORTCUT_SOCKETS);
    };
    sys::prog_attach(
        prog_fd.as_fd(),
        sockets.fd().as_fd(),
        SHORTCUT_HOOK.attach_type as u32,
    )
    .context("cannot attach the sockmap shortcut's sk_msg program to its socket hash")
}

/// Pins every new link under a temporary name, then renames each over the live one. The
/// old link, losing its last reference, detaches; stale links of an older layout go too.
fn swap_in_links(pin_dir: &Path, links: Vec<(String, OwnedFd)>) -> Result<()> {
    let mut staged = Vec::new();
    for (name, fd) in &links {
        // bpffs refuses names with a dot, hence a prefix rather than a ".new" suffix.
        let staging = pin_dir.join(format!("staging_{name}"));
        let _ = std::fs::remove_file(&staging);
        if let Err(e) = sys::obj_pin(fd.as_fd(), &staging) {
            for path in &staged {
                let _ = std::fs::remove_file(path);
            }
            return Err(e).with_context(|| format!("cannot pin link at {}", staging.display()));
        }
        staged.push(staging);
    }
    let keep: BTreeSet<String> = links.iter().map(|(name, _)| name.clone()).collect();
    for (staging, (name, _)) in staged.iter().zip(&links) {
        std::fs::rename(staging, pin_dir.join(name))
            .with_context(|| format!("cannot move link pin into place as {name}"))?;
    }
    for entry in std::fs::read_dir(pin_dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("link_") && !keep.contains(&name) {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove stale link pin {name}"))?;
        }
    }
    Ok(())
}

/// Writes the settings into the (possibly reused) configuration maps.
fn configure(ebpf: &mut Ebpf, settings: &CaptureSettings, sockmap_shortcut: bool) -> Result<()> {
    let config = CaptureConfig {
        outbound_port: settings.outbound_port as u32,
        proxy_uid: settings.proxy_uid.unwrap_or(NO_ID),
        proxy_gid: settings.proxy_gid.unwrap_or(NO_ID),
        // 0: no inbound listener is registered (inbound capture off).
        inbound_port: settings.inbound_port.map_or(0, u32::from),
        flags: if sockmap_shortcut {
            CaptureConfig::SOCKMAP_SHORTCUT
        } else {
            0
        },
    };
    let mut config_map: Array<&mut MapData, CaptureConfig> =
        Array::try_from(map(ebpf, map_names::CONFIG)?)?;
    config_map.set(0, config, 0)?;

    let mut ports: Array<&mut MapData, u64> =
        Array::try_from(map(ebpf, map_names::EXCLUDED_PORTS)?)?;
    for (index, word) in settings.excluded_ports.to_bitmap().into_iter().enumerate() {
        ports.set(index as u32, word, 0)?;
    }

    let mut inbound: Array<&mut MapData, u64> =
        Array::try_from(map(ebpf, map_names::EXCLUDED_INBOUND_PORTS)?)?;
    for (index, word) in settings
        .inbound_exclusions()
        .to_bitmap()
        .into_iter()
        .enumerate()
    {
        inbound.set(index as u32, word, 0)?;
    }

    let v4: Vec<Key<[u8; 4]>> = settings
        .excluded_cidrs
        .iter()
        .filter_map(|net| match net {
            IpNet::V4(net) => Some(Key::new(net.prefix_len() as u32, net.network().octets())),
            IpNet::V6(_) => None,
        })
        .collect();
    let v6: Vec<Key<[u8; 16]>> = settings
        .excluded_cidrs
        .iter()
        .filter_map(|net| match net {
            IpNet::V6(net) => Some(Key::new(net.prefix_len() as u32, net.network().octets())),
            IpNet::V4(_) => None,
        })
        .collect();
    replace_trie(ebpf, map_names::EXCLUDED_CIDR4, &v4)?;
    replace_trie(ebpf, map_names::EXCLUDED_CIDR6, &v6)?;
    Ok(())
}

/// Makes the trie hold exactly `keys`: new ones are inserted before stale ones are removed,
/// so an address excluded before and after is never briefly captured.
fn replace_trie<const N: usize>(ebpf: &mut Ebpf, name: &str, keys: &[Key<[u8; N]>]) -> Result<()> {
    let mut trie: LpmTrie<&mut MapData, [u8; N], u8> = LpmTrie::try_from(map(ebpf, name)?)?;
    for key in keys {
        trie.insert(key, 1, 0)
            .with_context(|| format!("cannot write {name}"))?;
    }
    let wanted: BTreeSet<(u32, [u8; N])> =
        keys.iter().map(|k| (k.prefix_len(), k.data())).collect();
    let stale: Vec<Key<[u8; N]>> = trie
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
        .collect();
    for key in stale {
        trie.remove(&key)?;
    }
    Ok(())
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the BPF object"))
}

/// Removes every pin in `pin_dir` (detaching the links) and the directory. Returns the
/// names removed; a missing directory is not an error.
pub fn remove_pins(pin_dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", pin_dir.display())),
    };
    // Links first, so nothing runs against half-removed maps.
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
    });
    for path in paths {
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot remove pin {}", path.display()))?;
        removed.push(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
    std::fs::remove_dir(pin_dir).with_context(|| format!("cannot remove {}", pin_dir.display()))?;
    Ok(removed)
}

/// Sums the per-CPU counters pinned in `pin_dir`.
pub fn read_counters(pin_dir: &Path) -> Result<Vec<(Counter, u64)>> {
    let data = MapData::from_pin(map_pin_path(pin_dir, map_names::COUNTERS))?;
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
    Counter::ALL
        .iter()
        .map(|&counter| {
            let per_cpu = counters.get(&(counter as u32), 0)?;
            Ok((counter, per_cpu.iter().sum()))
        })
        .collect()
}

/// How many redirected connections the original-destination index holds right now (each
/// entry goes when its app socket closes).
pub fn read_tracked_connections(pin_dir: &Path) -> Result<usize> {
    let data = MapData::from_pin(map_pin_path(pin_dir, map_names::ORIG_DST_BY_PEER))?;
    let index: aya::maps::HashMap<MapData, sidecar_common::Endpoint, sidecar_common::Endpoint> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?;
    Ok(index.keys().filter(|key| key.is_ok()).count())
}

/// Reads back the configuration pinned in `pin_dir`.
pub fn read_config(pin_dir: &Path) -> Result<CaptureConfig> {
    let data = MapData::from_pin(map_pin_path(pin_dir, map_names::CONFIG))?;
    let config: Array<MapData, CaptureConfig> = Array::try_from(aya::maps::Map::Array(data))?;
    Ok(config.get(&0, 0)?)
}

/// Reads back an excluded-port bitmap (`map_names::EXCLUDED_PORTS` or
/// `EXCLUDED_INBOUND_PORTS`) pinned in `pin_dir`.
pub fn read_port_bitmap(pin_dir: &Path, map: &str) -> Result<Vec<u64>> {
    let data = MapData::from_pin(map_pin_path(pin_dir, map))?;
    let ports: Array<MapData, u64> = Array::try_from(aya::maps::Map::Array(data))?;
    Ok(ports.iter().collect::<Result<_, _>>()?)
}

/// Reads back the excluded CIDRs pinned in `pin_dir`.
pub fn read_excluded_cidrs(pin_dir: &Path) -> Result<Vec<IpNet>> {
    let mut out = Vec::new();
    let data = MapData::from_pin(map_pin_path(pin_dir, map_names::EXCLUDED_CIDR4))?;
    let v4: LpmTrie<MapData, [u8; 4], u8> = LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?;
    for key in v4.keys().flatten() {
        out.push(IpNet::new(
            IpAddr::from(key.data()),
            key.prefix_len() as u8,
        )?);
    }
    let data = MapData::from_pin(map_pin_path(pin_dir, map_names::EXCLUDED_CIDR6))?;
    let v6: LpmTrie<MapData, [u8; 16], u8> = LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?;
    for key in v6.keys().flatten() {
        out.push(IpNet::new(
            IpAddr::from(key.data()),
            key.prefix_len() as u8,
        )?);
    }
    Ok(out)
}
