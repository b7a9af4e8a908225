//! Where the CPU time goes, by kernel subsystem: a system-wide `perf record` folded into a few
//! categories (netfilter, BPF, TCP/IP, wakeups, ...), so the results can say *why* eBPF and
//! iptables redirection differ, not only by how much.
//!
//! A sample goes to the first frame of its call chain, from the leaf towards the root, that
//! belongs to a category. Generic helpers (locks, memcpy, slab, ...) and functions no category
//! knows are walked through, so a spin unlock inside conntrack counts as netfilter, and page
//! allocation under `tcp_sendmsg` as TCP: the cost of a subsystem includes what it calls.

use std::{
    collections::BTreeMap,
    io::{self, Read},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal, kill_process};
use serde::{Deserialize, Serialize};

/// Samples per second and CPU: about 3000 per CPU in a 3 s cell, so a 5% share is known to
/// ±0.4%, at a cost small enough not to reorder the scenarios; odd so it does not beat with
/// the scheduler tick.
const FREQUENCY: u32 = 999;
/// perf first lists the running tasks and only then enables its events: the time it gets
/// before `start` returns and the caller's load begins.
const START_GRACE: Duration = Duration::from_secs(1);
/// A SIGINT that reaches perf while it is still setting up can be lost: it is sent again
/// at this interval until perf exits.
const STOP_RESEND: Duration = Duration::from_secs(5);
/// perf reads the whole file back after SIGINT (build ids): generous, but bounded.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

pub const NETFILTER: &str = "netfilter (conntrack, NAT, iptables)";
const BRIDGE: &str = "bridge (lab plumbing)";
pub const BPF: &str = "BPF programs and hooks";
const WAKEUPS: &str = "epoll and wakeups";
const NETWORK: &str = "TCP/IP stack and sockets";
const SYSCALL: &str = "syscall entry and files";
pub const IDLE: &str = "idle";
const OTHER_KERNEL: &str = "other kernel";
const USER_SPACE: &str = "user space";

/// Frames that say nothing about who is working: skipped whatever their name looks like.
/// Patterns: `x*` prefix, `*x*` substring, anything else the whole name (compiler suffixes
/// such as `.isra.0` removed first).
const HELPERS: &[&str] = &[
    // locks
    "_raw_*",
    "raw_spin_*",
    "*queued_spin*",
    "__raw_callee_save_*",
    "mutex_*",
    "__mutex_*",
    "preempt_*",
    // copies
    "*memcpy*",
    "*memmove*",
    "*memset*",
    "*memcmp*",
    "copy_*",
    "_copy_*",
    "__copy_*",
    "rep_movs_*",
    "rep_stos_*",
    "clear_user*",
    "__get_user_*",
    "__put_user_*",
    // RCU
    "__rcu_read_*",
    "rcu_read_*",
    "__srcu_read_*",
    // allocators
    "kmem_cache_*",
    "__kmem_cache_*",
    "kmalloc*",
    "__kmalloc*",
    "kfree",
    "kvfree",
    "slab_*",
    "__slab_*",
    "___slab_*",
    "get_partial_node",
    "__memcg_*",
    "memcg_*",
    "obj_cgroup_*",
    "mod_objcg_state",
    // checks and retpolines
    "refcount_*",
    "__check_object_size",
    "check_heap_object",
    "__virt_addr_valid",
    "__x86_indirect_thunk_*",
    "__x86_return_thunk",
];

