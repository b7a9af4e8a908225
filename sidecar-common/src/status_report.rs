//! What `sidecar status` reports: built by the binary from the kernel, printed as text or JSON
//! (`--json`), and read back, typed, by the integration tests, the lab, the benchmark and the
//! pod test. Every key must be there when it is read: an `Option` is `null` when absent,
//! never a missing key, so a renamed key fails the reader instead of reading as nothing.
use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    string::{String, ToString},
    vec::Vec,
};

use serde::{Deserialize, Serialize};

use crate::{AttachPoint, Counter, WhenProxyDown};

/// `sidecar status --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The eBPF captures of this node, one per pod cgroup, by cgroup id.
    pub ebpf: Vec<CaptureReport>,
    /// iptables-mode rules in this network namespace, with packet counters.
    pub iptables: Vec<String>,
}

/// One pod's eBPF capture.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureReport {
    pub cgroup_id: u64,
    /// None when the cgroup no longer exists (a deleted pod's capture: `sidecar cleanup
    /// --stale` removes it, and `sidecar node-agent` does so by itself).
    #[serde(deserialize_with = "Option::deserialize")]
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub outbound_port: u32,
    #[serde(deserialize_with = "Option::deserialize")]
    pub proxy_uid: Option<u32>,
    #[serde(deserialize_with = "Option::deserialize")]
    pub proxy_gid: Option<u32>,
    pub excluded_ports: String,
    /// The proxy's inbound port, when inbound capture is on.
    #[serde(deserialize_with = "Option::deserialize")]
    pub inbound_port: Option<u32>,
    /// Including the proxy's own ports, which are always excluded.
    pub excluded_inbound_ports: String,
    pub excluded_cidrs: Vec<String>,
    /// The app-proxy loopback hop is short-circuited with sockmap (`init --sockmap`).
    pub sockmap_shortcut: bool,
    /// What outbound connects get while no proxy listens (`init --when-proxy-down`).
    pub when_proxy_down: WhenProxyDown,
    /// The capture's pinned links, by pin name.
    pub links: Vec<LinkReport>,
    /// Kernel counters by [`Counter::name`], summed over CPUs. A capture installed by an older
    /// build lacks the newer counters.
    pub counters: BTreeMap<String, u64>,
    /// Original destinations waiting for the proxy's end of their handshake (0 at rest).
    pub pending_handoffs: u64,
    /// Kernel memory of this capture's programs and maps (their `memlock`), node-wide maps
    /// excluded; socket storage is charged to each socket, not here.
    pub kernel_memory_bytes: u64,
}

/// One pinned link of a capture.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkReport {
    /// The pin's name in the capture's directory.
    pub pin: String,
    pub attached_to: AttachPoint,
    pub program: String,
    /// The kernel's ids for the pinned link and the program it attaches.
    pub link_id: u32,
    pub program_id: u32,
    /// Program IDs the kernel has attached to the pod's cgroup for this hook (ours and
    /// others'); empty for the other attach points.
    pub attached_program_ids: Vec<u32>,
}

impl StatusReport {
    /// Reads `sidecar status --json`; a key missing or of another type is an error naming it.
    pub fn from_json(json: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(json).map_err(|error| {
            std::format!("`sidecar status --json` is not a status report of this build: {error}")
        })
    }

    /// The capture of the pod cgroup at `cgroup`, if any.
    pub fn capture_of(&self, cgroup: &Path) -> Option<&CaptureReport> {
        self.ebpf
            .iter()
            .find(|capture| capture.cgroup.as_deref() == Some(cgroup))
    }
}

impl CaptureReport {
    /// The value of `counter`, or None when this capture's layout predates it.
    pub fn counter(&self, counter: Counter) -> Option<u64> {
        self.counters.get(counter.name()).copied()
    }
}

impl fmt::Display for StatusReport {
    /// `sidecar status`'s text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ebpf.is_empty() {
            writeln!(f, "eBPF capture: none installed")?;
        }
        for capture in &self.ebpf {
            write!(f, "{capture}")?;
        }
        if self.iptables.is_empty() {
            writeln!(f, "iptables capture (this netns): none installed")?;
        }
        for rules in &self.iptables {
            writeln!(f, "iptables capture (this netns): {rules}")?;
        }
        Ok(())
    }
}

