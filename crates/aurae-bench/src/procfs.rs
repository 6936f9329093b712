//! Reading /proc: memory of processes, the daemon's children, and waiting
//! for a process's exit through a pidfd.

use std::{io, os::fd::FromRawFd, os::fd::OwnedFd};

use tokio::io::{unix::AsyncFd, Interest};

/// Kilobytes of a `Key:   123 kB` line.
fn field_kb(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// VmRSS in KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    field_kb(&text, "VmRSS:")
}

/// Pss in KiB from smaps_rollup (shared pages divided among sharers).
pub fn pss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    field_kb(&text, "Pss:")
}

/// The fields of /proc/PID/stat after the command (so field 3, the state,
/// is the first): the command may contain spaces and parens, the fields
/// follow the last ')'.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The parent of `pid` (field 4 of /proc/PID/stat).
pub fn ppid(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// The start time of `pid` in clock ticks since boot (field 22), if it has
/// not exited (a zombie has exited).
pub fn live_start_time(pid: i32) -> Option<u64> {
    let f = stat_fields(pid)?;
    if matches!(f.first().map(String::as_str), Some("Z" | "X")) {
        return None;
    }
    f.get(19)?.parse().ok()
}

/// /proc/PID/comm, without its newline.
pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

/// (pid, ppid) of every process.
fn all_parents() -> Vec<(i32, i32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, ppid(pid)?)))
        .collect()
}

/// Every descendant of `root` (not `root` itself).
pub fn descendants(root: i32) -> Vec<i32> {
    let all = all_parents();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in &all {
            if ppid == p {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Waits until `pid` has exited (a zombie counts: it has exited, only its
/// parent has not collected the status yet). A pid that is already gone
/// counts as exited.
pub async fn wait_pid_exit(pid: i32) -> io::Result<()> {
    // SAFETY: pidfd_open takes plain integers and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(())
        } else {
            Err(e)
        };
    }
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: fd was just returned by pidfd_open and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // A pidfd becomes readable when the process exits.
    // SAFETY: the OwnedFd stays open, and as_raw_fd() returns the same fd,
    // for as long as the AsyncFd owns it.
    let afd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let _ready = afd.readable().await?;
    Ok(())
}

/// Total memory in MiB.
pub fn mem_total_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| field_kb(&t, "MemTotal:"))
        .map_or(0, |kb| kb / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kb_fields() {
        let t = "Name:\tx\nVmRSS:\t    1234 kB\nPss:  99 kB\n";
        assert_eq!(field_kb(t, "VmRSS:"), Some(1234));
        assert_eq!(field_kb(t, "Pss:"), Some(99));
        assert_eq!(field_kb(t, "Nope:"), None);
    }

    #[test]
    fn reads_our_own_stat() {
        let me = std::process::id() as i32;
        assert_eq!(ppid(me), Some(std::os::unix::process::parent_id() as i32));
        assert!(live_start_time(me).is_some_and(|t| t > 0));
        assert!(!comm(me).is_empty());
    }
}
