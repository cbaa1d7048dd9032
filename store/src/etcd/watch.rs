//! etcd watches that survive broken streams.
//!
//! A gRPC watch stream can end at any time (etcd restart, leader change, network blip).
//! [`Resumer`] remembers the revision after the last event it handed out and, when the
//! stream breaks, opens a new etcd watch from exactly that revision, so the caller sees
//! one gap-free, duplicate-free stream. Only two things end it: etcd reporting that the
//! next revision was compacted ([`StoreError::Compacted`], the caller must re-list) and
//! etcd staying unreachable longer than [`EtcdConfig::watch_resume_deadline`]
//! ([`StoreError::Unavailable`]).
//!
//! Watches are created with `fragment` so a huge revision (say a `delete_prefix` of 100k
//! keys) arrives in several responses; events are released only once the last fragment of
//! a response is in, so the resume point never falls inside a revision.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use etcd_client::proto::PbWatchResponse;
use etcd_client::{WatchClient, WatchOptions};

use super::config::Backoff;
use super::convert::{condition, etcd_revision, key_value, prefix_range, revision, Condition};
use super::{EtcdConfig, EtcdStore};
use crate::{Event, EventKind, Result, Revision, StoreError, WatchStream};

/// How long [`open`] waits for etcd's compaction notice after a read showed the start
/// revision is compacted.
const COMPACTION_NOTICE_WAIT: Duration = Duration::from_secs(5);

/// etcd's `mvccpb.Event.EventType` values.
const ETCD_PUT: i32 = 0;
const ETCD_DELETE: i32 = 1;

/// Opens a resuming watch on `prefix` from `from_revision` (0 = from the next write).
///
/// Returns only once etcd has registered the watch, so every write made after this
/// returns is seen.
pub(super) async fn open(
    store: &EtcdStore,
    prefix: &[u8],
    from_revision: Revision,
) -> Result<WatchStream> {
    let (key, end) = prefix_range(prefix);
    let mut resumer = Resumer {
        client: store.watch.clone(),
        prefix: String::from_utf8_lossy(prefix).into_owned(),
        key,
        end,
        next: etcd_revision(from_revision),
        stream: None,
        ready: VecDeque::new(),
        fragments: Vec::new(),
        finished: false,
        config: store.config.clone(),
    };
    let (mut stream, created_at) = resumer
        .establish()
        .await
        .map_err(|e| super::convert::store_error("watch", e))?;
    if from_revision == 0 {
        resumer.next = created_at + 1;
    } else if start_is_compacted(store, &resumer).await? {
        return Err(wait_for_compaction_notice(&mut stream, from_revision).await);
    }
    resumer.stream = Some(stream);
    Ok(Box::pin(futures::stream::unfold(
        resumer,
        |mut resumer| async move { resumer.next_item().await.map(|item| (item, resumer)) },
    )))
}

/// Whether etcd no longer holds the history at the watch's start revision. etcd reports
/// this on the watch stream only asynchronously, so a read at that revision decides it
/// (reads and watches share the compaction point).
async fn start_is_compacted(store: &EtcdStore, resumer: &Resumer) -> Result<bool> {
    match store
        .range_page(resumer.key.clone(), resumer.end.clone(), resumer.next, 1)
        .await
    {
        Ok(_) => Ok(false),
        Err(err) => match condition(&err) {
            Condition::Compacted => Ok(true),
            Condition::FutureRevision => Ok(false),
            _ => Err(super::convert::store_error("watch", err)),
        },
    }
}

/// Reads the compaction point from the watch's cancel notice; falls back to "just after
/// the requested revision" if the notice does not come in time.
async fn wait_for_compaction_notice(
    stream: &mut etcd_client::WatchStream,
    requested: Revision,
) -> StoreError {
    let deadline = tokio::time::Instant::now() + COMPACTION_NOTICE_WAIT;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(resp))) if resp.0.compact_revision != 0 => {
                return StoreError::Compacted {
                    requested,
                    compacted: revision(resp.0.compact_revision),
                }
            }
            Ok(Ok(Some(_))) => {}
            _ => {
                return StoreError::Compacted {
                    requested,
                    compacted: requested + 1,
                }
            }
        }
    }
}

/// State of one caller-visible watch across any number of etcd watch streams.
struct Resumer {
    client: WatchClient,
    /// The watched prefix, for log lines.
    prefix: String,
    key: Vec<u8>,
    end: Vec<u8>,
    /// Revision of the first event not yet handed out: where a new etcd watch starts.
    next: i64,
    stream: Option<etcd_client::WatchStream>,
    /// Complete events waiting to be handed out.
    ready: VecDeque<Event>,
    /// Events of a fragmented response whose last fragment has not arrived yet.
    fragments: Vec<Event>,
    /// Set once a terminal error was handed out.
    finished: bool,
    config: EtcdConfig,
}

