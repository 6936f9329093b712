//! Pure cgroup v2: one tree, controllers enabled top-down through `cgroup.subtree_control`,
//! processes in each cell's `_exec` leaf.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use super::{
    invalid_cell, io_err, limit_value, lock, pids_recursive, read_trimmed, requested,
    stats::{self, keyed, read_opt, read_u64, CellStats},
    write_cgroup_kill, write_file, write_limit, CgroupBackend, CgroupError, Freezer, Limits, Tree,
    CONTROLLERS, DAEMON_LEAF, EXEC_LEAF,
};

/// cpu.max period when only the quota is given (the kernel's default too).
const DEFAULT_PERIOD: u64 = 100_000;

#[derive(Debug)]
pub(super) struct V2Backend {
    tree: Tree,
    /// Before the root subtree exists: the controllers the hierarchy root offers (a guess).
    estimate: Vec<String>,
    /// Once the root subtree is set up: the controllers enabled for cells. None until then.
    enabled: Mutex<Option<Vec<String>>>,
}

/// Our controllers named in a `cgroup.controllers`/`cgroup.subtree_control` text.
fn wanted_in(text: &str) -> Vec<String> {
    let listed: Vec<&str> = text
        .split_whitespace()
        .map(|c| c.trim_start_matches('+'))
        .collect();
    CONTROLLERS
        .iter()
        .filter(|c| listed.contains(c))
        .map(|c| c.to_string())
        .collect()
}

impl V2Backend {
    pub(super) fn new(tree: Tree) -> V2Backend {
        let estimate = read_trimmed(&tree.mount.join("cgroup.controllers"))
            .map(|t| wanted_in(&t))
            .unwrap_or_default();
        V2Backend {
            tree,
            estimate,
            enabled: Mutex::new(None),
        }
    }

    /// Creates the root subtree and enables our controllers from the mount down to it;
    /// returns the controllers cells get. Runs once (again after `remove_root`).
    fn ensure_root(&self) -> Result<Vec<String>, CgroupError> {
        let mut enabled = lock(&self.enabled);
        if let Some(e) = enabled.as_ref() {
            return Ok(e.clone());
        }
        let made = self.tree.create_root()?;
        let mut avail = self.estimate.clone();
        for dir in self.tree.chain() {
            match self.enable(&dir, &avail) {
                Ok(now) => avail = now,
                Err(e) => {
                    self.tree.remove_created(&made);
                    return Err(e);
                }
            }
        }
        *enabled = Some(avail.clone());
        Ok(avail)
    }

    /// Enables `avail` (what the parent passes down) in `dir/cgroup.subtree_control`, writing only
    /// what is missing, so cgroups we did not create are changed only when they must be.
    /// Returns what is enabled afterwards. A controller that cannot be enabled is logged and left
    /// out: cells still work, and limits needing it return Unsupported.
    fn enable(&self, dir: &Path, avail: &[String]) -> Result<Vec<String>, CgroupError> {
        let file = dir.join("cgroup.subtree_control");
        let current = wanted_in(&read_trimmed(&file)?);
        let missing: Vec<&String> = avail.iter().filter(|c| !current.contains(c)).collect();
        if missing.is_empty() {
            return Ok(current);
        }
        let line = missing
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut res = fs::write(&file, &line);
        // A cgroup other than the root may not both hold processes and enable controllers for
        // its children. If that cgroup is the daemon's own, do what delegated systemd services
        // do: move the daemon into a leaf `<own>/auraed`, then retry. We move only our own pid;
        // other processes in there are not ours to move.
        if res
            .as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY))
            && dir == self.tree.own
            && dir != self.tree.mount
        {
            self.move_self_to_leaf(dir)?;
            res = fs::write(&file, &line);
        }
        if let Err(e) = res {
            // One bad controller fails the whole write; try them one by one.
            tracing::debug!("enabling {line:?} in {}: {e}", file.display());
            for c in &missing {
                if let Err(e) = fs::write(&file, format!("+{c}")) {
                    tracing::warn!("cannot enable {c} in {}: {e}", file.display());
                }
            }
        }
        Ok(wanted_in(&read_trimmed(&file)?))
    }

    fn move_self_to_leaf(&self, own: &Path) -> Result<(), CgroupError> {
        let me = std::process::id().to_string();
        let procs = read_trimmed(&own.join("cgroup.procs"))?;
        if !procs.lines().any(|l| l.trim() == me) {
            return Ok(());
        }
        let leaf = own.join(DAEMON_LEAF);
        match fs::create_dir(&leaf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create", &leaf, e)),
        }
        tracing::info!(
            "moving auraed into {} to enable controllers",
            leaf.display()
        );
        write_file(&leaf.join("cgroup.procs"), &me)
    }

    fn cell(&self, path: &[&str]) -> Result<PathBuf, CgroupError> {
        self.tree.cell_dir(path).ok_or_else(|| invalid_cell(path))
    }

    fn create_in(
        &self,
        dir: &Path,
        limits: &Limits,
        enabled: &[String],
        made: &mut Vec<PathBuf>,
    ) -> Result<(), CgroupError> {
        fs::create_dir(dir).map_err(|e| io_err("create", dir, e))?;
        made.push(dir.to_path_buf());
        apply(dir, limits)?;
        if !enabled.is_empty() {
            let line = enabled.iter().map(|c| format!("+{c}")).collect::<Vec<_>>();
            write_file(&dir.join("cgroup.subtree_control"), &line.join(" "))?;
        }
        let leaf = dir.join(EXEC_LEAF);
        fs::create_dir(&leaf).map_err(|e| io_err("create", &leaf, e))?;
        made.push(leaf);
        Ok(())
    }
}

