//! The `kubernetes` source: kube-rs watchers on the cluster's own API.
//!
//! One [`kube::runtime::watcher`] per kind (Services, `discovery.k8s.io/v1`
//! EndpointSlices, Nodes, Pods, all namespaces), each with kube's default backoff. A
//! watcher lists, then watches from the list's resourceVersion; it re-lists when the
//! watch falls out of the API server's history (410 Gone) or after a failed list. Every
//! completed (re-)list becomes one [`SourceEvent::Replace`] for the kind, so objects
//! deleted while we were not watching disappear, and the first one marks the kind synced;
//! watch events become [`SourceEvent::Apply`] / [`SourceEvent::Delete`].
//!
//! Memory: the exporter keeps the objects, so the source keeps none, except the pages of a
//! list in progress until it is complete (a Replace needs the whole set). Fields nothing
//! downstream reads are dropped first (see `slim`).
//!
//! Failures never end the source: each is logged with the kind and what would fix it (see
//! [`WatchProblem`]) and retried with backoff, so for example granting a missing RBAC rule
//! lets the kind sync without a restart. Until then `/readyz` stays not ready, because the
//! kind is not synced.

mod client;
mod problem;
mod slim;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use client::{client, config_from_kubeconfig, KubeClientError, KubeConfigChoice};
pub use problem::{Resource, Verb, WatchProblem};
use slim::Watched;

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

/// The Kubernetes API source. See the module docs.
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
        let mut stream = watcher(api, self.watcher_config.clone())
            .default_backoff()
            .boxed();
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
            if let Some(event) = feed.step(item) {
                if events.send(event).await.is_err() {
                    return Ok(());
                }
            }
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
    metrics: Option<&'a Metrics>,
}

impl<'a> KindFeed<'a> {
    fn new(kind: ObjectKind, metrics: Option<&'a Metrics>) -> Self {
        KindFeed {
            kind,
            listing: None,
            listed_once: false,
            metrics,
        }
    }

    fn step<K: Watched>(&mut self, item: Result<Event<K>, watcher::Error>) -> Option<SourceEvent> {
        let kind = self.kind;
        match item {
            Ok(Event::Init) => {
                tracing::debug!(%kind, relist = self.listed_once, "listing");
                self.listing = Some(Vec::new());
                None
            }
            Ok(Event::InitApply(object)) => {
                self.listing
                    .get_or_insert_with(Vec::new)
                    .push(slimmed(object));
                None
            }
            Ok(Event::InitDone) => {
                let objects = self.listing.take().unwrap_or_default();
                tracing::info!(%kind, objects = objects.len(), relist = self.listed_once, "listed; replacing this kind's objects");
                self.listed_once = true;
                Some(SourceEvent::Replace { kind, objects })
            }
            Ok(Event::Apply(object)) => {
                let object = slimmed(object);
                tracing::debug!(object = %object.object_ref(), "applied");
                Some(SourceEvent::Apply(object))
            }
            Ok(Event::Delete(object)) => {
                let r = slimmed(object).object_ref();
                tracing::debug!(object = %r, "deleted");
                Some(SourceEvent::Delete(r))
            }
            Err(error) => {
                let problem = WatchProblem::explain(kind, &error);
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
                None
            }
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
        let watches = futures::future::try_join4(
            self.watch_kind::<Service>(events.clone()),
            self.watch_kind::<EndpointSlice>(events.clone()),
            self.watch_kind::<Node>(events.clone()),
            self.watch_kind::<Pod>(events),
        );
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

    fn names(event: Option<SourceEvent>) -> Vec<String> {
        match event {
            Some(SourceEvent::Replace { objects, .. }) => {
                objects.iter().map(|o| o.object_ref().name).collect()
            }
            other => panic!("expected Replace, got {other:?}"),
        }
    }

    #[test]
    fn a_relist_restarts_the_buffer() {
        let mut feed = KindFeed::new(ObjectKind::Pod, None);
        assert!(feed.step::<Pod>(Ok(Event::Init)).is_none());
        assert!(feed.step(Ok(Event::InitApply(pod("a")))).is_none());
        // The list failed half-way; kube starts over with Init.
        assert!(feed
            .step::<Pod>(Err(watcher::Error::NoResourceVersion))
            .is_none());
        assert!(feed.step::<Pod>(Ok(Event::Init)).is_none());
        assert!(feed.step(Ok(Event::InitApply(pod("b")))).is_none());
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
            feed.step(Ok(Event::Apply(pod("a"))))
        else {
            panic!("expected Apply");
        };
        assert_eq!(applied.metadata.name.as_deref(), Some("a"));
        let Some(SourceEvent::Delete(r)) = feed.step(Ok(Event::Delete(pod("a")))) else {
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
