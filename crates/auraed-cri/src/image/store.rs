//! The content-addressed image store, under `<library-dir>/cri/images/`:
//!
//! ```text
//! blobs/sha256/<hex>    manifests, configs and layer blobs, as pulled (verified)
//! layers/sha256/<hex>/  each layer unpacked (key: the layer blob's digest), an overlayfs lowerdir
//! images.json           the image records: id (config digest), tags, digests, layers
//! tmp/                  downloads and unpacks in progress (emptied at open)
//! ```
//!
//! A blob or layer shared by several images is stored once; removing an
//! image removes what no remaining image refers to. Every file appears
//! under its final name whole (written in `tmp/`, then renamed), and
//! `images.json` is rewritten whole (temp file, fsync, rename).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("image store index {path} is unreadable: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error("{0:?} is not a sha256 digest")]
    BadDigest(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The blob's digest (compressed), as in the manifest.
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// The uncompressed tar's digest, as in the config's `rootfs.diff_ids`.
    pub diff_id: String,
}

/// One image: what ListImages/ImageStatus report and what containers need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The config's digest, `sha256:<hex>` (the CRI image id).
    pub id: String,
    /// `registry/repository:tag`, normalized (`docker.io/library/busybox:latest`).
    pub repo_tags: Vec<String>,
    /// `registry/repository@sha256:<manifest digest>`.
    pub repo_digests: Vec<String>,
    pub manifest_digest: String,
    pub config_media_type: String,
    pub layers: Vec<LayerRecord>,
    /// Bytes of the config and layer blobs (what the manifest lists).
    pub size: u64,
    #[serde(default)]
    pub pinned: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    images: BTreeMap<String, ImageRecord>,
}

pub struct Store {
    root: PathBuf,
    index: Mutex<Index>,
    /// Blobs and layers pulls in progress use (digest -> pulls), which
    /// garbage collection leaves alone.
    leased: Mutex<BTreeMap<String, usize>>,
}

/// Keeps the blobs and layers of a pull in progress from being collected
/// until it is dropped (after the image is recorded).
pub struct Lease<'a> {
    store: &'a Store,
    digests: Vec<String>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut leased = self.store.leased.lock().unwrap_or_else(|p| p.into_inner());
        for d in &self.digests {
            if let Some(n) = leased.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    leased.remove(d);
                }
            }
        }
    }
}

/// The hex part of `sha256:<64 hex>`, refusing anything else (digests name
/// files: nothing but hex may reach a path).
pub fn digest_hex(digest: &str) -> Result<&str, StoreError> {
    match digest.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            Ok(h)
        }
        _ => Err(StoreError::BadDigest(digest.to_string())),
    }
}

