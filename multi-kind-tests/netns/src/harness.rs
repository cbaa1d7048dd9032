//! Builds a [`TopologySpec`] out of namespaces, veths, bridges, routes and cgroups, runs
//! processes inside it, and tears everything down on drop.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::topology::{self, TopologySpec};
use crate::{cgroup, cleanup, cmd, Error, Result};

static NEXT_RUN: AtomicU32 = AtomicU32::new(0);

/// A process the harness started, with where it runs.
#[derive(Debug)]
struct Spawned {
    /// Namespace it runs in.
    netns: String,
    /// What it is, for logs.
    label: String,
    child: Child,
}

/// A live topology. Dropping it removes everything it created.
#[derive(Debug)]
pub struct Harness {
    run: String,
    spec: TopologySpec,
    helper: PathBuf,
    cgroup_dir: PathBuf,
    spawned: Vec<Spawned>,
    torn_down: bool,
}

impl Harness {
    /// Builds the topology. `helper` is the `clustermesh-netns` binary (used to run echo
    /// servers and clients inside namespaces and cgroups). Resources of dead earlier runs
    /// are swept first. On error everything created so far is removed.
    pub fn build(spec: TopologySpec, helper: &Path) -> Result<Self> {
        spec.validate()?;
        cleanup::sweep_stale();
        let run = format!(
            "{:x}{:x}",
            std::process::id(),
            NEXT_RUN.fetch_add(1, Ordering::Relaxed)
        );
        cleanup::write_marker(&run)?;
        let mut h = Self {
            cgroup_dir: cleanup::cgroup_dir(&run)?,
            run,
            spec,
            helper: helper.to_path_buf(),
            spawned: Vec::new(),
            torn_down: false,
        };
        tracing::info!(run = %h.run, "building topology");
        h.create()?;
        Ok(h)
    }

    /// The run id embedded in every resource name.
    #[must_use]
    pub fn run_id(&self) -> &str {
        &self.run
    }

    /// The topology this harness built.
    #[must_use]
    pub fn spec(&self) -> &TopologySpec {
        &self.spec
    }

    /// Name of the fabric (underlay) namespace.
    #[must_use]
    pub fn fabric_netns(&self) -> String {
        format!("{}fabric", cleanup::netns_prefix(&self.run))
    }

    /// Namespace of node `n` of cluster `c` (0-based).
    #[must_use]
    pub fn node_netns(&self, c: usize, n: usize) -> String {
        format!("{}c{}n{}", cleanup::netns_prefix(&self.run), c + 1, n + 1)
    }

    /// Namespace of pod `p` on node `n` of cluster `c` (0-based).
    #[must_use]
    pub fn pod_netns(&self, c: usize, n: usize, p: usize) -> String {
        format!("{}p{}", self.node_netns(c, n), p + 1)
    }

    /// Name of node `n`'s port on the fabric bridge.
    fn fabric_port(c: usize, n: usize) -> String {
        format!("fc{}n{}", c + 1, n + 1)
    }

    /// cgroup of node `n` of cluster `c`: its clients run here; its agent attaches here.
    #[must_use]
    pub fn node_cgroup(&self, c: usize, n: usize) -> PathBuf {
        self.cgroup_dir.join(format!("c{}n{}", c + 1, n + 1))
    }

    /// cgroup of pod `p` on node `n` of cluster `c`, below the node's cgroup and named
    /// as the kubelet names pod cgroups (`pod<uid>`): the pod's processes (its echo
    /// servers, its clients) run here, so the node's agent enforces the pod's policy.
    #[must_use]
    pub fn pod_cgroup(&self, c: usize, n: usize, p: usize) -> PathBuf {
        self.node_cgroup(c, n)
            .join(format!("pod{}", topology::pod_uid(c, n, p)))
    }

    /// Where node `n`'s agent pins its maps (removed at teardown).
    #[must_use]
    pub fn node_bpf_pin_dir(&self, c: usize, n: usize) -> PathBuf {
        cleanup::bpf_dir(&self.run).join(format!("c{}n{}", c + 1, n + 1))
    }

