//! `multi-kind-tests/kind/run.sh` checks every prerequisite before it does anything and
//! names each missing one on a line of its own (it used to stop at the first, and did not
//! check protoc, which building the CLI needs). Runs the script with a PATH holding only
//! what the test puts there; nothing is built or created. Unprivileged.

// Helpers outside #[test] fns: a failed unwrap there is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kind/run.sh")
}

/// An executable on the test's own PATH.
fn which(name: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not on PATH"))
}

/// A bin directory with `dirname` (the script's first line needs it) and, for each of
/// `tools`, a stand-in that exits with the given code.
fn bin_dir(tools: &[(&str, i32)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(which("dirname"), dir.path().join("dirname")).unwrap();
    for (tool, code) in tools {
        let path = dir.path().join(tool);
        std::fs::write(&path, format!("#!/bin/sh\nexit {code}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// Runs `run.sh step` with PATH = `bin`; returns (success, stdout, stderr).
fn run(bin: &Path, step: &str) -> (bool, String, String) {
    let out = Command::new(which("bash"))
        .arg(script())
        .arg(step)
        .env_clear()
        .env("PATH", bin)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn missing(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("missing prerequisite: "))
        .map(|l| l.split([' ', ',']).next().unwrap())
        .collect()
}

#[test]
fn a_bare_machine_is_told_every_missing_tool_at_once() {
    let bin = bin_dir(&[]);
    let (ok, stdout, stderr) = run(bin.path(), "up");
    assert!(!ok);
    assert_eq!(stdout, "", "nothing may start before the checks pass");
    assert_eq!(
        missing(&stderr),
        ["docker", "kind", "kubectl", "cargo", "protoc"],
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().last().unwrap(),
        "error: install the missing prerequisites above (see multi-kind-tests/kind/README.md)"
    );
    // The default step (up, test, then down) checks the same before anything else.
    let (ok, stdout, stderr_all) = run(bin.path(), "all");
    assert!(!ok);
    assert_eq!(stdout, "");
    assert_eq!(stderr_all, stderr);
}

#[test]
fn a_missing_protoc_is_named_with_how_to_get_it() {
    let bin = bin_dir(&[("docker", 0), ("kind", 0), ("kubectl", 0), ("cargo", 0)]);
    let (ok, stdout, stderr) = run(bin.path(), "up");
    assert!(!ok);
    assert_eq!(stdout, "");
    assert_eq!(missing(&stderr), ["protoc"], "{stderr}");
    assert!(
        stderr.contains("apt-get install protobuf-compiler"),
        "{stderr}"
    );
}

#[test]
fn a_stopped_docker_daemon_is_a_missing_prerequisite() {
    let bin = bin_dir(&[
        ("docker", 1),
        ("kind", 0),
        ("kubectl", 0),
        ("cargo", 0),
        ("protoc", 0),
    ]);
    let (ok, _, stderr) = run(bin.path(), "up");
    assert!(!ok);
    assert_eq!(missing(&stderr), ["a"], "{stderr}");
    assert!(
        stderr.contains("missing prerequisite: a running Docker daemon"),
        "{stderr}"
    );
}

#[test]
fn test_needs_no_build_tools() {
    let bin = bin_dir(&[("docker", 0), ("kind", 0)]);
    let (ok, _, stderr) = run(bin.path(), "test");
    assert!(!ok);
    assert_eq!(missing(&stderr), ["kubectl"], "{stderr}");
}
