//! The `dir:PATH` source: a directory of Kubernetes YAML manifests, polled for changes.
//!
//! Standalone hosts and the network-namespace test harness have no Kubernetes API; they
//! describe a cluster with the same manifests `kubectl` would read (multi-document YAML,
//! `---` separated, `kind: List` accepted). The directory is scanned every poll interval
//! (recursively; names starting with `.` are skipped, which also skips the `..data`
//! indirection of a mounted ConfigMap); a changed file is re-parsed and, after any change,
//! the full set of objects per kind is sent as [`SourceEvent::Replace`].
//!
//! A file that fails to parse is skipped as a whole with a warning naming the file and
//! the line, and the objects it held at its last good parse are kept, so a half-written
//! edit never makes services disappear. Documents of other kinds are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{K8sObject, ObjectKind, ObjectRef, Source, SourceError, SourceEvent};
use crate::metrics::Metrics;

/// Default time between two scans.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Largest manifest file read (bigger files are skipped with a warning).
pub const MAX_FILE_SIZE: u64 = 64 * 1024 * 1024;

/// Errors of the directory source.
#[derive(Debug, thiserror::Error)]
pub enum DirSourceError {
    /// The directory cannot be read at start-up.
    #[error("cannot read source directory {path}: {source}; check --source dir:PATH")]
    Unreadable {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A manifest file that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}; the file is skipped and its last good objects are kept")]
pub struct ManifestError {
    /// The file.
    pub file: String,
    /// 1-based line of the problem (the document's first line when the parser gives none).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// The directory source. See the module docs.
#[derive(Debug)]
pub struct DirSource {
    root: PathBuf,
    poll_interval: Duration,
    metrics: Option<Arc<Metrics>>,
}

impl DirSource {
    /// A source reading `root`, scanning every [`DEFAULT_POLL_INTERVAL`].
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DirSource {
            root: root.into(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            metrics: None,
        }
    }

