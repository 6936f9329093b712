//! The cells' state on disk, so that a new run of the daemon can re-adopt
//! what the last one left running (after a crash, `kill -9` or an upgrade).
//!
//! ```text
//! <runtime-dir>/state/
//!   cells/<a.b.c>.json     one CellRecord per cell ('/' in the name → '.')
//!   execs/<id>.json        one ExecRecord per executable (written here)
//!   execs/<id> -> <library-dir>/output/<id>/
//!                          its directory: exit.json and output, written by
//!                          its shim (see host::shim::format)
//! ```
//!
//! The runtime directory is the right home: what it describes (processes,
//! cgroups, namespaces) does not survive a reboot either. Every record is
//! written whole (temp file, rename; no fsync, see
//! `format::write_atomic`). A record that cannot be read is reported and
//! its workload cleaned, never guessed at.
//!
//! `holders/<id>.sock` are the spawn sockets of isolated cells' holders
//! (see `host::spawn::holder`), named in their cells' records.
//!
//! An executable's directory holds its output, which must not live in
//! memory: the runtime directory is usually a tmpfs (`/run`), whose pages
//! are charged to the writing cell's memory cgroup and cannot be reclaimed,
//! so a chatty executable in a small cell got OOM-killed by its own kept
//! output. So `execs/<id>` is a symlink to `<library-dir>/output/<id>`, a
//! directory on disk (page cache: reclaimable); everything that opens
//! `execs/<id>` (the shim's directory fd, readers, the adopter) follows it
//! unchanged, and real directories of earlier releases (with the record
//! inside, `execs/<id>/record.json`) still work. An output directory
//! without a link (the runtime directory went with a reboot) is removed
//! when the executables are loaded.
//!
//! Creating a file or directory on disk is an inode allocation (0.1-0.3 ms
//! on this VM's ext4, README "Why we are fast"), so the start path makes
//! none it can avoid: the record is on the runtime side (a tmpfs on most
//! hosts), and the next output directory is made ahead of time, off the
//! start path (`spare`).

use std::{
    io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use aurae_proto::cells::{Cell, CpuController, CpusetController, MemoryController};
use serde::{Deserialize, Serialize};

use crate::host::{
    proc::ProcId,
    shim::format::{self, Channel},
};

/// A cell as allocated: its spec and the holder of its namespaces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellRecord {
    pub name: String,
    pub spec: CellSpec,
    /// The holder (PID 1 of its pid namespace, or keeper of its network
    /// namespace), if the cell isolates.
    pub holder: Option<HolderRecord>,
    /// Nanoseconds since the Unix epoch.
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderRecord {
    pub pid: ProcId,
    /// For a nested pid namespace: the intermediate process whose child
    /// the holder is (see `host::spawn::spawn_nested_holder`).
    pub intermediate: Option<ProcId>,
    /// The holder's spawn socket (see `host::spawn::holder`); absent in
    /// records of holders that serve none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// The fields of an aurae `Cell`, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellSpec {
    pub cpu_weight: Option<u64>,
    pub cpu_max: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpus: Option<String>,
    pub mems: Option<String>,
    pub mem_min: Option<i64>,
    pub mem_low: Option<i64>,
    pub mem_high: Option<i64>,
    pub mem_max: Option<i64>,
    pub isolate_process: bool,
    pub isolate_network: bool,
}

impl CellSpec {
    pub fn of(c: &Cell) -> Self {
        let cpu = c.cpu.unwrap_or_default();
        let cpuset = c.cpuset.clone().unwrap_or_default();
        let mem = c.memory.unwrap_or_default();
        Self {
            cpu_weight: cpu.weight,
            cpu_max: cpu.max,
            cpu_period: cpu.period,
            cpus: cpuset.cpus,
            mems: cpuset.mems,
            mem_min: mem.min,
            mem_low: mem.low,
            mem_high: mem.high,
            mem_max: mem.max,
            isolate_process: c.isolate_process,
            isolate_network: c.isolate_network,
        }
    }

    pub fn to_cell(&self, name: &str) -> Cell {
        let cpu = CpuController {
            weight: self.cpu_weight,
            max: self.cpu_max,
            period: self.cpu_period,
        };
        let cpuset = CpusetController {
            cpus: self.cpus.clone(),
            mems: self.mems.clone(),
        };
        let memory = MemoryController {
            min: self.mem_min,
            low: self.mem_low,
            high: self.mem_high,
            max: self.mem_max,
        };
        Cell {
            name: name.to_owned(),
            cpu: (cpu != CpuController::default()).then_some(cpu),
            cpuset: (cpuset != CpusetController::default()).then_some(cpuset),
            memory: (memory != MemoryController::default()).then_some(memory),
            isolate_process: self.isolate_process,
            isolate_network: self.isolate_network,
        }
    }
}

/// An executable: what was asked, and the processes that run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRecord {
    pub id: String,
    pub name: String,
    /// None: the host context.
    pub cell: Option<String>,
    pub command: String,
    #[serde(default)]
    pub description: String,
    pub uid: u32,
    pub gid: u32,
    /// Its supervisor (the parent of the executable; see host::shim).
    pub shim: ProcId,
    /// The executable (`sh -c`), by host pid.
    pub pid: ProcId,
    /// Nanoseconds since the Unix epoch.
    pub started_at: i64,
}

