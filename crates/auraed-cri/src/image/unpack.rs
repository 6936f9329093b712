//! Unpacking one OCI image layer (a tar, optionally gzip-compressed) into a
//! directory of its own that overlayfs can use as a lower directory.
//!
//! Each layer is unpacked alone, so a layer shared by several images is on
//! disk once. What the OCI image spec ("Representing changes") expresses in
//! the tar is translated to overlayfs' own format:
//! - a whiteout `.wh.NAME` becomes a character device 0/0 named `NAME`
//!   (overlayfs hides `NAME` of the layers below);
//! - an opaque marker `.wh..wh..opq` in a directory sets
//!   `trusted.overlay.opaque=y` on it (nothing below shows through);
//! - other `.wh..wh.*` names (aufs bookkeeping) are ignored.
//!
//! Hard links may name a file of this layer or of a layer below it; a file
//! from below is first copied into this layer (overlayfs cannot link across
//! layers). Character and block devices and FIFOs are created with mknod
//! (as root); where the kernel refuses (no CAP_MKNOD) they are skipped and
//! counted, as the spec allows. Ownership is kept when running as root.
//! Entries naming `..` are skipped; nothing is ever written through a
//! symbolic link (tar's own check for regular entries, ours for whiteouts
//! and devices).
//!
//! The uncompressed stream is hashed on the way: the caller compares the
//! result with the config's `rootfs.diff_ids`.

use std::{
    ffi::CString,
    fs,
    io::{self, Read},
    os::unix::ffi::OsStrExt,
    path::{Component, Path, PathBuf},
};

