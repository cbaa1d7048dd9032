//! `clustermesh-agent mount-bpffs`, the Helm chart's init step: mounts bpffs where it is
//! missing, leaves an existing mount alone, and without CAP_SYS_ADMIN fails with one line
//! that says what it needs. Privileged (mounts bpffs on a temporary directory and
//! unmounts it again); without root it checks the refusal instead, and fails rather than
//! skips under `CLUSTERMESH_REQUIRE_PRIVILEGED=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use nix::sys::statfs::{statfs, BPF_FS_MAGIC};

fn mount_bpffs(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clustermesh-agent"))
        .args(["mount-bpffs", "--path"])
        .arg(path)
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

fn on_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
}

/// Unmounts on drop, however the test ends.
struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        while on_bpffs(self.0) {
            if nix::mount::umount(self.0).is_err() {
                break;
            }
        }
    }
}

#[test]
fn mounts_bpffs_once_and_leaves_an_existing_mount_alone() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("bpf");
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("CLUSTERMESH_REQUIRE_PRIVILEGED").is_none_or(|v| v != "1"),
            "mount-bpffs test needs root"
        );
        let out = mount_bpffs(&target);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(&format!(
                "clustermesh-agent: cannot mount bpffs at {}: ",
                target.display()
            )),
            "{stderr}"
        );
        assert!(stderr.contains("needs CAP_SYS_ADMIN"), "{stderr}");
        return;
    }
    let _unmount = Unmount(&target);
    let out = mount_bpffs(&target);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        on_bpffs(&target),
        "bpffs is not mounted at {}",
        target.display()
    );
    // Again: nothing to do, and no second mount stacked on the first.
    let out = mount_bpffs(&target);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    nix::mount::umount(&target).unwrap();
    assert!(!on_bpffs(&target), "mount-bpffs mounted bpffs twice");
}
