//! Support of the CLI's scenarios that needs the CLI's own binary: [`run_cli`] runs the
//! real `clustermesh` without blocking the test's runtime. The fake Kubernetes API server
//! lives in `clustermesh_test_support::fake_kube`; `helm_render.py` renders the chart with
//! real Helm for the scenarios that compare against it.

// `pub` here is reachable only inside the test binary.
#![allow(unreachable_pub)]
// Test helpers panic on setup failure on purpose.
#![allow(clippy::expect_used)]

use std::path::Path;

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
