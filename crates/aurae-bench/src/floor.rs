//! The floor: the kernel work alone, done by the benchmark itself.
//!
//! * plain: `posix_spawn` + `wait` of `/bin/true` (Rust's `Command`, which
//!   uses posix_spawn when nothing runs between fork and exec).
//! * isolated, in process (no `unshare(1)`): a raw `clone(CLONE_NEWPID)`;
//!   the child joins the cgroups (cpu and memory v1 plus the cgroup2 tree,
//!   or the v2 cgroup), then `unshare(mnt|uts|ipc|net|cgroup)` and
//!   `execve("/bin/true")`; the parent `wait4`s. Same order as auraed's own
//!   children: join first (as root), then the new namespaces.

use std::{
    ffi::CStr,
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// Limits every isolated workload gets (cells, floor, OCI): set, but not
/// binding for `true` (2 CPUs' worth of quota, 256 MiB).
pub const CPU_QUOTA_US: i64 = 200_000;
pub const CPU_PERIOD_US: u64 = 100_000;
pub const MEMORY_MAX: i64 = 256 << 20;

pub const CGROUP_MOUNT: &str = "/sys/fs/cgroup";

/// A cgroup of ours in every hierarchy that matters, with the limits set.
#[derive(Debug)]
pub struct CgroupSet {
    dirs: Vec<PathBuf>,
}

impl CgroupSet {
    /// Creates `rel` (e.g. "aurae-bench-1-floor/x") in each hierarchy:
    /// cpu and memory v1 plus the unified mirror on hybrid hosts, or the
    /// one v2 tree (controllers enabled along the way).
    pub fn create(rel: &str) -> anyhow::Result<CgroupSet> {
        let root = Path::new(CGROUP_MOUNT);
        let mut set = CgroupSet { dirs: Vec::new() };
        if root.join("cgroup.controllers").is_file() {
            let mut parent = root.to_path_buf();
            for comp in rel.split('/') {
                let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+cpu +memory");
                parent = parent.join(comp);
                mkdir(&parent)?;
                set.dirs.push(parent.clone());
            }
            set.dirs.reverse();
            let d = &set.dirs[0];
            write(
                &d.join("cpu.max"),
                &format!("{CPU_QUOTA_US} {CPU_PERIOD_US}"),
            )?;
            write(&d.join("memory.max"), &MEMORY_MAX.to_string())?;
            set.dirs.truncate(1);
            return Ok(set);
        }
        for h in ["cpu", "memory", "unified"] {
            let base = root.join(h);
            if !base.is_dir() {
                continue;
            }
            let d = base.join(rel);
            mkdir(&d)?;
            set.dirs.push(d.clone());
            match h {
                "cpu" => {
                    write(&d.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&d.join("cpu.cfs_quota_us"), &CPU_QUOTA_US.to_string())?;
                }
                "memory" => write(&d.join("memory.limit_in_bytes"), &MEMORY_MAX.to_string())?,
                _ => {}
            }
        }
        Ok(set)
    }

    /// Open `cgroup.procs` of each hierarchy, for the child to write "0".
    pub fn procs(&self) -> anyhow::Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map(OwnedFd::from)
                    .with_context(|| format!("open {}", p.display()))
            })
            .collect()
    }

    /// Removes the directories (empty by now; retries while the kernel
    /// still counts an exited member).
    pub fn remove(mut self) -> anyhow::Result<()> {
        self.remove_dirs()
    }

    fn remove_dirs(&mut self) -> anyhow::Result<()> {
        for d in std::mem::take(&mut self.dirs) {
            rmdir_retry(&d)?;
        }
        Ok(())
    }
}

impl Drop for CgroupSet {
    fn drop(&mut self) {
        if let Err(e) = self.remove_dirs() {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// mkdir -p (parents are removed by [`remove_tree`] at the end).
fn mkdir(p: &Path) -> anyhow::Result<()> {
    match std::fs::create_dir_all(p) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(e).with_context(|| format!("mkdir {}", p.display()))
        }
        _ => Ok(()),
    }
}

fn write(p: &Path, v: &str) -> anyhow::Result<()> {
    std::fs::write(p, v).with_context(|| format!("write {v} to {}", p.display()))
}

/// rmdir, retrying EBUSY for up to a second; a missing dir is fine.
pub fn rmdir_retry(d: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match std::fs::remove_dir(d) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", d.display())),
        }
    }
}

/// Removes `rel` in every hierarchy (runc also makes directories in the
/// named and minor ones, e.g. systemd and cpuacct), deepest first.
pub fn remove_tree(rel: &str) {
    let mut roots = vec![PathBuf::from(CGROUP_MOUNT)];
    if let Ok(rd) = std::fs::read_dir(CGROUP_MOUNT) {
        roots.extend(rd.flatten().map(|e| e.path()));
    }
    for h in roots {
        let base = h.join(rel);
        if base.is_dir() {
            remove_tree_at(&base);
        }
    }
}

fn remove_tree_at(d: &Path) {
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree_at(&e.path());
            }
        }
    }
    if let Err(e) = rmdir_retry(d) {
        eprintln!("cleanup: {e:#}");
    }
}

/// posix_spawn + wait of /bin/true.
pub fn spawn_plain() -> anyhow::Result<()> {
    let st = std::process::Command::new("/bin/true")
        .status()
        .context("spawn /bin/true")?;
    anyhow::ensure!(st.success(), "/bin/true: {st}");
    Ok(())
}

/// clone(NEWPID) → join `procs` → unshare the rest → exec /bin/true; wait.
pub fn spawn_isolated(procs: &[RawFd]) -> anyhow::Result<()> {
    const TRUE: &CStr = c"/bin/true";
    let argv: [*const libc::c_char; 2] = [TRUE.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let rest = libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWCGROUP;
    // SAFETY: a fork-like clone (no new stack: the child runs on a copy of
    // this thread's stack). The child only makes raw system calls on data
    // prepared before the clone, then execs or _exits; it never returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::CLONE_NEWPID | libc::SIGCHLD,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid == 0 {
        // SAFETY: see above; only async-signal-safe calls follow.
        unsafe {
            for &fd in procs {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(120);
                }
            }
            if libc::unshare(rest) != 0 {
                libc::_exit(121);
            }
            libc::execve(TRUE.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(122);
        }
    }
    if pid < 0 {
        return Err(io::Error::last_os_error()).context("clone(CLONE_NEWPID)");
    }
    let pid = i32::try_from(pid).context("clone returned a bad pid")?;
    let code = wait_pid(pid)?;
    anyhow::ensure!(
        code == 0,
        "isolated /bin/true exited with {code} (120: cgroup join, 121: unshare, 122: exec failed)"
    );
    Ok(())
}

/// waitpid, retrying EINTR; the exit code (128+signal if killed).
pub fn wait_pid(pid: i32) -> anyhow::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e).with_context(|| format!("waitpid {pid}"));
        }
    }
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}

/// One cold isolated iteration: mkdir cgroups + limits, spawn, rmdir.
pub fn cold_isolated(rel: &str) -> anyhow::Result<()> {
    let cg = CgroupSet::create(rel)?;
    let procs = cg.procs()?;
    let fds: Vec<RawFd> = procs.iter().map(AsRawFd::as_raw_fd).collect();
    spawn_isolated(&fds)?;
    drop(procs);
    cg.remove()
}
