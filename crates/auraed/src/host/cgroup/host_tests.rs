//! Tests against the real kernel on a hybrid host (v1 controllers + cgroup2 at /sys/fs/cgroup/unified),
//! as root. Each test uses its own `--cgroup-root` (`/aurae-test-<pid>-<n>`) so parallel tests never
//! meet, and a Drop guard removes everything below that root even when an assertion fails.

use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt, process::CommandExt, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use super::{detect_host, CgroupBackend, CgroupError, Limits, DEFAULT_MOUNT_ROOT};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// None (after saying so loudly) when this host cannot run the test.
fn hybrid_root() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: cgroup host test needs root");
        return None;
    }
    if !Path::new(DEFAULT_MOUNT_ROOT)
        .join("unified/cgroup.procs")
        .is_file()
    {
        eprintln!("SKIPPED: cgroup host test needs a hybrid host (/sys/fs/cgroup/unified)");
        return None;
    }
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Some(format!("aurae-test-{}-{n}", std::process::id()))
}

/// Kills the children and removes every directory below `/sys/fs/cgroup/*/<root>` on drop.
struct Guard {
    root: String,
    children: Vec<Child>,
}

impl Guard {
    fn dirs(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(DEFAULT_MOUNT_ROOT) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.path().join(&self.root))
            .filter(|d| d.exists())
            .collect()
    }
}

/// rmdir bottom-up; cgroupfs refuses to remove a directory with sub-cgroups.
fn rmdir_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    for _ in 0..200 {
        match fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => return,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in self.dirs() {
            rmdir_tree(&d);
        }
    }
}

/// `sleep 30` joining the cell through its procs files, as the spawner will do.
fn spawn_in(b: &Arc<dyn CgroupBackend>, path: &[&str]) -> Child {
    let files: Vec<CString> = b
        .procs_files(path)
        .iter()
        .map(|p| CString::new(p.as_os_str().as_bytes()).expect("no NUL in path"))
        .collect();
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    // SAFETY: the closure runs in the forked child before exec; it only calls open/write/close,
    // which are async-signal-safe, on CStrings built before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for f in &files {
                let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        })
    };
    cmd.spawn().expect("spawn sleep")
}

