//! `sidecar init` as the Kubernetes init container runs it (root): `--cgroup auto` finds the
//! pod cgroup as the parent of the caller's own cgroup, with the host's cgroup namespace and
//! with a private one (`0::/`); pod annotations from a downward API file are applied; the fail
//! policy decides the exit status of a failed init.
mod common;

use std::{path::Path, process::Command};

use common::*;
use sidecar_tests::{Lab, cgroup2_root, require_root};

/// Runs `sidecar ARGS` from inside `cgroup` (as a container's process would be), optionally in
/// a private cgroup namespace, on the host's mount namespace (bpffs and the cgroup tree).
fn init_from(cgroup: &Path, private_cgroupns: bool, args: &[&str]) -> std::process::Output {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" && shift && exec "$@""#)
        .arg("sh")
        .arg(cgroup);
    if private_cgroupns {
        command.args(["unshare", "--cgroup"]);
    }
    command.arg(sidecar_bin()).arg("init").args(args);
    command.output().expect("cannot run sh")
}

fn cleanup(pod_cgroup: &Path) {
    let out = sidecar(&["cleanup", "--cgroup", pod_cgroup.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn cgroup_auto_attaches_to_the_parent_of_the_callers_cgroup() {
    require_root();
    let lab = Lab::new("deploy-auto").expect("lab");
    let pod = lab.add_pod("p").expect("pod");
    let container = pod.cgroup_child("init").expect("container cgroup");
    let annotations = lab.dir().join("annotations");
    std::fs::write(
        &annotations,
        "traffic.sidecar.istio.io/excludeOutboundPorts=\"5432,6379\"\n\
         traffic.sidecar.istio.io/excludeOutboundIPRanges=\"192.0.2.0/24\"\n",
    )
    .unwrap();

    for private_cgroupns in [false, true] {
        let out = init_from(
            &container,
            private_cgroupns,
            &[
                "--cgroup",
                "auto",
                "--no-inbound-capture",
                "--annotations-file",
                annotations.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "private cgroupns: {private_cgroupns}\n{}",
            text(&out)
        );
        let capture = status_of(pod.cgroup())
            .unwrap_or_else(|| panic!("no capture on {:?}: {}", pod.cgroup(), text(&out)));
        assert_eq!(capture.excluded_ports, "5432,6379");
        assert_eq!(capture.excluded_cidrs, ["192.0.2.0/24"]);
        cleanup(pod.cgroup());
        assert!(status_of(pod.cgroup()).is_none());
    }

    // --cgroup-root names the host tree explicitly.
    let root = cgroup2_root().unwrap();
    let out = init_from(
        &container,
        true,
        &[
            "--cgroup",
            "auto",
            "--cgroup-root",
            root.to_str().unwrap(),
            "--no-inbound-capture",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(status_of(pod.cgroup()).is_some());
    cleanup(pod.cgroup());

    // A tree that does not hold the caller's cgroup is a clear error.
    let out = init_from(
        &container,
        true,
        &[
            "--cgroup",
            "auto",
            "--cgroup-root",
            "/tmp",
            "--no-inbound-capture",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not below /tmp"),
        "{}",
        text(&out)
    );
    lab.teardown().expect("teardown");
}

#[test]
fn fail_policy_decides_the_exit_status_and_bad_annotations_always_fail() {
    require_root();
    let lab = Lab::new("deploy-failpolicy").expect("lab");
    let pod = lab.add_pod("p").expect("pod");
    let container = pod.cgroup_child("init").expect("container cgroup");
    let missing = ["--cgroup", "/no/such/pod-cgroup", "--no-inbound-capture"];

    let closed = init_from(&container, false, &missing);
    assert!(!closed.status.success(), "{}", text(&closed));

    let open_policy = lab.dir().join("open");
    std::fs::write(&open_policy, "sidecar.ebpf/fail-policy=\"open\"\n").unwrap();
    let mut args = missing.to_vec();
    args.extend(["--annotations-file", open_policy.to_str().unwrap()]);
    let open = init_from(&container, false, &args);
    assert!(open.status.success(), "{}", text(&open));
    let stderr = String::from_utf8_lossy(&open.stderr);
    assert!(
        stderr.contains("does not exist") && stderr.contains("NOT captured"),
        "{stderr}"
    );

    let bad = lab.dir().join("bad");
    std::fs::write(
        &bad,
        "sidecar.ebpf/fail-policy=\"open\"\ntraffic.sidecar.istio.io/excludeInboundPorts=\"http\"\n",
    )
    .unwrap();
    let out = init_from(
        &container,
        false,
        &[
            "--cgroup",
            "auto",
            "--fail-policy",
            "open",
            "--annotations-file",
            bad.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("excludeInboundPorts"),
        "{}",
        text(&out)
    );
    assert!(status_of(pod.cgroup()).is_none());
    lab.teardown().expect("teardown");
}
