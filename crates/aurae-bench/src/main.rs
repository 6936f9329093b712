//! aurae-bench: measures auraed (start latency, throughput, output
//! streaming, signal latency, footprint) beside baselines measured in the
//! same run (the kernel floor, runc, crun), through the real gRPC client
//! over mTLS against a throwaway daemon. See README "Benchmark".

mod cells;
mod daemon;
mod figures;
mod floor;
mod oci;
mod procfs;
mod report;
mod stats;

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::Context as _;
use aurae_client::proto::discovery::DiscoverRequest;
use clap::Parser;

use crate::{
    cells::ExitMode,
    daemon::Daemon,
    figures::{Ctx, Runtime},
    report::{Better, Figure, Machine, Report, Settings},
};

/// Benchmark auraed beside the kernel floor, runc and crun (needs root).
#[derive(Debug, Parser)]
#[command(name = "aurae-bench", version, about)]
struct Args {
    /// Runs per latency figure (default 100; 15 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Isolated cells for the footprint figure (default 1000; 50 with --quick).
    #[arg(long)]
    cells: Option<usize>,
    /// A ~20 s smoke run: fewer runs, cells, bytes and lines.
    #[arg(long)]
    quick: bool,
    /// Also write the figures as JSON to PATH.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// The auraed binary (default: next to this executable).
    #[arg(long, value_name = "PATH")]
    auraed: Option<PathBuf>,
    /// Throughput: seconds per window (default 1; 0.5 with --quick).
    #[arg(long)]
    window_secs: Option<f64>,
    /// Throughput: windows per row (default 3; 2 with --quick).
    #[arg(long)]
    windows: Option<usize>,
    /// Streaming: MiB written (default 1024; 64 with --quick).
    #[arg(long)]
    stream_mib: Option<u64>,
    /// Streaming: lines written (default 10000000; 1000000 with --quick).
    #[arg(long)]
    stream_lines: Option<u64>,
    /// Streaming: runs per row (default 2; 1 with --quick).
    #[arg(long)]
    stream_runs: Option<usize>,
    /// Daemon start-ups timed in the footprint figure (default 5; 2 with --quick).
    #[arg(long)]
    startups: Option<usize>,
    /// Only figure 7: cold and warm start in a cgroup v2 VM guest (QEMU
    /// TCG) beside the floor measured in that guest; needs the image of
    /// `scripts/guest-image` (see README).
    #[arg(long)]
    v2_guest: bool,
    /// With --v2-guest: remount the guest's cgroup2 with favordynmods
    /// first (the guest's only; the host's mounts are never touched).
    #[arg(long, requires = "v2_guest")]
    guest_favordynmods: bool,
    /// With --v2-guest: the guest's auraed joins cells by writing
    /// cgroup.procs instead of clone3(CLONE_INTO_CGROUP) (before/after).
    #[arg(long, requires = "v2_guest")]
    guest_no_clone3: bool,
    /// Only these figures (comma-separated numbers, e.g. `1,2`; default
    /// all): for working on one figure; a report of a subset is partial.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    figures: Vec<u32>,
    /// In the guest: print N samples of each floor, one per line.
    #[arg(long, value_name = "N", hide = true)]
    floor_inner: Option<usize>,
}

impl Args {
    fn settings(&self) -> Settings {
        let q = self.quick;
        Settings {
            quick: q,
            runs: self.runs.unwrap_or(if q { 15 } else { 100 }).max(1),
            cells: self.cells.unwrap_or(if q { 50 } else { 1000 }),
            throughput_window_secs: self.window_secs.unwrap_or(if q { 0.5 } else { 1.0 }),
            throughput_windows: self.windows.unwrap_or(if q { 2 } else { 3 }).max(1),
            stream_bytes: self.stream_mib.unwrap_or(if q { 64 } else { 1024 }) << 20,
            stream_lines: self
                .stream_lines
                .unwrap_or(if q { 1_000_000 } else { 10_000_000 }),
            stream_runs: self.stream_runs.unwrap_or(if q { 1 } else { 2 }).max(1),
            startups: self.startups.unwrap_or(if q { 2 } else { 5 }).max(1),
            exit_detection: String::new(),
        }
    }
}

