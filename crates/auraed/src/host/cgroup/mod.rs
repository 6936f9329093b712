//! Cgroups of cells: one backend per daemon, chosen once by [`detect`].
//!
//! We keep a thin layer of our own instead of using `cgroups-rs`: that crate
//! cannot mirror cells into the controller-less cgroup2 tree of a hybrid host
//! (which we need for `cgroup.kill` and for the signal observer's cgroup ids),
//! its v1 `add_task` moves a single thread rather than a process, and its
//! `kill()` only works on cgroup v2.
//!
//! Layout: every hierarchy gets a root subtree (`<daemon's own cgroup>/aurae`
//! unless `--cgroup-root` says otherwise) and one directory per cell below
//! it, nested like the cell names. In a cgroup2 tree (pure v2, or the hybrid
//! mirror) a cell's processes live in its leaf `<cell>/_exec`, because a v2
//! cgroup with controllers enabled for its children may not hold processes.
//! Cell names cannot contain `_`, so the leaf never clashes with a cell.

mod stats;
mod v1;
mod v2;

pub mod fake;
pub use stats::CellStats;
#[cfg(test)]
mod host_tests;

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::{
        signal::{kill, Signal},
        statfs::{statfs, FsType},
    },
    unistd::Pid,
};

/// Where the kernel's cgroup hierarchies are normally mounted.
pub const DEFAULT_MOUNT_ROOT: &str = "/sys/fs/cgroup";
/// Name of the root subtree below the daemon's own cgroup.
const ROOT_NAME: &str = "aurae";
/// The leaf of a cell, in cgroup2 trees, that holds the cell's processes.
const EXEC_LEAF: &str = "_exec";
/// The leaf the daemon moves itself into on pure v2 (see `v2.rs`).
const DAEMON_LEAF: &str = "auraed";
/// Pauses between retries of rmdir (EBUSY) and of the kill loop: from
/// the first, doubling up to the last. A killed process leaves its
/// cgroups within microseconds to a few milliseconds; a fixed 5 ms pause
/// made every Free that met one EBUSY 5 ms slower.
const RETRY_PAUSE_FIRST: Duration = Duration::from_micros(100);
const RETRY_PAUSE: Duration = Duration::from_millis(5);

/// The next pause after `p`.
fn backoff(p: Duration) -> Duration {
    (p * 2).min(RETRY_PAUSE)
}
/// How long the pid-kill fallback keeps trying before it gives up.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// The controllers we use; v1 also uses `freezer` (kill) when mounted.
/// `io` only serves stats (io.stat); no limit of ours uses it.
const CONTROLLERS: [&str; 5] = ["cpu", "cpuset", "io", "memory", "pids"];

