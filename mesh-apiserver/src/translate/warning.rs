//! Warnings about input that was partly ignored during translation.

use clustermesh_api::annotations::AnnotationWarning;
use clustermesh_api::cidr::CidrError;
use clustermesh_api::keys::PolicySource;
use clustermesh_api::policy::PolicyError;

/// Part of a Kubernetes object was invalid and was dropped or defaulted; the rest of the
/// object (and every other object) was exported normally.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputWarning {
    /// An annotation value was not understood; its setting uses the default.
    #[error("{object}: {warning}")]
    Annotation {
        /// `Service namespace/name`.
        object: String,
        /// Which annotation and value.
        warning: AnnotationWarning,
    },
    /// A cluster IP is not an IP address; that frontend is not exported.
    #[error("{object}: cluster IP {value:?} is not an IP address; that frontend is skipped")]
    BadFrontend {
        /// `Service namespace/name`.
        object: String,
        /// The rejected value.
        value: String,
    },
    /// A port entry is unusable; that port is not exported.
    #[error("{object}: port {port} is skipped: {reason}")]
    BadPort {
        /// The object.
        object: String,
        /// The port's name or number.
        port: String,
        /// What is wrong.
        reason: String,
    },
    /// An endpoint or pod address is not an IP address; it is skipped.
    #[error("{object}: address {value:?} is not an IP address; it is skipped")]
    BadAddress {
        /// The object.
        object: String,
        /// The rejected value.
        value: String,
    },
    /// A node's pod CIDR is invalid; it is not exported.
    #[error("{object}: pod CIDR skipped: {error}")]
    BadPodCidr {
        /// `Node name`.
        object: String,
        /// The parse error.
        error: CidrError,
    },
    /// The object lacks a field the record cannot do without; it is not exported.
    #[error("{object}: not exported: {reason}")]
    Unusable {
        /// The object.
        object: String,
        /// What is missing.
        reason: &'static str,
    },
    /// A NetworkPolicy or CiliumNetworkPolicy does not validate. Its record is written
    /// anyway: the agents refuse it alone and keep its last good version.
    #[error("{error}; the policy record is written as is, and agents refuse it and keep its last valid version")]
    Policy {
        /// Which policy API.
        api: PolicySource,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Why it is refused (names the policy and the place in it).
        error: PolicyError,
    },
}

impl InputWarning {
    /// A short stable reason, used as a metric label.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            InputWarning::Annotation { .. } => "annotation",
            InputWarning::BadFrontend { .. } => "frontend",
            InputWarning::BadPort { .. } => "port",
            InputWarning::BadAddress { .. } => "address",
            InputWarning::BadPodCidr { .. } => "pod_cidr",
            InputWarning::Unusable { .. } => "unusable",
            InputWarning::Policy { .. } => "policy",
        }
    }
}
