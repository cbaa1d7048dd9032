//! Kubernetes mode of the CLI: the verbs act on a cluster reached through a kubeconfig
//! context (`--context`) instead of a local state directory.
//!
//! - [`context`]: resolves a kubeconfig context to a [`kube::Client`] and proves the API
//!   server answers, so every verb fails early with one clear line.
//! - [`objects`]: the Secrets and ConfigMaps the mesh is made of and typed API helpers.
//! - [`enable`]: `enable` (install/upgrade: certificates, chart, settings) and `disable`.
//! - [`mesh`]: what one cluster's mesh looks like (settings, CA, connected clusters, the
//!   agent configuration the chart renders for them).
//! - [`endpoints`]: where other clusters reach the mesh API, and server names covering it.
//! - [`connect`]: `connect`, `disconnect` and `forget` (both sides, all or nothing).
//! - [`values`]: chart value overrides (`enable --set/--values`), stored for later renders.
//! - [`status`]: `status` (apiserver, Service, agents and their cluster connections).
//! - [`agent_token`]: the token that opens the agents' admin routes through the pod proxy.
//! - [`agents`]: `service list` and `bpf lb list` (each agent, through the pod proxy).
//! - [`plan`]: what `enable` does around fields the API server will not change in place.
//! - [`validate`]: typed schema check of the rendered objects before any write.
//! - [`embedded`]: the Helm chart compiled into the binary.
//! - [`error`]: what can go wrong, one line each.

pub mod agent_token;
pub mod agents;
pub mod connect;
pub mod context;
pub mod embedded;
pub mod enable;
pub mod endpoints;
pub mod error;
pub mod mesh;
pub mod objects;
pub mod plan;
pub mod status;
pub mod validate;
pub mod values;

pub use context::{KubeError, KubeTarget};
pub use error::KubeModeError;
