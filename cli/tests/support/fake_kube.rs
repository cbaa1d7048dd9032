//! A fake Kubernetes API server for tests: JSON over plain HTTP/1.1 on 127.0.0.1, backed by
//! an in-memory object store, speaking enough of the REST API for kube-rs typed `Api<K>` and
//! `Api<DynamicObject>` (with an explicit `ApiResource`; no discovery is served).
//!
//! What it implements (paths as the real API server lays them out, see
//! <https://kubernetes.io/docs/reference/using-api/api-concepts/>):
//!
//! | request | behaviour |
//! |---|---|
//! | `GET /version` | a fixed v1.34.0 version |
//! | `GET …/{plural}/{name}` | the object, or 404 `NotFound` |
//! | `GET …/{plural}?labelSelector=&fieldSelector=` | a `{Kind}List`; label selectors `k=v`, `k==v`, `k!=v`, `k`, `!k` joined by `,`; field selectors `metadata.name`, `metadata.namespace` |
//! | `POST …/{plural}` | create (201), 409 `AlreadyExists`, 404 when the namespace does not exist |
//! | `PUT …/{plural}/{name}` | replace; a stale `metadata.resourceVersion` is 409 `Conflict` |
//! | `PATCH` `application/apply-patch+yaml` | server-side apply: `?fieldManager=` required and recorded in `managedFields`; creates the object when missing, else merges the applied fields into it; fields last applied by *another* apply manager with a different value are a 409 `Conflict` unless `force=true` (which moves their ownership) |
//! | `PATCH` `application/merge-patch+json` / `strategic-merge-patch+json` | RFC 7386 merge (the strategic form is treated as a plain merge: lists are replaced, not merged by key) |
//! | `DELETE …/{plural}/{name}` | removes it (a `Success` Status), 404 when missing, 409 on a failed `preconditions` |
//! | `DELETE …/{plural}?labelSelector=` | delete-collection, returns the deleted list |
//! | `…/{name}/status` | GET, PUT, merge PATCH and apply of the `status` only; writes to the main resource of kinds with a status subresource keep the stored status, as the real server does |
//! | `…/pods/{name}[:{port}]/proxy/{path}` | answered by a handler the test registered with [`FakeKube::set_pod_proxy`]; 404 when the pod object does not exist, 503 "connection refused" when no handler is registered |
//!
//! Writes keep `metadata.resourceVersion` increasing (one counter per server, like etcd's
//! revision), set `uid`/`creationTimestamp` on create and bump `generation` when `spec`
//! changes. A Service of type NodePort or LoadBalancer gets a `clusterIP` and node ports
//! allocated on create. A `Secret`'s `stringData` is folded into `data` (base64).
//! Every request must carry the kubeconfig's bearer token ([`TOKEN`]), else 401.
//! Errors are `Status` objects with the reason and message shapes of the real server.
//!
//! Not implemented: watch (400), JSON patch (415), discovery (`/api`, `/apis`: 404),
//! set-based label selectors (`in`, `notin`: 400), removal of fields a manager stops
//! applying.
//!
//! Note: kube-rs clients retry 429, 503 and 504 answers with backoff (up to 15 times,
//! `kube::Config::default_retry`), so an injected or proxied 503 makes a default client
//! wait a long time; inject 500 or build the client with `default_retry = false`.
//!
//! Test controls: [`FakeKube::fail_next`] / [`FakeKube::fail_always`] make matching
//! requests fail with a status, [`FakeKube::stop`] closes the port (an unreachable peer),
//! [`FakeKube::requests`] is the request log, and [`FakeKube::insert`] /
//! [`FakeKube::object`] / [`FakeKube::set_status`] read and write the store directly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};

/// Bearer token the kubeconfigs written by [`kubeconfig`] carry and the server demands.
pub const TOKEN: &str = "fake-kube-token";

/// Namespaces that exist when a server starts.
const INITIAL_NAMESPACES: [&str; 3] = ["default", "kube-system", "kube-public"];

/// Resources whose `status` is only written through the `/status` subresource.
const STATUS_SUBRESOURCE: [&str; 10] = [
    "deployments",
    "statefulsets",
    "daemonsets",
    "replicasets",
    "services",
    "pods",
    "namespaces",
    "nodes",
    "persistentvolumeclaims",
    "jobs",
];

/// `(plural, Kind)` of the resources tests use; others follow English plural rules.
const KINDS: [(&str, &str); 18] = [
    ("configmaps", "ConfigMap"),
    ("secrets", "Secret"),
    ("services", "Service"),
    ("pods", "Pod"),
    ("namespaces", "Namespace"),
    ("nodes", "Node"),
    ("serviceaccounts", "ServiceAccount"),
    ("endpoints", "Endpoints"),
    ("persistentvolumeclaims", "PersistentVolumeClaim"),
    ("deployments", "Deployment"),
    ("statefulsets", "StatefulSet"),
    ("daemonsets", "DaemonSet"),
    ("replicasets", "ReplicaSet"),
    ("jobs", "Job"),
    ("roles", "Role"),
    ("rolebindings", "RoleBinding"),
    ("clusterroles", "ClusterRole"),
    ("clusterrolebindings", "ClusterRoleBinding"),
];

