//! One poll of the manifest directory: list the files, read the changed ones, apply what
//! has settled (see [`settle`](super::settle)). Runs on a blocking thread, never on the
//! async runtime, so a slow disk or a large file cannot stall serving.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::limits::{LimitExceeded, MAX_FILE_SIZE};
use super::parse::{parse_file, ManifestError};
use super::settle::{loses_objects, verdict, Change, Pending, Verdict};
use crate::metrics::Metrics;
use crate::source::{K8sObject, ObjectKind, ObjectRef, SourceEvent};

/// Identity of a file's inode: a different one at the same path means the file was
/// replaced (renamed into place), not written in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// The last content the source acted on (applied or refused), so an unchanged file is
/// neither parsed nor warned about again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Handled {
    /// Nothing yet (a file held at start-up).
    Nothing,
    /// These bytes.
    Content(Vec<u8>),
    /// A file over the size limit, not read; known by its size, time and inode.
    Oversized {
        size: u64,
        modified: Option<SystemTime>,
        id: FileId,
    },
}

/// What the source remembers about one file.
#[derive(Debug)]
struct FileState {
    /// Inode at the last poll.
    id: FileId,
    handled: Handled,
    /// Objects of the last content applied.
    objects: Vec<K8sObject>,
    /// A change written in place, held until it settles.
    pending: Option<Pending>,
}

/// What one poll found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ScanOutcome {
    /// The set of objects may have changed.
    pub(super) changed: bool,
    /// Some file has a change held until it settles.
    pub(super) holding: bool,
}

/// The directory and what was read from it.
#[derive(Debug)]
pub(super) struct Scanner {
    root: PathBuf,
    settle: Duration,
    metrics: Option<Arc<Metrics>>,
    files: BTreeMap<PathBuf, FileState>,
    started: bool,
}

impl Scanner {
    pub(super) fn new(root: PathBuf, settle: Duration, metrics: Option<Arc<Metrics>>) -> Self {
        Scanner {
            root,
            settle,
            metrics,
            files: BTreeMap::new(),
            started: false,
        }
    }

    /// Rescans the directory.
    pub(super) fn scan(&mut self) -> ScanOutcome {
        let mut paths = Vec::new();
        if let Err(error) = collect_manifests(&self.root, &mut paths, 0) {
            tracing::warn!(dir = %self.root.display(), %error, "cannot list the source directory; keeping the objects read so far");
            return ScanOutcome {
                changed: false,
                holding: self.files.values().any(|s| s.pending.is_some()),
            };
        }
        let mut changed = false;
        let seen: BTreeSet<PathBuf> = paths.iter().cloned().collect();
        for path in paths {
            changed |= self.scan_file(path);
        }
        let before = self.files.len();
        self.files.retain(|path, _| seen.contains(path));
        self.started = true;
        ScanOutcome {
            changed: changed || self.files.len() != before,
            holding: self.files.values().any(|s| s.pending.is_some()),
        }
    }

