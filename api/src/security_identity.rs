//! Cluster-scoped numeric security identities.
//!
//! A security identity is a number naming a security-relevant label set (what policy
//! matches on); it is not the SPIFFE identity a TLS peer proves, which the certs crate
//! calls a peer identity. Each cluster allocates its own
//! identities, so the cluster ID is put in the high bits to keep identities from
//! different clusters apart. The split follows Cilium (`pkg/identity/numericidentity.go`):
//! 24 bits in total; with 255 clusters the cluster ID takes bits 16..24 and the local
//! part 16 bits, with 511 clusters the cluster ID takes bits 15..24 and the local part 15
//! bits. Local values below [`MIN_LOCAL_IDENTITY`] are reserved (Cilium keeps 1..=255
//! for reserved identities such as `host` and `world`).

use crate::cluster::{validate_cluster_id, ClusterError, ClusterIdMode};

/// Smallest cluster-local identity value the allocator hands out.
pub const MIN_LOCAL_IDENTITY: u32 = 256;

/// How identities are split for a [`ClusterIdMode`].
impl ClusterIdMode {
    /// Bits of an identity holding the cluster-local part.
    #[must_use]
    pub fn identity_local_bits(self) -> u32 {
        match self {
            ClusterIdMode::Max255 => 16,
            ClusterIdMode::Max511 => 15,
        }
    }

    /// Largest cluster-local identity value.
    #[must_use]
    pub fn max_local_identity(self) -> u32 {
        (1 << self.identity_local_bits()) - 1
    }
}

/// A numeric security identity: the cluster ID in the high bits, the cluster-local value
/// in the low bits (24 bits in total).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecurityIdentity(u32);

/// Errors composing a security identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecurityIdentityError {
    /// The cluster ID is invalid for the mode.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The local part does not fit.
    #[error("local identity {local} is outside {min}..={max} (max-connected-clusters={mode}); the cluster's identity space is exhausted or the value is reserved")]
    LocalOutOfRange {
        /// The rejected value.
        local: u32,
        /// Smallest allowed.
        min: u32,
        /// Largest allowed.
        max: u32,
        /// The mode.
        mode: ClusterIdMode,
    },
}

impl SecurityIdentity {
    /// The identity with this number, as records and store keys carry it.
    #[must_use]
    pub const fn new(raw: u32) -> Self {
        Self(raw)
    }

    /// The number, as records and store keys carry it.
    #[must_use]
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Builds the identity for `local` in cluster `cluster_id`.
    ///
    /// # Errors
    /// [`SecurityIdentityError`] when the cluster ID or local value is out of range.
    pub fn compose(
        cluster_id: u32,
        local: u32,
        mode: ClusterIdMode,
    ) -> Result<Self, SecurityIdentityError> {
        validate_cluster_id(cluster_id, mode)?;
        if !(MIN_LOCAL_IDENTITY..=mode.max_local_identity()).contains(&local) {
            return Err(SecurityIdentityError::LocalOutOfRange {
                local,
                min: MIN_LOCAL_IDENTITY,
                max: mode.max_local_identity(),
                mode,
            });
        }
        Ok(Self((cluster_id << mode.identity_local_bits()) | local))
    }

    /// Splits the identity into `(cluster_id, local)`.
    #[must_use]
    pub fn split(self, mode: ClusterIdMode) -> (u32, u32) {
        let bits = mode.identity_local_bits();
        (self.0 >> bits, self.0 & mode.max_local_identity())
    }
}

impl From<SecurityIdentity> for u32 {
    fn from(id: SecurityIdentity) -> u32 {
        id.0
    }
}

impl std::fmt::Display for SecurityIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_cilium_layout() {
        let compose_identity =
            |c, l, m| SecurityIdentity::compose(c, l, m).map(SecurityIdentity::get);
        assert_eq!(
            compose_identity(1, 256, ClusterIdMode::Max255),
            Ok(0x0001_0100)
        );
        assert_eq!(
            compose_identity(255, 0xffff, ClusterIdMode::Max255),
            Ok(0x00ff_ffff)
        );
        assert_eq!(
            compose_identity(511, 0x7fff, ClusterIdMode::Max511),
            Ok(0x00ff_ffff)
        );
        assert!(compose_identity(1, 255, ClusterIdMode::Max255).is_err());
        assert!(compose_identity(1, 0x8000, ClusterIdMode::Max511).is_err());
        assert!(compose_identity(0, 300, ClusterIdMode::Max255).is_err());
    }

    proptest! {
        #[test]
        fn compose_then_split_round_trips(
            max511 in any::<bool>(),
            cluster in 1u32..=511,
            local in MIN_LOCAL_IDENTITY..=0xffff,
        ) {
            let mode = if max511 { ClusterIdMode::Max511 } else { ClusterIdMode::Max255 };
            match SecurityIdentity::compose(cluster, local, mode) {
                Ok(id) => {
                    prop_assert!(id.get() < 1 << 24);
                    prop_assert_eq!(SecurityIdentity::new(id.get()).split(mode), (cluster, local));
                }
                Err(_) => prop_assert!(cluster > mode.max_cluster_id() || local > mode.max_local_identity()),
            }
        }
    }
}
