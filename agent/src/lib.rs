//! clustermesh node agent: the eBPF datapath, the runtime that runs the control plane
//! ([`clustermesh_agent_core`]) against it, and the admin and HTTP endpoints.
//!
//! Control plane: cluster watchers → merge (affinity, tiers, weights) → weighted Maglev →
//! desired state handed to a [`Datapath`](clustermesh_agent_core::datapath::Datapath);
//! this crate adds [`bpf::BpfDatapath`], the one that programs the kernel.

pub mod admin;
pub mod admin_policy;
pub mod bpf;
pub mod enforcement;
pub mod http;
pub mod runtime;
