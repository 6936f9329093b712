//! Executables: started, watched until exit, stopped gracefully.

use std::{
    collections::HashMap,
    process::ExitStatus,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tokio::{process::Child, sync::watch, task::JoinHandle};

use super::{
    output::{OutputStream, Outputs, ProcessOutput},
    CellsError,
};

/// After SIGKILL, how long to wait for the exit before reporting an error.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long a stopped executable's output may take to drain (a grandchild
/// that escaped the process group can hold the pipe open forever).
const DRAIN_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
pub struct ExitInfo {
    pub status: ExitStatus,
    pub at: SystemTime,
}

/// One running (or exited, not yet stopped) executable.
#[derive(Debug)]
pub struct Executable {
    pub name: String,
    pub pid: i32,
    exit: watch::Receiver<Option<ExitInfo>>,
    drains: Mutex<Vec<JoinHandle<()>>>,
    /// Reaped only when stopped (see `host::spawn::exit`).
    child: tokio::sync::Mutex<Option<Child>>,
}

impl Executable {
    /// Takes over a freshly spawned child: drains its pipes into a new
    /// output entry and watches for its exit.
    pub fn watch(
        name: String,
        mut child: Child,
        outputs: &Arc<Outputs>,
        context: String,
    ) -> Result<Arc<Self>, CellsError> {
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| CellsError::Internal("a started executable has no pid".into()))?;
        let out = Arc::new(ProcessOutput {
            stdout: OutputStream::new(),
            stderr: OutputStream::new(),
        });
        let mut drains = Vec::with_capacity(2);
        if let Some(pipe) = child.stdout.take() {
            drains.push(tokio::spawn(out.stdout.clone().drain(pipe)));
        }
        if let Some(pipe) = child.stderr.take() {
            drains.push(tokio::spawn(out.stderr.clone().drain(pipe)));
        }
        outputs.insert(pid, out);
        let (tx, rx) = watch::channel(None);
        let exe = name.clone();
        tokio::spawn(async move {
            match crate::host::spawn::exit::exited(pid).await {
                Ok(status) => {
                    tracing::info!("executable {exe:?} ({context}, pid {pid}) exited: {status}");
                    let _ = tx.send(Some(ExitInfo {
                        status,
                        at: SystemTime::now(),
                    }));
                }
                Err(e) => tracing::error!("cannot wait for executable {exe:?} (pid {pid}): {e}"),
            }
        });
        Ok(Arc::new(Self {
            name,
            pid,
            exit: rx,
            drains: Mutex::new(drains),
            child: tokio::sync::Mutex::new(Some(child)),
        }))
    }

    pub fn exit_info(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    async fn wait_exit(&self, timeout: Duration) -> bool {
        let mut rx = self.exit.clone();
        let done = tokio::time::timeout(timeout, rx.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok());
        done
    }

    /// SIGTERM to the whole process group, `grace` to go, then SIGKILL.
    /// Returns once the process has exited and been reaped, and its output
    /// has been drained.
    pub async fn stop(&self, grace: Duration) -> Result<ExitInfo, CellsError> {
        if self.exit_info().is_none() || group_alive(self.pid) {
            signal_group(self.pid, libc::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline && (self.exit_info().is_none() || group_alive(self.pid))
            {
                let left = deadline.saturating_duration_since(Instant::now());
                if self.exit_info().is_none() {
                    self.wait_exit(left.min(Duration::from_millis(50))).await;
                } else {
                    tokio::time::sleep(left.min(Duration::from_millis(10))).await;
                }
            }
            if self.exit_info().is_none() || group_alive(self.pid) {
                tracing::info!(
                    "executable {:?} (pid {}) still running after {}s: SIGKILL",
                    self.name,
                    self.pid,
                    grace.as_secs_f32()
                );
                signal_group(self.pid, libc::SIGKILL);
            }
            if !self.wait_exit(KILL_WAIT).await {
                return Err(CellsError::Internal(format!(
                    "executable {:?} (pid {}) did not exit {}s after SIGKILL",
                    self.name,
                    self.pid,
                    KILL_WAIT.as_secs()
                )));
            }
        }
        // Now that the group is gone, the pid may be released.
        if let Some(mut child) = self.child.lock().await.take() {
            if tokio::time::timeout(KILL_WAIT, child.wait()).await.is_err() {
                tracing::warn!("cannot reap executable {:?} (pid {})", self.name, self.pid);
            }
        }
        let drains = std::mem::take(&mut *self.drains.lock().unwrap_or_else(|p| p.into_inner()));
        for d in drains {
            if tokio::time::timeout(DRAIN_WAIT, d).await.is_err() {
                tracing::warn!(
                    "output of {:?} (pid {}) still open after exit; not waiting for it",
                    self.name,
                    self.pid
                );
            }
        }
        self.exit_info().ok_or_else(|| {
            CellsError::Internal(format!("executable {:?} exit not recorded", self.name))
        })
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
/// zombie until it is reaped (see `host::spawn::exit`), which kill(2) still
/// counts as a member, so a positive answer is checked against /proc.
fn group_alive(pgid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    if unsafe { libc::kill(-pgid, 0) } != 0 {
        return false;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    dir.flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            return false;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // Fields after the command name: state, ppid, pgrp, ...
        let mut f = stat.rsplit(')').next().unwrap_or("").split_whitespace();
        let state = f.next().unwrap_or("Z");
        let pgrp = f.nth(1).and_then(|p| p.parse::<i32>().ok());
        state != "Z" && pgrp == Some(pgid)
    })
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

    /// Refuses new Starts and returns every executable.
    pub fn close(&self) -> Vec<Arc<Executable>> {
        let mut t = self.lock();
        t.closed = true;
        t.by_name.values().flatten().cloned().collect()
    }

    pub fn reopen(&self) {
        self.lock().closed = false;
    }
}
