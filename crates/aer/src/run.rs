//! `aer cell run CELL NAME -- COMMAND`: start an executable, print its
//! stdout and stderr as they come, exit with its exit code (as `aer cell
//! wait` reports it: N, 128+N for signal N). SIGINT (Ctrl-C) or SIGTERM
//! stops it (Stop RPC) and aer exits with 130 or 143, as a shell does.

use std::io::Write;

use aurae_client::{
    proto::{
        cells::{
            CellServiceListRequest, CellServiceStartRequest, CellServiceStopRequest, Executable,
        },
        observe::{GetSubProcessStreamRequest, LogChannelType},
    },
    Client,
};
use tokio::signal::unix::{signal, SignalKind};

use crate::{cell, status, Failure};

/// Lines asked for per message (the daemon caps them at 4096; an old daemon
/// ignores the field and sends one line per message).
const LINES_PER_MESSAGE: u32 = 1024;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The cell ("" for the host context).
    cell: String,
    /// The executable's name (unique in the cell while it is kept).
    name: String,
    /// Run as this uid.
    #[arg(long)]
    uid: Option<u32>,
    /// Run as this gid.
    #[arg(long)]
    gid: Option<u32>,
    /// Keep the executable's record (status, output) after it ended, for
    /// `aer cell list|wait` and `aer observe output`; by default aer removes
    /// it (Stop) once it has printed everything, so NAME can be run again.
    #[arg(long)]
    keep: bool,
    /// The command, run as `sh -c COMMAND` (words are joined by spaces).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Runs the executable to its end; `Ok` carries aer's exit code.
pub async fn run(client: &Client, a: RunArgs) -> Result<u8, Failure> {
    // Signals are caught before Start: a Ctrl-C right after it must stop
    // the executable, not kill aer and leave the executable running.
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let cell = (!a.cell.is_empty()).then_some(a.cell);
    let mut cells = client.cells();
    let pid = cells
        .start(CellServiceStartRequest {
            cell_name: cell.clone(),
            executable: Some(Executable {
                name: a.name.clone(),
                command: a.command.join(" "),
                description: String::new(),
            }),
            uid: a.uid,
            gid: a.gid,
        })
        .await
        .map_err(status)?
        .into_inner()
        .pid;

    let stdout = tokio::spawn(copy_output(client.clone(), pid, LogChannelType::Stdout));
    let stderr = tokio::spawn(copy_output(client.clone(), pid, LogChannelType::Stderr));
    let finished = async {
        // Both streams end once the executable has exited and everything
        // it printed was sent; then List has its exit status.
        let _ = stdout.await;
        let _ = stderr.await;
        let list = || {
            let mut cells = cells.clone();
            async move {
                cells
                    .list(CellServiceListRequest {})
                    .await
                    .map(tonic::Response::into_inner)
            }
        };
        cell::wait_for(list, cell.as_deref(), &a.name, None).await
    };
    let interrupted = tokio::select! {
        r = finished => {
            let e = r?;
            if !a.keep {
                remove(client, cell.clone(), &a.name).await;
            }
            return Ok(cell::exit_code(&e));
        }
        _ = int.recv() => 128 + libc_signal::SIGINT,
        _ = term.recv() => 128 + libc_signal::SIGTERM,
    };
    // Stop (SIGTERM, grace, SIGKILL to its process group) also removes the
    // record, --keep or not: there is no exit of its own to keep.
    eprintln!("aer: stopping {}", a.name);
    client
        .cells()
        .stop(CellServiceStopRequest {
            cell_name: cell,
            executable_name: a.name,
        })
        .await
        .map_err(|s| status(s).with_code(interrupted))?;
    Ok(interrupted)
}

/// Signal numbers (the same on every Linux architecture aer builds for).
mod libc_signal {
    pub const SIGINT: u8 = 2;
    pub const SIGTERM: u8 = 15;
}

/// Removes an ended executable's record; failing to is worth a line, not
/// a different exit code (the executable's own code is what matters).
async fn remove(client: &Client, cell: Option<String>, name: &str) {
    let r = client
        .cells()
        .stop(CellServiceStopRequest {
            cell_name: cell,
            executable_name: name.to_owned(),
        })
        .await;
    if let Err(s) = r {
        eprintln!(
            "aer: could not remove the record of {name}: {:?}: {}",
            s.code(),
            s.message()
        );
    }
}

/// Streams one channel of the executable's output to aer's stdout or
/// stderr, a batch per write, until it ends. A stream that fails (the
/// daemon restarting) says so on stderr; the exit status still comes from
/// List, which rides out a restart.
async fn copy_output(client: Client, pid: i32, channel: LogChannelType) {
    let to_stderr = channel == LogChannelType::Stderr;
    let request = GetSubProcessStreamRequest {
        channel_type: channel.into(),
        process_id: pid,
        max_lines_per_message: LINES_PER_MESSAGE,
        // Extension: many lines' text in one block (a daemon without it
        // answers with `items`, which the loop reads too).
        line_blocks: true,
    };
    let mut stream = match client.observe().get_sub_process_stream(request).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            eprintln!(
                "aer: no {} of pid {pid}: {}",
                channel.as_str_name(),
                s.message()
            );
            return;
        }
    };
    let mut buf = Vec::with_capacity(64 << 10);
    // A closed stdout (`aer cell run … | head`) discards the rest: the
    // executable runs to its end and aer still reports its exit code.
    let mut closed = false;
    loop {
        match stream.message().await {
            Ok(Some(r)) => {
                if closed {
                    continue;
                }
                buf.clear();
                for item in r.item.iter().chain(&r.items) {
                    buf.extend_from_slice(item.line.as_bytes());
                    buf.push(b'\n');
                }
                if let Some(b) = &r.block {
                    buf.extend_from_slice(b.text.as_bytes());
                }
                let written = if to_stderr {
                    let mut e = std::io::stderr().lock();
                    e.write_all(&buf).and_then(|()| e.flush())
                } else {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&buf).and_then(|()| o.flush())
                };
                closed = written.is_err();
            }
            Ok(None) => return,
            Err(s) => {
                eprintln!(
                    "aer: the {} stream ended early: {:?}: {}",
                    channel.as_str_name(),
                    s.code(),
                    s.message()
                );
                return;
            }
        }
    }
}
