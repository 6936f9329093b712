//! Figure 7 (`--v2-guest`): cold and warm isolated start on a cgroup v2
//! kernel, in a VM guest under QEMU (TCG: slow, so only ratios count),
//! beside the floor measured inside that guest in the same run.
//!
//! The benchmark's daemon boots the guest (VmService, the image that
//! `scripts/guest-image` builds, which carries `/sbin/aurae-bench` next to
//! the guest's auraed); the guest's auraed (PID 1, cgroup v2, clone3 into
//! the cell's cgroup) is driven from here over its forwarded TCP port with
//! mTLS. The floor runs in the guest, as an executable of the guest's own
//! context: `aurae-bench --floor-inner N` (see [`inner`]) prints one line
//! per sample. Blocks of floor and of auraed samples alternate, so that
//! the guest's noise hits both. The round trip of a no-op RPC (Discover)
//! through the forwarded port is a row of its own: it is in every auraed
//! sample (4 RPCs per cold start, 1 per warm start) but not in the floor.

use std::{path::PathBuf, time::Instant};

use anyhow::Context as _;
use aurae_client::{
    proto::{
        cells::{CellServiceStartRequest, Executable},
        discovery::DiscoverRequest,
        observe::{GetSubProcessStreamRequest, LogChannelType},
        vms::{
            RootDrive, VirtualMachine, VmServiceCreateRequest, VmServiceStartRequest,
            VmServiceStopRequest,
        },
    },
    Client,
};

use super::Series;
use crate::{
    cells::{self, ms, ExitMode},
    daemon::Daemon,
    floor,
    report::{Better, Figure, Kind},
};

/// The guest image's paths (from `$AURAE_CACHE_DIR/guest.env`).
struct Image {
    qemu: String,
    kernel: String,
    initrd: String,
}

fn image() -> anyhow::Result<Image> {
    let cache = std::env::var("AURAE_CACHE_DIR").unwrap_or_else(|_| "/var/cache/aurae-dev".into());
    let env = PathBuf::from(cache).join("guest.env");
    let text = std::fs::read_to_string(&env)
        .with_context(|| format!("{} (run scripts/guest-image)", env.display()))?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('=').map(str::to_owned))
            .with_context(|| format!("{k} missing in {}", env.display()))
    };
    Ok(Image {
        qemu: get("AURAE_QEMU")?,
        kernel: get("AURAE_GUEST_KERNEL")?,
        initrd: get("AURAE_GUEST_INITRD")?,
    })
}

/// What the host daemon needs to boot guests.
pub fn daemon_args() -> anyhow::Result<Vec<String>> {
    let img = image()?;
    Ok(vec![
        "--qemu".into(),
        img.qemu,
        "--vm-accel".into(),
        "tcg".into(),
    ])
}

/// Boots the guest, measures, stops it.
pub async fn figures(
    host: &Daemon,
    runs: usize,
    favordynmods: bool,
    clone3: bool,
) -> anyhow::Result<Vec<Figure>> {
    let img = image()?;
    let mut vms = host.client().await?.vms();
    let id = format!("bench-{}", std::process::id());
    vms.create(VmServiceCreateRequest {
        machine: Some(VirtualMachine {
            id: id.clone(),
            mem_size_mb: 512,
            vcpu_count: 1,
            kernel_img_path: img.kernel,
            // The kernel passes `k=v` words it does not know to init's
            // environment: the guest's auraed (and its shims) see it.
            kernel_args: if clone3 {
                vec!["quiet".into()]
            } else {
                vec!["quiet".into(), "AURAE_CLONE_INTO_CGROUP=0".into()]
            },
            root_drive: Some(RootDrive {
                host_path: img.initrd,
                is_writeable: false,
            }),
            drive_mounts: vec![],
        }),
    })
    .await
    .context("VmService.Create")?;
    let t0 = Instant::now();
    let address = vms
        .start(VmServiceStartRequest { vm_id: id.clone() })
        .await
        .context("VmService.Start")?
        .into_inner()
        .auraed_address;
    eprintln!(
        "aurae-bench: guest booted in {:?}; its auraed at {address}",
        t0.elapsed()
    );
    let mut cfg = host.client_config()?;
    cfg.system.socket = address;
    let r = async {
        let guest = Client::connect(&cfg).await.context("connect to the guest")?;
        let mount = if favordynmods {
            // The guest is ours and thrown away after: its cgroup2 mount
            // may change.
            "mount -o remount,favordynmods /sys/fs/cgroup 2>&1; grep ' /sys/fs/cgroup ' /proc/mounts"
        } else {
            "grep ' /sys/fs/cgroup ' /proc/mounts"
        };
        let m = run_in_guest(&guest, "mount", mount).await?.join(" ");
        eprintln!("aurae-bench: guest: {m}");
        anyhow::ensure!(
            m.contains("favordynmods") == favordynmods,
            "the guest's cgroup2 mount: {m}"
        );
        let mut figs = measure(&guest, runs).await?;
        for f in &mut figs {
            f.note(format!("guest cgroup2 mount: {m}"));
            if !clone3 {
                f.note("--guest-no-clone3: the guest's auraed migrates by cgroup.procs (AURAE_CLONE_INTO_CGROUP=0)");
            }
        }
        Ok(figs)
    }
    .await;
    let _ = vms.stop(VmServiceStopRequest { vm_id: id }).await;
    r
}