/// Resource limits of one cell, already validated for syntax/range by the service layer.
/// A negative `cpu_max` or memory value means "no limit" (`max`, or `-1` on v1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// 1..=10000 (v2 cpu.weight; v1 cpu.shares via runc's formula, see [`weight_to_shares`]).
    pub cpu_weight: Option<u64>,
    /// Quota in microseconds per period (v2 first field of cpu.max; v1 cpu.cfs_quota_us).
    pub cpu_max: Option<i64>,
    /// Microseconds (v2 second field of cpu.max; v1 cpu.cfs_period_us); 100000 when max is set alone.
    pub cpu_period: Option<u64>,
    /// cpuset.cpus
    pub cpus: Option<String>,
    /// cpuset.mems
    pub mems: Option<String>,
    /// v2 memory.min; unsupported on v1.
    pub mem_min: Option<i64>,
    /// v2 memory.low; v1 memory.soft_limit_in_bytes.
    pub mem_low: Option<i64>,
    /// v2 memory.high; unsupported on v1.
    pub mem_high: Option<i64>,
    /// v2 memory.max; v1 memory.limit_in_bytes (swap is left alone).
    pub mem_max: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The host cannot apply this limit (e.g. memory.min on v1). `field` is the API field path, e.g. "cell.memory.min".
    #[error("{field} cannot be applied on this host: {reason}")]
    Unsupported { field: &'static str, reason: String },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The kernel refused a limit's value (EINVAL, ERANGE, ...): the
    /// client's request, not a host failure. `field` is the API field path.
    #[error("{field}: the kernel refused {value:?} for {path}: {source}")]
    Refused {
        field: &'static str,
        value: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no usable cgroup hierarchy: {0}")]
    NoHierarchy(String),
    #[error("cgroup {path} still has processes after {waited_ms} ms")]
    Busy { path: PathBuf, waited_ms: u64 },
}

/// One cgroup backend per daemon, chosen once at start-up by `detect`.
pub trait CgroupBackend: Send + Sync + std::fmt::Debug {
    /// true for the pure cgroup v2 backend.
    fn is_v2(&self) -> bool;
    /// Err(Unsupported) naming the first field this host cannot apply. Touches nothing.
    fn check_supported(&self, limits: &Limits) -> Result<(), CgroupError>;
    /// Creates the cgroup(s) of cell `path` (components like ["a","b"]; the parent cell already exists;
    /// the root subtree is created on first use) and applies `limits`. On any failure, removes what it created.
    fn create(&self, path: &[&str], limits: &Limits) -> Result<(), CgroupError>;
    /// The `cgroup.procs` files a new process must write "0" to (in the forked child, before exec) to join the
    /// cell in every hierarchy. On v2 this is the cell's leaf `_exec` child (no-internal-process rule); on v1
    /// one per used controller plus the unified mirror (its `_exec` leaf) when present.
    fn procs_files(&self, path: &[&str]) -> Vec<PathBuf>;
    /// Every pid in the cell and its descendant cgroups.
    fn pids(&self, path: &[&str]) -> Result<Vec<i32>, CgroupError>;
    /// SIGKILLs every process in the cell and its descendants (v2/unified mirror: write 1 to cgroup.kill;
    /// v1 without mirror: freeze via freezer if available, kill pids, repeat until empty).
    fn kill_all(&self, path: &[&str]) -> Result<(), CgroupError>;
    /// Removes the cell's cgroups (its leaf and itself, in every hierarchy), waiting up to `timeout` for
    /// them to become empty (rmdir EBUSY retry). Children cells must already be removed. Missing dirs are fine.
    fn remove(&self, path: &[&str], timeout: Duration) -> Result<(), CgroupError>;
    /// The directory in the unified (v2) tree whose inode is the cgroup id of the cell's own processes:
    /// the cell's `_exec` leaf (pure v2, or hybrid mirror); None without a unified tree.
    /// Used by the signal observer to match a target's cgroup id to a cell.
    fn unified_dir(&self, path: &[&str]) -> Option<PathBuf>;
    /// Removes the root subtree (`.../aurae`) if empty; called at daemon shutdown.
    fn remove_root(&self) -> Result<(), CgroupError>;
    /// Cells found under the root subtree (left by an earlier run of the
    /// daemon that could not clean up), parents before their children.
    fn leftover_cells(&self) -> Vec<Vec<String>>;
    /// The (cpus, mems) a new cell below `parent` (components; empty: a
    /// top-level cell) may use: the parent cgroup's effective lists, as the
    /// kernel prints them (v1 `cpuset.effective_cpus`/`_mems`, else
    /// `cpuset.cpus`/`mems`; v2 `cpuset.cpus.effective`/`mems.effective`),
    /// or the nearest existing ancestor's while the root subtree is not
    /// made yet. None when there is no cpuset to read. Touches nothing.
    fn cpuset_available(&self, parent: &[&str]) -> Option<(String, String)>;
    /// Resource usage of the cell and its descendants, read from its cgroup
    /// files now (see [`CellStats`]); what the host lacks is None. An Io
    /// error with kind NotFound when the cell's cgroup is gone.
    fn stats(&self, path: &[&str]) -> Result<CellStats, CgroupError>;
}

/// Detects the host layout once. `mount_root` is normally "/sys/fs/cgroup" (injectable for tests);
/// `proc_self_cgroup` is the text of /proc/self/cgroup; `root_override` is the --cgroup-root flag
/// (a path relative to each hierarchy root, e.g. "/my/aurae"). Default: the daemon's own cgroup in each
/// hierarchy (from /proc/self/cgroup) + "/aurae".
///
/// Pure v2: `mount_root` is a cgroup2 mount. Otherwise v1/hybrid: `mount_root` holds one directory per
/// v1 controller, plus `unified` when that is a cgroup2 mount. So that unit tests can use a plain temp
/// directory, a `mount_root` holding a `cgroup.controllers` file also counts as v2, and a `unified`
/// directory holding `cgroup.procs` as a mirror; directories not on cgroupfs are removed with
/// `remove_dir_all` (rmdir would fail on the control files the tests wrote by hand).
pub fn detect(
    mount_root: &Path,
    proc_self_cgroup: &str,
    root_override: Option<&str>,
) -> Result<Arc<dyn CgroupBackend>, CgroupError> {
    if is_fs(mount_root, nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        || mount_root.join("cgroup.controllers").is_file()
    {
        let own = own_path(proc_self_cgroup, None);
        let tree = Tree::new(mount_root, own, root_override)?;
        return Ok(Arc::new(v2::V2Backend::new(tree)));
    }
    if v1::CONTROLLERS.iter().any(|c| mount_root.join(c).is_dir()) {
        return Ok(Arc::new(v1::V1Backend::detect(
            mount_root,
            proc_self_cgroup,
            root_override,
        )?));
    }
    Err(CgroupError::NoHierarchy(format!(
        "{} is neither a cgroup2 mount nor holds cgroup v1 controllers",
        mount_root.display()
    )))
}

/// Convenience: detect(Path::new("/sys/fs/cgroup"), &read_to_string("/proc/self/cgroup")?, root_override)
pub fn detect_host(root_override: Option<&str>) -> Result<Arc<dyn CgroupBackend>, CgroupError> {
    let proc_path = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(proc_path).map_err(|source| CgroupError::Io {
        action: "read",
        path: proc_path.to_path_buf(),
        source,
    })?;
    detect(Path::new(DEFAULT_MOUNT_ROOT), &text, root_override)
}

/// Which cgroup hierarchies (below [`DEFAULT_MOUNT_ROOT`]) are mounted
/// with `favordynmods` (Linux ≥ 6.0), from the text of
/// /proc/self/mountinfo, as a sentence for the start-up log. Without it a
/// migration (a `cgroup.procs` write) waits for an RCU grace period; with
/// it on any hierarchy, migrations are cheap and every fork and exit pays
/// a little more. The daemon never remounts: an operator who wants it
/// runs `mount -o remount,favordynmods /sys/fs/cgroup` (v2) or the same on
/// each v1 hierarchy (see README "Why we are fast").
pub fn favordynmods_report(mountinfo: &str) -> String {
    let (mut with, mut all) = (Vec::new(), 0);
    for l in mountinfo.lines() {
        // ... mount-point opts [optional fields] - fstype source super-opts
        let mut f = l.split_whitespace();
        let Some(point) = f.nth(4) else { continue };
        let Some((_, tail)) = l.split_once(" - ") else {
            continue;
        };
        let mut t = tail.split_whitespace();
        let (Some(fs), _, Some(opts)) = (t.next(), t.next(), t.next()) else {
            continue;
        };
        if !matches!(fs, "cgroup" | "cgroup2") || !point.starts_with(DEFAULT_MOUNT_ROOT) {
            continue;
        }
        all += 1;
        if opts.split(',').any(|o| o == "favordynmods") {
            with.push(point.to_owned());
        }
    }
    if with.is_empty() {
        format!("favordynmods on none of {all} cgroup mounts (migrations wait for an RCU grace period; clone3 avoids them on cgroup2)")
    } else {
        format!(
            "favordynmods on {} of {all} cgroup mounts ({})",
            with.len(),
            with.join(", ")
        )
    }
}

/// v1 cpu.shares for a v2 cpu.weight: maps 1..=10000 onto 2..=262144, the formula runc and crun use.
pub fn weight_to_shares(weight: u64) -> u64 {
    2 + (weight.clamp(1, 10_000) - 1) * 262_142 / 9_999
}

/// (API field, controller) of every limit that is set, in declaration order.
fn requested(l: &Limits) -> Vec<(&'static str, &'static str)> {
    [
        (l.cpu_weight.is_some(), "cell.cpu.weight", "cpu"),
        (l.cpu_max.is_some(), "cell.cpu.max", "cpu"),
        (l.cpu_period.is_some(), "cell.cpu.period", "cpu"),
        (l.cpus.is_some(), "cell.cpuset.cpus", "cpuset"),
        (l.mems.is_some(), "cell.cpuset.mems", "cpuset"),
        (l.mem_min.is_some(), "cell.memory.min", "memory"),
        (l.mem_low.is_some(), "cell.memory.low", "memory"),
        (l.mem_high.is_some(), "cell.memory.high", "memory"),
        (l.mem_max.is_some(), "cell.memory.max", "memory"),
    ]
    .into_iter()
    .filter(|(set, _, _)| *set)
    .map(|(_, field, ctrl)| (field, ctrl))
    .collect()
}

/// A memory/quota value: negative means unlimited.
fn limit_value(v: i64, unlimited: &str) -> String {
    if v < 0 {
        unlimited.to_string()
    } else {
        v.to_string()
    }
}

/// The daemon's cgroup in the hierarchy of `controller` (None: the cgroup2 line "0::/path").
fn own_path<'a>(proc_self_cgroup: &'a str, controller: Option<&str>) -> &'a str {
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let hit = match controller {
            None => ctrls.is_empty(),
            Some(c) => ctrls.split(',').any(|x| x == c),
        };
        if hit {
            return path;
        }
    }
    "/"
}

