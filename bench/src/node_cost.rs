//! What a captured pod costs the node in kernel memory at idle, eBPF against iptables, measured
//! the same way for both: the kernel's own allocations (`Slab`, `VmallocUsed` and `Percpu` in
//! /proc/meminfo, where BPF maps and programs, netfilter rules and namespaces all live) over
//! pods that have their network namespace and cgroup already, before and after capturing
//! them. For eBPF, the BPF `memlock` figure too (what `sidecar status` reports), and for
//! iptables the size of a conntrack entry, which every captured connection holds.
use std::{path::Path, process::Command, thread, time::Duration};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};
use sidecar_tests::{Lab, Pod, bpf_memory::settled_bpf_memlock};

/// Pods per measurement: enough to average out the allocators' noise.
const PODS: usize = 20;

#[derive(Clone, Serialize, Deserialize)]
pub struct NodeCost {
    pub pods: usize,
    /// Kernel allocations per pod (bytes) that capture added: eBPF.
    pub ebpf_kernel_bytes_per_pod: i64,
    /// The same for iptables.
    pub iptables_kernel_bytes_per_pod: i64,
    /// eBPF: BPF memlock per pod, programs and maps (the node-wide log ring excluded).
    pub ebpf_memlock_bytes_per_pod: u64,
    /// iptables: bytes of one conntrack entry (`nf_conntrack` in /proc/slabinfo); every
    /// captured connection holds one while it lives, and for two minutes after it closes.
    pub conntrack_entry_bytes: Option<u64>,
}

/// Runs the pass: one lab of pods per mode, nothing else running.
pub fn measure(sidecar: &Path) -> Result<NodeCost> {
    // The first eBPF capture of the node creates the node-wide log ring: not a pod's cost.
    let warmup = Lab::new("bench-cost-warmup")?;
    let pod = warmup.add_pod("warm")?;
    init_ebpf(sidecar, &pod)?;
    let ebpf = per_pod(sidecar, "ebpf", |pod| init_ebpf(sidecar, pod))?;
    let iptables = per_pod(sidecar, "iptables", |pod| init_iptables(sidecar, pod))?;
    cleanup(sidecar, &pod)?;
    warmup.teardown()?;
    Ok(NodeCost {
        pods: PODS,
        ebpf_kernel_bytes_per_pod: ebpf.0,
        iptables_kernel_bytes_per_pod: iptables.0,
        ebpf_memlock_bytes_per_pod: ebpf.1,
        conntrack_entry_bytes: slab_object_size("nf_conntrack"),
    })
}

/// (kernel allocation bytes, BPF memlock bytes) per pod that `capture` adds.
fn per_pod(sidecar: &Path, mode: &str, capture: impl Fn(&Pod) -> Result<()>) -> Result<(i64, u64)> {
    let lab = Lab::new(&format!("bench-cost-{mode}"))?;
    let pods: Vec<Pod> = (0..PODS)
        .map(|i| lab.add_pod(&format!("p{i}")))
        .collect::<Result<_>>()?;
    let (kernel_before, memlock_before) = (settled_kernel_bytes()?, settled_bpf_memlock()?);
    for pod in &pods {
        capture(pod)?;
    }
    let (kernel_after, memlock_after) = (settled_kernel_bytes()?, settled_bpf_memlock()?);
    if mode == "ebpf" {
        for pod in &pods {
            cleanup(sidecar, pod)?;
        }
    }
    lab.teardown()?;
    Ok((
        (kernel_after - kernel_before) / PODS as i64,
        memlock_after.saturating_sub(memlock_before) / PODS as u64,
    ))
}

fn init_ebpf(sidecar: &Path, pod: &Pod) -> Result<()> {
    let out = Command::new(sidecar)
        .arg("init")
        .arg("--cgroup")
        .arg(pod.cgroup())
        .arg("--netns")
        .arg(pod.netns_path())
        .output()?;
    ensure!(out.status.success(), "sidecar init: {out:?}");
    Ok(())
}

fn init_iptables(sidecar: &Path, pod: &Pod) -> Result<()> {
    pod.command(sidecar)
        .args(["init", "--mode", "iptables"])
        .run_success()?;
    Ok(())
}

fn cleanup(sidecar: &Path, pod: &Pod) -> Result<()> {
    let out = Command::new(sidecar)
        .arg("cleanup")
        .arg("--cgroup")
        .arg(pod.cgroup())
        .output()?;
    ensure!(out.status.success(), "sidecar cleanup: {out:?}");
    Ok(())
}

/// `Slab + VmallocUsed + Percpu`, read after the kernel's deferred frees have run (RCU,
/// workqueues): the median of a few reads a moment apart.
fn settled_kernel_bytes() -> Result<i64> {
    thread::sleep(Duration::from_secs(1));
    let mut reads = Vec::new();
    for _ in 0..5 {
        reads.push(kernel_bytes()?);
        thread::sleep(Duration::from_millis(200));
    }
    reads.sort_unstable();
    Ok(reads[reads.len() / 2])
}

fn kernel_bytes() -> Result<i64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let field = |name: &str| -> Result<i64> {
        let line = meminfo
            .lines()
            .find(|line| line.starts_with(&format!("{name}:")))
            .with_context(|| format!("no {name} in /proc/meminfo"))?;
        let kib: i64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed /proc/meminfo")?
            .parse()?;
        Ok(kib * 1024)
    };
    Ok(field("Slab")? + field("VmallocUsed")? + field("Percpu")?)
}

/// The object size of a slab cache (`/proc/slabinfo`), if the cache exists.
fn slab_object_size(cache: &str) -> Option<u64> {
    let slabinfo = std::fs::read_to_string("/proc/slabinfo").ok()?;
    slabinfo.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next()? == cache)
            .then(|| fields.nth(2)?.parse().ok())
            .flatten()
    })
}
