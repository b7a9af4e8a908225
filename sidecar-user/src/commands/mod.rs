//! One module per CLI subcommand; each is a thin layer over `sidecar-capture` or `sidecar-proxy`.
pub mod certs;
pub mod cleanup;
pub mod init;
pub mod inject;
mod inject_probes;
pub mod kernel_logs;
pub mod node_agent;
pub mod proxy;
pub mod status;

use anyhow::{Result, bail};

/// Loading BPF programs, mounting bpffs and writing netfilter rules all need root.
pub fn require_root(what: &str) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!(
            "{what} must run as root: it loads BPF programs, mounts bpffs and changes \
             network rules (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        );
    }
    Ok(())
}
