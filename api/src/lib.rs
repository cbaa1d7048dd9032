//! Shared vocabulary of clustermesh: the records a mesh API server exports, the gRPC
//! mesh API, the store key layout, and the validation and annotation rules every
//! component must agree on.
//!
//! This crate does no I/O, so the API server, the agent and the CLI can all depend on it
//! and get byte-identical behaviour.
//!
//! - [`v1`]: generated protobuf messages and the tonic `MeshApi` client/server.
//! - [`keys`]: `mesh/v1/...` key builders and a typed key parser.
//! - [`records`]: decoding a store value or Watch payload into the right record type.
//! - [`cluster`]: cluster name and ID rules, the 255/511-cluster modes.
//! - [`cidr`]: pod CIDR parsing and overlap detection between clusters.
//! - [`security_identity`]: cluster-scoped numeric security identities (cluster ID in the
//!   high bits); not the SPIFFE peer identity of a TLS connection.
//! - [`model`]: the service domain model: names, enums and validated service records.
//! - [`policy`]: label selectors with Kubernetes semantics and Cilium's cluster scoping of
//!   policy peers.
//! - [`annotations`]: global-service annotations, new and legacy forms.
//! - [`admin`]: the JSON bodies of the agent's admin API, shared by the agent and the CLI.
//! - [`yaml`]: the one YAML dialect every component reads and writes.
//! - [`agent_config`]: the agent configuration file's format and validation (parsing
//!   only; the agent and the CLI read and write the file).
#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_policy;
pub mod agent_config;
pub mod annotations;
pub mod cidr;
pub mod cluster;
pub mod keys;
pub mod model;
pub mod policy;
pub mod records;
pub mod security_identity;
pub mod yaml;

/// Generated protobuf messages and gRPC service for package `clustermesh.v1`.
///
/// Unknown fields in received messages are skipped by prost, so older readers accept
/// newer writers.
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod v1 {
    tonic::include_proto!("clustermesh.v1");
}

pub use keys::{Kind, MeshKey};
