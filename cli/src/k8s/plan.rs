//! What `enable` must do around fields a real API server will not change in place.
//!
//! Server-side apply cannot change an immutable field: the API server answers 422, and
//! before this module `enable` found out half-way through its writes. So before the first
//! write, [`make`] compares what `enable` is about to write with what the cluster has and
//! decides, per object:
//!
//! | object and change | what `enable` does |
//! |---|---|
//! | a Secret the CLI owns whose `type` differs (e.g. `Opaque` from the plain-Helm path) or that is `immutable` | deletes it and writes it again (its content is reissued anyway) |
//! | the CA Secret `clustermesh-ca` with another type or `immutable` | refuses: deleting it could lose the CA; the message says how to recreate it by hand |
//! | StatefulSet `volumeClaimTemplates`, `serviceName`, `podManagementPolicy` (any spec field but replicas/template/updateStrategy/ordinals/persistentVolumeClaimRetentionPolicy/minReadySeconds) | deletes the StatefulSet with `propagationPolicy=Orphan` (its pods and PVCs keep running), waits until it is gone, and applies the new one, which adopts the pods and rolls them; existing PVCs keep their size (a new size applies to new PVCs only) |
//! | Deployment switched to `strategy.type: Recreate` while the server holds a defaulted `rollingUpdate` | removes `rollingUpdate` with a merge patch first (a real server refuses `Recreate` with `rollingUpdate`) |
//! | a workload's `spec.selector` (another Helm release installed it) or a Service's `clusterIP` | refuses, naming the object, the field and the `kubectl delete` to run first |

use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use serde_json::{json, Value};

use super::error::KubeModeError;
use super::objects::{is_not_found, KindInfo, Objects, CA_SECRET, FIELD_MANAGER};
use super::KubeTarget;

/// StatefulSet spec fields a real API server lets an update change.
const STATEFULSET_MUTABLE: [&str; 6] = [
    "replicas",
    "template",
    "updateStrategy",
    "ordinals",
    "persistentVolumeClaimRetentionPolicy",
    "minReadySeconds",
];

/// How long `enable` waits for an orphan-deleted StatefulSet to disappear.
const ORPHAN_DELETE_WAIT: Duration = Duration::from_secs(60);

/// The extra steps `enable` takes so that no write is refused for an immutable field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Secrets to delete right before they are written again.
    pub recreate_secrets: Vec<String>,
    /// StatefulSets to delete with `propagationPolicy=Orphan` before they are applied.
    pub orphan_statefulsets: Vec<String>,
    /// Deployments whose `spec.strategy.rollingUpdate` is removed before they are applied.
    pub strategy_resets: Vec<String>,
}

impl Plan {
    /// Human-readable steps, `Kind/name: what`, for the report and the log.
    pub(crate) fn steps(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.recreate_secrets {
            out.push(format!("Secret/{s}: recreated (type or immutable changed)"));
        }
        for s in &self.orphan_statefulsets {
            out.push(format!(
                "StatefulSet/{s}: recreated, pods and volumes kept (immutable spec field changed)"
            ));
        }
        for s in &self.strategy_resets {
            out.push(format!(
                "Deployment/{s}: strategy.rollingUpdate removed for strategy Recreate"
            ));
        }
        out
    }
}

/// True when every non-null field of `rendered` has the same value in `existing` (the
/// server adds defaults, so equality would be too strict).
fn covers(existing: &Value, rendered: &Value) -> bool {
    match (existing, rendered) {
        (_, Value::Null) => true,
        (Value::Object(e), Value::Object(r)) => r
            .iter()
            .all(|(k, v)| covers(e.get(k).unwrap_or(&Value::Null), v)),
        (Value::Array(e), Value::Array(r)) => {
            e.len() == r.len() && e.iter().zip(r).all(|(a, b)| covers(a, b))
        }
        (e, r) => e == r,
    }
}

fn non_empty(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    }
}

/// Spec fields of a StatefulSet that the rendered one changes and a server refuses to.
fn statefulset_changes(existing: &Value, rendered: &Value) -> Vec<String> {
    let (e, r) = (&existing["spec"], &rendered["spec"]);
    let mut fields: Vec<String> = r
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| !STATEFULSET_MUTABLE.contains(&k.as_str()))
        .filter(|(k, v)| !covers(&e[k.as_str()], v))
        .map(|(k, _)| format!("spec.{k}"))
        .collect();
    if r["volumeClaimTemplates"].is_null() && non_empty(&e["volumeClaimTemplates"]) {
        fields.push("spec.volumeClaimTemplates".into());
    }
    fields
}