/// The state directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    /// Where executables' directories really are (on disk).
    output: PathBuf,
    next_id: AtomicU64,
    /// The id of an output directory made ahead for the next executable.
    spare: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl Store {
    /// Opens (and creates) `<runtime-dir>/state`, and `output` for the
    /// executables' directories (`<library-dir>/output`).
    pub fn open(runtime_dir: &Path, output: &Path) -> io::Result<Self> {
        let root = runtime_dir.join("state");
        for d in [root.join("cells"), root.join("execs"), root.join("holders")] {
            std::fs::create_dir_all(&d)?;
        }
        set_mode(&root, 0o700)?;
        std::fs::create_dir_all(output)?;
        set_mode(output, 0o700)?;
        // Absolute: the links' targets are resolved from `state/execs`.
        let output = std::fs::canonicalize(output)?;
        Ok(Self {
            root,
            output,
            next_id: AtomicU64::new(0),
            spare: Default::default(),
        })
    }

    /// Where executables' output is kept (see the module comment).
    pub fn output_root(&self) -> &Path {
        &self.output
    }

    fn cell_path(&self, name: &str) -> PathBuf {
        self.root
            .join("cells")
            .join(format!("{}.json", name.replace('/', ".")))
    }

    pub fn write_cell(&self, r: &CellRecord) -> io::Result<()> {
        let data = serde_json::to_vec_pretty(r).map_err(io::Error::other)?;
        let path = self.cell_path(&r.name);
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default()
            .to_owned();
        format::write_atomic(&dir, &file, &data)
    }

    /// A fresh path for a holder's spawn socket, if it fits in a unix
    /// socket address (else the cell goes without: the daemon starts its
    /// shims itself).
    pub fn new_holder_socket(&self) -> Option<PathBuf> {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let p = self
            .root
            .join("holders")
            .join(format!("{:x}-{n}.sock", crate::logging::now_nanos()));
        (p.as_os_str().len() < 108).then_some(p)
    }

    pub fn remove_cell(&self, name: &str) {
        remove_file(&self.cell_path(name));
    }

    /// A fresh directory for a new executable: unique within this state
    /// directory, also across runs (the id starts with the time).
    /// Takes the spare output directory if one is ready, and has the next
    /// one made on a blocking thread (inside a tokio runtime).
    pub fn new_exec_dir(&self) -> io::Result<(String, PathBuf)> {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.make_spare();
        loop {
            let id = match spare.take() {
                Some(id) => id,
                None => {
                    let id = self.next_exec_id();
                    match std::fs::create_dir(self.output.join(&id)) {
                        Ok(()) => id,
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(e),
                    }
                }
            };
            let real = self.output.join(&id);
            let dir = self.root.join("execs").join(&id);
            if let Err(e) = std::os::unix::fs::symlink(&real, &dir) {
                let _ = std::fs::remove_dir_all(&real);
                if e.kind() == io::ErrorKind::AlreadyExists {
                    continue;
                }
                return Err(e);
            }
            return Ok((id, dir));
        }
    }

    fn next_exec_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n}", crate::logging::now_nanos())
    }

    /// Makes the next output directory in the background; none outside a
    /// tokio runtime (or if one is ready).
    fn make_spare(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let id = self.next_exec_id();
        let (path, slot) = (self.output.join(&id), self.spare.clone());
        rt.spawn_blocking(move || match std::fs::create_dir(&path) {
            Ok(()) => {
                // The temp files of what the shim writes at the end (the
                // channels' end markers, the exit status: see
                // `format::write_atomic_at`): made now, they are reused
                // by the shim's open and renamed into place, so the end of
                // an executable allocates no inode either.
                for name in [
                    Channel::Stdout.end_file(),
                    Channel::Stderr.end_file(),
                    format::EXIT.to_owned(),
                ] {
                    let tmp = path.join(format::temp_name(&name));
                    if let Err(e) = std::fs::File::create(&tmp) {
                        tracing::debug!("cannot make {}: {e}", tmp.display());
                    }
                }
                let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
                match s.as_ref() {
                    // Another one got there first: one spare is enough.
                    Some(_) => {
                        let _ = std::fs::remove_dir_all(&path);
                    }
                    None => *s = Some(id),
                }
            }
            Err(e) => tracing::debug!("cannot make {}: {e}", path.display()),
        });
    }

    /// Removes the spare output directory (when the daemon stops).
    pub fn drop_spare(&self) {
        if let Some(id) = self.spare.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = std::fs::remove_dir_all(self.output.join(id));
        }
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.root.join("execs").join(format!("{id}.json"))
    }

    pub fn exec_dir(&self, id: &str) -> PathBuf {
        self.root.join("execs").join(id)
    }

    pub fn write_exec(&self, r: &ExecRecord) -> io::Result<()> {
        let data = serde_json::to_vec_pretty(r).map_err(io::Error::other)?;
        format::write_atomic(&self.root.join("execs"), &format!("{}.json", r.id), &data)
    }

    /// Removes an executable's record and directory (exit status, output).
    pub fn remove_exec(&self, id: &str) {
        remove_file(&self.record_path(id));
        remove_exec_dir(&self.exec_dir(id));
    }

    /// Every cell record, parents before children. Unreadable ones are
    /// reported, removed and left out.
    pub fn load_cells(&self) -> Vec<CellRecord> {
        let mut out: Vec<CellRecord> = Vec::new();
        for (path, _) in entries(&self.root.join("cells")) {
            if path.extension().is_none_or(|e| e != "json") {
                // A temp file of a write that was cut short.
                remove_file(&path);
                continue;
            }
            match format::read_json::<CellRecord>(&path) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(
                        "unreadable cell record {} ({e}): removed; its cgroups are reclaimed",
                        path.display()
                    );
                    remove_file(&path);
                }
            }
        }
        out.sort_by(|a, b| {
            (a.name.matches('/').count(), &a.name).cmp(&(b.name.matches('/').count(), &b.name))
        });
        out
    }

    /// Every executable record. A directory without a readable record
    /// (a write cut short, or a crash between starting an executable and
    /// recording it) is reported and removed.
    ///
    /// Output directories no link points at any more are removed too.
    pub fn load_execs(&self) -> Vec<ExecRecord> {
        let mut out = Vec::new();
        let mut linked = std::collections::HashSet::new();
        let listed = entries(&self.root.join("execs"));
        for (dir, _) in &listed {
            let dir = dir.as_path();
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.ends_with(".json") || name.ends_with(".tmp") {
                // Records are read with their directories; a temp file is
                // a write that was cut short.
                if name.starts_with('.') {
                    remove_file(dir);
                }
                continue;
            }
            // Follows the link to the output directory.
            if !std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
                tracing::warn!(
                    "executable directory {} is gone: its record is removed",
                    dir.display()
                );
                remove_file(&self.record_path(name));
                remove_exec_dir(dir);
                continue;
            }
            // Beside the link; inside the directory in earlier releases.
            let record = match format::read_json::<ExecRecord>(&self.record_path(name)) {
                Ok(None) => format::read_json::<ExecRecord>(&dir.join(format::RECORD)),
                r => r,
            };
            match record {
                Ok(Some(r)) => {
                    // By name: the output directory is named by the id.
                    linked.insert(r.id.clone());
                    out.push(r)
                }
                Ok(None) => {
                    tracing::warn!(
                        "executable directory {} has no record (the daemon stopped while starting it): removed",
                        dir.display()
                    );
                    remove_exec_dir(dir);
                }
                Err(e) => {
                    tracing::warn!(
                        "unreadable executable record of {} ({e}): removed",
                        dir.display()
                    );
                    remove_file(&self.record_path(name));
                    remove_exec_dir(dir);
                }
            }
        }
        // Records without a directory (those just removed are gone already).
        for (path, _) in &listed {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if let Some(id) = name.strip_suffix(".json") {
                if !linked.contains(id) {
                    tracing::warn!("record {} has no directory: removed", path.display());
                    remove_file(path);
                }
            }
        }
        for (dir, is_dir) in entries(&self.output) {
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if linked.contains(name) {
                continue;
            }
            tracing::info!(
                "output directory {} belongs to no recorded executable (a spare, or the runtime directory went with a reboot): removed",
                dir.display()
            );
            let removed = if is_dir {
                std::fs::remove_dir_all(&dir)
            } else {
                std::fs::remove_file(&dir)
            };
            if let Err(e) = removed {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

/// Removes `state/execs/<id>`: the output directory it links to and the
/// link, or the real directory of an earlier release.
fn remove_exec_dir(dir: &Path) {
    let result = match std::fs::read_link(dir) {
        Ok(target) => match std::fs::remove_dir_all(&target) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err((target, e)),
            _ => std::fs::remove_file(dir).map_err(|e| (dir.to_owned(), e)),
        },
        // Not a link: a directory (or a stray file) of its own.
        Err(_) => std::fs::remove_dir_all(dir)
            .or_else(|e| match e.kind() {
                io::ErrorKind::NotFound => Ok(()),
                _ => std::fs::remove_file(dir),
            })
            .map_err(|e| (dir.to_owned(), e)),
    };
    if let Err((path, e)) = result {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

fn entries(dir: &Path) -> Vec<(PathBuf, bool)> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| (e.path(), e.file_type().is_ok_and(|t| t.is_dir())))
            .collect(),
        Err(e) => {
            tracing::warn!("cannot read {}: {e}", dir.display());
            Vec::new()
        }
    }
}

