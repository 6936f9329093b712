//! Resource usage of one cell, read from its cgroup files (v1 or v2).
//!
//! Every field is optional: a file the host does not have (no `blkio`
//! hierarchy, no `io` controller, an old kernel without `oom_kill` in
//! `memory.oom_control`) leaves its fields `None`, never a made-up zero.
//! Limits that are "max" (unlimited) are `None` too. Every value is
//! hierarchical (the cell and the cells below it), except the v1 CFS
//! throttling counters and v1 `oom_kill`, which the kernel keeps per cgroup.

use std::{fs, io, path::Path};

use super::{io_err, CgroupError};

/// What `stats` reports about one cell. Units: nanoseconds and bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CellStats {
    /// CPU time used (v2 `cpu.stat` usage_usec; v1 `cpuacct.usage`).
    pub cpu_usage_ns: Option<u64>,
    /// Of which in user mode (v2 user_usec; v1 `cpuacct.stat` user, in ticks).
    pub cpu_user_ns: Option<u64>,
    /// Of which in kernel mode (v2 system_usec; v1 `cpuacct.stat` system).
    pub cpu_system_ns: Option<u64>,
    /// CFS enforcement periods that elapsed (`cpu.stat` nr_periods).
    pub cpu_periods: Option<u64>,
    /// Periods in which the cell was throttled (nr_throttled).
    pub cpu_throttled_periods: Option<u64>,
    /// Time the cell was throttled (v2 throttled_usec; v1 throttled_time).
    pub cpu_throttled_ns: Option<u64>,
    /// v2 `memory.current`; v1 `memory.usage_in_bytes`.
    pub memory_usage_bytes: Option<u64>,
    /// usage − inactive_file (as cAdvisor computes it, floored at 0).
    pub memory_working_set_bytes: Option<u64>,
    /// Anonymous memory (v2 `memory.stat` anon; v1 total_rss).
    pub memory_rss_bytes: Option<u64>,
    /// Page cache (v2 file; v1 total_cache).
    pub memory_cache_bytes: Option<u64>,
    /// v2 `memory.max`; v1 `memory.limit_in_bytes`; None when unlimited.
    pub memory_limit_bytes: Option<u64>,
    /// Processes the OOM killer killed (v2 `memory.events` oom_kill;
    /// v1 `memory.oom_control` oom_kill).
    pub oom_kills: Option<u64>,
    /// `pids.current`.
    pub pids_current: Option<u64>,
    /// `pids.max`; None when unlimited.
    pub pids_limit: Option<u64>,
    /// Bytes read from / written to block devices (v2 `io.stat`; v1
    /// `blkio.throttle.io_service_bytes_recursive`), summed over devices.
    pub io_read_bytes: Option<u64>,
    pub io_write_bytes: Option<u64>,
    /// Read / write operations (v2 rios/wios; v1 `blkio.throttle.io_serviced_recursive`).
    pub io_read_ops: Option<u64>,
    pub io_write_ops: Option<u64>,
}

/// Above this a v1 memory limit means "unlimited" (the kernel prints
/// PAGE_COUNTER_MAX in bytes, 0x7FFFFFFFFFFFF000 on 4 KiB pages).
const V1_UNLIMITED: u64 = 1 << 62;

/// A control file's text; None when the file does not exist (the host has
/// no such file), an error for any other failure.
pub(super) fn read_opt(path: &Path) -> Result<Option<String>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        // A controller file that exists but cannot be read for this cgroup
        // (EOPNOTSUPP, ENODEV on some kernels) is data the host lacks.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENODEV)) => Ok(None),
        Err(e) => Err(io_err("read", path, e)),
    }
}

/// A file holding one number, or `max` (None).
pub(super) fn read_u64(path: &Path) -> Result<Option<u64>, CgroupError> {
    Ok(read_opt(path)?.and_then(|s| s.trim().parse().ok()))
}

/// The value of `key` in a flat-keyed file (`key value` per line: cpu.stat,
/// memory.stat, memory.events, memory.oom_control, cpuacct.stat).
pub(super) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key))
            .then(|| it.next()?.parse().ok())
            .flatten()
    })
}

/// Sums of (read, write) in a v1 blkio file: `MAJ:MIN Read N` lines.
pub(super) fn blkio_sums(text: &str) -> (u64, u64) {
    let (mut r, mut w) = (0u64, 0u64);
    for l in text.lines() {
        let mut it = l.split_whitespace();
        let (Some(dev), Some(op), Some(n)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if !dev.contains(':') {
            continue;
        }
        let n: u64 = n.parse().unwrap_or(0);
        match op {
            "Read" => r = r.saturating_add(n),
            "Write" => w = w.saturating_add(n),
            _ => {}
        }
    }
    (r, w)
}

/// Sums of (rbytes, wbytes, rios, wios) over the devices of a v2 `io.stat`.
pub(super) fn io_stat_sums(text: &str) -> [u64; 4] {
    let mut sums = [0u64; 4];
    for l in text.lines() {
        for kv in l.split_whitespace().skip(1) {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let i = match k {
                "rbytes" => 0,
                "wbytes" => 1,
                "rios" => 2,
                "wios" => 3,
                _ => continue,
            };
            sums[i] = sums[i].saturating_add(v.parse().unwrap_or(0));
        }
    }
    sums
}

/// Working set as cAdvisor defines it: usage minus inactive file pages.
pub(super) fn working_set(usage: Option<u64>, inactive_file: Option<u64>) -> Option<u64> {
    Some(usage?.saturating_sub(inactive_file.unwrap_or(0)))
}

/// A v1 limit, None when it means unlimited.
pub(super) fn v1_limit(v: Option<u64>) -> Option<u64> {
    v.filter(|&v| v < V1_UNLIMITED)
}

/// Fails with NotFound-flavoured Io when the cell's directory is gone, so
/// that a stats call on a cell freed meanwhile says so.
pub(super) fn require_dir(dir: &Path) -> Result<(), CgroupError> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(io_err(
            "read stats of",
            dir,
            io::Error::from(io::ErrorKind::NotFound),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        let cpu = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 7\n";
        assert_eq!(keyed(cpu, "usage_usec"), Some(1500));
        assert_eq!(keyed(cpu, "nr_periods"), Some(7));
        assert_eq!(keyed(cpu, "nr_throttled"), None);
        assert_eq!(keyed(cpu, "usage"), None, "whole keys only");
        let blk = "8:0 Read 4096\n8:0 Write 8192\n8:0 Total 12288\n8:16 Read 1\nTotal 12289\n";
        assert_eq!(blkio_sums(blk), (4097, 8192));
        assert_eq!(blkio_sums("Total 0\n"), (0, 0));
        let io = "8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n\
                  253:0 rbytes=5 wbytes=0 rios=3 wios=0 dbytes=0 dios=0\n";
        assert_eq!(io_stat_sums(io), [15, 20, 4, 2]);
        assert_eq!(working_set(Some(100), Some(30)), Some(70));
        assert_eq!(working_set(Some(10), Some(30)), Some(0));
        assert_eq!(working_set(None, Some(30)), None);
        assert_eq!(v1_limit(Some(0x7FFF_FFFF_FFFF_F000)), None);
        assert_eq!(v1_limit(Some(64 << 20)), Some(64 << 20));
    }
}
