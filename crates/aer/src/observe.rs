//! `aer observe logs|output|signals`: follow one of the daemon's streams and
//! print one line per item (JSON lines with `--json`).

use std::io::Write;

use aurae_client::{
    proto::observe::{
        GetAuraeDaemonLogStreamRequest, GetPosixSignalsStreamRequest, GetSubProcessStreamRequest,
        LogBlock, LogChannelType, LogItem, Signal, Workload, WorkloadType,
    },
    Client,
};
use clap::Subcommand;
use serde_json::json;

use crate::{status, Failure};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Follow the daemon's log (recent lines first).
    Logs,
    /// Print an executable's output until it ends (kept lines first).
    Output {
        /// Host pid, as printed by `aer cell start`.
        pid: i32,
        /// Stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
    },
    /// Follow POSIX signals delivered on the host, or to one cell's processes.
    Signals {
        /// Only signals to processes in this cell or its descendants.
        #[arg(long)]
        cell: Option<String>,
    },
}

/// Lines `aer observe output` asks for per message.
const OUTPUT_LINES_PER_MESSAGE: u32 = 1024;

pub async fn run(client: &Client, cmd: Command, json_out: bool) -> Result<(), Failure> {
    let mut observe = client.observe();
    let mut out = Printer::new(json_out);
    match cmd {
        Command::Logs => {
            let mut s = observe
                .get_aurae_daemon_log_stream(GetAuraeDaemonLogStreamRequest {})
                .await
                .map_err(status)?
                .into_inner();
            while let Some(r) = s.message().await.map_err(status)? {
                if let Some(item) = r.item {
                    out.log(&item)?;
                }
            }
        }
        Command::Output { pid, stderr } => {
            let channel = if stderr {
                LogChannelType::Stderr
            } else {
                LogChannelType::Stdout
            };
            let mut s = observe
                .get_sub_process_stream(GetSubProcessStreamRequest {
                    channel_type: channel.into(),
                    process_id: pid,
                    // Extensions: lines in blocks; from a daemon that has
                    // only batches, many lines per message; from one that
                    // has neither, one by one in `item`.
                    max_lines_per_message: OUTPUT_LINES_PER_MESSAGE,
                    line_blocks: true,
                })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(r) = s.message().await.map_err(status)? {
                for item in r.item.iter().chain(&r.items) {
                    out.log_buffered(item)?;
                }
                if let Some(b) = &r.block {
                    out.block(b)?;
                }
                out.flush()?;
            }
        }
        Command::Signals { cell } => {
            let workload = cell.map(|id| Workload {
                workload_type: WorkloadType::Cell.into(),
                id,
            });
            let mut s = observe
                .get_posix_signals_stream(GetPosixSignalsStreamRequest { workload })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(r) = s.message().await.map_err(status)? {
                if let Some(sig) = r.signal {
                    out.signal(&sig)?;
                }
            }
        }
    }
    Ok(())
}

/// Writes to stdout; a closed stdout (`aer observe logs | head`) ends the
/// command quietly instead of panicking like `println!`.
struct Printer {
    json: bool,
    /// Buffered: a batch of lines is one write (flushed after each message).
    stdout: std::io::BufWriter<std::io::Stdout>,
}

impl Printer {
    fn new(json: bool) -> Self {
        Self {
            json,
            stdout: std::io::BufWriter::with_capacity(64 << 10, std::io::stdout()),
        }
    }

    fn write(&mut self, line: &str) -> Result<(), Failure> {
        let o = &mut self.stdout;
        let r = writeln!(o, "{line}").and_then(|()| o.flush());
        Self::checked(r)
    }

    fn log(&mut self, item: &LogItem) -> Result<(), Failure> {
        self.log_buffered(item)?;
        self.flush()
    }

    /// The lines of a block, without flushing: the text as it came, or
    /// with `--json` one object per line as for a LogItem.
    fn block(&mut self, b: &LogBlock) -> Result<(), Failure> {
        if !self.json {
            let r = self.stdout.write_all(b.text.as_bytes());
            return Self::checked(r);
        }
        let mut ts = b
            .timestamps
            .iter()
            .zip(&b.line_counts)
            .flat_map(|(&t, &n)| std::iter::repeat_n(t, n as usize));
        for line in b.text.split_terminator('\n') {
            let item = LogItem {
                channel: b.channel.clone(),
                line: line.to_owned(),
                timestamp: ts.next().unwrap_or(0),
            };
            self.log_buffered(&item)?;
        }
        Ok(())
    }

    /// Like [`Printer::log`], without flushing (call [`Printer::flush`]).
    fn log_buffered(&mut self, item: &LogItem) -> Result<(), Failure> {
        let o = &mut self.stdout;
        let r = if self.json {
            let v =
                json!({ "channel": item.channel, "line": item.line, "timestamp": item.timestamp });
            writeln!(o, "{v}")
        } else {
            writeln!(o, "{}", item.line)
        };
        Self::checked(r)
    }

    fn flush(&mut self) -> Result<(), Failure> {
        let r = self.stdout.flush();
        Self::checked(r)
    }

    fn checked(r: std::io::Result<()>) -> Result<(), Failure> {
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
            r => Ok(r?),
        }
    }

    fn signal(&mut self, s: &Signal) -> Result<(), Failure> {
        if self.json {
            let v = json!({ "signal": s.signal, "name": signal_name(s.signal), "process_id": s.process_id });
            self.write(&v.to_string())
        } else {
            self.write(&format!(
                "{} ({}) pid {}",
                signal_name(s.signal),
                s.signal,
                s.process_id
            ))
        }
    }
}

/// Linux signal names (x86/arm numbering); real-time ones as glibc's
/// SIGRTMIN+n (glibc reserves 32 and 33).
pub(crate) fn signal_name(n: i32) -> String {
    const NAMES: [&str; 31] = [
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    match n {
        1..=31 => NAMES[(n - 1) as usize].to_owned(),
        34 => "SIGRTMIN".to_owned(),
        35..=64 => format!("SIGRTMIN+{}", n - 34),
        _ => format!("SIG{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::signal_name;

    #[test]
    fn names() {
        assert_eq!(signal_name(10), "SIGUSR1");
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(31), "SIGSYS");
        assert_eq!(signal_name(1), "SIGHUP");
        assert_eq!(signal_name(2), "SIGINT");
        assert_eq!(signal_name(3), "SIGQUIT");
        assert_eq!(signal_name(6), "SIGABRT");
        assert_eq!(signal_name(11), "SIGSEGV");
        assert_eq!(signal_name(13), "SIGPIPE");
        assert_eq!(signal_name(14), "SIGALRM");
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(17), "SIGCHLD");
        assert_eq!(signal_name(34), "SIGRTMIN");
        assert_eq!(signal_name(35), "SIGRTMIN+1");
        assert_eq!(signal_name(0), "SIG0");
    }
}
