//! Process resource limits for benchmarks: a bench that holds tens of thousands of
//! connections (both ends of each, when clients and servers share the process) needs more
//! open files than the usual default of 1024 (soft) or 20 000 (hard) allows.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raises this process's open-file limit (`RLIMIT_NOFILE`) to at least `want`, the hard
/// limit included when the process may (root, or `CAP_SYS_RESOURCE`); otherwise as far as
/// the hard limit allows. Children inherit the new limit. Returns the soft limit in force
/// afterwards.
pub fn raise_nofile(want: u64) -> u64 {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft >= want {
        return soft;
    }
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return want;
    }
    let new = want.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, new, hard).unwrap();
    new
}