fn read(p: PathBuf) -> String {
    fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

#[test]
fn hybrid_cell_limits_join_kill_remove() {
    let Some(root) = hybrid_root() else { return };
    let mut guard = Guard {
        root: root.clone(),
        children: Vec::new(),
    };
    let b = detect_host(Some(&format!("/{root}"))).expect("detect");
    assert!(!b.is_v2());
    let cell = format!("t{}", std::process::id());
    let path = [cell.as_str()];

    let err = b.check_supported(&Limits {
        mem_high: Some(1),
        ..Limits::default()
    });
    assert!(matches!(
        err,
        Err(CgroupError::Unsupported {
            field: "cell.memory.high",
            ..
        })
    ));

    let limits = Limits {
        cpu_weight: Some(100),
        cpu_max: Some(50_000),
        cpus: Some("0".into()),
        mem_low: Some(32 << 20),
        mem_max: Some(64 << 20),
        ..Limits::default()
    };
    b.create(&path, &limits).expect("create");
    let h = |ctrl: &str, file: &str| {
        Path::new(DEFAULT_MOUNT_ROOT)
            .join(ctrl)
            .join(&root)
            .join(&cell)
            .join(file)
    };
    assert_eq!(
        read(h("cpu", "cpu.shares")),
        (2 + (99 * 262_142) / 9_999).to_string()
    );
    assert_eq!(read(h("cpu", "cpu.cfs_quota_us")), "50000");
    assert_eq!(read(h("cpu", "cpu.cfs_period_us")), "100000");
    assert_eq!(
        read(h("memory", "memory.limit_in_bytes")),
        (64u64 << 20).to_string()
    );
    assert_eq!(
        read(h("memory", "memory.soft_limit_in_bytes")),
        (32u64 << 20).to_string()
    );
    assert_eq!(read(h("cpuset", "cpuset.cpus")), "0");

    let child = spawn_in(&b, &path);
    let pid = i32::try_from(child.id()).expect("pid fits i32");
    guard.children.push(child);
    assert!(b.pids(&path).expect("pids").contains(&pid));
    let own = read(PathBuf::from(format!("/proc/{pid}/cgroup")));
    assert!(
        own.lines()
            .any(|l| l.ends_with(&format!(":memory:/{root}/{cell}"))),
        "{own}"
    );
    assert!(
        own.lines().any(|l| l == format!("0::/{root}/{cell}/_exec")),
        "{own}"
    );
    assert!(b.unified_dir(&path).is_some_and(|d| d.is_dir()));

    let busy = b.remove(&path, Duration::from_millis(30));
    assert!(matches!(busy, Err(CgroupError::Busy { .. })), "{busy:?}");

    b.kill_all(&path).expect("kill_all");
    let status = guard.children[0].wait().expect("wait");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    b.remove(&path, Duration::from_secs(2)).expect("remove");
    b.remove_root().expect("remove_root");
    assert_eq!(
        guard.dirs(),
        Vec::<PathBuf>::new(),
        "nothing left in any hierarchy"
    );
}

#[test]
fn hybrid_nested_cells() {
    let Some(root) = hybrid_root() else { return };
    let mut guard = Guard {
        root: root.clone(),
        children: Vec::new(),
    };
    let b = detect_host(Some(&format!("/{root}/deeper"))).expect("detect");
    b.create(
        &["a"],
        &Limits {
            cpus: Some("0".into()),
            ..Limits::default()
        },
    )
    .expect("create a");
    b.create(
        &["a", "b"],
        &Limits {
            mem_max: Some(32 << 20),
            ..Limits::default()
        },
    )
    .expect("create a/b");
    let cpus = Path::new(DEFAULT_MOUNT_ROOT)
        .join("cpuset")
        .join(&root)
        .join("deeper/a/b/cpuset.cpus");
    assert_eq!(read(cpus), "0", "copied from the parent cell");

    let child = spawn_in(&b, &["a", "b"]);
    let pid = i32::try_from(child.id()).expect("pid fits i32");
    guard.children.push(child);
    assert!(
        b.pids(&["a"]).expect("pids").contains(&pid),
        "parent sees nested pids"
    );

    b.kill_all(&["a"]).expect("kill_all");
    let status = guard.children[0].wait().expect("wait");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    b.remove(&["a", "b"], Duration::from_secs(2))
        .expect("remove a/b");
    b.remove(&["a"], Duration::from_secs(2)).expect("remove a");
    b.remove_root().expect("remove_root");
    assert_eq!(
        guard.dirs(),
        Vec::<PathBuf>::new(),
        "nothing left in any hierarchy"
    );
}

/// The fallback for v1 hosts without a cgroup2 mirror: freeze, kill pids, thaw, until empty.
#[test]
fn hybrid_kill_loop_with_v1_freezer() {
    let Some(root) = hybrid_root() else { return };
    let mut guard = Guard {
        root: root.clone(),
        children: Vec::new(),
    };
    let b = detect_host(Some(&format!("/{root}"))).expect("detect");
    b.create(&["k"], &Limits::default()).expect("create");
    let children = [spawn_in(&b, &["k"]), spawn_in(&b, &["k"])];
    guard.children.extend(children);
    let mount = Path::new(DEFAULT_MOUNT_ROOT);
    let freezer = mount.join("freezer").join(&root).join("k/freezer.state");
    assert!(freezer.is_file(), "freezer is a used controller");
    let freezer = Some(super::Freezer {
        file: freezer,
        freeze: "FROZEN",
        thaw: "THAWED",
    });
    super::kill_loop(&mount.join("memory").join(&root).join("k"), freezer).expect("kill_loop");
    for c in &mut guard.children {
        assert_eq!(c.wait().expect("wait").signal(), Some(libc::SIGKILL));
    }
    b.remove(&["k"], Duration::from_secs(2)).expect("remove");
    b.remove_root().expect("remove_root");
    assert_eq!(
        guard.dirs(),
        Vec::<PathBuf>::new(),
        "nothing left in any hierarchy"
    );
}

/// Values the kernel refuses are `Refused` naming the field (INVALID_ARGUMENT at the edge), and
/// a failed create leaves nothing behind; the available cpuset is the host's.
#[test]
fn hybrid_kernel_refusals_name_the_field() {
    let Some(root) = hybrid_root() else { return };
    let _guard = Guard {
        root: root.clone(),
        children: Vec::new(),
    };
    let b = detect_host(Some(&format!("/{root}"))).expect("detect");
    let host_cpus = read(Path::new(DEFAULT_MOUNT_ROOT).join("cpuset/cpuset.effective_cpus"));
    let (cpus, _mems) = b.cpuset_available(&[]).expect("cpuset is mounted");
    assert_eq!(cpus, host_cpus);
    let cases: [(Limits, &str); 4] = [
        (
            Limits {
                cpu_max: Some(1 << 50),
                ..Limits::default()
            },
            "cell.cpu.max",
        ),
        (
            Limits {
                cpus: Some("0-99999".into()),
                ..Limits::default()
            },
            "cell.cpuset.cpus",
        ),
        (
            Limits {
                cpus: Some("4294967295".into()),
                ..Limits::default()
            },
            "cell.cpuset.cpus",
        ),
        (
            Limits {
                mems: Some("7".into()),
                ..Limits::default()
            },
            "cell.cpuset.mems",
        ),
    ];
    for (limits, want) in cases {
        match b.create(&["r"], &limits) {
            Err(CgroupError::Refused { field, .. }) => assert_eq!(field, want, "{limits:?}"),
            other => panic!("{limits:?}: {other:?}"),
        }
        for d in fs::read_dir(DEFAULT_MOUNT_ROOT).expect("ls").flatten() {
            assert!(
                !d.path().join(&root).join("r").exists(),
                "{limits:?} left r"
            );
        }
    }
}
