//! The capture's userspace, what `sidecar init`, `cleanup`, `status` and the node agent use:
//! loading, configuring, attaching and pinning the BPF programs of `sidecar-ebpf` (embedded at
//! build time), iptables mode, the pod's annotations and network namespace, and reading the
//! pinned state back. `sys` holds the only `unsafe` of userspace.
//!
//! - `ebpf_capture`: the BPF object, its maps and programs, attached to a pod's cgroup;
//! - `iptables_capture`: the same redirect with iptables rules (Istio's chains);
//! - `capture_settings`: what a capture is told (ports, exclusions, fail policy);
//!   `pod_annotations`: those settings from the pod's Istio annotations;
//! - `bpffs`: where the pins live, and the node lock; `captures`: the captures found there;
//! - `cgroup`: the pod's cgroup v2; `pod_netns`: what `init` sets in the pod's namespace;
//! - `probe`: the kernel features checked before loading; `kernel_memory`: what each
//!   capture holds of kernel memory;
//! - `proxy_hooks`: what the proxy asks of the capture (its status, its counters);
//! - `sys`: the few system calls no safe wrapper offers.

pub mod bpffs;
pub mod capture_settings;
pub mod captures;
pub mod cgroup;
pub mod ebpf_capture;
pub mod iptables_capture;
pub mod kernel_memory;
pub mod pod_annotations;
pub mod pod_netns;
pub mod probe;
pub mod proxy_hooks;
#[allow(unsafe_code)]
pub mod sys;
