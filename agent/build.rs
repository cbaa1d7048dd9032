//! Builds the eBPF programs (`ebpf/programs`, binary `clustermesh-lb`) for
//! `bpfel-unknown-none` with the nightly toolchain and bpf-linker, the way current aya
//! does it, and leaves the object in `OUT_DIR` for `include_bytes_aligned!`.
//!
//! Set `AYA_BUILD_SKIP=1` to skip it (e.g. for `cargo doc` on a machine without the
//! nightly toolchain); the agent then reports that the datapath object is missing when it
//! is asked to load it.

use std::{env, fs, path::PathBuf};

use aya_build::{Package, Toolchain};

fn main() -> aya_build::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let programs_dir = manifest_dir.join("../ebpf/programs");
    let programs_dir = programs_dir
        .to_str()
        .ok_or_else(|| std::io::Error::other(format!("non UTF-8 path {}", programs_dir.display())))?
        .to_owned();
    println!("cargo:rerun-if-changed=../ebpf/common/src");
    aya_build::build_ebpf(
        [Package {
            name: "clustermesh-ebpf-programs",
            root_dir: &programs_dir,
            ..Package::default()
        }],
        Toolchain::Nightly,
    )?;
    // When the build is skipped, leave an empty object so the crate still compiles; the
    // loader turns an empty object into a clear error.
    let object = PathBuf::from(env::var("OUT_DIR")?).join("clustermesh-lb");
    if !object.exists() {
        fs::write(&object, [])?;
    }
    Ok(())
}
