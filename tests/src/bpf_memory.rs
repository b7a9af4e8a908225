//! Kernel memory of every BPF program and map on the node, as the kernel accounts it
//! (`bytes_memlock`, through bpftool): what the tests and the bench compare before and after.
use std::{process::Command, thread, time::Duration};

use anyhow::{Context, Result, bail, ensure};

/// Sum of `bytes_memlock` over every BPF program and map right now.
pub fn bpf_memlock_total() -> Result<u64> {
    let mut total = 0;
    for kind in ["prog", "map"] {
        let out = Command::new("bpftool")
            .args([kind, "show", "--json"])
            .output()
            .context("running bpftool (installed by `cargo xtask setup`)")?;
        ensure!(out.status.success(), "bpftool {kind} show: {out:?}");
        let items: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
        total += items
            .iter()
            .filter_map(|item| item["bytes_memlock"].as_u64())
            .sum::<u64>();
    }
    Ok(total)
}

/// The same once it has settled: the kernel frees released programs and maps a little later.
pub fn settled_bpf_memlock() -> Result<u64> {
    let mut last = bpf_memlock_total()?;
    for _ in 0..50 {
        thread::sleep(Duration::from_millis(100));
        let now = bpf_memlock_total()?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    bail!("the node's BPF memory did not settle: {last} bytes")
}
