//! The identities connected clusters claim: their cluster IDs and pod CIDRs.
//!
//! Two clusters with one ID, or with overlapping pod CIDRs, would make identities and
//! endpoints ambiguous across the mesh, so the second cluster to claim them is refused
//! until the first one's claim is released.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use clustermesh_api::cidr::{Cidr, CidrError};

/// Why a cluster's claim was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// A pod CIDR the cluster reports does not parse.
    #[error("pod CIDR {cidr:?}: {source}")]
    BadCidr {
        /// The CIDR as reported.
        cidr: String,
        /// Why it does not parse.
        #[source]
        source: CidrError,
    },
    /// Another cluster already uses the ID.
    #[error("reports cluster ID {id}, which cluster {other} already uses; give every cluster its own ID")]
    DuplicateId {
        /// The ID.
        id: u32,
        /// The cluster holding it.
        other: String,
    },
    /// A pod CIDR overlaps one of another cluster's.
    #[error("pod CIDR {ours} overlaps cluster {other}'s {theirs}; clusters in a mesh need disjoint pod CIDRs")]
    OverlappingCidr {
        /// The claiming cluster's CIDR.
        ours: Cidr,
        /// The cluster holding the other CIDR.
        other: String,
        /// The other cluster's CIDR.
        theirs: Cidr,
    },
}

/// What connected clusters claim to be: their IDs and pod CIDRs, so that a cluster
/// reporting another's ID or an overlapping pod CIDR is refused.
#[derive(Debug, Default)]
pub struct ClusterRegistry {
    claims: Mutex<HashMap<String, (u32, Vec<Cidr>)>>,
}

impl ClusterRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, (u32, Vec<Cidr>)>> {
        self.claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `name`'s ID and pod CIDRs, unless they collide with another cluster's.
    ///
    /// # Errors
    /// [`ClaimError`] when a CIDR does not parse or another cluster holds the ID or an
    /// overlapping CIDR.
    pub fn claim(&self, name: &str, id: u32, pod_cidrs: &[String]) -> Result<(), ClaimError> {
        let cidrs = pod_cidrs
            .iter()
            .map(|c| {
                Cidr::parse(c).map_err(|source| ClaimError::BadCidr {
                    cidr: c.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut claims = self.lock();
        for (other, (other_id, other_cidrs)) in claims.iter() {
            if other == name {
                continue;
            }
            if *other_id == id && id != 0 {
                return Err(ClaimError::DuplicateId {
                    id,
                    other: other.clone(),
                });
            }
            for a in &cidrs {
                if let Some(b) = other_cidrs.iter().find(|b| a.overlaps(b)) {
                    return Err(ClaimError::OverlappingCidr {
                        ours: *a,
                        other: other.clone(),
                        theirs: *b,
                    });
                }
            }
        }
        claims.insert(name.to_owned(), (id, cidrs));
        Ok(())
    }

    /// Forgets `name`'s claim.
    pub fn release(&self, name: &str) {
        self.lock().remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_refuses_duplicate_ids_and_overlapping_cidrs() {
        let r = ClusterRegistry::default();
        r.claim("east", 1, &["10.1.0.0/16".into()]).unwrap();
        assert!(r.claim("west", 1, &["10.2.0.0/16".into()]).is_err());
        let e = r
            .claim("west", 2, &["10.1.128.0/17".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("overlaps cluster east"), "{e}");
        assert!(r.claim("west", 2, &["not a cidr".into()]).is_err());
        r.claim("west", 2, &["10.2.0.0/16".into()]).unwrap();
        // Re-claiming one's own entry is fine.
        r.claim("west", 2, &["10.2.0.0/16".into()]).unwrap();
        r.release("east");
        r.claim("north", 1, &["10.1.0.0/16".into()]).unwrap();
    }
}
