//! The daemon's open-file limit. Every isolated cell holds a few
//! namespace fds and a pidfd, and every open stream a file or two, so a
//! node with a thousand cells needs more than the usual soft limit of
//! 1,024: the daemon raises its soft limit to the hard one at start (as
//! containerd's unit asks systemd to). Workloads must not inherit the
//! raised limit (programs that close every possible fd get slow), so the
//! shim is started with the limit the daemon was given.

use std::sync::OnceLock;

static ORIGINAL: OnceLock<libc::rlimit> = OnceLock::new();

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (old, new).
pub fn raise_nofile() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    let _ = ORIGINAL.set(lim);
    let raised = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: a valid in-pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return None;
    }
    Some((lim.rlim_cur, lim.rlim_max))
}

/// Puts back the limit the daemon started with. Async-signal-safe: called
/// in forked children before exec.
pub fn restore_nofile() {
    if let Some(lim) = ORIGINAL.get() {
        // SAFETY: a valid in-pointer; setrlimit is async-signal-safe.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, lim) };
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn raise_then_restore() {
        let Some((old, new)) = super::raise_nofile() else {
            return;
        };
        assert!(new >= old);
        super::restore_nofile();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid out-pointer.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        assert_eq!(lim.rlim_cur, old);
    }
}
