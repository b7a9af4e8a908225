//! Processes inside pods: the join-cgroup-then-enter-netns wrapper, long-running processes
//! whose output is captured to files, and short commands bounded by a timeout.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal, kill_process};

/// How long [`PodCommand::run`] waits unless told otherwise.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a process gets between SIGTERM and SIGKILL when it is dropped.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// Joins the cgroup before entering the netns: `ip netns exec` remounts /sys, which hides the
/// cgroup tree. `exec` all the way down keeps the spawned pid that of the final program.
const JOIN_CGROUP_THEN_NETNS: &str = r#"cgroup=$1 netns=$2; shift 2; echo $$ > "$cgroup/cgroup.procs" && exec ip netns exec "$netns" "$@""#;

/// A command to run inside a pod's network namespace and a lab cgroup; build it with
/// [`crate::Pod::command`].
#[derive(Debug)]
pub struct PodCommand {
    tracker: Arc<ProcessTracker>,
    netns: String,
    cgroup: PathBuf,
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    user: Option<(u32, u32)>,
    timeout: Duration,
}

impl PodCommand {
    pub(crate) fn new(
        tracker: Arc<ProcessTracker>,
        netns: &str,
        cgroup: &Path,
        program: &OsStr,
    ) -> Self {
        Self {
            tracker,
            netns: netns.to_owned(),
            cgroup: cgroup.to_path_buf(),
            program: program.to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            user: None,
            timeout: DEFAULT_RUN_TIMEOUT,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs the process in `cgroup` instead of the pod's own cgroup (e.g. a
    /// [`crate::Pod::cgroup_child`] or a [`crate::Lab::sibling_cgroup`]).
    /// Lab teardown only sweeps processes left in the lab's cgroups.
    pub fn in_cgroup(mut self, cgroup: impl Into<PathBuf>) -> Self {
        self.cgroup = cgroup.into();
        self
    }

    /// Runs the program as `uid`/`gid` with no supplementary groups (e.g. the proxy's 1337).
    pub fn as_user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    /// Bounds [`PodCommand::run`] and [`PodCommand::run_success`] (default [`DEFAULT_RUN_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The equivalent `std::process::Command`, for callers that need full control.
    pub fn to_command(&self) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(JOIN_CGROUP_THEN_NETNS)
            .arg("sh")
            .arg(&self.cgroup)
            .arg(&self.netns);
        if let Some((uid, gid)) = self.user {
            command.args([
                "setpriv".to_owned(),
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".to_owned(),
                "--".to_owned(),
            ]);
        }
        command.arg(&self.program).args(&self.args);
        command.envs(self.envs.iter().map(|(key, value)| (key, value)));
        command
    }

    /// Starts a long-running process whose stdout and stderr go to files in the lab's
    /// directory. It is stopped when the returned handle is dropped, or at lab teardown.
    pub fn spawn(self) -> Result<LabProcess> {
        let program_name = Path::new(&self.program)
            .file_name()
            .unwrap_or(&self.program);
        let log_name = program_name
            .to_string_lossy()
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_");
        self.tracker
            .spawn(self.to_command(), &self.description(), &log_name)
    }

    /// Runs to completion (killed after the timeout) and returns its output, whatever the
    /// exit status.
    pub fn run(self) -> Result<Output> {
        run_with_timeout(self.to_command(), self.timeout)
            .with_context(|| format!("running {}", self.description()))
    }

    /// Like [`PodCommand::run`], but a non-zero exit is an error carrying stdout and stderr.
    pub fn run_success(self) -> Result<Output> {
        let description = self.description();
        let output = self.run()?;
        if !output.status.success() {
            bail!(
                "{description} exited with {}\nstdout: {}\nstderr: {}",
                output.status,
                String::from_utf8_lossy(&output.stdout).trim_end(),
                String::from_utf8_lossy(&output.stderr).trim_end()
            );
        }
        Ok(output)
    }

    fn description(&self) -> String {
        let mut words = vec![self.program.to_string_lossy().into_owned()];
        words.extend(
            self.args
                .iter()
                .map(|arg| arg.to_string_lossy().into_owned()),
        );
        format!(
            "`{}` in netns {} cgroup {}",
            words.join(" "),
            self.netns,
            self.cgroup.display()
        )
    }
}

/// A long-running process started by [`PodCommand::spawn`].
///
/// Dropping it sends SIGTERM, then SIGKILL after a short grace period, and reaps it.
#[derive(Debug)]
pub struct LabProcess {
    inner: Arc<TrackedProcess>,
}

impl LabProcess {
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout_text(&self) -> String {
        read_lossy(&self.inner.stdout_path)
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        read_lossy(&self.inner.stderr_path)
    }

