//! Watch streams served from a replica's history ring.
//!
//! A watcher does not get its own copy of every event: it keeps a cursor (the next
//! revision it wants) into the replica's bounded history and pulls batches from it
//! whenever the applied revision moves. The history ring is thus the per-watcher queue
//! with one shared bound: a watcher that falls behind by more than the history holds
//! finds its cursor below the floor and ends with [`StoreError::Compacted`], after which
//! it re-lists — the same contract as etcd's.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::stream;

use super::state_machine::SharedState;
use crate::{Event, Revision, StoreError, WatchStream};

/// Events pulled from the history per wake-up.
const BATCH: usize = 512;

struct Cursor {
    shared: Arc<SharedState>,
    prefix: Vec<u8>,
    next: Revision,
    rx: tokio::sync::watch::Receiver<Revision>,
    buf: VecDeque<Event>,
    done: bool,
}

/// A stream of events under `prefix` from revision `from` (`>= 1`).
pub(crate) fn stream(shared: Arc<SharedState>, prefix: Vec<u8>, from: Revision) -> WatchStream {
    let rx = shared.subscribe();
    let cursor = Cursor {
        shared,
        prefix,
        next: from,
        rx,
        buf: VecDeque::new(),
        done: false,
    };
    Box::pin(stream::unfold(cursor, |mut c| async move {
        loop {
            if c.done {
                return None;
            }
            if let Some(e) = c.buf.pop_front() {
                return Some((Ok(e), c));
            }
            c.rx.borrow_and_update();
            if c.shared.is_closed() {
                c.done = true;
                let err = StoreError::Unavailable(format!(
                    "the raft replica serving this watch stopped; resume the watch from revision {} on another replica",
                    c.next
                ));
                return Some((Err(err), c));
            }
            let read = {
                let applied = c.shared.read();
                applied
                    .ks
                    .history()
                    .read_from(c.next, &c.prefix, BATCH)
                    .map(|events| (events, applied.ks.revision()))
            };
            match read {
                Err(compacted) => {
                    c.done = true;
                    let err = StoreError::Compacted {
                        requested: c.next,
                        compacted: compacted.floor,
                    };
                    return Some((Err(err), c));
                }
                Ok((events, revision)) => {
                    if let Some(last) = events.last() {
                        c.next = last.kv.mod_revision + 1;
                        c.buf.extend(events.iter().map(|e| e.to_event()));
                        continue;
                    }
                    // Nothing under the prefix up to `revision`: skip ahead and sleep.
                    c.next = c.next.max(revision + 1);
                    if c.rx.changed().await.is_err() {
                        c.done = true;
                        let err = StoreError::Unavailable(format!(
                            "the raft replica serving this watch stopped; resume the watch from revision {} on another replica",
                            c.next
                        ));
                        return Some((Err(err), c));
                    }
                }
            }
        }
    }))
}
