//! Kubernetes label selectors (`metav1.LabelSelector`), validated and matched the way the
//! Kubernetes API server and `k8s.io/apimachinery/pkg/labels` do, plus the cluster scoping
//! Cilium applies to policy peers.
//!
//! Semantics users bring from Kubernetes:
//! * every `matchLabels` entry and every `matchExpressions` requirement must hold (AND);
//!   an empty selector (`{}`) matches every label set;
//! * `In` needs the key present with one of the values; `NotIn` holds when the key is absent
//!   or its value is none of the values; `Exists` / `DoesNotExist` test presence only;
//! * `In` and `NotIn` need at least one value, `Exists` and `DoesNotExist` none; keys are
//!   qualified names (`[prefix/]name`) and values label values, checked as the API server
//!   checks them, so a selector it would refuse is refused here with the same reason.
//!
//! Cluster scoping (Cilium's `policy-default-local-cluster`, the default since Cilium 1.18):
//! a peer selector that says nothing about [`CLUSTER_LABEL`] selects endpoints of the local
//! cluster only; [`PeerClusters::All`] restores the older "every cluster" reading.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

mod text;
pub use text::{parse_selector_text, SelectorTextError};

/// The label every endpoint carries with the name of its cluster (Cilium's spelling).
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";

/// The labels of one endpoint (or namespace): key → value.
pub type Labels = BTreeMap<String, String>;

/// A label selector as written in a Kubernetes object (`matchLabels`, `matchExpressions`).
/// Unknown fields are refused, so a typo is an error and never a wider selector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireLabelSelector {
    /// Exact `key: value` pairs.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements.
    #[serde(default)]
    pub match_expressions: Vec<WireRequirement>,
}

/// One `matchExpressions` entry as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireRequirement {
    /// Label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist` (case-sensitive, as in Kubernetes).
    pub operator: String,
    /// Values for `In` / `NotIn`.
    #[serde(default)]
    pub values: Vec<String>,
}

/// One validated requirement on a label set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Requirement {
    /// The key is present with one of the values (`matchLabels` entries are `In` with one
    /// value, as Kubernetes converts them).
    In {
        /// Label key.
        key: String,
        /// Accepted values (at least one).
        values: BTreeSet<String>,
    },
    /// The key is absent, or present with none of the values.
    NotIn {
        /// Label key.
        key: String,
        /// Refused values (at least one).
        values: BTreeSet<String>,
    },
    /// The key is present (any value).
    Exists {
        /// Label key.
        key: String,
    },
    /// The key is absent.
    DoesNotExist {
        /// Label key.
        key: String,
    },
}

impl Requirement {
    /// The label key the requirement is about.
    #[must_use]
    pub fn key(&self) -> &str {
        match self {
            Requirement::In { key, .. }
            | Requirement::NotIn { key, .. }
            | Requirement::Exists { key }
            | Requirement::DoesNotExist { key } => key,
        }
    }

    /// The same requirement on key `prefix` + key (how a `namespaceSelector` becomes a
    /// requirement on the namespace labels copied into a pod's identity).
    #[must_use]
    pub fn prefixed(self, prefix: &str) -> Self {
        let with = |key: String| format!("{prefix}{key}");
        match self {
            Requirement::In { key, values } => Requirement::In {
                key: with(key),
                values,
            },
            Requirement::NotIn { key, values } => Requirement::NotIn {
                key: with(key),
                values,
            },
            Requirement::Exists { key } => Requirement::Exists { key: with(key) },
            Requirement::DoesNotExist { key } => Requirement::DoesNotExist { key: with(key) },
        }
    }

    /// Whether `labels` meet the requirement.
    #[must_use]
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::In { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn { key, values } => {
                labels.get(key).is_none_or(|v| !values.contains(v))
            }
            Requirement::Exists { key } => labels.contains_key(key),
            Requirement::DoesNotExist { key } => !labels.contains_key(key),
        }
    }
}

/// A validated label selector: all of its requirements must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelSelector {
    requirements: BTreeSet<Requirement>,
}

