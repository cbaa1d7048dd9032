//! The durable raft log: checksummed segment files plus small vote and meta files.
//!
//! Why a hand-written segmented log rather than redb: the raft log is append-mostly with
//! occasional tail truncation and head purge, which maps directly onto files, and owning
//! the format lets recovery tell a torn final write (repairable) from corruption (fatal)
//! record by record and name the file and offset in either case (see [`super::record`]).
//! A B-tree database would roll a damaged commit back silently, which could drop an
//! entry this replica had already acknowledged.
//!
//! Durability: `append` writes the batch (one `write` call) and hands the openraft
//! `LogFlushed` callback to a flusher thread, which calls `fdatasync` once for every
//! callback queued so far and only then reports the entries durable. Appends that arrive
//! while an fsync is running share the next one (group commit), so at most one fsync is in
//! flight and many client writes ride on it. Votes and purge points are written to a
//! temporary file, fsynced, renamed over the old one and the directory fsynced.
//!
//! Recovery ([`LogStore::open`]): every segment is scanned; a torn tail in the **last**
//! segment (a final record cut short, or zero fill) can only be a write whose fsync never
//! returned, so it was never acknowledged: it is cut off with a `warn!` naming file and
//! offset. Anything else — a checksum mismatch, a bad header, a torn middle segment, an
//! index gap — refuses to start with [`StoreError::Corrupt`] naming the file.
//! Entries are also kept in memory (the log is purged after every snapshot, so this is
//! bounded by the snapshot interval).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, LogId, LogState, OptionalSend, RaftLogId, RaftLogReader, StorageError, StorageIOError,
    Vote,
};
use serde::{Deserialize, Serialize};

use super::durable_file::{corrupt, read_single_record, sync_dir, write_atomic};
use super::record::{self, ScanEnd};
use super::TypeConfig;
use crate::StoreError;

type NodeId = u64;

const SEGMENT_SUFFIX: &str = ".seg";

/// One record of a segment file.
#[derive(Debug, Serialize, Deserialize)]
enum LogRecord {
    Entry(Entry<TypeConfig>),
    Committed(Option<LogId<NodeId>>),
}

/// Borrowing twin of [`LogRecord`] for encoding (same serde shape).
#[derive(Serialize)]
enum LogRecordRef<'a> {
    Entry(&'a Entry<TypeConfig>),
    Committed(Option<LogId<NodeId>>),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LogMeta {
    last_purged: Option<LogId<NodeId>>,
}

/// Where an entry's record lives, and how big it is.
#[derive(Debug, Clone, Copy)]
struct Loc {
    /// First index of the segment (its file name).
    segment: u64,
    /// Byte offset of the record in the segment.
    offset: u64,
    /// Encoded size of the entry.
    size: u64,
}

/// Most entry bytes one AppendEntries carries (well under the RPC message limit).
const REPLICATION_BATCH_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug)]
struct Segment {
    path: PathBuf,
}

#[derive(Debug)]
struct ActiveSegment {
    first: u64,
    file: Arc<File>,
    len: u64,
}

#[derive(Debug)]
struct LogInner {
    dir: PathBuf,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    /// Index → where its record is.
    locs: BTreeMap<u64, Loc>,
    segments: BTreeMap<u64, Segment>,
    active: Option<ActiveSegment>,
    last_purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    segment_bytes: u64,
}

struct FlushJob {
    file: Arc<File>,
    callback: LogFlushed<TypeConfig>,
}

/// The raft log of one replica (cheap to clone: clones share the same log).
#[derive(Debug, Clone)]
pub(crate) struct LogStore {
    inner: Arc<Mutex<LogInner>>,
    flusher: mpsc::Sender<FlushJob>,
}

impl Debug for FlushJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlushJob")
    }
}

