//! The lab: a "node" network namespace holding a bridge, pods attached to it through veth
//! pairs, a cgroup v2 directory per pod, and a teardown that removes all of it.

use std::collections::BTreeSet;
use std::env;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, PoisonError};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::cgroup::{self, cgroup2_root};
use crate::netns::{self, ip, netns_path};
use crate::process::{PodCommand, ProcessTracker};

/// Lab ids are `sl<pid>-<n>`: unique per process and Lab, short enough to prefix netns names,
/// and carrying the owner's pid so a later run can tell which leftovers are stale.
const LAB_ID_PREFIX: &str = "sl";

/// Parent directory of every lab, both in the cgroup v2 tree and in the temp dir.
const LABS_DIR: &str = "sidecar-lab";

const BRIDGE: &str = "br0";
const MAX_NAME_LEN: usize = 32;
const MAX_INTERFACE_NAME_LEN: usize = 15;

/// Bounds killing leftover processes and removing cgroups at teardown.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(5);

static LABS_CREATED: AtomicUsize = AtomicUsize::new(0);
static STALE_LABS_SWEPT: Once = Once::new();

type TeardownHook = Box<dyn FnOnce() + Send>;

/// A set of pods on one bridge. Dropping it (even while a test panics) tears everything down;
/// [`Lab::teardown`] does the same and reports what could not be removed.
pub struct Lab {
    id: String,
    node_netns: String,
    cgroup: PathBuf,
    dir: PathBuf,
    processes: Arc<ProcessTracker>,
    state: Mutex<LabState>,
    torn_down: bool,
}

#[derive(Default)]
struct LabState {
    pod_names: BTreeSet<String>,
    /// Created namespaces, node first; deleted in reverse.
    netns: Vec<String>,
    teardown_hooks: Vec<TeardownHook>,
}

/// A pod: a network namespace with `eth0` on the lab bridge and a cgroup directory.
/// Cheap to clone; the lab owns the underlying resources.
#[derive(Clone, Debug)]
pub struct Pod {
    name: String,
    netns: String,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    cgroup: PathBuf,
    processes: Arc<ProcessTracker>,
}

