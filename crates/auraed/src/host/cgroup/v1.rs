//! cgroup v1 (legacy or hybrid): one tree per mounted controller hierarchy, plus, on hybrid hosts,
//! a mirror of every cell in the controller-less cgroup2 tree (`<mount_root>/unified`). The mirror
//! carries no limits; it gives us `cgroup.kill` and cgroup ids for the signal observer.
//! Processes live in the cell directory itself in v1 trees (v1 has no no-internal-process rule)
//! and in the cell's `_exec` leaf in the mirror, like on pure v2.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use super::{
    invalid_cell, io_err, is_fs, limit_value, lock, own_path, pids_recursive, read_trimmed,
    requested,
    stats::{self, keyed, read_opt, read_u64, CellStats},
    weight_to_shares, write_cgroup_kill, write_file, write_limit, CgroupBackend, CgroupError,
    Freezer, Limits, Tree, EXEC_LEAF,
};

/// The v1 controllers we look for under `mount_root`; freezer only serves `kill_all`,
/// cpuacct and blkio only `stats` (CPU time, block IO).
pub(super) const CONTROLLERS: [&str; 7] = [
    "cpu", "cpuset", "memory", "pids", "freezer", "cpuacct", "blkio",
];
/// Controllers only `stats` reads (no limit of ours is written there).
const STATS_ONLY: [&str; 2] = ["cpuacct", "blkio"];

/// One mounted v1 hierarchy and the controllers of ours it carries (e.g. "cpu" when mounted
/// as "cpu,cpuacct", or several when co-mounted).
#[derive(Debug)]
struct Hierarchy {
    controllers: Vec<&'static str>,
    tree: Tree,
}

#[derive(Debug)]
pub(super) struct V1Backend {
    hierarchies: Vec<Hierarchy>,
    mirror: Option<Tree>,
    /// Whether the root subtree is set up (false again after `remove_root`).
    ready: Mutex<bool>,
}

impl V1Backend {
    pub(super) fn detect(
        mount_root: &Path,
        proc_self_cgroup: &str,
        root_override: Option<&str>,
    ) -> Result<V1Backend, CgroupError> {
        let mut hierarchies: Vec<Hierarchy> = Vec::new();
        for ctrl in CONTROLLERS {
            let dir = mount_root.join(ctrl);
            if !dir.is_dir() {
                continue;
            }
            // "cpu" is often a symlink to the "cpu,cpuacct" mount: one hierarchy, one tree.
            let mount = fs::canonicalize(&dir).map_err(|e| io_err("resolve", &dir, e))?;
            if let Some(h) = hierarchies.iter_mut().find(|h| h.tree.mount == mount) {
                h.controllers.push(ctrl);
                continue;
            }
            let own = own_path(proc_self_cgroup, Some(ctrl));
            hierarchies.push(Hierarchy {
                controllers: vec![ctrl],
                tree: Tree::new(&mount, own, root_override)?,
            });
        }
        let unified = mount_root.join("unified");
        let mirror = if is_fs(&unified, nix::sys::statfs::CGROUP2_SUPER_MAGIC)
            || unified.join("cgroup.procs").is_file()
        {
            let own = own_path(proc_self_cgroup, None);
            Some(Tree::new(&unified, own, root_override)?)
        } else {
            None
        };
        Ok(V1Backend {
            hierarchies,
            mirror,
            ready: Mutex::new(false),
        })
    }

    fn tree(&self, ctrl: &str) -> Option<&Tree> {
        self.hierarchies
            .iter()
            .find(|h| h.controllers.contains(&ctrl))
            .map(|h| &h.tree)
    }

    fn trees(&self) -> impl Iterator<Item = &Tree> {
        self.hierarchies.iter().map(|h| &h.tree).chain(&self.mirror)
    }

    /// Where to list a cell's processes: the mirror sees them all; else pids or memory.
    fn list_tree(&self) -> Option<&Tree> {
        self.mirror
            .as_ref()
            .or_else(|| self.tree("pids"))
            .or_else(|| self.tree("memory"))
            .or_else(|| self.hierarchies.first().map(|h| &h.tree))
    }

