//! What clients read before they touch a resource, so real `kubectl` works against the
//! fake: legacy discovery (`/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`; the
//! aggregated form is not served, and client-go falls back to the legacy one when the
//! answer's content type says so), the OpenAPI v3 index and group-version documents
//! (kubectl reads the `fieldValidation` parameter of each kind's PATCH there to decide to
//! validate on the server), a JSON OpenAPI v2 document, and server-side printing
//! (`Accept: …;as=Table;g=meta.k8s.io;v=v1`) with the default columns `Name` and
//! `Created At` that the real server uses for kinds without their own printer.

use serde_json::{json, Value};

use super::{Reply, STATUS_SUBRESOURCE};

/// One served resource: group version path, plural, kind, namespaced, short names.
type Resource = (
    &'static str,
    &'static str,
    &'static str,
    bool,
    &'static [&'static str],
);

/// Every resource discovery lists (the kinds the CLI and the tests use).
const RESOURCES: [Resource; 18] = [
    ("api/v1", "namespaces", "Namespace", false, &["ns"]),
    ("api/v1", "nodes", "Node", false, &["no"]),
    ("api/v1", "configmaps", "ConfigMap", true, &["cm"]),
    ("api/v1", "secrets", "Secret", true, &[]),
    ("api/v1", "services", "Service", true, &["svc"]),
    ("api/v1", "serviceaccounts", "ServiceAccount", true, &["sa"]),
    ("api/v1", "pods", "Pod", true, &["po"]),
    ("api/v1", "endpoints", "Endpoints", true, &["ep"]),
    (
        "api/v1",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        true,
        &["pvc"],
    ),
    (
        "apis/apps/v1",
        "deployments",
        "Deployment",
        true,
        &["deploy"],
    ),
    (
        "apis/apps/v1",
        "statefulsets",
        "StatefulSet",
        true,
        &["sts"],
    ),
    ("apis/apps/v1", "daemonsets", "DaemonSet", true, &["ds"]),
    ("apis/apps/v1", "replicasets", "ReplicaSet", true, &["rs"]),
    ("apis/batch/v1", "jobs", "Job", true, &[]),
    (
        "apis/rbac.authorization.k8s.io/v1",
        "roles",
        "Role",
        true,
        &[],
    ),
    (
        "apis/rbac.authorization.k8s.io/v1",
        "rolebindings",
        "RoleBinding",
        true,
        &[],
    ),
    (
        "apis/rbac.authorization.k8s.io/v1",
        "clusterroles",
        "ClusterRole",
        false,
        &[],
    ),
    (
        "apis/rbac.authorization.k8s.io/v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
        &[],
    ),
];

const GROUP_VERSIONS: [&str; 4] = [
    "api/v1",
    "apis/apps/v1",
    "apis/batch/v1",
    "apis/rbac.authorization.k8s.io/v1",
];

/// `apis/apps/v1` → (`apps`, `v1`); `api/v1` → (``, `v1`).
fn split_gv(gv: &str) -> (&str, &str) {
    match gv.strip_prefix("apis/") {
        Some(rest) => rest.split_once('/').unwrap_or((rest, "")),
        None => ("", gv.strip_prefix("api/").unwrap_or(gv)),
    }
}

