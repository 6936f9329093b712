//! Figure 5: signal latency. `kill(pid, SIGTERM)` of a process in a cell →
//! the event on the cell's GetPosixSignalsStream. Floor: the same kill of a
//! child of the benchmark → its pidfd becomes readable (delivery and exit).

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use aurae_client::proto::observe::{GetPosixSignalsStreamRequest, Workload, WorkloadType};

use super::{Ctx, Series};
use crate::{
    cells::{self, ms},
    daemon::signal,
    procfs,
    report::{Better, Figure, Kind},
};

const CELL: &str = "sig";
const EVENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Lets a fresh `sleep` reach its pause before it is signalled.
const SETTLE: Duration = Duration::from_millis(20);

async fn ours(ctx: &Ctx, runs: usize, s: &mut Series) -> anyhow::Result<()> {
    cells::allocate(&ctx.client, CELL).await?;
    let r = async {
        let mut stream = ctx
            .client
            .observe()
            .get_posix_signals_stream(GetPosixSignalsStreamRequest {
                workload: Some(Workload {
                    workload_type: WorkloadType::Cell as i32,
                    id: CELL.into(),
                }),
            })
            .await
            .context("GetPosixSignalsStream")?
            .into_inner();
        for i in 0..runs {
            let exe = format!("s{i}");
            let pid = cells::start(&ctx.client, CELL, &exe, "exec sleep 100000").await?;
            tokio::time::sleep(SETTLE).await;
            s.sample(|| async {
                let t0 = Instant::now();
                signal(pid, libc::SIGTERM);
                loop {
                    let m = tokio::time::timeout(EVENT_TIMEOUT, stream.message())
                        .await
                        .map_err(|_| anyhow::anyhow!("no signal event within {EVENT_TIMEOUT:?}"))?
                        .context("GetPosixSignalsStream")?;
                    match m.and_then(|m| m.signal) {
                        Some(sg) if sg.process_id == pid && sg.signal == libc::SIGTERM => {
                            return Ok(ms(t0.elapsed()))
                        }
                        Some(_) => continue,
                        None => bail!("the signal stream ended"),
                    }
                }
            })
            .await;
            cells::stop(&ctx.client, CELL, &exe).await?;
        }
        anyhow::Ok(())
    }
    .await;
    let freed = cells::free(&ctx.client, CELL).await;
    r?;
    freed
}

async fn floor_sample() -> anyhow::Result<f64> {
    let mut child = tokio::process::Command::new("/bin/sleep")
        .arg("100000")
        .spawn()
        .context("spawn sleep")?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .context("no pid")?;
    tokio::time::sleep(SETTLE).await;
    let t0 = Instant::now();
    signal(pid, libc::SIGTERM);
    procfs::wait_pid_exit(pid).await.context("pidfd")?;
    let d = ms(t0.elapsed());
    child.wait().await.context("wait sleep")?;
    Ok(d)
}

pub async fn figure(ctx: &Ctx) -> Figure {
    let runs = ctx.settings.runs.min(50);
    let mut s = Series::default();
    match &ctx.observe {
        Ok(()) => {
            if let Err(e) = ours(ctx, runs, &mut s).await {
                s.err.get_or_insert(format!("{e:#}"));
            }
        }
        Err(why) => s = Series::failed(format!("GetPosixSignalsStream: {why}")),
    }
    let mut fl = Series::default();
    for _ in 0..runs {
        fl.sample(floor_sample).await;
    }
    let mut f = Figure::new(
        "5",
        "signal latency: kill(SIGTERM) of a process in a cell → event on the cell's signal stream",
        Better::Lower,
    );
    f.row(s.row(
        "auraed",
        "auraed: GetPosixSignalsStream(cell)",
        Kind::Ours,
        "ms",
    ))
    .row(fl.row(
        "floor_pidfd",
        "floor: kill → pidfd of the killed child readable",
        Kind::Floor,
        "ms",
    ));
    for rt in &ctx.runtimes {
        f.row(crate::report::Row::unavailable(
            &rt.name,
            &rt.label(),
            Kind::Baseline,
            "ms",
            "OCI runtimes have no signal event stream",
        ));
    }
    f.finish()
}
