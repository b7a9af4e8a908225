//! Kernel memory held by each capture, as the kernel accounts it: the `memlock` figure of every
//! program and map (what `bpftool prog/map show` print as `memlock`). Maps shared by the whole
//! node (the log ring) are not charged to any pod.
use std::{
    collections::{BTreeSet, HashMap},
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use anyhow::{Context, Result};
use aya::maps::MapInfo;
use sidecar_common::PinLayout;

/// Every loaded program's memlock and maps, read once for all captures.
pub struct KernelMemory {
    programs: Vec<(u64, Vec<u32>)>,
    shared_maps: BTreeSet<u32>,
}

impl KernelMemory {
    /// `node_dir` holds the node-wide maps (excluded from every pod's figure).
    pub fn scan(node_dir: &Path) -> Result<KernelMemory> {
        let mut programs = Vec::new();
        for program in aya::programs::loaded_programs().flatten() {
            let memlock = program.memory_locked().unwrap_or(0) as u64;
            let maps = program.map_ids().ok().flatten().unwrap_or_default();
            programs.push((memlock, maps));
        }
        Ok(KernelMemory {
            programs,
            shared_maps: pinned_map_ids(node_dir).into_iter().collect(),
        })
    }

    /// Bytes held by the capture pinned in `pin_dir`: its maps, and every program using them
    /// (each capture loads its own programs, so a program using its maps is its own).
    pub fn of_capture(&self, pin_dir: &Path) -> Result<u64> {
        let own: BTreeSet<u32> = pinned_map_ids(pin_dir).into_iter().collect();
        let mut maps = own.clone();
        let mut total = 0;
        for (memlock, program_maps) in &self.programs {
            if program_maps.iter().any(|id| own.contains(id)) {
                total += memlock;
                maps.extend(program_maps.iter().copied());
            }
        }
        for id in maps.difference(&self.shared_maps) {
            total += map_memlock(*id)?;
        }
        Ok(total)
    }

    /// Bytes held by the node-wide maps pinned in `node_dir` (the log ring).
    pub fn of_node_state(&self, node_dir: &Path) -> Result<u64> {
        pinned_map_ids(node_dir).into_iter().map(map_memlock).sum()
    }
}

fn pinned_map_ids(dir: &Path) -> Vec<u32> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| PinLayout::is_map_pin(&e.file_name().to_string_lossy()))
                .filter_map(|e| MapInfo::from_pin(e.path()).ok().map(|info| info.id()))
                .collect()
        })
        .unwrap_or_default()
}

/// A map's `memlock` line in its fdinfo (the kernel's own accounting of the map).
fn map_memlock(id: u32) -> Result<u64> {
    let fd = MapInfo::from_id(id)
        .and_then(|info| info.fd())
        .with_context(|| format!("cannot open map {id}"))?;
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))?;
    let fields: HashMap<&str, &str> = fdinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim(), value.trim()))
        .collect();
    fields
        .get("memlock")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no memlock in the fdinfo of map {id}"))
}
