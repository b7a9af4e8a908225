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
    programs::{CgroupSock, CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SockOps},
};
use aya_obj::generated::bpf_attach_type::{
    self, BPF_CGROUP_GETSOCKOPT, BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET4_GETPEERNAME,
    BPF_CGROUP_INET4_POST_BIND, BPF_CGROUP_INET6_CONNECT, BPF_CGROUP_INET6_GETPEERNAME,
    BPF_CGROUP_INET6_POST_BIND, BPF_CGROUP_SOCK_OPS, BPF_SK_LOOKUP, BPF_SK_MSG_VERDICT,
};
use ipnet::IpNet;
use sidecar_common::{AttachPoint, CaptureConfig, Counter, Endpoint, NO_ID, PinLayout, map_names};

use crate::{
    capture_settings::{CaptureSettings, PortRanges, WhenProxyDown},
    cgroup::Cgroup,
    sys,
};

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
    // Not on a proxy's sibling cgroup: the proxy there may bind its ports whatever its UID.
    Hook {
        program: "guard_proxy_ports4",
        attach_type: BPF_CGROUP_INET4_POST_BIND,
        feature: "cgroup/post_bind4 (Linux 4.17+)",
    },
    Hook {
        program: "guard_proxy_ports6",
        attach_type: BPF_CGROUP_INET6_POST_BIND,
        feature: "cgroup/post_bind6 (Linux 4.17+)",
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

/// Maps that are pinned (and reused by a later init, so live connections keep their state).
const PINNED_MAPS: &[&str] = &[
    map_names::CONFIG,
    map_names::COUNTERS,
    map_names::EXCLUDED_PORTS,
    map_names::EXCLUDED_INBOUND_PORTS,
    map_names::INBOUND_LISTENERS,
    map_names::EXCLUDED_CIDR4,
    map_names::EXCLUDED_CIDR6,
    map_names::ORIG_DST,
    map_names::ORIG_DST_HANDOFF,
    map_names::ACCEPTED_ORIG_DST,
    // Reused, never replaced once it holds sockets: freeing the socket hash would drop the
    // bytes still queued on them.
    map_names::SHORTCUT_SOCKETS,
    map_names::SHORTCUT_FALLBACK,
];

/// Where and how the eBPF capture attaches.
#[derive(Clone, Copy)]
pub struct EbpfTarget<'a> {
    /// The pod's cgroup: every hook attaches here.
    pub cgroup: &'a Cgroup,
    /// A proxy in a sibling cgroup gets the SO_ORIGINAL_DST answer there too.
    pub proxy_cgroup: Option<&'a Cgroup>,
    /// Connections the sockmap shortcut holds at once (with `sockmap_shortcut`).
    pub shortcut_connections: u32,
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
        shortcut_connections,
        netns,
        sockmap_shortcut,
    } = *target;
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("cannot create pin directory {}", pin_dir.display()))?;
    let shortcut_capacity = if sockmap_shortcut {
        shortcut_connections.saturating_mul(2)
    } else {
        1 // created (the programs reference it) but never used
    };
    drop_incompatible_pins(pin_dir, shortcut_capacity)?;
    let mut ebpf = load(pin_dir, shortcut_capacity)?;
    if sockmap_shortcut {
        attach_shortcut(&mut ebpf)?;
    }

    let mut links: Vec<(String, OwnedFd)> = Vec::new();
    let cgroup_fd = cgroup.open()?;
    for hook in POD_HOOKS {
        let link = attach(&mut ebpf, hook, cgroup_fd.as_fd(), &cgroup.path)?;
        links.push((
            PinLayout::link_pin_name(hook.program, AttachPoint::PodCgroup),
            link,
        ));
    }
    if let Some(proxy) = proxy_cgroup {
        let proxy_fd = proxy.open()?;
        for hook in PROXY_HOOKS {
            let link = attach(&mut ebpf, hook, proxy_fd.as_fd(), &proxy.path)?;
            links.push((
                PinLayout::link_pin_name(hook.program, AttachPoint::ProxyCgroup),
                link,
            ));
        }
    }
    if let Some((netns_file, netns_path)) = netns {
        let link = attach(&mut ebpf, NETNS_HOOK, netns_file.as_fd(), netns_path)?;
        links.push((
            PinLayout::link_pin_name(NETNS_HOOK.program, AttachPoint::Netns),
            link,
        ));
    }
    swap_in_links(pin_dir, links)?;
    // Last: until here a failure leaves the previous configuration in force (a re-init's new
    // programs read the same maps), and a first install's programs do nothing until their
    // configuration exists (outbound port 0 means "not configured": connects go direct).
    configure(&mut ebpf, settings, sockmap_shortcut)
}