/// Kind of a plural resource name (`configmaps` → `ConfigMap`).
pub fn kind_of(plural: &str) -> String {
    if let Some((_, k)) = KINDS.iter().find(|(p, _)| *p == plural) {
        return (*k).to_owned();
    }
    let singular = if let Some(stem) = plural.strip_suffix("ies") {
        format!("{stem}y")
    } else {
        plural.strip_suffix('s').unwrap_or(plural).to_owned()
    };
    let mut c = singular.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

/// Plural resource name of a kind (`ConfigMap` → `configmaps`).
pub fn plural_of(kind: &str) -> String {
    if let Some((p, _)) = KINDS.iter().find(|(_, k)| *k == kind) {
        return (*p).to_owned();
    }
    let lower = kind.to_ascii_lowercase();
    if let Some(stem) = lower.strip_suffix('y') {
        format!("{stem}ies")
    } else if lower.ends_with('s') {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    }
}

/// Where an object lives: `api/v1` or `apis/{group}/{version}`, namespace, plural, name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    group_version: String,
    namespace: Option<String>,
    plural: String,
    name: String,
}

impl Key {
    fn resource(&self) -> String {
        resource_name(&self.group_version, &self.plural)
    }

    fn api_version(&self) -> String {
        api_version_of(&self.group_version)
    }

    fn collection(&self) -> Collection {
        Collection {
            group_version: self.group_version.clone(),
            namespace: self.namespace.clone(),
            plural: self.plural.clone(),
        }
    }
}

/// `deployments.apps` for messages, like the real server.
fn resource_name(group_version: &str, plural: &str) -> String {
    match group_version.strip_prefix("apis/") {
        Some(gv) => format!("{plural}.{}", gv.split('/').next().unwrap_or_default()),
        None => plural.to_owned(),
    }
}

/// `api/v1` → `v1`, `apis/apps/v1` → `apps/v1`.
fn api_version_of(group_version: &str) -> String {
    group_version
        .strip_prefix("apis/")
        .or_else(|| group_version.strip_prefix("api/"))
        .unwrap_or(group_version)
        .to_owned()
}