    fn create(&mut self) -> Result<()> {
        let fabric = self.fabric_netns();
        new_netns(&fabric)?;
        cmd::ip_in(&fabric, &["link", "add", "br0", "type", "bridge"])?;
        cmd::ip_in(
            &fabric,
            &[
                "addr",
                "add",
                &format!("{}/{}", topology::FABRIC_GATEWAY, topology::FABRIC_PREFIX),
                "dev",
                "br0",
            ],
        )?;
        cmd::ip_in(&fabric, &["link", "set", "br0", "up"])?;
        let clusters = self.spec.clusters.clone();
        for (c, cluster) in clusters.iter().enumerate() {
            for (n, node) in cluster.nodes.iter().enumerate() {
                self.create_node(c, n)?;
                cgroup::create(&self.node_cgroup(c, n))?;
                for p in 0..node.pods.len() {
                    self.create_pod(c, n, p)?;
                    cgroup::create(&self.pod_cgroup(c, n, p))?;
                }
            }
        }
        // Every node routes every other node's pod subnet to that node, across clusters.
        for (c, cluster) in clusters.iter().enumerate() {
            for n in 0..cluster.nodes.len() {
                let ns = self.node_netns(c, n);
                for (c2, other) in clusters.iter().enumerate() {
                    for n2 in 0..other.nodes.len() {
                        if (c, n) == (c2, n2) {
                            continue;
                        }
                        let (net, len) = topology::node_pod_subnet(c2, n2);
                        cmd::ip_in(
                            &ns,
                            &[
                                "route",
                                "add",
                                &format!("{net}/{len}"),
                                "via",
                                &topology::node_ip(c2, n2).to_string(),
                            ],
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    fn create_node(&self, c: usize, n: usize) -> Result<()> {
        let ns = self.node_netns(c, n);
        let port = Self::fabric_port(c, n);
        let fabric = self.fabric_netns();
        new_netns(&ns)?;
        cmd::ip(&[
            "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port, "netns",
            &fabric,
        ])?;
        cmd::ip_in(&fabric, &["link", "set", &port, "master", "br0", "up"])?;
        cmd::ip_in(
            &ns,
            &[
                "addr",
                "add",
                &format!("{}/{}", topology::node_ip(c, n), topology::FABRIC_PREFIX),
                "dev",
                "eth0",
            ],
        )?;
        cmd::ip_in(&ns, &["link", "set", "eth0", "up"])?;
        let (_, len) = topology::node_pod_subnet(c, n);
        cmd::ip_in(&ns, &["link", "add", "cbr0", "type", "bridge"])?;
        cmd::ip_in(
            &ns,
            &[
                "addr",
                "add",
                &format!("{}/{len}", topology::node_gateway(c, n)),
                "dev",
                "cbr0",
            ],
        )?;
        cmd::ip_in(&ns, &["link", "set", "cbr0", "up"])?;
        cmd::sysctl_in(&ns, "net.ipv4.ip_forward", "1")
    }

    fn create_pod(&self, c: usize, n: usize, p: usize) -> Result<()> {
        let node = self.node_netns(c, n);
        let pod = self.pod_netns(c, n, p);
        let port = format!("p{}", p + 1);
        new_netns(&pod)?;
        cmd::ip(&[
            "link", "add", "eth0", "netns", &pod, "type", "veth", "peer", "name", &port, "netns",
            &node,
        ])?;
        cmd::ip_in(&node, &["link", "set", &port, "master", "cbr0", "up"])?;
        let (_, len) = topology::node_pod_subnet(c, n);
        cmd::ip_in(
            &pod,
            &[
                "addr",
                "add",
                &format!("{}/{len}", topology::pod_ip(c, n, p)),
                "dev",
                "eth0",
            ],
        )?;
        cmd::ip_in(&pod, &["link", "set", "eth0", "up"])?;
        let gw = topology::node_gateway(c, n).to_string();
        for c2 in 0..self.spec.clusters.len() {
            let (net, len) = topology::cluster_pod_cidr(c2);
            cmd::ip_in(&pod, &["route", "add", &format!("{net}/{len}"), "via", &gw])?;
        }
        let fabric_net = format!(
            "{}/{}",
            Ipv4Addr::new(172, 30, 0, 0),
            topology::FABRIC_PREFIX
        );
        cmd::ip_in(&pod, &["route", "add", &fabric_net, "via", &gw]).map(|_| ())
    }

    /// Every namespace of this run.
    #[must_use]
    pub fn namespaces(&self) -> Vec<String> {
        cleanup::namespaces_with_prefix(&cleanup::netns_prefix(&self.run))
    }

    /// Namespaces that have a default route (must be none: nothing may leave the machine).
    pub fn namespaces_with_default_route(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for ns in self.namespaces() {
            let v4 = cmd::ip_in(&ns, &["-4", "route", "show", "default"])?;
            let v6 = cmd::ip_in(&ns, &["-6", "route", "show", "default"])?;
            if !v4.trim().is_empty() || !v6.trim().is_empty() {
                out.push(ns);
            }
        }
        Ok(out)
    }

    /// Packets received by node `n`'s port on the fabric bridge (traffic the node sent).
    pub fn fabric_port_rx_packets(&self, c: usize, n: usize) -> Result<u64> {
        let path = format!(
            "/sys/class/net/{}/statistics/rx_packets",
            Self::fabric_port(c, n)
        );
        let out = cmd::run("ip", &["netns", "exec", &self.fabric_netns(), "cat", &path])?;
        out.trim()
            .parse()
            .map_err(|_| Error::Topology(format!("unreadable counter {path}: '{}'", out.trim())))
    }

    /// Starts `program args...` inside node `n`'s namespace and cgroup.
    pub fn spawn_in_node(
        &mut self,
        c: usize,
        n: usize,
        label: &str,
        program: &Path,
        args: &[&str],
    ) -> Result<u32> {
        self.spawn_in_node_logged(c, n, label, program, args, None)
    }

    /// Like [`Self::spawn_in_node`], with stdout and stderr appended to `log`.
    pub fn spawn_in_node_logged(
        &mut self,
        c: usize,
        n: usize,
        label: &str,
        program: &Path,
        args: &[&str],
        log: Option<&Path>,
    ) -> Result<u32> {
        let ns = self.node_netns(c, n);
        let cg = self.node_cgroup(c, n);
        let mut full: Vec<String> = vec![
            "exec".into(),
            "--cgroup".into(),
            cg.display().to_string(),
            "--".into(),
            program.display().to_string(),
        ];
        full.extend(args.iter().map(|a| (*a).to_string()));
        let helper = self.helper.display().to_string();
        let mut all = vec![helper.as_str()];
        all.extend(full.iter().map(String::as_str));
        self.spawn(&ns, label, &all, false, log).map(|(pid, _)| pid)
    }

    fn spawn(
        &mut self,
        ns: &str,
        label: &str,
        argv: &[&str],
        want_stdout: bool,
        log: Option<&Path>,
    ) -> Result<(u32, Option<String>)> {
        let line = format!("{} {}", enter_netns(ns).join(" "), argv.join(" "));
        let (stdout, stderr) = match log {
            Some(path) => {
                let open = || {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_err(|source| Error::Io {
                            action: "open log",
                            path: path.to_path_buf(),
                            source,
                        })
                };
                (Stdio::from(open()?), Stdio::from(open()?))
            }
            None if want_stdout => (Stdio::piped(), Stdio::inherit()),
            None => (Stdio::null(), Stdio::inherit()),
        };
        let mut child = Command::new("nsenter")
            .args(&enter_netns(ns)[1..])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| Error::Spawn {
                command: line.clone(),
                source,
            })?;
        let pid = child.id();
        let first_line = match child.stdout.take() {
            Some(out) => {
                let mut l = String::new();
                let read = BufReader::new(out).read_line(&mut l);
                if read.is_err() || l.is_empty() {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Topology(format!(
                        "`{line}` exited before it was ready"
                    )));
                }
                Some(l.trim().to_string())
            }
            None => None,
        };
        tracing::debug!(netns = ns, label, pid, "spawned");
        self.spawned.push(Spawned {
            netns: ns.to_string(),
            label: label.to_string(),
            child,
        });
        Ok((pid, first_line))
    }

    /// Starts an echo server in pod `p` (its namespace and cgroup) answering with
    /// `<cluster>/<pod>`, and waits until it listens. Returns its address.
    pub fn start_echo(&mut self, c: usize, n: usize, p: usize, port: u16) -> Result<SocketAddr> {
        let ip = topology::pod_ip(c, n, p);
        let identity = format!(
            "{}/{}",
            self.spec.clusters[c].name, self.spec.clusters[c].nodes[n].pods[p].name
        );
        let listen = format!("{ip}:{port}");
        let helper = self.helper.display().to_string();
        let ns = self.pod_netns(c, n, p);
        let cg = self.pod_cgroup(c, n, p).display().to_string();
        self.spawn(
            &ns,
            &identity,
            &[
                &helper,
                "exec",
                "--cgroup",
                &cg,
                "--",
                &helper,
                "echo-server",
                "--listen",
                &listen,
                "--identity",
                &identity,
            ],
            true,
            None,
        )?;
        Ok(SocketAddr::new(ip.into(), port))
    }

    /// Starts an echo server in every pod of the topology on `port`.
    pub fn start_all_echo(&mut self, port: u16) -> Result<Vec<SocketAddr>> {
        let mut out = Vec::new();
        for (c, cluster) in self.spec.clusters.clone().iter().enumerate() {
            for (n, node) in cluster.nodes.iter().enumerate() {
                for p in 0..node.pods.len() {
                    out.push(self.start_echo(c, n, p, port)?);
                }
            }
        }
        Ok(out)
    }

    /// Kills every process the harness started in pod `p`'s namespace.
    pub fn kill_pod(&mut self, c: usize, n: usize, p: usize) {
        let ns = self.pod_netns(c, n, p);
        for s in self.spawned.iter_mut().filter(|s| s.netns == ns) {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        self.spawned.retain(|s| s.netns != ns);
    }

    /// Kills (and reaps) one process the harness started.
    pub fn kill_pid(&mut self, pid: u32) {
        for s in self.spawned.iter_mut().filter(|s| s.child.id() == pid) {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        self.spawned.retain(|s| s.child.id() != pid);
    }

    /// Runs one request from node `n` (in its namespace and cgroup) to `to`; returns the
    /// answer (`<cluster>/<pod> <message>`).
    pub fn request_from_node(
        &self,
        c: usize,
        n: usize,
        to: SocketAddr,
        timeout: Duration,
    ) -> Result<String> {
        Client {
            netns: self.node_netns(c, n),
            cgroup: self.node_cgroup(c, n),
            helper: self.helper.clone(),
        }
        .request(to, timeout)
    }

    /// A client running as pod `p` of node `n` of cluster `c` (its namespace and
    /// cgroup), independent of the harness so that another thread can use it.
    #[must_use]
    pub fn pod_client(&self, c: usize, n: usize, p: usize) -> Client {
        Client {
            netns: self.pod_netns(c, n, p),
            cgroup: self.pod_cgroup(c, n, p),
            helper: self.helper.clone(),
        }
    }

    /// Removes everything; returns what could not be removed (empty on success).
    pub fn teardown(mut self) -> Vec<String> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        for s in &mut self.spawned {
            tracing::debug!(label = %s.label, "stopping");
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        self.spawned.clear();
        let problems = cleanup::cleanup_run(&self.run);
        for p in &problems {
            tracing::warn!(run = %self.run, problem = %p, "teardown incomplete");
        }
        problems
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.teardown_inner();
    }
}

/// Sends requests from one place of the topology: a node or a pod (its network
/// namespace and cgroup).
#[derive(Debug, Clone)]
pub struct Client {
    netns: String,
    cgroup: PathBuf,
    helper: PathBuf,
}

impl Client {
    /// Runs one request to `to`; returns the answer (`<cluster>/<pod> <message>`).
    pub fn request(&self, to: SocketAddr, timeout: Duration) -> Result<String> {
        let cg = self.cgroup.display().to_string();
        let helper = self.helper.display().to_string();
        let ms = timeout.as_millis().to_string();
        let to_s = to.to_string();
        let enter = enter_netns(&self.netns);
        let mut args: Vec<&str> = enter[1..].iter().map(String::as_str).collect();
        args.extend([
            helper.as_str(),
            "request",
            "--cgroup",
            &cg,
            "--to",
            &to_s,
            "--timeout-ms",
            &ms,
        ]);
        cmd::run("nsenter", &args)
            .map(|out| out.trim().to_string())
            .map_err(|e| Error::Request {
                from: self.netns.clone(),
                to: to_s,
                reason: e.to_string(),
            })
    }
}

/// The command prefix that runs a program in network namespace `ns` only. Unlike `ip
/// netns exec`, `nsenter --net` keeps the mount namespace, so `/sys/fs/cgroup` and
/// `/sys/fs/bpf` stay visible to the program (it joins its cgroup, an agent pins maps).
fn enter_netns(ns: &str) -> Vec<String> {
    vec![
        "nsenter".into(),
        format!("--net=/run/netns/{ns}"),
        "--".into(),
    ]
}

fn new_netns(ns: &str) -> Result<()> {
    cmd::ip(&["netns", "add", ns])?;
    cmd::ip_in(ns, &["link", "set", "lo", "up"]).map(|_| ())
}