impl fmt::Display for CaptureReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cgroup = self
            .cgroup
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| {
                "<cgroup gone: a deleted pod's capture, `sidecar cleanup --stale` removes it>"
                    .into()
            });
        writeln!(f, "eBPF capture on {cgroup} (cgroup id {})", self.cgroup_id)?;
        writeln!(f, "  pins:           {}", self.pin_dir.display())?;
        writeln!(f, "  outbound port:  {}", self.outbound_port)?;
        let id = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "none".into());
        writeln!(
            f,
            "  proxy uid/gid:  {}/{}",
            id(self.proxy_uid),
            id(self.proxy_gid)
        )?;
        writeln!(f, "  excluded ports: {}", or_none(&self.excluded_ports))?;
        match self.inbound_port {
            Some(port) => writeln!(
                f,
                "  inbound port:   {port}, excluded local ports {}",
                self.excluded_inbound_ports
            )?,
            None => writeln!(f, "  inbound port:   none (inbound not captured)")?,
        }
        writeln!(
            f,
            "  excluded cidrs: {}",
            or_none(&self.excluded_cidrs.join(","))
        )?;
        let shortcut = if self.sockmap_shortcut { "on" } else { "off" };
        writeln!(f, "  sockmap shortcut: {shortcut}")?;
        writeln!(f, "  when proxy down: {}", self.when_proxy_down.name())?;
        for link in &self.links {
            writeln!(
                f,
                "  {:<20} link {:<4} program {:<4} on {:?}",
                link.program, link.link_id, link.program_id, link.attached_to
            )?;
        }
        let counters: Vec<String> = self
            .counters
            .iter()
            .map(|(k, v)| std::format!("{k}={v}"))
            .collect();
        writeln!(f, "  counters:       {}", counters.join(" "))?;
        writeln!(f, "  pending handoffs: {}", self.pending_handoffs)?;
        writeln!(
            f,
            "  kernel memory:  {:.1} KiB (programs and maps, memlock)",
            self.kernel_memory_bytes as f64 / 1024.0
        )
    }
}

fn or_none(text: &str) -> &str {
    if text.is_empty() { "none" } else { text }
}

#[cfg(test)]
mod tests {
    use std::{borrow::ToOwned, vec};

    use super::*;

    fn report() -> StatusReport {
        StatusReport {
            ebpf: vec![CaptureReport {
                cgroup_id: 7,
                cgroup: Some("/sys/fs/cgroup/pod".into()),
                pin_dir: "/sys/fs/bpf/sidecar/cgroup-7".into(),
                outbound_port: 15001,
                proxy_uid: Some(1337),
                proxy_gid: None,
                excluded_ports: "22".into(),
                inbound_port: None,
                excluded_inbound_ports: "15001,15006,15020-15021".into(),
                excluded_cidrs: vec![],
                sockmap_shortcut: false,
                when_proxy_down: WhenProxyDown::Direct,
                links: vec![LinkReport {
                    pin: "link_connect4".into(),
                    attached_to: AttachPoint::PodCgroup,
                    program: "connect4".into(),
                    link_id: 3,
                    program_id: 9,
                    attached_program_ids: vec![9],
                }],
                counters: [("redirected".to_owned(), 5)].into_iter().collect(),
                pending_handoffs: 0,
                kernel_memory_bytes: 4096,
            }],
            iptables: vec![],
        }
    }

    #[test]
    fn reads_back_what_it_prints_with_the_keys_of_before() {
        let json = serde_json::to_vec(&report()).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let capture = &value["ebpf"][0];
        assert_eq!(capture["when_proxy_down"], "direct");
        assert_eq!(capture["links"][0]["attached_to"], "PodCgroup");
        assert!(capture["inbound_port"].is_null());
        let back = StatusReport::from_json(&json).unwrap();
        assert_eq!(back, report());
        let capture = back.capture_of(Path::new("/sys/fs/cgroup/pod")).unwrap();
        assert_eq!(capture.counter(Counter::Redirected), Some(5));
        assert_eq!(capture.counter(Counter::Errors), None);
        assert!(back.capture_of(Path::new("/sys/fs/cgroup")).is_none());
    }

    #[test]
    fn a_missing_or_renamed_key_is_an_error_naming_it() {
        for key in ["pin_dir", "inbound_port", "proxy_gid", "cgroup", "counters"] {
            let mut value = serde_json::to_value(report()).unwrap();
            value["ebpf"][0].as_object_mut().unwrap().remove(key);
            let error = StatusReport::from_json(value.to_string().as_bytes()).unwrap_err();
            assert!(
                error.contains(&std::format!("missing field `{key}`")),
                "{error}"
            );
        }
        let mut value = serde_json::to_value(report()).unwrap();
        value["ebpf"][0]["when_proxy_down"] = "fail_open".into();
        let error = StatusReport::from_json(value.to_string().as_bytes()).unwrap_err();
        assert!(error.contains("fail_open"), "{error}");
    }

    #[test]
    fn prints_the_text_of_status() {
        let text = report().to_string();
        assert!(text.starts_with("eBPF capture on /sys/fs/cgroup/pod (cgroup id 7)\n"));
        assert!(text.contains("  proxy uid/gid:  1337/none\n"));
        assert!(text.contains("  inbound port:   none (inbound not captured)\n"));
        assert!(text.contains("  when proxy down: direct\n"));
        assert!(text.contains("on PodCgroup\n"));
        assert!(text.ends_with("iptables capture (this netns): none installed\n"));
    }
}
