//! Reading costs from the kernel: cgroup CPU time, peak RSS, BPF run times.

use std::{collections::BTreeMap, fs, path::Path, process::Command};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

/// `usage_usec` of a cgroup's `cpu.stat` (present in every cgroup v2, controller or not).
pub fn cgroup_cpu_usec(cgroup: &Path) -> Result<u64> {
    let path = cgroup.join("cpu.stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    field(&text, "usage_usec").with_context(|| format!("no usage_usec in {}", path.display()))
}

/// `VmHWM` (peak resident set) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    field(&text, "VmHWM:").with_context(|| format!("no VmHWM in {path}"))
}

/// The number after `name` on the line that starts with it.
fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == name).then(|| words.next()?.parse().ok())?
    })
}

/// Cumulative run time and count of one BPF program (kept while `kernel.bpf_stats_enabled`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BpfRunStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl BpfRunStats {
    pub fn since(self, before: BpfRunStats) -> BpfRunStats {
        BpfRunStats {
            run_time_ns: self.run_time_ns.saturating_sub(before.run_time_ns),
            run_cnt: self.run_cnt.saturating_sub(before.run_cnt),
        }
    }
}

/// Run statistics of every loaded BPF program, by id (`bpftool prog show --json`).
pub fn bpf_run_stats() -> Result<BTreeMap<u32, BpfRunStats>> {
    let output = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("running bpftool (installed by `cargo xtask setup`)")?;
    ensure!(
        output.status.success(),
        "bpftool prog show failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    parse_bpftool(&output.stdout)
}

fn parse_bpftool(json: &[u8]) -> Result<BTreeMap<u32, BpfRunStats>> {
    #[derive(Deserialize)]
    struct Program {
        id: u32,
        // Absent until stats were enabled once.
        #[serde(default)]
        run_time_ns: u64,
        #[serde(default)]
        run_cnt: u64,
    }
    let programs: Vec<Program> =
        serde_json::from_slice(json).context("parsing bpftool prog show --json")?;
    Ok(programs
        .into_iter()
        .map(|program| {
            let stats = BpfRunStats {
                run_time_ns: program.run_time_ns,
                run_cnt: program.run_cnt,
            };
            (program.id, stats)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_stat_and_proc_status_fields() {
        assert_eq!(
            field("usage_usec 1234\nuser_usec 1000\n", "usage_usec"),
            Some(1234)
        );
        assert_eq!(
            field("VmPeak:\t 2000 kB\nVmHWM:\t   812 kB\n", "VmHWM:"),
            Some(812)
        );
        assert_eq!(field("usage_usec_x 1\n", "usage_usec"), None);
    }

    #[test]
    fn parses_bpftool_with_and_without_stats() {
        let json =
            br#"[{"id":7,"type":"cgroup_sock_addr","run_time_ns":900,"run_cnt":3},{"id":8}]"#;
        let stats = parse_bpftool(json).unwrap();
        assert_eq!(
            stats[&7],
            BpfRunStats {
                run_time_ns: 900,
                run_cnt: 3
            }
        );
        assert_eq!(stats[&8], BpfRunStats::default());
    }
}