fn remove_file(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell() -> Cell {
        Cell {
            name: "a/b".into(),
            cpu: Some(CpuController {
                weight: Some(100),
                max: Some(50_000),
                period: None,
            }),
            cpuset: None,
            memory: Some(MemoryController {
                max: Some(1 << 20),
                ..Default::default()
            }),
            isolate_process: true,
            isolate_network: false,
        }
    }

    /// A record of `true` run by this test process.
    fn exec_record(id: &str, name: &str, cell: Option<&str>, started_at: i64) -> ExecRecord {
        let me = ProcId::of(std::process::id() as i32).unwrap();
        ExecRecord {
            id: id.to_owned(),
            name: name.to_owned(),
            cell: cell.map(str::to_owned),
            command: "true".into(),
            description: String::new(),
            uid: 0,
            gid: 0,
            shim: me,
            pid: me,
            started_at,
        }
    }

    #[test]
    fn cell_spec_round_trips() {
        let c = cell();
        assert_eq!(CellSpec::of(&c).to_cell("a/b"), c);
        let bare = Cell {
            name: "x".into(),
            ..Default::default()
        };
        assert_eq!(CellSpec::of(&bare).to_cell("x"), bare);
    }

    #[test]
    fn records_round_trip_and_torn_ones_are_dropped() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path(), &d.path().join("lib/output")).unwrap();
        let me = ProcId::of(std::process::id() as i32).unwrap();
        let parent = CellRecord {
            name: "a".into(),
            spec: CellSpec::default(),
            holder: Some(HolderRecord {
                pid: me,
                intermediate: None,
                socket: s.new_holder_socket(),
            }),
            created_at: 1,
        };
        let child = CellRecord {
            name: "a/b".into(),
            spec: CellSpec::of(&cell()),
            holder: None,
            created_at: 2,
        };
        s.write_cell(&child).unwrap();
        s.write_cell(&parent).unwrap();
        std::fs::write(d.path().join("state/cells/torn.json"), b"{\"name\":").unwrap();
        assert_eq!(s.load_cells(), vec![parent, child]);
        assert!(!d.path().join("state/cells/torn.json").exists());

        let (id, dir) = s.new_exec_dir().unwrap();
        let (id2, _) = s.new_exec_dir().unwrap();
        assert_ne!(id, id2);
        let r = exec_record(&id, "x", Some("a"), 3);
        s.write_exec(&r).unwrap();
        assert!(d.path().join(format!("state/execs/{id}.json")).exists());
        assert!(dir.is_dir());
        // id2 has no record: removed at load.
        assert_eq!(s.load_execs(), vec![r.clone()]);
        assert!(!s.exec_dir(&id2).exists());
        assert!(!d.path().join("lib/output").join(&id2).exists());
        s.remove_exec(&id);
        s.remove_cell("a/b");
        assert!(s.load_execs().is_empty());
        assert_eq!(s.load_cells().len(), 1);
        // The output directory went with the record.
        assert!(std::fs::read_dir(d.path().join("lib/output"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn output_lives_on_the_library_side_and_orphans_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("lib/output");
        let s = Store::open(&d.path().join("run"), &out).unwrap();
        let record = |id: &str| exec_record(id, id, None, 1);
        let (id, dir) = s.new_exec_dir().unwrap();
        s.write_exec(&record(&id)).unwrap();
        std::fs::write(dir.join("stdout.0"), b"x").unwrap();
        // What the shim writes through its fd lands on the library side.
        assert_eq!(std::fs::read(out.join(&id).join("stdout.0")).unwrap(), b"x");
        assert!(std::fs::symlink_metadata(&dir).unwrap().is_symlink());
        // An earlier release's real directory (record inside) still loads
        // and is removed.
        let old = d.path().join("run/state/execs/old-1");
        std::fs::create_dir(&old).unwrap();
        let data = serde_json::to_vec(&record("old-1")).unwrap();
        std::fs::write(old.join(format::RECORD), data).unwrap();
        // A record whose directory is gone, and a torn temp file: removed.
        s.write_exec(&record("lost-3")).unwrap();
        std::fs::write(d.path().join("run/state/execs/.x.json.tmp"), b"{").unwrap();
        // An output directory of a previous boot (no link): removed.
        std::fs::create_dir(out.join("gone-7")).unwrap();
        std::fs::write(out.join("gone-7/stdout.0"), b"y").unwrap();
        // A dangling link (its output directory deleted): dropped.
        std::os::unix::fs::symlink(
            out.join("nowhere"),
            d.path().join("run/state/execs/dangling-2"),
        )
        .unwrap();
        let ids: Vec<String> = s.load_execs().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![id.clone(), "old-1".to_owned()]);
        assert!(!out.join("gone-7").exists());
        assert!(std::fs::symlink_metadata(d.path().join("run/state/execs/dangling-2")).is_err());
        assert!(!d.path().join("run/state/execs/lost-3.json").exists());
        assert!(!d.path().join("run/state/execs/.x.json.tmp").exists());
        assert!(out.join(&id).join("stdout.0").exists());
        s.remove_exec("old-1");
        assert!(!old.exists());
        s.remove_exec(&id);
        assert!(std::fs::symlink_metadata(&dir).is_err());
        assert!(!out.join(&id).exists());
        assert!(!d.path().join(format!("run/state/execs/{id}.json")).exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_next_output_directory_is_made_ahead() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("lib/output");
        let s = Store::open(&d.path().join("run"), &out).unwrap();
        let (a, _) = s.new_exec_dir().unwrap();
        // The spare appears beside the first directory.
        let t = std::time::Instant::now();
        while s.spare.lock().unwrap().is_none() {
            assert!(t.elapsed() < std::time::Duration::from_secs(10), "no spare");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let spare = s.spare.lock().unwrap().clone().expect("spare id");
        // With the temp files of the shim's last writes in it already.
        let mut made: Vec<String> = std::fs::read_dir(out.join(&spare))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        made.sort();
        assert_eq!(
            made,
            [".exit.json.tmp", ".stderr.end.tmp", ".stdout.end.tmp"]
        );
        let (b, dir) = s.new_exec_dir().unwrap();
        assert_eq!(b, spare);
        assert_ne!(a, b);
        assert!(dir.is_dir());
        // Unused spares are dropped at stop, or at the next load.
        while s.spare.lock().unwrap().is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        s.drop_spare();
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2);
    }
}