/// `v1` → `api/v1`, `apps/v1` → `apis/apps/v1`.
fn group_version_of(api_version: &str) -> String {
    if api_version.contains('/') {
        format!("apis/{api_version}")
    } else {
        format!("api/{api_version}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Collection {
    group_version: String,
    namespace: Option<String>,
    plural: String,
}

impl Collection {
    fn key(&self, name: &str) -> Key {
        Key {
            group_version: self.group_version.clone(),
            namespace: self.namespace.clone(),
            plural: self.plural.clone(),
            name: name.to_owned(),
        }
    }

    fn contains(&self, key: &Key) -> bool {
        key.group_version == self.group_version
            && key.plural == self.plural
            && (self.namespace.is_none() || key.namespace == self.namespace)
    }
}

#[derive(Debug)]
enum Target {
    Version,
    Collection(Collection),
    Object(Key),
    Status(Key),
    PodProxy {
        key: Key,
        port: Option<u16>,
        path: String,
    },
    Unknown,
}

/// Parses a request path into what it addresses.
fn parse_path(path: &str) -> Target {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group_version, rest) = match segs.as_slice() {
        ["version"] => return Target::Version,
        ["api", v, rest @ ..] => (format!("api/{v}"), rest),
        ["apis", g, v, rest @ ..] => (format!("apis/{g}/{v}"), rest),
        _ => return Target::Unknown,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let Some((plural, tail)) = rest.split_first() else {
        return Target::Unknown;
    };
    let collection = Collection {
        group_version,
        namespace,
        plural: (*plural).to_owned(),
    };
    match tail {
        [] => Target::Collection(collection),
        [name] => Target::Object(collection.key(name)),
        [name, "status"] => Target::Status(collection.key(name)),
        [name, "proxy", path @ ..] if collection.plural == "pods" => {
            // `name`, `name:port` or `scheme:name:port`.
            let parts: Vec<&str> = name.split(':').collect();
            let (pod, port) = match parts.as_slice() {
                [pod] => (*pod, None),
                [pod, port] | [_, pod, port] => (*pod, port.parse().ok()),
                _ => return Target::Unknown,
            };
            Target::PodProxy {
                key: collection.key(pod),
                port,
                path: format!("/{}", path.join("/")),
            }
        }
        _ => Target::Unknown,
    }
}

/// A request as the pod proxy handler sees it (path and query relative to the pod).
#[derive(Debug, Clone)]
pub struct ProxyRequest {
    /// Method.
    pub method: String,
    /// Path inside the pod, e.g. `/v1/status`.
    pub path: String,
    /// Query string without `?` (may be empty).
    pub query: String,
    /// Request headers as the pod receives them (lowercase names): like a real API server,
    /// without `Authorization`, which it consumes.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl ProxyRequest {
    /// The value of header `name` (any case), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the pod answers through the proxy.
#[derive(Debug, Clone)]
pub struct ProxyResponse {
    /// HTTP status.
    pub status: u16,
    /// Content type.
    pub content_type: String,
    /// Body.
    pub body: Vec<u8>,
}

impl ProxyResponse {
    /// 200 with a JSON body.
    pub fn json(value: &Value) -> Self {
        Self {
            status: 200,
            content_type: "application/json".into(),
            body: value.to_string().into_bytes(),
        }
    }

    /// A plain-text answer with `status`.
    pub fn text(status: u16, text: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8".into(),
            body: text.as_bytes().to_vec(),
        }
    }
}

/// A pod proxy handler.
pub type ProxyHandler = Arc<dyn Fn(&ProxyRequest) -> ProxyResponse + Send + Sync>;

/// One request the server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Query string (may be empty).
    pub query: String,
    /// `Content-Type` header (may be empty).
    pub content_type: String,
}

impl Recorded {
    /// Whether the request could change state.
    pub fn is_write(&self) -> bool {
        !matches!(self.method.as_str(), "GET" | "HEAD" | "OPTIONS")
    }
}

#[derive(Debug, Clone)]
struct Failure {
    method: String,
    path_contains: String,
    status: u16,
    once: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Operation {
    Apply,
    Update,
}

/// A field manager's record: operation, apiVersion, fields it last applied.
type ManagerEntry = (Operation, String, BTreeSet<String>);

struct State {
    objects: BTreeMap<Key, Value>,
    /// Per object: manager → its record.
    managers: BTreeMap<Key, BTreeMap<String, ManagerEntry>>,
    revision: u64,
    next_node_port: u16,
    next_cluster_ip: u32,
    failures: Vec<Failure>,
    proxies: HashMap<(String, String, Option<u16>), ProxyHandler>,
    requests: Vec<Recorded>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("objects", &self.objects.len())
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

/// A running fake API server. Stops when dropped.
#[derive(Debug)]
pub struct FakeKube {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Listening address.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }
}

impl FakeKube {
    /// Starts a server on a free loopback port with the namespaces `default`,
    /// `kube-system` and `kube-public`.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            objects: BTreeMap::new(),
            managers: BTreeMap::new(),
            revision: 0,
            next_node_port: 30000,
            next_cluster_ip: 1,
            failures: Vec::new(),
            proxies: HashMap::new(),
            requests: Vec::new(),
        }));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::clone(&state), stop_rx));
        let fake = Self {
            url: format!("http://{addr}"),
            addr,
            state,
            stop,
            task: Mutex::new(Some(task)),
        };
        for ns in INITIAL_NAMESPACES {
            fake.insert(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
        }
        fake
    }

    /// Closes the listening port and every open connection: clients see "connection
    /// refused" from now on. The store stays readable through the helpers.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Stores `obj` as is (no validation, no conflict checks), keyed by its apiVersion,
    /// kind, namespace and name; sets `resourceVersion`, `uid` and `creationTimestamp`
    /// when missing and returns the stored object. Use it to seed state the CLI reads,
    /// status included.
    pub fn insert(&self, mut obj: Value) -> Value {
        let key = key_of(&obj).expect("insert needs apiVersion, kind and metadata.name");
        let mut st = self.state.lock().unwrap();
        st.revision += 1;
        let rv = st.revision;
        let meta = metadata_mut(&mut obj);
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.entry("uid")
            .or_insert_with(|| json!(format!("fake-uid-{rv}")));
        meta.entry("creationTimestamp")
            .or_insert_with(|| json!("2026-01-01T00:00:00Z"));
        st.objects.insert(key, obj.clone());
        obj
    }

    /// The object at a REST path, e.g. `/api/v1/namespaces/kube-system/configmaps/x`.
    pub fn object(&self, path: &str) -> Option<Value> {
        let Target::Object(key) = parse_path(path) else {
            panic!("not an object path: {path}");
        };
        self.state.lock().unwrap().objects.get(&key).cloned()
    }

    /// Every object of a collection path (e.g. `/api/v1/namespaces/ns/secrets`), by name.
    pub fn objects(&self, collection_path: &str) -> Vec<Value> {
        let Target::Collection(c) = parse_path(collection_path) else {
            panic!("not a collection path: {collection_path}");
        };
        let st = self.state.lock().unwrap();
        st.objects
            .iter()
            .filter(|(k, _)| c.contains(k))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every stored object (a snapshot for "nothing changed" assertions).
    pub fn snapshot(&self) -> BTreeMap<String, Value> {
        let st = self.state.lock().unwrap();
        st.objects
            .iter()
            .map(|(k, v)| {
                let path = match &k.namespace {
                    Some(ns) => format!(
                        "/{}/namespaces/{ns}/{}/{}",
                        k.group_version, k.plural, k.name
                    ),
                    None => format!("/{}/{}/{}", k.group_version, k.plural, k.name),
                };
                (path, v.clone())
            })
            .collect()
    }

    /// Removes the object at a REST path; returns it.
    pub fn remove(&self, path: &str) -> Option<Value> {
        let Target::Object(key) = parse_path(path) else {
            panic!("not an object path: {path}");
        };
        let mut st = self.state.lock().unwrap();
        st.managers.remove(&key);
        st.objects.remove(&key)
    }

    /// Replaces the `status` of the object at `path` (bumping its resourceVersion).
    pub fn set_status(&self, path: &str, status: Value) {
        let Target::Object(key) = parse_path(path) else {
            panic!("not an object path: {path}");
        };
        let mut st = self.state.lock().unwrap();
        st.revision += 1;
        let rv = st.revision;
        let obj = st
            .objects
            .get_mut(&key)
            .unwrap_or_else(|| panic!("no object at {path}"));
        obj["status"] = status;
        metadata_mut(obj).insert("resourceVersion".into(), json!(rv.to_string()));
    }

    /// Field managers recorded for the object at `path`, with their operation
    /// (`Apply`/`Update`).
    pub fn managers(&self, path: &str) -> Vec<(String, String)> {
        let Target::Object(key) = parse_path(path) else {
            panic!("not an object path: {path}");
        };
        let st = self.state.lock().unwrap();
        st.managers
            .get(&key)
            .map(|m| {
                m.iter()
                    .map(|(name, (op, _, _))| (name.clone(), format!("{op:?}")))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The next request with `method` (`"*"`: any) whose path-and-query contains
    /// `path_contains` fails with `status` (a `Status` body) and changes nothing.
    pub fn fail_next(&self, method: &str, path_contains: &str, status: u16) {
        self.add_failure(method, path_contains, status, true);
    }

    /// Like [`Self::fail_next`] for every matching request until [`Self::clear_failures`].
    pub fn fail_always(&self, method: &str, path_contains: &str, status: u16) {
        self.add_failure(method, path_contains, status, false);
    }

    fn add_failure(&self, method: &str, path_contains: &str, status: u16, once: bool) {
        self.state.lock().unwrap().failures.push(Failure {
            method: method.to_ascii_uppercase(),
            path_contains: path_contains.to_owned(),
            status,
            once,
        });
    }

    /// Drops every injected failure.
    pub fn clear_failures(&self) {
        self.state.lock().unwrap().failures.clear();
    }

    /// Answers `…/namespaces/{namespace}/pods/{pod}:{port}/proxy/…` (`port` None:
    /// `pods/{pod}/proxy/…`) with `handler`, replacing an earlier one. The pod object must
    /// also exist in the store, as on a real cluster.
    pub fn set_pod_proxy(
        &self,
        namespace: &str,
        pod: &str,
        port: Option<u16>,
        handler: impl Fn(&ProxyRequest) -> ProxyResponse + Send + Sync + 'static,
    ) {
        self.state.lock().unwrap().proxies.insert(
            (namespace.to_owned(), pod.to_owned(), port),
            Arc::new(handler),
        );
    }

    /// Removes a pod proxy handler: the pod then "refuses connections" (503).
    pub fn clear_pod_proxy(&self, namespace: &str, pod: &str, port: Option<u16>) {
        self.state
            .lock()
            .unwrap()
            .proxies
            .remove(&(namespace.to_owned(), pod.to_owned(), port));
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The requests that could change state (not GET).
    pub fn writes(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(Recorded::is_write)
            .collect()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.state.lock().unwrap().requests.clear();
    }
}

/// Writes a kubeconfig at `dir/kubeconfig` with one context (and cluster) per
/// `(name, server)`, all using bearer token [`TOKEN`]; the first is the current context.
pub fn kubeconfig(dir: &Path, contexts: &[(&str, &FakeKube)]) -> PathBuf {
    let urls: Vec<(&str, &str)> = contexts.iter().map(|(n, f)| (*n, f.url.as_str())).collect();
    kubeconfig_urls(dir, &urls)
}

/// [`kubeconfig`] with explicit server URLs (e.g. a closed port).
pub fn kubeconfig_urls(dir: &Path, contexts: &[(&str, &str)]) -> PathBuf {
    let mut clusters = String::new();
    let mut ctxs = String::new();
    for (name, url) in contexts {
        clusters.push_str(&format!(
            "- name: {name}-cluster\n  cluster:\n    server: {url}\n"
        ));
        ctxs.push_str(&format!(
            "- name: {name}\n  context:\n    cluster: {name}-cluster\n    user: fake-user\n"
        ));
    }
    let current = contexts.first().map(|(n, _)| *n).unwrap_or_default();
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n{clusters}contexts:\n{ctxs}users:\n- name: fake-user\n  user:\n    token: {TOKEN}\ncurrent-context: {current}\n"
    );
    let path = dir.join("kubeconfig");
    std::fs::write(&path, text).unwrap();
    path
}

async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<Mutex<State>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let Ok((sock, _)) = accepted else { continue };
                let state = Arc::clone(&state);
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, std::convert::Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Dropping the listener closes the port; dropping the set aborts open connections.
    drop(listener);
    connections.shutdown().await;
}

/// A response before it becomes an HTTP one.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(status: u16, value: &Value) -> Self {
        Self {
            status,
            content_type: "application/json".into(),
            body: value.to_string().into_bytes(),
        }
    }
}

