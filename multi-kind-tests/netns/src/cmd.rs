//! Runs the external tools the harness drives (`ip`), turning failures into typed errors
//! that quote the command and its stderr.

use std::process::Command;

use crate::Error;

/// Runs `program args...`, returning stdout; a non-zero exit is an [`Error::Command`].
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    let line = format!("{program} {}", args.join(" "));
    tracing::debug!(command = %line, "run");
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| Error::Spawn {
            command: line.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: line,
            status: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip args...`.
pub(crate) fn ip(args: &[&str]) -> Result<String, Error> {
    run("ip", args)
}

/// Runs `ip -n <ns> args...` (the command applies inside network namespace `ns`).
pub(crate) fn ip_in(ns: &str, args: &[&str]) -> Result<String, Error> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Sets a network sysctl inside a namespace by writing `/proc/sys/<key with / for .>`
/// (`ip netns exec` gives the program the namespace's own `/proc/sys/net`); plain `sh`,
/// so no procps is needed.
pub(crate) fn sysctl_in(ns: &str, key: &str, value: &str) -> Result<(), Error> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            &format!("echo {value} > {path}"),
        ],
    )
    .map(|_| ())
}