    /// The exit status if the process has ended, without waiting.
    pub fn try_status(&self) -> Result<Option<ExitStatus>> {
        Ok(self.inner.child().try_wait()?)
    }

    /// Waits until stdout contains `needle` (e.g. `listening 198.18.0.2:8080`); fails early if
    /// the process exits first.
    pub fn wait_for_stdout(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout_text().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_status()? {
                // It may have printed the line just before exiting.
                if self.stdout_text().contains(needle) {
                    return Ok(());
                }
                bail!(
                    "{} exited with {status} before printing {needle:?}\n{}",
                    self.inner.description,
                    self.inner.logs()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}\n{}",
                    self.inner.description,
                    self.inner.logs()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit by itself; an error if it is still running after `timeout`
    /// (it is then left running until dropped).
    pub fn wait(&self, timeout: Duration) -> Result<ExitStatus> {
        match wait_until(&mut self.inner.child(), Instant::now() + timeout)? {
            Some(status) => Ok(status),
            None => bail!(
                "{} still running after {timeout:?}\n{}",
                self.inner.description,
                self.inner.logs()
            ),
        }
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILLs; returns how it ended.
    pub fn stop(&self, grace: Duration) -> Result<ExitStatus> {
        self.inner.stop(grace)
    }

    /// SIGKILL at once, as a crash or the OOM killer would end it (nothing runs on the way
    /// out), and reaps it.
    pub fn kill(&self) -> Result<ExitStatus> {
        self.inner.kill()
    }

    /// Sends `signal` and returns at once; an error if the process has already exited.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let mut child = self.inner.child();
        // Signalling only an unreaped child rules out hitting a recycled pid.
        if let Some(status) = child.try_wait()? {
            bail!("{} already exited with {status}", self.inner.description);
        }
        kill_process(Pid::from_child(&child), signal)
            .with_context(|| format!("sending {signal:?} to {}", self.inner.description))
    }
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        if let Err(error) = self.inner.stop(STOP_GRACE) {
            eprintln!("lab: stopping {}: {error:#}", self.inner.description);
        }
    }
}

/// Shared between a [`LabProcess`] handle and the lab, so the lab can stop it even if the
/// handle outlives the test body.
#[derive(Debug)]
struct TrackedProcess {
    description: String,
    pid: u32,
    child: Mutex<Child>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl TrackedProcess {
    fn child(&self) -> MutexGuard<'_, Child> {
        // Teardown runs while panicking too: a poisoned lock still guards a valid Child.
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stop(&self, grace: Duration) -> Result<ExitStatus> {
        let mut child = self.child();
        // Signalling only an unreaped child rules out hitting a recycled pid.
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let _ = kill_process(Pid::from_child(&child), Signal::TERM);
        if let Some(status) = wait_until(&mut child, Instant::now() + grace)? {
            return Ok(status);
        }
        self.sigkill(&mut child)
    }

    fn kill(&self) -> Result<ExitStatus> {
        let mut child = self.child();
        match child.try_wait()? {
            Some(status) => Ok(status),
            None => self.sigkill(&mut child),
        }
    }

    fn sigkill(&self, child: &mut Child) -> Result<ExitStatus> {
        child.kill()?;
        match wait_until(child, Instant::now() + Duration::from_secs(5))? {
            Some(status) => Ok(status),
            None => bail!("pid {} survived SIGKILL", self.pid),
        }
    }

    fn logs(&self) -> String {
        format!(
            "--- stdout ({}):\n{}\n--- stderr ({}):\n{}",
            self.stdout_path.display(),
            tail(&read_lossy(&self.stdout_path)),
            self.stderr_path.display(),
            tail(&read_lossy(&self.stderr_path))
        )
    }
}

/// The lab's record of every process it spawned.
#[derive(Debug)]
pub(crate) struct ProcessTracker {
    log_dir: PathBuf,
    spawned: AtomicUsize,
    processes: Mutex<Vec<Arc<TrackedProcess>>>,
}

impl ProcessTracker {
    pub(crate) fn new(log_dir: PathBuf) -> Self {
        Self {
            log_dir,
            spawned: AtomicUsize::new(0),
            processes: Mutex::new(Vec::new()),
        }
    }

