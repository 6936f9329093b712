//! Figures 1 and 2: cold and warm isolated start. Sources are interleaved
//! iteration by iteration so that the machine's noise hits all alike.

use std::{os::fd::AsRawFd, time::Instant};

use anyhow::Context as _;

use super::{timed_blocking, Ctx, Series};
use crate::{
    cells::{self, ms},
    floor::{self, CgroupSet},
    report::{Better, Figure, Kind},
};

const ISO_LABEL: &str = "pid+ipc+uts+mnt+net+cgroup ns";

/// Figure 1: Allocate → Start /bin/true → exit observed → Free.
pub async fn cold(ctx: &Ctx) -> Figure {
    let runs = ctx.settings.runs;
    let mut ours = Series::default();
    let mut plain = Series::default();
    let mut iso = Series::default();
    let mut oci = ctx.oci_series();
    for i in 0..runs {
        ours.sample(|| async {
            let cell = format!("cold-{i}");
            let t0 = Instant::now();
            cells::allocate(&ctx.client, &cell).await?;
            let r = async {
                let pid = cells::start(&ctx.client, &cell, "t", "/bin/true").await?;
                cells::wait_exit(&ctx.client, &ctx.exit, pid).await
            }
            .await;
            let freed = cells::free(&ctx.client, &cell).await;
            r?;
            freed?;
            Ok(ms(t0.elapsed()))
        })
        .await;
        plain.sample(|| timed_blocking(floor::spawn_plain)).await;
        let rel = format!("{}/cold-{i}", ctx.floor_rel);
        iso.sample(|| timed_blocking(move || floor::cold_isolated(&rel)))
            .await;
        for (rt, s) in ctx.runtimes.iter().zip(oci.iter_mut()) {
            if let Ok(o) = &rt.oci {
                s.sample(|| async {
                    let t0 = Instant::now();
                    o.run_once(&rt.bundle_true).await?;
                    Ok(ms(t0.elapsed()))
                })
                .await;
            }
        }
    }
    let mut f = Figure::new(
        "1",
        "cold isolated start: Allocate (isolate_process+isolate_network, cpu max, memory max) → Start /bin/true → exit observed → Free",
        Better::Lower,
    );
    f.row(ours.row("auraed", "auraed (gRPC over mTLS)", Kind::Ours, "ms"))
        .row(plain.row(
            "floor_spawn",
            "floor: posix_spawn+wait /bin/true",
            Kind::Floor,
            "ms",
        ))
        .row(iso.row(
            "floor_isolated_cold",
            &format!("floor: mkdir cgroups+limits, {ISO_LABEL}, rmdir"),
            Kind::Floor,
            "ms",
        ));
    for (rt, s) in ctx.runtimes.iter().zip(oci) {
        f.row(s.row(
            &rt.name,
            &format!("{}: `run` per iteration", rt.label()),
            Kind::Baseline,
            "ms",
        ));
    }
    f.note(ctx.exit.describe());
    f.note("floor isolated: in-process clone(CLONE_NEWPID) → write cgroup.procs (cpu, memory v1 + cgroup2) → unshare(mnt,uts,ipc,net,cgroup) → execve; no unshare(1)");
    f.finish()
}

