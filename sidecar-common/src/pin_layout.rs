//! Where the captures live on bpffs and what their pins are called: the one place these names
//! are spelled, for the loader, `status`, the proxy's `/stats`, the node agent, the tests and
//! the tools.
//!
//! ```text
//! <bpffs>/sidecar/                        the node's directory, locked while a capture changes
//!   cgroup-<inode of the pod's cgroup>/   one pod's capture
//!     map_<MAP>                           its maps (names from `map_names`)
//!     link_<program>                      its links on the pod's cgroup and network namespace
//!     link_<program>_proxy_cgroup         its links on a proxy's sibling cgroup
//!     staging_link_...                    a new link, for a moment, before it replaces the old
//!   node/map_AYA_LOGS                     node-wide: the kernel log ring
//! ```
use std::{
    format,
    path::{Path, PathBuf},
    string::String,
    vec::Vec,
};

use crate::map_names;

/// Where bpffs is normally mounted.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Where a program is attached, which also names its link pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AttachPoint {
    PodCgroup,
    ProxyCgroup,
    Netns,
}

/// The sidecar's pins under one bpffs mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    bpffs: PathBuf,
}

impl Default for PinLayout {
    fn default() -> Self {
        Self::new(DEFAULT_BPFFS)
    }
}

impl PinLayout {
    const SIDECAR_DIR: &str = "sidecar";
    const NODE_DIR: &str = "node";
    const CAPTURE_DIR_PREFIX: &str = "cgroup-";
    const MAP_PREFIX: &str = "map_";
    const LINK_PREFIX: &str = "link_";
    const PROXY_CGROUP_SUFFIX: &str = "_proxy_cgroup";
    // bpffs refuses names with a dot, hence a prefix rather than a ".new" suffix.
    const STAGING_PREFIX: &str = "staging_";

    /// The layout under the bpffs mounted at `bpffs`.
    pub fn new(bpffs: impl Into<PathBuf>) -> Self {
        PinLayout {
            bpffs: bpffs.into(),
        }
    }

    /// The layout a capture directory (from [`PinLayout::capture_dir`]) belongs to.
    pub fn of_capture_dir(capture_dir: &Path) -> Option<Self> {
        let name = capture_dir.file_name()?.to_str()?;
        name.strip_prefix(Self::CAPTURE_DIR_PREFIX)?
            .parse::<u64>()
            .ok()?;
        let sidecar_dir = capture_dir.parent()?;
        if sidecar_dir.file_name()? != Self::SIDECAR_DIR {
            return None;
        }
        Some(Self::new(sidecar_dir.parent()?))
    }

    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// The node's directory: one sub-directory per capture, and the node-wide state.
    pub fn sidecar_dir(&self) -> PathBuf {
        self.bpffs.join(Self::SIDECAR_DIR)
    }

    /// Node-wide state shared by every capture: the kernel log ring.
    pub fn node_dir(&self) -> PathBuf {
        self.sidecar_dir().join(Self::NODE_DIR)
    }

    /// The pin of the node's kernel log ring (aya-log's).
    pub fn kernel_log_ring(&self) -> PathBuf {
        Self::map_pin(&self.node_dir(), map_names::KERNEL_LOGS)
    }

    /// Where the pins of the capture for the cgroup with inode `cgroup_id` live.
    pub fn capture_dir(&self, cgroup_id: u64) -> PathBuf {
        self.sidecar_dir()
            .join(format!("{}{cgroup_id}", Self::CAPTURE_DIR_PREFIX))
    }

