//! The Kubernetes source against a replayed API server.
//!
//! `ApiServer` is a `tower::Service` that stands in for the HTTP connection of a
//! `kube::Client`: for each resource path it answers requests from a script of recorded
//! responses (`tests/fixtures/kube/`), in order, checking that each request is the list
//! or watch the script expects, and recording every request. A request with nothing
//! left to answer it stays pending, like an idle watch. Time is paused, so kube's
//! backoff after an error costs no wall-clock time.
// Helpers outside #[test] functions: a poisoned lock or a bad fixture is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use clustermesh_api::v1;
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::source::{
    K8sObject, KubernetesSource, ObjectKind, Source, SourceError, SourceEvent,
};
use clustermesh_apiserver::state::{ClusterObjects, RecordChange};
use http::{Request, Response};
use kube::client::Body;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::Logs;

const SERVICES: &str = "/api/v1/services";
const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NODES: &str = "/api/v1/nodes";
const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const NETWORK_POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";
const CILIUM_NETWORK_POLICIES: &str = "/apis/cilium.io/v2/ciliumnetworkpolicies";

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    List,
    Watch,
}

/// One scripted response.
#[derive(Debug)]
struct Reply {
    call: Call,
    status: u16,
    fixture: &'static str,
}

fn list(fixture: &'static str) -> Reply {
    Reply {
        call: Call::List,
        status: 200,
        fixture,
    }
}

fn watch(fixture: &'static str) -> Reply {
    Reply {
        call: Call::Watch,
        status: 200,
        fixture,
    }
}

/// A request the fake API server received.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    path: String,
    call: Call,
    resource_version: Option<String>,
    /// When (paused test time).
    at: tokio::time::Instant,
}

#[derive(Debug, Default)]
struct Script {
    replies: HashMap<&'static str, VecDeque<Reply>>,
    seen: Vec<Seen>,
    /// Requests that did not match the script.
    unexpected: Vec<String>,
}

/// The replaying API server. See the module docs.
#[derive(Debug, Clone, Default)]
struct ApiServer(Arc<Mutex<Script>>);

impl ApiServer {
    fn script(self, path: &'static str, replies: Vec<Reply>) -> Self {
        self.0.lock().unwrap().replies.insert(path, replies.into());
        self
    }

    fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    fn seen(&self, path: &str) -> Vec<Seen> {
        let script = self.0.lock().unwrap();
        script
            .seen
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }

    fn unexpected(&self) -> Vec<String> {
        self.0.lock().unwrap().unexpected.clone()
    }

    fn remaining(&self, path: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .replies
            .get(path)
            .map_or(0, VecDeque::len)
    }
}

/// A recorded response. Embedded at compile time, so the test binary does not depend on
/// the directory it was built from (the build directory is shared between checkouts).
fn fixture(name: &str) -> Vec<u8> {
    macro_rules! fixtures {
        ($($file:literal),* $(,)?) => {
            match name {
                $($file => include_bytes!(concat!("../fixtures/kube/", $file)).to_vec(),)*
                other => panic!("no fixture {other} in tests/fixtures/kube"),
            }
        };
    }
    fixtures!(
        "services-list.json",
        "services-watch.jsonl",
        "services-relist.json",
        "endpointslices-forbidden.json",
        "endpointslices-list.json",
        "nodes-list.json",
        "pods-list.json",
        "pods-list-malformed.json",
        "pods-watch-malformed.jsonl",
    )
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl tower::Service<Request<Body>> for ApiServer {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        let params: Vec<(&str, &str)> =
            query.split('&').filter_map(|p| p.split_once('=')).collect();
        let call = if params.contains(&("watch", "true")) {
            Call::Watch
        } else {
            Call::List
        };
        let resource_version = params
            .iter()
            .find(|(k, _)| *k == "resourceVersion")
            .map(|(_, v)| (*v).to_owned());
        let mut script = self.0.lock().unwrap();
        script.seen.push(Seen {
            path: path.clone(),
            call,
            resource_version,
            at: tokio::time::Instant::now(),
        });
        let queue = script.replies.entry(leak(&path)).or_default();
        match queue.front() {
            None => Box::pin(std::future::pending()),
            Some(reply) if reply.call != call => {
                let message = format!(
                    "{path}?{query}: a {call:?} request, but the script expects a {:?}",
                    reply.call
                );
                script.unexpected.push(message.clone());
                Box::pin(std::future::ready(Ok(respond(500, message.into_bytes()))))
            }
            Some(_) => {
                let reply = queue.pop_front().unwrap();
                let body = fixture(reply.fixture);
                Box::pin(std::future::ready(Ok(respond(reply.status, body))))
            }
        }
    }
}