    /// Logs go to `<lab dir>/<NNN>-<log_name>.stdout` and `.stderr`.
    fn spawn(&self, mut command: Command, description: &str, log_name: &str) -> Result<LabProcess> {
        let number = self.spawned.fetch_add(1, Ordering::Relaxed);
        let stdout_path = self.log_dir.join(format!("{number:03}-{log_name}.stdout"));
        let stderr_path = self.log_dir.join(format!("{number:03}-{log_name}.stderr"));
        let stdout = File::create(&stdout_path)
            .with_context(|| format!("creating {}", stdout_path.display()))?;
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {description}"))?;
        let process = Arc::new(TrackedProcess {
            description: format!("{description} (pid {})", child.id()),
            pid: child.id(),
            child: Mutex::new(child),
            stdout_path,
            stderr_path,
        });
        self.processes().push(Arc::clone(&process));
        Ok(LabProcess { inner: process })
    }

    /// Stops every process still running; returns one message per failure.
    pub(crate) fn stop_all(&self) -> Vec<String> {
        self.processes()
            .iter()
            .filter_map(|process| {
                process
                    .stop(STOP_GRACE)
                    .err()
                    .map(|error| format!("stopping {}: {error:#}", process.description))
            })
            .collect()
    }

    /// Prints each process's output, so a failed test shows what its servers said.
    pub(crate) fn print_logs(&self) {
        for process in self.processes().iter() {
            eprintln!("lab: output of {}\n{}", process.description, process.logs());
        }
    }

    fn processes(&self) -> MutexGuard<'_, Vec<Arc<TrackedProcess>>> {
        self.processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs `command` to completion with stdin closed and its output captured; kills it after
/// `timeout`.
pub(crate) fn run_with_timeout(mut command: Command, timeout: Duration) -> Result<Output> {
    let deadline = Instant::now() + timeout;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {command:?}"))?;
    // Pipes are drained on their own threads so a chatty child never blocks on a full pipe.
    let stdout = drain_in_background(child.stdout.take());
    let stderr = drain_in_background(child.stderr.take());
    let status = match wait_until(&mut child, deadline)? {
        Some(status) => Some(status),
        None => {
            child.kill()?;
            child.wait()?;
            None
        }
    };
    // A grandchild still holding the pipe open must not hang us: wait for output briefly.
    let collect = |receiver: mpsc::Receiver<Vec<u8>>| {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(200));
        receiver.recv_timeout(wait).unwrap_or_default()
    };
    let (stdout, stderr) = (collect(stdout), collect(stderr));
    let Some(status) = status else {
        bail!(
            "{command:?} timed out after {timeout:?}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&stdout).trim_end(),
            String::from_utf8_lossy(&stderr).trim_end()
        );
    };
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn drain_in_background(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            let _ = sender.send(bytes);
        });
    }
    receiver
}

/// Polls for the child's exit until `deadline`; `None` if it is still running.
fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The last few KiB of a log, enough to diagnose without flooding the test output.
fn tail(text: &str) -> &str {
    const MAX: usize = 4096;
    let mut start = text.len().saturating_sub(MAX);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_with_timeout_captures_output_and_status() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo out; echo err >&2; exit 3"]);
        let output = run_with_timeout(command, Duration::from_secs(5)).unwrap();
        assert_eq!(output.status.code(), Some(3));
        assert_eq!(output.stdout, b"out\n");
        assert_eq!(output.stderr, b"err\n");
    }

    #[test]
    fn run_with_timeout_kills_a_hanging_command() {
        let mut command = Command::new("sleep");
        command.arg("30");
        let started = Instant::now();
        let error = run_with_timeout(command, Duration::from_millis(200)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(format!("{error:#}").contains("timed out"), "{error:#}");
    }

    #[test]
    fn pod_command_joins_cgroup_before_entering_netns_and_switches_user() {
        let tracker = Arc::new(ProcessTracker::new(std::env::temp_dir()));
        let command = PodCommand::new(tracker, "ns1", Path::new("/cg/pod"), OsStr::new("labtool"))
            .args(["connect", "198.18.0.2:80"])
            .as_user(1337, 1338)
            .to_command();
        let argv: Vec<_> = command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        assert_eq!(command.get_program(), "sh");
        assert_eq!(
            argv[2..],
            [
                "sh",
                "/cg/pod",
                "ns1",
                "setpriv",
                "--reuid=1337",
                "--regid=1338",
                "--clear-groups",
                "--",
                "labtool",
                "connect",
                "198.18.0.2:80"
            ]
        );
    }

    #[test]
    fn tail_keeps_short_text_and_cuts_on_a_char_boundary() {
        assert_eq!(tail("short"), "short");
        let long = "é".repeat(3000);
        assert!(tail(&long).len() <= 4096);
        assert!(tail(&long).starts_with('é'));
    }
}
