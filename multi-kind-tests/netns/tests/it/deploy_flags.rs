//! The flags `deploy/` passes to the binaries must be flags the binaries accept.
//!
//! Renders the Helm chart for several value sets and reads the systemd units, then runs
//! the real `clustermesh-apiserver` / `clustermesh-agent` with exactly those arguments
//! followed by `--version`: clap parses and validates every argument before it reaches
//! `--version`, so an unknown flag or a malformed value fails here instead of in a
//! cluster. Also checks the Dockerfile against the workspace: its Rust image is new
//! enough for every locked package's rust-version, and every binary the chart and the
//! systemd units run is compiled and shipped by a Dockerfile target. Unprivileged.

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

/// (container name, args) of every container and init container in the rendered workloads.
fn container_args(values: Value) -> Vec<(String, Vec<String>)> {
    let chart = Chart::load(&root().join("deploy/helm/clustermesh")).unwrap();
    let release = Release {
        name: "clustermesh".into(),
        namespace: "kube-system".into(),
    };
    let mut out = Vec::new();
    for (_, text) in chart.render_documents(&release, &values).unwrap() {
        let doc: Value = clustermesh_api::yaml::from_str(&text).unwrap();
        for kind in ["initContainers", "containers"] {
            for c in doc["spec"]["template"]["spec"][kind]
                .as_array()
                .into_iter()
                .flatten()
            {
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
    let mut seen = (0, 0, 0);
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
                // The agent image's one-shot bpffs mount (`clustermesh-agent mount-bpffs`).
                "mount-bpffs" => {
                    accepts(&b.agent, &args, &format!("chart {values}"));
                    seen.2 += 1;
                }
                other => panic!("unexpected container {other}"),
            }
        }
    }
    assert_eq!(
        seen,
        (4, 4, 4),
        "every value set renders one apiserver, one agent and its mount-bpffs init container"
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

/// The Dockerfile with line continuations joined, split into its stages:
/// (stage name, instructions).
fn dockerfile_stages() -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(root().join("deploy/docker/Dockerfile"))
        .unwrap()
        .replace("\\\n", " ");
    let mut stages: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(from) = line.strip_prefix("FROM ") {
            let name = from
                .split_whitespace()
                .skip_while(|w| !w.eq_ignore_ascii_case("as"))
                .nth(1)
                .unwrap_or_else(|| panic!("Dockerfile stage without a name: {line}"));
            stages.push((name.to_string(), Vec::new()));
        } else if let Some((_, lines)) = stages.last_mut() {
            lines.push(line.to_string());
        }
    }
    stages
}

/// "1.89" or "1.89.0" as (major, minor).
fn major_minor(v: &str) -> (u32, u32) {
    let mut parts = v.trim().trim_matches('"').split('.');
    let mut next = || parts.next().unwrap().parse::<u32>().unwrap();
    (next(), next())
}

/// `cargo metadata` of the workspace (`--offline`: the test build already fetched
/// every dependency).
fn cargo_metadata(extra: &[&str]) -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--locked"])
        .args(extra)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn dockerfile_rust_version_meets_the_workspace_rust_version() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/docker/Dockerfile")).unwrap();
    let image = dockerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix("ARG RUST_VERSION="))
        .expect("the Dockerfile declares ARG RUST_VERSION=<version>");
    // Every package the Linux build compiles: the workspace's own rust-version and those
    // of the locked dependencies (cargo refuses a crate whose rust-version is newer).
    let meta = cargo_metadata(&["--filter-platform", "x86_64-unknown-linux-gnu"]);
    let mut checked = 0;
    for p in meta["packages"].as_array().unwrap() {
        let Some(required) = p["rust_version"].as_str() else {
            continue;
        };
        checked += 1;
        assert!(
            major_minor(image) >= major_minor(required),
            "deploy/docker/Dockerfile builds with Rust {image} but {} {} needs rust-version {required}",
            p["name"].as_str().unwrap(),
            p["version"].as_str().unwrap()
        );
    }
    assert!(checked > 0, "no package declares a rust-version");
}

/// Package that builds binary `bin`, from `cargo metadata`.
fn package_of_binary(bin: &str) -> String {
    let meta = cargo_metadata(&["--no-deps"]);
    for p in meta["packages"].as_array().unwrap() {
        let builds =
            p["targets"].as_array().unwrap().iter().any(|t| {
                t["name"] == bin && t["kind"].as_array().unwrap().iter().any(|k| k == "bin")
            });
        if builds {
            return p["name"].as_str().unwrap().to_string();
        }
    }
    panic!("no workspace package builds a binary named {bin}");
}

