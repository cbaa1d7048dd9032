//! The defaults and immutable-field rules of the real API server, for the kinds the CLI
//! writes, so an upgrade that a real cluster refuses is refused here with the same 422.
//!
//! Rules (from `pkg/apis/{core,apps}/validation` in kubernetes/kubernetes):
//!
//! | kind | rule |
//! |---|---|
//! | Secret | `type` is immutable (defaults to `Opaque`); with `immutable: true`, `data`/`stringData` and `immutable` itself are frozen |
//! | ConfigMap | with `immutable: true`, `data`/`binaryData` and `immutable` are frozen |
//! | Service | `spec.clusterIP` may not change once set (an update without it keeps the allocated one, as do ports without `nodePort`) |
//! | StatefulSet | only `replicas`, `template`, `updateStrategy`, `ordinals`, `persistentVolumeClaimRetentionPolicy` and `minReadySeconds` of the spec may change |
//! | Deployment | `spec.selector` is immutable; `strategy.rollingUpdate` is forbidden when `strategy.type` is `Recreate` (the strategy defaults to `RollingUpdate` with 25%/25%, and that default stays in the object until removed) |
//! | DaemonSet | `spec.selector` is immutable |

use serde_json::{json, Value};

use super::validate::invalid;
use super::{Key, Reply};

/// Sets the defaults the real server sets on write, before validation (`SetDefaults_*`).
pub(super) fn apply_defaults(key: &Key, obj: &mut Value) {
    match key.plural.as_str() {
        "secrets" if obj["type"].as_str().unwrap_or_default().is_empty() => {
            obj["type"] = json!("Opaque");
        }
        "deployments" => {
            if !obj["spec"].is_object() {
                return;
            }
            let strategy = &mut obj["spec"]["strategy"];
            if strategy["type"].as_str().unwrap_or_default().is_empty() {
                strategy["type"] = json!("RollingUpdate");
            }
            if strategy["type"] == "RollingUpdate" {
                let ru = &mut strategy["rollingUpdate"];
                if ru["maxUnavailable"].is_null() {
                    ru["maxUnavailable"] = json!("25%");
                }
                if ru["maxSurge"].is_null() {
                    ru["maxSurge"] = json!("25%");
                }
            }
        }
        _ => {}
    }
}

/// Keeps the values the server allocated that an update left out: a Service's
/// `clusterIP`/`clusterIPs` and each port's `nodePort` (`patchAllocatedValues`).
pub(super) fn keep_allocated(key: &Key, old: &Value, new: &mut Value) {
    if key.plural != "services" || !new["spec"].is_object() {
        return;
    }
    if new["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .is_empty()
    {
        if let Some(ip) = old["spec"].get("clusterIP") {
            new["spec"]["clusterIP"] = ip.clone();
        }
        if let Some(ips) = old["spec"].get("clusterIPs") {
            new["spec"]["clusterIPs"] = ips.clone();
        }
    }
    let old_ports = old["spec"]["ports"].as_array().cloned().unwrap_or_default();
    if let Some(ports) = new["spec"]["ports"].as_array_mut() {
        for p in ports {
            if p["nodePort"].as_u64().unwrap_or(0) != 0 {
                continue;
            }
            let same = old_ports
                .iter()
                .find(|o| o["port"] == p["port"] && o["protocol"] == p["protocol"]);
            if let Some(n) = same.and_then(|o| o.get("nodePort")) {
                p["nodePort"] = n.clone();
            }
        }
    }
}

/// Rules that hold for every write (create and update).
pub(super) fn check_object(key: &Key, obj: &Value) -> Result<(), Reply> {
    if key.plural == "deployments"
        && obj["spec"]["strategy"]["type"] == "Recreate"
        && !obj["spec"]["strategy"]["rollingUpdate"].is_null()
    {
        return Err(invalid(
            key,
            &["spec.strategy.rollingUpdate: Forbidden: may not be specified when strategy `type` is 'Recreate'".to_owned()],
        ));
    }
    Ok(())
}

/// StatefulSet spec fields an update may change.
const STATEFULSET_MUTABLE: [&str; 6] = [
    "replicas",
    "template",
    "updateStrategy",
    "ordinals",
    "persistentVolumeClaimRetentionPolicy",
    "minReadySeconds",
];

fn without(v: &Value, fields: &[&str]) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        for f in fields {
            m.remove(*f);
        }
    }
    v
}

/// Rules that compare an update with the stored object: 422 naming the field.
pub(super) fn check_update(key: &Key, old: &Value, new: &Value) -> Result<(), Reply> {
    let mut causes = Vec::new();
    let frozen =
        |field: &str| format!("{field}: Forbidden: field is immutable when `immutable` is set");
    match key.plural.as_str() {
        "secrets" | "configmaps" => {
            if key.plural == "secrets" && old["type"] != new["type"] {
                causes.push(format!(
                    "type: Invalid value: {}: field is immutable",
                    new["type"]
                ));
            }
            if old["immutable"] == json!(true) {
                if new["immutable"] != json!(true) {
                    causes.push(frozen("immutable"));
                }
                let fields: &[&str] = if key.plural == "secrets" {
                    &["data"]
                } else {
                    &["data", "binaryData"]
                };
                for f in fields {
                    if old.get(*f) != new.get(*f) {
                        causes.push(frozen(f));
                    }
                }
            }
        }
        "services" => {
            let (o, n) = (&old["spec"]["clusterIP"], &new["spec"]["clusterIP"]);
            if !o.is_null() && o != n {
                causes.push(format!(
                    "spec.clusterIPs[0]: Invalid value: [{n}]: may not change once set"
                ));
            }
        }
        "statefulsets"
            if without(&old["spec"], &STATEFULSET_MUTABLE)
                != without(&new["spec"], &STATEFULSET_MUTABLE) =>
        {
            causes.push("spec: Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden".to_owned());
        }
        "deployments" | "daemonsets" | "replicasets"
            if old["spec"]["selector"] != new["spec"]["selector"] =>
        {
            causes.push(format!(
                "spec.selector: Invalid value: {}: field is immutable",
                new["spec"]["selector"]
            ));
        }
        _ => {}
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(invalid(key, &causes))
    }
}