/// Writes the limits into the cell's own directory.
fn apply(dir: &Path, l: &Limits) -> Result<(), CgroupError> {
    if let Some(w) = l.cpu_weight {
        write_limit("cell.cpu.weight", &dir.join("cpu.weight"), &w.to_string())?;
    }
    if l.cpu_max.is_some() || l.cpu_period.is_some() {
        let quota = l
            .cpu_max
            .map_or_else(|| "max".to_string(), |m| limit_value(m, "max"));
        let period = l.cpu_period.unwrap_or(DEFAULT_PERIOD);
        let value = format!("{quota} {period}");
        write_limit("cell.cpu.max", &dir.join("cpu.max"), &value)?;
    }
    if let Some(c) = &l.cpus {
        write_limit("cell.cpuset.cpus", &dir.join("cpuset.cpus"), c)?;
    }
    if let Some(m) = &l.mems {
        write_limit("cell.cpuset.mems", &dir.join("cpuset.mems"), m)?;
    }
    for (value, file, field) in [
        (l.mem_min, "memory.min", "cell.memory.min"),
        (l.mem_low, "memory.low", "cell.memory.low"),
        (l.mem_high, "memory.high", "cell.memory.high"),
        (l.mem_max, "memory.max", "cell.memory.max"),
    ] {
        if let Some(v) = value {
            write_limit(field, &dir.join(file), &limit_value(v, "max"))?;
        }
    }
    Ok(())
}

fn check(limits: &Limits, enabled: &[String], root: &Path) -> Result<(), CgroupError> {
    for (field, ctrl) in requested(limits) {
        if !enabled.iter().any(|c| c == ctrl) {
            return Err(CgroupError::Unsupported {
                field,
                reason: format!(
                    "the {ctrl} controller is not enabled in {}/cgroup.subtree_control",
                    root.display()
                ),
            });
        }
    }
    Ok(())
}

impl CgroupBackend for V2Backend {
    fn is_v2(&self) -> bool {
        true
    }

    fn check_supported(&self, limits: &Limits) -> Result<(), CgroupError> {
        let enabled = lock(&self.enabled).clone();
        check(
            limits,
            enabled.as_deref().unwrap_or(&self.estimate),
            &self.tree.root,
        )
    }

    fn create(&self, path: &[&str], limits: &Limits) -> Result<(), CgroupError> {
        let dir = self.cell(path)?;
        self.check_supported(limits)?;
        let enabled = self.ensure_root()?;
        // The estimate may have been optimistic; now we know.
        check(limits, &enabled, &self.tree.root)?;
        let mut made = Vec::new();
        let res = self.create_in(&dir, limits, &enabled, &mut made);
        if res.is_err() {
            self.tree.remove_created(&made);
        }
        res
    }

    fn procs_files(&self, path: &[&str]) -> Vec<PathBuf> {
        self.tree
            .cell_dir(path)
            .map(|d| vec![d.join(EXEC_LEAF).join("cgroup.procs")])
            .unwrap_or_default()
    }