use sha2::{Digest, Sha256};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer is {0}-compressed, which is not supported (only tar and tar+gzip)")]
    Unsupported(&'static str),
    #[error("entry {path:?}: {source}")]
    Entry { path: String, source: io::Error },
    #[error("entry {path:?}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("reading the layer: {0}")]
    Read(#[from] io::Error),
}

/// What unpacking one layer did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// `sha256:<hex>` of the uncompressed tar (the layer's diff id).
    pub diff_id: String,
    pub entries: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    /// Device nodes and FIFOs the kernel did not let us create.
    pub skipped_devices: u64,
    /// Hard links whose target came from a lower layer (copied up).
    pub copied_up: u64,
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks the layer read from `blob` (tar or tar+gzip, told apart by the
/// magic bytes) into `dest`, which must exist and be empty. `lowers` are the
/// directories of the layers below it, topmost first (for hard links to
/// their files).
pub fn unpack_layer(
    blob: impl Read,
    dest: &Path,
    lowers: &[PathBuf],
) -> Result<Unpacked, UnpackError> {
    let mut blob = io::BufReader::new(blob);
    let magic = {
        use io::BufRead;
        let buf = blob.fill_buf()?;
        buf.get(..4).map(|m| [m[0], m[1], m[2], m[3]])
    };
    let tar: Box<dyn Read> = match magic {
        Some([0x1f, 0x8b, _, _]) => Box::new(flate2::read::GzDecoder::new(blob)),
        Some([0x28, 0xb5, 0x2f, 0xfd]) => return Err(UnpackError::Unsupported("zstd")),
        Some([b'B', b'Z', b'h', _]) => return Err(UnpackError::Unsupported("bzip2")),
        Some([0xfd, b'7', b'z', b'X']) => return Err(UnpackError::Unsupported("xz")),
        _ => Box::new(blob),
    };
    let mut reader = HashingReader {
        inner: tar,
        hash: Sha256::new(),
    };
    let mut stats = unpack_tar(&mut reader, dest, lowers)?;
    // The tar may end before the stream does (padding blocks): the diff id
    // covers every byte.
    io::copy(&mut reader, &mut io::sink())?;
    stats.diff_id = format!("sha256:{}", hex::encode(reader.hash.finalize()));
    Ok(stats)
}

fn unpack_tar(tar: impl Read, dest: &Path, lowers: &[PathBuf]) -> Result<Unpacked, UnpackError> {
    let root = nix::unistd::geteuid().is_root();
    let mut archive = tar::Archive::new(tar);
    let mut stats = Unpacked::default();
    for entry in archive.entries()? {
        let mut entry = entry?;
        stats.entries += 1;
        let raw = entry.path()?.into_owned();
        let shown = raw.to_string_lossy().into_owned();
        let entry_err = |source: io::Error| UnpackError::Entry {
            path: shown.clone(),
            source,
        };
        let Some(rel) = clean(&raw) else {
            tracing::debug!("layer entry {shown:?} leaves the layer; skipped");
            continue;
        };
        let Some(name) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue; // the root itself
        };

        if name == OPAQUE_MARKER {
            let dir = prepare_parent(dest, &rel).map_err(entry_err)?;
            set_opaque(&dir).map_err(entry_err)?;
            stats.opaque_dirs += 1;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.starts_with(WHITEOUT_PREFIX) {
                continue; // .wh..wh.plnk and friends: aufs metadata
            }
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(UnpackError::Invalid {
                    path: shown,
                    reason: "whiteout of nothing".into(),
                });
            }
            let dir = prepare_parent(dest, &rel).map_err(entry_err)?;
            let target = dir.join(hidden);
            remove_any(&target).map_err(entry_err)?;
            mknod(&target, libc::S_IFCHR, 0).map_err(entry_err)?;
            stats.whiteouts += 1;
            continue;
        }

        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            let dir = prepare_parent(dest, &rel).map_err(entry_err)?;
            let target = dir.join(&name);
            remove_any(&target).map_err(entry_err)?;
            let header = entry.header();
            let perm = header.mode().map_err(entry_err)? & 0o7777;
            let (fmt, dev) = if kind.is_fifo() {
                (libc::S_IFIFO, 0)
            } else {
                let major = header.device_major().map_err(entry_err)?.unwrap_or(0);
                let minor = header.device_minor().map_err(entry_err)?.unwrap_or(0);
                let fmt = if kind.is_character_special() {
                    libc::S_IFCHR
                } else {
                    libc::S_IFBLK
                };
                (fmt, libc::makedev(major, minor))
            };
            match mknod(&target, fmt | perm, dev) {
                Ok(()) => {
                    if root {
                        let (uid, gid) = (
                            header.uid().map_err(entry_err)?,
                            header.gid().map_err(entry_err)?,
                        );
                        lchown(&target, uid as u32, gid as u32).map_err(entry_err)?;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    tracing::debug!("layer entry {shown:?}: mknod refused; skipped");
                    stats.skipped_devices += 1;
                }
                Err(e) => return Err(entry_err(e)),
            }
            continue;
        }

        if kind.is_hard_link() {
            let link = entry
                .link_name()
                .map_err(entry_err)?
                .map(|l| l.into_owned())
                .ok_or_else(|| UnpackError::Invalid {
                    path: shown.clone(),
                    reason: "hard link without a target".into(),
                })?;
            let link_rel = clean(&link).ok_or_else(|| UnpackError::Invalid {
                path: shown.clone(),
                reason: format!("hard link target {link:?} leaves the layer"),
            })?;
            if fs::symlink_metadata(dest.join(&link_rel)).is_err()
                && copy_up(dest, &link_rel, lowers).map_err(entry_err)?
            {
                stats.copied_up += 1;
            }
            // Linked here rather than by the tar reader, which would take an
            // absolute target (`/bin/busybox`, common in images) as a host path.
            let source = dest.join(&link_rel);
            check_no_symlinks(dest, &link_rel).map_err(entry_err)?;
            let dir = prepare_parent(dest, &rel).map_err(entry_err)?;
            let target = dir.join(&name);
            remove_any(&target).map_err(entry_err)?;
            fs::hard_link(&source, &target).map_err(entry_err)?;
            continue;
        }

        // A non-directory may replace a directory of the same name (or the
        // other way round) within one layer: the later entry wins.
        if !kind.is_dir() {
            if let Ok(m) = fs::symlink_metadata(dest.join(&rel)) {
                if m.is_dir() {
                    fs::remove_dir_all(dest.join(&rel)).map_err(entry_err)?;
                }
            }
        }
        entry.set_preserve_permissions(true);
        entry.set_preserve_mtime(true);
        entry.set_unpack_xattrs(true);
        // tar applies ownership only through Archive::unpack; here for root.
        if !entry.unpack_in(dest).map_err(entry_err)? {
            tracing::debug!("layer entry {shown:?} skipped by the tar reader");
            continue;
        }
        if root {
            let header = entry.header();
            let (uid, gid) = (
                header.uid().map_err(entry_err)?,
                header.gid().map_err(entry_err)?,
            );
            lchown(&dest.join(&rel), uid as u32, gid as u32).map_err(entry_err)?;
            // chown(2) clears the setuid and setgid bits: put them back
            // (setuid binaries must work where no_new_privs is off).
            let mode = header.mode().map_err(entry_err)? & 0o7777;
            if mode & 0o6000 != 0 && !kind.is_symlink() && !kind.is_hard_link() {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(dest.join(&rel), fs::Permissions::from_mode(mode))
                    .map_err(entry_err)?;
            }
        }
    }
    // Directories' mtimes are reset by the entries written into them
    // afterwards, which does not matter to a container.
    Ok(stats)
}

