//! The `kubernetes` source: kube-rs watchers on the cluster's own API.
//!
//! One [`kube::runtime::watcher`] per kind (Services, `discovery.k8s.io/v1`
//! EndpointSlices, Nodes, Pods, Namespaces, `networking.k8s.io/v1` NetworkPolicies and
//! `cilium.io/v2` CiliumNetworkPolicies, all namespaces), each with kube's default backoff policy
//! ([`DefaultBackoff`]: 0.8 s doubling to 30 s, jittered). A watcher lists, then watches from the list's resourceVersion; it re-lists when the
//! watch falls out of the API server's history (410 Gone) or after a failed list. Every
//! completed (re-)list becomes one [`SourceEvent::Replace`] for the kind, so objects
//! deleted while we were not watching disappear, and the first one marks the kind synced;
//! watch events become [`SourceEvent::Apply`] / [`SourceEvent::Delete`].
//!
//! Memory: the exporter keeps the objects, so the source keeps none, except the pages of a
//! list in progress until it is complete (a Replace needs the whole set). Fields nothing
//! downstream reads are dropped first (see `slim`).
//!
//! The backoff is applied here rather than with `WatchStreamExt::default_backoff`:
//! kube's `StreamBackoff` resets on every `Ok` item, and the watcher yields `Event::Init`
//! (an `Ok`) before every list attempt, so a list that keeps failing (a missing RBAC rule)
//! was retried at the minimum delay forever (about once a second per kind with
//! kube-runtime 5.0.0, seen against a fake API server). Here the backoff resets only on
//! progress: a completed list or a watch event. An expired watch (410) re-lists at once.
//!
//! Failures never end the source: each is logged with the kind and what would fix it (see
//! [`WatchProblem`]) and retried with backoff, so for example granting a missing RBAC rule
//! lets the kind sync without a restart. Until then `/readyz` stays not ready, because the
//! kind is not synced.
//!
//! One exception: CiliumNetworkPolicy is a custom resource that only clusters running
//! Cilium have. When the API does not serve it (404, the CRD is not installed), the kind
//! counts as synced with no objects (an empty `Replace`, logged once at INFO) instead of
//! holding up the policy sync; the list is retried with backoff, so installing the CRD
//! later is picked up without a restart.

mod client;
mod problem;
mod slim;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, watcher, DefaultBackoff, Event};
use kube::Api;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use client::{client, config_from_kubeconfig, KubeClientError, KubeConfigChoice};
pub use problem::{Resource, Verb, WatchProblem};
use slim::{CiliumNetworkPolicyObject, NetworkPolicyObject, Watched};

use super::{K8sObject, ObjectKind, Source, SourceError, SourceEvent};
use crate::metrics::Metrics;

/// Errors that end the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesSourceError {
    /// A watcher stream ended, which kube's watcher never does while it is polled.
    #[error("the {kind} watcher stopped unexpectedly; restart the API server")]
    WatcherEnded {
        /// The kind whose watcher stopped.
        kind: ObjectKind,
    },
}

/// The Kubernetes API source. See the module docs. A clone shares the client and starts
/// its own watchers when run.
#[derive(Clone)]
pub struct KubernetesSource {
    client: kube::Client,
    watcher_config: watcher::Config,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for KubernetesSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesSource")
            .field("default_namespace", &self.client.default_namespace())
            .field("watcher_config", &self.watcher_config)
            .finish_non_exhaustive()
    }
}

impl KubernetesSource {
    /// A source reading through `client` (any `kube::Client`, including one over a mock
    /// service).
    #[must_use]
    pub fn new(client: kube::Client) -> Self {
        KubernetesSource {
            client,
            watcher_config: watcher::Config::default(),
            metrics: None,
        }
    }

