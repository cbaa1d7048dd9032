//! The agent configuration file (`agent.yaml`); the type is shared with the CLI and lives
//! in [`clustermesh_api::agent_config`].

pub use clustermesh_api::agent_config::{AgentConfig, ClusterEntry, ConfigError};
