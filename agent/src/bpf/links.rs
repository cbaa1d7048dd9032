//! Attaching the programs to the cgroup through pinned bpf links.
//!
//! Links are pinned so the programs stay attached while the agent is down. A restarted
//! agent attaches its freshly loaded programs first and then atomically renames the new
//! link pin over the old one, which drops the old link: for a moment both programs run,
//! which is harmless (the second sees an already translated backend address), and there is
//! never a moment with no program attached.

use std::{
    fs::File,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    programs::{
        cgroup_skb::CgroupSkbAttachType,
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSkb, CgroupSockAddr,
    },
    Ebpf,
};

use super::error::{permission_denied, BpfError, Result};

/// Program names in the object, one per hook.
pub const PROGRAMS: [&str; 9] = [
    "cm_connect4",
    "cm_connect6",
    "cm_sendmsg4",
    "cm_sendmsg6",
    "cm_recvmsg4",
    "cm_recvmsg6",
    "cm_getpeername4",
    "cm_getpeername6",
    INGRESS_PROGRAM,
];

/// The `cgroup_skb/ingress` program (ingress policy); the others are `sock_addr` hooks.
const INGRESS_PROGRAM: &str = "cm_ingress";

fn program_error(
    program: &str,
    step: &'static str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> BpfError {
    if let Some(source) = permission_denied(&e) {
        return BpfError::MissingPrivileges {
            step: format!("{step} eBPF program {program}"),
            source,
        };
    }
    BpfError::Program {
        program: program.to_owned(),
        step,
        source: Box::new(e),
    }
}

/// Loads every program, attaches it to `cgroup` and pins its link in `links_dir`,
/// replacing the link of a previous run.
pub(crate) fn attach_all(ebpf: &mut Ebpf, cgroup: &Path, links_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(links_dir).map_err(|source| BpfError::Io {
        step: "create links directory",
        path: links_dir.to_path_buf(),
        source,
    })?;
    let cgroup_file = File::open(cgroup).map_err(|source| BpfError::Io {
        step: "open cgroup",
        path: cgroup.to_path_buf(),
        source,
    })?;
    for name in PROGRAMS {
        let fd_link = if name == INGRESS_PROGRAM {
            attach_skb(ebpf, name, &cgroup_file)?
        } else {
            attach_sock_addr(ebpf, name, &cgroup_file)?
        };
        let final_path = links_dir.join(name);
        // bpffs refuses names containing a dot.
        let tmp_path = links_dir.join(format!("{name}_next"));
        remove_if_exists(&tmp_path)?;
        let pinned = fd_link
            .pin(&tmp_path)
            .map_err(|e| program_error(name, "pin the link of", e))?;
        // Atomically replaces (and so detaches) the previous run's link.
        std::fs::rename(&tmp_path, &final_path).map_err(|source| BpfError::Io {
            step: "replace pinned link",
            path: final_path.clone(),
            source,
        })?;
        drop(pinned);
        tracing::debug!(program = name, cgroup = %cgroup.display(), "attached");
    }
    Ok(())
}

fn find<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| BpfError::Program {
            program: name.to_owned(),
            step: "find",
            source: "the program is missing from the eBPF object".into(),
        })?
        .try_into()
        .map_err(|e| program_error(name, "convert", e))
}

/// Loads and attaches a `sock_addr` program (its hook comes from its section name).
fn attach_sock_addr(ebpf: &mut Ebpf, name: &str, cgroup: &File) -> Result<FdLink> {
    let program: &mut CgroupSockAddr = find(ebpf, name)?;
    program.load().map_err(|e| program_error(name, "load", e))?;
    let link_id = program
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(|e| program_error(name, "attach", e))?;
    let link = program
        .take_link(link_id)
        .map_err(|e| program_error(name, "take the link of", e))?;
    link.try_into()
        .map_err(|e| program_error(name, "convert the link of", e))
}

/// Loads and attaches the `cgroup_skb/ingress` program.
fn attach_skb(ebpf: &mut Ebpf, name: &str, cgroup: &File) -> Result<FdLink> {
    let program: &mut CgroupSkb = find(ebpf, name)?;
    program.load().map_err(|e| program_error(name, "load", e))?;
    let link_id = program
        .attach(
            cgroup,
            CgroupSkbAttachType::Ingress,
            CgroupAttachMode::Single,
        )
        .map_err(|e| program_error(name, "attach", e))?;
    let link = program
        .take_link(link_id)
        .map_err(|e| program_error(name, "take the link of", e))?;
    link.try_into()
        .map_err(|e| program_error(name, "convert the link of", e))
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BpfError::Io {
            step: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Unpins every link and waits until the kernel has released them, so the programs are
/// detached when this returns (the kernel frees links asynchronously after the last
/// reference goes). Returns the paths removed.
pub(crate) fn detach_all(links_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(links_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(source) => {
            return Err(BpfError::Io {
                step: "list",
                path: links_dir.to_path_buf(),
                source,
            })
        }
    };
    let mut ids = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if let Ok(link) = PinnedLink::from_pin(&path) {
            let fd_link: FdLink = link.into();
            if let Ok(info) = fd_link.info() {
                ids.push(info.program_id());
            }
        }
        remove_if_exists(&path)?;
        removed.push(path);
    }
    match std::fs::remove_dir(links_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(BpfError::Io {
                step: "remove",
                path: links_dir.to_path_buf(),
                source,
            })
        }
    }
    wait_released(&ids);
    Ok(removed)
}

/// Polls the kernel's program list until none of the programs behind the unpinned links is
/// left (bounded to a few seconds). The kernel frees a link's id before it detaches it,
/// but puts the program only after detaching, so a vanished program means detached.
fn wait_released(ids: &[u32]) {
    if ids.is_empty() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive = aya::programs::loaded_programs()
            .filter_map(std::result::Result::ok)
            .any(|p| ids.contains(&p.id()));
        if !alive {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                ?ids,
                "programs still loaded after unpinning their links (another process holds them)"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// True when any program link of this datapath is pinned in `links_dir` (the programs are
/// attached).
#[must_use]
pub fn links_present(links_dir: &Path) -> bool {
    PROGRAMS.iter().any(|p| links_dir.join(p).exists())
}