/// Figures 2a (Start → pid returned) and 2b (Start → exit observed) in an
/// existing isolated cell.
pub async fn warm(ctx: &Ctx) -> anyhow::Result<(Figure, Figure, Figure)> {
    let runs = ctx.settings.runs;
    let cell = "warm";
    cells::allocate(&ctx.client, cell).await?;
    cells::allocate_plain(&ctx.client, "warm-plain").await?;
    let (mut plain_pid, mut plain_exit) = (Series::default(), Series::default());
    let cg = CgroupSet::create(&format!("{}/warm", ctx.floor_rel))?;
    let procs = std::sync::Arc::new(cg.procs()?);
    let mut containers: Vec<Result<String, String>> = Vec::new();
    for rt in &ctx.runtimes {
        containers.push(match &rt.oci {
            Ok(o) => match o.bundle("sleep", &["/bin/sleep", "100000"]) {
                Ok(b) => o.start_detached(&b).await.map_err(|e| format!("{e:#}")),
                Err(e) => Err(format!("{e:#}")),
            },
            Err(why) => Err(why.clone()),
        });
    }
    let (mut to_pid, mut to_exit) = (Series::default(), Series::default());
    // For scale: what one unary RPC costs on the same connection.
    let mut rpc = Series::default();
    let (mut spawn_only, mut plain, mut iso) =
        (Series::default(), Series::default(), Series::default());
    let mut oci: Vec<Series> = containers
        .iter()
        .map(|c| match c {
            Ok(_) => Series::default(),
            Err(e) => Series::failed(e.clone()),
        })
        .collect();
    for i in 0..runs {
        let mut exit_ms = None;
        to_pid
            .sample(|| async {
                let (p, e) =
                    cells::run_true(&ctx.client, &ctx.exit, cell, &format!("w{i}")).await?;
                exit_ms = Some(ms(e));
                Ok(ms(p))
            })
            .await;
        to_exit
            .sample(|| async { exit_ms.context("no sample") })
            .await;
        rpc.sample(|| async {
            let t0 = Instant::now();
            ctx.client
                .discovery()
                .discover(aurae_client::proto::discovery::DiscoverRequest {})
                .await
                .context("Discover")?;
            Ok(ms(t0.elapsed()))
        })
        .await;
        let mut plain_exit_ms = None;
        plain_pid
            .sample(|| async {
                let (p, e) =
                    cells::run_true(&ctx.client, &ctx.exit, "warm-plain", &format!("p{i}")).await?;
                plain_exit_ms = Some(ms(e));
                Ok(ms(p))
            })
            .await;
        plain_exit
            .sample(|| async { plain_exit_ms.context("no sample") })
            .await;
        spawn_only
            .sample(|| async {
                tokio::task::spawn_blocking(|| {
                    let t0 = Instant::now();
                    let mut child = std::process::Command::new("/bin/true")
                        .spawn()
                        .context("spawn /bin/true")?;
                    let d = ms(t0.elapsed());
                    child.wait().context("wait /bin/true")?;
                    Ok(d)
                })
                .await?
            })
            .await;
        plain.sample(|| timed_blocking(floor::spawn_plain)).await;
        let p = procs.clone();
        iso.sample(|| {
            timed_blocking(move || {
                let fds: Vec<i32> = p.iter().map(AsRawFd::as_raw_fd).collect();
                floor::spawn_isolated(&fds)
            })
        })
        .await;
        for ((rt, c), s) in ctx.runtimes.iter().zip(&containers).zip(oci.iter_mut()) {
            if let (Ok(o), Ok(id)) = (&rt.oci, c) {
                s.sample(|| async {
                    let t0 = Instant::now();
                    o.exec(id, &["/bin/true"]).await?;
                    Ok(ms(t0.elapsed()))
                })
                .await;
            }
        }
    }
    for (rt, c) in ctx.runtimes.iter().zip(&containers) {
        if let (Ok(o), Ok(id)) = (&rt.oci, c) {
            o.kill_delete(id).await;
        }
    }
    let freed = cells::free(&ctx.client, cell).await;
    let freed_plain = cells::free(&ctx.client, "warm-plain").await;
    drop(procs);
    cg.remove()?;
    freed?;
    freed_plain?;
    let exit_p50 = crate::stats::Stats::of(&plain_exit.samples).map_or(f64::NAN, |s| s.p50);

    let spawn_only2 = Series {
        samples: spawn_only.samples.clone(),
        err: spawn_only.err.clone(),
    };
    let mut a = Figure::new(
        "2a",
        "warm start: Start /bin/true in an existing isolated cell → pid returned",
        Better::Lower,
    );
    a.row(to_pid.row("auraed", "auraed: Start → pid", Kind::Ours, "ms"))
        .row(rpc.row(
            "auraed_rpc",
            "auraed: Discover (one unary RPC alone, for scale)",
            Kind::Ours,
            "ms",
        ))
        .row(spawn_only.row(
            "floor_spawn",
            "floor: posix_spawn returns (no wait)",
            Kind::Floor,
            "ms",
        ));
    a.note("runc/crun: no separate 'pid returned' point for exec; see 2b");
    let mut b = Figure::new(
        "2b",
        "warm start: Start /bin/true in an existing isolated cell → exit observed",
        Better::Lower,
    );
    b.row(to_exit.row("auraed", "auraed: Start → exit observed", Kind::Ours, "ms"))
        .row(plain.row(
            "floor_spawn",
            "floor: posix_spawn+wait /bin/true",
            Kind::Floor,
            "ms",
        ))
        .row(iso.row(
            "floor_isolated",
            &format!("floor: existing cgroup join, {ISO_LABEL}"),
            Kind::Floor,
            "ms",
        ));
    for (rt, s) in ctx.runtimes.iter().zip(oci) {
        b.row(s.row(
            &rt.name,
            &format!("{}: `exec` into a running container", rt.label()),
            Kind::Baseline,
            "ms",
        ));
    }
    b.note(ctx.exit.describe());
    b.note("auraed's timing also includes /bin/sh -c (every Start runs `sh -c COMMAND`)");
    let mut c = Figure::new(
        "2c",
        "warm start: Start /bin/true in an existing plain cell (host namespaces, cpu max, memory max) → pid returned",
        Better::Lower,
    );
    c.row(plain_pid.row("auraed", "auraed: Start → pid", Kind::Ours, "ms"))
        .row(spawn_only2.row(
            "floor_spawn",
            "floor: posix_spawn returns (no wait)",
            Kind::Floor,
            "ms",
        ));
    c.note(format!(
        "auraed Start → exit observed in the plain cell: p50 {exit_p50:.3} ms"
    ));
    Ok((a.finish(), b.finish(), c.finish()))
}
