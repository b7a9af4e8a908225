//! Kernel feature probes, so an unsupported kernel gets an error naming what it lacks.
use anyhow::{Result, bail};
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};

/// Checks every program and map type the eBPF capture needs, naming each one missing.
pub fn require_ebpf_capture_support() -> Result<()> {
    let programs = [
        (ProgramType::CgroupSockAddr, "cgroup sock_addr programs (connect4/6, Linux 4.17+)"),
        (ProgramType::CgroupSockopt, "cgroup sockopt programs (getsockopt, Linux 5.3+)"),
        (ProgramType::SockOps, "sock_ops programs (Linux 4.13+)"),
    ];
    let maps = [
        (MapType::SkStorage, "socket storage maps (BPF_MAP_TYPE_SK_STORAGE, Linux 5.2+)"),
        (MapType::LpmTrie, "LPM trie maps (Linux 4.11+)"),
        (MapType::PerCpuArray, "per-CPU array maps (Linux 4.6+)"),
    ];
    let mut missing = Vec::new();
    for (program, what) in programs {
        if !is_program_supported(program).unwrap_or(false) {
            missing.push(what);
        }
    }
    for (map, what) in maps {
        if !is_map_supported(map).unwrap_or(false) {
            missing.push(what);
        }
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push("kernel BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF)");
    }
    if !missing.is_empty() {
        bail!("unsupported kernel: it lacks {}", missing.join("; "));
    }
    Ok(())
}
