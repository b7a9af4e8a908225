//! What a node operator relies on: a capture costs kilobytes of kernel memory, a deleted pod's
//! capture is collected, a live pod's is never touched by a cleanup that did not name it, and
//! concurrent or failing installs leave one complete capture. Runs as root on the real kernel,
//! one test at a time in this binary's single test (the kernel-wide memlock sums must not see
//! other tests' programs).
mod common;

use std::path::{Path, PathBuf};

use common::*;
use sidecar_common::{AttachPoint, PinLayout};
use sidecar_tests::{Lab, Pod, require_root};

/// The bar: a captured pod at idle costs at most this much kernel memory, on kernels whose
/// memlock figure is the memory in use (6.4 and later).
const MAX_BYTES_PER_POD: u64 = 64 * 1024;
/// Before 6.4 a map's memlock figure is derived from its capacity (before 5.11 it is even
/// charged that way) whatever it holds: there the bar is the capacities' sum, which still
/// catches anything preallocated by size (a 65536-entry hash costs megabytes).
const MAX_CHARGED_BYTES_PER_POD: u64 = 1024 * 1024;

/// Whether this kernel's memlock figures are memory in use (`map_mem_usage`, Linux 6.4).
fn memlock_is_usage() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (6, 4)
}
const PODS: usize = 20;

fn node_bpf_memlock() -> u64 {
    sidecar_tests::bpf_memory::settled_bpf_memlock().expect("the node's BPF memory")
}

/// Installs capture for `pod`, removed at teardown (also when the test fails).
fn init(lab: &Lab, pod: &Pod, extra: &[&str]) -> std::process::Output {
    let cgroup = pod.cgroup().to_string_lossy().into_owned();
    let teardown_cgroup = cgroup.clone();
    lab.on_teardown(move || {
        let _ = sidecar(&["cleanup", "--cgroup", &teardown_cgroup]);
    });
    let netns = pod.netns_path().to_string_lossy().into_owned();
    let mut args = vec!["init", "--cgroup", &cgroup, "--netns", &netns];
    args.extend_from_slice(extra);
    sidecar(&args)
}

