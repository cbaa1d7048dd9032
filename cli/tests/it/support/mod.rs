//! Support of the CLI's scenarios that needs the CLI's own binary: [`run_cli`] runs the
//! real `clustermesh` without blocking the test's runtime. The fake Kubernetes API server
//! lives in `clustermesh_test_support::fake_kube`; `helm_render.py` renders the chart with
//! real Helm for the scenarios that compare against it.

// `pub` here is reachable only inside the test binary.
#![allow(unreachable_pub)]
// Test helpers panic on setup failure on purpose.
#![allow(clippy::expect_used)]

pub mod policy;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What one run of the `clustermesh` binary produced.
#[derive(Debug, Clone)]
pub struct CliRun {
    /// Exit status was 0.
    pub ok: bool,
    /// Exit code (None when killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `clustermesh <args>` with `KUBECONFIG=<kubeconfig>` (and no state-dir variable)
/// as a child process, awaiting it so the fake servers of the test keep being served.
pub async fn run_cli(kubeconfig: &Path, args: &[&str]) -> CliRun {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_clustermesh"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("CLUSTERMESH_STATE_DIR")
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run the clustermesh binary");
    CliRun {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The virtualenv's python (`$CLUSTERMESH_VENV`, default `/var/tmp/clustermesh-venv`) when
/// it imports both the Helm SDK and kubernetes-validate, which `helm_render.py` needs;
/// otherwise `None` after skipping the test (or failing it where prerequisites are required).
pub fn helm_python() -> Option<PathBuf> {
    let venv = std::env::var_os("CLUSTERMESH_VENV")
        .map_or_else(|| PathBuf::from("/var/tmp/clustermesh-venv"), PathBuf::from);
    let python = venv.join("bin/python");
    let usable = Command::new(&python)
        .args(["-c", "import helm_python, kubernetes_validate"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let missing = (!usable).then(|| {
        format!(
            "{} cannot import helm_python and kubernetes_validate; run scripts/setup",
            python.display()
        )
    });
    clustermesh_test_support::prerequisites::may_run("helm render", missing).then_some(python)
}
