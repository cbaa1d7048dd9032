//! The Kubernetes objects the mesh is made of, and small typed helpers to read and write
//! them with errors that name the object, namespace and context.
//!
//! Objects the CLI owns besides the chart's:
//!
//! | object                                | content |
//! |---------------------------------------|---------|
//! | Secret `clustermesh-ca`               | the cluster's CA: `tls.crt`, `tls.key`, `ca.crt` |
//! | Secret `clustermesh-apiserver-server` | mesh API server leaf (`kubernetes.io/tls` + `ca.crt`) |
//! | Secret `clustermesh-apiserver-admin`  | admin client leaf for the CLI |
//! | Secret `clustermesh-agent-client`     | agents' leaf (`cluster/<c>/agent`); `ca.crt` is this cluster's CA |
//! | Secret `clustermesh-apiserver-replicas` | store replica leaves `replica-<n>.crt`/`.key` (`cluster/<c>/replica/<n>`) |
//! | Secret `clustermesh-ca-bundle`        | `ca-bundle.crt`: CAs the mesh API server trusts, each labelled with its cluster |
//! | ConfigMap `clustermesh-config`        | cluster name, ID, trust domain, service type, chart value overrides (`values.yaml`) |
//!
//! The leaf and bundle Secret names are the chart's `tls.*` value defaults (a unit test
//! checks they agree).

use std::collections::BTreeMap;
use std::fmt::Debug;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::KubeModeError;
use super::KubeTarget;

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "clustermesh";
/// Helm-style release name the chart is rendered with.
pub const RELEASE_NAME: &str = "clustermesh";
/// Secret with the cluster's CA certificate and key.
pub const CA_SECRET: &str = "clustermesh-ca";
/// Secret with the mesh API server's leaf (chart value `tls.serverSecret`).
pub const SERVER_SECRET: &str = "clustermesh-apiserver-server";
/// Secret with the admin client leaf (chart value `tls.adminSecret`).
pub const ADMIN_SECRET: &str = "clustermesh-apiserver-admin";
/// Secret with the agents' client leaf (chart value `tls.clientSecret`).
pub const CLIENT_SECRET: &str = "clustermesh-agent-client";
/// Secret with the store replicas' leaves `replica-<n>.crt`/`.key` (chart value
/// `tls.replicaSecret`).
pub const REPLICA_SECRET: &str = "clustermesh-apiserver-replicas";
/// Raft IDs a replica certificate is issued for: 0..=4 for the StatefulSet's pod indexes
/// (up to 5 replicas), and 1, the single replica's default ID.
pub const REPLICA_IDS: std::ops::RangeInclusive<u64> = 0..=4;
/// Key of replica `n`'s certificate in [`REPLICA_SECRET`].
#[must_use]
pub fn replica_cert_key(n: u64) -> String {
    format!("replica-{n}.crt")
}
/// Key of replica `n`'s private key in [`REPLICA_SECRET`].
#[must_use]
pub fn replica_key_key(n: u64) -> String {
    format!("replica-{n}.key")
}
/// Secret with the trusted CA bundle (chart value `tls.caBundleSecret`).
pub const CA_BUNDLE_SECRET: &str = "clustermesh-ca-bundle";
/// Key of the bundle in [`CA_BUNDLE_SECRET`].
pub const CA_BUNDLE_KEY: &str = "ca-bundle.crt";
/// ConfigMap with the cluster's mesh settings; its presence means "enabled".
pub const CONFIG_MAP: &str = "clustermesh-config";
/// The chart's agent configuration ConfigMap.
pub const AGENT_CONFIG_MAP: &str = "clustermesh-agent-config";
/// Key of the agent configuration in [`AGENT_CONFIG_MAP`].
pub const AGENT_CONFIG_KEY: &str = "agent.yaml";
/// The chart's mesh API Service.
pub const APISERVER_SERVICE: &str = "clustermesh-apiserver";
/// Label every mesh object carries (chart and CLI).
pub const PART_OF_LABEL: &str = "app.kubernetes.io/part-of";
/// Label naming the mesh cluster an object belongs to.
pub const CLUSTER_LABEL: &str = "clustermesh.io/cluster";

