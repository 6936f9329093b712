//! `aer cell allocate|free|start|run|stop|wait|list`

use std::{future::Future, time::Duration};

use aurae_client::{
    proto::cells::{
        Cell, CellGraphNode, CellServiceAllocateRequest, CellServiceFreeRequest,
        CellServiceListRequest, CellServiceListResponse, CellServiceStartRequest,
        CellServiceStopRequest, CpuController, CpusetController, Executable, ExecutableStatus,
        MemoryController,
    },
    Client,
};
use clap::Subcommand;
use serde_json::json;
use tokio::time::Instant;

use crate::{observe::signal_name, status, Failure};

/// How often `aer cell wait` asks the daemon.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// `aer cell wait`: the executable ended, but how is unknown.
pub const EXIT_UNKNOWN: u8 = 125;
/// `aer cell wait`: `--timeout` elapsed first (as timeout(1)).
pub const EXIT_TIMEOUT: u8 = 124;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Allocate a cell (a cgroup, optionally with its own namespaces).
    Allocate(AllocateArgs),
    /// Free a cell: stop its executables and those of its children, remove it.
    Free { name: String },
    /// Start `sh -c COMMAND` in a cell (use "" as CELL for the host context).
    Start {
        cell: String,
        name: String,
        /// Run as this uid.
        #[arg(long)]
        uid: Option<u32>,
        /// Run as this gid.
        #[arg(long)]
        gid: Option<u32>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Start `sh -c COMMAND`, print its stdout and stderr as they come, exit with its code.
    ///
    /// Exit codes as `aer cell wait` (N, 128+N if killed by signal N);
    /// Ctrl-C (SIGINT) or SIGTERM stops the executable and exits with 130 or
    /// 143. Once it has ended and its output is printed, its record is
    /// removed (unless --keep), so the same NAME can run again.
    Run(crate::run::RunArgs),
    /// Stop an executable (SIGTERM, grace period, SIGKILL).
    Stop { cell: String, name: String },
    /// Wait until an executable has exited, print how it ended, exit with its code.
    ///
    /// Asks the daemon (List) every 100 ms, riding out a restart of the
    /// daemon. Prints `exited N`, `killed by signal N (SIGNAME)` or `unknown`
    /// (with --json: the executable's status as JSON).
    ///
    /// Exit codes:
    ///   N        the executable exited with code N
    ///   128+N    it was killed by signal N
    ///   125      it ended, but how is unknown (its supervisor was killed)
    ///   124      --timeout elapsed while it was still running
    ///   1        no such executable or cell, the executable was removed
    ///            (stopped, or its cell freed) before it was seen to exit, or
    ///            another error: a message on stderr and nothing on stdout
    ///   2        wrong usage
    #[command(allow_missing_positional = true, verbatim_doc_comment)]
    Wait(WaitArgs),
    /// Show the cell tree, with each cell's executables.
    List,
    /// Resource usage of cells (CPU, memory, pids, IO) from their cgroups.
    Stats(crate::stats::StatsArgs),
}

#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// The executable's cell; omit it (or give "", or --host) for the host
    /// context.
    #[arg(conflicts_with = "host")]
    cell: Option<String>,
    /// The executable's name.
    name: String,
    /// The executable runs in the host context (was started without a cell).
    #[arg(long)]
    host: bool,
    /// Give up after SECS seconds (fractions allowed) and exit with 124.
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    timeout: Option<Duration>,
}

#[derive(Debug, clap::Args)]
pub struct AllocateArgs {
    /// Cell path, e.g. `web` or `web/worker`.
    name: String,
    #[arg(long)]
    cpu_weight: Option<u64>,
    /// CPU time (µs) per period.
    #[arg(long)]
    cpu_max: Option<i64>,
    /// Period (µs), default 100000.
    #[arg(long)]
    cpu_period: Option<u64>,
    /// CPUs, e.g. 0-1,3.
    #[arg(long)]
    cpus: Option<String>,
    /// Memory nodes, e.g. 0.
    #[arg(long)]
    mems: Option<String>,
    /// Bytes; suffixes K, M, G, T accepted (64M).
    #[arg(long, value_parser = parse_size)]
    mem_min: Option<i64>,
    #[arg(long, value_parser = parse_size)]
    mem_low: Option<i64>,
    #[arg(long, value_parser = parse_size)]
    mem_high: Option<i64>,
    #[arg(long, value_parser = parse_size)]
    mem_max: Option<i64>,
    /// Own pid, ipc, uts and mount namespaces (and /proc).
    #[arg(long)]
    isolate_process: bool,
    /// Own network namespace (loopback only).
    #[arg(long)]
    isolate_network: bool,
}

