//! The clustermesh control plane on top of a [`Harness`] topology: one state directory
//! per cluster (made by the real `clustermesh enable`), Kubernetes-format manifests
//! describing the topology's nodes, pods and the global echo service, and a real
//! `clustermesh-apiserver` per cluster running in its first node's namespace.
//!
//! Each node also runs a real `clustermesh-agent` in its namespace, attached to the node's
//! cgroup, which watches every connected cluster's mesh API and programs the node's
//! socket load balancer.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub use clustermesh_api::agent_config::WatchMode;

use crate::harness::Harness;
use crate::topology;
use crate::{cleanup, Error, Result};

/// Port of every mesh API server (on its node's fabric address).
pub const MESH_API_PORT: u16 = 2379;
/// Port the echo pods listen on.
pub const ECHO_PORT: u16 = 8080;
/// Cluster IP of the global echo service (same in every cluster, as with Cilium).
pub const ECHO_VIP: &str = "10.96.0.10";

/// Paths of the workspace binaries the mesh runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `clustermesh` (the CLI).
    pub cli: PathBuf,
    /// `clustermesh-apiserver`.
    pub apiserver: PathBuf,
    /// `clustermesh-agent`.
    pub agent: PathBuf,
}

impl Binaries {
    /// The binaries next to `sibling` (a binary of the same cargo profile), built first
    /// with `cargo build` when `cargo` is given, so a test run never uses stale ones.
    pub fn beside(sibling: &Path, cargo: Option<&Path>) -> Result<Self> {
        let dir = sibling.parent().ok_or_else(|| {
            Error::Topology(format!("{} has no parent directory", sibling.display()))
        })?;
        if let Some(cargo) = cargo {
            let release = dir.file_name().is_some_and(|n| n == "release");
            let mut cmd = Command::new(cargo);
            cmd.args([
                "build",
                "--quiet",
                "--locked",
                "-p",
                "clustermesh-cli",
                "-p",
                "clustermesh-apiserver",
                "-p",
                "clustermesh-agent",
            ]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().map_err(|source| Error::Spawn {
                command: format!("{} build", cargo.display()),
                source,
            })?;
            if !status.success() {
                return Err(Error::Topology(
                    "cargo build of clustermesh-cli/clustermesh-apiserver/clustermesh-agent failed; \
                     run `cargo build -p clustermesh-cli -p clustermesh-apiserver -p clustermesh-agent` to see why"
                        .into(),
                ));
            }
        }
        let b = Self {
            cli: dir.join("clustermesh"),
            apiserver: dir.join("clustermesh-apiserver"),
            agent: dir.join("clustermesh-agent"),
        };
        for p in [&b.cli, &b.apiserver, &b.agent] {
            if !p.is_file() {
                return Err(Error::Topology(format!(
                    "{} is missing; build it with `cargo build -p clustermesh-cli -p clustermesh-apiserver -p clustermesh-agent`",
                    p.display()
                )));
            }
        }
        Ok(b)
    }
}

/// Output of one CLI run.
#[derive(Debug, Clone)]
pub struct CliRun {
    /// Exit status was 0.
    pub ok: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// The control plane of every cluster of a harness.
#[derive(Debug)]
pub struct Mesh {
    bins: Binaries,
    state_root: PathBuf,
    apiserver_pids: Vec<Option<u32>>,
    agent_pids: Vec<Vec<Option<u32>>>,
    /// Per cluster: what its manifests say.
    manifests: Vec<Manifests>,
    /// Extra flags of every agent.
    agent_args: Vec<String>,
    /// Extra flags of every mesh API server.
    apiserver_args: Vec<String>,
    /// How agents reach the other cluster (`clustermesh enable --agent-mode`).
    mode: WatchMode,
}

/// What a cluster's manifests hold beyond the topology.
#[derive(Debug, Clone)]
struct Manifests {
    /// The echo endpoints are ready.
    ready: bool,
    /// Pods listed (node, pod); the others exist but are not exported yet.
    exported: BTreeSet<(usize, usize)>,
    /// More objects (network policies...), appended as they are.
    extra: String,
}

impl Mesh {
    /// Prepares state directories (under the run's directory, removed at teardown) and
    /// writes each cluster's manifests. Nothing runs yet.
    pub fn new(h: &Harness, bins: Binaries) -> Result<Self> {
        let state_root = cleanup::state_dir(h.run_id());
        std::fs::create_dir_all(&state_root).map_err(|source| Error::Io {
            action: "create",
            path: state_root.clone(),
            source,
        })?;
        let manifests = h
            .spec()
            .clusters
            .iter()
            .map(|c| Manifests {
                ready: true,
                exported: c
                    .nodes
                    .iter()
                    .enumerate()
                    .flat_map(|(n, node)| {
                        node.pods
                            .iter()
                            .enumerate()
                            .filter(|(_, pod)| pod.exported)
                            .map(move |(p, _)| (n, p))
                    })
                    .collect(),
                extra: String::new(),
            })
            .collect();
        Ok(Self {
            bins,
            state_root,
            manifests,
            agent_args: Vec::new(),
            apiserver_args: Vec::new(),
            mode: WatchMode::Mirror,
            apiserver_pids: vec![None; h.spec().clusters.len()],
            agent_pids: h
                .spec()
                .clusters
                .iter()
                .map(|c| vec![None; c.nodes.len()])
                .collect(),
        })
    }

