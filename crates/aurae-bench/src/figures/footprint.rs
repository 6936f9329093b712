//! Figure 6: footprint and scale, on fresh daemons of their own: start-up
//! time to the first answered Discover, idle memory, memory with N isolated
//! cells each running `sleep` (the daemon, the cells' namespace holders,
//! the executables' shims), per-cell overhead, List latency at N cells,
//! then a restart with the N cells live (SIGKILL, a new daemon on the same
//! directories and cgroup root re-adopts them) and Free of the re-adopted
//! cells.
//!
//! Memory is PSS from /proc/PID/smaps_rollup (shared pages split among the
//! processes sharing them, so holders and shims, which each run one binary,
//! are not counted N times); RSS is shown beside it.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aurae_client::{
    proto::cells::{CellGraphNode, CellServiceListRequest},
    Client,
};
use futures_util::future::join_all;

use super::{Ctx, Series};
use crate::{
    cells::{self, ms},
    daemon::Daemon,
    procfs,
    report::{Better, Figure, Kind, Row},
};

/// Concurrent Allocate/Free calls while building up and tearing down.
const WORKERS: usize = 4;
const HOLDER_ARG: &str = "__aurae_cell_holder__";
/// argv[1] of a shim when `aurae-shim` is missing (auraed re-executed).
const SHIM_ARG: &str = "__aurae_shim__";
/// How long the restarted daemon may take to show every cell re-adopted.
const READOPT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long holders, shims and workloads may take to be gone after Free
/// and the daemon's SIGTERM.
const GONE_TIMEOUT: Duration = Duration::from_secs(10);

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Sum of (PSS, RSS) in KiB and count of `pids`.
fn sum_mem(pids: &[i32]) -> (u64, u64, usize) {
    pids.iter().fold((0, 0, 0), |(p, r, n), &pid| {
        (
            p + procfs::pss_kib(pid).unwrap_or(0),
            r + procfs::rss_kib(pid).unwrap_or(0),
            n + 1,
        )
    })
}

/// Runs `f(i)` for i in 0..n on WORKERS concurrent workers; stops at the
/// first error and returns how many succeeded with it.
async fn for_each<F, Fut>(n: usize, f: F) -> (usize, Option<anyhow::Error>)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let err: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let counts = join_all((0..WORKERS).map(|w| {
        let (f, err) = (&f, &err);
        async move {
            let mut ok = 0;
            for i in (w..n).step_by(WORKERS) {
                if err.lock().map(|e| e.is_some()).unwrap_or(true) {
                    break;
                }
                match f(i).await {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        if let Ok(mut g) = err.lock() {
                            g.get_or_insert(e);
                        }
                        break;
                    }
                }
            }
            ok
        }
    }))
    .await;
    let e = err.into_inner().ok().flatten();
    (counts.into_iter().sum(), e)
}

/// One List: cell name → pids of its executables in state "running"
/// (cells nested in others included).
async fn running_executables(client: &Client) -> anyhow::Result<BTreeMap<String, Vec<i32>>> {
    fn walk(nodes: &[CellGraphNode], out: &mut BTreeMap<String, Vec<i32>>) {
        for n in nodes {
            let name = n.cell.as_ref().map(|c| c.name.clone()).unwrap_or_default();
            let pids = n
                .executables
                .iter()
                .filter(|e| e.state == "running")
                .map(|e| e.pid)
                .collect();
            out.insert(name, pids);
            walk(&n.children, out);
        }
    }
    let r = client.cells().list(CellServiceListRequest {}).await?;
    let mut out = BTreeMap::new();
    walk(&r.into_inner().cells, &mut out);
    Ok(out)
}

/// Adds `note` to row `id` of `f` (a note on a row of ours marks the run
/// as failed), or to the figure when there is no such row.
fn flag(f: &mut Figure, id: &str, note: String) {
    match f.rows.iter_mut().find(|r| r.id == id) {
        Some(r) => {
            r.note = Some(match r.note.take() {
                Some(n) => format!("{n}; {note}"),
                None => note,
            });
        }
        None => {
            f.note(note);
        }
    }
}

