//! Schema validation of every object the fake API server stores, so a write a real server
//! refuses is refused here too.
//!
//! The schema is the real one: `k8s-openapi`'s types are generated from the Kubernetes
//! OpenAPI document, so decoding a body into the typed struct finds what the real server's
//! decoder finds:
//!
//! - a value of the wrong type (`nodeSelector.x: true`) is a 400 `BadRequest` ("cannot be
//!   handled as a …") for create/update, and a 400 "failed to create typed patch object"
//!   for server-side apply, whatever `fieldValidation` says;
//! - a required field that is missing (a container without `name`) is a 422 `Invalid`
//!   "Required value";
//! - a field the schema does not declare is found by decoding, encoding again and looking
//!   for what the typed form dropped. Under `?fieldValidation=Strict` it is a 400 (create/
//!   update: "strict decoding error: unknown field …"; apply: "field not declared in
//!   schema"); under `Warn` (the server's default) it is dropped with a `Warning` header;
//!   under `Ignore` it is dropped silently — as the real server does
//!   (<https://kubernetes.io/docs/reference/using-api/api-concepts/#field-validation>).
//!
//! On top of the schema, a few semantic rules of the real server's validation
//! (`pkg/apis/*/validation` in kubernetes/kubernetes) that the rendered chart can trip:
//! object, container, port and volume names, label syntax, a workload's selector matching
//! its template labels and volume mounts naming a declared volume.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::{kind_of, status_error, Key, Reply};

/// What the request asked the server to do with fields the schema does not declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FieldValidation {
    /// Drop them silently.
    Ignore,
    /// Drop them and say so in a `Warning` header (the default).
    Warn,
    /// Refuse the request.
    Strict,
}

impl FieldValidation {
    /// Parses `?fieldValidation=`.
    pub(super) fn from_param(value: Option<&String>) -> Result<Self, Reply> {
        match value.map(String::as_str) {
            None | Some("") | Some("Warn") => Ok(Self::Warn),
            Some("Ignore") => Ok(Self::Ignore),
            Some("Strict") => Ok(Self::Strict),
            Some(other) => Err(status_error(
                400,
                format!("fieldValidation must be one of Ignore, Warn or Strict, got {other:?}"),
                None,
            )),
        }
    }
}

/// Which kind of write a body came with (the messages differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriteKind {
    /// POST, PUT or a merge patch: the body is decoded by the typed decoder.
    Decode,
    /// Server-side apply: the body becomes a typed patch object.
    Apply,
}

/// `Secret "x"` / `Deployment.apps "x"`: how the real server names an object in messages.
pub(super) fn qualified(key: &Key) -> String {
    let kind = kind_of(&key.plural);
    match key.group_version.strip_prefix("apis/") {
        Some(gv) => format!(
            "{kind}.{} \"{}\"",
            gv.split('/').next().unwrap_or_default(),
            key.name
        ),
        None => format!("{kind} \"{}\"", key.name),
    }
}

/// A 422 `Invalid` naming the object and the field, like the real server.
pub(super) fn invalid(key: &Key, causes: &[String]) -> Reply {
    let mut reply = status_error(
        422,
        format!("{} is invalid: {}", qualified(key), causes.join(", ")),
        Some((key, "")),
    );
    // The real server's details name the kind and list each cause with its field (kubectl
    // prints them as "The Deployment "web" is invalid: spec.selector: …").
    let details: Vec<Value> = causes
        .iter()
        .map(|c| {
            let (field, message) = c.split_once(": ").unwrap_or(("", c));
            let reason = match message.split(':').next().unwrap_or_default() {
                "Required value" => "FieldValueRequired",
                "Forbidden" => "FieldValueForbidden",
                "Not found" => "FieldValueNotFound",
                _ => "FieldValueInvalid",
            };
            serde_json::json!({"reason": reason, "message": message, "field": field})
        })
        .collect();
    if let Ok(mut body) = serde_json::from_slice::<Value>(&reply.body) {
        let group = key
            .group_version
            .strip_prefix("apis/")
            .and_then(|gv| gv.split('/').next())
            .unwrap_or_default();
        body["details"] = serde_json::json!({
            "name": key.name, "group": group, "kind": kind_of(&key.plural), "causes": details,
        });
        reply.body = body.to_string().into_bytes();
    }
    reply
}