/// Paths are few and fixed; the script map is keyed by `&'static str`.
fn leak(path: &str) -> &'static str {
    [
        SERVICES,
        ENDPOINT_SLICES,
        NODES,
        PODS,
        NAMESPACES,
        NETWORK_POLICIES,
        CILIUM_NETWORK_POLICIES,
    ]
    .into_iter()
    .find(|p| *p == path)
    .unwrap_or_else(|| panic!("request for an unexpected path {path}"))
}

fn respond(status: u16, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

/// A running source and the receiving end of its events.
struct Running {
    events: mpsc::Receiver<SourceEvent>,
    received: Vec<SourceEvent>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), SourceError>>,
}

impl Running {
    fn start(source: KubernetesSource) -> Self {
        let (tx, events) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(Box::new(source).run(tx, shutdown.clone()));
        Running {
            events,
            received: Vec::new(),
            shutdown,
            task,
        }
    }

    /// Receives until `kind` has produced `n` events (or ten minutes of paused time pass),
    /// and returns that kind's events so far, described.
    async fn until(&mut self, kind: ObjectKind, n: usize) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        while of_kind(&self.received, kind).len() < n {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => self.received.push(event),
                Ok(None) | Err(_) => break,
            }
        }
        of_kind(&self.received, kind)
            .into_iter()
            .map(describe)
            .collect()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("source did not stop on shutdown")
            .expect("source task panicked");
        assert!(result.is_ok(), "{result:?}");
    }
}

fn event_kind(event: &SourceEvent) -> ObjectKind {
    match event {
        SourceEvent::Apply(o) => o.kind(),
        SourceEvent::Delete(r) => r.kind,
        SourceEvent::Replace { kind, .. } | SourceEvent::Synced(kind) => *kind,
    }
}

fn of_kind(events: &[SourceEvent], kind: ObjectKind) -> Vec<&SourceEvent> {
    events.iter().filter(|e| event_kind(e) == kind).collect()
}

fn describe(event: &SourceEvent) -> String {
    let name = |o: &K8sObject| {
        let r = o.object_ref();
        if r.namespace.is_empty() {
            r.name
        } else {
            format!("{}/{}", r.namespace, r.name)
        }
    };
    match event {
        SourceEvent::Apply(o) => format!("Apply {}", name(o)),
        SourceEvent::Delete(r) => format!("Delete {}/{}", r.namespace, r.name),
        SourceEvent::Replace { objects, .. } => format!(
            "Replace [{}]",
            objects.iter().map(name).collect::<Vec<_>>().join(", ")
        ),
        SourceEvent::Synced(_) => "Synced".to_owned(),
    }
}

/// The `n`th event of `kind` as received.
fn nth(running: &Running, kind: ObjectKind, n: usize) -> SourceEvent {
    of_kind(&running.received, kind)[n].clone()
}

