//! Turns the text of one manifest file into the Kubernetes objects the API server reads.
//!
//! Every document is checked against the [`limits`](super::limits) before the YAML
//! parser sees it, so no document can make the parser spend more than linear time. The
//! documents are read in the clustermesh YAML dialect ([`clustermesh_api::yaml`]), except
//! that a key repeated in a mapping is an error: Kubernetes refuses such objects too.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

use super::limits::{self, LimitExceeded};
use crate::source::{K8sObject, PolicyObject};

/// A manifest file that is skipped: malformed, or over a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not UTF-8, not YAML, or a document that does not match its kind's schema.
    #[error("{file}:{line}: {message}")]
    Malformed {
        /// The file.
        file: String,
        /// 1-based line of the problem (the document's first line when the parser gives
        /// none).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The file or one of its documents is over a limit; it was not parsed.
    #[error("{file}:{line}: {limit}")]
    OverLimit {
        /// The file.
        file: String,
        /// 1-based line where the limit was exceeded (1 for the file size).
        line: usize,
        /// The limit.
        limit: LimitExceeded,
    },
}

impl ManifestError {
    /// The file.
    #[must_use]
    pub fn file(&self) -> &str {
        match self {
            ManifestError::Malformed { file, .. } | ManifestError::OverLimit { file, .. } => file,
        }
    }

    /// 1-based line of the problem.
    #[must_use]
    pub fn line(&self) -> usize {
        match self {
            ManifestError::Malformed { line, .. } | ManifestError::OverLimit { line, .. } => *line,
        }
    }

    /// The `reason` label of the rejected-inputs metric (a fixed set of values).
    #[must_use]
    pub fn metric_reason(&self) -> &'static str {
        match self {
            ManifestError::Malformed { .. } => "manifest",
            ManifestError::OverLimit { .. } => "manifest_limit",
        }
    }
}

/// Parses the bytes of a manifest file (see [`parse_manifests`]).
pub(super) fn parse_file(file: &str, content: &[u8]) -> Result<Vec<K8sObject>, ManifestError> {
    let text = std::str::from_utf8(content).map_err(|e| ManifestError::Malformed {
        file: file.to_owned(),
        line: 1 + content[..e.valid_up_to()]
            .iter()
            .filter(|b| **b == b'\n')
            .count(),
        message: "file is not UTF-8".to_owned(),
    })?;
    parse_manifests(file, text)
}

/// Stack of the thread that reads one manifest file. Reading YAML into a value recurses
/// once per nesting level; [`MAX_NESTING_DEPTH`](super::MAX_NESTING_DEPTH) levels take
/// about 2.5 MiB of stack in an unoptimised build, more than a Tokio blocking thread or a
/// test thread has (an optimised build needs under 0.5 MiB).
const PARSE_STACK_SIZE: usize = 8 * 1024 * 1024;

/// Parses a multi-document manifest into the objects of the kinds we read; documents of
/// other kinds are ignored. Each document is checked against
/// [`MAX_DOCUMENT_SIZE`](super::MAX_DOCUMENT_SIZE) and
/// [`MAX_NESTING_DEPTH`](super::MAX_NESTING_DEPTH) before it is parsed.
///
/// # Errors
/// [`ManifestError`] for the first document that is over a limit, is not valid YAML,
/// lacks `kind` or `apiVersion`, or does not match the schema of its kind.
pub fn parse_manifests(file: &str, text: &str) -> Result<Vec<K8sObject>, ManifestError> {
    std::thread::scope(|scope| {
        let parser = std::thread::Builder::new()
            .name("manifest-parser".to_owned())
            .stack_size(PARSE_STACK_SIZE)
            .spawn_scoped(scope, || parse_documents(file, text));
        match parser {
            Ok(parser) => parser.join().unwrap_or_else(|_| {
                Err(ManifestError::Malformed {
                    file: file.to_owned(),
                    line: 1,
                    message: "the YAML parser failed".to_owned(),
                })
            }),
            Err(error) => {
                // An optimised build has stack enough on the calling thread.
                tracing::warn!(file, %error, "no thread for parsing the manifest; parsing on the caller's stack");
                parse_documents(file, text)
            }
        }
    })
}

/// [`parse_manifests`] on the calling thread.
fn parse_documents(file: &str, text: &str) -> Result<Vec<K8sObject>, ManifestError> {
    let mut objects = Vec::new();
    for (first_line, doc) in split_documents(text) {
        limits::check_document(&doc).map_err(|(line, limit)| ManifestError::OverLimit {
            file: file.to_owned(),
            line: first_line + line,
            limit,
        })?;
        let value: Value = clustermesh_api::yaml::from_str_with(&doc, yaml_options()).map_err(
            |e: clustermesh_api::yaml::Error| ManifestError::Malformed {
                file: file.to_owned(),
                line: first_line
                    + e.location()
                        .and_then(|l| usize::try_from(l.line().saturating_sub(1)).ok())
                        .unwrap_or(0),
                message: e.to_string(),
            },
        )?;
        if value.is_null() {
            continue;
        }
        convert(file, first_line, value, &mut objects)?;
    }
    Ok(objects)
}

