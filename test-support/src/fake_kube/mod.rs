//! A fake Kubernetes API server for tests, as strict as a real one where the CLI can go
//! wrong: HTTP/1.1 (or HTTPS with a client certificate, [`FakeKube::start_tls`]) on
//! 127.0.0.1, an in-memory object store, the REST API for kube-rs and real `kubectl`.
//!
//! Modules: `store` (handlers, selectors, server-side apply), `validate` (typed schema
//! decoding with k8s-openapi and semantic rules), `immutable` (defaults and immutable
//! fields), `discovery` (`/api`, `/apis`, resource lists, OpenAPI, Tables), `watch`,
//! `tls`.
//!
//! What it implements (paths as the real API server lays them out, see
//! <https://kubernetes.io/docs/reference/using-api/api-concepts/>):
//!
//! | request | behaviour |
//! |---|---|
//! | `GET /version` | a fixed v1.34.0 version |
//! | `GET /api`, `/apis`, `/api/v1`, `/apis/{group}/{version}`, `/openapi/v2`, `/openapi/v3[/…]` | discovery and OpenAPI documents (see `discovery`) |
//! | `GET …/{plural}/{name}` | the object, or 404 `NotFound`; a Table when asked for |
//! | `GET …/{plural}?labelSelector=&fieldSelector=` | a `{Kind}List`; label selectors `k=v`, `k==v`, `k!=v`, `k`, `!k` joined by `,`; field selectors `metadata.name`, `metadata.namespace` |
//! | `GET …?watch=true` | a stream of watch events (see `watch`) |
//! | `POST …/{plural}` | create (201), 409 `AlreadyExists`, 404 when the namespace does not exist |
//! | `PUT …/{plural}/{name}` | replace; a stale `metadata.resourceVersion` is 409 `Conflict` |
//! | `PATCH` `application/apply-patch+yaml` | server-side apply: `?fieldManager=` required and recorded in `managedFields`; creates the object when missing, else merges the applied fields into it and removes fields the manager applied before and no longer applies (unless another manager owns them); fields last applied by *another* apply manager with a different value are a 409 `Conflict` unless `force=true` (which moves their ownership) |
//! | `PATCH` `application/merge-patch+json` / `strategic-merge-patch+json` | RFC 7386 merge (the strategic form is treated as a plain merge: lists are replaced, not merged by key) |
//! | `DELETE …/{plural}/{name}` | removes it (a `Success` Status), 404 when missing, 409 on a failed `preconditions` |
//! | `DELETE …/{plural}?labelSelector=` | delete-collection, returns the deleted list |
//! | `…/{name}/status` | GET, PUT, merge PATCH and apply of the `status` only; writes to the main resource of kinds with a status subresource keep the stored status, as the real server does |
//! | `…/pods/{name}[:{port}]/proxy/{path}` | answered by a handler the test registered with [`FakeKube::set_pod_proxy`]; 404 when the pod object does not exist, 503 "connection refused" when no handler is registered |
//!
//! Every write is admitted like on a real server: typed schema decoding (400 for wrong
//! types, 422 for missing required fields, unknown fields refused under
//! `fieldValidation=Strict` and dropped with a `Warning` otherwise — see
//! [`FakeKube::warnings`]), defaults (Secret `type`, Deployment `strategy`), semantic
//! checks (names, labels, selector vs template, volume mounts) and immutable fields
//! (see `immutable`), each refusal a `Status` with the real server's reason and message.
//! [`FakeKube::insert`] bypasses all of it to seed state.
//!
//! Writes keep `metadata.resourceVersion` increasing (one counter per server, like etcd's
//! revision), set `uid`/`creationTimestamp` on create and bump `generation` when `spec`
//! changes. A Service of type NodePort or LoadBalancer gets a `clusterIP` and node ports
//! allocated on create. A `Secret`'s `stringData` is folded into `data` (base64).
//! Every request must carry the kubeconfig's bearer token ([`TOKEN`]) or, over HTTPS, the
//! client certificate, else 401.
//!
//! Not implemented: JSON patch (415), aggregated discovery, watch bookmarks,
//! set-based label selectors (`in`, `notin`: 400), strategic merge by list keys.
//!
//! Note: kube-rs clients retry 429, 503 and 504 answers with backoff (up to 15 times,
//! `kube::Config::default_retry`), so an injected or proxied 503 makes a default client
//! wait a long time; inject 500 or build the client with `default_retry = false`.
//!
//! Test controls: [`FakeKube::fail_next`] / [`FakeKube::fail_always`] make matching
//! requests fail with a status, [`FakeKube::stop`] closes the port (an unreachable peer),
//! [`FakeKube::requests`] is the request log, and [`FakeKube::insert`] /
//! [`FakeKube::object`] / [`FakeKube::set_status`] read and write the store directly.