/// A cgroup path relative to a hierarchy root, as components; refuses `.`/`..` so nothing escapes.
fn rel_components(rel: &str) -> Result<Vec<&str>, CgroupError> {
    let parts: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    if parts.iter().any(|c| *c == "." || *c == "..") {
        return Err(CgroupError::NoHierarchy(format!(
            "cgroup path {rel:?} must not contain . or .."
        )));
    }
    Ok(parts)
}

/// True when `path` is on a filesystem with this magic (false when statfs fails).
fn is_fs(path: &Path, magic: FsType) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == magic)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_err(action: &'static str, path: &Path, source: io::Error) -> CgroupError {
    CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn invalid_cell(path: &[&str]) -> CgroupError {
    let source = io::Error::new(io::ErrorKind::InvalidInput, "not a valid cell path");
    io_err("resolve cell", Path::new(&path.join("/")), source)
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|e| io_err("write", path, e))
}

/// Writes the value of API field `field`; the kernel refusing the value
/// (rather than failing) is [`CgroupError::Refused`].
fn write_limit(field: &'static str, path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| {
        let refused = [libc::EINVAL, libc::ERANGE, libc::EDOM, libc::EOVERFLOW];
        if source.raw_os_error().is_some_and(|e| refused.contains(&e)) {
            CgroupError::Refused {
                field,
                value: value.to_owned(),
                path: path.to_path_buf(),
                source,
            }
        } else {
            io_err("write", path, source)
        }
    })
}

