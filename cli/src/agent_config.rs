//! The agent configuration file (`agent.yaml`) the CLI writes and agents reload; the type
//! is shared with the agent and lives in [`clustermesh_api::agent_config`].

pub use clustermesh_api::agent_config::{AgentConfig, ClusterEntry, ConfigError};