/// A `Status` error like the real server's.
fn status_error(code: u16, message: impl Into<String>, details: Option<(&Key, &str)>) -> Reply {
    let reason = match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    };
    status_with_reason(code, reason, message, details)
}

fn status_with_reason(
    code: u16,
    reason: &str,
    message: impl Into<String>,
    details: Option<(&Key, &str)>,
) -> Reply {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message.into(),
        "reason": reason,
        "code": code,
    });
    if let Some((key, _)) = details {
        body["details"] = json!({"name": key.name, "kind": key.plural});
    }
    Reply::json(code, &body)
}

fn not_found(key: &Key) -> Reply {
    status_error(
        404,
        format!("{} \"{}\" not found", key.resource(), key.name),
        Some((key, "")),
    )
}

fn stale_conflict(key: &Key) -> Reply {
    status_error(
        409,
        format!(
            "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
            key.resource(),
            key.name
        ),
        Some((key, "")),
    )
}

async fn handle(state: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let content_type = header("content-type");
    let authorization = header("authorization");
    let forwarded_headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter(|(n, _)| *n != hyper::header::AUTHORIZATION)
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(e) => return to_response(status_error(400, format!("cannot read body: {e}"), None)),
    };
    let reply = route(
        state,
        &Recorded {
            method,
            path,
            query,
            content_type,
        },
        &authorization,
        forwarded_headers,
        body,
    );
    to_response(reply)
}