async fn measure(guest: &Client, runs: usize) -> anyhow::Result<Vec<Figure>> {
    let exit = match cells::probe_observe(guest).await {
        Ok(()) => ExitMode::Stream,
        Err(why) => anyhow::bail!("the guest's ObserveService: {why}"),
    };
    let (mut cold, mut warm, mut rtt) = (Series::default(), Series::default(), Series::default());
    let (mut f_iso, mut f_spawn, mut f_spawn_only) =
        (Series::default(), Series::default(), Series::default());
    cells::allocate(guest, "warm").await?;
    const BLOCKS: usize = 4;
    let per = runs.div_ceil(BLOCKS).max(1);
    let mut i = 0;
    for _ in 0..BLOCKS {
        match run_floor(guest, per).await {
            Ok(lines) => {
                for l in lines {
                    let mut w = l.split_whitespace();
                    let (Some(k), Some(Ok(v))) = (w.next(), w.next().map(str::parse::<f64>)) else {
                        continue;
                    };
                    let s = match k {
                        "cold_iso" => &mut f_iso,
                        "spawn" => &mut f_spawn,
                        "spawn_only" => &mut f_spawn_only,
                        _ => continue,
                    };
                    s.sample(|| async { Ok(v) }).await;
                }
            }
            Err(e) => {
                let why = format!("{e:#}");
                for s in [&mut f_iso, &mut f_spawn, &mut f_spawn_only] {
                    s.sample(|| async { Err(anyhow::anyhow!(why.clone())) })
                        .await;
                }
            }
        }
        for _ in 0..per {
            i += 1;
            cold.sample(|| async {
                let cell = format!("cold-{i}");
                let t0 = Instant::now();
                cells::allocate(guest, &cell).await?;
                let r = async {
                    let pid = cells::start(guest, &cell, "t", "/bin/true").await?;
                    cells::wait_exit(guest, &exit, pid).await
                }
                .await;
                let freed = cells::free(guest, &cell).await;
                r?;
                freed?;
                Ok(ms(t0.elapsed()))
            })
            .await;
            warm.sample(|| async {
                let (p, _) = cells::run_true(guest, &exit, "warm", &format!("w{i}")).await?;
                Ok(ms(p))
            })
            .await;
            rtt.sample(|| async {
                let t0 = Instant::now();
                guest.discovery().discover(DiscoverRequest {}).await?;
                Ok(ms(t0.elapsed()))
            })
            .await;
        }
    }
    cells::free(guest, "warm").await?;
    let (rtt_a, rtt_b) = (rtt.samples.clone(), rtt);
    let rtt_a = Series {
        samples: rtt_a,
        err: rtt_b.err.clone(),
    };
    const RTT: &str = "one no-op RPC (Discover) host → guest, part of every auraed sample";
    let mut a = Figure::new(
        "7a",
        "cgroup v2 guest (QEMU TCG, 1 vCPU), cold isolated start: Allocate → Start /bin/true → exit observed → Free",
        Better::Lower,
    );
    a.row(cold.row(
        "auraed",
        "auraed (in the guest, driven from the host)",
        Kind::Ours,
        "ms",
    ))
    .row(f_iso.row(
        "floor_isolated_cold",
        "floor (in guest): mkdir cgroup+limits, pid+ipc+uts+mnt+net+cgroup ns, rmdir",
        Kind::Floor,
        "ms",
    ))
    .row(f_spawn.row(
        "floor_spawn",
        "floor (in guest): posix_spawn+wait /bin/true",
        Kind::Floor,
        "ms",
    ))
    .row(rtt_a.row("rpc_rtt", RTT, Kind::Baseline, "ms"));
    a.note("auraed is driven from the host through the guest's forwarded TCP port (mTLS): 4 RPCs and the exit stream per sample");
    a.note("the guest's auraed forks the holder (and so the shims and executables) into the cell's cgroup with clone3(CLONE_INTO_CGROUP) unless told not to; the floor joins by writing cgroup.procs, as on the host");
    let mut b = Figure::new(
        "7b",
        "cgroup v2 guest (QEMU TCG, 1 vCPU), warm start: Start /bin/true in an existing isolated cell → pid returned",
        Better::Lower,
    );
    b.row(warm.row("auraed", "auraed: Start → pid (1 RPC)", Kind::Ours, "ms"))
        .row(f_spawn_only.row(
            "floor_spawn",
            "floor (in guest): posix_spawn returns (no wait)",
            Kind::Floor,
            "ms",
        ))
        .row(rtt_b.row("rpc_rtt", RTT, Kind::Baseline, "ms"));
    Ok(vec![a.finish(), b.finish()])
}

