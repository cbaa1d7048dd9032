//! Serializable snapshot of what the kernel maps hold, for `clustermesh bpf lb list`
//! (served through the agent's admin API as `GET /v1/bpf/lb`).
//!
//! The types are the admin API contract's, shared with the CLI that decodes them: see
//! [`clustermesh_api::admin`].

pub use clustermesh_api::admin::{BackendDump, BpfDump, ServiceDump, SlabDump};
