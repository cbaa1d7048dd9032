//! NetworkPolicy and CiliumNetworkPolicy → policy records, and their validation.
//!
//! A policy record carries the object's `spec` as JSON for the cluster's own agents to
//! parse and enforce; the API server does not enforce anything. It still validates every
//! policy with the same parser the agents use ([`clustermesh_api::policy`]), so an
//! operator sees a refused policy named in the API server's log and metrics, where it is
//! written, rather than only on every node. A policy that does not validate is written
//! all the same: each agent refuses it alone and keeps the last good version it had, which
//! a missing record would make it drop.
//!
//! `spec_json` is the object's `spec`, compact JSON (`{}` when the object has none). A
//! CiliumNetworkPolicy may hold several rules in `specs` instead; the L3/L4 subset the
//! agents enforce refuses `specs`, so its record carries the `spec` object with a `specs`
//! member added (the agents' parser then refuses it naming `specs`), never a subset of
//! what the author wrote.

use clustermesh_api::keys::PolicySource;
use clustermesh_api::policy::{
    NetworkPolicy, PeerClusters, PolicyError, PolicyProblem, WireCiliumPolicySpec,
    WireNetworkPolicySpec,
};
use clustermesh_api::v1;
use serde_json::Value;

use super::InputWarning;
use crate::source::PolicyObject;

/// The record of policy `policy` of API `source` in cluster `cluster`, and a
/// [`InputWarning::Policy`] in `warnings` when it does not validate. `None` only for an
/// object without a name.
#[must_use]
pub fn policy_record(
    cluster: &str,
    source: PolicySource,
    policy: &PolicyObject,
    warnings: &mut Vec<InputWarning>,
) -> Option<v1::Policy> {
    let name = policy.metadata.name.clone()?;
    let namespace = policy
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let spec = spec_value(source, policy);
    if let Err(error) = validate(cluster, source, &namespace, &name, policy, &spec) {
        warnings.push(InputWarning::Policy {
            api: source,
            namespace: namespace.clone(),
            name: name.clone(),
            error,
        });
    }
    Some(v1::Policy {
        cluster: cluster.to_owned(),
        namespace,
        name,
        kind: source.to_proto().into(),
        spec_json: spec.to_string(),
    })
}

/// The JSON the record carries: `spec` (`{}` when absent), plus `specs` for a
/// CiliumNetworkPolicy that has it (see the module docs).
fn spec_value(source: PolicySource, policy: &PolicyObject) -> Value {
    let mut spec = match &policy.spec {
        None | Some(Value::Null) => Value::Object(serde_json::Map::new()),
        Some(spec) => spec.clone(),
    };
    if source == PolicySource::CiliumNetworkPolicy {
        if let (Some(specs), Value::Object(map)) = (&policy.specs, &mut spec) {
            if !specs.is_null() {
                map.insert("specs".to_owned(), specs.clone());
            }
        }
    }
    spec
}

/// Parses and validates `spec` as the agents will.
fn validate(
    cluster: &str,
    source: PolicySource,
    namespace: &str,
    name: &str,
    policy: &PolicyObject,
    spec: &Value,
) -> Result<(), PolicyError> {
    let refused = |place: &str, reason: String| PolicyError {
        policy: format!("{} {namespace}/{name}", source.kubernetes_kind()),
        place: place.to_owned(),
        problem: Box::new(PolicyProblem::Invalid(reason)),
    };
    // Either peer scoping validates the same selectors; the agents choose theirs.
    let clusters = PeerClusters::default();
    match source {
        PolicySource::NetworkPolicy => {
            let wire: WireNetworkPolicySpec =
                serde_json::from_value(spec.clone()).map_err(|e| refused("spec", e.to_string()))?;
            NetworkPolicy::from_wire(namespace, name, &wire, cluster, clusters).map(|_| ())
        }
        PolicySource::CiliumNetworkPolicy => {
            if policy.specs.as_ref().is_some_and(|s| !s.is_null()) {
                return Err(refused(
                    "specs",
                    "several rules in `specs` are not supported; write one CiliumNetworkPolicy per rule, each in `spec`".to_owned(),
                ));
            }
            let wire: WireCiliumPolicySpec =
                serde_json::from_value(spec.clone()).map_err(|e| refused("spec", e.to_string()))?;
            NetworkPolicy::from_cilium(namespace, name, &wire, cluster, clusters).map(|_| ())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde_json::json;

    fn object(spec: Option<Value>, specs: Option<Value>) -> PolicyObject {
        PolicyObject {
            metadata: ObjectMeta {
                name: Some("allow".to_owned()),
                namespace: Some("shop".to_owned()),
                ..ObjectMeta::default()
            },
            spec,
            specs,
        }
    }

    #[test]
    fn a_valid_network_policy_carries_its_spec_and_no_warning() {
        let spec = json!({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"from": [{"podSelector": {}}]}]});
        let mut warnings = Vec::new();
        let record = policy_record(
            "c1",
            PolicySource::NetworkPolicy,
            &object(Some(spec.clone()), None),
            &mut warnings,
        )
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(record.cluster, "c1");
        assert_eq!(record.namespace, "shop");
        assert_eq!(record.name, "allow");
        assert_eq!(record.kind, v1::PolicyKind::NetworkPolicy as i32);
        let written: Value = serde_json::from_str(&record.spec_json).unwrap();
        assert_eq!(written, spec);
    }

    #[test]
    fn an_invalid_policy_is_written_with_a_warning_naming_it() {
        let mut warnings = Vec::new();
        let record = policy_record(
            "c1",
            PolicySource::NetworkPolicy,
            &object(Some(json!({"podSelecter": {}})), None),
            &mut warnings,
        );
        assert!(record.is_some());
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].reason(), "policy");
        let text = warnings[0].to_string();
        assert!(
            text.starts_with("NetworkPolicy shop/allow: spec: "),
            "{text}"
        );
        assert!(text.contains("podSelecter"), "{text}");
    }

    #[test]
    fn cilium_specs_are_carried_and_refused() {
        let mut warnings = Vec::new();
        let specs = json!([{"endpointSelector": {}}]);
        let record = policy_record(
            "c1",
            PolicySource::CiliumNetworkPolicy,
            &object(None, Some(specs.clone())),
            &mut warnings,
        )
        .unwrap();
        let written: Value = serde_json::from_str(&record.spec_json).unwrap();
        assert_eq!(written, json!({"specs": specs}));
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0]
                .to_string()
                .contains("CiliumNetworkPolicy shop/allow: specs: "),
            "{}",
            warnings[0]
        );
        // The agents' parser refuses the record too.
        assert!(serde_json::from_str::<WireCiliumPolicySpec>(&record.spec_json).is_err());
    }

    #[test]
    fn a_missing_spec_is_an_empty_object() {
        let mut warnings = Vec::new();
        let record = policy_record(
            "c1",
            PolicySource::NetworkPolicy,
            &object(None, None),
            &mut warnings,
        )
        .unwrap();
        assert_eq!(record.spec_json, "{}");
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn a_cilium_policy_with_an_invalid_selector_is_refused() {
        let mut warnings = Vec::new();
        let spec = json!({"endpointSelector": {"matchLabels": {"bad key!": "x"}}});
        let record = policy_record(
            "c1",
            PolicySource::CiliumNetworkPolicy,
            &object(Some(spec), None),
            &mut warnings,
        );
        assert!(record.is_some());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].to_string().contains("spec.endpointSelector"),
            "{}",
            warnings[0]
        );
    }
}
