//! Cluster membership: bootstrapping a new cluster from the configured voters, and
//! adding or removing voters at runtime.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{BasicNode, ChangeMembers};

use super::{unavailable, Replica};
use crate::raft::config::NodeId;
use crate::StoreError;

impl Replica {
    /// Initializes a new cluster from `config.members` if this replica is configured to
    /// bootstrap, has the lowest member id, and its raft state is still empty. A refusal
    /// (the cluster was initialized elsewhere) is logged, not an error.
    pub(super) async fn bootstrap_if_first(&self) -> Result<(), StoreError> {
        let config = &self.config;
        let id = self.id;
        if config.bootstrap && config.members.keys().next() == Some(&config.node_id) {
            let initialized = self
                .raft
                .is_initialized()
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            if !initialized {
                let members: BTreeMap<NodeId, BasicNode> = config
                    .members
                    .iter()
                    .map(|(id, a)| (*id, BasicNode::new(a.clone())))
                    .collect();
                tracing::info!(node = id, members = ?config.members, "initializing a new raft cluster");
                if let Err(e) = self.raft.initialize(members).await {
                    tracing::warn!(node = id, error = %e, "raft initialize refused (already initialized elsewhere?)");
                }
            }
        }
        Ok(())
    }

    /// Adds a replica at runtime: first as a learner that catches up, then as a voter.
    /// Must be called on the leader.
    pub async fn add_voter(&self, id: NodeId, addr: impl Into<String>) -> Result<(), StoreError> {
        self.check_running()?;
        let node = BasicNode::new(addr.into());
        self.raft.add_learner(id, node, true).await.map_err(|e| {
            StoreError::Backend(format!("adding replica {id} as a learner failed: {e}"))
        })?;
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| {
                StoreError::Backend(format!("promoting replica {id} to voter failed: {e}"))
            })?;
        tracing::info!(node = self.id, added = id, "replica added as a voter");
        Ok(())
    }

    /// Removes a replica from the voters (and the cluster) at runtime. Must be called on
    /// the leader.
    pub async fn remove_voter(&self, id: NodeId) -> Result<(), StoreError> {
        self.check_running()?;
        self.raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map_err(|e| StoreError::Backend(format!("removing replica {id} failed: {e}")))?;
        tracing::info!(
            node = self.id,
            removed = id,
            "replica removed from the voters"
        );
        Ok(())
    }
}
