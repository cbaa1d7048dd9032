//! The flags `deploy/` passes to the binaries must be flags the binaries accept.
//!
//! Renders the Helm chart for several value sets and reads the systemd units, then runs
//! the real `clustermesh-apiserver` / `clustermesh-agent` with exactly those arguments
//! followed by `--version`: clap parses and validates every argument before it reaches
//! `--version`, so an unknown flag or a malformed value fails here instead of in a
//! cluster. Unprivileged.

// Helpers outside #[test] fns: a failed unwrap there is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use clustermesh_cli::chart::{Chart, Release};
use clustermesh_netns_harness::mesh::Binaries;
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn binaries() -> Binaries {
    let helper = PathBuf::from(env!("CARGO_BIN_EXE_clustermesh-netns"));
    let cargo = std::env::var_os("CARGO").map(PathBuf::from);
    Binaries::beside(&helper, cargo.as_deref()).unwrap()
}

fn accepts(bin: &Path, args: &[String], origin: &str) {
    let out = Command::new(bin)
        .args(args)
        .arg("--version")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{origin}: {} rejects {args:?}: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (container name, args) of every container in the rendered workloads.
fn container_args(values: Value) -> Vec<(String, Vec<String>)> {
    let chart = Chart::load(&root().join("deploy/helm/clustermesh")).unwrap();
    let release = Release {
        name: "clustermesh".into(),
        namespace: "kube-system".into(),
    };
    let mut out = Vec::new();
    for (_, text) in chart.render_documents(&release, &values).unwrap() {
        let doc: Value = serde_yaml::from_str(&text).unwrap();
        if let Some(containers) = doc["spec"]["template"]["spec"]["containers"].as_array() {
            for c in containers {
                let args = c["args"]
                    .as_array()
                    .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
                    .unwrap_or_default();
                out.push((c["name"].as_str().unwrap().to_string(), args));
            }
        }
    }
    out
}

#[test]
fn chart_arguments_are_accepted_by_the_binaries() {
    let b = binaries();
    let base = json!({"cluster": {"name": "cluster1", "id": 1}});
    let mut sets = vec![base.clone()];
    for extra in [
        json!({"apiserver": {"replicas": 3}}),
        json!({"apiserver": {"replicas": 2, "store": {"type": "etcd", "etcd": {"endpoints": "https://etcd:2379", "tlsSecret": "etcd"}}}}),
        json!({"agent": {"staleTTL": "10m"}}),
    ] {
        let mut v = base.clone();
        clustermesh_cli::chart::merge_values(&mut v, &extra);
        sets.push(v);
    }
    let mut seen = (0, 0);
    for values in sets {
        for (name, args) in container_args(values.clone()) {
            // $(VAR) is expanded by the kubelet; any value of the right type will do.
            let args: Vec<String> = args
                .iter()
                .map(|a| a.replace("$(POD_INDEX)", "0"))
                .collect();
            match name.as_str() {
                "apiserver" => {
                    accepts(&b.apiserver, &args, &format!("chart {values}"));
                    seen.0 += 1;
                }
                "agent" => {
                    accepts(&b.agent, &args, &format!("chart {values}"));
                    seen.1 += 1;
                }
                other => panic!("unexpected container {other}"),
            }
        }
    }
    assert_eq!(
        seen,
        (4, 4),
        "every value set renders one apiserver and one agent"
    );
}

/// ExecStart of a unit with `${VAR}` replaced from an env file and line continuations
/// joined, split into words (the units use no quoting).
fn exec_start(unit: &Path, env: &[(String, String)]) -> Vec<String> {
    let text = std::fs::read_to_string(unit).unwrap().replace("\\\n", " ");
    let line = text.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
    let mut line = line.trim_start_matches("ExecStart=").replace("%H", "host1");
    for (k, v) in env {
        line = line.replace(&format!("${{{k}}}"), v);
    }
    assert!(!line.contains("${"), "unexpanded variable in {line}");
    line.split_whitespace()
        .skip(1)
        .map(str::to_string)
        .collect()
}

#[test]
fn systemd_unit_arguments_are_accepted_by_the_binaries() {
    let b = binaries();
    let dir = root().join("deploy/systemd");
    let env: Vec<(String, String)> =
        std::fs::read_to_string(dir.join("clustermesh-apiserver.env.example"))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    accepts(
        &b.apiserver,
        &exec_start(&dir.join("clustermesh-apiserver.service"), &env),
        "apiserver unit",
    );
    accepts(
        &b.agent,
        &exec_start(&dir.join("clustermesh-agent.service"), &[]),
        "agent unit",
    );
}
