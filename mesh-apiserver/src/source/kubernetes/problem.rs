//! What a failed list or watch means, and what the operator should do about it.
//!
//! kube's watcher retries every failure by itself (with backoff), so the source never
//! gives up on a kind; its job is to say, for each failure, which kind failed and what
//! would fix it: an RBAC rule, credentials, an API the cluster does not serve, a
//! malformed response, or just a connection problem that will pass. The raw kube error
//! (`ApiError: ... (Status { .. })`) says none of that.

use kube::core::Status;
use kube::runtime::watcher;

use crate::source::ObjectKind;

/// The request that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// The initial (or re-)list.
    List,
    /// The watch that follows a list.
    Watch,
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verb::List => "listing",
            Verb::Watch => "watching",
        })
    }
}

/// The Kubernetes resource behind an [`ObjectKind`], for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource {
    /// Plural resource name (`endpointslices`).
    pub plural: &'static str,
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// Group and version as in `apiVersion`.
    pub api_version: &'static str,
}

impl Resource {
    /// The resource a kind is read from.
    #[must_use]
    pub fn of(kind: ObjectKind) -> Self {
        let (plural, group, api_version) = match kind {
            ObjectKind::Service => ("services", "", "v1"),
            ObjectKind::EndpointSlice => {
                ("endpointslices", "discovery.k8s.io", "discovery.k8s.io/v1")
            }
            ObjectKind::Node => ("nodes", "", "v1"),
            ObjectKind::Pod => ("pods", "", "v1"),
            ObjectKind::Namespace => ("namespaces", "", "v1"),
            ObjectKind::NetworkPolicy => (
                "networkpolicies",
                "networking.k8s.io",
                "networking.k8s.io/v1",
            ),
            ObjectKind::CiliumNetworkPolicy => {
                ("ciliumnetworkpolicies", "cilium.io", "cilium.io/v2")
            }
        };
        Resource {
            plural,
            group,
            api_version,
        }
    }

    /// How an RBAC rule names the resource: `discovery.k8s.io/endpointslices`, or
    /// `services (core group "")`.
    #[must_use]
    pub fn rbac_name(&self) -> String {
        if self.group.is_empty() {
            format!("{} (core API group \"\")", self.plural)
        } else {
            format!("{}/{}", self.group, self.plural)
        }
    }
}

