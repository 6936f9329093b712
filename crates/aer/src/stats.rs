//! `aer cell stats [CELL]` (one table of CellService.Stats) and
//! `aer top [CELL]` (the same, refreshed, with rates, like systemd-cgtop).

use std::{collections::HashMap, io::IsTerminal, time::Duration};

use aurae_client::{
    proto::cells::{CellServiceStatsRequest, CellServiceStatsResponse, CellStats},
    Client,
};
use serde_json::{json, Map, Value};

use crate::{status, Failure};

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Only this cell (and, with --recursive, the cells below it). Default: every cell.
    cell: Option<String>,
    /// With CELL: also every cell below it.
    #[arg(short, long)]
    recursive: bool,
}

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    #[command(flatten)]
    which: StatsArgs,
    /// Seconds between refreshes (fractions allowed).
    #[arg(short = 'd', long, default_value_t = 1.0)]
    interval: f64,
    /// Stop after N refreshes (default: until Ctrl-C).
    #[arg(short = 'n', long)]
    iterations: Option<u64>,
}

async fn fetch(client: &Client, a: &StatsArgs) -> Result<CellServiceStatsResponse, Failure> {
    Ok(client
        .cells()
        .stats(CellServiceStatsRequest {
            cell_name: a.cell.clone().unwrap_or_default(),
            recursive: a.recursive,
        })
        .await
        .map_err(status)?
        .into_inner())
}

/// `1.5G`, `64M`, `512K`, `12B` (binary units, as `aer cell allocate` takes them).
fn bytes(v: Option<u64>) -> String {
    let Some(v) = v else {
        return "-".into();
    };
    let units = [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)];
    for (u, n) in units {
        if v >= n {
            return format!("{:.1}{u}", v as f64 / n as f64);
        }
    }
    format!("{v}B")
}

fn secs(ns: Option<u64>) -> String {
    ns.map_or("-".into(), |ns| format!("{:.2}s", ns as f64 / 1e9))
}

fn num(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

/// The fields of one cell that are present, as JSON (absent stays absent).
fn to_json(c: &CellStats) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("cell_name".into(), json!(c.cell_name));
    let fields = [
        ("cpu_usage_ns", c.cpu_usage_ns),
        ("cpu_user_ns", c.cpu_user_ns),
        ("cpu_system_ns", c.cpu_system_ns),
        ("cpu_periods", c.cpu_periods),
        ("cpu_throttled_periods", c.cpu_throttled_periods),
        ("cpu_throttled_ns", c.cpu_throttled_ns),
        ("memory_usage_bytes", c.memory_usage_bytes),
        ("memory_working_set_bytes", c.memory_working_set_bytes),
        ("memory_rss_bytes", c.memory_rss_bytes),
        ("memory_cache_bytes", c.memory_cache_bytes),
        ("memory_limit_bytes", c.memory_limit_bytes),
        ("oom_kills", c.oom_kills),
        ("pids_current", c.pids_current),
        ("pids_limit", c.pids_limit),
        ("io_read_bytes", c.io_read_bytes),
        ("io_write_bytes", c.io_write_bytes),
        ("io_read_ops", c.io_read_ops),
        ("io_write_ops", c.io_write_ops),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            m.insert(k.into(), json!(v));
        }
    }
    m
}

/// Prints rows as columns, each as wide as its widest cell (left-aligned
/// first column, the numbers right-aligned).
fn print_table(rows: &[Vec<String>]) {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            if i == 0 {
                out.push_str(&format!("{cell:<w$}", w = widths[i]));
            } else {
                out.push_str(&format!("  {cell:>w$}", w = widths[i]));
            }
        }
        out.push('\n');
    }
    print!("{out}");
}

/// `aer cell stats`
pub async fn stats(client: &Client, a: StatsArgs, json_out: bool) -> Result<u8, Failure> {
    let r = fetch(client, &a).await?;
    if json_out {
        let cells: Vec<Value> = r.cells.iter().map(|c| Value::Object(to_json(c))).collect();
        let v = json!({ "timestamp": r.timestamp, "cgroup_v2": r.cgroup_v2, "cells": cells });
        println!("{v}");
        return Ok(0);
    }
    let mut rows = vec![[
        "CELL",
        "CPU",
        "USER",
        "SYSTEM",
        "THROTTLED",
        "MEMORY",
        "WORKSET",
        "RSS",
        "CACHE",
        "LIMIT",
        "OOM",
        "PIDS",
        "PIDMAX",
        "IO-READ",
        "IO-WRITE",
    ]
    .map(String::from)
    .to_vec()];
    for c in &r.cells {
        let throttled = match (c.cpu_throttled_periods, c.cpu_periods) {
            (Some(t), Some(p)) => format!("{t}/{p}"),
            _ => "-".into(),
        };
        rows.push(vec![
            c.cell_name.clone(),
            secs(c.cpu_usage_ns),
            secs(c.cpu_user_ns),
            secs(c.cpu_system_ns),
            throttled,
            bytes(c.memory_usage_bytes),
            bytes(c.memory_working_set_bytes),
            bytes(c.memory_rss_bytes),
            bytes(c.memory_cache_bytes),
            bytes(c.memory_limit_bytes),
            num(c.oom_kills),
            num(c.pids_current),
            num(c.pids_limit),
            bytes(c.io_read_bytes),
            bytes(c.io_write_bytes),
        ]);
    }
    print_table(&rows);
    if r.cells.is_empty() {
        println!("(no cells)");
    }
    Ok(0)
}

