//! Errors of the eBPF datapath. Every message names what failed and what to do about it.

use std::path::PathBuf;

use super::plan::PlanError;

/// Result of datapath operations.
pub type Result<T, E = BpfError> = std::result::Result<T, E>;

/// Something the eBPF datapath could not do.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The configured cgroup directory does not exist.
    #[error(
        "cgroup {path} does not exist: create it under the cgroup2 mount or configure an \
         existing cgroup v2 directory (default: the cgroup2 root)"
    )]
    CgroupMissing {
        /// The configured path.
        path: PathBuf,
    },
    /// The configured path exists but is not a cgroup v2 directory.
    #[error(
        "{path} is not a cgroup v2 directory: point the datapath at a directory on the \
         cgroup2 filesystem (see `grep cgroup2 /proc/self/mounts`)"
    )]
    NotCgroup2 {
        /// The configured path.
        path: PathBuf,
    },
    /// No cgroup2 filesystem is mounted.
    #[error(
        "no cgroup2 filesystem is mounted: mount one (`mount -t cgroup2 none /sys/fs/cgroup`) \
         or configure the cgroup path explicitly"
    )]
    NoCgroup2Mount,
    /// The pin directory lies below the bpffs mount point, but bpffs is not mounted there.
    /// The agent does not mount it (see `system`).
    #[error("bpffs is not mounted at {mount}")]
    BpffsNotMounted {
        /// Where bpffs was expected.
        mount: PathBuf,
    },
    /// `mount-bpffs` could not mount bpffs.
    #[error("cannot mount bpffs at {mount}")]
    BpffsMount {
        /// The mount point.
        mount: PathBuf,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// The pin directory is not on a bpffs mount.
    #[error(
        "pin directory {path} is not on bpffs: configure a pin directory below a bpffs mount \
         such as /sys/fs/bpf"
    )]
    PinDirNotBpffs {
        /// The configured pin directory.
        path: PathBuf,
    },
    /// The kernel refused an operation for lack of privileges.
    #[error(
        "missing privileges to {step} (the agent needs CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN \
         and CAP_SYS_RESOURCE)"
    )]
    MissingPrivileges {
        /// What was attempted.
        step: String,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// A map pinned by an earlier run has another layout than this agent's programs.
    #[error(
        "pinned map {path} is incompatible ({found}; this agent needs {expected}): it was \
         written by another clustermesh version. Run the agent with --cleanup (or remove \
         {pin_dir}) and start it again"
    )]
    IncompatiblePinnedMap {
        /// The pinned map.
        path: PathBuf,
        /// The pin directory to clean.
        pin_dir: PathBuf,
        /// What was found.
        found: String,
        /// What this agent needs.
        expected: String,
    },
    /// The Maglev slab has no free block large enough for a service's new table.
    #[error(
        "Maglev slab full: service {service} needs {needed} entries but the largest free \
         block has {largest_free} of {capacity}; the previous table stays in force. Raise the \
         slab size (--bpf-slab-entries, needs --cleanup and a restart) or use smaller tables"
    )]
    SlabFull {
        /// The service that could not be programmed.
        service: String,
        /// Entries needed (table plus backend list).
        needed: u32,
        /// Largest free block.
        largest_free: u32,
        /// Slab capacity.
        capacity: u32,
    },
    /// The desired state of a service cannot be programmed as given.
    #[error("service {service} cannot be programmed: {reason}")]
    InvalidService {
        /// The service.
        service: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// Service or backend ids are exhausted.
    #[error("no free {what} id left (limit {limit}): remove unused services or backends")]
    IdsExhausted {
        /// "service", "backend" or "cluster".
        what: &'static str,
        /// The limit.
        limit: u32,
    },
    /// The datapath object was not built into this binary.
    #[error(
        "the eBPF object is missing from this build (built with AYA_BUILD_SKIP?): rebuild \
         without AYA_BUILD_SKIP after running scripts/setup"
    )]
    ObjectMissing,
    /// The eBPF object could not be loaded.
    #[error("failed to load the eBPF object (maps in {pin_dir}): {source}")]
    Load {
        /// Pin directory used.
        pin_dir: PathBuf,
        /// aya's error.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A program could not be loaded or attached.
    #[error("failed to {step} program {program}: {source}")]
    Program {
        /// Program name.
        program: String,
        /// "load", "attach", "pin".
        step: &'static str,
        /// aya's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A map operation failed.
    #[error("map {map}: failed to {step}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What was attempted.
        step: String,
        /// aya's error.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// The pinned policy maps could not be read.
    #[error("failed to read the pinned policy state")]
    PolicyState(#[source] clustermesh_agent_core::policy::datapath::PolicyDatapathError),
    /// A file system operation failed.
    #[error("failed to {step} {path}: {source}")]
    Io {
        /// What was attempted.
        step: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl BpfError {
    /// The service this error is about, or "*" for datapath-wide failures.
    #[must_use]
    pub fn service(&self) -> &str {
        match self {
            Self::SlabFull { service, .. } | Self::InvalidService { service, .. } => service,
            _ => "*",
        }
    }

    /// Names `service` in the failed step of a map error (a map operation does not know
    /// which service it programs).
    #[must_use]
    pub(crate) fn for_service(self, service: &str) -> Self {
        match self {
            Self::Map { map, step, source } if !service.is_empty() => Self::Map {
                map,
                step: format!("{step} of {service}"),
                source,
            },
            other => other,
        }
    }
}

impl From<PlanError> for BpfError {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::Invalid { service, reason } => Self::InvalidService { service, reason },
            PlanError::SlabFull {
                service,
                needed,
                largest_free,
                capacity,
                ..
            } => Self::SlabFull {
                service,
                needed,
                largest_free,
                capacity,
            },
            PlanError::IdsExhausted { what, limit } => Self::IdsExhausted { what, limit },
        }
    }
}

/// Finds an `EPERM` anywhere in an error's source chain.
pub(crate) fn permission_denied(err: &(dyn std::error::Error + 'static)) -> Option<std::io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(libc_eperm()) {
                return Some(std::io::Error::from_raw_os_error(libc_eperm()));
            }
        }
        cur = e.source();
    }
    None
}

fn libc_eperm() -> i32 {
    nix::errno::Errno::EPERM as i32
}