/// Key of a remote cluster's CA in [`AGENT_CONFIG_MAP`] (the chart mounts it as
/// `/etc/clustermesh/agent/<name>-ca.crt`).
#[must_use]
pub fn remote_ca_key(cluster: &str) -> String {
    format!("{cluster}-ca.crt")
}

/// How other clusters reach this cluster's mesh API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
pub enum ServiceType {
    /// A cloud load balancer address (`status.loadBalancer.ingress`).
    #[value(name = "LoadBalancer")]
    LoadBalancer,
    /// A node's InternalIP and the Service's node port.
    #[value(name = "NodePort")]
    NodePort,
}

impl ServiceType {
    /// The Kubernetes `spec.type` value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LoadBalancer => "LoadBalancer",
            Self::NodePort => "NodePort",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "LoadBalancer" => Some(Self::LoadBalancer),
            "NodePort" => Some(Self::NodePort),
            _ => None,
        }
    }
}

/// The cluster's mesh settings, stored in [`CONFIG_MAP`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MeshConfig {
    /// Cluster name.
    pub name: String,
    /// Cluster ID.
    pub id: u32,
    /// 255 or 511.
    pub max_connected_clusters: u32,
    /// Trust domain of the identities.
    pub trust_domain: String,
    /// Type of the mesh API Service.
    pub service_type: ServiceType,
    /// The user's chart value overrides (`enable --set/--values`), a map; `{}` for none.
    pub values: serde_json::Value,
}

impl MeshConfig {
    /// The ConfigMap `data`.
    #[must_use]
    pub fn to_data(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("cluster-name".to_string(), self.name.clone()),
            ("cluster-id".to_string(), self.id.to_string()),
            (
                "max-connected-clusters".to_string(),
                self.max_connected_clusters.to_string(),
            ),
            ("trust-domain".to_string(), self.trust_domain.clone()),
            (
                "service-type".to_string(),
                self.service_type.as_str().to_string(),
            ),
            (
                super::values::VALUES_KEY.to_string(),
                clustermesh_api::yaml::to_string(&self.values)
                    .unwrap_or_else(|_| "{}\n".to_string()),
            ),
        ])
    }

    /// Reads the ConfigMap `data`; the error says which key is missing or wrong.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, String> {
        let get = |k: &str| {
            data.get(k)
                .map(|v| v.trim().to_string())
                .ok_or_else(|| format!("key {k} is missing"))
        };
        let number = |k: &str| -> Result<u32, String> {
            let v = get(k)?;
            v.parse()
                .map_err(|_| format!("key {k} is {v:?}, not a number"))
        };
        let service = get("service-type")?;
        // Clusters enabled before overrides were stored have no such key.
        let values = match data.get(super::values::VALUES_KEY) {
            Some(text) => super::values::parse_values_text(
                &format!("key {}", super::values::VALUES_KEY),
                text,
            )
            .map_err(|e| e.to_string())?,
            None => serde_json::Value::Object(serde_json::Map::new()),
        };
        Ok(Self {
            name: get("cluster-name")?,
            id: number("cluster-id")?,
            max_connected_clusters: number("max-connected-clusters")?,
            trust_domain: get("trust-domain")?,
            service_type: ServiceType::parse(&service).ok_or_else(|| {
                format!("key service-type is {service:?}, not LoadBalancer or NodePort")
            })?,
            values,
        })
    }
}

/// Labels of the objects the CLI creates itself (the chart's objects carry the chart's).
#[must_use]
pub fn cli_labels(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (PART_OF_LABEL.to_string(), "clustermesh".to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "clustermesh-cli".to_string(),
        ),
        (CLUSTER_LABEL.to_string(), cluster.to_string()),
    ])
}

/// A Kubernetes API failure as one line: the API server's message, or the transport error.
#[must_use]
pub fn reason(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => {
            let mut msg = status.message.trim().to_string();
            if msg.is_empty() {
                msg = "no message".into();
            }
            if status.reason.is_empty() {
                format!("{msg} (HTTP {})", status.code)
            } else {
                format!("{msg} ({}, HTTP {})", status.reason, status.code)
            }
        }
        other => super::context::error_chain(other),
    }
}

/// Whether the API server answered 404 Not Found.
pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// A context, its namespace and the typed APIs the verbs use.
#[derive(Debug, Clone)]
pub struct Objects<'a> {
    target: &'a KubeTarget,
}