    fn ensure_root(&self) -> Result<(), CgroupError> {
        let mut ready = lock(&self.ready);
        if *ready {
            return Ok(());
        }
        let mut made: Vec<(&Tree, Vec<PathBuf>)> = Vec::new();
        let res = self.trees().try_for_each(|tree| {
            let dirs = tree.create_root()?;
            made.push((tree, dirs.clone()));
            if self.tree("cpuset").is_some_and(|t| std::ptr::eq(t, tree)) {
                // Ancestors that existed are not ours: fill only what we made, and our root.
                for dir in dirs.iter().chain([&tree.root]) {
                    fill_cpuset(dir)?;
                }
            }
            Ok(())
        });
        if let Err(e) = res {
            for (tree, dirs) in made.iter().rev() {
                tree.remove_created(dirs);
            }
            return Err(e);
        }
        *ready = true;
        Ok(())
    }

    fn create_in<'a>(
        &'a self,
        path: &[&str],
        limits: &Limits,
        made: &mut Vec<(&'a Tree, PathBuf)>,
    ) -> Result<(), CgroupError> {
        for h in &self.hierarchies {
            let dir = h.tree.cell_dir(path).ok_or_else(|| invalid_cell(path))?;
            fs::create_dir(&dir).map_err(|e| io_err("create", &dir, e))?;
            made.push((&h.tree, dir.clone()));
            for ctrl in &h.controllers {
                apply(ctrl, &dir, limits)?;
            }
        }
        if let Some(m) = &self.mirror {
            let dir = m.cell_dir(path).ok_or_else(|| invalid_cell(path))?;
            for d in [dir.clone(), dir.join(EXEC_LEAF)] {
                fs::create_dir(&d).map_err(|e| io_err("create", &d, e))?;
                made.push((m, d));
            }
        }
        Ok(())
    }
}

/// A new v1 cpuset cgroup starts with empty cpus/mems and refuses tasks until both are set:
/// copy them from the parent when empty.
fn fill_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for file in ["cpuset.mems", "cpuset.cpus"] {
        if read_trimmed(&dir.join(file))?.is_empty() {
            let value = read_trimmed(&parent.join(file))?;
            write_file(&dir.join(file), &value)?;
        }
    }
    Ok(())
}

