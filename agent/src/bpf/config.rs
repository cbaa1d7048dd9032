//! Where the datapath pins its maps and which cgroup it load-balances.
//!
//! Several agents (one per simulated node in the namespace harness) can share one host as
//! long as each has its own pin directory and cgroup.

use std::path::{Path, PathBuf};

use clustermesh_ebpf_common::capacity;

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/clustermesh";
/// Default bpffs mount point (`clustermesh-agent mount-bpffs` mounts it; the agent only checks).
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Configuration of the eBPF datapath.
///
/// ```
/// use clustermesh_agent::bpf::BpfConfig;
/// let cfg = BpfConfig::default()
///     .with_pin_dir("/sys/fs/bpf/node-a")
///     .with_cgroup("/sys/fs/cgroup/node-a")
///     .with_slab_entries(1 << 20);
/// assert_eq!(cfg.pin_dir().to_str(), Some("/sys/fs/bpf/node-a"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpfConfig {
    pin_dir: PathBuf,
    cgroup: Option<PathBuf>,
    bpffs_mount: PathBuf,
    slab_entries: u32,
}

impl Default for BpfConfig {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            cgroup: None,
            bpffs_mount: PathBuf::from(DEFAULT_BPFFS),
            slab_entries: capacity::SLAB_DEFAULT,
        }
    }
}

impl BpfConfig {
    /// Pins maps and links below `dir` (must be on bpffs, or below the bpffs mount point).
    #[must_use]
    pub fn with_pin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.pin_dir = dir.into();
        self
    }

    /// Attaches the programs to this cgroup v2 directory (default: the cgroup2 root).
    #[must_use]
    pub fn with_cgroup(mut self, cgroup: impl Into<PathBuf>) -> Self {
        self.cgroup = Some(cgroup.into());
        self
    }

    /// Where bpffs is expected (a pin directory below it that is not on bpffs means bpffs
    /// was not mounted there).
    #[must_use]
    pub fn with_bpffs_mount(mut self, mount: impl Into<PathBuf>) -> Self {
        self.bpffs_mount = mount.into();
        self
    }

    /// Size of the Maglev slab in table entries (4 bytes each). Only used when the maps are
    /// created; pinned maps keep their size until `--cleanup`.
    #[must_use]
    pub fn with_slab_entries(mut self, entries: u32) -> Self {
        self.slab_entries = entries;
        self
    }

    /// The pin directory.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The configured cgroup, if any.
    #[must_use]
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    /// The bpffs mount point.
    #[must_use]
    pub fn bpffs_mount(&self) -> &Path {
        &self.bpffs_mount
    }

    /// Slab entries for newly created maps.
    #[must_use]
    pub fn slab_entries(&self) -> u32 {
        self.slab_entries
    }

    /// Directory holding the pinned program links.
    #[must_use]
    pub fn links_dir(&self) -> PathBuf {
        self.pin_dir.join("links")
    }
}