    /// Passes `args` to every agent started from now on (e.g. `--stale-ttl=5s`).
    pub fn set_agent_args(&mut self, args: &[&str]) {
        self.agent_args = args.iter().map(|a| (*a).to_string()).collect();
    }

    /// Passes `args` to every mesh API server started from now on.
    pub fn set_apiserver_args(&mut self, args: &[&str]) {
        self.apiserver_args = args.iter().map(|a| (*a).to_string()).collect();
    }

    /// How agents reach the other cluster, for clusters enabled from now on: `mirror`
    /// (the default: agents watch their own mesh API server, which mirrors the peer) or
    /// `direct` (agents watch both clusters' servers).
    pub fn set_mode(&mut self, mode: WatchMode) {
        self.mode = mode;
    }

    /// The mode clusters are enabled in.
    #[must_use]
    pub fn mode(&self) -> WatchMode {
        self.mode
    }

    /// State directory of cluster `c`.
    #[must_use]
    pub fn state_dir(&self, c: usize) -> PathBuf {
        self.state_root.join(format!("cluster{}", c + 1))
    }

    /// Admin socket of the agent of node `n` of cluster `c`.
    #[must_use]
    pub fn agent_socket(&self, c: usize, n: usize) -> PathBuf {
        self.state_root
            .join(format!("c{}n{}-agent.sock", c + 1, n + 1))
    }

    /// Log file of the agent of node `n` of cluster `c`.
    #[must_use]
    pub fn agent_log(&self, c: usize, n: usize) -> PathBuf {
        self.state_root
            .join(format!("c{}n{}-agent.log", c + 1, n + 1))
    }