/// Categories in the order they are tried on a frame: the narrow ones first, so that
/// `tcp_bpf_sendmsg` is BPF, `ipv4_conntrack_in` netfilter and `sock_def_readable` a wakeup
/// before the broad `tcp_*`, `ipv4_*` and `sock_*` of the TCP/IP stack.
const CATEGORIES: &[(&str, &[&str])] = &[
    (
        NETFILTER,
        &[
            "nf_*",
            "__nf_*",
            "nft_*",
            "__nft_*",
            "ipt_*",
            "ip6t_*",
            "xt_*",
            "iptable_*",
            "ip6table_*",
            "ebt_*",
            "*conntrack*",
            "*nf_nat*",
            "ipv4_confirm",
            "ipv6_confirm",
            // SO_ORIGINAL_DST: conntrack answers it, even when a BPF hook then overrides it.
            "getorigdst",
            "redirect_tg*",
        ],
    ),
    // The node bridge of the lab, br_netfilter included: the same in every scenario.
    (BRIDGE, &["br_*", "__br_*", "nbp_*"]),
    (
        BPF,
        &[
            "bpf_*",
            "__bpf_*",
            "___bpf_*",
            "__cgroup_bpf_*",
            "cgroup_bpf_*",
            "*sk_storage*",
            "sock_map_*",
            "sock_hash_*",
            "sk_psock*",
            "tcp_bpf_*",
            "sk_msg_*",
            // map internals, called from the programs (whose own frame is often missing)
            "htab_*",
            "__htab_*",
            "lookup_elem_raw",
            "lookup_nulls_elem_raw",
            "alloc_htab_elem",
            "free_htab_elem",
            "*pcpu_freelist_*",
            "array_map_*",
            "percpu_array_*",
        ],
    ),
    (
        WAKEUPS,
        &[
            // a socket waking its reader or writer (and, through it, epoll)
            "sock_def_readable",
            "sock_def_write_space*",
            "sock_def_wakeup",
            "sk_stream_write_space",
            "sk_wake_async*",
            "sock_wake_async",
            "ep_*",
            "*epoll*",
            "do_sys_poll",
            "__x64_sys_poll",
            "__x64_sys_ppoll",
            "*wake_up*",
            "*wake_function*",
            "wake_q_*",
            "try_to_wake_up",
            "ttwu*",
            "eventfd*",
            "futex_*",
            "__futex_*",
            "do_futex",
            "__x64_sys_futex",
            // the scheduler
            "select_task_rq*",
            "enqueue_task*",
            "dequeue_task*",
            "enqueue_entity",
            "dequeue_entity",
            "__schedule",
            "schedule*",
            "pick_next*",
            "finish_task_switch",
            "context_switch",
            "__switch_to*",
            "update_curr*",
            "psi_*",
        ],
    ),
    (
        NETWORK,
        &[
            "tcp_*",
            "__tcp_*",
            "tcp4_*",
            "tcp6_*",
            "do_tcp_*",
            "bbr_*",
            "cubictcp_*",
            "udp_*",
            "__udp_*",
            "inet_*",
            "__inet_*",
            "inet6_*",
            "__inet6_*",
            "reqsk_*",
            "secure_*",
            "ip_*",
            "__ip_*",
            "ip6_*",
            "__ip6_*",
            "ipv4_*",
            "ipv6_*",
            "raw_v4_*",
            "raw_v6_*",
            "raw_local_deliver",
            "fib*",
            "__fib*",
            "dst_*",
            "__dst_*",
            "xfrm_*",
            "__xfrm_*",
            "neigh_*",
            "__neigh_*",
            "sk_*",
            "__sk_*",
            "sock_*",
            "__sock_*",
            "sockfs_*",
            "lock_sock*",
            "release_sock",
            "__release_sock",
            "skb_*",
            "__skb_*",
            "kfree_skb*",
            "__kfree_skb*",
            "consume_skb",
            "alloc_skb*",
            "__alloc_skb",
            "__napi_alloc_skb",
            "csum_*",
            "napi_*",
            "__napi_*",
            "gro_*",
            "netif_*",
            "__netif_*",
            "net_rx_action",
            "process_backlog",
            "enqueue_to_backlog",
            "validate_xmit_*",
            "loopback_*",
            "veth_*",
            "dev_*",
            "__dev_*",
            "eth_*",
            "move_addr_to_*",
            "do_sock_*",
            "do_accept",
            "__sys_socket*",
            "__sys_bind*",
            "__sys_listen*",
            "__sys_connect*",
            "__sys_accept*",
            "__sys_sendto",
            "__sys_recvfrom",
            "__sys_sendmsg",
            "__sys_recvmsg",
            "___sys_sendmsg",
            "___sys_recvmsg",
            "__sys_shutdown*",
            "__sys_setsockopt",
            "__sys_getsockopt",
            "__sys_getsockname",
            "__sys_getpeername",
            "__x64_sys_socket",
            "__x64_sys_bind",
            "__x64_sys_listen",
            "__x64_sys_connect",
            "__x64_sys_accept*",
            "__x64_sys_sendto",
            "__x64_sys_recvfrom",
            "__x64_sys_sendmsg",
            "__x64_sys_recvmsg",
            "__x64_sys_shutdown",
            "__x64_sys_setsockopt",
            "__x64_sys_getsockopt",
            "__x64_sys_getsockname",
            "__x64_sys_getpeername",
        ],
    ),
    (
        SYSCALL,
        &[
            "syscall_exit*",
            "syscall_return_via_sysret",
            "exit_to_user_mode*",
            "fput",
            "__fput",
            "____fput",
            "fput_close*",
            "task_work_run",
            "fdget*",
            "__fdget*",
            "fget*",
            "__fget*",
            "alloc_file*",
            "alloc_empty_file",
            "init_file",
            "fd_install",
            "get_unused_fd*",
            "alloc_fd",
            "put_unused_fd",
            "close_fd*",
            "file_close_fd*",
            "filp_close",
            "filp_flush",
            "__x64_sys_close",
            "d_alloc*",
            "__d_alloc",
            "d_instantiate",
            "dput",
            "__dentry_kill",
            "new_inode*",
            "inode_init_*",
            "alloc_inode",
            "destroy_inode",
            "evict",
            "iput",
            "vfs_read",
            "vfs_write",
            "ksys_read",
            "ksys_write",
            "__x64_sys_read",
            "__x64_sys_write",
        ],
    ),
    (
        IDLE,
        &[
            "do_idle",
            "cpu_startup_entry",
            "cpuidle_*",
            "default_idle*",
            "default_enter_idle",
            "arch_cpu_idle*",
            "*safe_halt*",
            "poll_idle",
            "intel_idle*",
            "acpi_idle_*",
            "mwait_idle*",
        ],
    ),
];

