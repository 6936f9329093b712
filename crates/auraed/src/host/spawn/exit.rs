//! Watching a child's exit without reaping it.
//!
//! An executable that exited stays a zombie until it is stopped: a zombie
//! keeps its pid (and so its process group id) reserved, so the SIGTERM that
//! Stop sends to the group can never reach an unrelated process that got a
//! reused pid. The exit is observed through a pidfd (readable once the
//! process has exited) and `waitid(P_PIDFD, WEXITED | WNOWAIT)`.

use std::{
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::ExitStatusExt,
    },
    process::ExitStatus,
};

use tokio::io::unix::AsyncFd;

/// `P_PIDFD` for waitid(2) (Linux 5.4); not in every libc version.
const P_PIDFD: libc::idtype_t = 3;

/// Waits until `pid` (our child) exits and returns its status, leaving it a
/// zombie for its owner to reap.
pub async fn exited(pid: i32) -> io::Result<ExitStatus> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: fd was just returned by pidfd_open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the AsyncFd owns the fd, which stays open (and is not reused
    // for another file) until the AsyncFd is dropped.
    let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))?;
    loop {
        let mut guard = fd.readable().await?;
        if let Some(status) = peek(fd.get_ref())? {
            return Ok(status);
        }
        guard.clear_ready();
    }
}

/// The exit status if the process has exited, without reaping it.
fn peek(pidfd: &OwnedFd) -> io::Result<Option<ExitStatus>> {
    // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pidfd and out-pointer; WNOHANG makes it non-blocking.
    let r = unsafe {
        libc::waitid(
            P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info`; si_pid is 0 when nothing has exited.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    // Rebuild the raw wait status that ExitStatus understands.
    let raw = match info.si_code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => (status & 0x7f) | 0x80,
        _ => status & 0x7f,
    };
    Ok(Some(ExitStatus::from_raw(raw)))
}
