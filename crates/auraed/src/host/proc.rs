//! Processes identified by more than their pid.
//!
//! A pid is reused once its process is reaped, so a pid recorded on disk
//! (and read back by the next run of the daemon) names the same process
//! only if its start time (`/proc/PID/stat` field 22, clock ticks since
//! boot) is the same too. Signals go through a pidfd opened after that
//! check, so they cannot reach a process that got the pid meanwhile.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use serde::{Deserialize, Serialize};

/// A process: pid plus start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    pub pid: i32,
    /// Clock ticks since boot when the process started.
    pub start: u64,
}

/// What /proc says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub start: u64,
}

/// Parses `/proc/PID/stat`; None if there is no such process.
pub fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Stat> {
    // The command name may hold spaces and parentheses: parse after the
    // last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    // Field 22 overall is the 20th after the command name; we consumed 3.
    let start = f.nth(16)?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        pgrp,
        start,
    })
}

impl ProcId {
    /// The process that has `pid` now.
    pub fn of(pid: i32) -> Option<Self> {
        stat(pid).map(|s| Self {
            pid,
            start: s.start,
        })
    }

    /// Whether this very process still exists (a zombie counts).
    pub fn exists(&self) -> bool {
        stat(self.pid).is_some_and(|s| s.start == self.start)
    }

    /// Whether this very process exists and has not exited (not a zombie).
    pub fn is_running(&self) -> bool {
        stat(self.pid).is_some_and(|s| s.start == self.start && s.state != 'Z' && s.state != 'X')
    }

    /// A pidfd for this very process, or None if it is gone (or the pid
    /// now belongs to another process).
    pub fn open(&self) -> Option<OwnedFd> {
        let fd = pidfd_open(self.pid).ok()?;
        // Checked after opening: if the start time still matches, the fd
        // refers to our process (a pidfd pins the process it was opened for).
        self.exists().then_some(fd)
    }

    /// Sends `sig` to this very process; false if it is gone.
    pub fn signal(&self, sig: libc::c_int) -> bool {
        self.open()
            .is_some_and(|fd| pidfd_send_signal(&fd, sig).is_ok())
    }
}

pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: fd was just returned by pidfd_open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn pidfd_send_signal(fd: &OwnedFd, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Waits until the process behind `fd` has exited (a pidfd becomes readable
/// then; the process need not be our child).
pub async fn exited(fd: OwnedFd) -> io::Result<()> {
    // SAFETY: the AsyncFd owns the fd, which stays open (and is not reused
    // for another file) until the AsyncFd is dropped.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| io::Error::other(e.to_string()))?;
    let _ = fd.readable().await?;
    Ok(())
}

/// Whether the process behind `fd` has exited, without waiting.
pub fn has_exited(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_stat_and_identity() {
        let me = i32::try_from(std::process::id()).unwrap();
        let s = stat(me).unwrap();
        assert!(matches!(s.state, 'R' | 'S'));
        let id = ProcId::of(me).unwrap();
        assert!(id.exists() && id.is_running());
        let other = ProcId {
            start: id.start + 1,
            ..id
        };
        assert!(!other.exists());
        assert!(other.open().is_none());
    }

    #[test]
    fn parses_names_with_parentheses() {
        let s = parse_stat("42 (a) b) S 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 12345 0 0")
            .unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!((s.ppid, s.pgrp, s.start), (1, 42, 12345));
    }
}