    /// Starts the agent of node `n` of cluster `c`: in the node's namespace, attached to
    /// the node's cgroup, pinning its maps under the node's pin directory, reading the
    /// cluster's `agent.yaml`. Waits until its admin socket answers.
    pub fn start_agent(&mut self, h: &mut Harness, c: usize, n: usize) -> Result<()> {
        let node = h.spec().clusters[c].nodes[n].name.clone();
        let socket = self.agent_socket(c, n);
        let _ = std::fs::remove_file(&socket);
        let mut args: Vec<String> = vec![
            format!(
                "--config={}",
                self.state_dir(c).join("agent.yaml").display()
            ),
            format!("--node-name={node}"),
            format!("--zone=zone-{}", n + 1),
            format!("--admin-socket={}", socket.display()),
            "--datapath=bpf".into(),
            format!("--bpf-pin-dir={}", h.node_bpf_pin_dir(c, n).display()),
            format!("--cgroup={}", h.node_cgroup(c, n).display()),
            "--config-poll=200ms".into(),
            "--max-backoff=1s".into(),
            "--log-format=json".into(),
        ];
        args.extend(self.agent_args.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.agent_log(c, n);
        let label = format!("{}-{node}-agent", h.spec().clusters[c].name);
        let pid = h.spawn_in_node_logged(c, n, &label, &self.bins.agent, &argv, Some(&log))?;
        self.agent_pids[c][n] = Some(pid);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if Instant::now() >= deadline {
                return Err(Error::Topology(format!(
                    "agent of {label} did not open {} within 30s (log: {})",
                    socket.display(),
                    log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// `GET path` on the admin API of the agent of node `n` of cluster `c`; returns the
    /// body of a 200 answer.
    pub fn agent_get(&self, c: usize, n: usize, path: &str) -> Result<String> {
        use std::io::{Read, Write};
        let socket = self.agent_socket(c, n);
        let io = |source| Error::Io {
            action: "query the agent admin API on",
            path: socket.clone(),
            source,
        };
        let mut stream = std::os::unix::net::UnixStream::connect(&socket).map_err(io)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io)?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .map_err(io)?;
        let mut text = String::new();
        stream
            .take(64 << 20)
            .read_to_string(&mut text)
            .map_err(io)?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.lines().next().unwrap_or_default();
        if !status.contains(" 200 ") {
            return Err(Error::Topology(format!(
                "agent {} answered `GET {path}` with `{status}`: {}",
                socket.display(),
                body.trim()
            )));
        }
        Ok(body.to_string())
    }

    /// Sum of the samples of Prometheus metric `name` whose labels include every
    /// `key="value"` of `labels` (all label sets when empty), from the admin API
    /// (`GET /metrics`) of the agent of node `n` of cluster `c`. An absent series is 0 when
    /// labels are given, an error otherwise.
    pub fn agent_metric_with(
        &self,
        c: usize,
        n: usize,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<f64> {
        let body = self.agent_get(c, n, "/metrics")?;
        let mut sum = 0.0;
        let mut found = false;
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let metric = series.split('{').next().unwrap_or_default();
            let wanted = labels
                .iter()
                .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")));
            if metric == name && wanted {
                if let Ok(v) = value.trim().parse::<f64>() {
                    sum += v;
                    found = true;
                }
            }
        }
        if found || !labels.is_empty() {
            Ok(sum)
        } else {
            Err(Error::Topology(format!("agent metrics have no {name}")))
        }
    }

    /// Sum of the samples of Prometheus metric `name` (all label sets) of the agent of
    /// node `n` of cluster `c`.
    pub fn agent_metric(&self, c: usize, n: usize, name: &str) -> Result<f64> {
        self.agent_metric_with(c, n, name, &[])
    }

    /// Kills the agent of node `n` of cluster `c`.
    pub fn kill_agent(&mut self, h: &mut Harness, c: usize, n: usize) {
        if let Some(pid) = self.agent_pids[c][n].take() {
            h.kill_pid(pid);
        }
    }

    /// Log file of cluster `c`'s mesh API server (kept until teardown).
    #[must_use]
    pub fn apiserver_log(&self, c: usize) -> PathBuf {
        self.state_root
            .join(format!("cluster{}-apiserver.log", c + 1))
    }

    /// Mesh API address of cluster `c` (its first node's fabric address).
    #[must_use]
    pub fn mesh_endpoint(c: usize) -> SocketAddr {
        SocketAddr::new(topology::node_ip(c, 0).into(), MESH_API_PORT)
    }

    /// Runs the CLI in the host namespace (state-directory-only commands).
    pub fn cli(&self, args: &[&str]) -> Result<CliRun> {
        let out = Command::new(&self.bins.cli)
            .args(args)
            .env_remove("CLUSTERMESH_STATE_DIR")
            .output()
            .map_err(|source| Error::Spawn {
                command: format!("{} {}", self.bins.cli.display(), args.join(" ")),
                source,
            })?;
        Ok(CliRun {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs the CLI inside node `n` of cluster `c` (commands that reach mesh API servers).
    pub fn cli_on_node(&self, h: &Harness, c: usize, n: usize, args: &[&str]) -> Result<CliRun> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", h.node_netns(c, n)))
            .arg("--")
            .arg(&self.bins.cli)
            .args(args)
            .env_remove("CLUSTERMESH_STATE_DIR")
            .output()
            .map_err(|source| Error::Spawn {
                command: format!("nsenter {} {}", self.bins.cli.display(), args.join(" ")),
                source,
            })?;
        Ok(CliRun {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// `clustermesh enable` for cluster `c` with ID `c+1`, then writes its manifests.
    pub fn enable(&mut self, h: &Harness, c: usize) -> Result<CliRun> {
        let dir = self.state_dir(c);
        let name = h.spec().clusters[c].name.clone();
        let id = (c + 1).to_string();
        let ep = Self::mesh_endpoint(c).to_string();
        let state = dir.display().to_string();
        let sockets: Vec<String> = (0..h.spec().clusters[c].nodes.len())
            .map(|n| self.agent_socket(c, n).display().to_string())
            .collect();
        let mut args = vec![
            "--state-dir",
            &state,
            "enable",
            "--cluster-name",
            &name,
            "--cluster-id",
            &id,
            "--mesh-endpoint",
            &ep,
            "--agent-mode",
            self.mode.as_str(),
        ];
        for s in &sockets {
            args.extend(["--agent-socket", s.as_str()]);
        }
        let run = self.cli(&args)?;
        if run.ok {
            self.set_ready(h, c, true)?;
        }
        Ok(run)
    }

    /// Rewrites cluster `c`'s manifests with every echo endpoint ready or not ready; the
    /// apiserver's `dir:` source picks the change up.
    pub fn set_ready(&mut self, h: &Harness, c: usize, ready: bool) -> Result<()> {
        self.manifests[c].ready = ready;
        self.write_manifests(h, c)
    }

    /// Rewrites cluster `c`'s manifests with `yaml` (Kubernetes objects such as network
    /// policies, `---`-separated) after the topology's objects, replacing the previous
    /// extra objects.
    pub fn set_extra_manifests(&mut self, h: &Harness, c: usize, yaml: &str) -> Result<()> {
        self.manifests[c].extra = yaml.to_string();
        self.write_manifests(h, c)
    }

    /// Lists pod `p` of node `n` of cluster `c` in the cluster's manifests from now on.
    pub fn export_pod(&mut self, h: &Harness, c: usize, n: usize, p: usize) -> Result<()> {
        self.manifests[c].exported.insert((n, p));
        self.write_manifests(h, c)
    }

    /// Cluster `c`'s manifests as they are now.
    #[must_use]
    pub fn manifests(&self, h: &Harness, c: usize) -> String {
        let m = &self.manifests[c];
        let mut y = topology_manifests(h, c, m.ready, &m.exported);
        if !m.extra.trim().is_empty() {
            y.push_str("---\n");
            y.push_str(&m.extra);
            if !m.extra.ends_with('\n') {
                y.push('\n');
            }
        }
        y
    }

    fn write_manifests(&self, h: &Harness, c: usize) -> Result<()> {
        let dir = self.state_dir(c).join("manifests");
        let tmp = dir.join(".topology.yaml.tmp");
        let path = dir.join("topology.yaml");
        std::fs::write(&tmp, self.manifests(h, c)).map_err(|source| Error::Io {
            action: "write",
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| Error::Io {
            action: "rename into",
            path,
            source,
        })
    }

    /// Starts cluster `c`'s mesh API server in its first node and waits until it answers
    /// (`clustermesh status` from that node reports it reachable).
    pub fn start_apiserver(&mut self, h: &mut Harness, c: usize) -> Result<()> {
        let dir = self.state_dir(c);
        let name = h.spec().clusters[c].name.clone();
        let id = (c + 1).to_string();
        let listen = Self::mesh_endpoint(c).to_string();
        let raft_dir = dir.join("raft");
        let (net, len) = topology::cluster_pod_cidr(c);
        let mut args: Vec<String> = vec![
            format!("--cluster-name={name}"),
            format!("--cluster-id={id}"),
            format!("--pod-cidr={net}/{len}"),
            "--store=raft".into(),
            format!("--raft-data-dir={}", raft_dir.display()),
            "--raft-listen=127.0.0.1:2380".into(),
            format!("--source=dir:{}", dir.join("manifests").display()),
            "--dir-poll-interval=200ms".into(),
            format!("--listen={listen}"),
            "--metrics-addr=127.0.0.1:9962".into(),
            format!("--tls-dir={}", dir.join("tls").display()),
            "--trust-domain=clustermesh.local".into(),
            "--log-format=json".into(),
        ];
        if self.mode == WatchMode::Mirror {
            // The peers are the clusters `connect` adds to the agent configuration.
            args.push(format!(
                "--mirror-peers={}",
                dir.join("agent.yaml").display()
            ));
            args.push("--mirror-peers-poll=200ms".into());
            args.push("--mirror-max-backoff=1s".into());
        }
        args.extend(self.apiserver_args.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.apiserver_log(c);
        let pid = h.spawn_in_node_logged(
            c,
            0,
            &format!("{name}-apiserver"),
            &self.bins.apiserver,
            &argv,
            Some(&log),
        )?;
        self.apiserver_pids[c] = Some(pid);
        let deadline = Instant::now() + Duration::from_secs(30);
        let state = dir.display().to_string();
        loop {
            let run = self.cli_on_node(
                h,
                c,
                0,
                &[
                    "--state-dir",
                    &state,
                    "-o",
                    "json",
                    "status",
                    "--timeout",
                    "1s",
                ],
            )?;
            let up = serde_json_reachable(&run.stdout);
            if up {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Topology(format!(
                    "mesh API server of {name} did not come up within 30s: {} (log: {})",
                    run.stderr.trim(),
                    log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills cluster `c`'s mesh API server.
    pub fn kill_apiserver(&mut self, h: &mut Harness, c: usize) {
        if let Some(pid) = self.apiserver_pids[c].take() {
            h.kill_pid(pid);
        }
    }
}

/// Whether `status -o json` output says the mesh API server answered.
fn serde_json_reachable(stdout: &str) -> bool {
    // A tiny check without a JSON dependency: the field is printed as `"reachable": true`.
    stdout.contains("\"reachable\": true")
}

/// Kubernetes-format manifests of cluster `c`: its nodes, the namespaces of its pods, its
/// exported pods (with UID and labels), and the global echo service with affinity `local`
/// and an EndpointSlice listing the exported `app=echo` pods.
fn topology_manifests(
    h: &Harness,
    c: usize,
    ready: bool,
    exported: &BTreeSet<(usize, usize)>,
) -> String {
    let cluster = &h.spec().clusters[c];
    let mut y = String::new();
    let namespaces: BTreeSet<&str> = cluster
        .nodes
        .iter()
        .flat_map(|n| n.pods.iter().map(|p| p.namespace.as_str()))
        .chain(["default"])
        .collect();
    for ns in namespaces {
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels: {{kubernetes.io/metadata.name: {ns}}}\n---\n"
        );
    }
    let listed = |n: usize, p: usize| exported.contains(&(n, p));
    for (n, node) in cluster.nodes.iter().enumerate() {
        let (net, len) = topology::node_pod_subnet(c, n);
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels: {{topology.kubernetes.io/zone: zone-{}}}\nspec:\n  podCIDR: {net}/{len}\n  podCIDRs: [{net}/{len}]\nstatus:\n  addresses:\n  - {{type: InternalIP, address: {}}}\n---\n",
            node.name,
            n + 1,
            topology::node_ip(c, n)
        );
        for (p, pod) in node.pods.iter().enumerate().filter(|(p, _)| listed(n, *p)) {
            let labels: Vec<String> = pod
                .labels
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let _ = write!(
                y,
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\n  labels: {{{}}}\nspec:\n  nodeName: {}\n  containers: [{{name: echo, image: clustermesh-netns, ports: [{{name: http, containerPort: {ECHO_PORT}, protocol: TCP}}]}}]\nstatus:\n  phase: Running\n  podIP: {}\n---\n",
                pod.name,
                pod.namespace,
                topology::pod_uid(c, n, p),
                labels.join(", "),
                node.name,
                topology::pod_ip(c, n, p)
            );
        }
    }
    let _ = write!(
        y,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: default\n  annotations:\n    service.cilium.io/global: \"true\"\n    service.cilium.io/affinity: local\nspec:\n  type: ClusterIP\n  clusterIP: {ECHO_VIP}\n  clusterIPs: [{ECHO_VIP}]\n  selector: {{app: echo}}\n  ports:\n  - {{name: tcp, port: {ECHO_PORT}, targetPort: {ECHO_PORT}, protocol: TCP}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: echo}}\naddressType: IPv4\nports:\n- {{name: tcp, port: {ECHO_PORT}, protocol: TCP}}\nendpoints:\n"
    );
    let mut any = false;
    for (n, node) in cluster.nodes.iter().enumerate() {
        for (p, pod) in node.pods.iter().enumerate() {
            if !listed(n, p) || pod.namespace != "default" || !pod.has_label("app", "echo") {
                continue;
            }
            any = true;
            let _ = write!(
                y,
                "- addresses: [{}]\n  conditions: {{ready: {ready}, serving: {ready}, terminating: false}}\n  nodeName: {}\n  zone: zone-{}\n  targetRef: {{kind: Pod, name: {}, namespace: default}}\n",
                topology::pod_ip(c, n, p),
                node.name,
                n + 1,
                pod.name
            );
        }
    }
    if !any {
        // `endpoints:` with nothing under it is null; say "none" explicitly.
        y.truncate(y.len() - "endpoints:\n".len());
        y.push_str("endpoints: []\n");
    }
    y
}