/// `aurae-bench --floor-inner N` in the guest's own context; its lines.
async fn run_floor(guest: &Client, n: usize) -> anyhow::Result<Vec<String>> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let lines = run_in_guest(
        guest,
        &format!("floor-{k}"),
        &format!("/sbin/aurae-bench --floor-inner {n} 2>&1"),
    )
    .await?;
    if !lines.iter().any(|l| l.starts_with("cold_iso ")) {
        anyhow::bail!(
            "the in-guest floor (/sbin/aurae-bench; does the image carry it? scripts/guest-image target/release/auraed) said: {}",
            lines.join(" | ")
        );
    }
    Ok(lines)
}

/// Runs `sh -c command` in the guest's own context; its stdout lines.
async fn run_in_guest(guest: &Client, name: &str, command: &str) -> anyhow::Result<Vec<String>> {
    let name = name.to_owned();
    let pid = guest
        .cells()
        .start(CellServiceStartRequest {
            cell_name: None,
            executable: Some(Executable {
                name: name.clone(),
                command: command.to_owned(),
                description: String::new(),
            }),
            uid: None,
            gid: None,
        })
        .await
        .with_context(|| format!("start {command:?} in the guest"))?
        .into_inner()
        .pid;
    let mut s = guest
        .observe()
        .get_sub_process_stream(GetSubProcessStreamRequest {
            channel_type: LogChannelType::Stdout as i32,
            process_id: pid,
            max_lines_per_message: 0,
            line_blocks: false,
        })
        .await
        .context("output in the guest")?
        .into_inner();
    let mut lines = Vec::new();
    while let Some(r) = s.message().await.context("output in the guest")? {
        lines.push(r.item.map(|i| i.line).unwrap_or_default());
    }
    let _ = guest
        .cells()
        .stop(aurae_client::proto::cells::CellServiceStopRequest {
            cell_name: None,
            executable_name: name,
        })
        .await;
    Ok(lines)
}

/// `--floor-inner N`: N samples of each floor, interleaved, one
/// `<kind> <ms>` line per sample, on this machine (run in the guest).
pub fn inner(n: usize) -> anyhow::Result<()> {
    use std::io::Write;
    let rel = format!("aurae-bench-{}-floor", std::process::id());
    let mut out = std::io::stdout().lock();
    let r = (|| -> anyhow::Result<()> {
        for i in 0..n {
            let t0 = Instant::now();
            floor::cold_isolated(&format!("{rel}/cold-{i}"))?;
            writeln!(out, "cold_iso {}", ms(t0.elapsed()))?;
            let t0 = Instant::now();
            floor::spawn_plain()?;
            writeln!(out, "spawn {}", ms(t0.elapsed()))?;
            let t0 = Instant::now();
            let mut child = std::process::Command::new("/bin/true")
                .spawn()
                .context("spawn /bin/true")?;
            let d = ms(t0.elapsed());
            child.wait().context("wait /bin/true")?;
            writeln!(out, "spawn_only {d}")?;
        }
        Ok(())
    })();
    floor::remove_tree(&rel);
    r
}