/// The syscall entry and dispatch, counted as syscall entry only when a sample is in them
/// (or in a helper they call): reached through unknown functions, the sample belongs to the
/// syscall's body (a path walk, a page fault, ...), which is `other kernel`, not entry cost.
const SYSCALL_DISPATCH: &[&str] = &["entry_SYSCALL*", "do_syscall_64", "x64_sys_call"];

/// Start of the kernel half of the x86-64 address space.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

/// A running `perf record -a -g -e cpu-clock -F <freq>` writing to `path`; stop() ends it
/// (SIGINT) and waits.
pub struct Recording {
    /// `None` once stopped: dropping a recording that was not stopped kills perf.
    child: Option<Child>,
    path: PathBuf,
}

impl Recording {
    /// Starts recording every CPU, call chains included (to walk past helpers), with the
    /// `cpu-clock` software event, which works in VMs without a PMU.
    pub fn start(path: &Path) -> Result<Recording> {
        let mut command = Command::new("perf");
        command
            .args(["record", "-a", "-g", "-e", "cpu-clock", "-F"])
            .arg(FREQUENCY.to_string())
            // no copy of every binary in ~/.debug: the file is read on this host, at once
            .args(["--no-buildid-cache", "--quiet", "-o"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = command
            .spawn()
            .map_err(|error| perf_error(error, &command))?;
        let mut recording = Recording {
            child: Some(child),
            path: path.to_owned(),
        };
        let began = Instant::now();
        while began.elapsed() < START_GRACE {
            thread::sleep(Duration::from_millis(100));
            let child = recording.child.as_mut().expect("running");
            if let Some(status) = child.try_wait()? {
                let stderr = take_stderr(child);
                recording.child = None;
                bail!("{command:?} exited at once ({status}): {stderr}");
            }
        }
        Ok(recording)
    }

    /// Sends SIGINT (perf then writes its file and exits) and waits for perf to finish.
    pub fn stop(mut self) -> Result<()> {
        let mut child = self.child.take().expect("a recording is stopped once");
        let pid = Pid::from_child(&child);
        let began = Instant::now();
        let mut sent = None;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if began.elapsed() > STOP_TIMEOUT {
                child.kill().ok();
                child.wait().ok();
                bail!(
                    "perf record still running {}s after SIGINT: killed, {} is incomplete",
                    STOP_TIMEOUT.as_secs(),
                    self.path.display()
                );
            }
            if sent.is_none_or(|at: Instant| at.elapsed() > STOP_RESEND) {
                kill_process(pid, Signal::INT).context("sending SIGINT to perf record")?;
                sent = Some(Instant::now());
            }
            thread::sleep(Duration::from_millis(100));
        };
        // perf ends by raising the SIGINT it caught once its file is complete.
        if !status.success() && status.signal() != Some(Signal::INT.as_raw()) {
            bail!("perf record failed ({status}): {}", take_stderr(&mut child));
        }
        if !self.path.is_file() {
            bail!("perf record wrote no {}", self.path.display());
        }
        Ok(())
    }
}

impl Drop for Recording {
    /// An error between start() and stop() must not leave perf filling the disk.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

fn perf_error(error: io::Error, command: &Command) -> anyhow::Error {
    if error.kind() == io::ErrorKind::NotFound {
        anyhow::anyhow!("perf not found: install the Debian package linux-perf")
    } else {
        anyhow::Error::new(error).context(format!("cannot start {command:?}"))
    }
}

fn take_stderr(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        stderr.read_to_string(&mut text).ok();
    }
    text.trim().to_owned()
}

/// Shares of the samples on the given CPUs, by category.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    pub samples: u64,
    /// Category -> fraction of `samples`, 0..1; they sum to 1 (empty when there are no
    /// samples).
    pub shares: BTreeMap<String, f64>,
}

