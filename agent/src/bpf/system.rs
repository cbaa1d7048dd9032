//! Host prerequisites: finding the cgroup2 mount, checking the configured cgroup, and
//! checking that the pin directory is on bpffs.
//!
//! The long-running agent never mounts anything: mounting bpffs needs CAP_SYS_ADMIN and,
//! in a container, `Bidirectional` mount propagation, which the agent container does not
//! get. [`mount_bpffs`] does it once per boot instead, run by `clustermesh-agent
//! mount-bpffs` in the Helm chart's privileged init container (as Cilium's `mount-bpf-fs`
//! init container does) or by systemd's `sys-fs-bpf.mount` on hosts.

use std::path::{Path, PathBuf};

use nix::sys::statfs::{statfs, BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC};

use super::error::{BpfError, Result};

/// Finds the first cgroup2 mount in `/proc/self/mounts` (on hybrid hosts it is not at
/// `/sys/fs/cgroup`).
///
/// # Errors
/// [`BpfError::NoCgroup2Mount`] when none is mounted.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|source| BpfError::Io {
        step: "read",
        path: PathBuf::from("/proc/self/mounts"),
        source,
    })?;
    find_mount(&mounts, "cgroup2").ok_or(BpfError::NoCgroup2Mount)
}

/// Finds the mount point of the first filesystem of type `fstype` in a mounts table.
pub(crate) fn find_mount(mounts: &str, fstype: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next()?;
        let target = fields.next()?;
        (fields.next()? == fstype).then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Resolves the cgroup to attach to and checks that it is a cgroup v2 directory.
///
/// # Errors
/// [`BpfError::CgroupMissing`], [`BpfError::NotCgroup2`] or [`BpfError::NoCgroup2Mount`].
pub fn resolve_cgroup(configured: Option<&Path>) -> Result<PathBuf> {
    let path = match configured {
        Some(p) => p.to_path_buf(),
        None => cgroup2_mount()?,
    };
    if !path.is_dir() {
        return Err(BpfError::CgroupMissing { path });
    }
    match statfs(&path) {
        Ok(fs) if fs.filesystem_type() == CGROUP2_SUPER_MAGIC => Ok(path),
        Ok(_) => Err(BpfError::NotCgroup2 { path }),
        Err(e) => Err(BpfError::Io {
            step: "statfs",
            path,
            source: e.into(),
        }),
    }
}

/// True when `path` (which must exist) is on bpffs.
fn on_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
}

/// What [`mount_bpffs`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BpffsMount {
    /// bpffs was mounted there already; nothing was done.
    AlreadyMounted,
    /// bpffs was mounted now.
    Mounted,
}

/// Mounts bpffs at `mount` unless it is on bpffs already (creating the directory first).
/// Needs CAP_SYS_ADMIN; in a container the mount reaches the host only through a volume
/// with `Bidirectional` propagation.
///
/// # Errors
/// [`BpfError::Io`] when the directory cannot be created, [`BpfError::BpffsMount`] when
/// the kernel refuses the mount.
pub fn mount_bpffs(mount: &Path) -> Result<BpffsMount> {
    std::fs::create_dir_all(mount).map_err(|source| BpfError::Io {
        step: "create the bpffs mount point",
        path: mount.to_path_buf(),
        source,
    })?;
    if on_bpffs(mount) {
        return Ok(BpffsMount::AlreadyMounted);
    }
    nix::mount::mount(
        Some("bpf"),
        mount,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| BpfError::BpffsMount {
        mount: mount.to_path_buf(),
        source: errno.into(),
    })?;
    Ok(BpffsMount::Mounted)
}