/// Why a selector was refused (the policy carrying it is refused with this reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// A key is not a qualified name.
    #[error("label key {key:?} is not valid: {reason}")]
    BadKey {
        /// The key as written.
        key: String,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// A value is not a label value.
    #[error("label value {value:?} of key {key:?} is not valid: {reason}")]
    BadValue {
        /// The key it belongs to.
        key: String,
        /// The value as written.
        value: String,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// The operator is not one Kubernetes knows.
    #[error("operator {operator:?} of key {key:?} is not one of In, NotIn, Exists, DoesNotExist (case-sensitive)")]
    BadOperator {
        /// The key it belongs to.
        key: String,
        /// The operator as written.
        operator: String,
    },
    /// `In`/`NotIn` without values, or `Exists`/`DoesNotExist` with values.
    #[error("operator {operator} of key {key:?} {rule}")]
    BadValues {
        /// The key it belongs to.
        key: String,
        /// The operator.
        operator: &'static str,
        /// The rule broken.
        rule: &'static str,
    },
}

impl LabelSelector {
    /// The selector that matches every label set (`{}`).
    #[must_use]
    pub fn everything() -> Self {
        Self::default()
    }

    /// Validates a selector as written.
    ///
    /// # Errors
    /// [`SelectorError`] naming the first key, value or operator the Kubernetes API server
    /// would refuse.
    pub fn from_wire(wire: &WireLabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = BTreeSet::new();
        for (key, value) in &wire.match_labels {
            check_key(key)?;
            check_value(key, value)?;
            requirements.insert(Requirement::In {
                key: key.clone(),
                values: BTreeSet::from([value.clone()]),
            });
        }
        for req in &wire.match_expressions {
            check_key(&req.key)?;
            for value in &req.values {
                check_value(&req.key, value)?;
            }
            let key = req.key.clone();
            let values: BTreeSet<String> = req.values.iter().cloned().collect();
            let needs_values = |operator: &'static str| {
                if values.is_empty() {
                    Err(SelectorError::BadValues {
                        key: req.key.clone(),
                        operator,
                        rule: "needs at least one value",
                    })
                } else {
                    Ok(())
                }
            };
            let no_values = |operator: &'static str| {
                if values.is_empty() {
                    Ok(())
                } else {
                    Err(SelectorError::BadValues {
                        key: req.key.clone(),
                        operator,
                        rule: "takes no values",
                    })
                }
            };
            let requirement = match req.operator.as_str() {
                "In" => {
                    needs_values("In")?;
                    Requirement::In { key, values }
                }
                "NotIn" => {
                    needs_values("NotIn")?;
                    Requirement::NotIn { key, values }
                }
                "Exists" => {
                    no_values("Exists")?;
                    Requirement::Exists { key }
                }
                "DoesNotExist" => {
                    no_values("DoesNotExist")?;
                    Requirement::DoesNotExist { key }
                }
                other => {
                    return Err(SelectorError::BadOperator {
                        key: req.key.clone(),
                        operator: other.to_owned(),
                    })
                }
            };
            requirements.insert(requirement);
        }
        Ok(Self { requirements })
    }

    /// Whether `labels` meet every requirement.
    #[must_use]
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether the selector matches every label set (no requirements).
    #[must_use]
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether any requirement is about `key`.
    #[must_use]
    pub fn names_key(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| r.key() == key)
    }

    /// The requirements, in a stable order.
    pub fn requirements(&self) -> impl Iterator<Item = &Requirement> {
        self.requirements.iter()
    }

    /// The selector with one more requirement.
    #[must_use]
    pub fn and(mut self, requirement: Requirement) -> Self {
        self.requirements.insert(requirement);
        self
    }

    /// The selector as a policy peer of cluster `local` reads it: unless it names
    /// [`CLUSTER_LABEL`] (in `matchLabels` or `matchExpressions`), [`PeerClusters::Local`]
    /// restricts it to endpoints labelled with the local cluster; a selector that names the
    /// label is kept as written either way.
    #[must_use]
    pub fn scoped_to(self, local: &str, clusters: PeerClusters) -> Self {
        if clusters == PeerClusters::All || self.names_key(CLUSTER_LABEL) {
            return self;
        }
        self.and(Requirement::In {
            key: CLUSTER_LABEL.to_owned(),
            values: BTreeSet::from([local.to_owned()]),
        })
    }
}

/// Which clusters a policy peer selector that does not name [`CLUSTER_LABEL`] selects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerClusters {
    /// The local cluster only (Cilium's `policy-default-local-cluster: true`, its default
    /// since 1.18).
    #[default]
    Local,
    /// Every connected cluster (the behaviour before Cilium 1.18).
    All,
}

/// Longest name part of a qualified key, and longest label value (Kubernetes).
const MAX_NAME: usize = 63;
/// Longest prefix of a qualified key (a DNS-1123 subdomain).
const MAX_PREFIX: usize = 253;

/// `[prefix/]name`: prefix a DNS-1123 subdomain, name 1–63 characters of `[A-Za-z0-9-_.]`
/// starting and ending with an alphanumeric (Kubernetes `IsQualifiedName`).
fn check_key(key: &str) -> Result<(), SelectorError> {
    let bad = |reason| SelectorError::BadKey {
        key: key.to_owned(),
        reason,
    };
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err(bad("the prefix before '/' is empty"));
        }
        if prefix.len() > MAX_PREFIX {
            return Err(bad("the prefix is longer than 253 characters"));
        }
        if !is_dns_subdomain(prefix) {
            return Err(bad(
                "the prefix must be a DNS subdomain: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit",
            ));
        }
    }
    if name.is_empty() {
        return Err(bad("the name part is empty"));
    }
    if name.len() > MAX_NAME {
        return Err(bad("the name part is longer than 63 characters"));
    }
    if !is_label_word(name) {
        return Err(bad(
            "the name part must be letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

/// Empty, or 1–63 characters of `[A-Za-z0-9-_.]` starting and ending with an alphanumeric
/// (Kubernetes `IsValidLabelValue`).
fn check_value(key: &str, value: &str) -> Result<(), SelectorError> {
    let bad = |reason| SelectorError::BadValue {
        key: key.to_owned(),
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Ok(());
    }
    if value.len() > MAX_NAME {
        return Err(bad("longer than 63 characters"));
    }
    if !is_label_word(value) {
        return Err(bad(
            "must be letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

fn is_label_word(s: &str) -> bool {
    let bytes = s.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    first.is_ascii_alphanumeric()
        && last.is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_dns_subdomain(s: &str) -> bool {
    s.split('.').all(|part| {
        let bytes = part.as_bytes();
        match (bytes.first(), bytes.last()) {
            (Some(first), Some(last)) => {
                part.len() <= MAX_NAME
                    && (first.is_ascii_lowercase() || first.is_ascii_digit())
                    && (last.is_ascii_lowercase() || last.is_ascii_digit())
                    && bytes
                        .iter()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            }
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests;