impl<'a> Objects<'a> {
    /// Operates on `target`'s namespace.
    #[must_use]
    pub fn new(target: &'a KubeTarget) -> Self {
        Self { target }
    }

    /// The context name.
    #[must_use]
    pub fn context(&self) -> &str {
        &self.target.context
    }

    /// The namespace.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.target.namespace
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.target.client.clone(), &self.target.namespace)
    }

    /// An API error naming `object` and this context.
    #[must_use]
    pub fn api_error(
        &self,
        action: &'static str,
        object: String,
        e: &kube::Error,
    ) -> KubeModeError {
        KubeModeError::Api {
            context: self.target.context.clone(),
            namespace: self.target.namespace.clone(),
            action,
            object,
            reason: reason(e),
        }
    }

    /// "not enabled" naming the missing object.
    #[must_use]
    pub fn not_enabled(&self, missing: String) -> KubeModeError {
        KubeModeError::NotEnabled {
            context: self.target.context.clone(),
            namespace: self.target.namespace.clone(),
            missing,
        }
    }

    /// "malformed" naming the object.
    #[must_use]
    pub fn malformed(&self, object: String, reason: String, fix: &'static str) -> KubeModeError {
        KubeModeError::Malformed {
            context: self.target.context.clone(),
            namespace: self.target.namespace.clone(),
            object,
            reason,
            fix,
        }
    }

    async fn get_opt<K>(&self, kind: &str, name: &str) -> Result<Option<K>, KubeModeError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        match self.api::<K>().get(name).await {
            Ok(o) => Ok(Some(o)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.api_error("read", format!("{kind} {name}"), &e)),
        }
    }

    /// Secret `name`, if it exists.
    pub async fn secret(&self, name: &str) -> Result<Option<Secret>, KubeModeError> {
        self.get_opt("Secret", name).await
    }

    /// ConfigMap `name`, if it exists.
    pub async fn config_map(&self, name: &str) -> Result<Option<ConfigMap>, KubeModeError> {
        self.get_opt("ConfigMap", name).await
    }

    /// Service `name`, if it exists.
    pub async fn service(&self, name: &str) -> Result<Option<Service>, KubeModeError> {
        self.get_opt("Service", name).await
    }

    /// Whether this namespace exists.
    pub async fn namespace_exists(&self) -> Result<bool, KubeModeError> {
        let api: Api<Namespace> = Api::all(self.target.client.clone());
        match api.get(&self.target.namespace).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(KubeModeError::Api {
                context: self.target.context.clone(),
                namespace: "-".into(),
                action: "read",
                object: format!("Namespace {}", self.target.namespace),
                reason: reason(&e),
            }),
        }
    }

    /// Every Node of the cluster.
    pub async fn nodes(&self) -> Result<Vec<Node>, KubeModeError> {
        let api: Api<Node> = Api::all(self.target.client.clone());
        api.list(&ListParams::default())
            .await
            .map(|l| l.items)
            .map_err(|e| KubeModeError::Api {
                context: self.target.context.clone(),
                namespace: "-".into(),
                action: "list",
                object: "Nodes".into(),
                reason: reason(&e),
            })
    }

    /// Server-side applies `obj` (typed, namespaced) with [`FIELD_MANAGER`], forcing
    /// ownership of conflicting fields.
    pub async fn apply<K>(&self, kind: &str, obj: &K) -> Result<K, KubeModeError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + Serialize
            + DeserializeOwned
            + Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        let name = obj.meta().name.clone().unwrap_or_default();
        self.api::<K>()
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(obj),
            )
            .await
            .map_err(|e| self.api_error("apply", format!("{kind} {name}"), &e))
    }

    /// Replaces `obj` guarded by its `metadata.resourceVersion` (a concurrent change makes
    /// the API server answer 409 Conflict); returns the stored object.
    pub async fn replace<K>(&self, kind: &str, obj: &K) -> Result<K, KubeModeError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + Serialize
            + DeserializeOwned
            + Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        let name = obj.meta().name.clone().unwrap_or_default();
        self.api::<K>()
            .replace(&name, &PostParams::default(), obj)
            .await
            .map_err(|e| self.api_error("replace", format!("{kind} {name}"), &e))
    }

    /// Deletes a typed object; a missing one is not an error. Returns whether it existed.
    pub async fn delete<K>(&self, kind: &str, name: &str) -> Result<bool, KubeModeError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        match self.api::<K>().delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(self.api_error("delete", format!("{kind} {name}"), &e)),
        }
    }

    fn dynamic_api(&self, kind: &KindInfo) -> Api<DynamicObject> {
        let (group, version) = match kind.api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", kind.api_version),
        };
        let gvk = GroupVersionKind::gvk(group, version, kind.kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, kind.plural);
        if kind.namespaced {
            Api::namespaced_with(self.target.client.clone(), &self.target.namespace, &ar)
        } else {
            Api::all_with(self.target.client.clone(), &ar)
        }
    }

    fn scope(&self, kind: &KindInfo) -> String {
        if kind.namespaced {
            self.target.namespace.clone()
        } else {
            "-".into()
        }
    }

    /// Server-side applies a rendered chart object (its kind must be in [`KINDS`]).
    pub async fn apply_dynamic(
        &self,
        kind: &KindInfo,
        obj: &DynamicObject,
    ) -> Result<(), KubeModeError> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        self.dynamic_api(kind)
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(obj),
            )
            .await
            .map(|_| ())
            .map_err(|e| KubeModeError::Api {
                context: self.target.context.clone(),
                namespace: self.scope(kind),
                action: "apply",
                object: format!("{} {name}", kind.kind),
                reason: reason(&e),
            })
    }

    /// Deletes every object of `kind` carrying all `labels` (namespaced kinds: in this
    /// namespace) except those named in `keep`. Returns the names deleted.
    pub async fn delete_labelled(
        &self,
        kind: &KindInfo,
        labels: &BTreeMap<String, String>,
        keep: &[&str],
    ) -> Result<Vec<String>, KubeModeError> {
        self.delete_labelled_if(kind, labels, |name| !keep.contains(&name))
            .await
    }

    /// Deletes every object of `kind` carrying all `labels` (namespaced kinds: in this
    /// namespace) whose name `delete` accepts. Returns the names deleted.
    pub async fn delete_labelled_if(
        &self,
        kind: &KindInfo,
        labels: &BTreeMap<String, String>,
        delete: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, KubeModeError> {
        let api = self.dynamic_api(kind);
        let selector: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let err = |action: &'static str, object: String, e: &kube::Error| KubeModeError::Api {
            context: self.target.context.clone(),
            namespace: self.scope(kind),
            action,
            object,
            reason: reason(e),
        };
        let list = api
            .list(&ListParams::default().labels(&selector.join(",")))
            .await
            .map_err(|e| err("list", format!("{} objects", kind.kind), &e))?;
        let mut deleted = Vec::new();
        for item in list.items {
            let Some(name) = item.metadata.name else {
                continue;
            };
            if !delete(&name) {
                continue;
            }
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => deleted.push(name),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(err("delete", format!("{} {name}", kind.kind), &e)),
            }
        }
        Ok(deleted)
    }
}