fn machine() -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let root = std::path::Path::new("/sys/fs/cgroup");
    let cgroups = if root.join("cgroup.controllers").is_file() {
        "cgroup v2 (unified)"
    } else if root.join("unified/cgroup.procs").is_file() {
        "hybrid cgroups (v1 controllers + cgroup2 at /sys/fs/cgroup/unified)"
    } else {
        "cgroup v1"
    };
    Machine {
        kernel,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cgroups: cgroups.into(),
        mem_total_mib: procfs::mem_total_mib(),
        state_dir: String::new(),
    }
}

/// An OCI runtime ready to run, or why not (e.g. crun on a hybrid host).
async fn probe_runtime(name: &str, work: &std::path::Path) -> Runtime {
    let mut bundle_true = PathBuf::new();
    let oci = async {
        let o = oci::Oci::new(name, work).await?;
        bundle_true = o.bundle("true", &["/bin/true"])?;
        o.run_once(&bundle_true).await?;
        anyhow::Ok(o)
    }
    .await
    .map_err(|e| format!("{e:#}"));
    Runtime {
        name: name.into(),
        oci,
        bundle_true,
    }
}

/// Whether `p` is on a tmpfs.
fn is_tmpfs(p: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid C string and an out-pointer to a zeroed statfs.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
    }
}

fn progress(what: &str) {
    eprintln!("aurae-bench: {what}");
}

/// `--v2-guest`: figure 7 alone.
async fn run_guest(args: &Args, work: &std::path::Path, report: &mut Report) -> anyhow::Result<()> {
    let bin = daemon::find_auraed(args.auraed.clone())?;
    let pki = work.join("pki");
    let extra = figures::guest::daemon_args()?;
    progress(&format!("starting {} to boot the guest", bin.display()));
    let mut host = Daemon::spawn_with(&bin, work, &pki, &extra)?;
    host.wait_ready().await?;
    progress("figure 7: cgroup v2 guest (boots a VM under TCG)");
    let f = figures::guest::figures(
        &host,
        report.settings.runs,
        args.guest_favordynmods,
        !args.guest_no_clone3,
    );
    match f.await {
        Ok(f) => report.figures.extend(f),
        Err(e) => report
            .figures
            .push(Figure::failed("7", "cgroup v2 guest", Better::Lower, &e)),
    }
    host.stop();
    Ok(())
}