/// Why listing or watching one kind failed, phrased for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchProblem {
    /// 403: the service account lacks an RBAC rule.
    #[error(
        "forbidden {verb} {plural}: grant get/list/watch on {rbac} to the API server's \
         Kubernetes identity (ClusterRole + ClusterRoleBinding); the watch retries and \
         recovers once the rule exists (API server said: {message})",
        plural = .resource.plural,
        rbac = .resource.rbac_name()
    )]
    Forbidden {
        /// Failed request.
        verb: Verb,
        /// Resource.
        resource: Resource,
        /// The API server's message.
        message: String,
    },
    /// 401: the credentials were rejected.
    #[error(
        "unauthorized {verb} {plural}: the Kubernetes API rejected our credentials; check \
         the kubeconfig user of --kube-context, or that the pod's service account token is \
         mounted and not expired (API server said: {message})",
        plural = .resource.plural
    )]
    Unauthorized {
        /// Failed request.
        verb: Verb,
        /// Resource.
        resource: Resource,
        /// The API server's message.
        message: String,
    },
    /// 404: the cluster does not serve the API.
    #[error(
        "the Kubernetes API does not serve {api_version} {plural} (404 {verb} them); \
         clustermesh needs Kubernetes 1.21 or newer (discovery.k8s.io/v1 EndpointSlices)",
        plural = .resource.plural,
        api_version = .resource.api_version
    )]
    NotServed {
        /// Failed request.
        verb: Verb,
        /// Resource.
        resource: Resource,
    },
    /// 410: the watch fell out of the API server's history window; kube re-lists.
    #[error(
        "resource version expired while {verb} {plural} (410 Gone); re-listing all {plural}",
        plural = .resource.plural
    )]
    Expired {
        /// Failed request.
        verb: Verb,
        /// Resource.
        resource: Resource,
    },
    /// The response could not be decoded.
    #[error(
        "malformed response {verb} {plural} from the Kubernetes API: {detail}; retrying with \
         backoff (if this persists, check for a proxy rewriting responses or a mismatched \
         API version)",
        plural = .resource.plural
    )]
    Malformed {
        /// Failed request.
        verb: Verb,
        /// Resource.
        resource: Resource,
        /// The decoder's message.
        detail: String,
    },
    /// The list had no resourceVersion, so no watch can follow it.
    #[error(
        "the {plural} list has no metadata.resourceVersion, so it cannot be watched; \
         retrying with backoff (a proxy may be stripping list metadata)",
        plural = .resource.plural
    )]
    NoResourceVersion {
        /// Resource.
        resource: Resource,
    },
    /// The connection failed.
    #[error(
        "cannot reach the Kubernetes API while {verb} {plural}: {detail}; retrying with backoff",
        plural = .resource.plural
    )]
    Unreachable {
        /// Failed request.
        verb: Verb,
        /// Resource.
        resource: Resource,
        /// The transport error.
        detail: String,
    },
    /// Any other API error status.
    #[error(
        "the Kubernetes API answered {code} {reason} {verb} {plural}: {message}; retrying \
         with backoff",
        plural = .resource.plural
    )]
    Api {
        /// Failed request.
        verb: Verb,
        /// Resource.
        resource: Resource,
        /// HTTP status code.
        code: u16,
        /// Machine-readable reason (`TooManyRequests`, ...).
        reason: String,
        /// The API server's message.
        message: String,
    },
}

impl WatchProblem {
    /// Explains a watcher error for `kind`.
    #[must_use]
    pub fn explain(kind: ObjectKind, error: &watcher::Error) -> Self {
        let resource = Resource::of(kind);
        match error {
            watcher::Error::InitialListFailed(e) => from_client(Verb::List, resource, e),
            watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
                from_client(Verb::Watch, resource, e)
            }
            watcher::Error::WatchError(status) => from_status(Verb::Watch, resource, status),
            watcher::Error::NoResourceVersion => WatchProblem::NoResourceVersion { resource },
        }
    }

    /// Whether this is routine (an expired watch) rather than something to look into.
    #[must_use]
    pub fn is_routine(&self) -> bool {
        matches!(self, WatchProblem::Expired { .. })
    }

    /// Whether the API sent something that could not be decoded (counted as a rejected
    /// input).
    #[must_use]
    pub fn is_malformed_input(&self) -> bool {
        matches!(
            self,
            WatchProblem::Malformed { .. } | WatchProblem::NoResourceVersion { .. }
        )
    }
}

fn from_client(verb: Verb, resource: Resource, error: &kube::Error) -> WatchProblem {
    match error {
        kube::Error::Api(status) => from_status(verb, resource, status),
        kube::Error::SerdeError(e) => WatchProblem::Malformed {
            verb,
            resource,
            detail: e.to_string(),
        },
        kube::Error::FromUtf8(e) => WatchProblem::Malformed {
            verb,
            resource,
            detail: format!("response is not UTF-8: {e}"),
        },
        kube::Error::LinesCodecMaxLineLengthExceeded => WatchProblem::Malformed {
            verb,
            resource,
            detail: "watch event line too long".to_owned(),
        },
        other => WatchProblem::Unreachable {
            verb,
            resource,
            detail: other.to_string(),
        },
    }
}

