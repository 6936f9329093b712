//! `aer cell allocate|free|start|stop|list`

use aurae_client::{
    proto::cells::{
        Cell, CellGraphNode, CellServiceAllocateRequest, CellServiceFreeRequest,
        CellServiceListRequest, CellServiceStartRequest, CellServiceStopRequest, CpuController,
        CpusetController, Executable, MemoryController,
    },
    Client,
};
use clap::Subcommand;
use serde_json::json;

use crate::{status, Failure};

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
    /// Stop an executable (SIGTERM, grace period, SIGKILL).
    Stop { cell: String, name: String },
    /// Show the cell tree.
    List,
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

pub async fn run(client: &Client, cmd: Command, json_out: bool) -> Result<(), Failure> {
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
            } else if r.cells.is_empty() {
                println!("no cells");
            } else {
                for n in &r.cells {
                    print_tree(n, "", true, true);
                }
            }
        }
    }
    Ok(())
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
    })
}

fn print_tree(n: &CellGraphNode, prefix: &str, last: bool, root: bool) {
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
    println!("{prefix}{branch}{}{iso}", c.name);
    let child_prefix = if root {
        String::new()
    } else {
        format!("{prefix}{}", if last { "    " } else { "│   " })
    };
    for (i, ch) in n.children.iter().enumerate() {
        print_tree(ch, &child_prefix, i + 1 == n.children.len(), false);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("64M"), Ok(64 << 20));
        assert_eq!(super::parse_size("100"), Ok(100));
        assert_eq!(super::parse_size("1g"), Ok(1 << 30));
        assert!(super::parse_size("1x").is_err());
        assert!(super::parse_size("M").is_err());
    }
}