mod discovery;
mod immutable;
mod store;
mod tls;
mod validate;
mod watch;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};

pub use store::base64;
pub use tls::TlsMaterial;

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
type ManagerEntry = (Operation, String, BTreeSet<store::FieldPath>);

/// One change of the store, as a watch reports it.
#[derive(Debug, Clone)]
struct Event {
    /// The store's revision after the change.
    revision: u64,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    kind: &'static str,
    key: Key,
    object: Value,
}

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
    /// Every `Warning` the server sent (unknown fields dropped under `Warn`).
    warnings: Vec<String>,
    /// Every change since start, oldest first, for watches.
    events: Vec<Event>,
    /// The revision of the newest event; watches wait on it.
    revision_tx: tokio::sync::watch::Sender<u64>,
}

impl State {
    fn record_event(&mut self, kind: &'static str, key: &Key, object: &Value) {
        let revision = self.revision;
        self.events.push(Event {
            revision,
            kind,
            key: key.clone(),
            object: object.clone(),
        });
        self.revision_tx.send_replace(revision);
    }
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
    /// Certificates when the server speaks HTTPS ([`FakeKube::start_tls`]).
    pub tls: Option<TlsMaterial>,
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
        Self::start_with(None).await
    }

    /// Like [`Self::start`], speaking HTTPS with a fresh CA ([`Self::tls`]); requests
    /// authenticate with the bearer token or the client certificate.
    pub async fn start_tls() -> Self {
        Self::start_with(Some(tls::issue())).await
    }

    async fn start_with(tls: Option<TlsMaterial>) -> Self {
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
            warnings: Vec::new(),
            events: Vec::new(),
            revision_tx: tokio::sync::watch::channel(0).0,
        }));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let acceptor = tls
            .as_ref()
            .map(|m| tokio_rustls::TlsAcceptor::from(tls::server_config(m)));
        let task = tokio::spawn(serve(listener, Arc::clone(&state), stop_rx, acceptor));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let fake = Self {
            url: format!("{scheme}://{addr}"),
            addr,
            tls,
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
        st.put_object(&key, obj.clone());
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
        self.state.lock().unwrap().remove_object(&key)
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
        let obj = obj.clone();
        st.record_event("MODIFIED", &key, &obj);
    }

    /// Every `Warning` header value the server sent so far (e.g. `unknown field
    /// "spec.foo"` for a field a write carried that the schema does not declare; the
    /// real server drops such fields under the default `fieldValidation=Warn`).
    pub fn warnings(&self) -> Vec<String> {
        self.state.lock().unwrap().warnings.clone()
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
    write_kubeconfig(dir, contexts, false)
}

/// [`kubeconfig`] whose users authenticate with each server's client certificate
/// instead of the token (the servers must speak TLS, [`FakeKube::start_tls`]).
pub fn kubeconfig_client_cert(dir: &Path, contexts: &[(&str, &FakeKube)]) -> PathBuf {
    write_kubeconfig(dir, contexts, true)
}

