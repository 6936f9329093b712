//! Figure 3: executables started and reaped per second with 1, 8 and 64
//! concurrent clients, over fixed time windows (one sample per window).

use std::{
    os::fd::AsRawFd,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aurae_client::Client;
use futures_util::future::join_all;

use super::{Ctx, Series};
use crate::{
    cells,
    floor::{self, CgroupSet},
    report::{Better, Figure, Kind},
};

pub const LEVELS: [usize; 3] = [1, 8, 64];
const CELL: &str = "tp";

/// Runs `c` async workers that start iterations until the window closes;
/// every completed iteration counts, over the time until the last one ends
/// (so a slow source is not shown as zero because nothing ended in time).
async fn window_async<F, Fut>(c: usize, window: Duration, f: F) -> anyhow::Result<f64>
where
    F: Fn(usize, u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let t0 = Instant::now();
    let deadline = t0 + window;
    let done = AtomicU64::new(0);
    let results = join_all((0..c).map(|k| {
        let (f, done) = (&f, &done);
        async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                f(k, n).await?;
                n += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }
    }))
    .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

/// The same with `c` OS threads running blocking `f`.
fn window_threads<F>(c: usize, window: Duration, f: F) -> anyhow::Result<f64>
where
    F: Fn() -> anyhow::Result<()> + Sync,
{
    let t0 = Instant::now();
    let deadline = t0 + window;
    let done = AtomicU64::new(0);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..c)
            .map(|_| {
                s.spawn(|| {
                    while Instant::now() < deadline {
                        f()?;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("worker thread panicked"))??;
        }
        anyhow::Ok(())
    })?;
    Ok(done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

pub async fn figures(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let max = LEVELS.iter().copied().max().unwrap_or(1);
    let mut clients: Vec<Client> = Vec::with_capacity(max);
    for _ in 0..max {
        // One connection per client, as separate users would have.
        clients.push(Client::connect(&ctx.client_config).await?);
    }
    cells::allocate(&ctx.client, CELL).await?;
    let out = measure(ctx, &clients).await;
    let freed = cells::free(&ctx.client, CELL).await;
    let out = out?;
    freed?;
    Ok(out)
}

async fn measure(ctx: &Ctx, clients: &[Client]) -> anyhow::Result<Vec<Figure>> {
    let window = Duration::from_secs_f64(ctx.settings.throughput_window_secs);
    let cg = CgroupSet::create(&format!("{}/tp", ctx.floor_rel))?;
    let procs = cg.procs()?;
    let fds: Vec<i32> = procs.iter().map(AsRawFd::as_raw_fd).collect();
    let max = LEVELS.iter().copied().max().unwrap_or(1);
    let mut bundles: Vec<Vec<std::path::PathBuf>> = Vec::new();
    for rt in &ctx.runtimes {
        let mut v = Vec::new();
        if let Ok(o) = &rt.oci {
            for k in 0..max {
                v.push(o.bundle(&format!("tp{k}"), &["/bin/true"])?);
            }
        }
        bundles.push(v);
    }
    let mut figs = Vec::new();
    for (li, &c) in LEVELS.iter().enumerate() {
        let (mut ours, mut plain, mut iso) =
            (Series::default(), Series::default(), Series::default());
        let mut oci = ctx.oci_series();
        for _ in 0..ctx.settings.throughput_windows {
            ours.sample(|| {
                window_async(c, window, |k, n| async move {
                    let exe = format!("l{li}k{k}n{n}");
                    cells::run_true(&clients[k], &ctx.exit, CELL, &exe).await?;
                    Ok(())
                })
            })
            .await;
            plain
                .sample(|| async {
                    tokio::task::block_in_place(|| window_threads(c, window, floor::spawn_plain))
                })
                .await;
            iso.sample(|| async {
                tokio::task::block_in_place(|| {
                    window_threads(c, window, || floor::spawn_isolated(&fds))
                })
            })
            .await;
            for ((rt, b), s) in ctx.runtimes.iter().zip(&bundles).zip(oci.iter_mut()) {
                if let Ok(o) = &rt.oci {
                    s.sample(|| {
                        window_async(c, window, |k, _| async move {
                            o.run_once(b.get(k).context("no bundle")?).await
                        })
                    })
                    .await;
                }
            }
        }
        let mut f = Figure::new(
            &format!("3{}", ['a', 'b', 'c'].get(li).copied().unwrap_or('x')),
            &format!(
                "throughput, {c} concurrent client{}: /bin/true started and reaped per second",
                if c == 1 { "" } else { "s" }
            ),
            Better::Higher,
        );
        f.row(ours.row(
            "auraed",
            "auraed: Start → exit observed → Stop, one isolated cell",
            Kind::Ours,
            "1/s",
        ))
        .row(plain.row(
            "floor_spawn",
            "floor: posix_spawn+wait, one thread per client",
            Kind::Floor,
            "1/s",
        ))
        .row(iso.row(
            "floor_isolated",
            "floor: isolated spawn+wait, one cgroup, thread/client",
            Kind::Floor,
            "1/s",
        ));
        for (rt, s) in ctx.runtimes.iter().zip(oci) {
            f.row(s.row(
                &rt.name,
                &format!("{}: `run` per executable", rt.label()),
                Kind::Baseline,
                "1/s",
            ));
        }
        f.note(format!(
            "one sample = iterations started within a {:.1} s window ÷ time until all ended; {} connections to auraed",
            window.as_secs_f64(),
            c
        ));
        figs.push(f.finish());
    }
    drop(procs);
    cg.remove()?;
    Ok(figs)
}
