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

/// Fails naming every required feature `has` reports missing.
pub fn check_features(inbound: bool, has: impl Fn(Feature) -> bool) -> Result<()> {
    let inbound_features = if inbound { REQUIRED_FOR_INBOUND } else { &[] };
    let missing: Vec<&str> = REQUIRED
        .iter()
        .chain(inbound_features)
        .filter(|(feature, _)| !has(*feature))
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        bail!("unsupported kernel: it lacks {}", missing.join("; "));
    }
    Ok(())
}

/// Probes the running kernel for everything the eBPF capture needs.
pub fn require_ebpf_capture_support(inbound: bool) -> Result<()> {
    check_features(inbound, kernel_has)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_missing_feature() {
        let err = check_features(true, |f| {
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
        assert!(check_features(true, |_| true).is_ok());
        let no_sk_lookup = |f| !matches!(f, Feature::Program(ProgramType::SkLookup));
        assert!(
            check_features(false, no_sk_lookup).is_ok(),
            "outbound-only needs no sk_lookup"
        );
        let err = check_features(true, no_sk_lookup).unwrap_err().to_string();
        assert!(
            err.contains("sk_lookup programs (inbound capture, Linux 5.9+)"),
            "{err}"
        );
    }
}
