//! Executables: started through a shim (the process that outlives the
//! daemon; see `host::shim`), watched until exit, stopped gracefully.
//! The daemon keeps only this small record per executable (the output is
//! in files), so its memory does not depend on what was printed.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aurae_proto::cells::ExecutableStatus;
use tokio::sync::watch;

use super::{persist::ExecRecord, CellsError};
use crate::host::{
    proc::{self, ProcId},
    shim::format::{self, ExitRecord},
};

/// After SIGKILL, how long to wait for the exit before reporting an error.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long a released shim gets to write its last output and exit.
const SHIM_WAIT: Duration = Duration::from_secs(5);
/// How long after the exit the shim gets to record it, at most.
const EXIT_RECORD_WAIT: Duration = Duration::from_secs(10);

/// How an executable ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// As its shim recorded it.
    Known(ExitRecord),
    /// It ended while nothing could record how (its shim was killed).
    Unknown { at: i64 },
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Known(r) => r.fmt(f),
            Exit::Unknown { .. } => write!(f, "unknown (its shim was gone)"),
        }
    }
}

/// One running (or exited, not yet stopped) executable.
#[derive(Debug)]
pub struct Executable {
    pub record: ExecRecord,
    pub dir: PathBuf,
    pub name: String,
    /// Host pid.
    pub pid: i32,
    /// The cgroup2 directory of the executable's cell (pure v2, or the
    /// hybrid mirror), whose subtree holds every process it can start:
    /// Stop looks for live members of its process group there instead of
    /// reading every process's stat in /proc. None: the host, or no
    /// cgroup2 tree.
    scope: Option<PathBuf>,
    exit: watch::Receiver<Option<Exit>>,
}

impl Executable {
    /// Watches a started (or re-adopted) executable until it exits.
    pub fn watch(
        record: ExecRecord,
        dir: PathBuf,
        context: String,
        scope: Option<PathBuf>,
    ) -> Arc<Self> {
        let (tx, rx) = watch::channel(None);
        let (pid, shim, name) = (record.pid, record.shim, record.name.clone());
        let exit_file = dir.join(format::EXIT);
        tokio::spawn(async move {
            let exit = watch_exit(pid, shim, &exit_file).await;
            match exit {
                Exit::Known(r) => tracing::info!(
                    "executable {name:?} ({context}, pid {}) exited: {r}",
                    pid.pid
                ),
                Exit::Unknown { .. } => tracing::warn!(
                    "executable {name:?} ({context}, pid {}) ended while its shim (pid {}) was gone: exit status unknown",
                    pid.pid,
                    shim.pid
                ),
            }
            let _ = tx.send(Some(exit));
        });
        Arc::new(Self {
            name: record.name.clone(),
            pid: record.pid.pid,
            record,
            dir,
            scope,
            exit: rx,
        })
    }

    pub fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    pub fn status(&self) -> ExecutableStatus {
        let r = &self.record;
        let mut s = ExecutableStatus {
            name: r.name.clone(),
            command: r.command.clone(),
            pid: r.pid.pid,
            state: "running".into(),
            exit_code: None,
            signal: None,
            started_at: r.started_at,
            exited_at: None,
            uid: r.uid,
            gid: r.gid,
            description: r.description.clone(),
        };
        match self.exit() {
            None => {}
            Some(Exit::Known(e)) => {
                s.state = "exited".into();
                s.exit_code = e.code;
                s.signal = e.signal;
                s.exited_at = Some(e.at);
            }
            Some(Exit::Unknown { at }) => {
                s.state = "unknown".into();
                s.exited_at = Some(at);
            }
        }
        s
    }