fn to_response(reply: Reply) -> Response<Full<Bytes>> {
    Response::builder()
        .status(reply.status)
        .header("content-type", reply.content_type)
        .body(Full::new(Bytes::from(reply.body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn route(
    state: &Mutex<State>,
    req: &Recorded,
    authorization: &str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> Reply {
    let target = parse_path(&req.path);
    let params = parse_query(&req.query);
    let proxy_handler;
    {
        let mut st = state.lock().unwrap();
        st.requests.push(req.clone());
        if authorization != format!("Bearer {TOKEN}") {
            return status_error(401, "Unauthorized", None);
        }
        let path_and_query = if req.query.is_empty() {
            req.path.clone()
        } else {
            format!("{}?{}", req.path, req.query)
        };
        if let Some(i) = st.failures.iter().position(|f| {
            (f.method == "*" || f.method == req.method) && path_and_query.contains(&f.path_contains)
        }) {
            let f = st.failures[i].clone();
            if f.once {
                st.failures.remove(i);
            }
            return status_error(
                f.status,
                format!("injected failure for {} {path_and_query}", req.method),
                None,
            );
        }
        if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
            return status_error(400, "watch is not supported by the fake API server", None);
        }
        match &target {
            Target::PodProxy { key, port, .. } => {
                if !st.objects.contains_key(key) {
                    return not_found(key);
                }
                let ns = key.namespace.clone().unwrap_or_default();
                match st.proxies.get(&(ns, key.name.clone(), *port)) {
                    Some(h) => proxy_handler = Arc::clone(h),
                    None => {
                        let ip = st.objects[key]["status"]["podIP"]
                            .as_str()
                            .unwrap_or("10.0.0.1")
                            .to_owned();
                        return status_error(
                            503,
                            format!(
                                "error trying to reach service: dial tcp {ip}:{}: connect: connection refused",
                                port.map_or_else(|| "80".to_owned(), |p| p.to_string())
                            ),
                            None,
                        );
                    }
                }
            }
            _ => return st.dispatch(&req.method, &target, &params, &req.content_type, &body),
        }
    }
    // Outside the lock: the handler may use the fake's helpers.
    let Target::PodProxy { path, .. } = target else {
        return status_error(500, "unreachable", None);
    };
    let mut forwarded: Vec<String> = Vec::new();
    for pair in req.query.split('&').filter(|p| !p.is_empty()) {
        forwarded.push(pair.to_owned());
    }
    let r = proxy_handler(&ProxyRequest {
        method: req.method.clone(),
        path,
        query: forwarded.join("&"),
        headers,
        body,
    });
    Reply {
        status: r.status,
        content_type: r.content_type,
        body: r.body,
    }
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let v = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 2;
            }
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn key_of(obj: &Value) -> Option<Key> {
    let api_version = obj["apiVersion"].as_str()?;
    let kind = obj["kind"].as_str()?;
    let name = obj["metadata"]["name"].as_str()?;
    Some(Key {
        group_version: group_version_of(api_version),
        namespace: obj["metadata"]["namespace"].as_str().map(str::to_owned),
        plural: plural_of(kind),
        name: name.to_owned(),
    })
}

fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata").and_then(Value::as_object_mut) {
        Some(m) => m,
        None => unreachable!("metadata was just made an object"),
    }
}

/// One label selector requirement.
enum Requirement {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

fn parse_label_selector(sel: &str) -> Result<Vec<Requirement>, String> {
    let mut out = Vec::new();
    for part in sel.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part.contains(" in ") || part.contains(" notin ") || part.contains('(') {
            return Err(format!(
                "set-based label selector {part:?} is not supported by the fake API server"
            ));
        }
        let r = if let Some((k, v)) = part.split_once("!=") {
            Requirement::Ne(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once("==") {
            Requirement::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once('=') {
            Requirement::Eq(k.trim().into(), v.trim().into())
        } else if let Some(k) = part.strip_prefix('!') {
            Requirement::Absent(k.trim().into())
        } else {
            Requirement::Exists(part.into())
        };
        out.push(r);
    }
    Ok(out)
}

fn labels_match(obj: &Value, reqs: &[Requirement]) -> bool {
    let labels = &obj["metadata"]["labels"];
    reqs.iter().all(|r| match r {
        Requirement::Eq(k, v) => labels[k].as_str() == Some(v),
        Requirement::Ne(k, v) => labels[k].as_str() != Some(v),
        Requirement::Exists(k) => labels.get(k).is_some(),
        Requirement::Absent(k) => labels.get(k).is_none(),
    })
}

fn fields_match(obj: &Value, sel: &str) -> Result<bool, String> {
    for part in sel.split(',').filter(|p| !p.is_empty()) {
        let (field, want, negate) = if let Some((f, v)) = part.split_once("!=") {
            (f, v, true)
        } else if let Some((f, v)) = part.split_once("==") {
            (f, v, false)
        } else if let Some((f, v)) = part.split_once('=') {
            (f, v, false)
        } else {
            return Err(format!("invalid field selector {part:?}"));
        };
        let have = match field {
            "metadata.name" => obj["metadata"]["name"].as_str(),
            "metadata.namespace" => obj["metadata"]["namespace"].as_str(),
            other => {
                return Err(format!(
                    "field selector {other:?} is not supported by the fake API server"
                ))
            }
        };
        if (have == Some(want)) == negate {
            return Ok(false);
        }
    }
    Ok(true)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Some(t) = target.as_object_mut() else {
        return;
    };
    for (k, v) in patch {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Dotted paths of the leaves of `v` (lists and empty objects are leaves).
fn leaves(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v.as_object() {
        Some(m) if !m.is_empty() => {
            for (k, child) in m {
                leaves(child, &format!("{prefix}.{k}"), out);
            }
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.trim_start_matches('.')
        .split('.')
        .try_fold(v, |cur, seg| cur.get(seg))
}

/// The fields an apply request manages (identity and server-set metadata excluded).
fn applied_fields(obj: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    leaves(obj, "", &mut out);
    const SERVER_SET: [&str; 9] = [
        ".apiVersion",
        ".kind",
        ".metadata.name",
        ".metadata.namespace",
        ".metadata.resourceVersion",
        ".metadata.uid",
        ".metadata.creationTimestamp",
        ".metadata.generation",
        ".metadata.managedFields",
    ];
    out.retain(|p| {
        !SERVER_SET
            .iter()
            .any(|s| p == s || p.starts_with(&format!("{s}.")))
    });
    out
}

/// Minimal base64 (RFC 4648, with padding) for `stringData`.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl State {
    fn bump(&mut self) -> String {
        self.revision += 1;
        self.revision.to_string()
    }

    fn namespace_exists(&self, ns: &str) -> bool {
        self.objects.contains_key(&Key {
            group_version: "api/v1".into(),
            namespace: None,
            plural: "namespaces".into(),
            name: ns.into(),
        })
    }

    fn list(&self, c: &Collection, params: &HashMap<String, String>) -> Result<Vec<Key>, Reply> {
        let labels = parse_label_selector(params.get("labelSelector").map_or("", String::as_str))
            .map_err(|e| status_error(400, e, None))?;
        let mut keys = Vec::new();
        for (k, obj) in &self.objects {
            if !c.contains(k) || !labels_match(obj, &labels) {
                continue;
            }
            let fields = params.get("fieldSelector").map_or("", String::as_str);
            if fields_match(obj, fields).map_err(|e| status_error(400, e, None))? {
                keys.push(k.clone());
            }
        }
        Ok(keys)
    }

    fn list_body(&self, c: &Collection, items: Vec<Value>) -> Value {
        json!({
            "apiVersion": api_version_of(&c.group_version),
            "kind": format!("{}List", kind_of(&c.plural)),
            "metadata": {"resourceVersion": self.revision.to_string()},
            "items": items,
        })
    }

    fn dispatch(
        &mut self,
        method: &str,
        target: &Target,
        params: &HashMap<String, String>,
        content_type: &str,
        body: &[u8],
    ) -> Reply {
        match (method, target) {
            ("GET", Target::Version) => Reply::json(
                200,
                &json!({
                    "major": "1", "minor": "34", "gitVersion": "v1.34.0",
                    "gitCommit": "fake", "gitTreeState": "clean",
                    "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24",
                    "compiler": "gc", "platform": "linux/amd64"
                }),
            ),
            ("GET", Target::Collection(c)) => match self.list(c, params) {
                Ok(keys) => {
                    let items = keys.iter().map(|k| self.objects[k].clone()).collect();
                    Reply::json(200, &self.list_body(c, items))
                }
                Err(r) => r,
            },
            ("GET", Target::Object(key) | Target::Status(key)) => match self.objects.get(key) {
                Some(obj) => Reply::json(200, obj),
                None => not_found(key),
            },
            ("POST", Target::Collection(c)) => self.create(c, params, body),
            ("PUT", Target::Object(key)) => self.replace(key, params, body, false),
            ("PUT", Target::Status(key)) => self.replace(key, params, body, true),
            ("PATCH", Target::Object(key)) => self.patch(key, params, content_type, body, false),
            ("PATCH", Target::Status(key)) => self.patch(key, params, content_type, body, true),
            ("DELETE", Target::Object(key)) => self.delete(key, body),
            ("DELETE", Target::Collection(c)) => match self.list(c, params) {
                Ok(keys) => {
                    let items = keys
                        .iter()
                        .filter_map(|k| {
                            self.managers.remove(k);
                            self.objects.remove(k)
                        })
                        .collect();
                    self.bump();
                    Reply::json(200, &self.list_body(c, items))
                }
                Err(r) => r,
            },
            (_, Target::Unknown) => status_error(
                404,
                "the server could not find the requested resource (the fake API server serves /version and resource paths only)",
                None,
            ),
            (m, _) => status_error(405, format!("method {m} is not allowed on this path"), None),
        }
    }

    fn parse_body(body: &[u8]) -> Result<Value, Reply> {
        let v: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            // Apply bodies may be YAML (kubectl); kube-rs sends JSON.
            Err(_) => serde_yaml::from_slice(body).map_err(|e| {
                status_error(
                    400,
                    format!("the request body is neither JSON nor YAML: {e}"),
                    None,
                )
            })?,
        };
        if !v.is_object() {
            return Err(status_error(400, "the request body is not an object", None));
        }
        Ok(v)
    }

    /// Checks apiVersion/kind/name/namespace of a body against where it is sent.
    fn check_identity(key: &Key, obj: &Value) -> Result<(), Reply> {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default();
        let kind = obj["kind"].as_str().unwrap_or_default();
        if api_version != key.api_version() || kind != kind_of(&key.plural) {
            return Err(status_error(
                400,
                format!(
                    "the body is apiVersion {api_version:?} kind {kind:?} but the request is for {} (apiVersion {} kind {})",
                    key.resource(),
                    key.api_version(),
                    kind_of(&key.plural)
                ),
                None,
            ));
        }
        if obj["metadata"]["name"].as_str() != Some(key.name.as_str()) {
            return Err(status_error(
                400,
                format!(
                    "the name of the object ({}) does not match the name on the URL ({})",
                    obj["metadata"]["name"].as_str().unwrap_or_default(),
                    key.name
                ),
                None,
            ));
        }
        if let Some(ns) = obj["metadata"]["namespace"].as_str() {
            if Some(ns) != key.namespace.as_deref() {
                return Err(status_error(
                    400,
                    "the namespace of the provided object does not match the namespace sent on the request",
                    None,
                ));
            }
        }
        Ok(())
    }

    /// Fills server-set fields of an object about to be stored; `previous` is the stored
    /// version for updates.
    fn finish_write(&mut self, key: &Key, obj: &mut Value, previous: Option<&Value>) {
        if key.plural == "secrets" {
            if let Some(string_data) = obj
                .as_object_mut()
                .and_then(|o| o.remove("stringData"))
                .and_then(|v| v.as_object().cloned())
            {
                for (k, v) in string_data {
                    let text = v.as_str().unwrap_or_default().as_bytes().to_vec();
                    obj["data"][k] = json!(base64(&text));
                }
            }
        }
        if key.plural == "services" && previous.is_none() {
            self.allocate_service(obj);
        }
        let rv = self.bump();
        let generation = match previous {
            None => 1,
            Some(p) => {
                let g = p["metadata"]["generation"].as_i64().unwrap_or(1);
                if p.get("spec") != obj.get("spec") {
                    g + 1
                } else {
                    g
                }
            }
        };
        let uid = previous
            .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("fake-uid-{rv}"));
        let created = previous
            .and_then(|p| {
                p["metadata"]["creationTimestamp"]
                    .as_str()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "2026-01-01T00:00:00Z".to_owned());
        let managed = self.managed_fields(key);
        let meta = metadata_mut(obj);
        meta.insert("resourceVersion".into(), json!(rv));
        meta.insert("uid".into(), json!(uid));
        meta.insert("creationTimestamp".into(), json!(created));
        meta.insert("generation".into(), json!(generation));
        if let Some(ns) = &key.namespace {
            meta.insert("namespace".into(), json!(ns));
        }
        if !managed.is_empty() {
            meta.insert("managedFields".into(), Value::Array(managed));
        }
    }

    fn managed_fields(&self, key: &Key) -> Vec<Value> {
        self.managers
            .get(key)
            .map(|m| {
                m.iter()
                    .map(|(name, (op, api_version, _))| {
                        json!({
                            "manager": name,
                            "operation": format!("{op:?}"),
                            "apiVersion": api_version,
                            "time": "2026-01-01T00:00:00Z",
                            "fieldsType": "FieldsV1",
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn allocate_service(&mut self, obj: &mut Value) {
        if obj["spec"]["clusterIP"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
        {
            let n = self.next_cluster_ip;
            self.next_cluster_ip += 1;
            obj["spec"]["clusterIP"] = json!(format!("10.96.{}.{}", n / 250, n % 250 + 1));
        }
        let typ = obj["spec"]["type"]
            .as_str()
            .unwrap_or("ClusterIP")
            .to_owned();
        if typ == "NodePort" || typ == "LoadBalancer" {
            if let Some(ports) = obj["spec"]["ports"].as_array_mut() {
                for p in ports {
                    if p["nodePort"].as_u64().unwrap_or(0) == 0 {
                        p["nodePort"] = json!(self.next_node_port);
                        self.next_node_port += 1;
                    }
                }
            }
        }
    }

    fn record_manager(&mut self, key: &Key, manager: Option<&String>, op: Operation) {
        if let Some(m) = manager {
            let api_version = key.api_version();
            let entry = self.managers.entry(key.clone()).or_default();
            match entry.get_mut(m) {
                // An update by an apply manager keeps its applied field set.
                Some(e) if op == Operation::Update => e.1 = api_version,
                _ => {
                    entry.insert(m.clone(), (op, api_version, BTreeSet::new()));
                }
            }
        }
    }

    fn create(&mut self, c: &Collection, params: &HashMap<String, String>, body: &[u8]) -> Reply {
        let mut obj = match Self::parse_body(body) {
            Ok(v) => v,
            Err(r) => return r,
        };
        if obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
        {
            match obj["metadata"]["generateName"].as_str() {
                Some(prefix) => {
                    let name = format!("{prefix}{:05x}", self.revision + 1);
                    obj["metadata"]["name"] = json!(name);
                }
                None => {
                    return status_error(
                        422,
                        format!(
                            "{} is invalid: metadata.name: Required value: name or generateName is required",
                            kind_of(&c.plural)
                        ),
                        None,
                    )
                }
            }
        }
        let key = c.key(obj["metadata"]["name"].as_str().unwrap_or_default());
        if let Err(r) = Self::check_identity(&key, &obj) {
            return r;
        }
        if let Some(ns) = &key.namespace {
            if !self.namespace_exists(ns) {
                return status_error(404, format!("namespaces \"{ns}\" not found"), None);
            }
        }
        if self.objects.contains_key(&key) {
            return status_with_reason(
                409,
                "AlreadyExists",
                format!("{} \"{}\" already exists", key.resource(), key.name),
                Some((&key, "")),
            );
        }
        if STATUS_SUBRESOURCE.contains(&key.plural.as_str()) {
            if let Some(o) = obj.as_object_mut() {
                o.remove("status");
            }
        }
        self.record_manager(&key, params.get("fieldManager"), Operation::Update);
        self.finish_write(&key, &mut obj, None);
        self.objects.insert(key, obj.clone());
        Reply::json(201, &obj)
    }

    /// Keeps the stored status (main resource) or everything but the status (`/status`).
    fn scope_write(key: &Key, stored: &Value, mut new: Value, status_only: bool) -> Value {
        if status_only {
            let mut out = stored.clone();
            out["status"] = new.get("status").cloned().unwrap_or(Value::Null);
            out
        } else {
            if STATUS_SUBRESOURCE.contains(&key.plural.as_str()) {
                match stored.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
            new
        }
    }

    fn replace(
        &mut self,
        key: &Key,
        params: &HashMap<String, String>,
        body: &[u8],
        status_only: bool,
    ) -> Reply {
        let obj = match Self::parse_body(body) {
            Ok(v) => v,
            Err(r) => return r,
        };
        if let Err(r) = Self::check_identity(key, &obj) {
            return r;
        }
        let Some(stored) = self.objects.get(key).cloned() else {
            return not_found(key);
        };
        if let Some(rv) = obj["metadata"]["resourceVersion"].as_str() {
            if rv
                != stored["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
            {
                return stale_conflict(key);
            }
        }
        let mut new = Self::scope_write(key, &stored, obj, status_only);
        self.record_manager(key, params.get("fieldManager"), Operation::Update);
        self.finish_write(key, &mut new, Some(&stored));
        self.objects.insert(key.clone(), new.clone());
        Reply::json(200, &new)
    }

    fn patch(
        &mut self,
        key: &Key,
        params: &HashMap<String, String>,
        content_type: &str,
        body: &[u8],
        status_only: bool,
    ) -> Reply {
        let ct = content_type.split(';').next().unwrap_or_default().trim();
        match ct {
            "application/apply-patch+yaml" => self.apply(key, params, body, status_only),
            "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                let patch = match Self::parse_body(body) {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                let Some(stored) = self.objects.get(key).cloned() else {
                    return not_found(key);
                };
                if let Some(rv) = patch["metadata"]["resourceVersion"].as_str() {
                    if rv
                        != stored["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap_or_default()
                    {
                        return stale_conflict(key);
                    }
                }
                let mut merged = stored.clone();
                merge_patch(&mut merged, &patch);
                if let Err(r) = Self::check_identity(key, &merged) {
                    return r;
                }
                let mut new = Self::scope_write(key, &stored, merged, status_only);
                self.record_manager(key, params.get("fieldManager"), Operation::Update);
                self.finish_write(key, &mut new, Some(&stored));
                self.objects.insert(key.clone(), new.clone());
                Reply::json(200, &new)
            }
            other => status_error(
                415,
                format!("the fake API server does not support patch content type {other:?}"),
                None,
            ),
        }
    }

    fn apply(
        &mut self,
        key: &Key,
        params: &HashMap<String, String>,
        body: &[u8],
        status_only: bool,
    ) -> Reply {
        let Some(manager) = params
            .get("fieldManager")
            .filter(|m| !m.is_empty())
            .cloned()
        else {
            return status_error(
                400,
                "PATCH with application/apply-patch+yaml requires the fieldManager query parameter",
                None,
            );
        };
        let force = params.get("force").is_some_and(|f| f == "true");
        let applied = match Self::parse_body(body) {
            Ok(v) => v,
            Err(r) => return r,
        };
        if let Err(r) = Self::check_identity(key, &applied) {
            return r;
        }
        let fields = applied_fields(&applied);
        let stored = self.objects.get(key).cloned();
        let Some(stored) = stored else {
            if let Some(ns) = &key.namespace {
                if !self.namespace_exists(ns) {
                    return status_error(404, format!("namespaces \"{ns}\" not found"), None);
                }
            }
            let mut obj = applied;
            if status_only {
                return not_found(key);
            }
            if STATUS_SUBRESOURCE.contains(&key.plural.as_str()) {
                if let Some(o) = obj.as_object_mut() {
                    o.remove("status");
                }
            }
            self.managers
                .entry(key.clone())
                .or_default()
                .insert(manager, (Operation::Apply, key.api_version(), fields));
            self.finish_write(key, &mut obj, None);
            self.objects.insert(key.clone(), obj.clone());
            return Reply::json(201, &obj);
        };
        if let Some(rv) = applied["metadata"]["resourceVersion"].as_str() {
            if rv
                != stored["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
            {
                return stale_conflict(key);
            }
        }
        // Conflicts: fields another apply manager owns whose value this apply changes.
        let mut conflicts = Vec::new();
        if let Some(owners) = self.managers.get(key) {
            for (other, (op, _, owned)) in owners {
                if other == &manager || *op != Operation::Apply {
                    continue;
                }
                for f in fields.intersection(owned) {
                    if lookup(&stored, f) != lookup(&applied, f) {
                        conflicts.push((other.clone(), f.clone()));
                    }
                }
            }
        }
        if !conflicts.is_empty() && !force {
            let list: Vec<String> = conflicts
                .iter()
                .map(|(m, f)| format!("conflict with \"{m}\": {f}"))
                .collect();
            return status_error(
                409,
                format!(
                    "Apply failed with {} conflict{}: {}",
                    conflicts.len(),
                    if conflicts.len() == 1 { "" } else { "s" },
                    list.join("\n")
                ),
                Some((key, "")),
            );
        }
        let mut merged = stored.clone();
        let mut patch = applied;
        if let Some(meta) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
            for f in [
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "generation",
                "managedFields",
            ] {
                meta.remove(f);
            }
        }
        merge_patch(&mut merged, &patch);
        let mut new = Self::scope_write(key, &stored, merged, status_only);
        let owners = self.managers.entry(key.clone()).or_default();
        for (m, (_, _, owned)) in owners.iter_mut() {
            if m != &manager {
                owned.retain(|f| !fields.contains(f));
            }
        }
        owners.insert(manager, (Operation::Apply, key.api_version(), fields));
        let unchanged = {
            let strip = |v: &Value| {
                let mut v = v.clone();
                if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.remove("managedFields");
                }
                v
            };
            strip(&new) == strip(&stored)
        };
        if unchanged {
            // A no-op apply does not write (resourceVersion unchanged), like the real server.
            let managed = self.managed_fields(key);
            metadata_mut(&mut new).insert("managedFields".into(), Value::Array(managed));
            self.objects.insert(key.clone(), new.clone());
            return Reply::json(200, &new);
        }
        self.finish_write(key, &mut new, Some(&stored));
        self.objects.insert(key.clone(), new.clone());
        Reply::json(200, &new)
    }

    fn delete(&mut self, key: &Key, body: &[u8]) -> Reply {
        let Some(stored) = self.objects.get(key) else {
            return not_found(key);
        };
        if !body.is_empty() {
            if let Ok(opts) = serde_json::from_slice::<Value>(body) {
                let pre = &opts["preconditions"];
                for (field, what) in [("resourceVersion", "ResourceVersion"), ("uid", "UID")] {
                    if let Some(want) = pre[field].as_str() {
                        let have = stored["metadata"][field].as_str().unwrap_or_default();
                        if want != have {
                            return status_error(
                                409,
                                format!(
                                    "Precondition failed: {what} in precondition: {want}, {what} in object meta: {have}"
                                ),
                                Some((key, "")),
                            );
                        }
                    }
                }
            }
        }
        let uid = stored["metadata"]["uid"].clone();
        self.objects.remove(key);
        self.managers.remove(key);
        self.bump();
        Reply::json(
            200,
            &json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {"name": key.name, "kind": key.plural, "uid": uid},
            }),
        )
    }
}
