//! Kernel feature probes, so an unsupported kernel gets an error naming what it lacks.
use anyhow::{Result, bail};
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};

/// A kernel feature the eBPF capture needs.
#[derive(Clone, Copy, Debug)]
pub enum Feature {
    Program(ProgramType),
    Map(MapType),
    KernelBtf,
}

/// Everything checked before loading, with the name an error message uses.
pub const REQUIRED: &[(Feature, &str)] = &[
    (
        Feature::Program(ProgramType::CgroupSockAddr),
        "cgroup sock_addr programs (connect4/6, Linux 4.17+)",
    ),
    (
        Feature::Program(ProgramType::CgroupSockopt),
        "cgroup sockopt programs (getsockopt, Linux 5.3+)",
    ),
    (
        Feature::Program(ProgramType::SockOps),
        "sock_ops programs (Linux 4.13+)",
    ),
    (
        Feature::Program(ProgramType::CgroupSock),
        "cgroup sock programs (post_bind4/6, the proxy ports' guard, Linux 4.17+)",
    ),
    (
        Feature::Map(MapType::SkStorage),
        "socket storage maps (BPF_MAP_TYPE_SK_STORAGE, Linux 5.2+)",
    ),
    (
        Feature::Map(MapType::LpmTrie),
        "LPM trie maps (Linux 4.11+)",
    ),
    (
        Feature::Map(MapType::PerCpuArray),
        "per-CPU array maps (Linux 4.6+)",
    ),
    (
        Feature::KernelBtf,
        "kernel BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF)",
    ),
];

/// Asks the running kernel whether it has `feature`.
fn kernel_has(feature: Feature) -> bool {
    match feature {
        Feature::Program(program) => is_program_supported(program).unwrap_or(false),
        Feature::Map(map) => is_map_supported(map).unwrap_or(false),
        Feature::KernelBtf => std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
    }
}

/// What inbound capture needs on top of `REQUIRED`.
pub const REQUIRED_FOR_INBOUND: &[(Feature, &str)] = &[
    (
        Feature::Program(ProgramType::SkLookup),
        "sk_lookup programs (inbound capture, Linux 5.9+)",
    ),
    (Feature::Map(MapType::SockMap), "sockmap maps (Linux 4.14+)"),
];

/// What the sockmap shortcut (`init --sockmap`) needs on top of `REQUIRED`.
pub const REQUIRED_FOR_SOCKMAP: &[(Feature, &str)] = &[
    (
        Feature::Program(ProgramType::SkMsg),
        "sk_msg programs (the sockmap shortcut, Linux 4.17+)",
    ),
    (
        Feature::Map(MapType::SockHash),
        "sockhash maps (the sockmap shortcut, Linux 4.18+)",
    ),
];

/// The optional parts of the eBPF capture that were asked for.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub inbound: bool,
    pub sockmap: bool,
}

/// Fails naming every required feature `has` reports missing.
pub fn check_features(options: Options, has: impl Fn(Feature) -> bool) -> Result<()> {
    let inbound_features = if options.inbound {
        REQUIRED_FOR_INBOUND
    } else {
        &[]
    };
    let sockmap_features = if options.sockmap {
        REQUIRED_FOR_SOCKMAP
    } else {
        &[]
    };
    let missing: Vec<&str> = REQUIRED
        .iter()
        .chain(inbound_features)
        .chain(sockmap_features)
        .filter(|(feature, _)| !has(*feature))
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        bail!("unsupported kernel: it lacks {}", missing.join("; "));
    }
    Ok(())
}

/// Probes the running kernel for everything the eBPF capture needs.
pub fn require_ebpf_capture_support(options: Options) -> Result<()> {
    check_features(options, kernel_has)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_missing_feature() {
        let all = Options {
            inbound: true,
            sockmap: true,
        };
        let err = check_features(all, |f| {
            !matches!(
                f,
                Feature::Map(MapType::SkStorage) | Feature::Program(ProgramType::CgroupSockopt)
            )
        })
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("unsupported kernel"), "{err}");
        assert!(err.contains("BPF_MAP_TYPE_SK_STORAGE"), "{err}");
        assert!(err.contains("getsockopt, Linux 5.3+"), "{err}");
        assert!(!err.contains("LPM"), "{err}");
    }

    #[test]
    fn a_complete_kernel_passes() {
        let inbound = Options {
            inbound: true,
            sockmap: false,
        };
        assert!(check_features(inbound, |_| true).is_ok());
        let no_sk_lookup = |f| !matches!(f, Feature::Program(ProgramType::SkLookup));
        assert!(
            check_features(Options::default(), no_sk_lookup).is_ok(),
            "outbound-only needs no sk_lookup"
        );
        let err = check_features(inbound, no_sk_lookup)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sk_lookup programs (inbound capture, Linux 5.9+)"),
            "{err}"
        );
    }

    #[test]
    fn the_sockmap_shortcut_is_probed_only_when_asked_for() {
        let no_sk_msg = |f| !matches!(f, Feature::Program(ProgramType::SkMsg));
        assert!(check_features(Options::default(), no_sk_msg).is_ok());
        let sockmap = Options {
            inbound: false,
            sockmap: true,
        };
        let err = check_features(sockmap, no_sk_msg).unwrap_err().to_string();
        assert!(
            err.contains("sk_msg programs (the sockmap shortcut"),
            "{err}"
        );
    }
}