/// Writes the limits of controller `ctrl` into the cell's directory of its hierarchy.
fn apply(ctrl: &str, dir: &Path, l: &Limits) -> Result<(), CgroupError> {
    match ctrl {
        "cpu" => {
            if let Some(w) = l.cpu_weight {
                let shares = weight_to_shares(w).to_string();
                write_limit("cell.cpu.weight", &dir.join("cpu.shares"), &shares)?;
            }
            // Period before quota: the kernel checks a quota against the current period.
            let period = l.cpu_period.or(l.cpu_max.map(|_| 100_000));
            if let Some(p) = period {
                let field = if l.cpu_period.is_some() {
                    "cell.cpu.period"
                } else {
                    "cell.cpu.max"
                };
                write_limit(field, &dir.join("cpu.cfs_period_us"), &p.to_string())?;
            }
            if let Some(m) = l.cpu_max {
                let quota = limit_value(m, "-1");
                write_limit("cell.cpu.max", &dir.join("cpu.cfs_quota_us"), &quota)?;
            }
        }
        "cpuset" => {
            fill_cpuset(dir)?;
            if let Some(m) = &l.mems {
                write_limit("cell.cpuset.mems", &dir.join("cpuset.mems"), m)?;
            }
            if let Some(c) = &l.cpus {
                write_limit("cell.cpuset.cpus", &dir.join("cpuset.cpus"), c)?;
            }
        }
        "memory" => {
            if let Some(v) = l.mem_max {
                let file = dir.join("memory.limit_in_bytes");
                write_limit("cell.memory.max", &file, &limit_value(v, "-1"))?;
            }
            if let Some(v) = l.mem_low {
                let file = dir.join("memory.soft_limit_in_bytes");
                write_limit("cell.memory.low", &file, &limit_value(v, "-1"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

impl CgroupBackend for V1Backend {
    fn is_v2(&self) -> bool {
        false
    }

    fn check_supported(&self, limits: &Limits) -> Result<(), CgroupError> {
        for (field, ctrl) in requested(limits) {
            let reason = match field {
                "cell.memory.min" => "cgroup v1 has no memory.min".to_string(),
                "cell.memory.high" => "cgroup v1 has no memory.high".to_string(),
                _ if self.tree(ctrl).is_none() => {
                    format!("the cgroup v1 {ctrl} controller is not mounted")
                }
                _ => continue,
            };
            return Err(CgroupError::Unsupported { field, reason });
        }
        Ok(())
    }

    fn create(&self, path: &[&str], limits: &Limits) -> Result<(), CgroupError> {
        self.list_tree()
            .and_then(|t| t.cell_dir(path))
            .ok_or_else(|| invalid_cell(path))?;
        self.check_supported(limits)?;
        self.ensure_root()?;
        let mut made = Vec::new();
        let res = self.create_in(path, limits, &mut made);
        if res.is_err() {
            let deadline = Instant::now() + Duration::from_millis(100);
            for (tree, dir) in made.iter().rev() {
                if let Err(e) = tree.remove_dir(dir, deadline) {
                    tracing::warn!("cleanup after failed cell creation: {e}");
                }
            }
        }
        res
    }

    fn procs_files(&self, path: &[&str]) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for h in &self.hierarchies {
            let Some(dir) = h.tree.cell_dir(path) else {
                return Vec::new();
            };
            // A cell re-adopted from a daemon that did not use the
            // stats-only hierarchies has no directory there: it still
            // starts, with those stats absent.
            if h.controllers.iter().all(|c| STATS_ONLY.contains(c)) && !dir.is_dir() {
                continue;
            }
            files.push(dir.join("cgroup.procs"));
        }
        if let Some(dir) = self.unified_dir(path) {
            files.push(dir.join("cgroup.procs"));
        }
        files
    }

    fn pids(&self, path: &[&str]) -> Result<Vec<i32>, CgroupError> {
        let tree = self.list_tree().ok_or_else(|| invalid_cell(path))?;
        pids_recursive(&tree.cell_dir(path).ok_or_else(|| invalid_cell(path))?)
    }

    fn kill_all(&self, path: &[&str]) -> Result<(), CgroupError> {
        if let Some(m) = &self.mirror {
            let dir = m.cell_dir(path).ok_or_else(|| invalid_cell(path))?;
            if write_cgroup_kill(&dir)? {
                return Ok(());
            }
        }
        let tree = self.list_tree().ok_or_else(|| invalid_cell(path))?;
        let dir = tree.cell_dir(path).ok_or_else(|| invalid_cell(path))?;
        let freezer = match self.tree("freezer").and_then(|t| t.cell_dir(path)) {
            Some(d) if d.join("freezer.state").is_file() => Some(Freezer {
                file: d.join("freezer.state"),
                freeze: "FROZEN",
                thaw: "THAWED",
            }),
            _ => None,
        };
        super::kill_loop(&dir, freezer)
    }

    fn remove(&self, path: &[&str], timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        for h in &self.hierarchies {
            let dir = h.tree.cell_dir(path).ok_or_else(|| invalid_cell(path))?;
            h.tree.remove_dir(&dir, deadline)?;
        }
        if let Some(m) = &self.mirror {
            let dir = m.cell_dir(path).ok_or_else(|| invalid_cell(path))?;
            m.remove_dir(&dir.join(EXEC_LEAF), deadline)?;
            m.remove_dir(&dir, deadline)?;
        }
        Ok(())
    }

    fn unified_dir(&self, path: &[&str]) -> Option<PathBuf> {
        let m = self.mirror.as_ref()?;
        m.cell_dir(path).map(|d| d.join(EXEC_LEAF))
    }

    fn leftover_cells(&self) -> Vec<Vec<String>> {
        let mut all: Vec<Vec<String>> = Vec::new();
        for tree in self.trees() {
            for c in super::cell_dirs_below(&tree.root) {
                if !all.contains(&c) {
                    all.push(c);
                }
            }
        }
        all.sort_by_key(Vec::len);
        all
    }

    fn cpuset_available(&self, parent: &[&str]) -> Option<(String, String)> {
        self.tree("cpuset")?.cpuset_of(
            parent,
            &["cpuset.effective_cpus", "cpuset.cpus"],
            &["cpuset.effective_mems", "cpuset.mems"],
        )
    }

    fn stats(&self, path: &[&str]) -> Result<CellStats, CgroupError> {
        let dir_of = |ctrl: &str| self.tree(ctrl).and_then(|t| t.cell_dir(path));
        let list = self.list_tree().ok_or_else(|| invalid_cell(path))?;
        stats::require_dir(&list.cell_dir(path).ok_or_else(|| invalid_cell(path))?)?;
        let mut s = CellStats::default();
        if let Some(d) = dir_of("cpuacct") {
            s.cpu_usage_ns = read_u64(&d.join("cpuacct.usage"))?;
            if let Some(t) = read_opt(&d.join("cpuacct.stat"))? {
                // USER_HZ ticks, as runc and cAdvisor read them.
                let ns = |ticks: u64| ticks.saturating_mul(1_000_000_000 / clock_ticks());
                s.cpu_user_ns = keyed(&t, "user").map(ns);
                s.cpu_system_ns = keyed(&t, "system").map(ns);
            }
        }
        if let Some(t) = dir_of("cpu")
            .map(|d| read_opt(&d.join("cpu.stat")))
            .transpose()?
        {
            let t = t.unwrap_or_default();
            s.cpu_periods = keyed(&t, "nr_periods");
            s.cpu_throttled_periods = keyed(&t, "nr_throttled");
            s.cpu_throttled_ns = keyed(&t, "throttled_time");
        }
        if let Some(d) = dir_of("memory") {
            s.memory_usage_bytes = read_u64(&d.join("memory.usage_in_bytes"))?;
            s.memory_limit_bytes = stats::v1_limit(read_u64(&d.join("memory.limit_in_bytes"))?);
            if let Some(t) = read_opt(&d.join("memory.stat"))? {
                // The total_ lines include the cells below (use_hierarchy).
                s.memory_rss_bytes = keyed(&t, "total_rss");
                s.memory_cache_bytes = keyed(&t, "total_cache");
                s.memory_working_set_bytes =
                    stats::working_set(s.memory_usage_bytes, keyed(&t, "total_inactive_file"));
            }
            s.oom_kills =
                read_opt(&d.join("memory.oom_control"))?.and_then(|t| keyed(&t, "oom_kill"));
        }
        if let Some(d) = dir_of("pids") {
            s.pids_current = read_u64(&d.join("pids.current"))?;
            s.pids_limit = read_u64(&d.join("pids.max"))?;
        }
        if let Some(d) = dir_of("blkio") {
            // The throttle files count every bio whatever the IO scheduler.
            let bytes = read_opt(&d.join("blkio.throttle.io_service_bytes_recursive"))?;
            if let Some((r, w)) = bytes.as_deref().map(stats::blkio_sums) {
                (s.io_read_bytes, s.io_write_bytes) = (Some(r), Some(w));
            }
            let ops = read_opt(&d.join("blkio.throttle.io_serviced_recursive"))?;
            if let Some((r, w)) = ops.as_deref().map(stats::blkio_sums) {
                (s.io_read_ops, s.io_write_ops) = (Some(r), Some(w));
            }
        }
        Ok(s)
    }

    fn remove_root(&self) -> Result<(), CgroupError> {
        let mut ready = lock(&self.ready);
        // Every hierarchy is tried, also after one failed (a root left in
        // one must not leave the others behind); the first error is told.
        let mut first = None;
        for tree in self.trees() {
            if let Err(e) = tree.remove_root() {
                first.get_or_insert(e);
            }
        }
        *ready = false;
        first.map_or(Ok(()), Err)
    }
}

/// USER_HZ, the unit of `cpuacct.stat` (100 on every common architecture).
fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::super::detect;
    use super::*;

    /// A temp dir laid out like a v1 mount root: cpu/, cpuset/, memory/, pids/ (and unified/).
    fn layout(mirror: bool) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().expect("tempdir");
        for d in ["cpu", "cpuset", "memory/m/own", "pids"] {
            fs::create_dir_all(tmp.path().join(d)).expect("mkdir");
        }
        fs::write(tmp.path().join("cpuset/cpuset.cpus"), "0-3\n").expect("write");
        fs::write(tmp.path().join("cpuset/cpuset.mems"), "0\n").expect("write");
        if mirror {
            fs::create_dir(tmp.path().join("unified")).expect("mkdir");
            fs::write(tmp.path().join("unified/cgroup.procs"), "").expect("write");
        }
        tmp
    }

    const PROC: &str = "4:memory:/m/own\n3:cpuset:/\n1:cpu:/\n0::/\n";

    fn read(p: &Path) -> String {
        fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn limits_land_in_v1_files_and_cpuset_is_copied() {
        let tmp = layout(false);
        let t = tmp.path();
        let b = detect(t, PROC, None).expect("detect");
        assert!(!b.is_v2());
        let avail = |cpus: &str, mems: &str| Some((cpus.to_owned(), mems.to_owned()));
        // No root subtree yet: the hierarchy root's.
        assert_eq!(b.cpuset_available(&[]), avail("0-3", "0"));
        let limits = Limits {
            cpu_weight: Some(100),
            cpu_max: Some(50_000),
            mem_low: Some(32 << 20),
            mem_max: Some(64 << 20),
            ..Limits::default()
        };
        b.create(&["a"], &limits).expect("create");
        let expected = [
            ("cpu/aurae/a/cpu.shares", "2597"),
            ("cpu/aurae/a/cpu.cfs_period_us", "100000"),
            ("cpu/aurae/a/cpu.cfs_quota_us", "50000"),
            ("cpuset/aurae/cpuset.cpus", "0-3"),
            ("cpuset/aurae/cpuset.mems", "0"),
            ("cpuset/aurae/a/cpuset.cpus", "0-3"),
            ("memory/m/own/aurae/a/memory.limit_in_bytes", "67108864"),
            (
                "memory/m/own/aurae/a/memory.soft_limit_in_bytes",
                "33554432",
            ),
        ];
        for (file, want) in expected {
            assert_eq!(read(&t.join(file)), want, "{file}");
        }
        let nested = Limits {
            cpus: Some("1".into()),
            cpu_max: Some(-1),
            cpu_period: Some(20_000),
            ..Limits::default()
        };
        b.create(&["a", "b"], &nested).expect("create nested");
        assert_eq!(read(&t.join("cpuset/aurae/a/b/cpuset.cpus")), "1");
        assert_eq!(b.cpuset_available(&["a", "b"]), avail("1", "0"));
        // The kernel's effective list wins over the configured one.
        fs::write(t.join("cpuset/aurae/a/b/cpuset.effective_cpus"), "1\n").expect("write");
        fs::write(t.join("cpuset/aurae/a/b/cpuset.effective_mems"), "0\n").expect("write");
        fs::write(t.join("cpuset/aurae/a/b/cpuset.cpus"), "1-2\n").expect("write");
        assert_eq!(b.cpuset_available(&["a", "b"]), avail("1", "0"));
        assert_eq!(b.cpuset_available(&["a"]), avail("0-3", "0"));
        assert_eq!(read(&t.join("cpuset/aurae/a/b/cpuset.mems")), "0");
        assert_eq!(read(&t.join("cpu/aurae/a/b/cpu.cfs_quota_us")), "-1");
        assert_eq!(read(&t.join("cpu/aurae/a/b/cpu.cfs_period_us")), "20000");

        let files = b.procs_files(&["a", "b"]);
        for h in [
            "cpu/aurae",
            "cpuset/aurae",
            "memory/m/own/aurae",
            "pids/aurae",
        ] {
            assert!(
                files.contains(&t.join(h).join("a/b/cgroup.procs")),
                "{h}: {files:?}"
            );
        }
        assert_eq!(files.len(), 4);
        assert_eq!(b.unified_dir(&["a"]), None);

        fs::write(t.join("pids/aurae/a/cgroup.procs"), "7\n").expect("write");
        fs::write(t.join("pids/aurae/a/b/cgroup.procs"), "8\n9\n").expect("write");
        let mut pids = b.pids(&["a"]).expect("pids");
        pids.sort_unstable();
        assert_eq!(pids, vec![7, 8, 9]);

        b.remove(&["a", "b"], Duration::ZERO).expect("remove b");
        b.remove(&["a"], Duration::ZERO).expect("remove a");
        b.remove_root().expect("remove root");
        for h in ["cpu", "cpuset", "memory/m/own", "pids"] {
            assert!(!t.join(h).join("aurae").exists(), "{h}");
        }
        assert!(t.join("memory/m/own").is_dir());
    }

    #[test]
    fn memory_min_and_high_are_unsupported() {
        let tmp = layout(false);
        let b = detect(tmp.path(), PROC, None).expect("detect");
        for (limits, field, reason) in [
            (
                Limits {
                    mem_min: Some(1),
                    ..Limits::default()
                },
                "cell.memory.min",
                "cgroup v1 has no memory.min",
            ),
            (
                Limits {
                    mem_high: Some(1),
                    mem_max: Some(2),
                    ..Limits::default()
                },
                "cell.memory.high",
                "cgroup v1 has no memory.high",
            ),
        ] {
            match b.create(&["a"], &limits) {
                Err(CgroupError::Unsupported {
                    field: f,
                    reason: r,
                }) => {
                    assert_eq!((f, r.as_str()), (field, reason));
                }
                other => panic!("{field}: {other:?}"),
            }
        }
        assert!(!tmp.path().join("cpu/aurae/a").exists());
    }

    #[test]
    fn no_cpuset_hierarchy_has_no_cpuset() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::create_dir(tmp.path().join("memory")).expect("mkdir");
        let b = detect(tmp.path(), "", None).expect("detect");
        assert_eq!(b.cpuset_available(&[]), None);
    }

    #[test]
    fn unmounted_controller_is_unsupported() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::create_dir(tmp.path().join("memory")).expect("mkdir");
        let b = detect(tmp.path(), "", None).expect("detect");
        let limits = Limits {
            cpu_weight: Some(10),
            ..Limits::default()
        };
        let err = b.check_supported(&limits).expect_err("no cpu");
        assert!(matches!(
            err,
            CgroupError::Unsupported {
                field: "cell.cpu.weight",
                ..
            }
        ));
    }

    #[test]
    fn hybrid_mirror_gets_an_exec_leaf() {
        let tmp = layout(true);
        let t = tmp.path();
        let b = detect(t, PROC, Some("/x/aurae")).expect("detect");
        b.create(&["a"], &Limits::default()).expect("create");
        let leaf = t.join("unified/x/aurae/a/_exec");
        assert!(leaf.is_dir());
        assert_eq!(b.unified_dir(&["a"]), Some(leaf.clone()));
        assert!(b.procs_files(&["a"]).contains(&leaf.join("cgroup.procs")));
        assert_eq!(b.procs_files(&["a"]).len(), 5);
        fs::write(leaf.join("cgroup.procs"), "5\n").expect("write");
        assert_eq!(b.pids(&["a"]).expect("pids"), vec![5], "mirror is listed");
        b.remove(&["a"], Duration::ZERO).expect("remove");
        b.remove_root().expect("remove root");
        for h in ["cpu", "cpuset", "memory", "pids", "unified"] {
            assert!(!t.join(h).join("x").exists(), "{h}");
        }
    }

    #[test]
    fn stats_come_from_every_hierarchy_and_absent_stays_absent() {
        let tmp = layout(true);
        let t = tmp.path();
        for d in ["cpuacct", "blkio"] {
            fs::create_dir(t.join(d)).expect("mkdir");
        }
        let b = detect(t, PROC, None).expect("detect");
        b.create(&["s"], &Limits::default()).expect("create");
        let w = |f: &str, v: &str| fs::write(t.join(f), v).expect("write");
        w("cpuacct/aurae/s/cpuacct.usage", "3000000000\n");
        w("cpuacct/aurae/s/cpuacct.stat", "user 200\nsystem 100\n");
        w(
            "cpu/aurae/s/cpu.stat",
            "nr_periods 10\nnr_throttled 4\nthrottled_time 5000\n",
        );
        w("memory/m/own/aurae/s/memory.usage_in_bytes", "1000\n");
        w(
            "memory/m/own/aurae/s/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        w(
            "memory/m/own/aurae/s/memory.stat",
            "cache 1\nrss 2\ntotal_cache 300\ntotal_rss 600\ntotal_inactive_file 250\n",
        );
        w(
            "memory/m/own/aurae/s/memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        w("pids/aurae/s/pids.current", "3\n");
        w("pids/aurae/s/pids.max", "max\n");
        w(
            "blkio/aurae/s/blkio.throttle.io_service_bytes_recursive",
            "8:0 Read 4096\n8:0 Write 512\n8:0 Total 4608\nTotal 4608\n",
        );
        let s = b.stats(&["s"]).expect("stats");
        // Joined in every hierarchy, the stats-only ones included...
        let files = b.procs_files(&["s"]);
        assert!(
            files.contains(&t.join("cpuacct/aurae/s/cgroup.procs")),
            "{files:?}"
        );
        assert!(
            files.contains(&t.join("blkio/aurae/s/cgroup.procs")),
            "{files:?}"
        );
        let hz = clock_ticks();
        assert_eq!(s.cpu_usage_ns, Some(3_000_000_000));
        assert_eq!(s.cpu_user_ns, Some(200 * (1_000_000_000 / hz)));
        assert_eq!(s.cpu_system_ns, Some(100 * (1_000_000_000 / hz)));
        assert_eq!(
            (s.cpu_periods, s.cpu_throttled_periods, s.cpu_throttled_ns),
            (Some(10), Some(4), Some(5000))
        );
        assert_eq!(s.memory_usage_bytes, Some(1000));
        assert_eq!(s.memory_limit_bytes, None, "unlimited");
        assert_eq!(s.memory_rss_bytes, Some(600));
        assert_eq!(s.memory_cache_bytes, Some(300));
        assert_eq!(s.memory_working_set_bytes, Some(750));
        assert_eq!(s.oom_kills, Some(2));
        assert_eq!((s.pids_current, s.pids_limit), (Some(3), None));
        assert_eq!((s.io_read_bytes, s.io_write_bytes), (Some(4096), Some(512)));
        assert_eq!((s.io_read_ops, s.io_write_ops), (None, None), "no file");
        // ...but a cell made by a daemon that did not use them (re-adopted
        // after an upgrade) still starts, without joining them.
        fs::remove_dir_all(t.join("blkio/aurae/s")).expect("rm");
        let files = b.procs_files(&["s"]);
        assert_eq!(
            files.len(),
            6,
            "cpu cpuset memory pids cpuacct + mirror: {files:?}"
        );
        assert_eq!(b.stats(&["s"]).expect("stats").io_read_bytes, None);
        b.remove(&["s"], Duration::ZERO).expect("remove");
        let err = b.stats(&["s"]).expect_err("gone");
        assert!(
            matches!(&err, CgroupError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{err}"
        );
        b.remove_root().expect("remove root");
    }
}