fn segment_name(first: u64) -> String {
    format!("{first:020}{SEGMENT_SUFFIX}")
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, recovering as described in the module docs.
    pub(crate) fn open(dir: &Path, segment_bytes: u64) -> Result<Self, StoreError> {
        fs::create_dir_all(dir)?;
        let meta: LogMeta = read_single_record(&dir.join("meta"))?.unwrap_or_default();
        let vote: Option<Vote<NodeId>> = read_single_record(&dir.join("vote"))?;

        let mut firsts = Vec::new();
        for dent in fs::read_dir(dir)? {
            let dent = dent?;
            let name = dent.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) {
                let first: u64 = stem.parse().map_err(|_| {
                    corrupt(
                        &dent.path(),
                        "segment file name is not a log index; remove stray files from the log directory",
                    )
                })?;
                firsts.push(first);
            }
        }
        firsts.sort_unstable();

        let mut inner = LogInner {
            dir: dir.to_path_buf(),
            entries: BTreeMap::new(),
            locs: BTreeMap::new(),
            segments: BTreeMap::new(),
            active: None,
            last_purged: meta.last_purged,
            vote,
            committed: None,
            segment_bytes,
        };
        let purged_index = meta.last_purged.map(|l| l.index);
        let mut expected_next: Option<u64> = purged_index.map(|i| i + 1);
        for (n, first) in firsts.iter().copied().enumerate() {
            let is_last = n + 1 == firsts.len();
            let path = dir.join(segment_name(first));
            let bytes = fs::read(&path)?;
            let (recs, end) = record::scan(&bytes);
            let mut valid_len = bytes.len();
            match end {
                ScanEnd::Clean => {}
                ScanEnd::Torn { offset } if is_last => {
                    tracing::warn!(
                        file = %path.display(),
                        offset,
                        dropped_bytes = bytes.len() - offset,
                        "raft log ends with a torn record (a write interrupted before its fsync, never acknowledged); truncating the file at this offset"
                    );
                    let f = OpenOptions::new().write(true).open(&path)?;
                    f.set_len(offset as u64)?;
                    f.sync_all()?;
                    valid_len = offset;
                }
                ScanEnd::Torn { offset } => {
                    return Err(corrupt(
                        &path,
                        format!("segment is cut short at offset {offset} but is not the last segment; refusing to start: restore the log from a backup or remove this replica's data directory and re-add it to the cluster"),
                    ));
                }
                ScanEnd::Corrupt { offset, reason } => {
                    return Err(corrupt(
                        &path,
                        format!("{reason} at offset {offset}; refusing to start rather than dropping entries this replica acknowledged: restore the log from a backup or remove this replica's data directory and re-add it to the cluster"),
                    ));
                }
            }
            for (offset, payload) in recs {
                let rec: LogRecord = record::decode(payload).map_err(|e| {
                    corrupt(
                        &path,
                        format!("record at offset {offset} does not decode: {e}"),
                    )
                })?;
                match rec {
                    LogRecord::Committed(c) => inner.committed = c,
                    LogRecord::Entry(entry) => {
                        let index = entry.get_log_id().index;
                        if purged_index.is_some_and(|p| index <= p) {
                            continue;
                        }
                        if let Some(next) = expected_next {
                            if index != next {
                                return Err(corrupt(
                                    &path,
                                    format!("log index gap: expected entry {next}, found {index} at offset {offset}; restore the log from a backup or remove this replica's data directory and re-add it to the cluster"),
                                ));
                            }
                        }
                        expected_next = Some(index + 1);
                        inner.locs.insert(
                            index,
                            Loc {
                                segment: first,
                                offset: offset as u64,
                                size: payload.len() as u64,
                            },
                        );
                        inner.entries.insert(index, entry);
                    }
                }
            }
            inner.segments.insert(first, Segment { path: path.clone() });
            if is_last {
                let file = OpenOptions::new().append(true).open(&path)?;
                inner.active = Some(ActiveSegment {
                    first,
                    file: Arc::new(file),
                    len: valid_len as u64,
                });
            }
        }
        // A committed marker can never point past the durable log.
        let last_index = inner.entries.keys().next_back().copied().or(purged_index);
        if let (Some(c), Some(last)) = (inner.committed, last_index) {
            if c.index > last {
                inner.committed = None;
            }
        }
        tracing::info!(
            dir = %dir.display(),
            entries = inner.entries.len(),
            segments = inner.segments.len(),
            last_purged = ?inner.last_purged.map(|l| l.index),
            "raft log opened"
        );

        let (tx, rx) = mpsc::channel::<FlushJob>();
        std::thread::Builder::new()
            .name("raft-log-fsync".into())
            .spawn(move || flusher(rx))?;
        Ok(LogStore {
            inner: Arc::new(Mutex::new(inner)),
            flusher: tx,
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Syncs every file with queued callbacks once, then completes the callbacks.
fn flusher(rx: mpsc::Receiver<FlushJob>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while let Ok(more) = rx.try_recv() {
            jobs.push(more);
        }
        let mut result: io::Result<()> = Ok(());
        let mut synced: Vec<&Arc<File>> = Vec::new();
        for job in &jobs {
            if synced.iter().any(|f| Arc::ptr_eq(f, &job.file)) {
                continue;
            }
            if let Err(e) = job.file.sync_data() {
                tracing::error!(error = %e, "fsync of the raft log failed; this replica stops accepting writes");
                result = Err(e);
                break;
            }
            synced.push(&job.file);
        }
        for job in jobs {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            job.callback.log_io_completed(r);
        }
    }
}

impl LogInner {
    /// The active segment, creating a new one starting at `first` if there is none or
    /// the current one is full.
    fn active_for(&mut self, first: u64) -> io::Result<&mut ActiveSegment> {
        let rotate = match &self.active {
            None => true,
            Some(a) => a.len >= self.segment_bytes,
        };
        if rotate {
            if let Some(old) = &self.active {
                old.file.sync_data()?;
            }
            let path = self.dir.join(segment_name(first));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            file.set_len(0)?;
            sync_dir(&self.dir)?;
            self.segments.insert(first, Segment { path });
            self.active = Some(ActiveSegment {
                first,
                file: Arc::new(file),
                len: 0,
            });
        }
        self.active
            .as_mut()
            .ok_or_else(|| io::Error::other("no active log segment"))
    }

    fn write_meta(&self) -> io::Result<()> {
        let meta = LogMeta {
            last_purged: self.last_purged,
        };
        let bytes = record::encode(&meta).map_err(io_err)?;
        write_atomic(&self.dir.join("meta"), &record::frame(&bytes))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.lock();
        Ok(inner.entries.range(range).map(|(_, e)| e.clone()).collect())
    }

    /// Caps a replication batch at [`REPLICATION_BATCH_BYTES`] (at least one entry), so a
    /// run of megabyte values never exceeds the RPC message limit.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.lock();
        let mut out = Vec::new();
        let mut bytes = 0;
        for (index, e) in inner.entries.range(start..end) {
            let size = inner.locs.get(index).map(|l| l.size).unwrap_or(0);
            if !out.is_empty() && bytes + size > REPLICATION_BATCH_BYTES {
                break;
            }
            bytes += size;
            out.push(e.clone());
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let inner = self.lock();
        let last = inner
            .entries
            .values()
            .next_back()
            .map(|e| *e.get_log_id())
            .or(inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        let bytes = record::encode(vote).map_err(|e| StorageIOError::write_vote(&io_err(e)))?;
        write_atomic(&inner.dir.join("vote"), &record::frame(&bytes))
            .map_err(|e| StorageIOError::write_vote(&e))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // A hint for faster recovery, written without its own fsync: it becomes durable
        // with the next append's fsync, and losing it only means re-applying later.
        // It goes into the active segment (never starting a new one: a segment's name is
        // the index of its first entry).
        let mut inner = self.lock();
        inner.committed = committed;
        let payload = record::encode(&LogRecordRef::Committed(committed))
            .map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
        let framed = record::frame(&payload);
        let Some(active) = inner.active.as_mut() else {
            return Ok(());
        };
        (&*active.file)
            .write_all(&framed)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        active.len += framed.len() as u64;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let Some(first) = entries.first().map(|e| e.get_log_id().index) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let mut buf = Vec::new();
        let mut offsets = Vec::with_capacity(entries.len());
        for e in &entries {
            let payload = record::encode(&LogRecordRef::Entry(e))
                .map_err(|err| StorageIOError::write_log_entry(*e.get_log_id(), &io_err(err)))?;
            offsets.push((buf.len() as u64, payload.len() as u64));
            record::push_frame(&mut buf, &payload);
        }
        let mut inner = self.lock();
        let active = inner
            .active_for(first)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let base = active.len;
        let seg = active.first;
        (&*active.file)
            .write_all(&buf)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        active.len += buf.len() as u64;
        let file = active.file.clone();
        for (e, (off, size)) in entries.into_iter().zip(offsets) {
            let index = e.get_log_id().index;
            inner.locs.insert(
                index,
                Loc {
                    segment: seg,
                    offset: base + off,
                    size,
                },
            );
            inner.entries.insert(index, e);
        }
        drop(inner);
        self.flusher
            .send(FlushJob { file, callback })
            .map_err(|_| StorageIOError::write_logs(&io_err("the log fsync thread has stopped")))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        let Some(&Loc {
            segment: seg,
            offset,
            ..
        }) = inner.locs.get(&log_id.index)
        else {
            return Ok(());
        };
        tracing::debug!(
            from = log_id.index,
            "truncating conflicting raft log entries"
        );
        let doomed: Vec<u64> = inner.segments.range(seg + 1..).map(|(f, _)| *f).collect();
        for first in doomed {
            if let Some(s) = inner.segments.remove(&first) {
                fs::remove_file(&s.path).map_err(|e| StorageIOError::write_logs(&e))?;
            }
        }
        let path = inner
            .segments
            .get(&seg)
            .map(|s| s.path.clone())
            .ok_or_else(|| {
                StorageIOError::write_logs(&io_err("segment of a log entry is missing"))
            })?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        file.set_len(offset)
            .and_then(|()| file.sync_all())
            .and_then(|()| sync_dir(&inner.dir))
            .map_err(|e| StorageIOError::write_logs(&e))?;
        inner.active = Some(ActiveSegment {
            first: seg,
            file: Arc::new(file),
            len: offset,
        });
        inner.entries.split_off(&log_id.index);
        inner.locs.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        inner.last_purged = Some(log_id);
        inner
            .write_meta()
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let keep = inner.entries.split_off(&(log_id.index + 1));
        inner.entries = keep;
        let keep = inner.locs.split_off(&(log_id.index + 1));
        inner.locs = keep;
        // A segment can go once the next segment starts at or before the purge point + 1.
        let firsts: Vec<u64> = inner.segments.keys().copied().collect();
        let active_first = inner.active.as_ref().map(|a| a.first);
        let mut removed = false;
        for pair in firsts.windows(2) {
            if pair[1] <= log_id.index + 1 && Some(pair[0]) != active_first {
                if let Some(s) = inner.segments.remove(&pair[0]) {
                    fs::remove_file(&s.path).map_err(|e| StorageIOError::write_logs(&e))?;
                    removed = true;
                }
            }
        }
        if removed {
            sync_dir(&inner.dir).map_err(|e| StorageIOError::write_logs(&e))?;
        }
        Ok(())
    }
}