/// `64M` → 67108864; plain numbers are bytes.
pub fn parse_size(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: i64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix {c:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 64M"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `5`, `0.5` → a duration in seconds.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .and_then(|x| Duration::try_from_secs_f64(x).ok())
        .ok_or_else(|| format!("{s:?} is not a number of seconds like 5 or 0.5"))
}

/// Runs a cell command; `Ok` carries the exit code (not 0 only for `wait`).
pub async fn run(client: &Client, cmd: Command, json_out: bool) -> Result<u8, Failure> {
    let mut cells = client.cells();
    match cmd {
        Command::Allocate(a) => {
            let cell = Cell {
                name: a.name,
                cpu: (a.cpu_weight.is_some() || a.cpu_max.is_some() || a.cpu_period.is_some())
                    .then_some(CpuController {
                        weight: a.cpu_weight,
                        max: a.cpu_max,
                        period: a.cpu_period,
                    }),
                cpuset: (a.cpus.is_some() || a.mems.is_some()).then_some(CpusetController {
                    cpus: a.cpus,
                    mems: a.mems,
                }),
                memory: [a.mem_min, a.mem_low, a.mem_high, a.mem_max]
                    .iter()
                    .any(Option::is_some)
                    .then_some(MemoryController {
                        min: a.mem_min,
                        low: a.mem_low,
                        high: a.mem_high,
                        max: a.mem_max,
                    }),
                isolate_process: a.isolate_process,
                isolate_network: a.isolate_network,
            };
            let r = cells
                .allocate(CellServiceAllocateRequest { cell: Some(cell) })
                .await
                .map_err(status)?
                .into_inner();
            if json_out {
                println!(
                    "{}",
                    json!({ "cell_name": r.cell_name, "cgroup_v2": r.cgroup_v2 })
                );
            } else {
                println!(
                    "allocated {} (cgroup {})",
                    r.cell_name,
                    if r.cgroup_v2 { "v2" } else { "v1" }
                );
            }
        }
        Command::Free { name } => {
            cells
                .free(CellServiceFreeRequest {
                    cell_name: name.clone(),
                })
                .await
                .map_err(status)?;
            if json_out {
                println!("{}", json!({ "freed": name }));
            } else {
                println!("freed {name}");
            }
        }
        Command::Start {
            cell,
            name,
            uid,
            gid,
            command,
        } => {
            let r = cells
                .start(CellServiceStartRequest {
                    cell_name: (!cell.is_empty()).then_some(cell),
                    executable: Some(Executable {
                        name: name.clone(),
                        command: command.join(" "),
                        description: String::new(),
                    }),
                    uid,
                    gid,
                })
                .await
                .map_err(status)?
                .into_inner();
            if json_out {
                println!(
                    "{}",
                    json!({ "name": name, "pid": r.pid, "uid": r.uid, "gid": r.gid })
                );
            } else {
                println!(
                    "started {name}: pid {} (uid {}, gid {})",
                    r.pid, r.uid, r.gid
                );
            }
        }
        Command::Run(a) => return crate::run::run(client, a).await,
        Command::Stop { cell, name } => {
            cells
                .stop(CellServiceStopRequest {
                    cell_name: (!cell.is_empty()).then_some(cell),
                    executable_name: name.clone(),
                })
                .await
                .map_err(status)?;
            if json_out {
                println!("{}", json!({ "stopped": name }));
            } else {
                println!("stopped {name}");
            }
        }
        Command::Wait(a) => {
            let cell = a.cell.filter(|c| !c.is_empty());
            let list = || {
                let mut cells = cells.clone();
                async move {
                    cells
                        .list(CellServiceListRequest {})
                        .await
                        .map(tonic::Response::into_inner)
                }
            };
            let e = wait_for(list, cell.as_deref(), &a.name, a.timeout).await?;
            if json_out {
                println!("{}", executable_json(&e));
            } else {
                println!("{}", status_text(&e));
            }
            return Ok(exit_code(&e));
        }
        Command::Stats(a) => return crate::stats::stats(client, a, json_out).await,
        Command::List => {
            let r = cells
                .list(CellServiceListRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if json_out {
                println!(
                    "{}",
                    serde_json::Value::Array(r.cells.iter().map(node_json).collect())
                );
            } else {
                for line in list_lines(&r) {
                    println!("{line}");
                }
            }
        }
    }
    Ok(0)
}

/// `executable "api" in cell "web"`, or `… in the host context`.
fn describe(cell: Option<&str>, name: &str) -> String {
    match cell {
        Some(c) => format!("executable {name:?} in cell {c:?}"),
        None => format!("executable {name:?} in the host context"),
    }
}

/// What one List answer says about the executable `aer cell wait` waits for.
#[derive(Debug, PartialEq)]
enum Lookup<'a> {
    Found(&'a ExecutableStatus),
    NoCell,
    NoExecutable,
}

fn lookup<'a>(r: &'a CellServiceListResponse, cell: Option<&str>, name: &str) -> Lookup<'a> {
    fn find_cell<'a>(nodes: &'a [CellGraphNode], name: &str) -> Option<&'a CellGraphNode> {
        nodes.iter().find_map(|n| {
            if n.cell.as_ref().is_some_and(|c| c.name == name) {
                Some(n)
            } else {
                find_cell(&n.children, name)
            }
        })
    }
    let executables = match cell {
        None => &r.host_executables,
        Some(c) => match find_cell(&r.cells, c) {
            Some(n) => &n.executables,
            None => return Lookup::NoCell,
        },
    };
    executables
        .iter()
        .find(|e| e.name == name)
        .map_or(Lookup::NoExecutable, Lookup::Found)
}

