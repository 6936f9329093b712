//! Helpers for the observe tests: cells, executables, output streams and
//! the daemon's /proc numbers.

#![allow(dead_code)]

use std::time::Duration;

use aurae_client::{
    proto::{
        cells::{
            Cell, CellServiceAllocateRequest, CellServiceFreeRequest, CellServiceStartRequest,
            CellServiceStopRequest, Executable,
        },
        observe::{GetSubProcessStreamRequest, LogChannelType},
    },
    Client,
};

pub const STEP: Duration = Duration::from_secs(20);

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn skip(test: &str, why: &str) {
    eprintln!("!!!!! SKIPPED {test}: {why} !!!!!");
}

pub async fn allocate(c: &Client, name: &str, isolate: bool) {
    c.cells()
        .allocate(CellServiceAllocateRequest {
            cell: Some(Cell {
                name: name.into(),
                isolate_process: isolate,
                ..Default::default()
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("allocate {name}: {e}"));
}

pub async fn free(c: &Client, name: &str) {
    c.cells()
        .free(CellServiceFreeRequest {
            cell_name: name.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("free {name}: {e}"));
}

/// Starts `sh -c command` in `cell` (None: host context); returns the pid.
pub async fn start(c: &Client, cell: Option<&str>, name: &str, command: &str) -> i32 {
    c.cells()
        .start(CellServiceStartRequest {
            cell_name: cell.map(str::to_owned),
            executable: Some(Executable {
                name: name.into(),
                command: command.into(),
                description: String::new(),
            }),
            uid: None,
            gid: None,
        })
        .await
        .unwrap_or_else(|e| panic!("start {name}: {e}"))
        .into_inner()
        .pid
}

pub async fn stop(c: &Client, cell: Option<&str>, name: &str) {
    c.cells()
        .stop(CellServiceStopRequest {
            cell_name: cell.map(str::to_owned),
            executable_name: name.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("stop {name}: {e}"));
}

pub fn output_req(pid: i32, channel: LogChannelType) -> GetSubProcessStreamRequest {
    GetSubProcessStreamRequest {
        channel_type: channel.into(),
        process_id: pid,
        max_lines_per_message: 0,
        line_blocks: false,
    }
}

/// Every line of one channel until the stream ends (bounded wait).
pub async fn read_output(c: &Client, pid: i32, channel: LogChannelType) -> Vec<String> {
    let mut s = c
        .observe()
        .get_sub_process_stream(output_req(pid, channel))
        .await
        .expect("subscribe")
        .into_inner();
    let want = if channel == LogChannelType::Stdout {
        "stdout"
    } else {
        "stderr"
    };
    let mut lines = Vec::new();
    while let Some(r) = tokio::time::timeout(STEP, s.message())
        .await
        .expect("output stream stalled")
        .expect("stream error")
    {
        let item = r.item.expect("item");
        assert_eq!(item.channel, want);
        assert!(item.timestamp > 1_600_000_000_000_000_000, "ns timestamp");
        lines.push(item.line);
    }
    lines
}

pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .count()
}

pub fn thread_count(pid: i32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("Threads: line")
}

pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|n| n.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS: line")
}

pub fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill {pid}: {}", std::io::Error::last_os_error());
}

/// The first stdout line of `pid` (waits for it).
pub async fn first_line(c: &Client, pid: i32) -> String {
    let mut s = c
        .observe()
        .get_sub_process_stream(output_req(pid, LogChannelType::Stdout))
        .await
        .expect("subscribe")
        .into_inner();
    let r = tokio::time::timeout(STEP, s.message())
        .await
        .expect("no output")
        .expect("stream error")
        .expect("ended without a line");
    r.item.expect("item").line
}
