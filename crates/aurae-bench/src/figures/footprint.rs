//! Figure 6: footprint and scale, on fresh daemons of their own: start-up
//! time to the first answered Discover, idle memory, memory with N isolated
//! cells each running `sleep`, per-cell overhead, List latency at N cells.
//!
//! Memory is PSS from /proc/PID/smaps_rollup (shared pages split among the
//! processes sharing them, so holder processes, which all run the same
//! binary, are not counted N times); RSS is shown beside it.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aurae_client::{proto::cells::CellServiceListRequest, Client};
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
    if let Some(e) = &err {
        f.note(format!("only {made} of {n} cells could be made: {e:#}"));
    }
    f.row(Row::measured(
        "allocate_start",
        "Allocate + Start sleep, per cell (4 concurrent)",
        Kind::Ours,
        "ms",
        &[ms(build) / made.max(1) as f64],
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dpss = procfs::pss_kib(pid).unwrap_or(0);
    let drss = procfs::rss_kib(pid).unwrap_or(0);
    let kids = procfs::descendants(pid);
    let (holders, others): (Vec<i32>, Vec<i32>) = kids
        .into_iter()
        .partition(|&p| procfs::cmdline(p).contains(HOLDER_ARG));
    let (hpss, hrss, hn) = sum_mem(&holders);
    let (wpss, _, wn) = sum_mem(&others);
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
        "per_cell",
        "per-cell overhead: (daemon PSS growth + holders PSS) / cells",
        Kind::Ours,
        "KiB",
        &[(dpss.saturating_sub(idle_pss) + hpss) as f64 / made.max(1) as f64],
    ))
    .row(Row::measured(
        "workloads_pss",
        &format!("the workloads themselves ({wn} processes), PSS total"),
        Kind::Ours,
        "MiB",
        &[mib(wpss)],
    ));

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

    let t0 = Instant::now();
    let (freed, ferr) = for_each(made, |i| {
        let client = &client;
        async move { cells::free(client, &format!("f{i}")).await }
    })
    .await;
    f.row(Row::measured(
        "free",
        "Free (stops sleep, kills holder), per cell (4 concurrent)",
        Kind::Ours,
        "ms",
        &[ms(t0.elapsed()) / freed.max(1) as f64],
    ));
    if let Some(e) = ferr {
        f.note(format!("Free failed after {freed} cells: {e:#}"));
    }
    d.stop();
    f.note("memory: PSS from /proc/PID/smaps_rollup, RSS from /proc/PID/status; holders are the cells' namespace holders (aurae-holder, or auraed re-executed when that binary is missing)");
    f.note("runc/crun keep no daemon and no holder: no baseline row");
    Ok(f.finish())
}