fn pins_under(bpffs_dir: &Path) -> Vec<String> {
    std::fs::read_dir(bpffs_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn kernel_memory_per_pod_stale_collection_and_safe_installs() {
    require_root();
    sidecar_bin();
    let lab = Lab::new("lifecycle").expect("lab");
    // Captures of pods deleted before this test (an earlier test that died, say) would be
    // collected below and count as ours: collect them first, which is always safe.
    let settle = sidecar(&["cleanup", "--stale"]);
    assert!(settle.status.success(), "{}", text(&settle));
    let start = node_bpf_memlock();

    // The first capture also creates the node-wide log ring: measure pods from there on.
    let first = lab.add_pod("first").expect("pod");
    assert!(init(&lab, &first, &[]).status.success());
    let baseline = node_bpf_memlock();

    let pods: Vec<Pod> = (0..PODS)
        .map(|i| lab.add_pod(&format!("p{i}")).expect("pod"))
        .collect();
    for pod in &pods {
        let out = init(&lab, pod, &[]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let per_pod = (node_bpf_memlock() - baseline) / PODS as u64;
    println!("kernel memory per captured pod: {per_pod} bytes (memlock of programs and maps)");
    let bar = if memlock_is_usage() {
        MAX_BYTES_PER_POD
    } else {
        MAX_CHARGED_BYTES_PER_POD
    };
    assert!(
        per_pod <= bar,
        "{per_pod} bytes of kernel memory per pod (at most {bar} on this kernel)"
    );
    // `status` tells each capture's share, measured the same way.
    let reported: Vec<u64> = pods
        .iter()
        .map(|pod| {
            status_of(pod.cgroup())
                .expect("capture listed")
                .kernel_memory_bytes
        })
        .collect();
    for bytes in &reported {
        assert!(
            *bytes <= bar && bytes.abs_diff(per_pod) <= 4096,
            "status says {bytes} bytes, the node's sums {per_pod} per pod"
        );
    }

    // Half the pods are deleted (their cgroup goes; the kernel detaches their programs but
    // their pins would keep programs and maps alive).
    let (deleted, live) = pods.split_at(PODS / 2);
    let pin_dir_of = |pod: &Pod| -> PathBuf { status_of(pod.cgroup()).unwrap().pin_dir };
    let deleted_pins: Vec<PathBuf> = deleted.iter().map(pin_dir_of).collect();
    let live_pins: Vec<PathBuf> = live.iter().chain([&first]).map(pin_dir_of).collect();
    for pod in deleted {
        std::fs::remove_dir(pod.cgroup()).expect("remove the pod's cgroup");
    }
    // A global cleanup must not take live pods' capture without being told so.
    let refused = sidecar(&["cleanup", "--all"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    let refusal = String::from_utf8_lossy(&refused.stderr);
    assert!(refusal.contains("refusing"), "{refusal}");
    assert!(
        refusal.contains(&*live[0].cgroup().to_string_lossy()),
        "live pods not listed: {refusal}"
    );
    for pod in live.iter().chain([&first]) {
        assert_fully_attached(pod.cgroup());
    }
    let before_stale = node_bpf_memlock();
    let stale = sidecar(&["cleanup", "--stale"]);
    assert!(stale.status.success(), "{}", text(&stale));
    let removed = String::from_utf8_lossy(&stale.stdout);
    for pod in live.iter().chain([&first]) {
        assert_fully_attached(pod.cgroup());
    }
    for pin_dir in &deleted_pins {
        let link = PinLayout::link_pin(pin_dir, "connect4", AttachPoint::PodCgroup);
        assert!(
            removed.contains(&*link.to_string_lossy()),
            "{pin_dir:?} not collected:\n{removed}"
        );
    }
    for pin_dir in &live_pins {
        assert!(
            !removed.contains(&*pin_dir.to_string_lossy()),
            "{pin_dir:?} removed:\n{removed}"
        );
    }
    let after_stale = node_bpf_memlock();
    assert_eq!(
        before_stale - after_stale,
        reported[..deleted.len()].iter().sum::<u64>(),
        "exactly the deleted pods' kernel memory is freed"
    );

    // Two inits of one pod at once, 20 times: always one complete capture, no stray pin.
    let racer = &live[0];
    assert!(
        init(&lab, racer, &["--exclude-ports", "21"])
            .status
            .success()
    );
    let reference = node_bpf_memlock();
    for round in 0..20 {
        let extra = if round % 2 == 0 { "22" } else { "23" };
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let cgroup = racer.cgroup().to_string_lossy().into_owned();
                let netns = racer.netns_path().to_string_lossy().into_owned();
                let extra = extra.to_owned();
                std::thread::spawn(move || {
                    sidecar(&[
                        "init",
                        "--cgroup",
                        &cgroup,
                        "--netns",
                        &netns,
                        "--exclude-ports",
                        &extra,
                    ])
                })
            })
            .collect();
        for handle in handles {
            let out = handle.join().unwrap();
            assert!(out.status.success(), "round {round}: {}", text(&out));
        }
        assert_fully_attached(racer.cgroup());
        let pin_dir = status_of(racer.cgroup()).unwrap().pin_dir;
        let stray: Vec<String> = pins_under(&pin_dir)
            .into_iter()
            .filter(|p| !PinLayout::is_link_pin(p) && !PinLayout::is_map_pin(p))
            .collect();
        assert!(stray.is_empty(), "round {round}: stray pins {stray:?}");
    }
    // (One excluded port each time, so the same trie size as the reference.)
    assert_eq!(
        node_bpf_memlock(),
        reference,
        "re-installs leave nothing behind"
    );

    // A re-init that fails part way (its namespace cannot take an sk_lookup program) leaves
    // the previous configuration and programs in force.
    let before = status_of(racer.cgroup()).unwrap();
    let not_a_netns = lab.dir().join("not-a-netns");
    std::fs::write(&not_a_netns, "").unwrap();
    let cgroup = racer.cgroup().to_string_lossy().into_owned();
    let failed = sidecar(&[
        "init",
        "--cgroup",
        &cgroup,
        "--netns",
        &not_a_netns.to_string_lossy(),
        "--exclude-ports",
        "9999",
    ]);
    assert!(!failed.status.success(), "{}", text(&failed));
    let after = status_of(racer.cgroup()).unwrap();
    assert_eq!(after.excluded_ports, before.excluded_ports, "{after:?}");
    assert_eq!(after.links, before.links, "{after:?}");

    // Each remaining pod by name: the node is back where it started.
    for pod in live.iter().chain([&first]) {
        let out = sidecar(&["cleanup", "--cgroup", &pod.cgroup().to_string_lossy()]);
        assert!(out.status.success(), "{}", text(&out));
    }
    assert_eq!(node_bpf_memlock(), start, "kernel memory back to the start");
    lab.teardown().expect("teardown");
}
