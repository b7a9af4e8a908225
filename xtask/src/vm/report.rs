//! What a boot amounted to, told from qemu's exit and the console: the tests passed, a test
//! failed, the kernel panicked, the VM hung (timeout), or it stopped without a result.
use std::{fmt, path::PathBuf, time::Duration};

use super::{pins::Kernel, qemu::Boot};

/// The line the guest's init prints last (vm/init.sh), with the tests' exit status.
const RESULT_MARKER: &str = "sidecar-vm: result exit=";
const PANIC_MARKER: &str = "Kernel panic - not syncing";

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// The harnesses ran, but no test (a filter that matches nothing): not a pass.
    NoTestRan,
    TestsFailed {
        exit_status: i32,
    },
    KernelPanic {
        message: String,
    },
    Hung {
        timeout: Duration,
    },
    NoResult {
        qemu_status: String,
    },
}

/// Totals of the test harnesses' `test result:` lines, and the names of failed tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TestCounts {
    pub passed: u32,
    pub failed: u32,
    pub failed_tests: Vec<String>,
}

pub struct KernelReport {
    pub kernel: String,
    pub version: String,
    pub outcome: Outcome,
    pub counts: TestCounts,
    pub elapsed: Duration,
    pub console_log: PathBuf,
}

impl KernelReport {
    pub fn new(kernel: &Kernel, boot: &Boot, timeout: Duration, console_log: PathBuf) -> Self {
        let counts = count_tests(&boot.console);
        let outcome = match classify(boot, timeout) {
            Outcome::Passed if counts.passed == 0 => Outcome::NoTestRan,
            outcome => outcome,
        };
        KernelReport {
            kernel: kernel.name.clone(),
            version: kernel.version().to_owned(),
            outcome,
            counts,
            elapsed: boot.elapsed,
            console_log,
        }
    }

    pub fn passed(&self) -> bool {
        self.outcome == Outcome::Passed
    }
}

impl fmt::Display for KernelReport {
    /// One line: `vm-test: Linux 5.10 (5.10.223-1): PASS, 15 tests passed, 0 failed, in 84 s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match &self.outcome {
            Outcome::Passed => "PASS".to_owned(),
            Outcome::NoTestRan => "NO TEST RAN (does a test match the filter?)".to_owned(),
            Outcome::TestsFailed { exit_status } => {
                format!("FAIL (tests failed, exit status {exit_status})")
            }
            Outcome::KernelPanic { message } => format!("KERNEL PANIC ({message})"),
            Outcome::Hung { timeout } => {
                format!("HANG (no result within {} s)", timeout.as_secs())
            }
            Outcome::NoResult { qemu_status } => {
                format!("NO RESULT (the VM stopped without one: qemu {qemu_status})")
            }
        };
        write!(
            f,
            "vm-test: Linux {} ({}): {verdict}, {} tests passed, {} failed",
            self.kernel, self.version, self.counts.passed, self.counts.failed
        )?;
        if !self.counts.failed_tests.is_empty() {
            write!(f, " [{}]", self.counts.failed_tests.join(", "))?;
        }
        write!(f, ", in {} s", self.elapsed.as_secs())?;
        if !self.passed() {
            write!(f, "; console: {}", self.console_log.display())?;
        }
        Ok(())
    }
}

fn classify(boot: &Boot, timeout: Duration) -> Outcome {
    // First: a panic ends the VM like a result would (panic=-1 and -no-reboot).
    if let Some(line) = boot.console.lines().find(|l| l.contains(PANIC_MARKER)) {
        let message = line[line.find(PANIC_MARKER).unwrap_or(0)..].trim();
        return Outcome::KernelPanic {
            message: message.to_owned(),
        };
    }
    let Some(status) = boot.status else {
        return Outcome::Hung { timeout };
    };
    let reported = boot
        .console
        .lines()
        .filter_map(|line| line.trim().strip_prefix(RESULT_MARKER))
        .filter_map(|code| code.trim().parse::<i32>().ok())
        .next_back();
    // isa-debug-exit makes qemu exit with an odd status; qemu's own failures are even or 1,
    // which is why the marker is required too.
    let through_debug_exit = status.code().is_some_and(|code| code % 2 == 1);
    match reported {
        Some(0) if through_debug_exit => Outcome::Passed,
        Some(exit_status) if through_debug_exit => Outcome::TestsFailed { exit_status },
        _ => Outcome::NoResult {
            qemu_status: status.to_string(),
        },
    }
}

fn count_tests(console: &str) -> TestCounts {
    let mut counts = TestCounts::default();
    for line in console.lines().map(str::trim) {
        // `test result: FAILED. 3 passed; 1 failed; 0 ignored; ...`
        if let Some(summary) = line.strip_prefix("test result: ") {
            for part in summary.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(number)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(number) = number.parse::<u32>() else {
                    continue;
                };
                match what {
                    "passed" => counts.passed += number,
                    "failed" => counts.failed += number,
                    _ => {}
                }
            }
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            counts.failed_tests.push(name.to_owned());
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn boot(console: &str, exit_code: Option<i32>) -> Boot {
        Boot {
            // A raw wait status holds the exit code in its second byte.
            status: exit_code.map(|code| std::process::ExitStatus::from_raw(code << 8)),
            console: console.to_owned(),
            elapsed: Duration::from_secs(42),
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(600);

    #[test]
    fn tells_pass_failure_panic_hang_and_no_result_apart() {
        let passed = "test result: ok. 3 passed; 0 failed\nsidecar-vm: result exit=0\r\n";
        assert_eq!(classify(&boot(passed, Some(1)), TIMEOUT), Outcome::Passed);
        let failed = "sidecar-vm: result exit=101\n";
        assert_eq!(
            classify(&boot(failed, Some(3)), TIMEOUT),
            Outcome::TestsFailed { exit_status: 101 }
        );
        let panic = "[ 1.2] Kernel panic - not syncing: Attempted to kill init! exitcode=0x100\n";
        assert_eq!(
            classify(&boot(panic, Some(0)), TIMEOUT),
            Outcome::KernelPanic {
                message: "Kernel panic - not syncing: Attempted to kill init! exitcode=0x100"
                    .into()
            }
        );
        assert_eq!(
            classify(&boot("booting...", None), TIMEOUT),
            Outcome::Hung { timeout: TIMEOUT }
        );
        // qemu's own failure (exit 1) without the marker is no pass.
        assert!(matches!(
            classify(&boot("qemu: could not load kernel", Some(1)), TIMEOUT),
            Outcome::NoResult { .. }
        ));
    }

    #[test]
    fn counts_tests_over_every_harness() {
        let console = "running 2 tests\n\
                       test a_test ... ok\n\
                       test other::b_test ... FAILED\n\
                       test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.1s\n\
                       test result: ok. 4 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out\n";
        assert_eq!(
            count_tests(console),
            TestCounts {
                passed: 5,
                failed: 1,
                failed_tests: vec!["other::b_test".into()]
            }
        );
    }
}