/// Checks that `pin_dir` can live on bpffs and creates it. Nothing is mounted here (see
/// the module header): when bpffs is missing at `mount`, the answer is an error that says
/// so.
///
/// # Errors
/// [`BpfError::BpffsNotMounted`] when the pin directory lies below `mount` and bpffs is
/// not mounted there, [`BpfError::PinDirNotBpffs`] when the pin directory is elsewhere,
/// [`BpfError::Io`] when it cannot be created.
pub fn ensure_pin_dir(pin_dir: &Path, mount: &Path) -> Result<()> {
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    if !on_bpffs(existing) {
        if pin_dir.starts_with(mount) {
            return Err(BpfError::BpffsNotMounted {
                mount: mount.to_path_buf(),
            });
        }
        return Err(BpfError::PinDirNotBpffs {
            path: pin_dir.to_path_buf(),
        });
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| BpfError::Io {
        step: "create pin directory",
        path: pin_dir.to_path_buf(),
        source,
    })?;
    if !on_bpffs(pin_dir) {
        return Err(BpfError::PinDirNotBpffs {
            path: pin_dir.to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_in_a_hybrid_layout() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        assert_eq!(
            find_mount(mounts, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_mount(mounts, "bpf"), None);
    }

    #[test]
    fn unescapes_octal_sequences_in_mount_paths() {
        let mounts = "none /mnt/with\\040space cgroup2 rw 0 0\n";
        assert_eq!(
            find_mount(mounts, "cgroup2"),
            Some(PathBuf::from("/mnt/with space"))
        );
    }

    proptest::proptest! {
        /// The mounts table is parsed defensively: any input, including broken escapes and
        /// non-ASCII bytes after a backslash, yields a result instead of a panic.
        #[test]
        fn any_mounts_table_parses_without_panicking(table in ".{0,200}", target in "[a-z/\\\\0-9é]{1,30}") {
            let _ = find_mount(&table, "cgroup2");
            let line = format!("none {target} cgroup2 rw 0 0");
            let found = find_mount(&line, "cgroup2");
            proptest::prop_assert!(found.is_some());
            if !target.contains('\\') {
                proptest::prop_assert_eq!(found, Some(PathBuf::from(&target)));
            }
        }
    }

    #[test]
    fn missing_cgroup_is_reported_by_path() {
        let err = resolve_cgroup(Some(Path::new("/nonexistent/cgroup/for-test"))).unwrap_err();
        assert!(matches!(err, BpfError::CgroupMissing { .. }));
        assert!(err.to_string().contains("/nonexistent/cgroup/for-test"));
    }

    /// On a node where nothing mounted bpffs (a kind node), the agent does not try to mount
    /// it (its container lacks CAP_SYS_ADMIN) but says that bpffs is missing, in words that
    /// match the chart: no advice to grant CAP_SYS_ADMIN.
    #[test]
    fn a_missing_bpffs_is_reported_not_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("bpf");
        std::fs::create_dir(&mount).unwrap();
        let err = ensure_pin_dir(&mount.join("clustermesh"), &mount).unwrap_err();
        assert!(
            !on_bpffs(&mount),
            "the agent mounted bpffs itself at {}",
            mount.display()
        );
        let text = err.to_string();
        assert_eq!(
            text,
            format!("bpffs is not mounted at {}", mount.display()),
            "{err:?}"
        );
        assert!(matches!(err, BpfError::BpffsNotMounted { .. }), "{err:?}");
        assert!(!mount.join("clustermesh").exists());
    }

    /// The privileges the agent asks for are the ones the chart's agent container has.
    #[test]
    fn missing_privileges_name_the_capabilities_the_chart_grants() {
        let err = BpfError::MissingPrivileges {
            step: "attach program connect4".into(),
            source: std::io::Error::from_raw_os_error(nix::errno::Errno::EPERM as i32),
        };
        let text = err.to_string();
        for cap in [
            "CAP_BPF",
            "CAP_PERFMON",
            "CAP_NET_ADMIN",
            "CAP_SYS_RESOURCE",
        ] {
            assert!(text.contains(cap), "{text}");
        }
        assert!(!text.contains("SYS_ADMIN"), "{text}");
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        let err = resolve_cgroup(Some(Path::new("/proc"))).unwrap_err();
        assert!(matches!(err, BpfError::NotCgroup2 { .. }), "{err}");
    }
}