async fn run(args: &Args, work: &std::path::Path, report: &mut Report) -> anyhow::Result<()> {
    if args.v2_guest {
        return run_guest(args, work, report).await;
    }
    let bin = daemon::find_auraed(args.auraed.clone())?;
    let pki = work.join("pki");
    progress(&format!("starting {} (throwaway PKI)", bin.display()));
    let t0 = Instant::now();
    let mut main = Daemon::spawn(&bin, work, &pki)?;
    let client = main.wait_ready().await?;
    let first_start_ms = cells::ms(t0.elapsed());
    let version = client
        .discovery()
        .discover(DiscoverRequest {})
        .await?
        .into_inner()
        .version;
    report.versions.push(("auraed".into(), version));
    let observe = cells::probe_observe(&client).await;
    let exit = match &observe {
        Ok(()) => ExitMode::Stream,
        Err(why) => ExitMode::Pidfd { why: why.clone() },
    };
    report.settings.exit_detection = exit.describe();
    let mut runtimes = Vec::new();
    for name in ["runc", "crun"] {
        progress(&format!("probing {name}"));
        let rt = probe_runtime(name, work).await;
        let v = match &rt.oci {
            Ok(o) => o.version.clone(),
            Err(e) => format!("cannot run: {e}"),
        };
        report.versions.push((name.into(), v));
        runtimes.push(rt);
    }
    let floor_rel = format!("aurae-bench-{}-floor", std::process::id());
    let ctx = Ctx {
        client_config: main.client_config()?,
        client,
        first_start_ms,
        exit,
        observe,
        settings: report.settings.clone(),
        runtimes,
        floor_rel,
        auraed: bin,
        pki,
        work: work.to_owned(),
    };
    let figs = &mut report.figures;
    let want = |n: u32| args.figures.is_empty() || args.figures.contains(&n);
    if want(1) {
        progress("figure 1: cold isolated start");
        figs.push(figures::start::cold(&ctx).await);
    }
    if want(2) {
        progress("figure 2: warm start");
        match figures::start::warm(&ctx).await {
            Ok((a, b, c)) => figs.extend([a, b, c]),
            Err(e) => figs.push(Figure::failed("2", "warm start", Better::Lower, &e)),
        }
    }
    if want(3) {
        progress("figure 3: throughput");
        match figures::throughput::figures(&ctx).await {
            Ok(v) => figs.extend(v),
            Err(e) => figs.push(Figure::failed("3", "throughput", Better::Higher, &e)),
        }
    }
    if want(4) {
        progress("figure 4: output streaming");
        match figures::stream::figures(&ctx).await {
            Ok(v) => figs.extend(v),
            Err(e) => figs.push(Figure::failed("4", "output streaming", Better::Higher, &e)),
        }
    }
    if want(5) {
        progress("figure 5: signal latency");
        figs.push(figures::signal::figure(&ctx).await);
    }
    if want(6) {
        progress("figure 6: footprint and scale (fresh daemons)");
        match figures::footprint::figure(&ctx).await {
            Ok(f) => figs.push(f),
            Err(e) => figs.push(Figure::failed(
                "6",
                "footprint and scale",
                Better::Lower,
                &e,
            )),
        }
    }
    main.stop();
    floor::remove_tree(&ctx.floor_rel);
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(n) = args.floor_inner {
        return match figures::guest::inner(n) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("error {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("aurae-bench: needs root (cgroups, namespaces, runc)");
        return ExitCode::FAILURE;
    }
    // Laid out as an operator's host is: the daemons' --runtime-dir on a
    // tmpfs (as /run is on systemd hosts), their --library-dir (where
    // auraed keeps executables' output, see services::cells::persist) and
    // the OCI bundles on disk. Output must not be on a tmpfs: its pages
    // are charged to the writer's memory cgroup and not reclaimable, so
    // figure 4's 1 GiB would OOM its 256 MiB cell (measured 2026-12-03).
    let base = std::env::temp_dir();
    let work = match tempfile::Builder::new()
        .prefix("aurae-bench-")
        .tempdir_in(&base)
    {
        Ok(w) => w,
        Err(e) => {
            eprintln!("aurae-bench: cannot create a temp dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shm = std::path::Path::new("/dev/shm");
    let runtime = if is_tmpfs(shm) {
        match tempfile::Builder::new()
            .prefix("aurae-bench-run-")
            .tempdir_in(shm)
        {
            Ok(d) => Some(d),
            Err(e) => {
                progress(&format!(
                    "cannot create a dir in /dev/shm ({e}): runtime dirs on disk"
                ));
                None
            }
        }
    } else {
        None
    };
    if let Some(r) = &runtime {
        daemon::set_runtime_base(r.path());
    }
    let mut machine = machine();
    let kind = |p: &std::path::Path| if is_tmpfs(p) { "tmpfs" } else { "not a tmpfs" };
    machine.state_dir = match &runtime {
        Some(r) => format!(
            "runtime dirs {} ({}), library dirs and bundles {} ({})",
            r.path().display(),
            kind(r.path()),
            work.path().display(),
            kind(work.path())
        ),
        None => format!("{} ({})", work.path().display(), kind(work.path())),
    };
    let mut report = Report {
        schema: report::SCHEMA,
        date: report::utc_now(),
        machine,
        settings: args.settings(),
        versions: Vec::new(),
        figures: Vec::new(),
        incomplete: None,
    };
    let outcome = tokio::select! {
        r = run(&args, work.path(), &mut report) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (Ctrl-C)")),
    };
    // Whatever `run` held (daemons, containers, cgroups) is stopped and
    // removed by now: its Drop impls ran when the future was dropped.
    floor::remove_tree(&format!("aurae-bench-{}-floor", std::process::id()));
    if let Err(e) = &outcome {
        report.incomplete = Some(format!("{e:#}"));
    }
    // The daemons log warnings and errors only. When something of ours
    // failed, whatever they said goes to stderr (before the work dir, and
    // the logs, are removed); otherwise only their errors.
    let failed = outcome.is_err() || report.ours_failed();
    for (name, tail) in daemon::logs(work.path(), 50) {
        if failed {
            eprintln!("aurae-bench: log of {name} (last 50 lines, warnings and errors):\n{tail}");
        } else {
            for l in tail.lines().filter(|l| l.contains("ERROR")) {
                eprintln!("aurae-bench: {name}: {l}");
            }
        }
    }
    print!("{}", report.table());
    let mut code = if outcome.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    if let Some(p) = &args.json {
        if let Err(e) = report.write_json(p).context("--json") {
            eprintln!("aurae-bench: {e:#}");
            code = ExitCode::FAILURE;
        }
    }
    code
}