/// Decodes `obj` as the typed resource `key` addresses: Err(path, message) on a type
/// error or a missing required field, else the typed form encoded again. None for kinds
/// without a typed schema here (stored unchecked).
fn typed_roundtrip(key: &Key, obj: &Value) -> Option<Result<Value, (String, String)>> {
    use k8s_openapi::api::apps::v1 as apps;
    use k8s_openapi::api::batch::v1 as batch;
    use k8s_openapi::api::core::v1 as core;
    use k8s_openapi::api::rbac::v1 as rbac;
    fn decode<T: DeserializeOwned + Serialize>(obj: &Value) -> Result<Value, (String, String)> {
        let typed: T = serde_path_to_error::deserialize(obj).map_err(|e| {
            let path = e.path().to_string();
            (
                if path == "." { String::new() } else { path },
                e.into_inner().to_string(),
            )
        })?;
        serde_json::to_value(&typed).map_err(|e| (String::new(), e.to_string()))
    }
    Some(match (key.group_version.as_str(), key.plural.as_str()) {
        ("api/v1", "secrets") => decode::<core::Secret>,
        ("api/v1", "configmaps") => decode::<core::ConfigMap>,
        ("api/v1", "services") => decode::<core::Service>,
        ("api/v1", "serviceaccounts") => decode::<core::ServiceAccount>,
        ("api/v1", "namespaces") => decode::<core::Namespace>,
        ("api/v1", "pods") => decode::<core::Pod>,
        ("api/v1", "nodes") => decode::<core::Node>,
        ("api/v1", "endpoints") => decode::<core::Endpoints>,
        ("api/v1", "persistentvolumeclaims") => decode::<core::PersistentVolumeClaim>,
        ("apis/apps/v1", "deployments") => decode::<apps::Deployment>,
        ("apis/apps/v1", "statefulsets") => decode::<apps::StatefulSet>,
        ("apis/apps/v1", "daemonsets") => decode::<apps::DaemonSet>,
        ("apis/apps/v1", "replicasets") => decode::<apps::ReplicaSet>,
        ("apis/batch/v1", "jobs") => decode::<batch::Job>,
        ("apis/rbac.authorization.k8s.io/v1", "roles") => decode::<rbac::Role>,
        ("apis/rbac.authorization.k8s.io/v1", "rolebindings") => decode::<rbac::RoleBinding>,
        ("apis/rbac.authorization.k8s.io/v1", "clusterroles") => decode::<rbac::ClusterRole>,
        ("apis/rbac.authorization.k8s.io/v1", "clusterrolebindings") => {
            decode::<rbac::ClusterRoleBinding>
        }
        _ => return None,
    }(obj))
}

