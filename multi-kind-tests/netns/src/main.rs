//! `clustermesh-netns`: helper binary of the namespace harness.
//!
//! The harness runs this binary inside namespaces (`nsenter --net`) as echo server, as
//! client, or as a launcher that joins a node's cgroup first; `demo` builds a two-cluster
//! topology and narrates a request crossing from one cluster to the other; `cleanup`
//! removes what crashed runs left behind.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::{Parser, Subcommand};
use clustermesh_netns_harness::{
    cgroup, cleanup, echo, mesh, policy, scenario, topology, Harness, TopologySpec,
};

#[derive(Debug, Parser)]
#[command(
    name = "clustermesh-netns",
    about = "Network-namespace harness for clustermesh's two-cluster tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve TCP on LISTEN, answering each connection with "<identity> <request line>".
    /// Prints "ready <addr>" once listening.
    EchoServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        identity: String,
    },
    /// Send one request and print the answer (exit 1 on failure).
    Request {
        #[arg(long)]
        to: SocketAddr,
        /// Join this cgroup first (so a node's socket load balancing applies).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        #[arg(long, default_value = "hello")]
        message: String,
    },
    /// Join CGROUP, then replace this process with COMMAND.
    Exec {
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(required = true, trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// Build a two-cluster topology, show a request crossing between clusters, tear down.
    Demo,
    /// Cross-cluster network policy on real traffic: pods with labels in both clusters,
    /// NetworkPolicies, a policy change, agent restarts, stale identities.
    PolicyDemo,
    /// Remove resources of harness runs whose process is gone (or of every run with --all).
    Cleanup {
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Cmd::EchoServer { listen, identity } => echo::serve(listen, &identity, |addr| {
            println!("ready {addr}");
        })
        .map_err(|e| format!("echo server on {listen}: {e}")),
        Cmd::Request {
            to,
            cgroup: cg,
            timeout_ms,
            message,
        } => {
            if let Some(cg) = cg {
                cgroup::join(&cg).map_err(|e| e.to_string())?;
            }
            let answer = echo::request(to, &message, Duration::from_millis(timeout_ms))
                .map_err(|e| format!("request to {to}: {e}"))?;
            println!("{answer}");
            Ok(())
        }
        Cmd::Exec {
            cgroup: cg,
            command,
        } => {
            cgroup::join(&cg).map_err(|e| e.to_string())?;
            let (program, args) = command.split_first().ok_or("exec needs a command")?;
            let err = Command::new(program).args(args).exec();
            Err(format!("cannot exec {program}: {err}"))
        }
        Cmd::Demo => demo(),
        Cmd::PolicyDemo => policy_demo(),
        Cmd::Cleanup { all } => {
            let problems = if all {
                cleanup::cleanup_everything()
            } else {
                let runs = cleanup::sweep_stale();
                println!("removed {} stale run(s)", runs.len());
                Vec::new()
            };
            if problems.is_empty() {
                Ok(())
            } else {
                Err(format!("cleanup incomplete: {}", problems.join("; ")))
            }
        }
    }
}

fn demo() -> Result<(), String> {
    if let Some(why) = clustermesh_netns_harness::privileges_missing() {
        return Err(format!(
            "the namespace demo needs root, iproute2 and cgroup2 ({why}); run it as root"
        ));
    }
    let helper = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let spec = TopologySpec::uniform(2, 2, 1);
    println!(
        "==> building 2 clusters x 2 nodes x 1 pod out of network namespaces (no default routes)"
    );
    let mut h = Harness::build(spec, &helper).map_err(|e| e.to_string())?;
    for (c, cluster) in h.spec().clusters.clone().iter().enumerate() {
        let (net, len) = topology::cluster_pod_cidr(c);
        println!("    {} pod CIDR {net}/{len}", cluster.name);
        for (n, node) in cluster.nodes.iter().enumerate() {
            println!(
                "      {:<6} netns {:<22} fabric {:<12} cgroup {}",
                node.name,
                h.node_netns(c, n),
                topology::node_ip(c, n),
                h.node_cgroup(c, n).display()
            );
        }
    }
    println!("==> proving the topology: an echo server in cluster2/node2's pod, a request from cluster1/node1");
    let remote = h.start_echo(1, 1, 0, 9999).map_err(|e| e.to_string())?;
    let answer = h
        .request_from_node(0, 0, remote, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    println!("    {remote} answered: {answer}");
    h.kill_pod(1, 1, 0);
    let defaults = h
        .namespaces_with_default_route()
        .map_err(|e| e.to_string())?;
    println!("    namespaces with a default route: {}", defaults.len());

    let result = match mesh::Binaries::beside(&helper, None) {
        Err(e) => Err(format!("the mesh part needs the workspace binaries: {e}")),
        Ok(bins) => mesh_demo(&mut h, bins),
    };
    println!("==> tearing down run {}", h.run_id());
    let problems = h.teardown();
    if !problems.is_empty() {
        return Err(format!("teardown incomplete: {}", problems.join("; ")));
    }
    println!("    done: namespaces, cgroups, pinned maps, state and processes removed");
    result
}

fn policy_demo() -> Result<(), String> {
    if let Some(why) = clustermesh_netns_harness::privileges_missing() {
        return Err(format!(
            "the namespace demo needs root, iproute2 and cgroup2 ({why}); run it as root"
        ));
    }
    let helper = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let bins = mesh::Binaries::beside(&helper, None).map_err(|e| e.to_string())?;
    let mut h = Harness::build(policy::topology(), &helper).map_err(|e| e.to_string())?;
    let say = |m: &str| println!("==> {m}");
    let result = mesh::Mesh::new(&h, bins)
        .and_then(|mut m| policy::run(&mut h, &mut m, &say))
        .map_err(|e| e.to_string());
    println!("==> tearing down run {}", h.run_id());
    let problems = h.teardown();
    if !problems.is_empty() {
        return Err(format!("teardown incomplete: {}", problems.join("; ")));
    }
    let report = result?;
    println!(
        "==> every step passed: new pod admitted after {:.0?}, policy change in force after {:.0?}, {} probes unchanged across agent restarts, stale identities gone after {:.1?}",
        report.identity_propagation,
        report.policy_change,
        report.probes_during_restart,
        report.stale_removal
    );
    Ok(())
}

/// The failover scenario with narration.
fn mesh_demo(h: &mut Harness, bins: mesh::Binaries) -> Result<(), String> {
    let say = |m: &str| println!("==> {m}");
    let mut m = mesh::Mesh::new(h, bins).map_err(|e| e.to_string())?;
    scenario::bring_up(h, &mut m, &say).map_err(|e| e.to_string())?;
    let repeats = 20;
    let report = scenario::failover(h, &mut m, repeats, &say).map_err(|e| e.to_string())?;
    println!(
        "==> failover over {repeats} repeats: p50 {:.0?}, p99 {:.0?}; failback p50 {:.0?}, p99 {:.0?}",
        scenario::quantile(&report.failover, 0.5),
        scenario::quantile(&report.failover, 0.99),
        scenario::quantile(&report.failback, 0.5),
        scenario::quantile(&report.failback, 0.99)
    );
    scenario::remote_outage(h, &mut m, &say).map_err(|e| e.to_string())?;
    scenario::disconnect(h, &mut m, &say).map_err(|e| e.to_string())?;
    println!("==> every step passed");
    Ok(())
}
