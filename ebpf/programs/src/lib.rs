//! Host-side face of the eBPF programs crate.
//!
//! The programs themselves are the `clustermesh-lb` binary, built for `bpfel-unknown-none`
//! by the agent's `build.rs` (aya-build). This empty library only exists so the agent can
//! list the crate as a build-dependency, which makes cargo rebuild the agent when the
//! programs change.
#![no_std]
