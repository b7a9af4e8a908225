//! Who the proxy is, seen from a program running in a process's context: its UID or GID
//! (Istio's 1337). A proxy in a sibling cgroup needs no identity: the pod's programs never
//! run for it.
use aya_ebpf::helpers::bpf_get_current_uid_gid;
use sidecar_common::{CaptureConfig, NO_ID};

/// The current task runs as the proxy's UID or GID. Only for programs that run in process
/// context (cgroup sock and sock_addr hooks), where the helper is allowed and meaningful.
#[inline(always)]
pub fn current_is_proxy(config: &CaptureConfig) -> bool {
    let uid_gid = bpf_get_current_uid_gid();
    let (uid, gid) = (uid_gid as u32, (uid_gid >> 32) as u32);
    (config.proxy_uid != NO_ID && uid == config.proxy_uid)
        || (config.proxy_gid != NO_ID && gid == config.proxy_gid)
}