/// The entry's path relative to the layer root: leading `/` and `.` parts
/// dropped; None if it contains `..` or is empty.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return None,
            Component::Normal(p) => out.push(p),
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Makes sure the parent directory of `rel` exists under `dest` without
/// passing through a symbolic link, and returns it.
fn prepare_parent(dest: &Path, rel: &Path) -> io::Result<PathBuf> {
    let mut dir = dest.to_path_buf();
    if let Some(parent) = rel.parent() {
        for part in parent.components() {
            dir.push(part);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(io::Error::other(format!(
                        "{} is not a directory (a symbolic link?)",
                        dir.display()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&dir)?,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(dir)
}

/// Fails if a directory on the way to `rel` under `dest` is a symbolic link
/// (a hard link through one could name a file outside the layer).
fn check_no_symlinks(dest: &Path, rel: &Path) -> io::Result<()> {
    let mut p = dest.to_path_buf();
    if let Some(parent) = rel.parent() {
        for part in parent.components() {
            p.push(part);
            if fs::symlink_metadata(&p)?.file_type().is_symlink() {
                return Err(io::Error::other(format!(
                    "{} is a symbolic link",
                    p.display()
                )));
            }
        }
    }
    Ok(())
}

/// Removes whatever is at `path` (never following a symbolic link).
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Copies the regular file `rel` from the topmost lower layer that has it
/// into `dest`, so that a hard link in this layer can name it. Returns
/// false when no lower layer has it (the link then fails with a clear
/// error from the tar reader).
fn copy_up(dest: &Path, rel: &Path, lowers: &[PathBuf]) -> io::Result<bool> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    for lower in lowers {
        let Ok(m) = fs::symlink_metadata(lower.join(rel)) else {
            continue;
        };
        if m.file_type().is_char_device() && m.rdev() == 0 {
            return Ok(false); // whited out in that layer
        }
        if !m.is_file() {
            return Ok(false);
        }
        let parent = prepare_parent(dest, rel)?;
        let Some(name) = rel.file_name() else {
            return Ok(false);
        };
        let target = parent.join(name);
        fs::copy(lower.join(rel), &target)?;
        fs::set_permissions(&target, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        if nix::unistd::geteuid().is_root() {
            lchown(&target, m.uid(), m.gid())?;
        }
        return Ok(true);
    }
    Ok(false)
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::other("path contains NUL"))
}

fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    let p = cstring(path)?;
    // SAFETY: p is a valid NUL-terminated path; mknod reads nothing else.
    if unsafe { libc::mknod(p.as_ptr(), mode, dev) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

fn set_opaque(dir: &Path) -> io::Result<()> {
    let p = cstring(dir)?;
    let name = CString::new(OVERLAY_OPAQUE_XATTR).map_err(|_| io::Error::other("xattr name"))?;
    // SAFETY: valid NUL-terminated path and name; the value is 1 byte of a
    // static slice whose length is passed.
    let r = unsafe { libc::lsetxattr(p.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `path` in a layer directory is an overlayfs whiteout.
pub fn is_whiteout(path: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    fs::symlink_metadata(path)
        .map(|m| m.file_type().is_char_device() && m.rdev() == 0)
        .unwrap_or(false)
}

/// Whether a directory of a layer is marked opaque.
pub fn is_opaque(dir: &Path) -> bool {
    let (Ok(p), Ok(name)) = (cstring(dir), CString::new(OVERLAY_OPAQUE_XATTR)) else {
        return false;
    };
    let mut buf = [0u8; 4];
    // SAFETY: valid NUL-terminated strings; buf's length is passed.
    let n = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n == 1 && buf[0] == b'y'
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A tar built in memory, entry by entry.
    struct TarBuilder(tar::Builder<Vec<u8>>);

    impl TarBuilder {
        fn new() -> Self {
            TarBuilder(tar::Builder::new(Vec::new()))
        }
        fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_path(path).expect("path");
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(size);
            h.set_uid(1234);
            h.set_gid(5678);
            h.set_mtime(1_000_000);
            h.set_cksum();
            h
        }
        fn dir(mut self, path: &str) -> Self {
            let h = Self::header(path, tar::EntryType::Directory, 0o755, 0);
            self.0.append(&h, io::empty()).expect("append");
            self
        }
        fn file(mut self, path: &str, data: &[u8]) -> Self {
            let h = Self::header(path, tar::EntryType::Regular, 0o640, data.len() as u64);
            self.0.append(&h, data).expect("append");
            self
        }
        fn link(mut self, path: &str, target: &str, kind: tar::EntryType) -> Self {
            let mut h = Self::header(path, kind, 0o777, 0);
            h.set_link_name(target).expect("link name");
            h.set_cksum();
            self.0.append(&h, io::empty()).expect("append");
            self
        }
        fn node(mut self, path: &str, kind: tar::EntryType, major: u32, minor: u32) -> Self {
            let mut h = Self::header(path, kind, 0o600, 0);
            h.set_device_major(major).expect("major");
            h.set_device_minor(minor).expect("minor");
            h.set_cksum();
            self.0.append(&h, io::empty()).expect("append");
            self
        }
        fn raw_path(mut self, path: &[u8], data: &[u8]) -> Self {
            // Bypasses the builder's own `..` check to produce a hostile tar.
            let mut h = Self::header(
                "placeholder",
                tar::EntryType::Regular,
                0o644,
                data.len() as u64,
            );
            let name = &mut h.as_old_mut().name;
            name.fill(0);
            name[..path.len()].copy_from_slice(path);
            h.set_cksum();
            self.0.append(&h, data).expect("append");
            self
        }
        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().expect("finish")
        }
        fn gzip(self) -> Vec<u8> {
            use std::io::Write;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&self.bytes()).expect("gzip");
            gz.finish().expect("gzip")
        }
    }

    fn unpack(bytes: &[u8], lowers: &[PathBuf]) -> (tempfile::TempDir, Unpacked) {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = unpack_layer(bytes, dir.path(), lowers).expect("unpack");
        (dir, stats)
    }

    #[test]
    fn files_dirs_symlinks_and_the_diff_id() {
        let tar = TarBuilder::new()
            .dir("etc/")
            .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
            .link("bin", "usr/bin", tar::EntryType::Symlink)
            .bytes();
        let expected = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
        let (plain_dir, plain) = unpack(&tar, &[]);
        assert_eq!(plain.diff_id, expected);
        let gz = {
            let mut b = TarBuilder::new().dir("etc/");
            b = b.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n");
            b.link("bin", "usr/bin", tar::EntryType::Symlink).gzip()
        };
        let (gz_dir, gz_stats) = unpack(&gz, &[]);
        // Same tar bytes inside the gzip: the same diff id.
        assert_eq!(gz_stats.diff_id, expected);
        for d in [plain_dir.path(), gz_dir.path()] {
            let m = fs::metadata(d.join("etc/passwd")).expect("passwd");
            assert_eq!(m.permissions().mode() & 0o7777, 0o640);
            assert_eq!(m.mtime(), 1_000_000);
            if nix::unistd::geteuid().is_root() {
                assert_eq!((m.uid(), m.gid()), (1234, 5678));
            }
            assert_eq!(
                fs::read_link(d.join("bin")).expect("symlink"),
                Path::new("usr/bin")
            );
        }
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        let tar = TarBuilder::new()
            .dir("etc/")
            .file("etc/.wh.shadow", b"")
            .file(".wh.tmp", b"")
            .file("etc/.wh..wh.plnk", b"")
            .bytes();
        let (dir, stats) = unpack(&tar, &[]);
        assert_eq!(stats.whiteouts, 2);
        assert!(is_whiteout(&dir.path().join("etc/shadow")));
        assert!(is_whiteout(&dir.path().join("tmp")));
        // The markers themselves are not in the layer.
        assert!(fs::symlink_metadata(dir.path().join("etc/.wh.shadow")).is_err());
        assert!(fs::symlink_metadata(dir.path().join("etc/.wh..wh.plnk")).is_err());
    }

    #[test]
    fn opaque_directories_are_marked() {
        let tar = TarBuilder::new()
            .dir("var/")
            .dir("var/cache/")
            .file("var/cache/.wh..wh..opq", b"")
            .file("var/cache/new", b"kept")
            .file("opt/sub/.wh..wh..opq", b"") // parent not in the tar
            .bytes();
        let (dir, stats) = unpack(&tar, &[]);
        assert_eq!(stats.opaque_dirs, 2);
        assert!(is_opaque(&dir.path().join("var/cache")));
        assert!(is_opaque(&dir.path().join("opt/sub")));
        assert!(!is_opaque(&dir.path().join("var")));
        assert_eq!(
            fs::read(dir.path().join("var/cache/new")).expect("new"),
            b"kept"
        );
        assert!(fs::symlink_metadata(dir.path().join("var/cache/.wh..wh..opq")).is_err());
    }

    #[test]
    fn hard_links_within_the_layer_share_the_inode() {
        let tar = TarBuilder::new()
            .dir("bin/")
            .file("bin/busybox", b"#!busybox")
            .link("bin/sh", "bin/busybox", tar::EntryType::Link)
            .link("bin/ls", "/bin/busybox", tar::EntryType::Link)
            .bytes();
        let (dir, _) = unpack(&tar, &[]);
        let ino = |p: &str| fs::metadata(dir.path().join(p)).expect(p).ino();
        assert_eq!(ino("bin/sh"), ino("bin/busybox"));
        assert_eq!(ino("bin/ls"), ino("bin/busybox"));
        assert_eq!(
            fs::metadata(dir.path().join("bin/busybox"))
                .expect("bb")
                .nlink(),
            3
        );
    }

    #[test]
    fn hard_links_to_a_lower_layer_copy_the_file_up() {
        let lower = TarBuilder::new()
            .dir("bin/")
            .file("bin/busybox", b"#!busybox")
            .bytes();
        let (lower_dir, _) = unpack(&lower, &[]);
        let upper = TarBuilder::new()
            .link("usr/bin/sh", "bin/busybox", tar::EntryType::Link)
            .bytes();
        // usr/bin does not exist: the tar reader creates parents.
        let (dir, stats) = unpack(&upper, &[lower_dir.path().to_path_buf()]);
        assert_eq!(stats.copied_up, 1);
        assert_eq!(
            fs::read(dir.path().join("usr/bin/sh")).expect("sh"),
            b"#!busybox"
        );
        let ino = |p: &str| fs::metadata(dir.path().join(p)).expect(p).ino();
        assert_eq!(ino("usr/bin/sh"), ino("bin/busybox"));
        // A link to a file no layer has is an error, not a silent skip.
        let dangling = TarBuilder::new()
            .link("x", "nowhere", tar::EntryType::Link)
            .bytes();
        let d = tempfile::tempdir().expect("tempdir");
        assert!(unpack_layer(&dangling[..], d.path(), &[]).is_err());
    }

    #[test]
    fn device_nodes_and_fifos() {
        let tar = TarBuilder::new()
            .dir("dev/")
            .node("dev/null", tar::EntryType::Char, 1, 3)
            .node("dev/loop9", tar::EntryType::Block, 7, 9)
            .node("run/fifo", tar::EntryType::Fifo, 0, 0)
            .bytes();
        let (dir, stats) = unpack(&tar, &[]);
        use std::os::unix::fs::FileTypeExt;
        let fifo = fs::symlink_metadata(dir.path().join("run/fifo")).expect("fifo");
        assert!(fifo.file_type().is_fifo());
        if stats.skipped_devices == 0 {
            let null = fs::symlink_metadata(dir.path().join("dev/null")).expect("null");
            assert!(null.file_type().is_char_device());
            assert_eq!(null.rdev(), libc::makedev(1, 3));
            let lp = fs::symlink_metadata(dir.path().join("dev/loop9")).expect("loop");
            assert!(lp.file_type().is_block_device());
        } else {
            assert_eq!(stats.skipped_devices, 2);
        }
    }

    #[test]
    fn entries_outside_the_layer_are_not_written() {
        let outer = tempfile::tempdir().expect("tempdir");
        let dest = outer.path().join("layer");
        fs::create_dir(&dest).expect("mkdir");
        let tar = TarBuilder::new()
            .raw_path(b"../escaped", b"x")
            .link("out", "/", tar::EntryType::Symlink)
            .raw_path(b"out/.wh.escaped2", b"")
            .bytes();
        let r = unpack_layer(&tar[..], &dest, &[]);
        assert!(fs::symlink_metadata(outer.path().join("escaped")).is_err());
        assert!(fs::symlink_metadata(Path::new("/escaped2")).is_err());
        // The whiteout through the symlink is refused, loudly.
        assert!(r.is_err(), "{r:?}");
    }

    #[test]
    fn zstd_is_refused_clearly() {
        let r = unpack_layer(
            &[0x28u8, 0xb5, 0x2f, 0xfd, 0, 0][..],
            Path::new("/nonexistent"),
            &[],
        );
        assert!(matches!(r, Err(UnpackError::Unsupported("zstd"))), "{r:?}");
    }
}