/// How to reach one kind of object through the API (no discovery needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    /// `apiVersion`, e.g. `apps/v1`.
    pub api_version: &'static str,
    /// `kind`.
    pub kind: &'static str,
    /// Resource plural in URLs.
    pub plural: &'static str,
    /// Namespaced (true) or cluster-scoped.
    pub namespaced: bool,
}

/// Every kind the chart renders (and `disable` removes), in apply order: identities and
/// configuration before the workloads that use them.
pub const KINDS: &[KindInfo] = &[
    KindInfo {
        api_version: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        namespaced: true,
    },
    KindInfo {
        api_version: "rbac.authorization.k8s.io/v1",
        kind: "ClusterRole",
        plural: "clusterroles",
        namespaced: false,
    },
    KindInfo {
        api_version: "rbac.authorization.k8s.io/v1",
        kind: "ClusterRoleBinding",
        plural: "clusterrolebindings",
        namespaced: false,
    },
    KindInfo {
        api_version: "rbac.authorization.k8s.io/v1",
        kind: "Role",
        plural: "roles",
        namespaced: true,
    },
    KindInfo {
        api_version: "rbac.authorization.k8s.io/v1",
        kind: "RoleBinding",
        plural: "rolebindings",
        namespaced: true,
    },
    KindInfo {
        api_version: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
        namespaced: true,
    },
    KindInfo {
        api_version: "v1",
        kind: "Secret",
        plural: "secrets",
        namespaced: true,
    },
    KindInfo {
        api_version: "v1",
        kind: "Service",
        plural: "services",
        namespaced: true,
    },
    KindInfo {
        api_version: "apps/v1",
        kind: "Deployment",
        plural: "deployments",
        namespaced: true,
    },
    KindInfo {
        api_version: "apps/v1",
        kind: "StatefulSet",
        plural: "statefulsets",
        namespaced: true,
    },
    KindInfo {
        api_version: "apps/v1",
        kind: "DaemonSet",
        plural: "daemonsets",
        namespaced: true,
    },
];

