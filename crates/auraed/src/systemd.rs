//! Running under systemd: the readiness protocol (`Type=notify`, see
//! sd_notify(3)) and whether stderr is the journal (for syslog priority
//! prefixes, see `logging`). Both are no-ops elsewhere: without
//! `NOTIFY_SOCKET` nothing is sent, without `JOURNAL_STREAM` lines stay
//! plain.

use std::os::fd::AsRawFd;

use sd_notify::NotifyState;

/// Where systemd (or any service manager speaking the protocol) listens for
/// our state changes. Workloads must not inherit it: they would speak for
/// the daemon (systemd drops their messages with `NotifyAccess=main`, and
/// logs a warning for each), so every child auraed spawns has it removed.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Tells the service manager that the daemon serves: sent once the listener
/// is bound, re-adoption is done and the gRPC server runs, so a unit
/// ordered `After=auraed.service` finds a socket that answers.
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells the service manager that shutdown began (it then shows
/// "deactivating" instead of guessing from the exit).
pub fn notify_stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

fn notify(states: &[NotifyState<'_>]) {
    // sd_notify::notify is a no-op (Ok) when NOTIFY_SOCKET is unset.
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager ({NOTIFY_SOCKET_ENV}): {e}");
    }
}

/// Whether our stderr is connected to the journal: systemd sets
/// `JOURNAL_STREAM=DEV:INODE` for the stream it connects to stdout/stderr;
/// it is inherited by children whose stderr may go elsewhere, so the
/// device and inode are compared with fd 2's (systemd.exec(5) advises it).
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr().as_raw_fd())
        .is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}