fn refuse(
    target: &KubeTarget,
    what: &str,
    field: &str,
    detail: &str,
    way_out: &str,
) -> KubeModeError {
    KubeModeError::Invalid(format!(
        "{what} in namespace {ns} of context {ctx}: {field} {detail}, and a Kubernetes API server does not change that field in place; nothing was written — {way_out}",
        ns = target.namespace,
        ctx = target.context,
    ))
}

fn kubectl(target: &KubeTarget, args: &str) -> String {
    format!(
        "`kubectl --context {} -n {} {args}`",
        target.context, target.namespace
    )
}

async fn get<K>(
    objs: &Objects<'_>,
    target: &KubeTarget,
    kind: &str,
    name: &str,
) -> Result<Option<Value>, KubeModeError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(target.client.clone(), &target.namespace);
    match api.get_opt(name).await {
        Ok(Some(obj)) => Ok(Some(serde_json::to_value(obj).map_err(|e| {
            objs.malformed(
                format!("{kind} {name}"),
                e.to_string(),
                "check it with kubectl",
            )
        })?)),
        Ok(None) => Ok(None),
        Err(e) => Err(objs.api_error("get", format!("{kind} {name}"), &e)),
    }
}

/// Compares the Secrets and chart objects `enable` is about to write with the cluster's
/// and returns the extra steps, or refuses (before any write) with one line naming the
/// object, the field and the way out.
pub(crate) async fn make(
    objs: &Objects<'_>,
    target: &KubeTarget,
    secrets: &[Secret],
    objects: &[(&'static KindInfo, DynamicObject)],
) -> Result<Plan, KubeModeError> {
    let mut plan = Plan::default();
    for desired in secrets {
        let name = desired.metadata.name.clone().unwrap_or_default();
        let Some(existing) = objs.secret(&name).await? else {
            continue;
        };
        let old_type = existing.type_.as_deref().unwrap_or("Opaque");
        let new_type = desired.type_.as_deref().unwrap_or("Opaque");
        let immutable = existing.immutable == Some(true);
        if old_type == new_type && !immutable {
            continue;
        }
        if name == CA_SECRET {
            let detail = if immutable {
                "is immutable".to_owned()
            } else {
                format!("is {old_type}, enable writes {new_type}")
            };
            return Err(refuse(
                target,
                &format!("Secret {name}"),
                if immutable { "immutable" } else { "type" },
                &detail,
                &format!(
                    "the CLI does not delete the CA Secret itself; save it ({}), recreate it as {new_type} with the same tls.crt/tls.key/ca.crt, then run enable again",
                    kubectl(target, &format!("get secret {name} -o yaml > ca-backup.yaml"))
                ),
            ));
        }
        tracing::info!(secret = %name, old_type, new_type, immutable, "Secret will be recreated");
        plan.recreate_secrets.push(name);
    }
    for (kind, obj) in objects {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let rendered = serde_json::to_value(obj).map_err(|e| KubeModeError::BadManifest {
            template: format!("{} {name}", kind.kind),
            reason: e.to_string(),
        })?;
        let existing = match kind.kind {
            "StatefulSet" => get::<StatefulSet>(objs, target, kind.kind, &name).await?,
            "Deployment" => get::<Deployment>(objs, target, kind.kind, &name).await?,
            "DaemonSet" => get::<DaemonSet>(objs, target, kind.kind, &name).await?,
            "Service" => get::<Service>(objs, target, kind.kind, &name).await?,
            _ => None,
        };
        let Some(existing) = existing else { continue };
        let what = format!("{} {name}", kind.kind);
        let delete_first = kubectl(
            target,
            &format!("delete {} {name}", kind.kind.to_lowercase()),
        );
        if matches!(kind.kind, "StatefulSet" | "Deployment" | "DaemonSet")
            && !covers(&existing["spec"]["selector"], &rendered["spec"]["selector"])
        {
            return Err(refuse(
                target,
                &what,
                "spec.selector",
                &format!(
                    "is {}, the chart renders {} (installed by another release?)",
                    existing["spec"]["selector"], rendered["spec"]["selector"]
                ),
                &format!("delete it first ({delete_first}; its pods stop) and run enable again"),
            ));
        }
        match kind.kind {
            "StatefulSet" => {
                let changes = statefulset_changes(&existing, &rendered);
                if !changes.is_empty() {
                    tracing::info!(statefulset = %name, fields = %changes.join(","), "StatefulSet will be recreated, pods orphaned and adopted");
                    plan.orphan_statefulsets.push(name);
                }
            }
            "Deployment"
                if rendered["spec"]["strategy"]["type"] == "Recreate"
                    && !existing["spec"]["strategy"]["rollingUpdate"].is_null() =>
            {
                plan.strategy_resets.push(name);
            }
            "Service" => {
                let want = &rendered["spec"]["clusterIP"];
                let have = &existing["spec"]["clusterIP"];
                if !want.is_null() && !have.is_null() && want != have {
                    return Err(refuse(
                        target,
                        &what,
                        "spec.clusterIP",
                        &format!("is {have}, the chart renders {want}"),
                        &format!("delete it first ({delete_first}) and run enable again"),
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(plan)
}

/// Deletes a Secret the plan recreates (right before it is written again).
pub(crate) async fn delete_secret(objs: &Objects<'_>, name: &str) -> Result<(), KubeModeError> {
    objs.delete::<Secret>("Secret", name).await.map(|_| ())
}

/// Removes a Deployment's `spec.strategy.rollingUpdate` (merge patch), so that applying
/// `strategy.type: Recreate` is valid.
pub(crate) async fn reset_strategy(
    objs: &Objects<'_>,
    target: &KubeTarget,
    name: &str,
) -> Result<(), KubeModeError> {
    let api: Api<Deployment> = Api::namespaced(target.client.clone(), &target.namespace);
    let patch = json!({"spec": {"strategy": {"type": "Recreate", "rollingUpdate": null}}});
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    api.patch(name, &params, &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(|e| objs.api_error("patch", format!("Deployment {name}"), &e))
}

/// Deletes a StatefulSet with `propagationPolicy=Orphan` (its pods and PVCs stay) and
/// waits until the API server no longer has it, so the apply that follows creates a new
/// one instead of updating the one being deleted.
pub(crate) async fn orphan_statefulset(
    objs: &Objects<'_>,
    target: &KubeTarget,
    name: &str,
) -> Result<(), KubeModeError> {
    let api: Api<StatefulSet> = Api::namespaced(target.client.clone(), &target.namespace);
    let what = || format!("StatefulSet {name}");
    match api.delete(name, &DeleteParams::orphan()).await {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => return Ok(()),
        Err(e) => return Err(objs.api_error("delete", what(), &e)),
    }
    let deadline = tokio::time::Instant::now() + ORPHAN_DELETE_WAIT;
    loop {
        match api.get_opt(name).await {
            Ok(None) => return Ok(()),
            Ok(Some(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(Some(_)) => {
                return Err(KubeModeError::Invalid(format!(
                    "StatefulSet {name} in namespace {} of context {} was deleted (pods orphaned) but is still there after {}s; check its finalizers, then run enable again",
                    target.namespace,
                    target.context,
                    ORPHAN_DELETE_WAIT.as_secs()
                )))
            }
            Err(e) => return Err(objs.api_error("get", what(), &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_added_by_the_server_are_no_change() {
        let existing = json!({"spec": {
            "podManagementPolicy": "Parallel", "revisionHistoryLimit": 10,
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"volumeMode": "Filesystem", "resources": {"requests": {"storage": "1Gi"}}}, "status": {"phase": "Pending"}}],
        }});
        let same = json!({"spec": {
            "podManagementPolicy": "Parallel",
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"resources": {"requests": {"storage": "1Gi"}}}}],
        }});
        assert!(statefulset_changes(&existing, &same).is_empty());
        let bigger = json!({"spec": {
            "podManagementPolicy": "Parallel", "replicas": 5,
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"resources": {"requests": {"storage": "2Gi"}}}}],
        }});
        assert_eq!(
            statefulset_changes(&existing, &bigger),
            vec!["spec.volumeClaimTemplates"]
        );
        let none = json!({"spec": {"podManagementPolicy": "Parallel"}});
        assert_eq!(
            statefulset_changes(&existing, &none),
            vec!["spec.volumeClaimTemplates"]
        );
    }
}
