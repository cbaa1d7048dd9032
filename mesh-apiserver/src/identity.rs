//! Numeric identity allocation by compare-and-swap in the store.
//!
//! Every distinct identity label set (see [`crate::translate::identity_labels`]) gets a
//! numeric identity with the cluster ID in the high bits
//! ([`SecurityIdentity::compose`](clustermesh_api::security_identity::SecurityIdentity::compose)). The store is the source of truth:
//! at start the allocator lists `mesh/v1/identities/<cluster>/`, so a label set keeps its
//! number across restarts; a new number is claimed by creating its key with a
//! compare-and-swap that requires the key to be absent, so two writers can never give one
//! number to two label sets. Identities no endpoint uses any more are deleted after a grace
//! period (again by compare-and-swap on the key's `mod_revision`, so an identity another
//! writer just re-used is not deleted).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use clustermesh_api::cluster::ClusterIdMode;
use clustermesh_api::keys::{identity_key, parse_key, Kind, MeshKey};
use clustermesh_api::records::Record;
use clustermesh_api::security_identity::{
    SecurityIdentity, SecurityIdentityError, MIN_LOCAL_IDENTITY,
};
use clustermesh_api::v1;
use clustermesh_store::{CasOutcome, CasWrite, Revision, Store, StoreError};
use prost::Message;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::timed;
use crate::translate::Labels;

/// Allocation failures.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// The store failed.
    #[error("identity allocation: store operation failed: {0}")]
    Store(#[from] StoreError),
    /// Every local identity value of the cluster is taken.
    #[error("identity space of cluster {cluster} is exhausted ({count} identities allocated); remove unused workloads or wait for garbage collection")]
    Exhausted {
        /// Cluster name.
        cluster: String,
        /// Identities held.
        count: usize,
    },
    /// Composing an identity failed (bad cluster ID).
    #[error(transparent)]
    Identity(#[from] SecurityIdentityError),
}

#[derive(Debug, Clone)]
struct Held {
    id: u32,
    mod_revision: Revision,
    refs: usize,
    /// When `refs` last dropped to zero (or when the identity was loaded unused).
    unused_since: Option<Instant>,
}

/// The allocator. One per API server; not shared between tasks.
pub struct IdentityAllocator {
    store: Arc<dyn Store>,
    cluster: String,
    cluster_id: u32,
    mode: ClusterIdMode,
    by_labels: HashMap<Labels, Held>,
    /// Local values known to be in use in the store (ours or another writer's).
    taken: BTreeSet<u32>,
    /// Keys found at load that no label set uses canonically (a second number for one
    /// label set, or another cluster ID's identity): deleted by the next collection.
    leftovers: Vec<(Vec<u8>, Revision, u32)>,
    next_local: u32,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for IdentityAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityAllocator")
            .field("cluster", &self.cluster)
            .field("cluster_id", &self.cluster_id)
            .field("identities", &self.by_labels.len())
            .finish_non_exhaustive()
    }
}