/// Checks the build stage compiles `bin`'s package and copies `bin` out, and returns
/// the names of the stages whose image contains `bin`.
fn dockerfile_builds(stages: &[(String, Vec<String>)], bin: &str, origin: &str) -> Vec<String> {
    let (build_stage, build) = stages
        .iter()
        .find(|(_, lines)| lines.iter().any(|l| l.contains("cargo build")))
        .expect("a Dockerfile stage runs cargo build");
    let cargo_build = build.iter().find(|l| l.contains("cargo build")).unwrap();
    let words: Vec<&str> = cargo_build.split_whitespace().collect();
    let package = package_of_binary(bin);
    assert!(
        words.windows(2).any(|w| w == ["-p", package.as_str()]),
        "{origin} runs {bin}, but the Dockerfile's `cargo build` in stage {build_stage} has no `-p {package}`"
    );
    assert!(
        cargo_build.contains(&format!("/target/release/{bin} ")),
        "{origin} runs {bin}, but stage {build_stage} does not copy /target/release/{bin} to /out"
    );
    stages
        .iter()
        .filter(|(_, lines)| {
            lines
                .iter()
                .any(|l| l.starts_with("COPY --from=") && l.contains(&format!("/out/{bin} ")))
        })
        .map(|(name, _)| name.clone())
        .collect()
}

#[test]
fn every_binary_deploy_runs_is_built_by_a_dockerfile_target() {
    let stages = dockerfile_stages();
    // Chart: image <prefix>/clustermesh-<target> is `docker build --target <target>`
    // (the Dockerfile header and multi-kind-tests/kind/run.sh); with no `command` in the
    // pod spec the container runs that target's ENTRYPOINT.
    let chart = Chart::load(&root().join("deploy/helm/clustermesh")).unwrap();
    let release = Release {
        name: "clustermesh".into(),
        namespace: "kube-system".into(),
    };
    let values = json!({"cluster": {"name": "cluster1", "id": 1}, "apiserver": {"replicas": 3}});
    let mut images = std::collections::BTreeSet::new();
    for (_, text) in chart.render_documents(&release, &values).unwrap() {
        let doc: Value = clustermesh_api::yaml::from_str(&text).unwrap();
        for kind in ["initContainers", "containers"] {
            for c in doc["spec"]["template"]["spec"][kind]
                .as_array()
                .into_iter()
                .flatten()
            {
                assert!(
                    c["command"].is_null(),
                    "container {} overrides the image's ENTRYPOINT",
                    c["name"]
                );
                let image = c["image"].as_str().unwrap();
                let repo = image.rsplit_once(':').map_or(image, |(r, _)| r);
                images.insert(repo.rsplit('/').next().unwrap().to_string());
            }
        }
    }
    assert!(images.contains("clustermesh-apiserver") && images.contains("clustermesh-agent"));
    for image in &images {
        let target = image
            .strip_prefix("clustermesh-")
            .unwrap_or_else(|| panic!("chart image {image} is not clustermesh-<target>"));
        let (_, lines) = stages
            .iter()
            .find(|(name, _)| name == target)
            .unwrap_or_else(|| {
                panic!("chart image {image}: the Dockerfile has no target {target}")
            });
        let entrypoint = lines
            .iter()
            .find_map(|l| l.strip_prefix("ENTRYPOINT "))
            .unwrap_or_else(|| panic!("Dockerfile target {target} has no ENTRYPOINT"));
        let entry: Vec<String> = serde_json::from_str(entrypoint).unwrap();
        let bin = entry[0].rsplit('/').next().unwrap();
        let holders = dockerfile_builds(&stages, bin, &format!("chart image {image}"));
        assert!(
            holders.iter().any(|h| h == target),
            "Dockerfile target {target} runs {bin} but does not copy it from the build stage"
        );
    }
    // systemd units run the binaries from a host install; the images are where the
    // binaries of a release come from, so each must be built and shipped in some target.
    for unit in ["clustermesh-apiserver.service", "clustermesh-agent.service"] {
        let path = root().join("deploy/systemd").join(unit);
        let text = std::fs::read_to_string(&path).unwrap();
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap();
        let bin = exec
            .split_whitespace()
            .next()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap();
        let holders = dockerfile_builds(&stages, bin, &format!("systemd unit {unit}"));
        assert!(
            !holders.is_empty(),
            "systemd unit {unit} runs {bin}, which no Dockerfile target ships"
        );
    }
}