/// Reads the first of `files` that exists in `dir`; None when none does.
fn read_first(dir: &Path, files: &[&str]) -> Option<String> {
    files
        .iter()
        .find_map(|f| fs::read_to_string(dir.join(f)).ok())
        .map(|s| s.trim().to_owned())
}

/// Contents of a control file, trimmed; a missing file reads as empty.
fn read_trimmed(path: &Path) -> Result<String, CgroupError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(s.trim().to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(io_err("read", path, e)),
    }
}

/// Pids in `dir` and every cgroup below it. Sub-cgroups vanishing meanwhile are skipped.
fn pids_recursive(dir: &Path) -> Result<Vec<i32>, CgroupError> {
    let procs = dir.join("cgroup.procs");
    let text = match fs::read_to_string(&procs) {
        Ok(t) => t,
        // Only plain test directories lack the file; a missing cgroup stays an error.
        Err(e) if e.kind() == io::ErrorKind::NotFound && dir.is_dir() => String::new(),
        Err(e) => return Err(io_err("read", &procs, e)),
    };
    let mut pids = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let pid = line.parse::<i32>().map_err(|e| {
            io_err(
                "parse",
                &procs,
                io::Error::new(io::ErrorKind::InvalidData, e),
            )
        })?;
        pids.push(pid);
    }
    let entries = fs::read_dir(dir).map_err(|e| io_err("list", dir, e))?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            match pids_recursive(&entry.path()) {
                Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                }
                other => pids.extend(other?),
            }
        }
    }
    Ok(pids)
}

/// Writes "1" to `dir/cgroup.kill` (kernel >= 5.14); false when the file is missing.
fn write_cgroup_kill(dir: &Path) -> Result<bool, CgroupError> {
    let file = dir.join("cgroup.kill");
    if !file.is_file() {
        return Ok(false);
    }
    write_file(&file, "1")?;
    Ok(true)
}

/// A freezer file and the values that freeze and thaw (v1 freezer.state or v2 cgroup.freeze).
struct Freezer {
    file: PathBuf,
    freeze: &'static str,
    thaw: &'static str,
}

