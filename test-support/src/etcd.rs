//! Starts a real single-member etcd (Debian's `etcd-server`, `/usr/bin/etcd`) on free
//! loopback ports with a temporary data directory, for tests and benchmarks. The process
//! is killed when the [`EtcdServer`] is dropped.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clustermesh_certs::{MeshCa, ServerNames, Validity};
use clustermesh_store::{EtcdConfig, EtcdStore};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// etcd's request limit for tests: a `MAX_VALUE_SIZE` value plus key and framing must fit.
const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;

/// How long a starting etcd may take to report itself healthy.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// Where the etcd binary is: `CLUSTERMESH_ETCD_BIN` (if that file does not exist, etcd
/// counts as missing), else `/usr/bin/etcd`, else `etcd` on `PATH`.
pub fn etcd_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("CLUSTERMESH_ETCD_BIN") {
        let bin = PathBuf::from(bin);
        return bin.is_file().then_some(bin);
    }
    let default = PathBuf::from("/usr/bin/etcd");
    if default.is_file() {
        return Some(default);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("etcd"))
            .find(|p| p.is_file())
    })
}

/// Two free loopback ports (client, peer). Another process could grab them before etcd
/// binds; [`EtcdServer::start`] retries with new ports if etcd fails to start.
pub fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    (
        a.local_addr().expect("local addr").port(),
        b.local_addr().expect("local addr").port(),
    )
}

/// PEM files for an etcd that serves TLS and requires client certificates.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// CA that signs client certificates (and etcd's own).
    pub ca_file: PathBuf,
    /// etcd's server certificate (IP SAN 127.0.0.1).
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
}

impl ServerTls {
    /// Issues etcd a server certificate for 127.0.0.1 from `ca` (valid for an hour) and
    /// writes it, its key and `ca`'s certificate, which etcd then requires client
    /// certificates to chain to, into `dir` as `server.pem`, `server-key.pem` and `ca.pem`.
    pub fn issue(ca: &MeshCa, dir: &Path) -> ServerTls {
        let server = ca
            .issue_server(
                "etcd",
                &ServerNames::new([], ["127.0.0.1".parse().expect("an IP address")]),
                Validity::from_now(Duration::from_secs(3600)),
            )
            .expect("issue etcd's server certificate");
        ServerTls {
            ca_file: crate::certs::write_pem(dir, "ca.pem", ca.cert_pem()),
            cert_file: crate::certs::write_pem(dir, "server.pem", &server.cert_pem),
            key_file: crate::certs::write_pem(dir, "server-key.pem", &server.key_pem),
        }
    }
}

/// A running etcd member.
#[derive(Debug)]
pub struct EtcdServer {
    binary: PathBuf,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    tls: Option<ServerTls>,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd, or returns `None` (after printing why) when the binary is missing and
    /// prerequisites are not required. Panics when etcd is missing but required, or when
    /// it does not start.
    pub async fn start_or_skip(test: &str) -> Option<Self> {
        let Some(binary) = etcd_binary() else {
            assert!(
                !crate::prerequisites::prerequisites_required(),
                "{test}: etcd binary not found (install Debian's etcd-server with scripts/setup); \
                 required because CLUSTERMESH_REQUIRE_PRIVILEGED=1 or CI is set"
            );
            eprintln!("SKIP {test}: etcd binary not found; install etcd-server (scripts/setup)");
            return None;
        };
        Some(Self::start_with(binary).await)
    }

    /// Starts etcd on free ports; panics with etcd's log if it cannot.
    pub async fn start_with(binary: PathBuf) -> Self {
        let mut last_error = String::new();
        for _ in 0..3 {
            let (client_port, peer_port) = free_ports();
            let mut server = Self::prepared(binary.clone(), client_port, peer_port);
            match server.launch().await {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("etcd did not start: {last_error}");
    }

    /// A server on the given ports that is not running yet (see [`Self::launch`]).
    pub fn prepared(binary: PathBuf, client_port: u16, peer_port: u16) -> Self {
        Self {
            binary,
            dir: tempfile::Builder::new()
                .prefix("clustermesh-etcd-")
                .tempdir()
                .expect("create a temp dir for etcd"),
            client_port,
            peer_port,
            tls: None,
            child: None,
        }
    }

    /// Serves clients over TLS with client-certificate authentication (call before
    /// [`Self::launch`]).
    pub fn with_tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The client URL, `http(s)://127.0.0.1:<port>`.
    pub fn client_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// A store config for this server with a short connect deadline.
    pub fn config(&self) -> EtcdConfig {
        EtcdConfig::new([self.client_url()]).with_connect_deadline(Duration::from_secs(30))
    }

    /// Connects an [`EtcdStore`] to this server.
    pub async fn connect(&self) -> EtcdStore {
        EtcdStore::connect(self.config())
            .await
            .expect("connect to the test etcd")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The last lines of etcd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Starts (or restarts, keeping the data directory) the etcd process and waits until
    /// it reports itself healthy.
    pub async fn launch(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "etcd already running");
        let data = self.dir.path().join("data");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("open etcd log: {e}"))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("clone log handle: {e}"))?;
        let client = self.client_url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(&self.binary);
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cert-file={}", tls.cert_file.display()))
                .arg(format!("--key-file={}", tls.key_file.display()))
                .arg(format!("--trusted-ca-file={}", tls.ca_file.display()))
                .arg("--client-cert-auth");
        }
        let child = command
            .arg("--name=m0")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=m0={peer}"))
            .arg("--initial-cluster-state=new")
            .arg(format!("--max-request-bytes={MAX_REQUEST_BYTES}"))
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("etcd exited with {status}:\n{}", self.log_tail()));
                }
            }
            if self.ready().await {
                return Ok(());
            }
            if started.elapsed() > START_DEADLINE {
                self.stop();
                return Err(format!(
                    "etcd not healthy after {START_DEADLINE:?}:\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether etcd answers: `/health` over plain HTTP, or (TLS) its port accepts
    /// connections; TLS clients then retry through `EtcdStore::connect`.
    async fn ready(&self) -> bool {
        if self.tls.is_some() {
            tokio::net::TcpStream::connect(("127.0.0.1", self.client_port))
                .await
                .is_ok()
        } else {
            healthy(self.client_port).await
        }
    }

    /// Kills the etcd process (SIGKILL) and waits for it; the data directory stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether etcd's `/health` endpoint on `port` answers healthy.
async fn healthy(port: u16) -> bool {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
        Some(body.contains("\"health\":\"true\""))
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