    /// A source for this process: the kubeconfig context `context` if given, else the
    /// in-cluster config in a pod, else the kubeconfig's current context (see
    /// [`KubeConfigChoice`]).
    ///
    /// # Errors
    /// [`KubeClientError`] when the configuration cannot be loaded.
    pub async fn connect(context: Option<&str>) -> Result<Self, KubeClientError> {
        let choice = KubeConfigChoice::from_environment(context);
        let config = choice.load().await?;
        tracing::info!(cluster_url = %config.cluster_url, ?choice, "Kubernetes source configured");
        Ok(Self::new(client(config)?))
    }

    /// Uses `config` for every watcher (page size, timeouts, list semantics).
    #[must_use]
    pub fn with_watcher_config(mut self, config: watcher::Config) -> Self {
        self.watcher_config = config;
        self
    }

    /// Counts malformed API responses as rejected inputs in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Lists and watches `K` until the receiver goes away.
    async fn watch_kind<K: Watched>(
        &self,
        events: mpsc::Sender<SourceEvent>,
    ) -> Result<(), KubernetesSourceError> {
        let kind = K::KIND;
        let api: Api<K> = Api::all(self.client.clone());
        let mut stream = watcher(api, self.watcher_config.clone()).boxed();
        let mut backoff = DefaultBackoff::default();
        let mut feed = KindFeed::new(kind, self.metrics.as_deref());
        loop {
            let item = tokio::select! {
                () = events.closed() => return Ok(()),
                item = stream.next() => item,
            };
            let Some(item) = item else {
                tracing::error!(%kind, "watcher stream ended");
                return Err(KubernetesSourceError::WatcherEnded { kind });
            };
            let step = feed.step(item);
            if step.progress {
                backoff.reset();
            }
            if let Some(event) = step.event {
                if events.send(event).await.is_err() {
                    return Ok(());
                }
            }
            if step.back_off {
                // DefaultBackoff never runs out; the fallback is its ceiling.
                let delay = backoff.next().unwrap_or(MAX_RETRY_DELAY);
                tracing::debug!(%kind, ?delay, "retrying after a delay");
                tokio::select! {
                    () = events.closed() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Longest delay between two attempts ([`DefaultBackoff`]'s ceiling).
const MAX_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(30);

/// What one watcher item leads to.
#[derive(Debug, Default)]
struct Step {
    /// Event to pass on.
    event: Option<SourceEvent>,
    /// A list completed or a watch event arrived: the backoff starts over.
    progress: bool,
    /// A request failed: wait before the watcher's next attempt.
    back_off: bool,
}

impl Step {
    fn emit(event: SourceEvent) -> Self {
        Step {
            event: Some(event),
            progress: true,
            back_off: false,
        }
    }
}

/// Turns one kind's watcher events into source events: buffers a list until it is
/// complete, passes watch events through, and explains errors.
#[derive(Debug)]
struct KindFeed<'a> {
    kind: ObjectKind,
    /// Objects of the list in progress (`None` outside a list).
    listing: Option<Vec<K8sObject>>,
    /// Whether a list has completed before (the next one is a re-list).
    listed_once: bool,
    /// Whether the kind's API was last found not served (an optional kind only).
    absent: bool,
    metrics: Option<&'a Metrics>,
}

impl<'a> KindFeed<'a> {
    fn new(kind: ObjectKind, metrics: Option<&'a Metrics>) -> Self {
        KindFeed {
            kind,
            listing: None,
            listed_once: false,
            absent: false,
            metrics,
        }
    }

    /// Whether the cluster may lack the kind's API altogether (a CRD that is not
    /// installed), which then means "no objects of this kind".
    fn optional(&self) -> bool {
        self.kind == ObjectKind::CiliumNetworkPolicy
    }

    fn step<K: Watched>(&mut self, item: Result<Event<K>, watcher::Error>) -> Step {
        let kind = self.kind;
        match item {
            Ok(Event::Init) => {
                tracing::debug!(%kind, relist = self.listed_once, "listing");
                self.listing = Some(Vec::new());
                Step::default()
            }
            Ok(Event::InitApply(object)) => {
                self.listing
                    .get_or_insert_with(Vec::new)
                    .push(slimmed(object));
                Step::default()
            }
            Ok(Event::InitDone) => {
                let objects = self.listing.take().unwrap_or_default();
                tracing::info!(%kind, objects = objects.len(), relist = self.listed_once, "listed; replacing this kind's objects");
                self.listed_once = true;
                self.absent = false;
                Step::emit(SourceEvent::Replace { kind, objects })
            }
            Ok(Event::Apply(object)) => {
                let object = slimmed(object);
                tracing::debug!(object = %object.object_ref(), "applied");
                Step::emit(SourceEvent::Apply(object))
            }
            Ok(Event::Delete(object)) => {
                let r = slimmed(object).object_ref();
                tracing::debug!(object = %r, "deleted");
                Step::emit(SourceEvent::Delete(r))
            }
            Err(error) => {
                let problem = WatchProblem::explain(kind, &error);
                if self.optional() && matches!(problem, WatchProblem::NotServed { .. }) {
                    return self.not_served(&problem);
                }
                if problem.is_routine() {
                    tracing::info!(%kind, %problem, "watch expired");
                } else {
                    tracing::warn!(%kind, %problem, "Kubernetes API request failed");
                }
                if problem.is_malformed_input() {
                    if let Some(metrics) = self.metrics {
                        metrics.rejected_input("kubernetes_response");
                    }
                }
                Step {
                    event: None,
                    progress: false,
                    back_off: !problem.is_routine(),
                }
            }
        }
    }
}

impl KindFeed<'_> {
    /// The optional kind's API is not served: no objects of the kind, synced. Reported
    /// once per absence; the list is retried with backoff to notice the CRD appearing.
    fn not_served(&mut self, problem: &WatchProblem) -> Step {
        let kind = self.kind;
        self.listing = None;
        if self.absent {
            tracing::debug!(%kind, %problem, "still not served");
            return Step {
                event: None,
                progress: false,
                back_off: true,
            };
        }
        self.absent = true;
        let resource = Resource::of(kind);
        tracing::info!(
            %kind,
            api_version = resource.api_version,
            "the Kubernetes API does not serve {} (the CRD is not installed); treating the cluster as having none and checking again with backoff",
            resource.plural
        );
        Step {
            event: Some(SourceEvent::Replace {
                kind,
                objects: Vec::new(),
            }),
            progress: false,
            back_off: true,
        }
    }
}

fn slimmed<K: Watched>(mut object: K) -> K8sObject {
    object.slim();
    object.into_object()
}

#[async_trait::async_trait]
impl Source for KubernetesSource {
    async fn run(
        self: Box<Self>,
        events: mpsc::Sender<SourceEvent>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let watches = async {
            tokio::try_join!(
                self.watch_kind::<Service>(events.clone()),
                self.watch_kind::<EndpointSlice>(events.clone()),
                self.watch_kind::<Node>(events.clone()),
                self.watch_kind::<Pod>(events.clone()),
                self.watch_kind::<Namespace>(events.clone()),
                self.watch_kind::<NetworkPolicyObject>(events.clone()),
                self.watch_kind::<CiliumNetworkPolicyObject>(events),
            )
        };
        tokio::select! {
            () = shutdown.cancelled() => Ok(()),
            result = watches => result.map(|_| ()).map_err(SourceError::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::source::ObjectRef;

    fn pod(name: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("ns".to_owned()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    fn names(step: Step) -> Vec<String> {
        assert!(step.progress && !step.back_off);
        match step.event {
            Some(SourceEvent::Replace { objects, .. }) => {
                objects.iter().map(|o| o.object_ref().name).collect()
            }
            other => panic!("expected Replace, got {other:?}"),
        }
    }

    #[test]
    fn a_relist_restarts_the_buffer() {
        let mut feed = KindFeed::new(ObjectKind::Pod, None);
        let quiet = |step: Step| step.event.is_none() && !step.progress && !step.back_off;
        assert!(quiet(feed.step::<Pod>(Ok(Event::Init))));
        assert!(quiet(feed.step(Ok(Event::InitApply(pod("a"))))));
        // The list failed half-way; kube starts over with Init.
        let failed = feed.step::<Pod>(Err(watcher::Error::NoResourceVersion));
        assert!(failed.event.is_none() && failed.back_off && !failed.progress);
        assert!(quiet(feed.step::<Pod>(Ok(Event::Init))));
        assert!(quiet(feed.step(Ok(Event::InitApply(pod("b"))))));
        assert_eq!(names(feed.step::<Pod>(Ok(Event::InitDone))), ["b"]);
    }

    #[test]
    fn an_empty_list_is_an_empty_replace() {
        let mut feed = KindFeed::new(ObjectKind::Node, None);
        feed.step::<Node>(Ok(Event::Init));
        assert!(names(feed.step::<Node>(Ok(Event::InitDone))).is_empty());
    }

    #[test]
    fn watch_events_pass_through_with_their_ref() {
        let mut feed = KindFeed::new(ObjectKind::Pod, None);
        let Some(SourceEvent::Apply(K8sObject::Pod(applied))) =
            feed.step(Ok(Event::Apply(pod("a")))).event
        else {
            panic!("expected Apply");
        };
        assert_eq!(applied.metadata.name.as_deref(), Some("a"));
        let Some(SourceEvent::Delete(r)) = feed.step(Ok(Event::Delete(pod("a")))).event else {
            panic!("expected Delete");
        };
        assert_eq!(
            r,
            ObjectRef {
                kind: ObjectKind::Pod,
                namespace: "ns".to_owned(),
                name: "a".to_owned()
            }
        );
    }

    #[test]
    fn an_expired_watch_relists_without_delay() {
        let mut feed = KindFeed::new(ObjectKind::Service, None);
        let gone = kube::core::Status {
            code: 410,
            ..kube::core::Status::default()
        };
        let step = feed.step::<Service>(Err(watcher::Error::WatchError(Box::new(gone))));
        assert!(step.event.is_none() && !step.back_off);
    }

    fn not_found() -> watcher::Error {
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(kube::core::Status {
            code: 404,
            reason: "NotFound".to_owned(),
            ..kube::core::Status::default()
        })))
    }

    #[test]
    fn a_missing_cilium_crd_is_an_empty_synced_kind_once() {
        let mut feed = KindFeed::new(ObjectKind::CiliumNetworkPolicy, None);
        feed.step::<CiliumNetworkPolicyObject>(Ok(Event::Init));
        let first = feed.step::<CiliumNetworkPolicyObject>(Err(not_found()));
        assert!(first.back_off);
        assert!(matches!(
            first.event,
            Some(SourceEvent::Replace { kind: ObjectKind::CiliumNetworkPolicy, ref objects }) if objects.is_empty()
        ));
        // Still missing: nothing new to say.
        let again = feed.step::<CiliumNetworkPolicyObject>(Err(not_found()));
        assert!(again.event.is_none() && again.back_off);
        // Installed: the list replaces the empty set; a later removal reports again.
        feed.step::<CiliumNetworkPolicyObject>(Ok(Event::Init));
        assert!(names(feed.step::<CiliumNetworkPolicyObject>(Ok(Event::InitDone))).is_empty());
        assert!(feed
            .step::<CiliumNetworkPolicyObject>(Err(not_found()))
            .event
            .is_some());
    }

    #[test]
    fn a_missing_api_of_a_required_kind_is_not_synced() {
        let mut feed = KindFeed::new(ObjectKind::NetworkPolicy, None);
        let step = feed.step::<NetworkPolicyObject>(Err(not_found()));
        assert!(step.event.is_none() && step.back_off);
    }

    #[test]
    fn malformed_responses_are_counted() {
        let metrics = Metrics::new();
        let mut feed = KindFeed::new(ObjectKind::Pod, Some(&metrics));
        feed.step::<Pod>(Err(watcher::Error::NoResourceVersion));
        let text = metrics.encode();
        assert!(
            text.lines()
                .any(|l| l.contains("kubernetes_response") && l.ends_with(" 1")),
            "{text}"
        );
    }
}