/// Fallback kill without cgroup.kill: freeze (so nothing forks between listing and killing),
/// SIGKILL every pid, thaw (frozen tasks only die once thawed), until `list_dir` is empty.
fn kill_loop(list_dir: &Path, freezer: Option<Freezer>) -> Result<(), CgroupError> {
    let started = Instant::now();
    let me = std::process::id();
    let mut pause = RETRY_PAUSE_FIRST;
    loop {
        if let Some(f) = &freezer {
            write_file(&f.file, f.freeze)?;
        }
        let listed = pids_recursive(list_dir);
        if let Ok(pids) = &listed {
            for &pid in pids.iter().filter(|&&p| p > 0 && p.unsigned_abs() != me) {
                // ESRCH: it died meanwhile, which is what we want.
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if let Some(f) = &freezer {
            write_file(&f.file, f.thaw)?;
        }
        match listed {
            Ok(pids) if pids.is_empty() => return Ok(()),
            Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(());
            }
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        if started.elapsed() >= KILL_TIMEOUT {
            return Err(CgroupError::Busy {
                path: list_dir.to_path_buf(),
                waited_ms: started.elapsed().as_millis().try_into().unwrap_or(u64::MAX),
            });
        }
        thread::sleep(pause);
        pause = backoff(pause);
    }
}

fn valid_component(c: &str) -> bool {
    !c.is_empty() && c != "." && c != ".." && !c.contains(['/', '\0']) && !c.starts_with('_')
}

/// One hierarchy: where it is mounted, the daemon's own cgroup and our root subtree in it.
#[derive(Debug)]
struct Tree {
    mount: PathBuf,
    own: PathBuf,
    root: PathBuf,
    /// False for the plain-directory layouts of unit tests (see [`detect`]).
    cgroupfs: bool,
    /// Directories `create_root` made above and including `root`, top-down, for `remove_root`.
    created: Mutex<Vec<PathBuf>>,
}

impl Tree {
    fn new(mount: &Path, own_rel: &str, root_override: Option<&str>) -> Result<Tree, CgroupError> {
        let own_parts = rel_components(own_rel)?;
        let root_parts = match root_override {
            Some(o) => rel_components(o)?,
            None => own_parts.iter().copied().chain([ROOT_NAME]).collect(),
        };
        if root_parts.is_empty() {
            return Err(CgroupError::NoHierarchy(format!(
                "cgroup root {root_override:?} must be below the hierarchy root"
            )));
        }
        let cgroupfs = is_fs(mount, nix::sys::statfs::CGROUP2_SUPER_MAGIC)
            || is_fs(mount, nix::sys::statfs::CGROUP_SUPER_MAGIC);
        Ok(Tree {
            mount: mount.to_path_buf(),
            own: own_parts.iter().fold(mount.to_path_buf(), |p, c| p.join(c)),
            root: root_parts
                .iter()
                .fold(mount.to_path_buf(), |p, c| p.join(c)),
            cgroupfs,
            created: Mutex::new(Vec::new()),
        })
    }

    fn cell_dir(&self, path: &[&str]) -> Option<PathBuf> {
        if path.is_empty() || !path.iter().all(|c| valid_component(c)) {
            return None;
        }
        Some(path.iter().fold(self.root.clone(), |p, c| p.join(c)))
    }

    /// (cpus, mems) read from the cell `parent` (the root subtree when
    /// empty) or, where those files are missing, its nearest ancestor in
    /// this hierarchy that has them.
    fn cpuset_of(&self, parent: &[&str], cpus: &[&str], mems: &[&str]) -> Option<(String, String)> {
        let start = if parent.is_empty() {
            self.root.clone()
        } else {
            self.cell_dir(parent)?
        };
        start
            .ancestors()
            .take_while(|d| d.starts_with(&self.mount))
            .find_map(|d| Some((read_first(d, cpus)?, read_first(d, mems)?)))
    }

    /// The directories from the mount down to `root`, both included.
    fn chain(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self
            .root
            .ancestors()
            .take_while(|d| d.starts_with(&self.mount))
            .map(Path::to_path_buf)
            .collect();
        dirs.reverse();
        dirs
    }

    /// Makes the missing directories down to `root`; returns those it made, top-down.
    fn create_root(&self) -> Result<Vec<PathBuf>, CgroupError> {
        let mut made = Vec::new();
        for dir in self.chain() {
            match fs::create_dir(&dir) {
                Ok(()) => made.push(dir),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    self.remove_created(&made);
                    return Err(io_err("create", &dir, e));
                }
            }
        }
        lock(&self.created).extend(made.iter().cloned());
        Ok(made)
    }

    /// Best-effort cleanup of directories this call made (bottom-up), after a failure.
    fn remove_created(&self, made: &[PathBuf]) {
        let deadline = Instant::now() + Duration::from_millis(100);
        for dir in made.iter().rev() {
            if let Err(e) = self.remove_dir(dir, deadline) {
                tracing::warn!("cleanup after failed cgroup creation: {e}");
            }
        }
    }

    /// rmdir, retried on EBUSY (processes still exiting) until `deadline`. Missing is fine.
    fn remove_dir(&self, dir: &Path, deadline: Instant) -> Result<(), CgroupError> {
        let started = Instant::now();
        let mut pause = RETRY_PAUSE_FIRST;
        loop {
            let res = if self.cgroupfs {
                fs::remove_dir(dir)
            } else {
                fs::remove_dir_all(dir)
            };
            match res {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    if Instant::now() >= deadline {
                        let waited = started.elapsed().as_millis();
                        return Err(CgroupError::Busy {
                            path: dir.to_path_buf(),
                            waited_ms: waited.try_into().unwrap_or(u64::MAX),
                        });
                    }
                    thread::sleep(pause);
                    pause = backoff(pause);
                }
                Err(e) => return Err(io_err("remove", dir, e)),
            }
        }
    }

    /// Removes `root` and the ancestors `create_root` made, each only while it has no sub-cgroup.
    fn remove_root(&self) -> Result<(), CgroupError> {
        let mut created = lock(&self.created);
        let mut dirs: Vec<PathBuf> = created
            .iter()
            .filter(|d| **d != self.root)
            .cloned()
            .collect();
        dirs.push(self.root.clone());
        let deadline = Instant::now() + Duration::from_secs(1);
        for dir in dirs.iter().rev() {
            if has_subdirs(dir)? {
                tracing::warn!("cgroup {} is not empty; leaving it", dir.display());
                return Ok(());
            }
            self.remove_dir(dir, deadline)?;
        }
        created.clear();
        Ok(())
    }
}