    /// Scans every `interval` instead.
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Counts rejected files in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

/// What the source remembers about one file.
#[derive(Debug)]
struct FileState {
    /// The bytes last read (to skip re-parsing unchanged files).
    content: Vec<u8>,
    /// Objects of the last successful parse.
    objects: Vec<K8sObject>,
}

#[async_trait::async_trait]
impl Source for DirSource {
    async fn run(
        self: Box<Self>,
        events: mpsc::Sender<SourceEvent>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        std::fs::read_dir(&self.root).map_err(|source| DirSourceError::Unreadable {
            path: self.root.clone(),
            source,
        })?;
        let mut files: BTreeMap<PathBuf, FileState> = BTreeMap::new();
        let mut first = true;
        loop {
            let changed = scan(&self.root, &mut files, self.metrics.as_deref());
            if changed || first {
                first = false;
                for event in replace_events(&files) {
                    if events.send(event).await.is_err() {
                        return Ok(());
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.poll_interval) => {}
            }
        }
    }
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

/// Rescans the directory; returns whether the set of objects may have changed.
fn scan(root: &Path, files: &mut BTreeMap<PathBuf, FileState>, metrics: Option<&Metrics>) -> bool {
    let mut seen = BTreeSet::new();
    let mut changed = false;
    let mut paths = Vec::new();
    if let Err(error) = collect_manifests(root, &mut paths, 0) {
        tracing::warn!(dir = %root.display(), %error, "cannot list the source directory; keeping the objects read so far");
        return false;
    }
    for path in paths {
        seen.insert(path.clone());
        let content = match read_limited(&path) {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "cannot read manifest; keeping its last good objects");
                continue;
            }
        };
        if files.get(&path).is_some_and(|s| s.content == content) {
            continue;
        }
        let file_name = path.display().to_string();
        let parsed = std::str::from_utf8(&content)
            .map_err(|e| ManifestError {
                file: file_name.clone(),
                line: 1 + content[..e.valid_up_to()]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count(),
                message: "file is not UTF-8".to_owned(),
            })
            .and_then(|text| parse_manifests(&file_name, text));
        match parsed {
            Ok(objects) => {
                tracing::info!(file = %file_name, objects = objects.len(), "manifest loaded");
                files.insert(path, FileState { content, objects });
                changed = true;
            }
            Err(error) => {
                tracing::warn!(file = %error.file, line = error.line, %error, "malformed manifest skipped");
                if let Some(m) = metrics {
                    m.rejected_input("manifest");
                }
                // Remember the bad content so the warning is not repeated every poll, but
                // keep the last good objects.
                let objects = files.remove(&path).map(|s| s.objects).unwrap_or_default();
                files.insert(path, FileState { content, objects });
            }
        }
    }
    let before = files.len();
    files.retain(|path, _| seen.contains(path));
    changed || files.len() != before
}

fn read_limited(path: &Path) -> std::io::Result<Vec<u8>> {
    let len = std::fs::metadata(path)?.len();
    if len > MAX_FILE_SIZE {
        return Err(std::io::Error::other(format!(
            "file is {len} bytes, more than the {MAX_FILE_SIZE} byte limit"
        )));
    }
    std::fs::read(path)
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

/// Parses a multi-document manifest into the objects of the kinds we read; documents of
/// other kinds are ignored.
///
/// # Errors
/// [`ManifestError`] for the first document that is not valid YAML, lacks `kind` or
/// `apiVersion`, or does not match the schema of its kind.
pub fn parse_manifests(file: &str, text: &str) -> Result<Vec<K8sObject>, ManifestError> {
    let mut objects = Vec::new();
    for (first_line, doc) in split_documents(text) {
        let value: serde_yaml::Value = serde_yaml::from_str(&doc).map_err(|e| ManifestError {
            file: file.to_owned(),
            line: first_line + e.location().map_or(0, |l| l.line().saturating_sub(1)),
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        convert(file, first_line, value, &mut objects)?;
    }
    Ok(objects)
}

fn convert(
    file: &str,
    line: usize,
    value: serde_yaml::Value,
    out: &mut Vec<K8sObject>,
) -> Result<(), ManifestError> {
    let err = |message: String| ManifestError {
        file: file.to_owned(),
        line,
        message,
    };
    let field = |name: &str| {
        value
            .get(name)
            .and_then(serde_yaml::Value::as_str)
            .map(str::to_owned)
    };
    let (Some(api_version), Some(kind)) = (field("apiVersion"), field("kind")) else {
        return Err(err("document has no apiVersion or kind".to_owned()));
    };
    let schema = |e: serde_yaml::Error| err(format!("invalid {kind}: {e}"));
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => out.push(K8sObject::Service(Box::new(
            serde_yaml::from_value::<Service>(value).map_err(schema)?,
        ))),
        ("discovery.k8s.io/v1", "EndpointSlice") => out.push(K8sObject::EndpointSlice(Box::new(
            serde_yaml::from_value::<EndpointSlice>(value).map_err(schema)?,
        ))),
        ("v1", "Node") => out.push(K8sObject::Node(Box::new(
            serde_yaml::from_value::<Node>(value).map_err(schema)?,
        ))),
        ("v1", "Pod") => out.push(K8sObject::Pod(Box::new(
            serde_yaml::from_value::<Pod>(value).map_err(schema)?,
        ))),
        (_, "List") => {
            let items = match value.get("items") {
                Some(serde_yaml::Value::Sequence(items)) => items.clone(),
                None | Some(serde_yaml::Value::Null) => Vec::new(),
                Some(_) => return Err(err("List items is not a sequence".to_owned())),
            };
            for item in items {
                convert(file, line, item, out)?;
            }
        }
        _ => {
            tracing::debug!(file, line, %api_version, %kind, "ignoring document of a kind the API server does not read")
        }
    }
    Ok(())
}

/// Splits YAML text at `---` document markers, returning each document with the 1-based
/// line number its first line has in the file.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let is_marker = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if is_marker {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
            // Content after the marker on the same line belongs to the new document.
            let rest = line[3..].trim_start();
            if !rest.is_empty() && !rest.starts_with('#') {
                current.push_str(rest);
                current.push('\n');
                start = i + 1;
            }
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs.push((start, current));
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_with_line_numbers() {
        let docs = split_documents("a: 1\n---\nb: 2\nc: 3\n--- # x\nd: 4\n");
        let starts: Vec<usize> = docs.iter().map(|(l, _)| *l).collect();
        assert_eq!(starts, [1, 3, 6]);
        assert_eq!(docs[1].1, "b: 2\nc: 3\n");
    }

    #[test]
    fn yaml_error_names_the_file_line() {
        let text = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n---\napiVersion: v1\nkind: Node\nmetadata: [unclosed\n";
        let err = parse_manifests("f.yaml", text).unwrap_err();
        assert_eq!(err.file, "f.yaml");
        assert!((8..=9).contains(&err.line), "line {}", err.line);
    }

    #[test]
    fn schema_error_names_the_document_line() {
        let text = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n---\napiVersion: v1\nkind: Service\nspec:\n  ports: 7\n";
        let err = parse_manifests("f.yaml", text).unwrap_err();
        assert_eq!(err.line, 6);
        assert!(err.message.contains("Service"), "{}", err.message);
    }

    #[test]
    fn lists_and_foreign_kinds() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: a}\n- apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: d}\n";
        let objects = parse_manifests("f.yaml", text).unwrap();
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].kind(), ObjectKind::Node);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "(---\n|[ -~]{0,30}\n){0,12}") {
            if let Err(e) = parse_manifests("f.yaml", &text) {
                let lines = text.lines().count().max(1);
                proptest::prop_assert!(e.line >= 1 && e.line <= lines + 1, "line {} of {}", e.line, lines);
            }
        }

        #[test]
        fn arbitrary_kubernetes_like_documents_never_panic(
            kind in proptest::sample::select(vec!["Service", "Node", "Pod", "EndpointSlice", "List"]),
            body in "[ -~]{0,40}",
        ) {
            let text = format!("apiVersion: v1\nkind: {kind}\nmetadata: {{name: x}}\nspec: {body}\nitems: {body}\n");
            let _ = parse_manifests("f.yaml", &text);
        }
    }

    #[test]
    fn missing_kind_is_an_error() {
        let err = parse_manifests("f.yaml", "metadata: {name: a}\n").unwrap_err();
        assert!(err.message.contains("kind"));
    }
}