/// The [`KindInfo`] of `apiVersion`/`kind`.
#[must_use]
pub fn kind_info(api_version: &str, kind: &str) -> Option<&'static KindInfo> {
    KINDS
        .iter()
        .find(|k| k.api_version == api_version && k.kind == kind)
}

/// Text value of `key` in a Secret (`data`, or `stringData` as written by hand).
#[must_use]
pub fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(v.0.clone()).ok();
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .cloned()
}

/// A Secret with text `data`, the CLI's labels and `type`.
#[must_use]
pub fn new_secret(
    name: &str,
    namespace: &str,
    cluster: &str,
    type_: &str,
    data: &[(&str, &str)],
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(cli_labels(cluster)),
            ..ObjectMeta::default()
        },
        type_: Some(type_.to_string()),
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// Replaces one text key of a Secret's `data` (keeps everything else, metadata included).
pub fn set_secret_text(secret: &mut Secret, key: &str, value: &str) {
    secret
        .data
        .get_or_insert_with(BTreeMap::new)
        .insert(key.to_string(), ByteString(value.as_bytes().to_vec()));
    if let Some(sd) = secret.string_data.as_mut() {
        sd.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_are_the_chart_defaults() {
        let chart = super::super::embedded::chart().unwrap();
        let tls = &chart.default_values()["tls"];
        assert_eq!(tls["serverSecret"], SERVER_SECRET);
        assert_eq!(tls["adminSecret"], ADMIN_SECRET);
        assert_eq!(tls["clientSecret"], CLIENT_SECRET);
        assert_eq!(tls["caBundleSecret"], CA_BUNDLE_SECRET);
        assert_eq!(tls["replicaSecret"], REPLICA_SECRET);
    }

    #[test]
    fn every_rendered_kind_is_known() {
        let chart = super::super::embedded::chart().unwrap();
        let release = crate::chart::Release {
            name: RELEASE_NAME.into(),
            namespace: "ns".into(),
        };
        for values in [
            serde_json::json!({"cluster": {"name": "a", "id": 1}}),
            serde_json::json!({"cluster": {"name": "a", "id": 1}, "apiserver": {"replicas": 3}}),
        ] {
            for (template, doc) in chart.render_documents(&release, &values).unwrap() {
                let v: serde_json::Value = clustermesh_api::yaml::from_str(&doc).unwrap();
                let (av, kind) = (
                    v["apiVersion"].as_str().unwrap(),
                    v["kind"].as_str().unwrap(),
                );
                assert!(kind_info(av, kind).is_some(), "{template}: {av} {kind}");
            }
        }
    }

    #[test]
    fn mesh_config_round_trips_and_names_bad_keys() {
        let c = MeshConfig {
            name: "east".into(),
            id: 7,
            max_connected_clusters: 255,
            trust_domain: "mesh.test".into(),
            service_type: ServiceType::NodePort,
            values: serde_json::json!({"image": {"tag": "dev"}}),
        };
        assert_eq!(MeshConfig::from_data(&c.to_data()).unwrap(), c);
        let mut old = c.to_data();
        old.remove(super::super::values::VALUES_KEY);
        assert_eq!(
            MeshConfig::from_data(&old).unwrap().values,
            serde_json::json!({})
        );
        let mut bad = c.to_data();
        bad.insert("cluster-id".into(), "seven".into());
        assert_eq!(
            MeshConfig::from_data(&bad).unwrap_err(),
            "key cluster-id is \"seven\", not a number"
        );
        bad.remove("trust-domain");
        assert!(MeshConfig::from_data(&bad).is_err());
    }
}