/// The clustermesh YAML dialect, refusing repeated keys.
fn yaml_options() -> serde_saphyr::Options {
    let mut options = clustermesh_api::yaml::options();
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    options
}

fn convert(
    file: &str,
    line: usize,
    value: Value,
    out: &mut Vec<K8sObject>,
) -> Result<(), ManifestError> {
    let err = |message: String| ManifestError::Malformed {
        file: file.to_owned(),
        line,
        message,
    };
    let field = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
    let (Some(api_version), Some(kind)) = (field("apiVersion"), field("kind")) else {
        return Err(err("document has no apiVersion or kind".to_owned()));
    };
    let schema = |e: serde_json::Error| err(format!("invalid {kind}: {e}"));
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => out.push(K8sObject::Service(Box::new(
            serde_json::from_value::<Service>(value).map_err(schema)?,
        ))),
        ("discovery.k8s.io/v1", "EndpointSlice") => out.push(K8sObject::EndpointSlice(Box::new(
            serde_json::from_value::<EndpointSlice>(value).map_err(schema)?,
        ))),
        ("v1", "Node") => out.push(K8sObject::Node(Box::new(
            serde_json::from_value::<Node>(value).map_err(schema)?,
        ))),
        ("v1", "Pod") => out.push(K8sObject::Pod(Box::new(
            serde_json::from_value::<Pod>(value).map_err(schema)?,
        ))),
        ("v1", "Namespace") => out.push(K8sObject::Namespace(Box::new(
            serde_json::from_value::<Namespace>(value).map_err(schema)?,
        ))),
        // Policies keep their spec as written: one that does not validate is reported by
        // name downstream, not refused with every other object of the file.
        ("networking.k8s.io/v1", "NetworkPolicy") => out.push(K8sObject::NetworkPolicy(Box::new(
            serde_json::from_value::<PolicyObject>(value).map_err(schema)?,
        ))),
        ("cilium.io/v2", "CiliumNetworkPolicy") => out.push(K8sObject::CiliumNetworkPolicy(
            Box::new(serde_json::from_value::<PolicyObject>(value).map_err(schema)?),
        )),
        (_, "List") => {
            let items = match value.get("items") {
                Some(Value::Array(items)) => items.clone(),
                None | Some(Value::Null) => Vec::new(),
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
    use crate::source::ObjectKind;

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
        assert_eq!(err.file(), "f.yaml");
        assert!((8..=9).contains(&err.line()), "line {}", err.line());
    }

    #[test]
    fn schema_error_names_the_document_line() {
        let text = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n---\napiVersion: v1\nkind: Service\nspec:\n  ports: 7\n";
        let err = parse_manifests("f.yaml", text).unwrap_err();
        assert_eq!(err.line(), 6);
        assert!(err.to_string().contains("Service"), "{}", err.to_string());
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
                proptest::prop_assert!(e.line() >= 1 && e.line() <= lines + 1, "line {} of {}", e.line(), lines);
            }
        }

        #[test]
        fn arbitrary_kubernetes_like_documents_never_panic(
            kind in proptest::sample::select(vec!["Service", "Node", "Pod", "EndpointSlice", "Namespace", "List"]),
            body in "[ -~]{0,40}",
        ) {
            let text = format!("apiVersion: v1\nkind: {kind}\nmetadata: {{name: x}}\nspec: {body}\nitems: {body}\n");
            let _ = parse_manifests("f.yaml", &text);
        }
    }

    #[test]
    fn nesting_over_the_limit_is_refused_naming_file_line_and_limit() {
        let text = format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: a}}\n---\nk: {}\n",
            "[".repeat(100_000)
        );
        let err = parse_manifests("deep.yaml", &text).unwrap_err();
        assert_eq!(err.metric_reason(), "manifest_limit");
        assert_eq!(err.line(), 5);
        let shown = err.to_string();
        assert!(
            shown.starts_with("deep.yaml:5:") && shown.contains("100 levels"),
            "{shown}"
        );
    }

    #[test]
    fn policies_keep_their_spec_as_written() {
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: shop}\nspec: {podSelecter: {}}\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: cnp}\nspecs: [{endpointSelector: {}}]\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n";
        let objects = parse_manifests("f.yaml", text).unwrap();
        let kinds: Vec<ObjectKind> = objects.iter().map(K8sObject::kind).collect();
        assert_eq!(
            kinds,
            [
                ObjectKind::NetworkPolicy,
                ObjectKind::CiliumNetworkPolicy,
                ObjectKind::Namespace
            ]
        );
        let K8sObject::NetworkPolicy(np) = &objects[0] else {
            panic!("expected a NetworkPolicy");
        };
        assert_eq!(np.spec, Some(serde_json::json!({"podSelecter": {}})));
        let K8sObject::CiliumNetworkPolicy(cnp) = &objects[1] else {
            panic!("expected a CiliumNetworkPolicy");
        };
        assert!(cnp.spec.is_none() && cnp.specs.is_some());
        assert_eq!(objects[1].object_ref().namespace, "default");
        assert_eq!(objects[2].object_ref().namespace, "");
    }

    #[test]
    fn missing_kind_is_an_error() {
        let err = parse_manifests("f.yaml", "metadata: {name: a}\n").unwrap_err();
        assert!(err.to_string().contains("kind"));
    }
}
