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

use super::config::retry_delays;
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
        key,
        end,
        tracker: Tracker::new(prefix, etcd_revision(from_revision)),
        stream: None,
        finished: false,
        config: store.config.clone(),
    };
    let (mut stream, created_at) = resumer
        .establish()
        .await
        .map_err(|e| super::convert::store_error("watch", e))?;
    if from_revision == 0 {
        resumer.tracker.next = created_at + 1;
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
        .range_page(
            resumer.key.clone(),
            resumer.end.clone(),
            resumer.tracker.next,
            1,
        )
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
    key: Vec<u8>,
    end: Vec<u8>,
    tracker: Tracker,
    stream: Option<etcd_client::WatchStream>,
    /// Set once a terminal error was handed out.
    finished: bool,
    config: EtcdConfig,
}

/// Turns etcd watch responses into store events and tracks the resume point; no I/O,
/// so its bookkeeping is tested on its own.
#[derive(Debug)]
struct Tracker {
    /// The watched prefix, for log lines and errors.
    prefix: String,
    /// Revision of the first event not yet handed out: where a new etcd watch starts.
    next: i64,
    /// Complete events waiting to be handed out.
    ready: VecDeque<Event>,
    /// Events of a fragmented response whose last fragment has not arrived yet.
    fragments: Vec<Event>,
}

impl Resumer {
    /// Opens an etcd watch from the resume revision and waits for etcd to confirm it; returns the
    /// stream and the store revision at creation.
    async fn establish(
        &mut self,
    ) -> std::result::Result<(etcd_client::WatchStream, i64), etcd_client::Error> {
        let options = WatchOptions::new()
            .with_range(self.end.clone())
            .with_start_revision(self.tracker.next)
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
            if let Some(event) = self.tracker.ready.pop_front() {
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
                    if let Err(err) = self.tracker.absorb(resp.0) {
                        self.finished = true;
                        self.stream = None;
                        return Some(Err(err));
                    }
                }
                Ok(None) => {
                    tracing::warn!(prefix = %self.tracker.prefix, next = self.tracker.next,
                        "etcd ended the watch stream; resuming");
                    self.drop_stream();
                }
                Err(err) => {
                    tracing::warn!(prefix = %self.tracker.prefix, next = self.tracker.next,
                        error = %err, "etcd watch stream broke; resuming");
                    self.drop_stream();
                }
            }
        }
    }

    fn drop_stream(&mut self) {
        self.stream = None;
        // A partial revision is re-sent in full by the new watch.
        self.tracker.fragments.clear();
    }

    /// Re-creates the etcd watch from the resume revision, retrying with backoff until
    /// [`EtcdConfig::watch_resume_deadline`].
    async fn resume(&mut self) -> Result<etcd_client::WatchStream> {
        let started = Instant::now();
        let mut delays = retry_delays(self.config.initial_backoff, self.config.max_backoff);
        loop {
            let err = match self.establish().await {
                Ok((stream, _)) => {
                    tracing::info!(prefix = %self.tracker.prefix, from = self.tracker.next,
                        "etcd watch resumed");
                    return Ok(stream);
                }
                Err(err) => err,
            };
            let delay = delays.next().unwrap_or(self.config.max_backoff);
            if started.elapsed() + delay > self.config.watch_resume_deadline {
                return Err(StoreError::Unavailable(format!(
                    "etcd watch on {:?} could not be resumed from revision {} within {:?}: {err}; \
                     re-list and watch again",
                    self.tracker.prefix, self.tracker.next, self.config.watch_resume_deadline
                )));
            }
            tracing::warn!(prefix = %self.tracker.prefix, from = self.tracker.next, error = %err,
                "etcd at {} not reachable for watch, retrying in {delay:?}",
                self.config.endpoints_display());
            tokio::time::sleep(delay).await;
        }
    }
}

