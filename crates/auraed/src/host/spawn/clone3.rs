//! `clone3(CLONE_INTO_CGROUP)` (Linux ≥ 5.7): a fork whose child is born
//! in a given cgroup2 directory, so it never migrates there. A migration
//! (a write to `cgroup.procs`) takes the global `cgroup_threadgroup_rwsem`
//! for writing, which waits for an RCU grace period: milliseconds of wall
//! time for microseconds of work, on v1 and v2 alike (unless the hierarchy
//! is mounted with `favordynmods`).
//!
//! Only the cgroup2 (default) hierarchy can be named this way: on pure v2
//! it is every controller; on a hybrid host it is the controller-less
//! mirror, and the v1 controllers still need their `cgroup.procs` writes.
//!
//! When the kernel cannot do it (ENOSYS: no clone3; E2BIG/EINVAL: clone3
//! without CLONE_INTO_CGROUP; EPERM: a seccomp filter), [`fork_into`] says
//! so with [`Unsupported`] and the caller forks and writes `cgroup.procs`
//! as before. After the first such answer it is not asked again.

use std::{
    io,
    os::fd::RawFd,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

/// `CLONE_INTO_CGROUP` from linux/sched.h (the libc crate lacks it).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Set once the kernel refused CLONE_INTO_CGROUP as unknown or forbidden.
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
/// Processes this process started with CLONE_INTO_CGROUP.
static INTO: AtomicU64 = AtomicU64::new(0);

/// Which side of the fork we are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    Child,
    Parent(libc::pid_t),
}

/// The kernel cannot clone into a cgroup: fork and migrate instead.
#[derive(Debug)]
pub struct Unsupported(pub io::Error);

/// Whether an error of clone3 means "not available here" (rather than a
/// failure that a fork would meet too, such as EAGAIN at pids.max).
fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL | libc::EPERM | libc::EOPNOTSUPP)
    )
}

/// Environment variable that turns the clone3 path off (`0`), for
/// measuring the start path with and without it in one build; inherited
/// by shims.
pub const DISABLE_ENV: &str = "AURAE_CLONE_INTO_CGROUP";

/// Whether an earlier call found clone3 into a cgroup unavailable, or
/// [`DISABLE_ENV`] is `0`.
pub fn known_unsupported() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os(DISABLE_ENV).is_some_and(|v| v == "0"))
        || UNSUPPORTED.load(Ordering::Relaxed)
}

/// How many processes this process started with CLONE_INTO_CGROUP.
pub fn count() -> u64 {
    INTO.load(Ordering::Relaxed)
}

/// Forks into the cgroup2 directory `cgroup` (an fd opened with
/// O_DIRECTORY or O_PATH). `Ok(Ok(Child))` in the child, `Ok(Ok(Parent))`
/// in the parent; `Ok(Err(Unsupported))` when the kernel cannot (nothing
/// was forked: fork and join the cgroup the old way); `Err` when the fork
/// failed as a fork would have.
///
/// # Safety
/// As for `fork(2)`: in a multi-threaded process the child may only make
/// async-signal-safe calls (no allocation, no locks) until it execs or
/// exits. The child returns from this function on the parent's stack
/// (no new stack is given), exactly as after `fork()`.
pub unsafe fn fork_into(cgroup: RawFd) -> io::Result<Result<Forked, Unsupported>> {
    if known_unsupported() {
        return Ok(Err(Unsupported(io::Error::from_raw_os_error(libc::ENOSYS))));
    }
    let Ok(fd) = u64::try_from(cgroup) else {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    };
    // SAFETY: an all-zero clone_args is valid (no flags, no pointers).
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = CLONE_INTO_CGROUP;
    args.exit_signal = libc::SIGCHLD as u64;
    args.cgroup = fd;
    // SAFETY: args is a valid clone_args of the size given; with no stack
    // and no CLONE_VM the child gets a copy of our memory and resumes
    // here, like fork(2) (the caller's contract covers what it may do).
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    match r {
        0 => Ok(Ok(Forked::Child)),
        pid if pid > 0 => {
            INTO.fetch_add(1, Ordering::Relaxed);
            Ok(Ok(Forked::Parent(pid as libc::pid_t)))
        }
        _ => {
            let e = io::Error::last_os_error();
            if is_unsupported(&e) {
                UNSUPPORTED.store(true, Ordering::Relaxed);
                Ok(Err(Unsupported(e)))
            } else {
                Err(e)
            }
        }
    }
}

/// Opens a cgroup directory for [`fork_into`] (close-on-exec).
pub fn open_dir(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .map(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where this host has a cgroup2 hierarchy we may create in (root),
    /// a child forked into a fresh cgroup there is in it from its birth.
    #[test]
    fn forks_into_a_cgroup2_directory() {
        // Pure v2, or the mirror of a hybrid host.
        let base = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.join("cgroup.controllers").is_file());
        let Some(base) = base else {
            eprintln!("skipped: no cgroup2 mount");
            return;
        };
        let dir = base.join(format!("aurae-clone3-test-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir(&dir) {
            eprintln!("skipped: cannot make {}: {e}", dir.display());
            return;
        }
        let fd = open_dir(&dir).unwrap();
        // SAFETY: the child only calls _exit.
        let r = unsafe { fork_into(std::os::fd::AsRawFd::as_raw_fd(&fd)) };
        match r {
            Ok(Ok(Forked::Child)) => {
                // SAFETY: pause until killed; only async-signal-safe calls.
                unsafe {
                    libc::pause();
                    libc::_exit(0)
                }
            }
            Ok(Ok(Forked::Parent(pid))) => {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
                // SAFETY: kill/waitpid of our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
                let _ = std::fs::remove_dir(&dir);
                assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
                assert!(count() >= 1);
            }
            Ok(Err(Unsupported(e))) => {
                let _ = std::fs::remove_dir(&dir);
                eprintln!("skipped: clone3 into a cgroup unsupported here: {e}");
            }
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                panic!("clone3: {e}");
            }
        }
    }
}