impl Resumer {
    /// Opens an etcd watch from `self.next` and waits for etcd to confirm it; returns the
    /// stream and the store revision at creation.
    async fn establish(
        &mut self,
    ) -> std::result::Result<(etcd_client::WatchStream, i64), etcd_client::Error> {
        let options = WatchOptions::new()
            .with_range(self.end.clone())
            .with_start_revision(self.next)
            .with_fragment()
            .with_progress_notify();
        let mut stream = self.client.watch(self.key.clone(), Some(options)).await?;
        match stream.message().await? {
            Some(resp) if resp.0.created && !resp.0.canceled => {
                let at = resp.0.header.as_ref().map_or(0, |h| h.revision);
                Ok((stream, at))
            }
            Some(resp) => Err(etcd_client::Error::WatchError(format!(
                "etcd did not create the watch: {}",
                resp.0.cancel_reason
            ))),
            None => Err(etcd_client::Error::WatchError(
                "etcd closed the watch stream before confirming it".to_owned(),
            )),
        }
    }

    /// The next event or terminal error; `None` after a terminal error.
    async fn next_item(&mut self) -> Option<Result<Event>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(Ok(event));
            }
            if self.finished {
                return None;
            }
            let stream = match self.stream.as_mut() {
                Some(stream) => stream,
                None => match self.resume().await {
                    Ok(stream) => self.stream.insert(stream),
                    Err(err) => {
                        self.finished = true;
                        return Some(Err(err));
                    }
                },
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    if let Err(err) = self.absorb(resp.0) {
                        self.finished = true;
                        self.stream = None;
                        return Some(Err(err));
                    }
                }
                Ok(None) => {
                    tracing::warn!(prefix = %self.prefix, next = self.next,
                        "etcd ended the watch stream; resuming");
                    self.drop_stream();
                }
                Err(err) => {
                    tracing::warn!(prefix = %self.prefix, next = self.next, error = %err,
                        "etcd watch stream broke; resuming");
                    self.drop_stream();
                }
            }
        }
    }

    fn drop_stream(&mut self) {
        self.stream = None;
        // A partial revision is re-sent in full by the new watch.
        self.fragments.clear();
    }

    /// Re-creates the etcd watch from `self.next`, retrying with backoff until
    /// [`EtcdConfig::watch_resume_deadline`].
    async fn resume(&mut self) -> Result<etcd_client::WatchStream> {
        let started = Instant::now();
        let mut backoff = Backoff::new(self.config.initial_backoff, self.config.max_backoff);
        loop {
            let err = match self.establish().await {
                Ok((stream, _)) => {
                    tracing::info!(prefix = %self.prefix, from = self.next, "etcd watch resumed");
                    return Ok(stream);
                }
                Err(err) => err,
            };
            let delay = backoff.next_delay();
            if started.elapsed() + delay > self.config.watch_resume_deadline {
                return Err(StoreError::Unavailable(format!(
                    "etcd watch on {:?} could not be resumed from revision {} within {:?}: {err}; \
                     re-list and watch again",
                    self.prefix, self.next, self.config.watch_resume_deadline
                )));
            }
            tracing::warn!(prefix = %self.prefix, from = self.next, error = %err,
                "etcd at {} not reachable for watch, retrying in {delay:?}",
                self.config.endpoints_display());
            tokio::time::sleep(delay).await;
        }
    }

    /// Takes in one etcd response: events (held back until the last fragment), progress
    /// notices, or a cancellation.
    fn absorb(&mut self, resp: PbWatchResponse) -> Result<()> {
        if resp.compact_revision != 0 {
            return Err(StoreError::Compacted {
                requested: revision(self.next),
                compacted: revision(resp.compact_revision),
            });
        }
        if resp.canceled {
            return Err(StoreError::Backend(format!(
                "etcd cancelled the watch on {:?}: {}; watch again",
                self.prefix, resp.cancel_reason
            )));
        }
        let progress_only = resp.events.is_empty() && !resp.fragment && self.fragments.is_empty();
        for event in resp.events {
            let kind = match event.r#type {
                ETCD_PUT => EventKind::Put,
                ETCD_DELETE => EventKind::Delete,
                other => {
                    return Err(StoreError::Backend(format!(
                        "etcd sent a watch event of unknown type {other}"
                    )))
                }
            };
            let Some(kv) = event.kv else {
                return Err(StoreError::Backend(
                    "etcd sent a watch event without a key".to_owned(),
                ));
            };
            let mut kv = key_value(kv);
            if kind == EventKind::Delete {
                kv.value.clear();
                kv.lease = None;
            }
            if etcd_revision(kv.mod_revision) >= self.next {
                self.fragments.push(Event { kind, kv });
            }
        }
        if resp.fragment {
            return Ok(());
        }
        if let Some(last) = self.fragments.last() {
            self.next = etcd_revision(last.revision()) + 1;
            self.ready.extend(self.fragments.drain(..));
        } else if progress_only && !resp.created {
            // A progress notice: every later event has a higher revision than the header.
            if let Some(header) = resp.header {
                self.next = self.next.max(header.revision + 1);
            }
        }
        Ok(())
    }
}