fn load(pin_dir: &Path, shortcut_capacity: u32) -> Result<Ebpf> {
    let paths: Vec<(&str, PathBuf)> = PINNED_MAPS
        .iter()
        .map(|name| (*name, PinLayout::map_pin(pin_dir, name)))
        .collect();
    let mut loader = EbpfLoader::new();
    // Applies when the hash is created: a reused pinned hash keeps its capacity (see
    // drop_incompatible_pins).
    loader.map_max_entries(map_names::SHORTCUT_SOCKETS, shortcut_capacity);
    // One log ring per node, shared by every capture: a ring per pod would cost more kernel
    // memory than all its other maps together.
    let layout = PinLayout::of_capture_dir(pin_dir)
        .ok_or_else(|| anyhow!("{} is not a capture's pin directory", pin_dir.display()))?;
    let node_dir = layout.node_dir();
    std::fs::create_dir_all(&node_dir)
        .with_context(|| format!("cannot create {}", node_dir.display()))?;
    let ring = layout.kernel_log_ring();
    loader.map_pin_path(map_names::KERNEL_LOGS, ring.as_path());
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

/// Unpins maps a new load must not reuse, so it creates them afresh: a map of an older layout
/// (another type or key/value size than this build's object, or fewer entries: the counters
/// of an older build lack the newer reasons), and the shortcut's socket hash when it is too
/// small for the capacity asked (it was created for the shortcut off, so it holds no socket).
/// Maps this build no longer has go too. Programs still attached keep the maps they have until
/// they are replaced.
fn drop_incompatible_pins(pin_dir: &Path, shortcut_capacity: u32) -> Result<()> {
    let object = aya_obj::Object::parse(BPF_OBJECT)
        .map_err(|e| anyhow!("cannot parse the BPF object: {e}"))?;
    let ours: BTreeSet<String> = PINNED_MAPS
        .iter()
        .map(|name| PinLayout::map_pin_name(name))
        .collect();
    for entry in std::fs::read_dir(pin_dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if PinLayout::is_map_pin(&name) && !ours.contains(&name) {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove the stale pin {name}"))?;
        }
    }
    for name in PINNED_MAPS {
        let path = PinLayout::map_pin(pin_dir, name);
        let Ok(pinned) = aya::maps::MapInfo::from_pin(&path) else {
            continue;
        };
        let wanted = object
            .maps
            .get(*name)
            .ok_or_else(|| anyhow!("map {name} missing from the BPF object"))?;
        let same_layout = pinned.key_size() == wanted.key_size()
            && pinned.value_size() == wanted.value_size()
            && pinned.map_type().ok().map(|t| t as u32) == Some(wanted.map_type());
        let capacity = if *name == map_names::SHORTCUT_SOCKETS {
            shortcut_capacity
        } else {
            wanted.max_entries()
        };
        let too_small = pinned.max_entries() < capacity;
        if !same_layout || too_small {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot replace the pinned map {}", path.display()))?;
        }
    }
    Ok(())
}

fn load_program(ebpf: &mut Ebpf, hook: &Hook) -> Result<()> {
    let program = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| anyhow!("program {} missing from the BPF object", hook.program))?;
    let loaded = match hook.attach_type {
        BPF_CGROUP_SOCK_OPS => <&mut SockOps>::try_from(program)?.load(),
        BPF_CGROUP_GETSOCKOPT => <&mut CgroupSockopt>::try_from(program)?.load(),
        BPF_CGROUP_INET4_POST_BIND | BPF_CGROUP_INET6_POST_BIND => {
            <&mut CgroupSock>::try_from(program)?.load()
        }
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
        let staging = PinLayout::staging_pin(pin_dir, name);
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
        if PinLayout::is_link_pin(&name) && !keep.contains(&name) {
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
        flags: flag(sockmap_shortcut, CaptureConfig::SOCKMAP_SHORTCUT)
            | flag(
                settings.when_proxy_down == WhenProxyDown::Direct,
                CaptureConfig::DIRECT_WHEN_PROXY_DOWN,
            ),
    };
    // Within the tries' capacities: `CaptureSettings::check_ebpf_capacities` ran before.
    let port_keys = |ranges: &PortRanges| -> Vec<Key<[u8; 2]>> {
        ranges
            .to_prefixes()
            .into_iter()
            .map(|(len, first)| Key::new(len, first.to_be_bytes()))
            .collect()
    };
    replace_trie(
        ebpf,
        map_names::EXCLUDED_PORTS,
        &port_keys(&settings.excluded_ports),
    )?;
    replace_trie(
        ebpf,
        map_names::EXCLUDED_INBOUND_PORTS,
        &port_keys(&settings.inbound_exclusions()),
    )?;

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
    // The one-value configuration last, in a single update: it is what switches behaviour.
    let mut config_map: Array<&mut MapData, CaptureConfig> =
        Array::try_from(map(ebpf, map_names::CONFIG)?)?;
    config_map.set(0, config, 0)?;
    Ok(())
}

fn flag(on: bool, bit: u32) -> u32 {
    if on { bit } else { 0 }
}

/// Makes the trie hold exactly `keys`: new ones are inserted before stale ones are removed,
/// so an address excluded before and after is never briefly captured. If an insert fails,
/// the ones it added are taken out again: the trie is left as it was.
fn replace_trie<const N: usize>(ebpf: &mut Ebpf, name: &str, keys: &[Key<[u8; N]>]) -> Result<()> {
    let mut trie: LpmTrie<&mut MapData, [u8; N], u8> = LpmTrie::try_from(map(ebpf, name)?)?;
    let before: BTreeSet<(u32, [u8; N])> = trie
        .keys()
        .filter_map(|k| k.ok())
        .map(|k| (k.prefix_len(), k.data()))
        .collect();
    let mut added = Vec::new();
    for key in keys {
        if let Err(error) = trie.insert(key, 1, 0) {
            for key in &added {
                let _ = trie.remove(key);
            }
            return Err(error).with_context(|| format!("cannot write {name}"));
        }
        if !before.contains(&(key.prefix_len(), key.data())) {
            added.push(Key::new(key.prefix_len(), key.data()));
        }
    }
    let wanted: BTreeSet<(u32, [u8; N])> =
        keys.iter().map(|k| (k.prefix_len(), k.data())).collect();
    let stale: Vec<Key<[u8; N]>> = before
        .iter()
        .filter(|k| !wanted.contains(k))
        .map(|&(len, data)| Key::new(len, data))
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
            .is_some_and(|n| PinLayout::is_link_pin(&n.to_string_lossy()))
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

/// Sums the per-CPU counters pinned in `pin_dir`. A capture installed by an older build has
/// fewer counters: the ones it lacks are left out.
pub fn read_counters(pin_dir: &Path) -> Result<Vec<(Counter, u64)>> {
    let counters = open_counters(pin_dir)?;
    let present = counters.len();
    Counter::ALL
        .iter()
        .filter(|&&counter| (counter as u32) < present)
        .map(|&counter| Ok((counter, sum_counter(&counters, counter)?)))
        .collect()
}

/// One counter of the capture in `pin_dir`, summed over CPUs (0 when its layout lacks it).
pub fn read_counter(pin_dir: &Path, counter: Counter) -> Result<u64> {
    let counters = open_counters(pin_dir)?;
    if counter as u32 >= counters.len() {
        return Ok(0);
    }
    sum_counter(&counters, counter)
}

fn open_counters(pin_dir: &Path) -> Result<PerCpuArray<MapData, u64>> {
    let data = MapData::from_pin(PinLayout::map_pin(pin_dir, map_names::COUNTERS))?;
    Ok(PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?)
}

fn sum_counter(counters: &PerCpuArray<MapData, u64>, counter: Counter) -> Result<u64> {
    Ok(counters.get(&(counter as u32), 0)?.iter().sum())
}

/// How many original destinations wait for the proxy's end of their handshake right now: 0
/// whenever no connect is in flight (each entry moves to the proxy's socket at once).
pub fn read_pending_handoffs(pin_dir: &Path) -> Result<usize> {
    let data = MapData::from_pin(PinLayout::map_pin(pin_dir, map_names::ORIG_DST_HANDOFF))?;
    let handoffs: LpmTrie<MapData, Endpoint, Endpoint> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?;
    Ok(handoffs.keys().filter(|key| key.is_ok()).count())
}

/// Reads back the configuration pinned in `pin_dir`.
pub fn read_config(pin_dir: &Path) -> Result<CaptureConfig> {
    let data = MapData::from_pin(PinLayout::map_pin(pin_dir, map_names::CONFIG))?;
    let config: Array<MapData, CaptureConfig> = Array::try_from(aya::maps::Map::Array(data))?;
    Ok(config.get(&0, 0)?)
}

/// Reads back an excluded-port set (`map_names::EXCLUDED_PORTS` or `EXCLUDED_INBOUND_PORTS`)
/// pinned in `pin_dir`.
pub fn read_port_ranges(pin_dir: &Path, map: &str) -> Result<PortRanges> {
    let data = MapData::from_pin(PinLayout::map_pin(pin_dir, map))?;
    let ports: LpmTrie<MapData, [u8; 2], u8> = LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?;
    let prefixes: Vec<(u32, u16)> = ports
        .keys()
        .flatten()
        .map(|key| (key.prefix_len(), u16::from_be_bytes(key.data())))
        .collect();
    Ok(PortRanges::from_prefixes(&prefixes))
}

/// Reads back the excluded CIDRs pinned in `pin_dir`.
pub fn read_excluded_cidrs(pin_dir: &Path) -> Result<Vec<IpNet>> {
    let mut out = Vec::new();
    let data = MapData::from_pin(PinLayout::map_pin(pin_dir, map_names::EXCLUDED_CIDR4))?;
    let v4: LpmTrie<MapData, [u8; 4], u8> = LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?;
    for key in v4.keys().flatten() {
        out.push(IpNet::new(
            IpAddr::from(key.data()),
            key.prefix_len() as u8,
        )?);
    }
    let data = MapData::from_pin(PinLayout::map_pin(pin_dir, map_names::EXCLUDED_CIDR6))?;
    let v6: LpmTrie<MapData, [u8; 16], u8> = LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?;
    for key in v6.keys().flatten() {
        out.push(IpNet::new(
            IpAddr::from(key.data()),
            key.prefix_len() as u8,
        )?);
    }
    Ok(out)
}