fn from_status(verb: Verb, resource: Resource, status: &Status) -> WatchProblem {
    let message = status.message.clone();
    match status.code {
        401 => WatchProblem::Unauthorized {
            verb,
            resource,
            message,
        },
        403 => WatchProblem::Forbidden {
            verb,
            resource,
            message,
        },
        // kube reads a watch line that decodes neither as an event of the kind nor as
        // a Status with a code as a codeless Status: the line was garbage.
        0 => WatchProblem::Malformed {
            verb,
            resource,
            detail: format!(
                "a watch event that decodes neither as one of the {} nor as an error status",
                resource.plural
            ),
        },
        404 => WatchProblem::NotServed { verb, resource },
        410 => WatchProblem::Expired { verb, resource },
        code => WatchProblem::Api {
            verb,
            resource,
            code,
            reason: status.reason.clone(),
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, reason: &str, message: &str) -> Box<Status> {
        Box::new(Status {
            status: None,
            code,
            message: message.to_owned(),
            metadata: None,
            reason: reason.to_owned(),
            details: None,
        })
    }

    #[test]
    fn forbidden_list_names_the_rbac_rule() {
        let error = watcher::Error::InitialListFailed(kube::Error::Api(status(
            403,
            "Forbidden",
            "endpointslices.discovery.k8s.io is forbidden",
        )));
        let text = WatchProblem::explain(ObjectKind::EndpointSlice, &error).to_string();
        assert!(
            text.starts_with("forbidden listing endpointslices: grant get/list/watch on discovery.k8s.io/endpointslices"),
            "{text}"
        );
        assert!(
            text.contains("endpointslices.discovery.k8s.io is forbidden"),
            "{text}"
        );
    }

    #[test]
    fn forbidden_watch_of_a_core_kind_names_the_core_group() {
        let error = watcher::Error::WatchStartFailed(kube::Error::Api(status(403, "", "no")));
        let text = WatchProblem::explain(ObjectKind::Pod, &error).to_string();
        assert!(
            text.starts_with(
                "forbidden watching pods: grant get/list/watch on pods (core API group \"\")"
            ),
            "{text}"
        );
    }

    #[test]
    fn gone_is_routine_and_other_codes_are_not() {
        let gone = WatchProblem::explain(
            ObjectKind::Service,
            &watcher::Error::WatchError(status(410, "Expired", "too old resource version")),
        );
        assert_eq!(
            gone,
            WatchProblem::Expired {
                verb: Verb::Watch,
                resource: Resource::of(ObjectKind::Service)
            }
        );
        assert!(gone.is_routine());
        let busy = WatchProblem::explain(
            ObjectKind::Service,
            &watcher::Error::WatchError(status(429, "TooManyRequests", "slow down")),
        );
        assert!(!busy.is_routine());
        assert!(busy.to_string().contains("429 TooManyRequests"), "{busy}");
    }

    #[test]
    fn status_codes_map_to_their_problem() {
        let explain = |code| {
            WatchProblem::explain(
                ObjectKind::Node,
                &watcher::Error::InitialListFailed(kube::Error::Api(status(code, "", "m"))),
            )
        };
        assert!(matches!(explain(401), WatchProblem::Unauthorized { .. }));
        assert!(matches!(explain(404), WatchProblem::NotServed { .. }));
        assert!(matches!(explain(500), WatchProblem::Api { code: 500, .. }));
        assert!(explain(0).is_malformed_input());
    }

    #[test]
    fn decode_errors_are_malformed_input() {
        let Err(serde) = serde_json::from_str::<serde_json::Value>("{\"items\": [") else {
            panic!("truncated JSON parsed");
        };
        let problem = WatchProblem::explain(
            ObjectKind::Pod,
            &watcher::Error::WatchFailed(kube::Error::SerdeError(serde)),
        );
        assert!(problem.is_malformed_input());
        assert!(
            problem
                .to_string()
                .starts_with("malformed response watching pods"),
            "{problem}"
        );
        assert!(
            WatchProblem::explain(ObjectKind::Pod, &watcher::Error::NoResourceVersion)
                .is_malformed_input()
        );
    }
}