impl Lab {
    /// Creates the node namespace with its bridge, the lab cgroup
    /// `<cgroup2>/sidecar-lab/<lab-id>/` and a temp dir for process logs.
    pub fn new(test_name: &str) -> Result<Lab> {
        STALE_LABS_SWEPT.call_once(sweep_stale_labs);
        let id = format!(
            "{LAB_ID_PREFIX}{}-{}",
            process::id(),
            LABS_CREATED.fetch_add(1, Ordering::Relaxed)
        );
        let dir = env::temp_dir().join(LABS_DIR).join(&id);
        // Built before any resource exists, so an early `?` still tears down what was made.
        let lab = Lab {
            node_netns: format!("{id}-node"),
            cgroup: cgroup2_root()?.join(LABS_DIR).join(&id),
            processes: Arc::new(ProcessTracker::new(dir.clone())),
            dir,
            id,
            state: Mutex::new(LabState::default()),
            torn_down: false,
        };
        eprintln!(
            "lab {} for test {test_name}: cgroup {}, logs in {}",
            lab.id,
            lab.cgroup.display(),
            lab.dir.display()
        );
        fs::create_dir_all(&lab.dir).with_context(|| format!("creating {}", lab.dir.display()))?;
        fs::create_dir_all(&lab.cgroup)
            .with_context(|| format!("creating cgroup {}", lab.cgroup.display()))?;
        lab.add_netns(&lab.node_netns)?;
        // Without snooping the bridge floods IPv6 neighbour solicitations to every port.
        let node = lab.node_netns.as_str();
        ip(&[
            "-n",
            node,
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", node, "link", "set", BRIDGE, "up"])?;
        Ok(lab)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The lab's cgroup, parent of every pod and sibling cgroup.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The lab's temp dir (process logs live here); removed at teardown.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Adds pod number N (counting from 0): netns `<lab-id>-<name>`, `eth0` with
    /// 198.18.0.(N+1)/24 and fd18::(N+1)/64, and cgroup `<lab cgroup>/<name>`.
    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        validate_name(name)?;
        ensure!(
            name != "node",
            "pod name `node` is taken by the lab's node namespace"
        );
        let index = {
            let mut state = self.state();
            let cgroup_taken = self.cgroup.join(name).exists();
            ensure!(
                !cgroup_taken && state.pod_names.insert(name.to_owned()),
                "lab already has a pod or sibling cgroup named {name}"
            );
            state.pod_names.len() - 1
        };
        ensure!(index < 254, "the lab's /24 holds at most 254 pods");
        let host = index + 1;
        let ipv4 = Ipv4Addr::new(198, 18, 0, host as u8);
        let ipv6 = Ipv6Addr::new(0xfd18, 0, 0, 0, 0, 0, 0, host as u16);
        let pod_netns = format!("{}-{name}", self.id);
        self.add_netns(&pod_netns)?;

        // Created straight into the pod's namespace: no name ever appears on the host.
        let node = self.node_netns.as_str();
        let node_veth: String = format!("v{index}-{name}")
            .chars()
            .take(MAX_INTERFACE_NAME_LEN)
            .collect();
        ip(&[
            "-n", node, "link", "add", &node_veth, "type", "veth", "peer", "name", "eth0", "netns",
            &pod_netns,
        ])?;
        ip(&[
            "-n", node, "link", "set", &node_veth, "master", BRIDGE, "up",
        ])?;
        let pod = pod_netns.as_str();
        ip(&[
            "-n",
            pod,
            "addr",
            "add",
            &format!("{ipv4}/24"),
            "dev",
            "eth0",
        ])?;
        // nodad: the address is usable at once instead of after duplicate address detection.
        ip(&[
            "-n",
            pod,
            "addr",
            "add",
            &format!("{ipv6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", pod, "link", "set", "eth0", "up"])?;
        ip(&["-n", pod, "link", "set", "lo", "up"])?;

        let cgroup = self.cgroup.join(name);
        fs::create_dir(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        Ok(Pod {
            name: name.to_owned(),
            netns: pod_netns,
            ipv4,
            ipv6,
            cgroup,
            processes: Arc::clone(&self.processes),
        })
    }

    /// A cgroup directly under the lab's cgroup, outside every pod (e.g. for a proxy that
    /// must not be captured). Returns the existing one if called again with the same name.
    pub fn sibling_cgroup(&self, name: &str) -> Result<PathBuf> {
        validate_name(name)?;
        ensure!(
            !self.state().pod_names.contains(name),
            "{name} is a pod's cgroup, not a sibling"
        );
        create_dir_if_missing(&self.cgroup.join(name))
    }

    /// Registers cleanup to run at teardown, after the lab's processes are stopped and before
    /// its cgroups are removed (e.g. `sidecar cleanup --cgroup ...`). Hooks run last-in,
    /// first-out; a panicking hook is reported and the teardown goes on.
    pub fn on_teardown(&self, hook: impl FnOnce() + Send + 'static) {
        self.state().teardown_hooks.push(Box::new(hook));
    }

    /// Tears the lab down now and fails if anything could not be removed.
    pub fn teardown(mut self) -> Result<()> {
        let problems = self.tear_down();
        if !problems.is_empty() {
            bail!(
                "lab {} teardown left problems:\n{}",
                self.id,
                problems.join("\n")
            );
        }
        Ok(())
    }

    fn add_netns(&self, name: &str) -> Result<()> {
        netns::add(name)?;
        self.state().netns.push(name.to_owned());
        Ok(())
    }

    fn state(&self) -> MutexGuard<'_, LabState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Best effort, in dependency order; returns what went wrong instead of stopping.
    fn tear_down(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        if thread::panicking() {
            self.processes.print_logs();
        }
        let mut problems = self.processes.stop_all();
        let (hooks, namespaces) = {
            let mut state = self.state();
            (
                std::mem::take(&mut state.teardown_hooks),
                std::mem::take(&mut state.netns),
            )
        };
        for hook in hooks.into_iter().rev() {
            if panic::catch_unwind(AssertUnwindSafe(hook)).is_err() {
                problems.push("a teardown hook panicked".to_owned());
            }
        }
        // Catches what the test started some other way, and children of the spawned processes.
        if let Err(error) = cgroup::kill_all_processes(&self.cgroup, TEARDOWN_TIMEOUT) {
            problems.push(format!("{error:#}"));
        }
        for name in namespaces.iter().rev() {
            if let Err(error) = netns::delete(name) {
                problems.push(format!("{error:#}"));
            }
        }
        if let Err(error) = cgroup::remove_subtree(&self.cgroup, TEARDOWN_TIMEOUT) {
            problems.push(format!("{error:#}"));
        }
        // The shared parents go too once the last lab is gone (they stay while another runs).
        if let Some(labs_cgroup) = self.cgroup.parent() {
            let _ = fs::remove_dir(labs_cgroup);
        }
        if let Err(error) = remove_dir_if_present(&self.dir) {
            problems.push(format!("{error:#}"));
        }
        if let Some(labs_dir) = self.dir.parent() {
            let _ = fs::remove_dir(labs_dir);
        }
        problems
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for problem in self.tear_down() {
            eprintln!("lab {} teardown: {problem}", self.id);
        }
    }
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// The network namespace's name, as `ip netns` knows it.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// `/run/netns/<name>`, for tools that take a namespace path.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// The pod's cgroup, where [`Pod::command`] runs processes by default.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Creates (or returns) `<pod cgroup>/<name>`, e.g. `app` and `proxy` containers.
    pub fn cgroup_child(&self, name: &str) -> Result<PathBuf> {
        validate_name(name)?;
        create_dir_if_missing(&self.cgroup.join(name))
    }

    /// A command that runs `program` in this pod's network namespace and cgroup.
    pub fn command(&self, program: impl AsRef<OsStr>) -> PodCommand {
        PodCommand::new(
            Arc::clone(&self.processes),
            &self.netns,
            &self.cgroup,
            program.as_ref(),
        )
    }

    /// Runs `work` on a thread inside this pod's network namespace but in no lab cgroup, so
    /// its sockets are never redirected (probes, direct socket checks).
    pub fn run_in_netns<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T> {
        netns::run_in_netns(&self.netns, work)
    }
}

/// Names become netns names, interface names and cgroup directories, and are passed to `ip`.
fn validate_name(name: &str) -> Result<()> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    ensure!(
        !name.is_empty() && name.len() <= MAX_NAME_LEN && valid_chars && !name.starts_with('-'),
        "invalid lab name {name:?}: use 1 to {MAX_NAME_LEN} ASCII letters, digits, `-` or `_`, not starting with `-`"
    );
    Ok(())
}

fn create_dir_if_missing(path: &Path) -> Result<PathBuf> {
    match fs::create_dir(path) {
        Ok(()) => Ok(path.to_path_buf()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(path.to_path_buf()),
        Err(error) => Err(error).with_context(|| format!("creating {}", path.display())),
    }
}

fn remove_dir_if_present(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The pid in a lab id or a name starting with one (`sl1234-0`, `sl1234-0-client`).
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(LAB_ID_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Leftovers of labs whose process died without tearing down (SIGKILL, a test timeout).
/// Before this process made any lab, its own pid's leftovers are stale too (pid reuse).
fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| {
        pid == process::id() || !Path::new("/proc").join(pid.to_string()).exists()
    })
}

/// Best-effort removal of stale labs' processes, namespaces, cgroups and temp dirs.
fn sweep_stale_labs() {
    let stale_in = |dir: &Path| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|entry| entry.ok())
                    .filter(|entry| is_stale(&entry.file_name().to_string_lossy()))
                    .map(|entry| entry.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let report = |what: &str, result: Result<()>| match result {
        Ok(()) => eprintln!("lab: removed stale {what}"),
        Err(error) => eprintln!("lab: could not remove stale {what}: {error:#}"),
    };
    let stale_cgroups = cgroup2_root()
        .map(|root| stale_in(&root.join(LABS_DIR)))
        .unwrap_or_default();
    for cgroup in &stale_cgroups {
        report(
            &format!("processes in {}", cgroup.display()),
            cgroup::kill_all_processes(cgroup, TEARDOWN_TIMEOUT),
        );
    }
    for name in netns::list()
        .unwrap_or_default()
        .into_iter()
        .filter(|name| is_stale(name))
    {
        report(&format!("netns {name}"), netns::delete(&name));
    }
    for cgroup in &stale_cgroups {
        report(
            &format!("cgroup {}", cgroup.display()),
            cgroup::remove_subtree(cgroup, TEARDOWN_TIMEOUT),
        );
    }
    for dir in stale_in(&env::temp_dir().join(LABS_DIR)) {
        report(
            &format!("dir {}", dir.display()),
            remove_dir_if_present(&dir),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_simple_names_and_rejects_ones_unsafe_for_ip_or_paths() {
        for good in ["client", "server-b", "app_1", "proxy"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-n", "a/b", "a b", "..", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_owner_pid_from_lab_names() {
        assert_eq!(owner_pid("sl1234-0"), Some(1234));
        assert_eq!(owner_pid("sl1234-10-client"), Some(1234));
        assert_eq!(owner_pid("slow-ns"), None);
        assert_eq!(owner_pid("other"), None);
    }

    #[test]
    fn labs_of_dead_processes_and_of_this_process_are_stale() {
        assert!(is_stale(&format!("sl{}-0", process::id())));
        // Above the kernel's pid_max ceiling (2^22), so never a live process.
        assert!(is_stale("sl4194305-0-client"));
        assert!(!is_stale("sl1-0"), "pid 1 is alive");
        assert!(!is_stale("unrelated"));
    }
}