fn write_kubeconfig(dir: &Path, contexts: &[(&str, &FakeKube)], client_cert: bool) -> PathBuf {
    let mut clusters = String::new();
    let mut ctxs = String::new();
    let mut users = String::new();
    for (name, fake) in contexts {
        let url = &fake.url;
        let ca = fake.tls.as_ref().map_or(String::new(), |m| {
            format!(
                "    certificate-authority-data: {}\n",
                base64(m.ca_pem.as_bytes())
            )
        });
        clusters.push_str(&format!(
            "- name: {name}-cluster\n  cluster:\n    server: {url}\n{ca}"
        ));
        let user = match (&fake.tls, client_cert) {
            (Some(m), true) => {
                users.push_str(&format!(
                    "- name: {name}-admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
                    base64(m.client_cert_pem.as_bytes()),
                    base64(m.client_key_pem.as_bytes())
                ));
                format!("{name}-admin")
            }
            _ => "fake-user".to_owned(),
        };
        ctxs.push_str(&format!(
            "- name: {name}\n  context:\n    cluster: {name}-cluster\n    user: {user}\n"
        ));
    }
    let current = contexts.first().map(|(n, _)| *n).unwrap_or_default();
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n{clusters}contexts:\n{ctxs}users:\n- name: fake-user\n  user:\n    token: {TOKEN}\n{users}current-context: {current}\n"
    );
    let path = dir.join("kubeconfig");
    std::fs::write(&path, text).unwrap();
    path
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
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let Ok((sock, _)) = accepted else { continue };
                let state = Arc::clone(&state);
                let tls = tls.clone();
                connections.spawn(async move {
                    match tls {
                        None => serve_connection(TokioIo::new(sock), state, false).await,
                        Some(acceptor) => {
                            // A failed handshake (e.g. a client that does not trust
                            // the CA) just closes the connection.
                            let Ok(stream) = acceptor.accept(sock).await else { return };
                            let has_cert = stream.get_ref().1.peer_certificates().is_some();
                            serve_connection(TokioIo::new(stream), state, has_cert).await;
                        }
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Dropping the listener closes the port; dropping the set aborts open connections.
    drop(listener);
    connections.shutdown().await;
}

/// Serves HTTP/1.1 on one connection; `client_cert`: the TLS peer presented a
/// certificate the CA signed (it authenticates every request on the connection).
async fn serve_connection<I>(io: TokioIo<I>, state: Arc<Mutex<State>>, client_cert: bool)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let state = Arc::clone(&state);
        async move { Ok::<_, std::convert::Infallible>(handle(&state, req, client_cert).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await;
}

/// A response before it becomes an HTTP one.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: String,
    body: Vec<u8>,
    /// `Warning` headers (RFC 7234 form `299 - "text"`, as the real server sends).
    warnings: Vec<String>,
}

impl Reply {
    fn json(status: u16, value: &Value) -> Self {
        Self {
            status,
            content_type: "application/json".into(),
            body: value.to_string().into_bytes(),
            warnings: Vec::new(),
        }
    }

    fn with_warnings(mut self, warnings: Vec<String>) -> Self {
        self.warnings = warnings;
        self
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

type Body = BoxBody<Bytes, std::convert::Infallible>;

async fn handle(
    state: &Arc<Mutex<State>>,
    req: Request<Incoming>,
    client_cert: bool,
) -> Response<Body> {
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
    let accept = header("accept");
    let host = header("host");
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
    let recorded = Recorded {
        method,
        path,
        query,
        content_type,
    };
    let authenticated = client_cert || authorization == format!("Bearer {TOKEN}");
    let params = parse_query(&recorded.query);
    let table = discovery::wants_table(&accept);
    if authenticated
        && recorded.method == "GET"
        && params.get("watch").is_some_and(|w| w == "true" || w == "1")
    {
        state.lock().unwrap().requests.push(recorded.clone());
        return match watch::start(state, &parse_path(&recorded.path), &params, table) {
            Ok(frames) => Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(frames)).boxed())
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed())),
            Err(reply) => to_response(reply),
        };
    }
    let reply = route(
        state,
        &recorded,
        authenticated,
        &host,
        forwarded_headers,
        body,
    );
    let is_get = recorded.method == "GET"
        && matches!(
            parse_path(&recorded.path),
            Target::Collection(_) | Target::Object(_)
        );
    if table && is_get {
        let include = params
            .get("includeObject")
            .map_or("Metadata", String::as_str);
        return to_response(discovery::to_table(reply, include));
    }
    to_response(reply)
}

fn to_response(reply: Reply) -> Response<Body> {
    let mut builder = Response::builder()
        .status(reply.status)
        .header("content-type", reply.content_type);
    for w in &reply.warnings {
        builder = builder.header("warning", format!("299 - {w:?}"));
    }
    builder
        .body(Full::new(Bytes::from(reply.body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn route(
    state: &Mutex<State>,
    req: &Recorded,
    authenticated: bool,
    host: &str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> Reply {
    let target = parse_path(&req.path);
    let params = parse_query(&req.query);
    let proxy_handler;
    {
        let mut st = state.lock().unwrap();
        st.requests.push(req.clone());
        if !authenticated {
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
        if req.method == "GET" && matches!(target, Target::Unknown) {
            if let Some(reply) = discovery::serve(&req.path, host) {
                return reply;
            }
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
        warnings: Vec::new(),
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
