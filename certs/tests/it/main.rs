//! The certificate crate's behaviour tests, one binary with one module per scenario; the
//! PKI fixtures come from `clustermesh-test-support`'s `certs` module.

mod admission;
mod grpc;
mod handshake;
mod logging;
mod reload;