    async fn wait_exit(&self, timeout: Duration) -> bool {
        let mut rx = self.exit.clone();
        tokio::time::timeout(timeout, rx.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Whether a signal to the executable's process group can only reach
    /// its own processes: the leader is alive, or it is a zombie its shim
    /// keeps unreaped (so the group id cannot have been reused).
    fn group_is_ours(&self) -> bool {
        self.record.pid.is_running() || (self.record.pid.exists() && self.record.shim.is_running())
    }

    /// SIGTERM to the whole process group, `grace` to go, then SIGKILL.
    /// Returns once the executable has exited, its group is gone and its
    /// shim has written the last output and exited.
    pub async fn stop(&self, grace: Duration) -> Result<Exit, CellsError> {
        let pgid = self.pid;
        let scope = self.scope.as_deref();
        let group_alive = |pgid| group_alive(pgid, scope);
        if self.group_is_ours() && (self.exit().is_none() || group_alive(pgid)) {
            signal_group(pgid, libc::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline && (self.exit().is_none() || group_alive(pgid)) {
                let left = deadline.saturating_duration_since(Instant::now());
                if self.exit().is_none() {
                    self.wait_exit(left.min(Duration::from_millis(50))).await;
                } else {
                    tokio::time::sleep(left.min(Duration::from_millis(10))).await;
                }
            }
            if self.group_is_ours() && (self.exit().is_none() || group_alive(pgid)) {
                tracing::info!(
                    "executable {:?} (pid {pgid}) still running after {}s: SIGKILL",
                    self.name,
                    grace.as_secs_f32()
                );
                signal_group(pgid, libc::SIGKILL);
            }
            if !self.wait_exit(KILL_WAIT).await {
                return Err(CellsError::Internal(format!(
                    "executable {:?} (pid {pgid}) did not exit {}s after SIGKILL",
                    self.name,
                    KILL_WAIT.as_secs()
                )));
            }
        } else if self.exit().is_none() {
            // Neither running nor anchored: the watcher is about to say so.
            self.wait_exit(EXIT_RECORD_WAIT).await;
        }
        release_shim(self.record.shim).await;
        self.exit().ok_or_else(|| {
            CellsError::Internal(format!("executable {:?} exit not recorded", self.name))
        })
    }
}

/// Tells a shim to write its last output, reap its executable and exit
/// (SIGUSR1), and waits for it, bounded; SIGKILL if it does not go.
pub async fn release_shim(shim: ProcId) {
    let Some(fd) = shim.open() else { return };
    if proc::pidfd_send_signal(&fd, libc::SIGUSR1).is_err() {
        return;
    }
    let fd2 = fd.try_clone().ok();
    if tokio::time::timeout(SHIM_WAIT, proc::exited(fd))
        .await
        .is_err()
    {
        tracing::warn!(
            "shim (pid {}) did not exit after release: SIGKILL",
            shim.pid
        );
        if let Some(fd) = fd2 {
            let _ = proc::pidfd_send_signal(&fd, libc::SIGKILL);
        }
    }
}

/// Waits for the exit of `pid`, then for its shim's record of it.
async fn watch_exit(pid: ProcId, shim: ProcId, exit_file: &std::path::Path) -> Exit {
    if let Some(fd) = pid.open() {
        if let Err(e) = proc::exited(fd).await {
            tracing::warn!("cannot watch pid {}: {e}; polling", pid.pid);
            while pid.is_running() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // The shim writes exit.json right after the kernel tells it.
    let deadline = Instant::now() + EXIT_RECORD_WAIT;
    let mut pause = Duration::from_micros(200);
    loop {
        match format::read_json::<ExitRecord>(exit_file) {
            Ok(Some(r)) => return Exit::Known(r),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("unreadable {}: {e}", exit_file.display());
                return Exit::Unknown {
                    at: crate::logging::now_nanos(),
                };
            }
        }
        if !shim.is_running() || Instant::now() > deadline {
            // One last look: it may have been written just before the shim
            // exited.
            if let Ok(Some(r)) = format::read_json::<ExitRecord>(exit_file) {
                return Exit::Known(r);
            }
            return Exit::Unknown {
                at: crate::logging::now_nanos(),
            };
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

fn signal_group(pgid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; a negative pid
    // addresses the process group the executable leads.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Whether any live process of the group is left. The leader stays a
/// zombie until its shim reaps it, which kill(2) still counts as a member,
/// so a positive answer is checked process by process: those of the cell's
/// cgroup subtree (`scope`; its processes cannot leave it: each executable
/// has a cgroup namespace rooted in the cell), else all of /proc (hundreds
/// of stat reads on a busy host).
fn group_alive(pgid: i32, scope: Option<&std::path::Path>) -> bool {
    // SAFETY: signal 0 only checks for existence.
    if unsafe { libc::kill(-pgid, 0) } != 0 {
        return false;
    }
    let live = |pid: i32| proc::stat(pid).is_some_and(|s| s.state != 'Z' && s.pgrp == pgid);
    if let Some(pids) = scope.and_then(cgroup_pids) {
        return pids.into_iter().any(live);
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    dir.flatten().any(|e| {
        e.file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
            .is_some_and(live)
    })
}

/// The pids in a cgroup2 directory and every cgroup below it; None if the
/// tree cannot be read (then the caller looks in /proc).
fn cgroup_pids(dir: &std::path::Path) -> Option<Vec<i32>> {
    let mut pids = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).ok()?;
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            }
        }
    }
    Some(pids)
}

/// The executables of one cell (or of the host context), by name.
#[derive(Debug, Default)]
pub struct ExecTable {
    inner: Mutex<ExecTableInner>,
}

#[derive(Debug, Default)]
struct ExecTableInner {
    /// None: the name is reserved by a Start in progress.
    by_name: HashMap<String, Option<Arc<Executable>>>,
    closed: bool,
}

impl ExecTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, ExecTableInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves a name for a Start in progress.
    pub fn reserve(&self, name: &str, context: &str) -> Result<(), CellsError> {
        let mut t = self.lock();
        if t.closed {
            return Err(CellsError::Precondition(format!(
                "{context} is being freed"
            )));
        }
        if t.by_name.contains_key(name) {
            return Err(CellsError::AlreadyExists(format!(
                "executable {name:?} already exists in {context}"
            )));
        }
        t.by_name.insert(name.to_owned(), None);
        Ok(())
    }

    pub fn unreserve(&self, name: &str) {
        self.lock().by_name.remove(name);
    }

    /// Fills a reservation; false if the table was closed meanwhile.
    pub fn fill(&self, exe: Arc<Executable>) -> bool {
        let mut t = self.lock();
        let open = !t.closed;
        t.by_name.insert(exe.name.clone(), Some(exe));
        open
    }

    pub fn get(&self, name: &str) -> Option<Arc<Executable>> {
        self.lock().by_name.get(name).cloned().flatten()
    }

    pub fn remove(&self, name: &str) {
        self.lock().by_name.remove(name);
    }

    /// Every executable, sorted by name.
    pub fn all(&self) -> Vec<Arc<Executable>> {
        let mut v: Vec<_> = self.lock().by_name.values().flatten().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Refuses new Starts and returns every executable.
    pub fn close(&self) -> Vec<Arc<Executable>> {
        let mut t = self.lock();
        t.closed = true;
        t.by_name.values().flatten().cloned().collect()
    }

    /// Whether Free closed the table.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    pub fn reopen(&self) {
        self.lock().closed = false;
    }
}