/// Has the executable ended (however)?
fn ended(e: &ExecutableStatus) -> bool {
    e.exit_code.is_some() || e.signal.is_some() || matches!(e.state.as_str(), "exited" | "unknown")
}

/// Calls `list` every [`POLL_INTERVAL`] until the executable `name` (of
/// `cell`, or of the host context) has ended, and returns its status.
/// Answers that mean the daemon is restarting are retried.
pub(crate) async fn wait_for<F, Fut>(
    mut list: F,
    cell: Option<&str>,
    name: &str,
    timeout: Option<Duration>,
) -> Result<ExecutableStatus, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<CellServiceListResponse, tonic::Status>>,
{
    let what = describe(cell, name);
    let deadline = timeout.map(|t| (Instant::now() + t, t));
    let timed_out = |t: Duration| {
        Failure::new(format!("timed out after {t:?} waiting for {what} to exit"))
            .with_code(EXIT_TIMEOUT)
    };
    let mut seen = false;
    let mut noted_unavailable = false;
    loop {
        let answer = match deadline {
            Some((d, t)) => tokio::time::timeout_at(d, list())
                .await
                .map_err(|_| timed_out(t))?,
            None => list().await,
        };
        match answer {
            Ok(r) => match lookup(&r, cell, name) {
                Lookup::Found(e) if ended(e) => return Ok(e.clone()),
                Lookup::Found(_) => seen = true,
                _ if seen => {
                    return Err(Failure::new(format!(
                        "NotFound: {what} was removed (stopped, or its cell freed) before it was seen to exit"
                    )))
                }
                Lookup::NoCell => {
                    return Err(Failure::new(format!(
                        "NotFound: no cell {:?}",
                        cell.unwrap_or_default()
                    )))
                }
                Lookup::NoExecutable => {
                    return Err(Failure::new(format!("NotFound: no {what}")))
                }
            },
            // A daemon that restarts refuses connections (UNAVAILABLE) or
            // breaks the one in use (UNKNOWN "transport error", or
            // CANCELLED when the connection goes mid-call); List is
            // idempotent and the channel reconnects on the next call.
            Err(s)
                if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Cancelled)
                    || (s.code() == tonic::Code::Unknown && s.message().contains("transport")) =>
            {
                if !noted_unavailable {
                    eprintln!("aer: the daemon is unavailable ({}); still waiting", s.message());
                    noted_unavailable = true;
                }
            }
            Err(s) => return Err(status(s)),
        }
        let next = Instant::now() + POLL_INTERVAL;
        match deadline {
            Some((d, t)) if d <= next => {
                tokio::time::sleep_until(d).await;
                return Err(timed_out(t));
            }
            _ => tokio::time::sleep_until(next).await,
        }
    }
}