impl Tracker {
    fn new(prefix: &[u8], next: i64) -> Self {
        Self {
            prefix: String::from_utf8_lossy(prefix).into_owned(),
            next,
            ready: VecDeque::new(),
            fragments: Vec::new(),
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

#[cfg(test)]
mod tests {
    use etcd_client::proto::{PbEvent, PbKeyValue, PbResponseHeader};
    use proptest::prelude::*;

    use super::*;

    fn event(kind: i32, key: &str, rev: i64) -> PbEvent {
        PbEvent {
            r#type: kind,
            kv: Some(PbKeyValue {
                key: key.as_bytes().to_vec(),
                value: if kind == ETCD_PUT {
                    b"v".to_vec()
                } else {
                    Vec::new()
                },
                create_revision: rev,
                mod_revision: rev,
                version: 1,
                lease: 0,
            }),
            prev_kv: None,
        }
    }

    fn response(events: Vec<PbEvent>, fragment: bool) -> PbWatchResponse {
        PbWatchResponse {
            events,
            fragment,
            ..PbWatchResponse::default()
        }
    }

    fn drain(tracker: &mut Tracker) -> Vec<(EventKind, Revision)> {
        tracker
            .ready
            .drain(..)
            .map(|e| (e.kind, e.revision()))
            .collect()
    }

    #[test]
    fn fragments_are_held_back_until_the_last_one() {
        let mut tracker = Tracker::new(b"p/", 5);
        tracker
            .absorb(response(vec![event(ETCD_DELETE, "p/a", 5)], true))
            .unwrap();
        assert!(tracker.ready.is_empty());
        assert_eq!(tracker.next, 5, "resume point stays inside the revision");
        tracker
            .absorb(response(vec![event(ETCD_DELETE, "p/b", 5)], false))
            .unwrap();
        assert_eq!(
            drain(&mut tracker),
            vec![(EventKind::Delete, 5), (EventKind::Delete, 5)]
        );
        assert_eq!(tracker.next, 6);
    }

    #[test]
    fn replayed_events_below_the_resume_point_are_dropped() {
        let mut tracker = Tracker::new(b"p/", 7);
        tracker
            .absorb(response(
                vec![event(ETCD_PUT, "p/a", 6), event(ETCD_PUT, "p/a", 7)],
                false,
            ))
            .unwrap();
        assert_eq!(drain(&mut tracker), vec![(EventKind::Put, 7)]);
    }

    #[test]
    fn progress_notice_advances_the_resume_point() {
        let mut tracker = Tracker::new(b"p/", 3);
        let mut notice = response(Vec::new(), false);
        notice.header = Some(PbResponseHeader {
            revision: 40,
            ..PbResponseHeader::default()
        });
        tracker.absorb(notice).unwrap();
        assert_eq!(tracker.next, 41);
    }

    #[test]
    fn compaction_and_unknown_events_are_errors() {
        let mut tracker = Tracker::new(b"p/", 3);
        let mut compacted = response(Vec::new(), false);
        compacted.compact_revision = 10;
        compacted.canceled = true;
        match tracker.absorb(compacted) {
            Err(StoreError::Compacted {
                requested,
                compacted,
            }) => assert_eq!((requested, compacted), (3, 10)),
            other => panic!("expected Compacted, got {other:?}"),
        }
        let err = tracker
            .absorb(response(vec![event(9, "p/a", 4)], false))
            .unwrap_err();
        assert!(err.to_string().contains("unknown type 9"), "{err}");
        let no_kv = PbEvent {
            r#type: ETCD_PUT,
            kv: None,
            prev_kv: None,
        };
        assert!(tracker.absorb(response(vec![no_kv], false)).is_err());
    }

    proptest! {
        /// However etcd groups revisions into responses and splits responses into
        /// fragments, the tracker hands out every event once, in order, and its resume
        /// point is always just after the last event handed out.
        #[test]
        fn events_come_out_once_in_order(
            revisions in prop::collection::vec(1usize..4, 1..40),
            grouping in prop::collection::vec(1usize..5, 40),
            splits in prop::collection::vec(1usize..4, 40),
        ) {
            let mut input = Vec::new();
            for (i, events) in revisions.iter().enumerate() {
                let rev = i as i64 + 2;
                for e in 0..*events {
                    let kind = if e % 2 == 0 { ETCD_PUT } else { ETCD_DELETE };
                    input.push((kind, format!("p/{e}"), rev));
                }
            }
            let mut tracker = Tracker::new(b"p/", 2);
            let mut out = Vec::new();
            let mut rev_index = 0;
            let mut g = 0;
            while rev_index < revisions.len() {
                let take = grouping[g % grouping.len()].min(revisions.len() - rev_index);
                let revs: Vec<i64> = (rev_index..rev_index + take).map(|i| i as i64 + 2).collect();
                let events: Vec<PbEvent> = input
                    .iter()
                    .filter(|(_, _, r)| revs.contains(r))
                    .map(|(k, key, r)| event(*k, key, *r))
                    .collect();
                let parts = splits[g % splits.len()].min(events.len()).max(1);
                let chunk = events.len().div_ceil(parts);
                let chunks: Vec<Vec<PbEvent>> = events.chunks(chunk).map(<[PbEvent]>::to_vec).collect();
                let last = chunks.len() - 1;
                for (c, events) in chunks.into_iter().enumerate() {
                    tracker.absorb(response(events, c != last)).unwrap();
                    if c != last {
                        prop_assert!(tracker.ready.is_empty());
                    }
                }
                out.extend(tracker.ready.drain(..).map(|e| {
                    let kind = if e.kind == EventKind::Put { ETCD_PUT } else { ETCD_DELETE };
                    (kind, String::from_utf8_lossy(&e.kv.key).into_owned(), e.revision() as i64)
                }));
                prop_assert_eq!(tracker.next, *revs.last().unwrap() + 1);
                rev_index += take;
                g += 1;
            }
            prop_assert_eq!(out, input);
        }
    }
}
