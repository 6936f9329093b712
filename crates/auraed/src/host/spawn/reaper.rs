//! Orphan reaping for when auraed is PID 1.
//!
//! Every process whose parent dies is re-parented to PID 1, which must reap
//! it or it stays a zombie forever. But our own children are waited on by
//! tokio (through a pidfd), and a `waitpid(-1)` here would steal their exit
//! status: tokio would then see ECHILD and the executable's exit would be
//! lost. So wait has one owner per child: every child we spawn is recorded
//! in [`OWNED`] (pid + start time, so a reused pid is not mistaken for it),
//! under the same lock the reaper holds while it looks for zombies; the
//! reaper only reaps zombie children that are not recorded.
//!
//! The registry is process-wide on purpose: wait status is process-wide
//! kernel state, and every spawn point of this process must take part.

use std::{
    collections::BTreeMap,
    io,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use nix::{
    sys::wait::{waitpid, WaitPidFlag},
    unistd::Pid,
};
use tokio::process::{Child, Command};

/// pid → start time (clock ticks since boot, /proc/PID/stat field 22).
static OWNED: Mutex<BTreeMap<i32, u64>> = Mutex::new(BTreeMap::new());

/// Set once the reaper runs (auraed as PID 1). Until then nobody reaps
/// orphans, so children need not be recorded (and the table, which only
/// the reaper prunes, must not grow).
static ACTIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How often the reaper also looks without a SIGCHLD (a signal can be
/// coalesced with one for an owned child).
const SWEEP_EVERY: Duration = Duration::from_secs(5);

fn owned() -> MutexGuard<'static, BTreeMap<i32, u64>> {
    OWNED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spawns `cmd` and records the child as owned by its tokio waiter. Every
/// child of this process must be started through here.
pub fn spawn_owned(cmd: &mut Command) -> io::Result<Child> {
    if !ACTIVE.load(std::sync::atomic::Ordering::Acquire) {
        return cmd.spawn();
    }
    let mut table = owned();
    let child = cmd.spawn()?;
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // The child exists (at worst as a zombie, which we hold the lock
        // against reaping), so its stat is readable.
        if let Some((_, _, start)) = stat(pid) {
            table.insert(pid, start);
        }
    }
    Ok(child)
}

/// The registry's lock, taken before a fork made without [`spawn_owned`]
/// (raw clone3): held until [`record_locked`] so the reaper cannot take
/// the new child for an orphan. None while the reaper is off.
pub fn lock_owned() -> Option<MutexGuard<'static, BTreeMap<i32, u64>>> {
    ACTIVE
        .load(std::sync::atomic::Ordering::Acquire)
        .then(owned)
}

/// Records `pid` (just forked, not reaped) as owned by its own waiter.
pub fn record_locked(guard: Option<MutexGuard<'static, BTreeMap<i32, u64>>>, pid: i32) {
    if let (Some(mut table), Some((_, _, start))) = (guard, stat(pid)) {
        table.insert(pid, start);
    }
}

/// (state, ppid, start time) of a process.
fn stat(pid: i32) -> Option<(char, i32, u64)> {
    crate::host::proc::stat(pid).map(|s| (s.state, s.ppid, s.start))
}

/// Reaps every zombie child that no waiter owns; forgets owned entries
/// whose process is gone. Returns how many were reaped.
pub fn reap_orphans() -> usize {
    let me = i32::try_from(std::process::id()).unwrap_or(1);
    let mut table = owned();
    table.retain(|pid, start| stat(*pid).is_some_and(|(_, _, s)| s == *start));
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut reaped = 0;
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Some((state, ppid, start)) = stat(pid) else {
            continue;
        };
        if state != 'Z' || ppid != me || table.get(&pid) == Some(&start) {
            continue;
        }
        if waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)).is_ok() {
            reaped += 1;
        }
    }
    reaped
}

/// Turns the reaper on (children spawned from now on are recorded) and
/// returns the task that reaps orphans on each SIGCHLD and every few
/// seconds, forever. The flag is set before the task is first polled, so
/// no child spawned after this call can be mistaken for an orphan.
pub fn run() -> impl std::future::Future<Output = ()> {
    ACTIVE.store(true, std::sync::atomic::Ordering::Release);
    async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigchld = match signal(SignalKind::child()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("no SIGCHLD handler ({e}); reaping orphans every {SWEEP_EVERY:?}");
                None
            }
        };
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            match sigchld.as_mut() {
                Some(s) => tokio::select! {
                    _ = s.recv() => {}
                    _ = tick.tick() => {}
                },
                None => {
                    tick.tick().await;
                }
            }
            let n = tokio::task::spawn_blocking(reap_orphans).await.unwrap_or(0);
            if n > 0 {
                tracing::debug!("reaped {n} orphan(s)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_own_stat() {
        let me = i32::try_from(std::process::id()).unwrap();
        let (state, ppid, start) = stat(me).unwrap();
        assert!(matches!(state, 'R' | 'S'));
        assert!(ppid > 0);
        assert!(start > 0);
    }
}
