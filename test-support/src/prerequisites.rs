//! Helpers shared by the store's behaviour tests and its benchmark (which includes this
//! directory with `#[path]`). Not every test binary uses every helper.
#![allow(dead_code)]

pub(crate) mod etcd;

/// Whether a missing prerequisite (etcd binary, privileges) must fail the test instead of
/// skipping it: CI sets `CLUSTERMESH_REQUIRE_PRIVILEGED=1` (or `CI`).
pub(crate) fn prerequisites_required() -> bool {
    std::env::var("CLUSTERMESH_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Routes `tracing` output of the code under test to the test's captured output.
pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}
