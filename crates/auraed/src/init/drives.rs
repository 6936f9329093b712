//! The VM's drive mounts: the host attaches each as a virtio disk whose
//! serial is `aurae<N>` and asks for its mount on the kernel command line
//! (`aurae.mount=<serial>:<vm_path>:<fs_type>:<ro|rw>`, see
//! crates/auraed/src/host/hypervisor/mod.rs). Here, after the modules are
//! loaded (virtio_blk and the filesystems), each one's disk is found by
//! its serial in /sys/block/*/serial, waited for a bounded time (the
//! virtio probe may still be running), and mounted read-only unless `rw`.
//! Every failure is logged and survived.

use std::{
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::mount::{mount, MsFlags};

/// How long all the disks together may take to appear.
const WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRequest {
    pub serial: String,
    pub vm_path: String,
    pub fs_type: String,
    pub writable: bool,
}

/// Every well-formed `aurae.mount=` of the command line; malformed ones
/// are logged and skipped.
pub fn from_cmdline(cmdline: &str) -> Vec<MountRequest> {
    cmdline
        .split_whitespace()
        .filter_map(|a| a.strip_prefix("aurae.mount="))
        .filter_map(|v| {
            let r = parse(v);
            if r.is_none() {
                tracing::warn!("ignoring malformed aurae.mount={v} (serial:/path:fstype:ro|rw)");
            }
            r
        })
        .collect()
}

fn parse(v: &str) -> Option<MountRequest> {
    let mut p = v.split(':');
    let (serial, vm_path, fs_type, mode) = (p.next()?, p.next()?, p.next()?, p.next()?);
    if p.next().is_some()
        || serial.is_empty()
        || fs_type.is_empty()
        || !vm_path.starts_with('/')
        || vm_path.split('/').any(|c| c == "..")
    {
        return None;
    }
    let writable = match mode {
        "ro" => false,
        "rw" => true,
        _ => return None,
    };
    Some(MountRequest {
        serial: serial.to_owned(),
        vm_path: vm_path.to_owned(),
        fs_type: fs_type.to_owned(),
        writable,
    })
}

/// Mounts every request of the command line.
pub fn mount_all(cmdline: &str) {
    let requests = from_cmdline(cmdline);
    if requests.is_empty() {
        return;
    }
    let deadline = Instant::now() + WAIT;
    for r in &requests {
        match mount_one(r, deadline) {
            Ok(dev) => tracing::info!(
                "mounted {} ({}, serial {}) on {} {}",
                dev.display(),
                r.fs_type,
                r.serial,
                r.vm_path,
                if r.writable {
                    "read-write"
                } else {
                    "read-only"
                }
            ),
            Err(e) => tracing::error!(
                "drive mount {} ({}) on {} failed: {e}",
                r.serial,
                r.fs_type,
                r.vm_path
            ),
        }
    }
}

fn mount_one(r: &MountRequest, deadline: Instant) -> io::Result<PathBuf> {
    let dev = wait_for_serial(Path::new("/sys/block"), &r.serial, deadline)?;
    let dev = Path::new("/dev").join(dev);
    std::fs::create_dir_all(&r.vm_path)
        .map_err(|e| io::Error::new(e.kind(), format!("mkdir -p {}: {e}", r.vm_path)))?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !r.writable {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(
        Some(&dev),
        r.vm_path.as_str(),
        Some(r.fs_type.as_str()),
        flags,
        None::<&str>,
    )
    .map_err(|e| {
        let hint = if e == nix::errno::Errno::ENODEV {
            " (is the filesystem's module in the guest image's /etc/aurae/modules?)"
        } else {
            ""
        };
        io::Error::other(format!("mount {}: {e}{hint}", dev.display()))
    })?;
    Ok(dev)
}

/// The block device (`vdb`…) whose serial is `serial`, polling until
/// `deadline`.
fn wait_for_serial(sys_block: &Path, serial: &str, deadline: Instant) -> io::Result<String> {
    loop {
        if let Some(dev) = find_serial(sys_block, serial) {
            return Ok(dev);
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no disk with serial {serial} in {} within {WAIT:?}",
                    sys_block.display()
                ),
            ));
        }
        std::thread::sleep(POLL);
    }
}

fn find_serial(sys_block: &Path, serial: &str) -> Option<String> {
    std::fs::read_dir(sys_block)
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("serial")).is_ok_and(|s| s.trim() == serial)
        })
        .and_then(|e| e.file_name().to_str().map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mount_parameters() {
        let got = from_cmdline(
            "console=ttyS0 aurae.mount=aurae0:/data:ext4:ro quiet \
             aurae.mount=aurae1:/var/lib/x:vfat:rw aurae.mount=bad aurae.mount=a:rel:ext4:ro \
             aurae.mount=a:/x/../y:ext4:ro aurae.mount=a:/x:ext4:rx aurae.mount=a:/x:ext4:ro:z",
        );
        assert_eq!(
            got,
            vec![
                MountRequest {
                    serial: "aurae0".into(),
                    vm_path: "/data".into(),
                    fs_type: "ext4".into(),
                    writable: false,
                },
                MountRequest {
                    serial: "aurae1".into(),
                    vm_path: "/var/lib/x".into(),
                    fs_type: "vfat".into(),
                    writable: true,
                },
            ]
        );
    }

    #[test]
    fn finds_a_disk_by_serial() {
        let d = tempfile::tempdir().unwrap();
        for (dev, serial) in [("vda", ""), ("vdb", "aurae1\n"), ("vdc", "aurae0\n")] {
            std::fs::create_dir(d.path().join(dev)).unwrap();
            std::fs::write(d.path().join(dev).join("serial"), serial).unwrap();
        }
        std::fs::create_dir(d.path().join("loop0")).unwrap();
        let soon = Instant::now() + Duration::from_millis(100);
        assert_eq!(wait_for_serial(d.path(), "aurae0", soon).unwrap(), "vdc");
        assert_eq!(
            wait_for_serial(d.path(), "aurae9", soon)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }
}
