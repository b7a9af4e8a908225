//! Every bad input to `sidecar init` gets a clear error and leaves nothing behind (root).
mod common;

use std::process::Command;

use common::*;
use sidecar_common::PinLayout;
use sidecar_tests::{Lab, cgroup2_root, require_root};

fn assert_fails_with(out: &std::process::Output, needle: &str) {
    let all = text(out);
    assert!(
        !out.status.success(),
        "expected a failure mentioning {needle:?}:\n{all}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(needle),
        "expected {needle:?} in stderr:\n{all}"
    );
}

fn no_pins_left() {
    // Other tests may run in parallel; only fail on pins for cgroups that no longer exist.
    let status = status_report();
    for (_, dir) in PinLayout::default().capture_dirs() {
        let entry = status.ebpf.iter().find(|c| c.pin_dir == dir);
        if let Some(entry) = entry {
            assert!(entry.cgroup.is_some(), "stale pins left behind: {dir:?}");
        }
    }
}

#[test]
fn bad_input_is_rejected_with_a_clear_error() {
    require_root();
    let lab = Lab::new("cli-errors").expect("lab");
    let pod = lab.add_pod("p").expect("pod");
    let cgroup = pod.cgroup().to_string_lossy().into_owned();

    assert_fails_with(
        &sidecar(&["init", "--cgroup", "/no/such/cgroup-xyz"]),
        "does not exist",
    );
    assert_fails_with(
        &sidecar(&["init", "--cgroup", &cgroup, "--exclude-cidrs", "10.1.2.3/8"]),
        "host bits are set",
    );
    assert_fails_with(
        &sidecar(&["init", "--cgroup", &cgroup, "--exclude-cidrs", "not-a-cidr"]),
        "invalid CIDR 'not-a-cidr'",
    );
    assert_fails_with(
        &sidecar(&["init", "--cgroup", &cgroup, "--exclude-ports", "70000"]),
        "invalid port '70000'",
    );
    assert_fails_with(
        &sidecar(&["init", "--cgroup", &cgroup, "--exclude-ports", "90-80"]),
        "90 is greater than 80",
    );
    assert_fails_with(
        &sidecar(&["init", "--cgroup", &cgroup, "--outbound-port", "0"]),
        "invalid --outbound-port 0",
    );
    assert_fails_with(&sidecar(&["init"]), "--cgroup is required in ebpf mode");
    // Run on the host without --netns, inbound capture would take the host's traffic.
    assert_fails_with(
        &sidecar(&["init", "--cgroup", &cgroup]),
        "refusing to capture inbound traffic of the host's network namespace",
    );
    // Named explicitly, the host's namespace is refused all the same.
    assert_fails_with(
        &sidecar(&["init", "--cgroup", &cgroup, "--netns", "/proc/self/ns/net"]),
        "refusing to capture inbound traffic of the host's network namespace",
    );
    // The cgroup root is the whole node; `..` climbs out of the path named.
    let root = cgroup2_root().unwrap().to_string_lossy().into_owned();
    assert_fails_with(
        &sidecar(&["init", "--cgroup", &root, "--no-inbound-capture"]),
        "refusing the cgroup v2 root",
    );
    assert_fails_with(
        &sidecar(&["init", "--cgroup", "/", "--no-inbound-capture"]),
        "refusing the cgroup v2 root",
    );
    let climbing = format!("{cgroup}/../..");
    assert_fails_with(
        &sidecar(&["init", "--cgroup", &climbing, "--no-inbound-capture"]),
        "contains `..`",
    );
    assert_fails_with(
        &sidecar(&["init", "--cgroup", &cgroup, "--netns", "/no/such/netns"]),
        "cannot open network namespace /no/such/netns",
    );
    assert_fails_with(
        &sidecar(&["init", "--cgroup", &cgroup, "--inbound-port", "15001"]),
        "invalid --inbound-port 15001",
    );
    assert_fails_with(&sidecar(&["cleanup"]), "say what to clean up");
    assert_fails_with(&sidecar(&["cleanup", "--include-live"]), "--all");
    let no_owner = pod
        .command(sidecar_bin())
        .args([
            "init",
            "--mode",
            "iptables",
            "--proxy-uid",
            "none",
            "--proxy-gid",
            "none",
        ])
        .run()
        .expect("run");
    assert_fails_with(&no_owner, "iptables mode needs --proxy-uid or --proxy-gid");
    // iptables REDIRECT has no "is the proxy there" check: failing open cannot be honoured.
    let direct = pod
        .command(sidecar_bin())
        .args(["init", "--mode", "iptables", "--when-proxy-down", "direct"])
        .run()
        .expect("run");
    assert_fails_with(&direct, "--when-proxy-down direct");
    assert_fails_with(&direct, "needs --mode ebpf");
    let rules = pod
        .command("iptables")
        .args(["-w", "-t", "nat", "-S"])
        .run_success()
        .expect("iptables");
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(!rules.contains("SIDECAR"), "rules installed:\n{rules}");

    // Not root.
    let not_root = Command::new("setpriv")
        .args(["--reuid=1337", "--regid=1337", "--clear-groups"])
        .arg(sidecar_bin())
        .args(["init", "--cgroup", &cgroup])
        .output()
        .expect("setpriv");
    assert_fails_with(&not_root, "must run as root");

    // No cgroup v2: in a private mount namespace without the cgroup2 mount.
    let root = cgroup2_root().unwrap();
    let script = format!(
        "umount -l '{}' && exec '{}' init --cgroup /anything",
        root.display(),
        sidecar_bin().display()
    );
    let no_v2 = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare");
    assert_fails_with(&no_v2, "cgroup v2 is not mounted");

    // A path that exists but is not a cgroup v2 directory.
    assert_fails_with(&sidecar(&["init", "--cgroup", "/tmp"]), "does not exist");
    no_pins_left();
    lab.teardown().expect("teardown");
}
