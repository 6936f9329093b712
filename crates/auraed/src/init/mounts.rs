//! The kernel's virtual filesystems, and cgroup2 ready for delegation.

use std::{io, path::Path};

use nix::mount::{mount, MsFlags};

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const fn m(
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
) -> Mount {
    Mount {
        source,
        target,
        fstype,
        flags,
        data,
    }
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// In order: later targets live inside earlier ones.
const MOUNTS: [Mount; 7] = [
    m("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, None),
    m("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, None),
    m(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    ),
    m(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        Some("gid=5,mode=0620,ptmxmode=0666"),
    ),
    m(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        Some("mode=1777"),
    ),
    m(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        Some("mode=0755"),
    ),
    m(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        NOSUID_NODEV_NOEXEC,
        Some("nsdelegate"),
    ),
];

/// Mounts what is not mounted yet (so `--init` on a running system, or a
/// second start, changes nothing).
pub fn mount_all() {
    for mnt in &MOUNTS {
        if is_mount_point(mnt.target) {
            continue;
        }
        if let Err(e) = std::fs::create_dir_all(mnt.target) {
            tracing::warn!("cannot create {}: {e}", mnt.target);
            continue;
        }
        match mount(
            Some(mnt.source),
            mnt.target,
            Some(mnt.fstype),
            mnt.flags,
            mnt.data,
        ) {
            Ok(()) => tracing::debug!("mounted {} on {}", mnt.fstype, mnt.target),
            Err(e) => tracing::warn!("cannot mount {} on {}: {e}", mnt.fstype, mnt.target),
        }
    }
}

/// True if `path` is listed as a mount point in /proc/self/mountinfo
/// (before /proc is mounted nothing is, except `/`).
fn is_mount_point(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|t| t.lines().any(|l| l.split_whitespace().nth(4) == Some(path)))
}

/// Enables every available controller in the root's subtree_control, so
/// the cells' v2 backend can delegate cpu, cpuset, memory, pids and io.
pub fn delegate_controllers(root: &Path) -> io::Result<()> {
    let available = std::fs::read_to_string(root.join("cgroup.controllers"))?;
    let wanted: Vec<String> = available
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect();
    // One write per controller: one that the kernel refuses (e.g. rdma
    // without a device) must not keep the others off.
    for c in &wanted {
        if let Err(e) = std::fs::write(root.join("cgroup.subtree_control"), c) {
            tracing::warn!("cgroup2: cannot enable {c}: {e}");
        }
    }
    tracing::info!(
        "cgroup2: delegated {}",
        std::fs::read_to_string(root.join("cgroup.subtree_control"))?.trim()
    );
    Ok(())
}