/// A rate per second between two readings of a counter.
fn rate(now: Option<u64>, before: Option<u64>, secs: f64) -> Option<f64> {
    let (n, b) = (now?, before?);
    (secs > 0.0 && n >= b).then(|| (n - b) as f64 / secs)
}

/// `aer top`: every `interval`, the cells sorted by CPU use (systemd-cgtop's
/// columns). On a terminal the screen is redrawn; otherwise (or with
/// --json) each refresh is printed after the previous one.
pub async fn top(client: &Client, a: TopArgs, json_out: bool) -> Result<u8, Failure> {
    if !(a.interval.is_finite() && a.interval > 0.0) {
        return Err(Failure::new("--interval must be a positive number of seconds").with_code(2));
    }
    let interval = Duration::from_secs_f64(a.interval);
    let redraw = !json_out && std::io::stdout().is_terminal();
    let mut before = fetch(client, &a.which).await?;
    let mut n = 0u64;
    while a.iterations.is_none_or(|max| n < max) {
        tokio::time::sleep(interval).await;
        let now = fetch(client, &a.which).await?;
        let dt = (now.timestamp - before.timestamp) as f64 / 1e9;
        let prev: HashMap<&str, &CellStats> = before
            .cells
            .iter()
            .map(|c| (c.cell_name.as_str(), c))
            .collect();
        let mut lines: Vec<(f64, &CellStats, [Option<f64>; 3])> = now
            .cells
            .iter()
            .map(|c| {
                let p = prev.get(c.cell_name.as_str());
                // CPU ns per second → percent of one CPU, as top shows it.
                let cpu = rate(c.cpu_usage_ns, p.and_then(|p| p.cpu_usage_ns), dt).map(|r| r / 1e7);
                let rd = rate(c.io_read_bytes, p.and_then(|p| p.io_read_bytes), dt);
                let wr = rate(c.io_write_bytes, p.and_then(|p| p.io_write_bytes), dt);
                (cpu.unwrap_or(-1.0), c, [cpu, rd, wr])
            })
            .collect();
        lines.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cell_name.cmp(&y.1.cell_name)));
        if json_out {
            let cells: Vec<Value> = lines
                .iter()
                .map(|(_, c, [cpu, rd, wr])| {
                    let mut m = to_json(c);
                    for (k, v) in [
                        ("cpu_percent", cpu),
                        ("io_read_bytes_per_sec", rd),
                        ("io_write_bytes_per_sec", wr),
                    ] {
                        if let Some(v) = v {
                            m.insert(k.into(), json!(v));
                        }
                    }
                    Value::Object(m)
                })
                .collect();
            println!("{}", json!({ "timestamp": now.timestamp, "cells": cells }));
        } else {
            if redraw {
                // Home and clear, as top does.
                print!("\x1b[H\x1b[2J");
            } else if n > 0 {
                println!();
            }
            let mut rows = vec![["CELL", "TASKS", "%CPU", "MEMORY", "INPUT/s", "OUTPUT/s"]
                .map(String::from)
                .to_vec()];
            for (_, c, [cpu, rd, wr]) in &lines {
                rows.push(vec![
                    c.cell_name.clone(),
                    num(c.pids_current),
                    cpu.map_or("-".into(), |v| format!("{v:.1}")),
                    bytes(c.memory_usage_bytes),
                    bytes(rd.map(|v| v as u64)),
                    bytes(wr.map(|v| v as u64)),
                ]);
            }
            print_table(&rows);
            if lines.is_empty() {
                println!("(no cells)");
            }
        }
        before = now;
        n += 1;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(bytes(None), "-");
        assert_eq!(bytes(Some(512)), "512B");
        assert_eq!(bytes(Some(64 << 20)), "64.0M");
        assert_eq!(secs(Some(1_500_000_000)), "1.50s");
        assert_eq!(rate(Some(3_000), Some(1_000), 2.0), Some(1000.0));
        assert_eq!(rate(Some(1), None, 2.0), None);
        assert_eq!(
            rate(Some(1), Some(2), 2.0),
            None,
            "a counter that went back"
        );
        let c = CellStats {
            cell_name: "a".into(),
            memory_usage_bytes: Some(7),
            ..CellStats::default()
        };
        let j = to_json(&c);
        assert_eq!(j.get("memory_usage_bytes"), Some(&json!(7)));
        assert!(!j.contains_key("cpu_usage_ns"), "absent stays absent");
    }
}