/// Profile of the samples of a `perf record` file taken on `cpus`.
pub fn summarize(path: &Path, cpus: &[usize]) -> Result<Profile> {
    if cpus.is_empty() {
        bail!("no CPUs to summarize {} on", path.display());
    }
    let cpu_list = cpus
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut command = Command::new("perf");
    command.arg("script").arg("-i").arg(path).args([
        "--cpu",
        &cpu_list,
        "-F",
        "comm,cpu,ip,sym,dso",
    ]);
    let output = command
        .output()
        .map_err(|error| perf_error(error, &command))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(categorize_script(
        &String::from_utf8_lossy(&output.stdout),
        cpus,
    ))
}

/// The shares of `perf script -F comm,cpu,ip,sym,dso` output, samples on other CPUs left out.
fn categorize_script(text: &str, cpus: &[usize]) -> Profile {
    let mut counts = BTreeMap::<String, u64>::new();
    for sample in samples(text).filter(|sample| cpus.contains(&sample.cpu)) {
        *counts.entry(category(&sample)).or_default() += 1;
    }
    let samples = counts.values().sum::<u64>();
    let shares = counts
        .into_iter()
        .map(|(category, count)| (category, count as f64 / samples as f64))
        .collect();
    Profile { samples, shares }
}

struct Sample<'a> {
    comm: &'a str,
    cpu: usize,
    /// Leaf first.
    frames: Vec<Frame<'a>>,
}

struct Frame<'a> {
    address: Option<u64>,
    symbol: &'a str,
    dso: &'a str,
}

impl Frame<'_> {
    /// The address decides (BPF programs have their own dso); the dso only when the address
    /// is unreadable.
    fn in_kernel(&self) -> bool {
        match self.address {
            Some(address) => address >= KERNEL_HALF && self.dso != "[vsyscall]",
            None => self.dso == "[kernel.kallsyms]" || self.dso.starts_with("bpf_prog_"),
        }
    }
}

/// Samples are blocks separated by blank lines: a `comm [cpu]` header, then one frame a line
/// (or the only frame on the header line when the recording has no call chains).
fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    let mut lines = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .peekable();
    std::iter::from_fn(move || {
        loop {
            let header = lines.find(|line| !line.trim().is_empty())?;
            let mut block = Vec::new();
            while let Some(line) = lines.next_if(|line| !line.trim().is_empty()) {
                block.push(line);
            }
            let Some((comm, cpu, rest)) = parse_header(header) else {
                continue;
            };
            let frames = (!rest.is_empty())
                .then_some(rest)
                .into_iter()
                .chain(block)
                .filter_map(parse_frame)
                .collect();
            return Some(Sample { comm, cpu, frames });
        }
    })
}