fn resource_list(gv: &str) -> Value {
    let mut resources = Vec::new();
    for (g, plural, kind, namespaced, short) in RESOURCES.iter().filter(|r| r.0 == gv) {
        let _ = g;
        resources.push(json!({
            "name": plural,
            "singularName": kind.to_ascii_lowercase(),
            "namespaced": namespaced,
            "kind": kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            "shortNames": short,
        }));
        if STATUS_SUBRESOURCE.contains(plural) {
            resources.push(json!({
                "name": format!("{plural}/status"),
                "singularName": "",
                "namespaced": namespaced,
                "kind": kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if *plural == "pods" {
            resources.push(json!({
                "name": "pods/proxy",
                "singularName": "",
                "namespaced": true,
                "kind": "PodProxyOptions",
                "verbs": ["create", "delete", "get", "patch", "update"],
            }));
        }
    }
    let (group, version) = split_gv(gv);
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    })
}

/// The PATCH operation of one kind in an OpenAPI v3 document: what kubectl's
/// query-parameter verifier looks for.
fn patch_operation(gv: &str, kind: &str) -> Value {
    let (group, version) = split_gv(gv);
    let param = |name: &str, ty: &str| json!({"name": name, "in": "query", "schema": {"type": ty, "uniqueItems": true}});
    json!({
        "operationId": format!("patch{kind}"),
        "x-kubernetes-action": "patch",
        "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": kind},
        "parameters": [
            param("dryRun", "string"),
            param("fieldManager", "string"),
            param("fieldValidation", "string"),
            param("force", "boolean"),
        ],
        "responses": {"200": {"description": "OK"}},
    })
}

/// An OpenAPI v3 document for one group version.
fn openapi_v3(gv: &str) -> Value {
    let mut paths = serde_json::Map::new();
    for (_, plural, kind, namespaced, _) in RESOURCES.iter().filter(|r| r.0 == gv) {
        let base = if *namespaced {
            format!("/{gv}/namespaces/{{namespace}}/{plural}")
        } else {
            format!("/{gv}/{plural}")
        };
        let (group, version) = split_gv(gv);
        let gvk = json!({"group": group, "version": version, "kind": kind});
        paths.insert(
            base.clone(),
            json!({"get": {"operationId": format!("list{kind}"), "x-kubernetes-action": "list", "x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}}}}),
        );
        paths.insert(
            format!("{base}/{{name}}"),
            json!({
                "get": {"operationId": format!("read{kind}"), "x-kubernetes-action": "get", "x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}}},
                "patch": patch_operation(gv, kind),
            }),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.34.0"},
        "paths": paths,
        "components": {"schemas": {}},
    })
}

/// Answers a discovery or OpenAPI path; None when `path` is not one.
pub(super) fn serve(path: &str, host: &str) -> Option<Reply> {
    let path = path.trim_end_matches('/');
    let body = match path {
        "/api" => json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}],
        }),
        "/apis" => {
            let groups: Vec<Value> = GROUP_VERSIONS
                .iter()
                .filter(|gv| gv.starts_with("apis/"))
                .map(|gv| {
                    let (group, version) = split_gv(gv);
                    let v =
                        json!({"groupVersion": format!("{group}/{version}"), "version": version});
                    json!({"name": group, "versions": [v.clone()], "preferredVersion": v})
                })
                .collect();
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        }
        "/openapi/v2" => {
            let mut paths = serde_json::Map::new();
            for gv in GROUP_VERSIONS {
                if let Some(p) = openapi_v3(gv)["paths"].as_object() {
                    paths.extend(p.clone());
                }
            }
            json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.34.0"}, "paths": paths, "definitions": {}})
        }
        "/openapi/v3" => {
            let mut paths = serde_json::Map::new();
            for gv in GROUP_VERSIONS {
                paths.insert(
                    gv.to_owned(),
                    json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash=fake")}),
                );
            }
            json!({"paths": paths})
        }
        other => {
            if let Some(gv) = other.strip_prefix("/openapi/v3/") {
                if !GROUP_VERSIONS.contains(&gv) {
                    return None;
                }
                openapi_v3(gv)
            } else {
                let gv = other.trim_start_matches('/');
                if !GROUP_VERSIONS.contains(&gv) {
                    return None;
                }
                resource_list(gv)
            }
        }
    };
    Some(Reply::json(200, &body))
}

/// Whether the client asked for server-side printing.
pub(super) fn wants_table(accept: &str) -> bool {
    accept.contains("as=Table")
}

/// One table row for `obj` (`include`: `?includeObject=` — `None`, `Metadata`, `Object`).
pub(super) fn table_row(obj: &Value, include: &str) -> Value {
    let object = match include {
        "None" => Value::Null,
        "Object" => obj.clone(),
        _ => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj["metadata"],
        }),
    };
    json!({
        "cells": [obj["metadata"]["name"], obj["metadata"]["creationTimestamp"]],
        "object": object,
    })
}

/// A `meta.k8s.io/v1` Table of `rows`, with the default columns.
pub(super) fn table(rows: Vec<Value>, resource_version: &Value) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": [
            {"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0},
            {"name": "Created At", "type": "date", "format": "", "description": "CreationTimestamp is a timestamp representing the server time when this object was created.", "priority": 0},
        ],
        "rows": rows,
    })
}

/// Turns a successful GET answer (an object or a list) into a Table.
pub(super) fn to_table(reply: Reply, include: &str) -> Reply {
    if reply.status != 200 {
        return reply;
    }
    let Ok(body) = serde_json::from_slice::<Value>(&reply.body) else {
        return reply;
    };
    let out = match body["items"].as_array() {
        Some(items) => table(
            items.iter().map(|o| table_row(o, include)).collect(),
            &body["metadata"]["resourceVersion"],
        ),
        None => table(
            vec![table_row(&body, include)],
            &body["metadata"]["resourceVersion"],
        ),
    };
    Reply::json(200, &out)
}
