//! The store's behaviour tests, one binary with one module per scenario: the shared
//! conformance suite against both backends, and each backend's own behaviour and faults.
//! The etcd scenarios start Debian's `etcd` (see `clustermesh_test_support::etcd`).

mod etcd_behaviour;
mod etcd_conformance;
mod etcd_conformance_faults;
mod etcd_tls_refusal;
mod raft_conformance;
mod raft_data_dir_lock;
mod raft_faults;
mod raft_security;