/// Is `pid` a shim (`aurae-shim`, or auraed re-executed as one)?
fn is_shim(pid: i32) -> bool {
    procfs::comm(pid) == "aurae-shim" || procfs::cmdline(pid).contains(SHIM_ARG)
}

/// Polls List on `client` until it shows the `want` cells, each with its
/// executable running; the time from `t0`, or what the last List showed.
async fn wait_readopted(
    client: &Client,
    want: &BTreeMap<String, i32>,
    t0: Instant,
) -> Result<(f64, BTreeMap<String, Vec<i32>>), String> {
    let deadline = Instant::now() + READOPT_TIMEOUT;
    loop {
        let last = match running_executables(client).await {
            Ok(got) => {
                let t = ms(t0.elapsed());
                let missing = want
                    .keys()
                    .filter(|c| got.get(*c).is_none_or(|p| p.is_empty()))
                    .count();
                if missing == 0 {
                    return Ok((t, got));
                }
                format!(
                    "the last List showed {} cells, {missing} of the {} expected without a running executable",
                    got.len(),
                    want.len()
                )
            }
            Err(e) => format!("the last List failed: {e:#}"),
        };
        if Instant::now() > deadline {
            return Err(format!("not re-adopted within {READOPT_TIMEOUT:?}: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Of the processes in `procs` ((pid, start time)), those still running
/// (same pid, same start time) after up to GONE_TIMEOUT.
async fn still_running(procs: &[(i32, u64)]) -> Vec<i32> {
    let deadline = Instant::now() + GONE_TIMEOUT;
    loop {
        let left: Vec<i32> = procs
            .iter()
            .filter(|&&(p, t)| procfs::live_start_time(p) == Some(t))
            .map(|&(p, _)| p)
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn figure(ctx: &Ctx) -> anyhow::Result<Figure> {
    let mut f = Figure::new(
        "6",
        &format!(
            "footprint and scale: {} isolated cells each running `sleep`",
            ctx.settings.cells
        ),
        Better::Lower,
    );
    // Start-up: fresh daemons reusing the PKI; the last one stays up.
    let mut startup = Series::default();
    let mut kept: Option<(Daemon, Client)> = None;
    for k in 0..ctx.settings.startups.max(1) {
        let mut d = Daemon::spawn(&ctx.auraed, &ctx.work, &ctx.pki)?;
        let t0 = Instant::now();
        let c = d.wait_ready().await?;
        startup.samples.push(ms(t0.elapsed()));
        if k + 1 == ctx.settings.startups.max(1) {
            kept = Some((d, c));
        }
    }
    f.row(startup.row(
        "startup",
        "auraed start-up → first answered Discover",
        Kind::Ours,
        "ms",
    ))
    .row(Row::measured(
        "startup_first",
        "  first start (generates the throwaway PKI)",
        Kind::Ours,
        "ms",
        &[ctx.first_start_ms],
    ));
    let (mut d, client) = kept.context("no daemon")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = d.pid();
    let idle_pss = procfs::pss_kib(pid).context("no smaps_rollup for auraed")?;
    let idle_rss = procfs::rss_kib(pid).unwrap_or(0);
    f.row(Row::measured(
        "idle_pss",
        "daemon idle, PSS",
        Kind::Ours,
        "MiB",
        &[mib(idle_pss)],
    ))
    .row(Row::measured(
        "idle_rss",
        "daemon idle, RSS",
        Kind::Ours,
        "MiB",
        &[mib(idle_rss)],
    ));

    let n = ctx.settings.cells;
    let t0 = Instant::now();
    let (made, err) = for_each(n, |i| {
        let client = &client;
        async move {
            let cell = format!("f{i}");
            cells::allocate(client, &cell).await?;
            cells::start(client, &cell, "z", "exec sleep 100000").await?;
            Ok(())
        }
    })
    .await;
    let build = t0.elapsed();
    f.row(Row::measured(
        "allocate_start",
        "Allocate + Start sleep, per cell (4 concurrent)",
        Kind::Ours,
        "ms",
        &[ms(build) / made.max(1) as f64],
    ));
    if let Some(e) = &err {
        flag(
            &mut f,
            "allocate_start",
            format!("only {made} of {n} cells could be made: {e:#}"),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dpss = procfs::pss_kib(pid).unwrap_or(0);
    let drss = procfs::rss_kib(pid).unwrap_or(0);
    let holders: Vec<i32> = procfs::descendants(pid)
        .into_iter()
        .filter(|&p| procfs::cmdline(p).contains(HOLDER_ARG))
        .collect();
    // The workloads are the cells' executables as List reports them (a
    // `sleep`: `exec` replaced the `sh -c`); the shim of each is its
    // parent.
    let execs = running_executables(&client)
        .await
        .context("List with the cells up")?;
    let before: BTreeMap<String, i32> = execs
        .iter()
        .filter_map(|(c, p)| Some((c.clone(), *p.first()?)))
        .collect();
    let workloads: Vec<i32> = before.values().copied().collect();
    let mut shims: Vec<i32> = workloads.iter().filter_map(|&p| procfs::ppid(p)).collect();
    shims.sort_unstable();
    shims.dedup();
    let not_shims = shims.iter().filter(|&&p| !is_shim(p)).count();
    let mut shim_trouble = Vec::new();
    if workloads.len() != made {
        shim_trouble.push(format!(
            "List showed {} cells with a running executable, {made} expected",
            workloads.len()
        ));
    }
    if not_shims > 0 || shims.len() != workloads.len() {
        shim_trouble.push(format!(
            "{} executables have {} distinct parents, {not_shims} of them not aurae-shim",
            workloads.len(),
            shims.len()
        ));
    }
    let (hpss, hrss, hn) = sum_mem(&holders);
    let (spss, srss, sn) = sum_mem(&shims);
    let (wpss, _, wn) = sum_mem(&workloads);
    let label = |s: &str| format!("{s}, {made} cells");
    f.row(Row::measured(
        "cells_daemon_pss",
        &label("daemon PSS"),
        Kind::Ours,
        "MiB",
        &[mib(dpss)],
    ))
    .row(Row::measured(
        "cells_daemon_rss",
        &label("daemon RSS"),
        Kind::Ours,
        "MiB",
        &[mib(drss)],
    ))
    .row(Row::measured(
        "cells_holders_pss",
        &format!("{hn} holder processes, PSS total"),
        Kind::Ours,
        "MiB",
        &[mib(hpss)],
    ))
    .row(Row::measured(
        "cells_holders_rss",
        &format!("{hn} holder processes, RSS total"),
        Kind::Ours,
        "MiB",
        &[mib(hrss)],
    ))
    .row(Row::measured(
        "cells_shims_pss",
        &format!("{sn} shim processes, PSS total"),
        Kind::Ours,
        "MiB",
        &[mib(spss)],
    ))
    .row(Row::measured(
        "cells_shims_rss",
        &format!("{sn} shim processes, RSS total"),
        Kind::Ours,
        "MiB",
        &[mib(srss)],
    ))
    .row(Row::measured(
        "shim_pss",
        "  per executable: its shim, PSS",
        Kind::Ours,
        "KiB",
        &[spss as f64 / sn.max(1) as f64],
    ))
    .row(Row::measured(
        "per_cell",
        "per cell: (daemon PSS growth + holders + shims PSS) / cells",
        Kind::Ours,
        "KiB",
        &[(dpss.saturating_sub(idle_pss) + hpss + spss) as f64 / made.max(1) as f64],
    ))
    .row(Row::measured(
        "workloads_pss",
        &format!("the workloads themselves ({wn} processes), PSS total"),
        Kind::Ours,
        "MiB",
        &[mib(wpss)],
    ));
    for t in shim_trouble {
        flag(&mut f, "cells_shims_pss", t);
    }

    let mut list = Series::default();
    for _ in 0..ctx.settings.runs.clamp(5, 30) {
        list.sample(|| async {
            let t = Instant::now();
            let r = client.cells().list(CellServiceListRequest {}).await?;
            let d = ms(t.elapsed());
            let got = r.into_inner().cells.len();
            anyhow::ensure!(got == made, "List returned {got} cells, expected {made}");
            Ok(d)
        })
        .await;
    }
    f.row(list.row("list", &label("List latency"), Kind::Ours, "ms"));

    // What must be gone once the cells are freed and the daemon stopped.
    let procs: Vec<(i32, u64)> = holders
        .iter()
        .chain(&shims)
        .chain(&workloads)
        .filter_map(|&p| Some((p, procfs::live_start_time(p)?)))
        .collect();

    // Restart with every cell live: SIGKILL, a new daemon on the same
    // directories and cgroup root.
    drop(client);
    let restarted = d.restart().await;
    let rlabel = |s: &str| format!("restart with {made} live cells: {s}");
    let client = match restarted {
        Ok((client, t0, ready)) => {
            f.row(Row::measured(
                "restart_discover",
                &rlabel("spawn → first Discover"),
                Kind::Ours,
                "ms",
                &[ms(ready)],
            ));
            match wait_readopted(&client, &before, t0).await {
                Ok((t, after)) => {
                    f.row(Row::measured(
                        "restart_list",
                        &rlabel("spawn → List shows all"),
                        Kind::Ours,
                        "ms",
                        &[t],
                    ));
                    let moved = before
                        .iter()
                        .filter(|(c, p)| after.get(*c).is_none_or(|a| !a.contains(p)))
                        .count();
                    if moved > 0 {
                        flag(
                            &mut f,
                            "restart_list",
                            format!("{moved} cells show another executable pid than before"),
                        );
                    }
                }
                Err(why) => {
                    f.row(Row::unavailable(
                        "restart_list",
                        &rlabel("spawn → List shows all"),
                        Kind::Ours,
                        "ms",
                        &why,
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let rpss = procfs::pss_kib(d.pid()).unwrap_or(0);
            f.row(Row::measured(
                "restart_daemon_pss",
                &format!("daemon PSS after re-adopting {made} cells"),
                Kind::Ours,
                "MiB",
                &[mib(rpss)],
            ));
            Some(client)
        }
        Err(e) => {
            f.row(Row::unavailable(
                "restart_discover",
                &rlabel("spawn → first Discover"),
                Kind::Ours,
                "ms",
                &format!("{e:#}"),
            ));
            None
        }
    };

    if let Some(client) = &client {
        let t0 = Instant::now();
        let (freed, ferr) = for_each(made, |i| async move {
            cells::free(client, &format!("f{i}")).await
        })
        .await;
        f.row(Row::measured(
            "free",
            "Free after restart (stops sleep+shim, kills holder), per cell",
            Kind::Ours,
            "ms",
            &[ms(t0.elapsed()) / freed.max(1) as f64],
        ));
        if let Some(e) = ferr {
            flag(
                &mut f,
                "free",
                format!("Free failed after {freed} cells: {e:#}"),
            );
        }
    }
    drop(client);
    if let Some(left) = d.stop() {
        flag(&mut f, "free", format!("stopping the daemon: {left}"));
    }
    let left = still_running(&procs).await;
    if !left.is_empty() {
        let what = format!(
            "{} of the {} holders, shims and workloads still ran after Free and the daemon's exit (killed now): {:?}",
            left.len(),
            procs.len(),
            &left[..left.len().min(10)]
        );
        flag(&mut f, "free", what);
        for &p in &left {
            crate::daemon::signal(p, libc::SIGKILL);
        }
    }
    f.note("memory: PSS from /proc/PID/smaps_rollup, RSS from /proc/PID/status; holders are the cells' namespace holders (aurae-holder), shims the executables' supervisors (aurae-shim, each the parent of its executable), measured before the restart");
    f.note(format!("restart: auraed SIGKILLed with the {made} cells live; times from spawning the new daemon (same --runtime-dir and --cgroup-root) to its first answered Discover, and to the first List showing every cell with its executable running (re-adopted, same pids); Free is of the re-adopted cells (4 concurrent)"));
    f.note("runc/crun keep no daemon and no holder: no baseline row");
    Ok(f.finish())
}