    fn pids(&self, path: &[&str]) -> Result<Vec<i32>, CgroupError> {
        pids_recursive(&self.cell(path)?)
    }

    fn kill_all(&self, path: &[&str]) -> Result<(), CgroupError> {
        let dir = self.cell(path)?;
        if write_cgroup_kill(&dir)? {
            return Ok(());
        }
        let freeze = dir.join("cgroup.freeze");
        let freezer = freeze.is_file().then_some(Freezer {
            file: freeze,
            freeze: "1",
            thaw: "0",
        });
        super::kill_loop(&dir, freezer)
    }

    fn remove(&self, path: &[&str], timeout: Duration) -> Result<(), CgroupError> {
        let dir = self.cell(path)?;
        let deadline = Instant::now() + timeout;
        self.tree.remove_dir(&dir.join(EXEC_LEAF), deadline)?;
        self.tree.remove_dir(&dir, deadline)
    }

    fn unified_dir(&self, path: &[&str]) -> Option<PathBuf> {
        self.tree.cell_dir(path).map(|d| d.join(EXEC_LEAF))
    }

    fn leftover_cells(&self) -> Vec<Vec<String>> {
        super::cell_dirs_below(&self.tree.root)
    }

    fn cpuset_available(&self, parent: &[&str]) -> Option<(String, String)> {
        self.tree.cpuset_of(
            parent,
            &["cpuset.cpus.effective"],
            &["cpuset.mems.effective"],
        )
    }

    fn stats(&self, path: &[&str]) -> Result<CellStats, CgroupError> {
        let dir = self.cell(path)?;
        stats::require_dir(&dir)?;
        let mut s = CellStats::default();
        // cpu.stat's usage lines exist even without the cpu controller;
        // the nr_* and throttled_usec lines only with it.
        if let Some(t) = read_opt(&dir.join("cpu.stat"))? {
            let ns = |us: u64| us.saturating_mul(1000);
            s.cpu_usage_ns = keyed(&t, "usage_usec").map(ns);
            s.cpu_user_ns = keyed(&t, "user_usec").map(ns);
            s.cpu_system_ns = keyed(&t, "system_usec").map(ns);
            s.cpu_periods = keyed(&t, "nr_periods");
            s.cpu_throttled_periods = keyed(&t, "nr_throttled");
            s.cpu_throttled_ns = keyed(&t, "throttled_usec").map(ns);
        }
        s.memory_usage_bytes = read_u64(&dir.join("memory.current"))?;
        s.memory_limit_bytes = read_u64(&dir.join("memory.max"))?;
        if let Some(t) = read_opt(&dir.join("memory.stat"))? {
            s.memory_rss_bytes = keyed(&t, "anon");
            s.memory_cache_bytes = keyed(&t, "file");
            s.memory_working_set_bytes =
                stats::working_set(s.memory_usage_bytes, keyed(&t, "inactive_file"));
        }
        s.oom_kills = read_opt(&dir.join("memory.events"))?.and_then(|t| keyed(&t, "oom_kill"));
        s.pids_current = read_u64(&dir.join("pids.current"))?;
        s.pids_limit = read_u64(&dir.join("pids.max"))?;
        if let Some(t) = read_opt(&dir.join("io.stat"))? {
            let [rb, wb, ro, wo] = stats::io_stat_sums(&t);
            s.io_read_bytes = Some(rb);
            s.io_write_bytes = Some(wb);
            s.io_read_ops = Some(ro);
            s.io_write_ops = Some(wo);
        }
        Ok(s)
    }

    fn remove_root(&self) -> Result<(), CgroupError> {
        let mut enabled = lock(&self.enabled);
        self.tree.remove_root()?;
        *enabled = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::detect;
    use super::*;

    /// A temp dir laid out like a cgroup2 mount offering `controllers`.
    fn layout(controllers: &str) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().expect("tempdir");
        for (f, v) in [
            ("cgroup.controllers", controllers),
            ("cgroup.subtree_control", ""),
            ("cgroup.procs", ""),
        ] {
            fs::write(tmp.path().join(f), v).expect("write");
        }
        tmp
    }