/// `exited 7`, `killed by signal 9 (SIGKILL)`, `running`, `unknown`.
pub fn status_text(e: &ExecutableStatus) -> String {
    match (e.signal, e.exit_code) {
        (Some(sig), _) => format!("killed by signal {sig} ({})", signal_name(sig)),
        (None, Some(code)) => format!("exited {code}"),
        (None, None) if e.state.is_empty() => "unknown".to_owned(),
        (None, None) => e.state.clone(),
    }
}

/// The exit code `aer cell wait` reports for an ended executable: its own,
/// 128+N if killed by signal N, [`EXIT_UNKNOWN`] if that is not known.
pub fn exit_code(e: &ExecutableStatus) -> u8 {
    match (e.signal, e.exit_code) {
        (Some(sig), _) => match sig.checked_add(128).map(u8::try_from) {
            Some(Ok(code)) if sig > 0 => code,
            _ => EXIT_UNKNOWN,
        },
        (None, Some(code)) => u8::try_from(code).unwrap_or(EXIT_UNKNOWN),
        (None, None) => EXIT_UNKNOWN,
    }
}

/// `sh -c 'COMMAND'`, quoted for a POSIX shell, control characters escaped
/// so that it stays on one line.
fn shell_command(command: &str) -> String {
    let mut quoted = String::with_capacity(command.len() + 8);
    for c in command.chars() {
        match c {
            '\'' => quoted.push_str("'\\''"),
            c if c.is_control() => quoted.extend(c.escape_default()),
            c => quoted.push(c),
        }
    }
    format!("sh -c '{quoted}'")
}

/// `▸ api  pid 1234  running  sh -c 'python3 -m http.server'`
fn executable_line(e: &ExecutableStatus) -> String {
    format!(
        "▸ {}  pid {}  {}  {}",
        e.name,
        e.pid,
        status_text(e),
        shell_command(&e.command)
    )
}

fn executable_json(e: &ExecutableStatus) -> serde_json::Value {
    json!({
        "name": e.name,
        "command": e.command,
        "pid": e.pid,
        "state": e.state,
        "exit_code": e.exit_code,
        "signal": e.signal,
        "started_at": e.started_at,
        "exited_at": e.exited_at,
        "uid": e.uid,
        "gid": e.gid,
        "description": e.description,
    })
}

/// A cell's status; old daemons send none, which means ready.
fn cell_status(n: &CellGraphNode) -> &str {
    if n.status.is_empty() {
        "ready"
    } else {
        &n.status
    }
}

fn node_json(n: &CellGraphNode) -> serde_json::Value {
    let c = n.cell.clone().unwrap_or_default();
    json!({
        "name": c.name,
        "cpu": c.cpu.map(|x| json!({"weight": x.weight, "max": x.max, "period": x.period})),
        "cpuset": c.cpuset.map(|x| json!({"cpus": x.cpus, "mems": x.mems})),
        "memory": c.memory.map(|x| json!({"min": x.min, "low": x.low, "high": x.high, "max": x.max})),
        "isolate_process": c.isolate_process,
        "isolate_network": c.isolate_network,
        "children": n.children.iter().map(node_json).collect::<Vec<_>>(),
        "status": cell_status(n),
        "executables": n.executables.iter().map(executable_json).collect::<Vec<_>>(),
    })
}

/// The readable `aer cell list`: host executables under `(host)` if any,
/// then the cell trees.
fn list_lines(r: &CellServiceListResponse) -> Vec<String> {
    let mut out = vec![];
    if !r.host_executables.is_empty() {
        out.push("(host)".to_owned());
        for e in &r.host_executables {
            out.push(format!("    {}", executable_line(e)));
        }
    }
    if r.cells.is_empty() {
        out.push("no cells".to_owned());
    }
    for n in &r.cells {
        tree_lines(n, "", true, true, &mut out);
    }
    out
}

