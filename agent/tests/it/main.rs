//! The agent's behaviour tests, one binary with one module per scenario (so CI links one
//! test executable for the crate instead of one per file).
//!
//! The privileged scenarios (`bpf_datapath`, `mount_bpffs`) need root, bpffs and cgroup2;
//! they skip without them unless `CLUSTERMESH_REQUIRE_PRIVILEGED=1`, where they fail.

mod bpf_datapath;
mod bpf_policy;
mod http_endpoint;
mod maglev_properties;
mod mount_bpffs;
mod two_clusters;
