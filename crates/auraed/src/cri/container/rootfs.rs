//! A container's root filesystem: overlayfs with the image's unpacked
//! layers (the image store keeps each under `layers/sha256/<hex>/`, already
//! in overlayfs form: whiteouts as 0/0 character devices, opaque dirs
//! marked) as read-only lower dirs and the container's own `upper`/`work`
//! under its directory. Mounted at CreateContainer, unmounted at
//! RemoveContainer (and when creating fails).

use std::{
    io,
    path::{Path, PathBuf},
};

use nix::mount::{umount2, MntFlags, MsFlags};

/// The lower dirs, topmost first (overlayfs order); `layers` is the
/// image's order (base first).
pub fn lowerdir(layers: &[PathBuf]) -> String {
    layers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// Mounts the overlay at `dir/rootfs`.
pub fn mount(dir: &Path, layers: &[PathBuf]) -> io::Result<PathBuf> {
    if layers.is_empty() {
        return Err(io::Error::other("the image has no layers"));
    }
    for l in layers {
        // ':' and ',' separate overlayfs options; store paths hold neither.
        let s = l.display().to_string();
        if s.contains([':', ',']) {
            return Err(io::Error::other(format!("layer path {s} is not usable")));
        }
    }
    let upper = dir.join("upper");
    let work = dir.join("work");
    let rootfs = dir.join("rootfs");
    for d in [&upper, &work, &rootfs] {
        std::fs::create_dir_all(d)?;
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowerdir(layers),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| io::Error::other(format!("mount overlay on {}: {e}", rootfs.display())))?;
    Ok(rootfs)
}

/// Unmounts `dir/rootfs` if mounted (detached: a process that still has a
/// cwd there must not keep the container from being removed).
pub fn unmount(dir: &Path) -> io::Result<()> {
    let rootfs = dir.join("rootfs");
    loop {
        match umount2(&rootfs, MntFlags::MNT_DETACH) {
            Ok(()) => continue, // stacked mounts: until none is left
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => {
                return Err(io::Error::other(format!(
                    "unmount {}: {e}",
                    rootfs.display()
                )))
            }
        }
    }
}

/// Bytes and inodes under `dir` (the writable layer), not following links.
pub fn usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0;
    let mut inodes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            inodes += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowerdirs_are_topmost_first() {
        let l = vec![PathBuf::from("/s/base"), PathBuf::from("/s/top")];
        assert_eq!(lowerdir(&l), "/s/top:/s/base");
    }
}