    /// Looks at one file; returns whether its objects changed.
    fn scan_file(&mut self, path: PathBuf) -> bool {
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "cannot read manifest; keeping its last good objects");
                return false;
            }
        };
        let id = FileId::of(&meta);
        let modified = meta.modified().ok();
        let started = self.started;
        let change = match self.files.get(&path) {
            _ if !started => Change::InPlace,
            None => Change::New,
            Some(state) if state.id == id => Change::InPlace,
            Some(_) => Change::Renamed,
        };
        let file_name = path.display().to_string();
        let state = self.files.entry(path).or_insert_with(|| FileState {
            id,
            handled: Handled::Nothing,
            objects: Vec::new(),
            pending: None,
        });
        state.id = id;
        let content = if meta.len() > MAX_FILE_SIZE {
            Err(meta.len())
        } else {
            match read_limited(Path::new(&file_name)) {
                Ok(content) => content,
                Err(error) => {
                    tracing::warn!(file = %file_name, %error, "cannot read manifest; keeping its last good objects");
                    return false;
                }
            }
        };
        let content = match content {
            Ok(content) => content,
            Err(size) => {
                let handled = Handled::Oversized { size, modified, id };
                if state.handled != handled {
                    state.handled = handled;
                    reject(
                        self.metrics.as_deref(),
                        &ManifestError::OverLimit {
                            file: file_name,
                            line: 1,
                            limit: LimitExceeded::FileSize {
                                size,
                                limit: MAX_FILE_SIZE,
                            },
                        },
                    );
                }
                state.pending = None;
                return false;
            }
        };
        if matches!(&state.handled, Handled::Content(c) if *c == content) {
            if state.pending.take().is_some() {
                tracing::info!(file = %file_name, "manifest is back to its applied content");
            }
            return false;
        }
        let now = Instant::now();
        let pending = match &mut state.pending {
            Some(p) if p.content == content => p,
            slot => slot.insert(Pending {
                content,
                first_seen: now,
                parsed: None,
            }),
        };
        let stable_for = now.saturating_duration_since(pending.first_seen);
        let modified_age = modified.and_then(|m| SystemTime::now().duration_since(m).ok());
        let apply = match verdict(change, stable_for, modified_age, self.settle) {
            Verdict::Apply => true,
            Verdict::ApplyUnlessObjectsLost => {
                let parsed = pending
                    .parsed
                    .get_or_insert_with(|| parse_file(&file_name, &pending.content));
                matches!(parsed, Ok(objects) if !loses_objects(&state.objects, objects))
            }
            Verdict::Hold => false,
        };
        if !apply {
            if stable_for.is_zero() {
                tracing::info!(file = %file_name, settle = ?self.settle, "manifest written in place; holding the change until it has not changed for the settle time (write a temporary file and rename it to apply at once)");
            }
            return false;
        }
        let Some(Pending {
            content, parsed, ..
        }) = state.pending.take()
        else {
            return false;
        };
        let parsed = parsed.unwrap_or_else(|| parse_file(&file_name, &content));
        state.handled = Handled::Content(content);
        match parsed {
            Ok(objects) => {
                tracing::info!(file = %file_name, objects = objects.len(), "manifest loaded");
                state.objects = objects;
                true
            }
            Err(error) => {
                reject(self.metrics.as_deref(), &error);
                false
            }
        }
    }

    /// One `Replace` per kind with the union of every file's objects (later files win
    /// when two files define the same object).
    pub(super) fn replace_events(&self) -> Vec<SourceEvent> {
        replace_events(&self.files)
    }
}

/// Logs a refused file and counts it; its last good objects stay.
fn reject(metrics: Option<&Metrics>, error: &ManifestError) {
    match error {
        ManifestError::OverLimit { limit, .. } => {
            tracing::warn!(file = error.file(), line = error.line(), %limit, "manifest over a limit skipped; keeping its last good objects");
        }
        ManifestError::Malformed { .. } => {
            tracing::warn!(file = error.file(), line = error.line(), %error, "malformed manifest skipped; keeping its last good objects");
        }
    }
    if let Some(m) = metrics {
        m.rejected_input(error.metric_reason());
    }
}

/// Reads a file, at most [`MAX_FILE_SIZE`] bytes; `Err(size)` inside when it is bigger
/// (it grew after its size was checked).
fn read_limited(path: &Path) -> std::io::Result<Result<Vec<u8>, u64>> {
    let mut content = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut content)?;
    let size = content.len() as u64;
    Ok(if size > MAX_FILE_SIZE {
        Err(size)
    } else {
        Ok(content)
    })
}

/// One `Replace` per kind with the union of every file's objects (later files win when
/// two files define the same object).
fn replace_events(files: &BTreeMap<PathBuf, FileState>) -> Vec<SourceEvent> {
    let mut by_kind: BTreeMap<ObjectKind, BTreeMap<ObjectRef, K8sObject>> = ObjectKind::ALL
        .into_iter()
        .map(|k| (k, BTreeMap::new()))
        .collect();
    for (path, state) in files {
        for object in &state.objects {
            let r = object.object_ref();
            if by_kind
                .entry(r.kind)
                .or_default()
                .insert(r.clone(), object.clone())
                .is_some()
            {
                tracing::warn!(file = %path.display(), object = %r, "object defined in more than one file; the definition in the later file (by path order) is used");
            }
        }
    }
    by_kind
        .into_iter()
        .map(|(kind, objects)| SourceEvent::Replace {
            kind,
            objects: objects.into_values().collect(),
        })
        .collect()
}

/// Manifest files under `dir`, depth-first, sorted for a stable order.
fn collect_manifests(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> std::io::Result<()> {
    const MAX_DEPTH: usize = 8;
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.filter_map(Result::ok).collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follow symlinks (ConfigMap mounts are symlinks).
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if depth < MAX_DEPTH {
                collect_manifests(&path, out, depth + 1)?;
            }
        } else if meta.is_file()
            && path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            out.push(path);
        }
    }
    Ok(())
}