/// `proxy-worker [000] ` -> ("proxy-worker", 0, ""): the first `[digits]` is the CPU.
fn parse_header(line: &str) -> Option<(&str, usize, &str)> {
    line.match_indices('[').find_map(|(open, _)| {
        let close = open + line[open..].find(']')?;
        let cpu = line[open + 1..close].parse().ok()?;
        Some((line[..open].trim(), cpu, line[close + 1..].trim()))
    })
}

/// `ffffffff81e32fbe sock_def_readable ([kernel.kallsyms])`: the dso is the last
/// parenthesised group (it may hold parentheses itself: `(/memfd:x (deleted))`).
fn parse_frame(line: &str) -> Option<Frame<'_>> {
    let (address, rest) = line.trim().split_once(char::is_whitespace)?;
    let rest = rest.trim();
    let (symbol, dso) = match rest.strip_suffix(')') {
        Some(inner) => {
            let mut depth = 0;
            let open = inner.char_indices().rev().find_map(|(at, c)| {
                match c {
                    ')' => depth += 1,
                    '(' if depth == 0 => return Some(at),
                    '(' => depth -= 1,
                    _ => {}
                }
                None
            })?;
            (inner[..open].trim(), &inner[open + 1..])
        }
        None => (rest, ""),
    };
    Some(Frame {
        address: u64::from_str_radix(address, 16).ok(),
        symbol,
        dso,
    })
}

fn category(sample: &Sample) -> String {
    let Some(leaf) = sample.frames.first() else {
        return OTHER_KERNEL.to_owned();
    };
    if !leaf.in_kernel() {
        let comm = sample.comm.split_whitespace().next().unwrap_or("?");
        return format!("{USER_SPACE}: {comm}");
    }
    let mut known_nothing_below = true;
    for frame in sample.frames.iter().take_while(|frame| frame.in_kernel()) {
        let symbol = base_name(frame.symbol);
        if matches_any(symbol, HELPERS) {
            continue;
        }
        if matches_any(symbol, SYSCALL_DISPATCH) {
            // At the root of every syscall: only the entry's own time is its.
            return if known_nothing_below {
                SYSCALL
            } else {
                OTHER_KERNEL
            }
            .to_owned();
        }
        if let Some((name, _)) = CATEGORIES
            .iter()
            .find(|(_, patterns)| matches_any(symbol, patterns))
        {
            return (*name).to_owned();
        }
        known_nothing_below = false;
    }
    OTHER_KERNEL.to_owned()
}

/// `finish_task_switch.isra.0` -> `finish_task_switch`.
fn base_name(symbol: &str) -> &str {
    symbol.split('.').next().unwrap_or(symbol)
}

