//! Typed validation of the rendered chart objects before `enable` sends any of them.
//!
//! A chart value of the wrong type (`--set agent.nodeSelector.x=true` renders a boolean
//! where Kubernetes wants a string map) renders fine but is refused by the API server —
//! after the Secrets and the objects before it were already written. So every rendered
//! object is first decoded into its `k8s-openapi` type (generated from the Kubernetes
//! OpenAPI schema, so it finds what the server's decoder finds): a wrong type is refused
//! with the path of the field (`serde_path_to_error`), and a field the schema does not
//! declare (the typed form drops it; found by encoding the typed value again and
//! comparing) is refused too, as a server with `fieldValidation=Strict` would.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::DynamicObject;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::error::KubeModeError;
use super::objects::KindInfo;

/// What is wrong with a rendered object: the field path and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SchemaViolation {
    /// Dotted path of the field, e.g. `spec.template.spec.nodeSelector.x`.
    pub path: String,
    /// What the schema wanted.
    pub reason: String,
}

/// Decodes `value` as `T`; a wrong type is reported with its path, a field `T` does not
/// declare as "unknown field".
fn decode<T: DeserializeOwned + Serialize>(value: &Value) -> Result<(), SchemaViolation> {
    let typed: T = serde_path_to_error::deserialize(value).map_err(|e| SchemaViolation {
        path: e.path().to_string(),
        reason: e.inner().to_string(),
    })?;
    let again = serde_json::to_value(&typed).map_err(|e| SchemaViolation {
        path: ".".into(),
        reason: format!("cannot encode the typed object again: {e}"),
    })?;
    match dropped(value, &again, "") {
        Some(path) => Err(SchemaViolation {
            path,
            reason: "unknown field (not declared in the Kubernetes schema)".into(),
        }),
        None => Ok(()),
    }
}

/// The first path present (not null) in `original` but missing from `typed`.
fn dropped(original: &Value, typed: &Value, path: &str) -> Option<String> {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match (original, typed) {
        (Value::Object(o), Value::Object(t)) => o.iter().find_map(|(k, v)| {
            if v.is_null() {
                return None;
            }
            match t.get(k) {
                None => Some(join(k)),
                Some(tv) => dropped(v, tv, &join(k)),
            }
        }),
        (Value::Array(o), Value::Array(t)) => o
            .iter()
            .zip(t)
            .enumerate()
            .find_map(|(i, (v, tv))| dropped(v, tv, &format!("{path}[{i}]"))),
        _ => None,
    }
}

/// Checks one rendered object against the schema of its kind.
pub(crate) fn check_value(kind: &str, value: &Value) -> Result<(), SchemaViolation> {
    match kind {
        "ServiceAccount" => decode::<ServiceAccount>(value),
        "ClusterRole" => decode::<ClusterRole>(value),
        "ClusterRoleBinding" => decode::<ClusterRoleBinding>(value),
        "Role" => decode::<Role>(value),
        "RoleBinding" => decode::<RoleBinding>(value),
        "ConfigMap" => decode::<ConfigMap>(value),
        "Secret" => decode::<Secret>(value),
        "Service" => decode::<Service>(value),
        "Deployment" => decode::<Deployment>(value),
        "StatefulSet" => decode::<StatefulSet>(value),
        "DaemonSet" => decode::<DaemonSet>(value),
        other => Err(SchemaViolation {
            path: "kind".into(),
            reason: format!("{other} has no schema in this CLI"),
        }),
    }
}

/// Checks a rendered chart object before it is sent; the error names the template, the
/// object, the field path, the offending value's type and the way out.
pub(crate) fn check(
    template: &str,
    kind: &KindInfo,
    obj: &DynamicObject,
) -> Result<(), KubeModeError> {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let value = serde_json::to_value(obj).map_err(|e| KubeModeError::BadManifest {
        template: template.to_owned(),
        reason: format!("{} {name} cannot be encoded: {e}", kind.kind),
    })?;
    check_value(kind.kind, &value).map_err(|v| KubeModeError::BadManifest {
        template: template.to_owned(),
        reason: format!(
            "{} {name} field {}: {}; nothing was written — fix the chart value that feeds it (--set/--values; a string that looks like a number or boolean must be quoted, e.g. --set 'KEY=\"true\"')",
            kind.kind, v.path, v.reason
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn daemonset(node_selector: Value) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "a"},
            "spec": {
                "selector": {"matchLabels": {"a": "b"}},
                "template": {
                    "metadata": {"labels": {"a": "b"}},
                    "spec": {"containers": [{"name": "c", "image": "i"}], "nodeSelector": node_selector},
                },
            },
        })
    }

    #[test]
    fn a_boolean_where_a_string_is_wanted_is_named_with_its_path() {
        let e = check_value("DaemonSet", &daemonset(json!({"x": true}))).unwrap_err();
        assert_eq!(e.path, "spec.template.spec.nodeSelector.x");
        assert!(e.reason.contains("boolean `true`"), "{}", e.reason);
        check_value("DaemonSet", &daemonset(json!({"x": "true"}))).unwrap();
    }

    #[test]
    fn an_unknown_field_is_named_with_its_path() {
        let mut ds = daemonset(json!({}));
        ds["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = json!("Always");
        let e = check_value("DaemonSet", &ds).unwrap_err();
        assert_eq!(
            e.path, "spec.template.spec.containers[0].imagePullPolicyy",
            "{e:?}"
        );
        // Nulls are "not set", as for the API server.
        let mut ds = daemonset(json!({}));
        ds["spec"]["template"]["spec"]["tolerations"] = Value::Null;
        check_value("DaemonSet", &ds).unwrap();
    }
}