/// Cell paths below `root`, parents first (directories whose names are
/// valid cell components; leaves like `_exec` are not cells).
fn cell_dirs_below(root: &Path) -> Vec<Vec<String>> {
    fn walk(dir: &Path, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_component(n) && n != DAEMON_LEAF)
            .collect();
        names.sort();
        for n in names {
            let mut path = prefix.to_vec();
            path.push(n.clone());
            out.push(path.clone());
            walk(&dir.join(&n), &path, out);
        }
    }
    let mut out = Vec::new();
    walk(root, &[], &mut out);
    out
}

fn has_subdirs(dir: &Path) -> Result<bool, CgroupError> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .flatten()
            .any(|e| e.file_type().is_ok_and(|t| t.is_dir()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("list", dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn favordynmods_is_read_from_super_options() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
            32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu\n\
            41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,favordynmods\n\
            50 31 0:40 / /elsewhere rw - cgroup2 cgroup2 rw,favordynmods\n";
        assert_eq!(
            favordynmods_report(info),
            "favordynmods on 1 of 2 cgroup mounts (/sys/fs/cgroup/unified)"
        );
        assert!(favordynmods_report("").starts_with("favordynmods on none of 0"));
    }

    #[test]
    fn shares_follow_runc_formula() {
        assert_eq!(weight_to_shares(1), 2);
        assert_eq!(weight_to_shares(100), 2597);
        assert_eq!(weight_to_shares(10_000), 262_144);
    }

    #[test]
    fn own_path_picks_the_matching_line() {
        let text = "4:memory:/process_api/abc\n2:cpu,cpuacct:/c\n1:name=systemd:/s\n0::/u\n";
        assert_eq!(own_path(text, Some("memory")), "/process_api/abc");
        assert_eq!(own_path(text, Some("cpuacct")), "/c");
        assert_eq!(own_path(text, Some("cpuset")), "/");
        assert_eq!(own_path(text, None), "/u");
    }

    #[test]
    fn root_must_stay_inside_the_hierarchy() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::write(tmp.path().join("cgroup.controllers"), "cpu").expect("write");
        for bad in ["/../x", "/", "a/./b"] {
            let err = detect(tmp.path(), "0::/\n", Some(bad)).expect_err(bad);
            assert!(matches!(err, CgroupError::NoHierarchy(_)), "{bad}: {err}");
        }
        let err = detect(tmp.path(), "0::/../../x\n", None).expect_err("escaping own path");
        assert!(matches!(err, CgroupError::NoHierarchy(_)), "{err}");
    }

    #[test]
    fn empty_dir_is_no_hierarchy() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = detect(tmp.path(), "0::/\n", None).expect_err("nothing there");
        assert!(matches!(err, CgroupError::NoHierarchy(_)), "{err}");
    }
}