    fn read(p: &Path) -> String {
        fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn limits_land_in_the_right_files() {
        let tmp = layout("cpuset cpu io memory hugetlb pids");
        let b = detect(tmp.path(), "0::/\n", None).expect("detect");
        assert!(b.is_v2());
        let limits = Limits {
            cpu_weight: Some(100),
            cpu_max: Some(50_000),
            cpu_period: None,
            cpus: Some("0-1".into()),
            mems: Some("0".into()),
            mem_min: Some(1 << 20),
            mem_low: Some(2 << 20),
            mem_high: Some(-1),
            mem_max: Some(64 << 20),
        };
        b.create(&["a"], &limits).expect("create");
        let root = tmp.path().join("aurae");
        let cell = root.join("a");
        let all = "+cpu +cpuset +io +memory +pids";
        assert_eq!(read(&tmp.path().join("cgroup.subtree_control")), all);
        assert_eq!(read(&root.join("cgroup.subtree_control")), all);
        assert_eq!(read(&cell.join("cgroup.subtree_control")), all);
        for (file, want) in [
            ("cpu.weight", "100"),
            ("cpu.max", "50000 100000"),
            ("cpuset.cpus", "0-1"),
            ("cpuset.mems", "0"),
            ("memory.min", "1048576"),
            ("memory.low", "2097152"),
            ("memory.high", "max"),
            ("memory.max", "67108864"),
        ] {
            assert_eq!(read(&cell.join(file)), want, "{file}");
        }
        assert!(cell.join(EXEC_LEAF).is_dir());
        assert_eq!(b.procs_files(&["a"]), vec![cell.join("_exec/cgroup.procs")]);
        assert_eq!(b.unified_dir(&["a"]), Some(cell.join("_exec")));

        let nested = Limits {
            cpu_max: Some(-1),
            cpu_period: Some(20_000),
            ..Limits::default()
        };
        b.create(&["a", "b"], &nested).expect("create nested");
        assert_eq!(read(&cell.join("b/cpu.max")), "max 20000");

        fs::write(cell.join("_exec/cgroup.procs"), "11\n12\n").expect("write");
        fs::write(cell.join("b/_exec/cgroup.procs"), "13\n").expect("write");
        let mut pids = b.pids(&["a"]).expect("pids");
        pids.sort_unstable();
        assert_eq!(pids, vec![11, 12, 13]);

        b.remove(&["a", "b"], Duration::from_millis(10))
            .expect("remove b");
        b.remove(&["a"], Duration::from_millis(10))
            .expect("remove a");
        b.remove(&["a"], Duration::from_millis(10))
            .expect("remove again");
        assert!(!cell.exists());
        b.remove_root().expect("remove root");
        assert!(!root.exists());
    }

    #[test]
    fn cpuset_available_is_the_parents_effective_one() {
        let tmp = layout("cpuset cpu");
        let t = tmp.path();
        let b = detect(t, "0::/\n", None).expect("detect");
        let avail = |cpus: &str, mems: &str| Some((cpus.to_owned(), mems.to_owned()));
        assert_eq!(b.cpuset_available(&[]), None, "nothing to read");
        fs::write(t.join("cpuset.cpus.effective"), "0-1\n").expect("write");
        fs::write(t.join("cpuset.mems.effective"), "0\n").expect("write");
        assert_eq!(b.cpuset_available(&[]), avail("0-1", "0"));
        b.create(&["a"], &Limits::default()).expect("create");
        // A plain directory has no effective files: the nearest ancestor's.
        assert_eq!(b.cpuset_available(&["a"]), avail("0-1", "0"));
        fs::write(t.join("aurae/a/cpuset.cpus.effective"), "1\n").expect("write");
        fs::write(t.join("aurae/a/cpuset.mems.effective"), "0\n").expect("write");
        assert_eq!(b.cpuset_available(&["a"]), avail("1", "0"));
        assert_eq!(b.cpuset_available(&[]), avail("0-1", "0"));
        b.remove(&["a"], Duration::ZERO).expect("remove");
        b.remove_root().expect("remove root");
    }

    #[test]
    fn missing_controller_is_unsupported() {
        let tmp = layout("cpu pids");
        let b = detect(tmp.path(), "0::/\n", None).expect("detect");
        let limits = Limits {
            cpu_weight: Some(5),
            mem_max: Some(1 << 30),
            ..Limits::default()
        };
        let err = b.check_supported(&limits).expect_err("no memory");
        assert!(
            matches!(
                err,
                CgroupError::Unsupported {
                    field: "cell.memory.max",
                    ..
                }
            ),
            "{err}"
        );
        assert!(b.create(&["a"], &limits).is_err());
        assert!(!tmp.path().join("aurae/a").exists(), "nothing left behind");
        b.create(&["a"], &Limits::default())
            .expect("no limits is fine");
        assert_eq!(
            read(&tmp.path().join("aurae/cgroup.subtree_control")),
            "+cpu +pids"
        );
        b.remove(&["a"], Duration::ZERO).expect("remove");
        b.remove_root().expect("remove root");
    }

    #[test]
    fn default_root_is_below_own_cgroup_and_override_is_cleaned_up() {
        let tmp = layout("cpu memory");
        fs::create_dir_all(tmp.path().join("svc/x")).expect("mkdir");
        let b = detect(tmp.path(), "0::/svc/x\n", None).expect("detect");
        b.create(&["c"], &Limits::default()).expect("create");
        assert!(tmp.path().join("svc/x/aurae/c/_exec").is_dir());
        b.remove(&["c"], Duration::ZERO).expect("remove");
        b.remove_root().expect("remove root");
        assert!(!tmp.path().join("svc/x/aurae").exists());
        assert!(tmp.path().join("svc/x").is_dir(), "own cgroup stays");

        let b = detect(tmp.path(), "0::/svc/x\n", Some("/my/aurae")).expect("detect");
        b.create(&["c"], &Limits::default()).expect("create");
        assert!(tmp.path().join("my/aurae/c").is_dir());
        b.remove(&["c"], Duration::ZERO).expect("remove");
        b.remove_root().expect("remove root");
        assert!(!tmp.path().join("my").exists(), "created ancestors go too");
    }

    #[test]
    fn bad_cell_paths_are_refused() {
        let tmp = layout("cpu");
        let b = detect(tmp.path(), "0::/\n", None).expect("detect");
        for bad in [&[][..], &[".."], &["a/b"], &["_exec"], &[""]] {
            assert!(b.create(bad, &Limits::default()).is_err(), "{bad:?}");
            assert!(b.procs_files(bad).is_empty());
            assert!(b.remove(bad, Duration::ZERO).is_err());
        }
    }

    #[test]
    fn stats_read_the_v2_files() {
        let tmp = layout("cpuset cpu io memory pids");
        let b = detect(tmp.path(), "0::/\n", None).expect("detect");
        b.create(&["s"], &Limits::default()).expect("create");
        let d = tmp.path().join("aurae/s");
        let w = |f: &str, v: &str| fs::write(d.join(f), v).expect("write");
        w(
            "cpu.stat",
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n\
             nr_periods 9\nnr_throttled 3\nthrottled_usec 70\n",
        );
        w("memory.current", "4096\n");
        w("memory.max", "max\n");
        w("memory.stat", "anon 1024\nfile 2048\ninactive_file 1000\n");
        w("memory.events", "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n");
        w("pids.current", "2\n");
        w("pids.max", "64\n");
        let s = b.stats(&["s"]).expect("stats");
        assert_eq!(
            (s.cpu_usage_ns, s.cpu_user_ns, s.cpu_system_ns),
            (Some(1_500_000), Some(1_000_000), Some(500_000))
        );
        assert_eq!(
            (s.cpu_periods, s.cpu_throttled_periods, s.cpu_throttled_ns),
            (Some(9), Some(3), Some(70_000))
        );
        assert_eq!(s.memory_usage_bytes, Some(4096));
        assert_eq!(s.memory_working_set_bytes, Some(3096));
        assert_eq!(
            (s.memory_rss_bytes, s.memory_cache_bytes),
            (Some(1024), Some(2048))
        );
        assert_eq!(s.memory_limit_bytes, None, "max");
        assert_eq!(s.oom_kills, Some(1));
        assert_eq!((s.pids_current, s.pids_limit), (Some(2), Some(64)));
        assert_eq!(s.io_read_bytes, None, "no io.stat");
        w(
            "io.stat",
            "8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n",
        );
        w("memory.max", "1048576\n");
        let s = b.stats(&["s"]).expect("stats");
        assert_eq!(
            [
                s.io_read_bytes,
                s.io_write_bytes,
                s.io_read_ops,
                s.io_write_ops
            ],
            [Some(10), Some(20), Some(1), Some(2)]
        );
        assert_eq!(s.memory_limit_bytes, Some(1 << 20));
    }
}
