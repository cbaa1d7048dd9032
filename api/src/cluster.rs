//! Cluster name and cluster ID rules.
//!
//! Every cluster of a mesh must have a distinct, valid name (it is a key segment and a
//! certificate SAN) and a distinct ID (it is the high bits of every numeric identity and
//! of the datapath's cluster field). The rules follow Cilium so existing names carry over:
//! names are at most 32 characters of lowercase alphanumerics and `-`, starting and
//! ending with an alphanumeric (Cilium `pkg/clustermesh/types`, `ValidateClusterName`);
//! IDs are `1..=255`, or `1..=511` when the mesh runs with `max-connected-clusters=511`.

use std::fmt;

/// Longest allowed cluster name.
pub const MAX_CLUSTER_NAME_LEN: usize = 32;

/// How many clusters the mesh is configured for; decides the cluster ID range and how
/// numeric identities are split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ClusterIdMode {
    /// Cluster IDs `1..=255`; identities keep 16 cluster-local bits.
    #[default]
    Max255,
    /// Cluster IDs `1..=511`; identities keep 15 cluster-local bits.
    Max511,
}

impl ClusterIdMode {
    /// Largest valid cluster ID.
    #[must_use]
    pub fn max_cluster_id(self) -> u32 {
        match self {
            ClusterIdMode::Max255 => 255,
            ClusterIdMode::Max511 => 511,
        }
    }

    /// The mode for a `max-connected-clusters` setting (255 or 511).
    ///
    /// # Errors
    /// [`ClusterError::BadMaxClusters`] for any other value.
    pub fn from_max_clusters(max: u32) -> Result<Self, ClusterError> {
        match max {
            255 => Ok(ClusterIdMode::Max255),
            511 => Ok(ClusterIdMode::Max511),
            other => Err(ClusterError::BadMaxClusters(other)),
        }
    }
}

impl fmt::Display for ClusterIdMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.max_cluster_id())
    }
}

/// An invalid cluster name, ID or mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The name breaks the naming rule.
    #[error("invalid cluster name {name:?}: {reason}; use at most 32 lowercase letters, digits and '-', starting and ending with a letter or digit")]
    BadName {
        /// The rejected name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The ID is outside the mode's range.
    #[error("invalid cluster ID {id}: must be between 1 and {max} (max-connected-clusters={max}); pick an unused ID in that range")]
    BadId {
        /// The rejected ID.
        id: u32,
        /// The mode's largest ID.
        max: u32,
    },
    /// `max-connected-clusters` is neither 255 nor 511.
    #[error("invalid max-connected-clusters {0}: only 255 and 511 are supported")]
    BadMaxClusters(u32),
}

/// Checks a cluster name against the naming rule.
///
/// # Errors
/// [`ClusterError::BadName`] naming the broken rule.
pub fn validate_cluster_name(name: &str) -> Result<(), ClusterError> {
    let bad = |reason| {
        Err(ClusterError::BadName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_CLUSTER_NAME_LEN {
        return bad("it is longer than 32 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("it contains a character other than a-z, 0-9 and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("it starts or ends with '-'");
    }
    Ok(())
}

/// Checks a cluster ID against the mode's range.
///
/// # Errors
/// [`ClusterError::BadId`] when `id` is 0 or above the mode's maximum.
pub fn validate_cluster_id(id: u32, mode: ClusterIdMode) -> Result<(), ClusterError> {
    if id == 0 || id > mode.max_cluster_id() {
        return Err(ClusterError::BadId {
            id,
            max: mode.max_cluster_id(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_cilium_style_names() {
        for name in ["c1", "a", "cluster-east-1", "0", &"a".repeat(32)] {
            validate_cluster_name(name).unwrap();
        }
    }

    #[test]
    fn rejects_names_breaking_each_rule() {
        for name in [
            "",
            "-a",
            "a-",
            "Upper",
            "dot.ted",
            "under_score",
            "sp ace",
            &"a".repeat(33),
            "é",
        ] {
            assert!(
                matches!(
                    validate_cluster_name(name),
                    Err(ClusterError::BadName { .. })
                ),
                "{name:?} accepted"
            );
        }
    }

    #[test]
    fn cluster_id_range_depends_on_mode() {
        validate_cluster_id(1, ClusterIdMode::Max255).unwrap();
        validate_cluster_id(255, ClusterIdMode::Max255).unwrap();
        assert!(validate_cluster_id(0, ClusterIdMode::Max255).is_err());
        assert!(validate_cluster_id(256, ClusterIdMode::Max255).is_err());
        validate_cluster_id(511, ClusterIdMode::Max511).unwrap();
        assert!(validate_cluster_id(512, ClusterIdMode::Max511).is_err());
        assert_eq!(
            ClusterIdMode::from_max_clusters(511),
            Ok(ClusterIdMode::Max511)
        );
        assert!(ClusterIdMode::from_max_clusters(256).is_err());
    }
}