fn matches_any(symbol: &str, patterns: &[&str]) -> bool {
    patterns.iter().any(
        |pattern| match (pattern.strip_prefix('*'), pattern.strip_suffix('*')) {
            (Some(_), Some(_)) => symbol.contains(&pattern[1..pattern.len() - 1]),
            (None, Some(prefix)) => symbol.starts_with(prefix),
            (Some(suffix), None) => symbol.ends_with(suffix),
            (None, None) => symbol == *pattern,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "\
proxy-worker [000] 
\tffffffffc1a0b2c4 __nf_conntrack_find_get ([kernel.kallsyms])
\tffffffffc1a0c111 nf_conntrack_in ([kernel.kallsyms])
\tffffffff81f00000 nf_hook_slow ([kernel.kallsyms])
\tffffffff81ff6a85 ip_rcv ([kernel.kallsyms])
\tffffffff81e6651d __netif_receive_skb_one_core ([kernel.kallsyms])

proxy-worker [000] 
\tffffffff822010c9 _raw_spin_unlock_bh ([kernel.kallsyms])
\tffffffffc1a0d000 __nf_conntrack_confirm ([kernel.kallsyms])
\tffffffffc1a0d100 ipv4_confirm ([kernel.kallsyms])
\tffffffff81f00000 nf_hook_slow ([kernel.kallsyms])
\tffffffff81ffcf8f ip_output ([kernel.kallsyms])

labtool [000] 
\t          10a974 __libc_recv (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t          45787e labtool::load::run (/work/main/target/release/labtool)

haproxy [001] 
\t          16db75 __memmove_avx512_unaligned_erms (/usr/lib/x86_64-linux-gnu/libc.so.6)

kworker/0:2-eve [000] 
\tffffffff81440904 some_function_nobody_knows ([kernel.kallsyms])
\tffffffff81440da0 process_one_work ([kernel.kallsyms])

proxy-worker [000] 
\tffffffff8151b3f1 lookup_nulls_elem_raw ([kernel.kallsyms])
\tffffffffc002847e bpf_prog_db214ecff6648d9c_getsockopt_orig_dst (bpf_prog_db214ecff6648d9c_getsockopt_orig_dst)
\tffffffff81559099 __cgroup_bpf_run_filter_getsockopt ([kernel.kallsyms])

proxy-worker [000] 
\tffffffff81e35e4a finish_task_switch.isra.0 ([kernel.kallsyms])
\tffffffff821ed511 do_syscall_64 ([kernel.kallsyms])

labtool [000] 
\tffffffff822010c9 _raw_spin_lock ([kernel.kallsyms])
\tffffffff821ed511 do_syscall_64 ([kernel.kallsyms])
\tffffffff81000130 entry_SYSCALL_64_after_hwframe ([kernel.kallsyms])

labtool [000] 
\tffffffff816f0000 link_path_walk ([kernel.kallsyms])
\tffffffff816f1000 path_lookupat ([kernel.kallsyms])
\tffffffff821ed511 do_syscall_64 ([kernel.kallsyms])
";

    fn share(profile: &Profile, category: &str) -> f64 {
        profile.shares.get(category).copied().unwrap_or(0.0)
    }

    #[test]
    fn categorizes_samples_on_the_chosen_cpus() {
        let profile = categorize_script(SCRIPT, &[0]);
        assert_eq!(profile.samples, 8, "the CPU 1 sample is left out");
        assert!((profile.shares.values().sum::<f64>() - 1.0).abs() < 1e-9);
        // conntrack at the leaf, and a spin unlock under __nf_conntrack_confirm
        assert_eq!(share(&profile, NETFILTER), 2.0 / 8.0);
        // the map lookup of a BPF program whose own frame is missing
        assert_eq!(share(&profile, BPF), 1.0 / 8.0);
        assert_eq!(share(&profile, WAKEUPS), 1.0 / 8.0);
        // a lock taken by the syscall entry itself
        assert_eq!(share(&profile, SYSCALL), 1.0 / 8.0);
        // an unknown function under a kworker, and a path walk under do_syscall_64
        assert_eq!(share(&profile, OTHER_KERNEL), 2.0 / 8.0);
        assert_eq!(share(&profile, "user space: labtool"), 1.0 / 8.0);
        assert!(!profile.shares.contains_key("user space: haproxy"));
    }

    #[test]
    fn every_cpu_and_no_cpu() {
        let profile = categorize_script(SCRIPT, &[0, 1]);
        assert_eq!(profile.samples, 9);
        assert_eq!(share(&profile, "user space: haproxy"), 1.0 / 9.0);
        assert!((profile.shares.values().sum::<f64>() - 1.0).abs() < 1e-9);
        assert_eq!(categorize_script(SCRIPT, &[2]), Profile::default());
    }

    #[test]
    fn parses_headers_and_frames() {
        assert_eq!(
            parse_header("memfd:sealed-91 [012] "),
            Some(("memfd:sealed-91", 12, ""))
        );
        let frame =
            parse_frame("\t          c2972 [unknown] (/memfd:sealed-91173221a7ea (deleted))")
                .unwrap();
        assert_eq!(frame.address, Some(0xc2972));
        assert_eq!(frame.symbol, "[unknown]");
        assert_eq!(frame.dso, "/memfd:sealed-91173221a7ea (deleted)");
        assert!(!frame.in_kernel());
        // a recording without call chains: the only frame is on the header line
        let sample =
            samples("sleep [001]  ffffffff81000130 entry_SYSCALL_64 ([kernel.kallsyms])\n")
                .next()
                .unwrap();
        assert_eq!(
            (sample.comm, sample.cpu, sample.frames.len()),
            ("sleep", 1, 1)
        );
        assert_eq!(category(&sample), SYSCALL);
    }
}