impl Store {
    /// Opens (creating) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        for sub in ["blobs/sha256", "layers/sha256", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        // Left over by a daemon that stopped mid-pull.
        let tmp = root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))?.flatten() {
            let _ = remove_any(&e.path());
        }
        let path = root.join("images.json");
        let index = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Index {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Index::default(),
            Err(e) => return Err(io_err(&path)(e)),
        };
        Ok(Store {
            root,
            index: Mutex::new(index),
            leased: Mutex::new(BTreeMap::new()),
        })
    }

    /// Protects `digests` from garbage collection while the lease lives.
    pub fn lease(&self, digests: impl IntoIterator<Item = String>) -> Lease<'_> {
        let digests: Vec<String> = digests.into_iter().collect();
        let mut leased = self.leased.lock().unwrap_or_else(|p| p.into_inner());
        for d in &digests {
            *leased.entry(d.clone()).or_insert(0) += 1;
        }
        Lease {
            store: self,
            digests,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    pub fn layer_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join("layers/sha256").join(digest_hex(digest)?))
    }

    /// A fresh path in `tmp/` for a download or unpack in progress.
    pub fn temp_path(&self, what: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    /// Moves a finished temp file or directory to its final place; if
    /// another pull got there first, keeps theirs.
    pub fn commit(&self, tmp: &Path, dest: &Path) -> Result<(), StoreError> {
        if dest.exists() {
            let _ = remove_any(tmp);
            return Ok(());
        }
        match fs::rename(tmp, dest) {
            Ok(()) => Ok(()),
            Err(_) if dest.exists() => {
                let _ = remove_any(tmp);
                Ok(())
            }
            Err(e) => Err(io_err(dest)(e)),
        }
    }

    /// Writes a small blob (manifest, config) whose digest the caller has
    /// verified.
    pub fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let dest = self.blob_path(digest)?;
        if dest.exists() {
            return Ok(());
        }
        let tmp = self.temp_path("blob");
        fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        self.commit(&tmp, &dest)
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let p = self.blob_path(digest)?;
        fs::read(&p).map_err(io_err(&p))
    }

    pub fn list(&self) -> Vec<ImageRecord> {
        self.lock().images.values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        // A panic while holding the lock cannot leave the map half-changed
        // (every change is one insert/remove): the data is still good.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Finds an image by id (`sha256:<hex>`, or the hex alone, or a unique
    /// prefix of at least 12 hex digits), by a tag or a digest reference
    /// (already normalized by the caller: `reference`), in that order.
    pub fn find(&self, spec: &str, reference: Option<&str>) -> Option<ImageRecord> {
        let index = self.lock();
        let id = if spec.starts_with("sha256:") {
            spec.to_string()
        } else {
            format!("sha256:{spec}")
        };
        if let Some(img) = index.images.get(&id) {
            return Some(img.clone());
        }
        if let Some(r) = reference {
            if let Some(img) = index.images.values().find(|i| {
                i.repo_tags.iter().any(|t| t == r) || i.repo_digests.iter().any(|d| d == r)
            }) {
                return Some(img.clone());
            }
        }
        let hex = id.trim_start_matches("sha256:");
        if hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut hits = index.images.values().filter(|i| i.id[7..].starts_with(hex));
            if let (Some(one), None) = (hits.next(), hits.next()) {
                return Some(one.clone());
            }
        }
        None
    }

    /// Records a pulled image: a new one, or more tags/digests on the same
    /// id. A tag names one image: an older image that had it loses it (and
    /// is forgotten if nothing names it any more; its files then go).
    pub fn add(&self, image: ImageRecord) -> Result<ImageRecord, StoreError> {
        let mut index = self.lock();
        for other in index.images.values_mut() {
            if other.id != image.id {
                other.repo_tags.retain(|t| !image.repo_tags.contains(t));
            }
        }
        let merged = match index.images.get(&image.id) {
            Some(old) => {
                let mut m = old.clone();
                for t in &image.repo_tags {
                    if !m.repo_tags.contains(t) {
                        m.repo_tags.push(t.clone());
                    }
                }
                for d in &image.repo_digests {
                    if !m.repo_digests.contains(d) {
                        m.repo_digests.push(d.clone());
                    }
                }
                m
            }
            None => image,
        };
        index.images.insert(merged.id.clone(), merged.clone());
        let before = index.images.len();
        index.images.retain(|_, i| {
            !(i.repo_tags.is_empty() && i.repo_digests.is_empty()) || i.id == merged.id
        });
        self.save(&index)?;
        if index.images.len() < before {
            self.collect_garbage(&index);
        }
        Ok(merged)
    }

    /// Removes the image `id` and whatever only it used. Removing an image
    /// that is not there succeeds (the CRI wants RemoveImage idempotent).
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let mut index = self.lock();
        let removed = index.images.remove(id).is_some();
        if removed {
            self.save(&index)?;
            self.collect_garbage(&index);
        }
        Ok(removed)
    }

    fn save(&self, index: &Index) -> Result<(), StoreError> {
        let path = self.root.join("images.json");
        let tmp = self.temp_path("index");
        let bytes = serde_json::to_vec_pretty(index).map_err(|e| StoreError::Index {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let write = || -> io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(io_err(&path))
    }

    /// Deletes blobs and unpacked layers that no image refers to and no
    /// pull in progress has leased.
    fn collect_garbage(&self, index: &Index) {
        let mut blobs: BTreeSet<String> = self
            .leased
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for img in index.images.values() {
            blobs.insert(img.id.clone());
            blobs.insert(img.manifest_digest.clone());
            for l in &img.layers {
                blobs.insert(l.digest.clone());
            }
        }
        for dir in ["blobs/sha256", "layers/sha256"] {
            let Ok(entries) = fs::read_dir(self.root.join(dir)) else {
                continue;
            };
            for e in entries.flatten() {
                let name = format!("sha256:{}", e.file_name().to_string_lossy());
                if !blobs.contains(&name) {
                    if let Err(err) = remove_any(&e.path()) {
                        tracing::warn!("image store: cannot remove {}: {err}", e.path().display());
                    }
                }
            }
        }
    }

    /// Bytes and inodes used by the store (for ImageFsInfo).
    pub fn usage(&self) -> (u64, u64) {
        fn walk(p: &Path, bytes: &mut u64, inodes: &mut u64) {
            use std::os::unix::fs::MetadataExt;
            let Ok(m) = fs::symlink_metadata(p) else {
                return;
            };
            *inodes += 1;
            *bytes += m.blocks() * 512;
            if m.is_dir() {
                if let Ok(rd) = fs::read_dir(p) {
                    for e in rd.flatten() {
                        walk(&e.path(), bytes, inodes);
                    }
                }
            }
        }
        let (mut bytes, mut inodes) = (0, 0);
        walk(&self.root, &mut bytes, &mut inodes);
        (bytes, inodes)
    }
}

pub(crate) fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn image(id: char, tag: &str, layers: &[char]) -> ImageRecord {
        ImageRecord {
            id: d(id),
            repo_tags: vec![tag.to_string()],
            repo_digests: vec![format!(
                "{}@{}",
                tag.split(':').next().unwrap_or(""),
                d('f')
            )],
            manifest_digest: d('f'),
            config_media_type: "application/vnd.oci.image.config.v1+json".into(),
            layers: layers
                .iter()
                .map(|c| LayerRecord {
                    digest: d(*c),
                    media_type: String::new(),
                    size: 1,
                    diff_id: d(*c),
                })
                .collect(),
            size: 2,
            pinned: false,
        }
    }

    #[test]
    fn shared_layers_stay_until_the_last_image_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        for c in ['1', '2', '3'] {
            fs::create_dir_all(s.layer_path(&d(c)).expect("p")).expect("mkdir");
            s.put_blob(&d(c), b"x").expect("blob");
        }
        s.add(image('a', "r/a:1", &['1', '2'])).expect("add a");
        s.add(image('b', "r/b:1", &['1', '3'])).expect("add b");
        s.remove(&d('a')).expect("remove");
        assert!(s.layer_path(&d('1')).expect("p").exists());
        assert!(!s.layer_path(&d('2')).expect("p").exists());
        assert!(s.blob_path(&d('3')).expect("p").exists());
        assert!(!s.remove(&d('a')).expect("again"), "removing twice is fine");
        // What a pull in progress leased survives the collection.
        fs::create_dir_all(s.layer_path(&d('4')).expect("p")).expect("mkdir");
        let lease = s.lease([d('4')]);
        s.add(image('c', "r/c:1", &['4'])).expect("add c");
        s.remove(&d('c')).expect("remove c");
        assert!(s.layer_path(&d('4')).expect("p").exists());
        drop(lease);
        s.add(image('e', "r/e:1", &[])).expect("add e");
        s.remove(&d('e')).expect("remove e");
        assert!(!s.layer_path(&d('4')).expect("p").exists());
        // Survives a reopen.
        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(s.list().len(), 1);
        assert!(s.find("r/b:1", Some("r/b:1")).is_some());
        assert!(s.find(&d('b')[7..19], None).is_some(), "a 12-digit prefix");
    }

    #[test]
    fn a_tag_names_one_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        s.add(image('a', "r/x:1", &[])).expect("a");
        let mut second = image('a', "r/x:2", &[]);
        second.repo_digests.clear();
        let merged = s.add(second).expect("same id, another tag");
        assert_eq!(merged.repo_tags, ["r/x:1", "r/x:2"]);
        // r/x:1 moves to image b: a keeps r/x:2.
        s.add(image('b', "r/x:1", &[])).expect("b");
        let a = s.find(&d('a'), None).expect("a");
        assert_eq!(a.repo_tags, ["r/x:2"]);
        assert!(digest_hex("sha256:../../etc").is_err());
    }
}
