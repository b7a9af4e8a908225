//! Test rig for the sidecar, in the spirit of ztunnel's: "pods" made of a network namespace,
//! a veth on a shared bridge and a cgroup v2 directory, processes run inside them, and a
//! teardown that removes everything even when a test panics. A [`SidecarPod`] is a pod with
//! its sidecar (capture, proxy, their metrics and access lines), as the integration tests, the
//! lab demo and the bench build it; [`MeshPki`] issues its mesh certificates.
//!
//! ```no_run
//! use std::time::Duration;
//! use sidecar_tests::{ConnectReport, Lab, require_root};
//!
//! require_root();
//! let lab = Lab::new("example").unwrap();
//! let (client, server) = (lab.add_pod("client").unwrap(), lab.add_pod("server").unwrap());
//! let labtool = "target/debug/labtool"; // integration tests: env!("CARGO_BIN_EXE_labtool")
//! let echo = server.command(labtool).args(["echo-server", "--listen", "[::]:8080"]).spawn().unwrap();
//! echo.wait_for_stdout("listening", Duration::from_secs(5)).unwrap();
//! let target = format!("{}:8080", server.ipv4());
//! let output = client.command(labtool).args(["connect", &target]).run().unwrap();
//! let report = ConnectReport::from_output(&output).unwrap();
//! assert_eq!(report.server.peer.ip().to_canonical(), client.ipv4());
//! ```

mod bpf_counters;
pub mod bpf_memory;
mod cgroup;
mod lab;
mod mesh_pki;
mod netns;
mod preconditions;
mod process;
pub mod prometheus;
mod sidecar_pod;
pub mod tools;
mod wait;

pub use bpf_counters::BpfCounters;
pub use cgroup::{cgroup2_mount_point, cgroup2_root};
pub use lab::{Lab, Pod};
pub use mesh_pki::{MeshPki, identity_config, replace_file};
pub use preconditions::require_root;
pub use process::{DEFAULT_RUN_TIMEOUT, LabProcess, PodCommand};
pub use sidecar_pod::{
    CaptureMode, MetricGoal, PROXY_ID, PROXY_METRICS_URL, PROXY_READY_TIMEOUT, PROXY_READY_URL,
    ProxyPlacement, SidecarPod, proxy_metrics, status_report, wait_for_proxy_metric,
};
pub use tools::echo::{ConnectReport, EchoServerReport};
pub use tools::http::HttpResponse;
pub use wait::{wait_for_http_ok, wait_for_tcp};