impl IdentityAllocator {
    /// Loads the cluster's identities from the store.
    ///
    /// # Errors
    /// [`AllocError::Store`] when the list fails.
    pub async fn load(
        store: Arc<dyn Store>,
        cluster: &str,
        cluster_id: u32,
        mode: ClusterIdMode,
        metrics: Arc<Metrics>,
    ) -> Result<Self, AllocError> {
        let mut this = IdentityAllocator {
            store,
            cluster: cluster.to_owned(),
            cluster_id,
            mode,
            by_labels: HashMap::new(),
            taken: BTreeSet::new(),
            leftovers: Vec::new(),
            next_local: MIN_LOCAL_IDENTITY,
            metrics,
        };
        let prefix = Kind::Identity.cluster_prefix(cluster);
        let list = timed(&this.metrics, "list", this.store.list(prefix.as_bytes())).await?;
        let now = Instant::now();
        for kv in list.kvs {
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            let Ok(MeshKey::Identity { id, .. }) = parse_key(&kv.key) else {
                tracing::warn!(%key, "ignoring malformed identity key");
                continue;
            };
            let labels: Labels = match Record::decode(Kind::Identity, &key, &kv.value) {
                Ok(Record::Identity(identity)) if identity.id == id => {
                    identity.labels.into_iter().collect()
                }
                Ok(_) => {
                    tracing::warn!(%key, "identity record does not match its key; ignoring it");
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "ignoring undecodable identity");
                    continue;
                }
            };
            let (owner, local) = SecurityIdentity::new(id).split(mode);
            this.taken.insert(local);
            if owner != cluster_id {
                tracing::warn!(%key, id, cluster_id, "identity carries another cluster ID (was the cluster ID changed?); it will be garbage-collected");
                this.leftovers.push((kv.key, kv.mod_revision, local));
                continue;
            }
            let held = Held {
                id,
                mod_revision: kv.mod_revision,
                refs: 0,
                unused_since: Some(now),
            };
            // Two numbers for one label set (left by a crash between writers): keep the
            // lower one; the other is collected.
            match this.by_labels.get(&labels) {
                Some(existing) if existing.id < id => {
                    this.leftovers.push((kv.key, kv.mod_revision, local));
                }
                Some(existing) => {
                    let (_, old_local) = SecurityIdentity::new(existing.id).split(mode);
                    this.leftovers.push((
                        identity_key(cluster, existing.id).into_bytes(),
                        existing.mod_revision,
                        old_local,
                    ));
                    this.by_labels.insert(labels, held);
                }
                None => {
                    this.by_labels.insert(labels, held);
                }
            }
        }
        this.metrics.set_identities(this.by_labels.len());
        tracing::info!(
            cluster,
            identities = this.by_labels.len(),
            leftovers = this.leftovers.len(),
            "identities loaded"
        );
        Ok(this)
    }

    /// The identity for `labels`, allocating one if needed, and counts one more user.
    ///
    /// # Errors
    /// [`AllocError`] when the store fails or the identity space is exhausted.
    pub async fn acquire(&mut self, labels: &Labels) -> Result<u32, AllocError> {
        if let Some(held) = self.by_labels.get_mut(labels) {
            held.refs += 1;
            held.unused_since = None;
            return Ok(held.id);
        }
        let identity = v1::Identity {
            id: 0,
            labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        let max = self.mode.max_local_identity();
        let span = max - MIN_LOCAL_IDENTITY + 1;
        let mut tried = 0;
        while tried < span {
            let local = self.next_local;
            self.next_local = if local >= max {
                MIN_LOCAL_IDENTITY
            } else {
                local + 1
            };
            tried += 1;
            if self.taken.contains(&local) {
                continue;
            }
            let id = SecurityIdentity::compose(self.cluster_id, local, self.mode)?.get();
            let key = identity_key(&self.cluster, id);
            let value = v1::Identity {
                id,
                ..identity.clone()
            }
            .encode_to_vec();
            let write = CasWrite::Put { value, lease: None };
            match timed(
                &self.metrics,
                "cas",
                self.store.compare_and_swap(key.as_bytes(), 0, write),
            )
            .await?
            {
                CasOutcome::Succeeded { revision } => {
                    tracing::info!(id, %key, "identity allocated");
                    self.taken.insert(local);
                    self.by_labels.insert(
                        labels.clone(),
                        Held {
                            id,
                            mod_revision: revision,
                            refs: 1,
                            unused_since: None,
                        },
                    );
                    self.metrics.set_identities(self.by_labels.len());
                    return Ok(id);
                }
                CasOutcome::Failed { current } => {
                    // Another writer holds this number. If it holds it for our label set,
                    // share it; otherwise try the next number.
                    let theirs = current.and_then(|kv| {
                        match Record::decode(Kind::Identity, &key, &kv.value) {
                            Ok(Record::Identity(i)) => {
                                Some((i.labels.into_iter().collect::<Labels>(), kv.mod_revision))
                            }
                            _ => None,
                        }
                    });
                    self.taken.insert(local);
                    if let Some((theirs, mod_revision)) = theirs {
                        if &theirs == labels {
                            self.by_labels.insert(
                                theirs,
                                Held {
                                    id,
                                    mod_revision,
                                    refs: 1,
                                    unused_since: None,
                                },
                            );
                            return Ok(id);
                        }
                    }
                }
            }
        }
        Err(AllocError::Exhausted {
            cluster: self.cluster.clone(),
            count: self.taken.len(),
        })
    }

    /// One user of `labels` is gone.
    pub fn release(&mut self, labels: &Labels) {
        if let Some(held) = self.by_labels.get_mut(labels) {
            held.refs = held.refs.saturating_sub(1);
            if held.refs == 0 {
                held.unused_since = Some(Instant::now());
            }
        }
    }

    /// Deletes identities unused for at least `grace`, plus the leftovers found at load
    /// (duplicates, other cluster IDs). Only call once the pods are synced (before that,
    /// reference counts are incomplete). Returns how many were deleted.
    ///
    /// # Errors
    /// [`AllocError::Store`] when the store fails.
    pub async fn collect_garbage(&mut self, grace: Duration) -> Result<usize, AllocError> {
        let now = Instant::now();
        let mut victims: Vec<(Vec<u8>, Revision, u32, Option<Labels>)> = self
            .by_labels
            .iter()
            .filter(|(_, h)| {
                h.refs == 0
                    && h.unused_since
                        .is_some_and(|t| now.duration_since(t) >= grace)
            })
            .map(|(labels, h)| {
                let local = SecurityIdentity::new(h.id).split(self.mode).1;
                (
                    identity_key(&self.cluster, h.id).into_bytes(),
                    h.mod_revision,
                    local,
                    Some(labels.clone()),
                )
            })
            .collect();
        victims.extend(
            std::mem::take(&mut self.leftovers)
                .into_iter()
                .map(|(k, r, l)| (k, r, l, None)),
        );
        let mut deleted = 0;
        for (key, mod_revision, local, labels) in victims {
            let shown = String::from_utf8_lossy(&key).into_owned();
            match timed(
                &self.metrics,
                "cas",
                self.store
                    .compare_and_swap(&key, mod_revision, CasWrite::Delete),
            )
            .await?
            {
                CasOutcome::Succeeded { .. } => {
                    tracing::info!(key = %shown, "unused identity garbage-collected");
                    if let Some(labels) = &labels {
                        self.by_labels.remove(labels);
                    }
                    if !self
                        .by_labels
                        .values()
                        .any(|h| SecurityIdentity::new(h.id).split(self.mode).1 == local)
                    {
                        self.taken.remove(&local);
                    }
                    deleted += 1;
                }
                CasOutcome::Failed { current } => {
                    tracing::debug!(key = %shown, "identity changed under us; not collected");
                    if let (Some(kv), Some(h)) =
                        (current, labels.and_then(|l| self.by_labels.get_mut(&l)))
                    {
                        h.mod_revision = kv.mod_revision;
                    }
                }
            }
        }
        self.metrics.set_identities(self.by_labels.len());
        Ok(deleted)
    }

    /// Identities currently held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_labels.len()
    }

    /// True when no identity is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_labels.is_empty()
    }

    /// The identity currently held for `labels`, if any.
    #[must_use]
    pub fn get(&self, labels: &Labels) -> Option<u32> {
        self.by_labels.get(labels).map(|h| h.id)
    }
}
