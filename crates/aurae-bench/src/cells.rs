//! The calls the figures make through the real gRPC client, and how an
//! executable's exit is observed.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use aurae_client::{
    proto::{
        cells::{
            Cell, CellServiceAllocateRequest, CellServiceFreeRequest, CellServiceStartRequest,
            CellServiceStopRequest, CpuController, Executable, MemoryController,
        },
        observe::{GetSubProcessStreamRequest, LogChannelType},
    },
    Client,
};

use crate::{
    floor::{CPU_PERIOD_US, CPU_QUOTA_US, MEMORY_MAX},
    procfs,
};

/// How the benchmark learns that an executable exited.
#[derive(Debug, Clone)]
pub enum ExitMode {
    /// GetSubProcessStream(stdout) of the pid ends (stdout closed).
    Stream,
    /// No ObserveService: a pidfd of the host pid becomes readable.
    Pidfd { why: String },
}

impl ExitMode {
    pub fn describe(&self) -> String {
        match self {
            ExitMode::Stream => "exit observed: GetSubProcessStream(stdout) ends".into(),
            ExitMode::Pidfd { why } => format!(
                "exit observed: pidfd_open(pid) readable (fallback; GetSubProcessStream {why})"
            ),
        }
    }
}

/// Asks for the stdout of a pid that cannot exist: UNIMPLEMENTED means the
/// daemon serves no ObserveService; any other answer means it does.
pub async fn probe_observe(client: &Client) -> Result<(), String> {
    let r = client
        .observe()
        .get_sub_process_stream(GetSubProcessStreamRequest {
            channel_type: LogChannelType::Stdout as i32,
            process_id: i32::MAX,
            max_lines_per_message: 0,
            line_blocks: false,
        })
        .await;
    match r {
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            Err("returned UNIMPLEMENTED (ObserveService not served by this auraed yet)".into())
        }
        _ => Ok(()),
    }
}

/// An isolated cell (pid+ipc+uts+mnt and net namespaces) with cpu max and
/// memory max set.
pub fn isolated_cell(name: &str) -> Cell {
    Cell {
        name: name.into(),
        cpu: Some(CpuController {
            weight: None,
            max: Some(CPU_QUOTA_US),
            period: Some(CPU_PERIOD_US),
        }),
        memory: Some(MemoryController {
            max: Some(MEMORY_MAX),
            ..Default::default()
        }),
        isolate_process: true,
        isolate_network: true,
        ..Default::default()
    }
}

pub async fn allocate(client: &Client, name: &str) -> anyhow::Result<()> {
    client
        .cells()
        .allocate(CellServiceAllocateRequest {
            cell: Some(isolated_cell(name)),
        })
        .await
        .with_context(|| format!("Allocate {name}"))?;
    Ok(())
}

/// A plain cell (host namespaces) with the same limits.
pub async fn allocate_plain(client: &Client, name: &str) -> anyhow::Result<()> {
    let cell = Cell {
        isolate_process: false,
        isolate_network: false,
        ..isolated_cell(name)
    };
    client
        .cells()
        .allocate(CellServiceAllocateRequest { cell: Some(cell) })
        .await
        .with_context(|| format!("Allocate {name}"))?;
    Ok(())
}

pub async fn free(client: &Client, name: &str) -> anyhow::Result<()> {
    client
        .cells()
        .free(CellServiceFreeRequest {
            cell_name: name.into(),
        })
        .await
        .with_context(|| format!("Free {name}"))?;
    Ok(())
}

/// Start `command` as `exe` in `cell`; the host pid.
pub async fn start(client: &Client, cell: &str, exe: &str, command: &str) -> anyhow::Result<i32> {
    let r = client
        .cells()
        .start(CellServiceStartRequest {
            cell_name: Some(cell.into()),
            executable: Some(Executable {
                name: exe.into(),
                command: command.into(),
                description: String::new(),
            }),
            uid: None,
            gid: None,
        })
        .await
        .with_context(|| format!("Start {exe} in {cell}"))?;
    Ok(r.into_inner().pid)
}

pub async fn stop(client: &Client, cell: &str, exe: &str) -> anyhow::Result<()> {
    client
        .cells()
        .stop(CellServiceStopRequest {
            cell_name: Some(cell.into()),
            executable_name: exe.into(),
        })
        .await
        .with_context(|| format!("Stop {exe} in {cell}"))?;
    Ok(())
}

/// Waits until `pid` (started through the daemon) has exited.
pub async fn wait_exit(client: &Client, mode: &ExitMode, pid: i32) -> anyhow::Result<()> {
    if let ExitMode::Stream = mode {
        let r = client
            .observe()
            .get_sub_process_stream(GetSubProcessStreamRequest {
                channel_type: LogChannelType::Stdout as i32,
                process_id: pid,
                max_lines_per_message: 0,
                line_blocks: false,
            })
            .await;
        if let Ok(resp) = r {
            let mut s = resp.into_inner();
            while s.message().await.context("GetSubProcessStream")?.is_some() {}
            return Ok(());
        }
        // Already gone from the daemon's table, or refused: fall through.
    }
    procfs::wait_pid_exit(pid)
        .await
        .with_context(|| format!("pidfd of {pid}"))
}

/// Start → exit observed → Stop of `/bin/true` in `cell`; (to pid, to exit).
pub async fn run_true(
    client: &Client,
    mode: &ExitMode,
    cell: &str,
    exe: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let t0 = Instant::now();
    let pid = start(client, cell, exe, "/bin/true").await?;
    let to_pid = t0.elapsed();
    wait_exit(client, mode, pid).await?;
    let to_exit = t0.elapsed();
    stop(client, cell, exe).await?;
    Ok((to_pid, to_exit))
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