/// Paths (`spec.template.spec.containers[0].foo`) present in `input` but not in the
/// typed round trip `typed`: the fields the schema does not declare.
fn unknown_fields(input: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (input, typed) {
        (Value::Object(i), Value::Object(t)) => {
            for (k, v) in i {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match t.get(k) {
                    Some(tv) => unknown_fields(v, tv, &p, out),
                    None if v.is_null() => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(i), Value::Array(t)) => {
            for (n, (iv, tv)) in i.iter().zip(t).enumerate() {
                unknown_fields(iv, tv, &format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

/// Removes the field at a path made by [`unknown_fields`].
fn remove_path(obj: &mut Value, path: &str) {
    let mut segs: Vec<(String, Option<usize>)> = Vec::new();
    for part in path.split('.') {
        let (name, rest) = part.split_once('[').unwrap_or((part, ""));
        segs.push((name.to_owned(), None));
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            let n = idx.trim_end_matches(']').parse().ok();
            segs.push((String::new(), n));
        }
    }
    let Some((last, parents)) = segs.split_last() else {
        return;
    };
    let mut cur = obj;
    for (name, idx) in parents {
        let next = match idx {
            Some(n) => cur.get_mut(*n),
            None => cur.get_mut(name.as_str()),
        };
        match next {
            Some(v) => cur = v,
            None => return,
        }
    }
    if let Some(map) = cur.as_object_mut() {
        map.remove(&last.0);
    }
}

/// Checks `obj` (about to be written to `key`) against the schema. Unknown fields are
/// removed from `obj` unless `mode` is Strict (then the write fails); the returned
/// strings are the `Warning` header values to send.
pub(super) fn check_schema(
    key: &Key,
    obj: &mut Value,
    mode: FieldValidation,
    write: WriteKind,
) -> Result<Vec<String>, Reply> {
    let Some(decoded) = typed_roundtrip(key, obj) else {
        return Ok(Vec::new());
    };
    let kind = kind_of(&key.plural);
    let api_version = key.api_version();
    let typed = match decoded {
        Ok(v) => v,
        Err((path, msg)) if msg.starts_with("missing field") => {
            let field = msg
                .trim_start_matches("missing field ")
                .trim_matches('`')
                .to_owned();
            let full = if path.is_empty() {
                field
            } else {
                format!("{path}.{field}")
            };
            return Err(invalid(key, &[format!("{full}: Required value")]));
        }
        Err((path, msg)) => {
            let message = match write {
                WriteKind::Decode => format!(
                    "{kind} in version \"{}\" cannot be handled as a {kind}: {path}: {msg}",
                    api_version.rsplit('/').next().unwrap_or_default()
                ),
                WriteKind::Apply => format!(
                    "failed to create typed patch object ({api_version}, Kind={kind}): .{path}: {msg}"
                ),
            };
            return Err(status_error(400, message, Some((key, ""))));
        }
    };
    let mut unknown = Vec::new();
    unknown_fields(obj, &typed, "", &mut unknown);
    if unknown.is_empty() {
        return Ok(Vec::new());
    }
    match mode {
        FieldValidation::Strict => {
            let message = match write {
                WriteKind::Decode => format!(
                    "strict decoding error: {}",
                    unknown
                        .iter()
                        .map(|p| format!("unknown field \"{p}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                WriteKind::Apply => format!(
                    "failed to create typed patch object ({api_version}, Kind={kind}): {}",
                    unknown
                        .iter()
                        .map(|p| format!(".{p}: field not declared in schema"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            };
            Err(status_error(400, message, Some((key, ""))))
        }
        FieldValidation::Warn | FieldValidation::Ignore => {
            for p in &unknown {
                remove_path(obj, p);
            }
            Ok(if mode == FieldValidation::Warn {
                unknown
                    .iter()
                    .map(|p| format!("unknown field \"{p}\""))
                    .collect()
            } else {
                Vec::new()
            })
        }
    }
}

/// A DNS-1123 label: lowercase alphanumerics and `-`, starting and ending alphanumeric,
/// at most 63 characters.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain: dot-separated labels, at most 253 characters.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A label or annotation key: optional DNS-subdomain prefix and `/`, then a name of at
/// most 63 alphanumerics, `-`, `_`, `.` starting and ending alphanumeric.
fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_dns_subdomain) && is_label_value(name) && !name.is_empty()
}

/// A label value: empty, or at most 63 alphanumerics, `-`, `_`, `.` starting and ending
/// alphanumeric.
fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// An IANA service name (a named port): at most 15 lowercase alphanumerics and `-`, with
/// a letter, no `--`, not starting or ending with `-`.
fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.contains("--")
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn check_labels(labels: &Value, path: &str, causes: &mut Vec<String>) {
    let Some(map) = labels.as_object() else {
        return;
    };
    for (k, v) in map {
        if !is_qualified_name(k) {
            causes.push(format!(
                "{path}: Invalid value: \"{k}\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
            ));
        }
        let value = v.as_str().unwrap_or_default();
        if !is_label_value(value) {
            causes.push(format!(
                "{path}: Invalid value: \"{value}\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
            ));
        }
    }
}

/// `claims`: a StatefulSet's volumeClaimTemplates names, which mounts may name too.
fn check_pod_spec(spec: &Value, claims: &[&str], path: &str, causes: &mut Vec<String>) {
    let mut volumes: Vec<&str> = spec["volumes"]
        .as_array()
        .map(|v| v.iter().filter_map(|x| x["name"].as_str()).collect())
        .unwrap_or_default();
    for (n, v) in volumes.iter().enumerate() {
        if !is_dns_label(v) {
            causes.push(format!(
                "{path}.volumes[{n}].name: Invalid value: \"{v}\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
            ));
        }
    }
    volumes.extend_from_slice(claims);
    for list in ["initContainers", "containers"] {
        let Some(containers) = spec[list].as_array() else {
            continue;
        };
        for (i, c) in containers.iter().enumerate() {
            let cpath = format!("{path}.{list}[{i}]");
            let name = c["name"].as_str().unwrap_or_default();
            if name.is_empty() {
                causes.push(format!("{cpath}.name: Required value"));
            } else if !is_dns_label(name) {
                causes.push(format!(
                    "{cpath}.name: Invalid value: \"{name}\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
                ));
            }
            for (j, p) in c["ports"].as_array().into_iter().flatten().enumerate() {
                if let Some(pn) = p["name"].as_str() {
                    if !is_port_name(pn) {
                        causes.push(format!(
                            "{cpath}.ports[{j}].name: Invalid value: \"{pn}\": must be no more than 15 characters, contain only lowercase alphanumerics and '-' and at least one letter"
                        ));
                    }
                }
            }
            for (j, m) in c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let mname = m["name"].as_str().unwrap_or_default();
                if !volumes.contains(&mname) {
                    causes.push(format!(
                        "{cpath}.volumeMounts[{j}].name: Not found: \"{mname}\""
                    ));
                }
            }
        }
    }
}

/// Whether `labels` satisfy a `LabelSelector` (`matchLabels` and `matchExpressions`).
fn selector_matches(selector: &Value, labels: &Value) -> bool {
    let matches_labels = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let matches_exprs = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let have = labels[e["key"].as_str().unwrap_or_default()].as_str();
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match e["operator"].as_str().unwrap_or_default() {
                "In" => have.is_some_and(|h| values.contains(&h)),
                "NotIn" => have.is_none_or(|h| !values.contains(&h)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            }
        });
    matches_labels && matches_exprs
}

/// The semantic checks listed in the module header; 422 naming every failing field.
pub(super) fn check_semantics(key: &Key, obj: &Value) -> Result<(), Reply> {
    let mut causes = Vec::new();
    let name = key.name.as_str();
    let name_ok = match key.plural.as_str() {
        "services" | "namespaces" => is_dns_label(name),
        "roles" | "rolebindings" | "clusterroles" | "clusterrolebindings" => {
            !name.is_empty()
                && !name.contains('/')
                && !name.contains('%')
                && name != "."
                && name != ".."
        }
        _ => is_dns_subdomain(name),
    };
    if !name_ok {
        causes.push(format!(
            "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 {} must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
            if key.plural == "services" { "label" } else { "subdomain" }
        ));
    }
    check_labels(&obj["metadata"]["labels"], "metadata.labels", &mut causes);
    match key.plural.as_str() {
        "deployments" | "statefulsets" | "daemonsets" | "replicasets" => {
            let template = &obj["spec"]["template"];
            check_labels(
                &template["metadata"]["labels"],
                "spec.template.metadata.labels",
                &mut causes,
            );
            let selector = &obj["spec"]["selector"];
            let empty = selector["matchLabels"]
                .as_object()
                .is_none_or(|m| m.is_empty())
                && selector["matchExpressions"]
                    .as_array()
                    .is_none_or(|m| m.is_empty());
            if empty {
                causes.push("spec.selector: Invalid value: \"null\": empty selector is invalid for deployment".to_owned());
            } else if !selector_matches(selector, &template["metadata"]["labels"]) {
                causes.push(format!(
                    "spec.template.metadata.labels: Invalid value: {}: `selector` does not match template `labels`",
                    template["metadata"]["labels"]
                ));
            }
            let claims: Vec<&str> = obj["spec"]["volumeClaimTemplates"]
                .as_array()
                .map(|v| {
                    v.iter()
                        .filter_map(|c| c["metadata"]["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            check_pod_spec(
                &template["spec"],
                &claims,
                "spec.template.spec",
                &mut causes,
            );
        }
        "pods" => check_pod_spec(&obj["spec"], &[], "spec", &mut causes),
        "services" => {
            for (j, p) in obj["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                if let Some(pn) = p["name"].as_str() {
                    if !is_dns_label(pn) {
                        causes.push(format!(
                            "spec.ports[{j}].name: Invalid value: \"{pn}\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'"
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(invalid(key, &causes))
    }
}