fn tree_lines(n: &CellGraphNode, prefix: &str, last: bool, root: bool, out: &mut Vec<String>) {
    let c = n.cell.clone().unwrap_or_default();
    let mut flags = vec![];
    if c.isolate_process {
        flags.push("process".to_owned());
    }
    if c.isolate_network {
        flags.push("network".to_owned());
    }
    let iso = if flags.is_empty() {
        String::new()
    } else {
        format!(" [isolated: {}]", flags.join(", "))
    };
    let branch = if root {
        ""
    } else if last {
        "└── "
    } else {
        "├── "
    };
    let state = match cell_status(n) {
        "ready" => String::new(),
        s => format!(" [{s}]"),
    };
    out.push(format!("{prefix}{branch}{}{state}{iso}", c.name));
    let child_prefix = if root {
        String::new()
    } else {
        format!("{prefix}{}", if last { "    " } else { "│   " })
    };
    // Under the cell's name, the tree line going on to its children if any.
    let exe_prefix = format!(
        "{child_prefix}{}",
        if n.children.is_empty() {
            "    "
        } else {
            "│   "
        }
    );
    for e in &n.executables {
        out.push(format!("{exe_prefix}{}", executable_line(e)));
    }
    for (i, ch) in n.children.iter().enumerate() {
        tree_lines(ch, &child_prefix, i + 1 == n.children.len(), false, out);
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, time::Duration};

    use aurae_client::proto::cells::{
        Cell, CellGraphNode, CellServiceListResponse, ExecutableStatus,
    };
    use tokio::time::Instant;

    use super::*;

    fn exe(
        name: &str,
        state: &str,
        exit_code: Option<i32>,
        signal: Option<i32>,
    ) -> ExecutableStatus {
        ExecutableStatus {
            name: name.to_owned(),
            command: "python3 -m http.server".to_owned(),
            pid: 1234,
            state: state.to_owned(),
            exit_code,
            signal,
            started_at: 1_700_000_000_000_000_000,
            exited_at: (state != "running").then_some(1_700_000_001_000_000_000),
            uid: 0,
            gid: 0,
            description: String::new(),
        }
    }

    fn node(
        name: &str,
        status: &str,
        exes: Vec<ExecutableStatus>,
        children: Vec<CellGraphNode>,
    ) -> CellGraphNode {
        CellGraphNode {
            cell: Some(Cell {
                name: name.to_owned(),
                ..Cell::default()
            }),
            children,
            executables: exes,
            status: status.to_owned(),
        }
    }

    fn response(host: Vec<ExecutableStatus>, cells: Vec<CellGraphNode>) -> CellServiceListResponse {
        CellServiceListResponse {
            cells,
            host_executables: host,
        }
    }

    #[test]
    fn status_texts() {
        assert_eq!(status_text(&exe("a", "running", None, None)), "running");
        assert_eq!(status_text(&exe("a", "exited", Some(7), None)), "exited 7");
        assert_eq!(status_text(&exe("a", "exited", Some(0), None)), "exited 0");
        assert_eq!(
            status_text(&exe("a", "exited", None, Some(9))),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            status_text(&exe("a", "exited", None, Some(15))),
            "killed by signal 15 (SIGTERM)"
        );
        assert_eq!(status_text(&exe("a", "unknown", None, None)), "unknown");
        assert_eq!(status_text(&exe("a", "", None, None)), "unknown");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(&exe("a", "exited", Some(0), None)), 0);
        assert_eq!(exit_code(&exe("a", "exited", Some(7), None)), 7);
        assert_eq!(exit_code(&exe("a", "exited", Some(255), None)), 255);
        assert_eq!(exit_code(&exe("a", "exited", None, Some(9))), 137);
        assert_eq!(exit_code(&exe("a", "exited", None, Some(15))), 143);
        assert_eq!(exit_code(&exe("a", "exited", None, Some(2))), 130);
        assert_eq!(exit_code(&exe("a", "unknown", None, None)), EXIT_UNKNOWN);
        assert_eq!(EXIT_UNKNOWN, 125);
        assert_eq!(EXIT_TIMEOUT, 124);
        // Nonsense from the daemon is "unknown", not a wrapped-around code.
        assert_eq!(
            exit_code(&exe("a", "exited", Some(256), None)),
            EXIT_UNKNOWN
        );
        assert_eq!(exit_code(&exe("a", "exited", Some(-1), None)), EXIT_UNKNOWN);
        assert_eq!(exit_code(&exe("a", "exited", None, Some(0))), EXIT_UNKNOWN);
        assert_eq!(
            exit_code(&exe("a", "exited", None, Some(200))),
            EXIT_UNKNOWN
        );
    }

    #[test]
    fn ended_states() {
        assert!(!ended(&exe("a", "running", None, None)));
        assert!(ended(&exe("a", "exited", Some(0), None)));
        assert!(ended(&exe("a", "exited", None, Some(9))));
        assert!(ended(&exe("a", "unknown", None, None)));
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_timeout("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("0"), Ok(Duration::ZERO));
        assert!(parse_timeout("-1").is_err());
        assert!(parse_timeout("NaN").is_err());
        assert!(parse_timeout("5s").is_err());
    }

    #[test]
    fn shell_commands() {
        assert_eq!(
            shell_command("python3 -m http.server"),
            "sh -c 'python3 -m http.server'"
        );
        assert_eq!(shell_command("echo 'hi'"), r#"sh -c 'echo '\''hi'\'''"#);
        assert_eq!(shell_command("a\nb"), r"sh -c 'a\nb'");
    }

    #[test]
    fn list_view() {
        let r = response(
            vec![exe("cron", "exited", None, Some(9))],
            vec![
                node(
                    "web",
                    "",
                    vec![exe("api", "running", None, None)],
                    vec![
                        node(
                            "web/a",
                            "holder-dead",
                            vec![exe("x", "exited", Some(7), None)],
                            vec![node("web/a/b", "ready", vec![], vec![])],
                        ),
                        node(
                            "web/b",
                            "freeing",
                            vec![exe("y", "unknown", None, None)],
                            vec![],
                        ),
                    ],
                ),
                node(
                    "db",
                    "ready",
                    vec![exe("pg", "running", None, None)],
                    vec![],
                ),
            ],
        );
        let want = [
            "(host)",
            "    ▸ cron  pid 1234  killed by signal 9 (SIGKILL)  sh -c 'python3 -m http.server'",
            "web",
            "│   ▸ api  pid 1234  running  sh -c 'python3 -m http.server'",
            "├── web/a [holder-dead]",
            "│   │   ▸ x  pid 1234  exited 7  sh -c 'python3 -m http.server'",
            "│   └── web/a/b",
            "└── web/b [freeing]",
            "        ▸ y  pid 1234  unknown  sh -c 'python3 -m http.server'",
            "db",
            "    ▸ pg  pid 1234  running  sh -c 'python3 -m http.server'",
        ];
        assert_eq!(list_lines(&r), want);
        assert_eq!(list_lines(&response(vec![], vec![])), ["no cells"]);
        let host_only = list_lines(&response(vec![exe("a", "running", None, None)], vec![]));
        assert_eq!(host_only[0], "(host)");
        assert_eq!(host_only[2], "no cells");
    }

    #[test]
    fn list_json() {
        let n = node(
            "web",
            "",
            vec![exe("api", "exited", None, Some(9))],
            vec![node("web/a", "holder-dead", vec![], vec![])],
        );
        let v = node_json(&n);
        for key in [
            "name",
            "cpu",
            "cpuset",
            "memory",
            "isolate_process",
            "isolate_network",
            "children",
        ] {
            assert!(v.get(key).is_some(), "{key} missing");
        }
        assert_eq!(v["status"], "ready");
        assert_eq!(v["children"][0]["status"], "holder-dead");
        let e = &v["executables"][0];
        assert_eq!(e["name"], "api");
        assert_eq!(e["state"], "exited");
        assert_eq!(e["signal"], 9);
        assert!(e["exit_code"].is_null());
        assert_eq!(e["pid"], 1234);
        assert_eq!(e["started_at"], 1_700_000_000_000_000_000_i64);
        assert_eq!(e["exited_at"], 1_700_000_001_000_000_000_i64);
    }

    #[test]
    fn lookups() {
        let running = exe("api", "running", None, None);
        let r = response(
            vec![exe("h", "running", None, None)],
            vec![node(
                "web",
                "",
                vec![],
                vec![node("web/a", "", vec![running.clone()], vec![])],
            )],
        );
        assert_eq!(lookup(&r, Some("web/a"), "api"), Lookup::Found(&running));
        assert_eq!(lookup(&r, Some("web"), "api"), Lookup::NoExecutable);
        assert_eq!(lookup(&r, Some("db"), "api"), Lookup::NoCell);
        assert_eq!(lookup(&r, None, "api"), Lookup::NoExecutable);
        assert!(matches!(lookup(&r, None, "h"), Lookup::Found(_)));
    }

    type Answer = Result<CellServiceListResponse, tonic::Status>;

    /// A List that answers from a script, the last answer forever.
    fn scripted(answers: Vec<Answer>) -> impl FnMut() -> std::future::Ready<Answer> {
        let mut answers = VecDeque::from(answers);
        move || {
            let a = if answers.len() > 1 {
                answers.pop_front()
            } else {
                answers.front().cloned()
            };
            std::future::ready(a.expect("a scripted answer"))
        }
    }

    fn in_web(e: ExecutableStatus) -> Answer {
        Ok(response(vec![], vec![node("web", "", vec![e], vec![])]))
    }

    #[tokio::test]
    async fn waits_until_exited() {
        let start = Instant::now();
        let list = scripted(vec![
            in_web(exe("api", "running", None, None)),
            Err(tonic::Status::unavailable("restarting")),
            in_web(exe("api", "running", None, None)),
            in_web(exe("api", "exited", Some(7), None)),
        ]);
        let e = wait_for(list, Some("web"), "api", Some(Duration::from_secs(10)))
            .await
            .ok()
            .expect("exited");
        assert_eq!(exit_code(&e), 7);
        assert!(start.elapsed() >= 3 * POLL_INTERVAL);
    }

    #[tokio::test]
    async fn host_context() {
        let list = scripted(vec![Ok(response(
            vec![exe("api", "exited", None, Some(9))],
            vec![],
        ))]);
        let e = wait_for(list, None, "api", None)
            .await
            .ok()
            .expect("exited");
        assert_eq!(exit_code(&e), 137);
    }

    async fn fails(
        answers: Vec<Answer>,
        cell: Option<&str>,
        timeout: Option<Duration>,
    ) -> (String, u8) {
        match wait_for(scripted(answers), cell, "api", timeout).await {
            Ok(e) => panic!("unexpectedly ended: {e:?}"),
            Err(f) => (f.message, f.code),
        }
    }

    #[tokio::test]
    async fn not_found() {
        let (msg, code) = fails(
            vec![in_web(exe("other", "running", None, None))],
            Some("web"),
            None,
        )
        .await;
        assert_eq!(msg, r#"NotFound: no executable "api" in cell "web""#);
        assert_eq!(code, 1);
        let (msg, code) = fails(
            vec![in_web(exe("api", "running", None, None))],
            Some("db"),
            None,
        )
        .await;
        assert_eq!(msg, r#"NotFound: no cell "db""#);
        assert_eq!(code, 1);
        let (msg, _) = fails(vec![in_web(exe("api", "running", None, None))], None, None).await;
        assert_eq!(msg, r#"NotFound: no executable "api" in the host context"#);
    }

    #[tokio::test]
    async fn removed_while_waiting() {
        let answers = vec![
            in_web(exe("api", "running", None, None)),
            Ok(response(vec![], vec![])),
        ];
        let (msg, code) = fails(answers, Some("web"), None).await;
        assert!(msg.contains("was removed"), "{msg}");
        assert_eq!(code, 1);
    }

    #[tokio::test]
    async fn times_out() {
        let start = Instant::now();
        let answers = vec![in_web(exe("api", "running", None, None))];
        let (msg, code) = fails(answers, Some("web"), Some(Duration::from_millis(250))).await;
        assert_eq!(code, EXIT_TIMEOUT);
        assert!(msg.starts_with("timed out after 250ms"), "{msg}");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn other_errors_fail() {
        let (msg, code) = fails(
            vec![Err(tonic::Status::permission_denied("no"))],
            Some("web"),
            None,
        )
        .await;
        assert_eq!(msg, "PermissionDenied: no");
        assert_eq!(code, 1);
    }

    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("64M"), Ok(64 << 20));
        assert_eq!(super::parse_size("100"), Ok(100));
        assert_eq!(super::parse_size("1g"), Ok(1 << 30));
        assert!(super::parse_size("1x").is_err());
        assert!(super::parse_size("M").is_err());
    }
}