fn replace_objects(event: SourceEvent) -> Vec<K8sObject> {
    match event {
        SourceEvent::Replace { objects, .. } => objects,
        other => panic!("expected Replace, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn lists_become_replaces_watch_events_flow_and_gone_relists() {
    let api = ApiServer::default()
        .script(
            SERVICES,
            vec![
                list("services-list.json"),
                watch("services-watch.jsonl"),
                list("services-relist.json"),
            ],
        )
        .script(ENDPOINT_SLICES, vec![list("endpointslices-list.json")])
        .script(NODES, vec![list("nodes-list.json")])
        .script(PODS, vec![list("pods-list.json")]);
    let mut running = Running::start(KubernetesSource::new(api.client()));

    let services = running.until(ObjectKind::Service, 5).await;
    assert_eq!(
        services,
        [
            "Replace [shop/frontend, shop/legacy]",
            "Apply shop/backend",
            "Apply shop/frontend",
            "Delete shop/legacy",
            "Replace [shop/backend, shop/db, shop/frontend]",
        ]
    );
    assert_eq!(
        running.until(ObjectKind::EndpointSlice, 1).await,
        ["Replace [shop/frontend-x7k2p]"]
    );
    assert_eq!(
        running.until(ObjectKind::Node, 1).await,
        ["Replace [node-a]"]
    );
    assert_eq!(
        running.until(ObjectKind::Pod, 1).await,
        ["Replace [shop/web-1]"]
    );

    // The watch resumed from the list's resourceVersion; the 410 made kube list again,
    // and the next watch starts from the re-list.
    let calls: Vec<(Call, Option<String>)> = api
        .seen(SERVICES)
        .into_iter()
        .map(|s| (s.call, s.resource_version))
        .collect();
    assert_eq!(calls[0].0, Call::List);
    assert_eq!(calls[1], (Call::Watch, Some("100".to_owned())));
    assert_eq!(calls[2].0, Call::List);
    assert_eq!(calls[3], (Call::Watch, Some("200".to_owned())));
    assert_eq!(api.remaining(SERVICES), 0);
    assert!(api.unexpected().is_empty(), "{:?}", api.unexpected());

    // The MODIFIED event carries the new annotation.
    let SourceEvent::Apply(K8sObject::Service(frontend)) = nth(&running, ObjectKind::Service, 2)
    else {
        panic!("expected the frontend Apply");
    };
    let annotations = frontend.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations
            .get("service.cilium.io/affinity")
            .map(String::as_str),
        Some("local")
    );

    // Objects are slimmed before they leave the source.
    let listed = replace_objects(nth(&running, ObjectKind::Service, 0));
    let K8sObject::Service(first) = &listed[0] else {
        panic!("expected a Service");
    };
    assert!(first.metadata.managed_fields.is_none());
    let annotations = first.metadata.annotations.clone().unwrap_or_default();
    assert!(!annotations.contains_key("kubectl.kubernetes.io/last-applied-configuration"));
    assert_eq!(
        annotations
            .get("service.cilium.io/global")
            .map(String::as_str),
        Some("true")
    );
    let nodes = replace_objects(nth(&running, ObjectKind::Node, 0));
    let K8sObject::Node(node) = &nodes[0] else {
        panic!("expected a Node");
    };
    let status = node.status.clone().unwrap_or_default();
    assert_eq!(status.addresses.map(|a| a.len()), Some(3));
    assert!(status.images.is_none() && status.conditions.is_none());
    let pods = replace_objects(nth(&running, ObjectKind::Pod, 0));
    let K8sObject::Pod(pod) = &pods[0] else {
        panic!("expected a Pod");
    };
    // Containers keep only their named ports (for the endpoint's named ports).
    let containers = &pod.spec.as_ref().unwrap().containers;
    assert_eq!(containers.len(), 1);
    assert!(containers[0].image.is_none() && containers[0].resources.is_none());
    let ports = containers[0].ports.clone().unwrap_or_default();
    assert_eq!(
        (ports[0].name.as_deref(), ports[0].container_port),
        (Some("http"), 8080)
    );
    assert!(pod.metadata.uid.is_some());

    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_events_translate_to_the_expected_records() {
    let api = ApiServer::default()
        .script(
            SERVICES,
            vec![
                list("services-list.json"),
                watch("services-watch.jsonl"),
                list("services-relist.json"),
            ],
        )
        .script(ENDPOINT_SLICES, vec![list("endpointslices-list.json")])
        .script(NODES, vec![list("nodes-list.json")])
        .script(PODS, vec![list("pods-list.json")]);
    let mut running = Running::start(KubernetesSource::new(api.client()));
    running.until(ObjectKind::Service, 5).await;
    running.until(ObjectKind::EndpointSlice, 1).await;
    running.until(ObjectKind::Node, 1).await;
    running.until(ObjectKind::Pod, 1).await;

    let mut objects = ClusterObjects::new("east");
    for event in running.received.drain(..) {
        objects.apply(event);
    }
    let mut warnings = Vec::new();
    let changes = objects.take_changes(&mut warnings);
    let service = |name: &str| {
        changes.iter().find_map(|c| match c {
            RecordChange::Service {
                name: n, record, ..
            } if n == name => Some(record.clone()),
            _ => None,
        })
    };
    let frontend = service("frontend").flatten().expect("frontend exported");
    assert!(frontend.global);
    assert_eq!(frontend.affinity, v1::Affinity::Local as i32);
    let mut backends: Vec<(String, bool, bool)> = frontend
        .backends
        .iter()
        .map(|b| (b.ip.clone(), b.ready, b.terminating))
        .collect();
    backends.sort();
    assert_eq!(
        backends,
        [
            ("10.244.1.5".to_owned(), true, false),
            ("10.244.2.7".to_owned(), false, true)
        ]
    );
    // The deleted service is not exported.
    assert!(service("legacy").flatten().is_none());
    assert!(changes.iter().any(|c| matches!(
        c,
        RecordChange::Node { name, record: Some(_) } if name == "node-a"
    )));
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn forbidden_list_logs_the_missing_rbac_rule_and_recovers() {
    let logs = Logs::global();
    let api = ApiServer::default()
        .script(
            ENDPOINT_SLICES,
            vec![
                Reply {
                    call: Call::List,
                    status: 403,
                    fixture: "endpointslices-forbidden.json",
                },
                list("endpointslices-list.json"),
            ],
        )
        .script(NODES, vec![list("nodes-list.json")]);
    let mut running = Running::start(KubernetesSource::new(api.client()));

    // Other kinds are not held up by the forbidden one.
    assert_eq!(
        running.until(ObjectKind::Node, 1).await,
        ["Replace [node-a]"]
    );
    // Once the rule exists (the next list succeeds), the kind syncs without a restart.
    assert_eq!(
        running.until(ObjectKind::EndpointSlice, 1).await,
        ["Replace [shop/frontend-x7k2p]"]
    );
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("forbidden listing endpointslices"))
        .unwrap_or_else(|| panic!("no RBAC message in the logs:\n{text}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("kind=EndpointSlice"), "{line}");
    assert!(
        line.contains("grant get/list/watch on discovery.k8s.io/endpointslices"),
        "{line}"
    );
    assert!(
        line.contains("system:serviceaccount:kube-system:clustermesh-apiserver"),
        "{line}"
    );
    assert_eq!(
        api.seen(ENDPOINT_SLICES)[..2]
            .iter()
            .filter(|s| s.call == Call::List)
            .count(),
        2
    );
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failing_lists_are_retried_with_growing_delays() {
    let mut replies: Vec<Reply> = (0..6)
        .map(|_| Reply {
            call: Call::List,
            status: 403,
            fixture: "endpointslices-forbidden.json",
        })
        .collect();
    replies.push(list("endpointslices-list.json"));
    let api = ApiServer::default().script(ENDPOINT_SLICES, replies);
    let mut running = Running::start(KubernetesSource::new(api.client()));
    assert_eq!(
        running.until(ObjectKind::EndpointSlice, 1).await,
        ["Replace [shop/frontend-x7k2p]"]
    );
    let times: Vec<tokio::time::Instant> = api
        .seen(ENDPOINT_SLICES)
        .into_iter()
        .filter(|s| s.call == Call::List)
        .map(|s| s.at)
        .collect();
    assert_eq!(times.len(), 7);
    // kube's DefaultBackoff: 0.8 s doubling per attempt, plus up to 100 % jitter.
    for (attempt, pair) in times.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let base = Duration::from_millis(800) * 2u32.pow(u32::try_from(attempt).unwrap());
        assert!(
            gap >= base && gap <= base * 2,
            "retry {attempt} came after {gap:?}, expected {base:?}..={:?}",
            base * 2
        );
    }
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn malformed_api_responses_are_logged_counted_and_skipped() {
    let logs = Logs::global();
    let metrics = Arc::new(Metrics::new());
    let api = ApiServer::default().script(
        PODS,
        vec![
            list("pods-list-malformed.json"),
            list("pods-list.json"),
            watch("pods-watch-malformed.jsonl"),
        ],
    );
    let mut running =
        Running::start(KubernetesSource::new(api.client()).with_metrics(Arc::clone(&metrics)));

    assert_eq!(
        running.until(ObjectKind::Pod, 2).await,
        ["Replace [shop/web-1]", "Apply shop/web-2"]
    );
    let text = logs.text();
    assert!(
        text.contains("malformed response listing pods"),
        "no list decode message:\n{text}"
    );
    assert_eq!(
        text.matches("malformed response watching pods").count(),
        2,
        "one message per bad watch line:\n{text}"
    );
    let encoded = metrics.encode();
    assert!(
        encoded
            .lines()
            .any(|l| l.contains("reason=\"kubernetes_response\"") && l.ends_with(" 3")),
        "three rejected responses expected:\n{encoded}"
    );
    // After the bad lines the watch resumed from the last good event.
    let last = api.seen(PODS).last().cloned().unwrap();
    assert_eq!(last.call, Call::Watch);
    assert_eq!(last.resource_version.as_deref(), Some("501"));
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_a_source_whose_requests_never_return() {
    let api = ApiServer::default();
    let mut running = Running::start(KubernetesSource::new(api.client()));
    assert!(running.until(ObjectKind::Service, 1).await.is_empty());
    // Every kind asked for its list.
    for path in [
        SERVICES,
        ENDPOINT_SLICES,
        NODES,
        PODS,
        NAMESPACES,
        NETWORK_POLICIES,
        CILIUM_NETWORK_POLICIES,
    ] {
        assert_eq!(api.seen(path).len(), 1, "{path}");
    }
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn dropping_the_receiver_ends_the_source() {
    let api = ApiServer::default().script(NODES, vec![list("nodes-list.json")]);
    let (tx, rx) = mpsc::channel(1);
    let task = tokio::spawn(
        Box::new(KubernetesSource::new(api.client())).run(tx, CancellationToken::new()),
    );
    drop(rx);
    let result = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("source did not stop when its receiver went away")
        .expect("source task panicked");
    assert!(result.is_ok(), "{result:?}");
}