    /// `(cgroup id, capture directory)` of every capture pinned, sorted by id; none when the
    /// node's directory is missing or unreadable.
    pub fn capture_dirs(&self) -> Vec<(u64, PathBuf)> {
        let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(self.sidecar_dir())
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|entry| {
                        let name = entry.file_name();
                        let id = name
                            .to_str()?
                            .strip_prefix(Self::CAPTURE_DIR_PREFIX)?
                            .parse()
                            .ok()?;
                        Some((id, entry.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found
    }

    /// The pin name of map `map` (one of `map_names`).
    pub fn map_pin_name(map: &str) -> String {
        format!("{}{map}", Self::MAP_PREFIX)
    }

    /// The pin of map `map` in a capture's (or the node's) directory.
    pub fn map_pin(dir: &Path, map: &str) -> PathBuf {
        dir.join(Self::map_pin_name(map))
    }

    /// The pin name of the link attaching `program` at `point`.
    pub fn link_pin_name(program: &str, point: AttachPoint) -> String {
        match point {
            AttachPoint::PodCgroup | AttachPoint::Netns => {
                format!("{}{program}", Self::LINK_PREFIX)
            }
            AttachPoint::ProxyCgroup => {
                format!(
                    "{}{program}{}",
                    Self::LINK_PREFIX,
                    Self::PROXY_CGROUP_SUFFIX
                )
            }
        }
    }

    /// The pin of the link attaching `program` at `point`, in a capture's directory.
    pub fn link_pin(capture_dir: &Path, program: &str, point: AttachPoint) -> PathBuf {
        capture_dir.join(Self::link_pin_name(program, point))
    }

    /// Where a new link is pinned before it is renamed over the pin `name`.
    pub fn staging_pin(capture_dir: &Path, name: &str) -> PathBuf {
        capture_dir.join(format!("{}{name}", Self::STAGING_PREFIX))
    }

    pub fn is_link_pin(name: &str) -> bool {
        name.starts_with(Self::LINK_PREFIX)
    }

    pub fn is_map_pin(name: &str) -> bool {
        name.starts_with(Self::MAP_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use std::vec;

    use super::*;

    #[test]
    fn spells_the_documented_layout() {
        let layout = PinLayout::default();
        let dir = layout.capture_dir(42);
        assert_eq!(dir, Path::new("/sys/fs/bpf/sidecar/cgroup-42"));
        assert_eq!(layout.node_dir(), Path::new("/sys/fs/bpf/sidecar/node"));
        assert_eq!(
            layout.kernel_log_ring(),
            Path::new("/sys/fs/bpf/sidecar/node/map_AYA_LOGS")
        );
        assert_eq!(
            PinLayout::map_pin(&dir, map_names::COUNTERS),
            Path::new("/sys/fs/bpf/sidecar/cgroup-42/map_COUNTERS")
        );
        assert_eq!(
            PinLayout::link_pin(&dir, "connect4", AttachPoint::PodCgroup),
            Path::new("/sys/fs/bpf/sidecar/cgroup-42/link_connect4")
        );
        let proxy = PinLayout::link_pin_name("track_sockets", AttachPoint::ProxyCgroup);
        assert_eq!(proxy, "link_track_sockets_proxy_cgroup");
        assert!(PinLayout::is_link_pin(&proxy));
        let staging = PinLayout::staging_pin(&dir, &proxy);
        assert!(!PinLayout::is_link_pin(
            staging.file_name().unwrap().to_str().unwrap()
        ));
        assert!(PinLayout::is_map_pin(&PinLayout::map_pin_name("X")));
    }

    #[test]
    fn a_capture_dir_leads_back_to_its_layout() {
        let layout = PinLayout::new("/tmp/bpffs");
        assert_eq!(
            PinLayout::of_capture_dir(&layout.capture_dir(7)),
            Some(layout.clone())
        );
        assert_eq!(PinLayout::of_capture_dir(&layout.node_dir()), None);
        assert_eq!(
            PinLayout::of_capture_dir(Path::new("/tmp/other/cgroup-7")),
            None
        );
    }

    #[test]
    fn lists_the_captures_only() {
        let root = std::env::temp_dir().join(format!("pin-layout-{}", std::process::id()));
        let layout = PinLayout::new(&root);
        assert_eq!(layout.capture_dirs(), vec![], "no node directory: none");
        for dir in [
            layout.capture_dir(20),
            layout.capture_dir(3),
            layout.node_dir(),
        ] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::create_dir_all(layout.sidecar_dir().join("cgroup-x")).unwrap();
        let found = layout.capture_dirs();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            found,
            vec![(3, layout.capture_dir(3)), (20, layout.capture_dir(20))]
        );
    }
}
