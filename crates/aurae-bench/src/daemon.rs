//! A throwaway `auraed`: temp socket, throwaway PKI (the daemon's own
//! first-start PKI, kept under the benchmark's temp dir), its own cgroup
//! root, `--on-exit free` (SIGTERM frees every cell: the benchmark leaves
//! nothing behind) and `--output-cap 4G` (the streaming figures write at
//! most 1 GiB per executable: nothing may be rotated away). Dropping a
//! [`Daemon`] stops it (SIGTERM, then SIGKILL); [`Daemon::restart`] kills it
//! (SIGKILL) and starts a new one on the same directories and cgroup root,
//! which re-adopts the cells and executables.

use std::{
    io::Write as _,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use aurae_client::{proto::discovery::DiscoverRequest, Client, ClientConfig};

/// How long a daemon may take to answer its first Discover.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long SIGTERM may take (it frees every cell; 1,000 take a while).
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// Output kept per executable and channel: more than any figure writes.
const OUTPUT_CAP: &str = "4G";
/// The log file in the daemon's directory (every start appends to it).
const LOG: &str = "auraed.log";

static NEXT: AtomicU32 = AtomicU32::new(0);
/// Where the daemons' runtime directories go (a tmpfs, as /run is), if
/// not beside the rest of their state.
static RUNTIME_BASE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Puts every daemon's --runtime-dir under `base` (see main).
pub fn set_runtime_base(base: &Path) {
    let _ = RUNTIME_BASE.set(base.to_owned());
}

/// The --runtime-dir of the daemon whose directory is `dir`: the same for
/// every start on `dir` (a restart re-adopts from it).
fn runtime_dir(dir: &Path) -> PathBuf {
    match (RUNTIME_BASE.get(), dir.file_name()) {
        (Some(base), Some(name)) => base.join(name),
        _ => dir.join("run"),
    }
}

pub struct Daemon {
    bin: PathBuf,
    child: Child,
    dir: PathBuf,
    pub cgroup_root: String,
    pki: PathBuf,
    /// More arguments for auraed.
    extra: Vec<String>,
    /// stop() ran.
    stopped: bool,
}

impl Daemon {
    /// Spawns `bin` with its state under `work/<tag>-N` and the PKI in
    /// `pki` (generated on first start, reused after). Not yet ready.
    pub fn spawn(bin: &Path, work: &Path, pki: &Path) -> anyhow::Result<Daemon> {
        Self::spawn_with(bin, work, pki, &[])
    }

    /// As [`Daemon::spawn`], with more arguments for auraed.
    pub fn spawn_with(
        bin: &Path,
        work: &Path,
        pki: &Path,
        extra: &[String],
    ) -> anyhow::Result<Daemon> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = work.join(format!("auraed-{n}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let cgroup_root = format!("/aurae-bench-{}-d{n}", std::process::id());
        let child = launch(bin, &dir, &cgroup_root, pki, extra)?;
        Ok(Daemon {
            bin: bin.to_owned(),
            child,
            dir,
            cgroup_root,
            pki: pki.to_owned(),
            extra: extra.to_vec(),
            stopped: false,
        })
    }

    /// Kills the daemon (SIGKILL: no clean-up at all, its workloads keep
    /// running) and starts a new one with the same arguments (directories,
    /// socket, cgroup root), which re-adopts them. Returns once it answers
    /// Discover: a client, when it was spawned, and how long it took.
    pub async fn restart(&mut self) -> anyhow::Result<(Client, Instant, Duration)> {
        anyhow::ensure!(!self.stopped, "restart of a stopped daemon");
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.pid(), libc::SIGKILL);
        }
        let st = self.child.wait().context("wait for the killed auraed")?;
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.dir.join(LOG))
            .context("open auraed.log")?;
        let _ = writeln!(log, "aurae-bench: auraed killed ({st}); starting a new one");
        let t0 = Instant::now();
        self.child = launch(
            &self.bin,
            &self.dir,
            &self.cgroup_root,
            &self.pki,
            &self.extra,
        )?;
        let client = self.wait_ready().await?;
        Ok((client, t0, t0.elapsed()))
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(i32::MAX)
    }

    pub fn client_config(&self) -> anyhow::Result<ClientConfig> {
        let mut cfg = ClientConfig::from_file(&self.pki.join("client-config.toml"))
            .context("read the daemon's client config")?;
        cfg.system.socket = self.dir.join("aurae.sock").display().to_string();
        Ok(cfg)
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.client_config()?).await?)
    }

    /// Waits until Discover answers; returns a connected client.
    pub async fn wait_ready(&mut self) -> anyhow::Result<Client> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.pki.join("client-config.toml").exists() {
                if let Ok(c) = self.client().await {
                    if c.discovery().discover(DiscoverRequest {}).await.is_ok() {
                        return Ok(c);
                    }
                }
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!(
                    "auraed exited ({st}) before answering; log:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "auraed did not answer within {READY_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The last lines of the daemon's log (warnings and errors of every
    /// start of it).
    pub fn log(&self) -> String {
        log_tail(&self.dir.join(LOG), 20)
    }

    /// SIGTERM (the daemon frees every cell), bounded wait, SIGKILL.
    /// Idempotent. Whatever the daemon left behind (a cgroup root that
    /// still exists: it was killed or exited on its own, or its clean-up
    /// failed) is killed and removed by pid here; the return value says
    /// what that was (None: nothing was left).
    pub fn stop(&mut self) -> Option<String> {
        if std::mem::replace(&mut self.stopped, true) {
            return None;
        }
        let mut how = String::new();
        match self.child.try_wait() {
            Ok(None) => {
                signal(self.pid(), libc::SIGTERM);
                let deadline = Instant::now() + STOP_TIMEOUT;
                while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if matches!(self.child.try_wait(), Ok(None)) {
                    how = format!("ignored SIGTERM for {STOP_TIMEOUT:?}: SIGKILL; ");
                    signal(self.pid(), libc::SIGKILL);
                }
                match self.child.wait() {
                    Ok(st) if st.success() => {}
                    Ok(st) => how += &format!("exited {st} after SIGTERM; "),
                    Err(e) => how += &format!("wait: {e}; "),
                }
            }
            Ok(Some(st)) => how = format!("had already exited ({st}) before SIGTERM; "),
            Err(e) => how = format!("try_wait: {e}; "),
        }
        let rel = self.cgroup_root.trim_start_matches('/');
        let left = kill_cgroup_tree(rel);
        let exists = cgroup_tree_exists(rel);
        if how.is_empty() && left == 0 && !exists {
            return None;
        }
        // It could not clean up after itself.
        crate::floor::remove_tree(rel);
        let cgroups = if exists {
            " and its cgroups (removed)"
        } else {
            ""
        };
        let what = format!(
            "auraed (pid {}) {how}it left {left} processes in {} (killed){cgroups}",
            self.pid(),
            self.cgroup_root,
        );
        eprintln!("aurae-bench: {what}; log:\n{}", self.log());
        Some(what)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `bin` on `dir` (its socket, runtime and library directories, its
/// log appended to `dir/auraed.log`), the PKI in `pki`, `cgroup_root`.
fn launch(
    bin: &Path,
    dir: &Path,
    cgroup_root: &str,
    pki: &Path,
    extra: &[String],
) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join(LOG))
        .context("open auraed.log")?;
    Command::new(bin)
        .arg("--socket")
        .arg(dir.join("aurae.sock"))
        .arg("--ca-crt")
        .arg(pki.join("ca.crt"))
        .arg("--server-crt")
        .arg(pki.join("_signed.server.crt"))
        .arg("--server-key")
        .arg(pki.join("server.key"))
        .arg("--runtime-dir")
        .arg(runtime_dir(dir))
        .arg("--library-dir")
        .arg(dir.join("lib"))
        .arg("--cgroup-root")
        .arg(cgroup_root)
        .arg("--stop-grace-secs")
        .arg("1")
        // SIGTERM frees every cell (the default, keep, would leave the
        // benchmark's workloads running).
        .arg("--on-exit")
        .arg("free")
        .arg("--output-cap")
        .arg(OUTPUT_CAP)
        .args(extra)
        // The first-start PKI also writes ~/.aurae/config: keep it in here.
        .env("HOME", dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // Its own process group: Ctrl-C reaches only the benchmark,
        // which then stops the daemon in order.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

/// The last `n` lines of a file.
fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(n).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Every daemon log under `work` that is not empty: (daemon dir name, last
/// `n` lines).
pub fn logs(work: &Path, n: usize) -> Vec<(String, String)> {
    let Ok(rd) = std::fs::read_dir(work) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("auraed-"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                log_tail(&e.path().join(LOG), n),
            )
        })
        .filter(|(_, t)| !t.trim().is_empty())
        .collect();
    out.sort();
    out
}

/// The directories of `rel` in every cgroup hierarchy (v1 controllers,
/// named ones, cgroup2), deepest first.
fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(d.to_owned());
    }
    let mount = Path::new(crate::floor::CGROUP_MOUNT);
    let mut roots = vec![mount.to_owned()];
    if let Ok(rd) = std::fs::read_dir(mount) {
        roots.extend(rd.flatten().map(|e| e.path()));
    }
    let mut out = Vec::new();
    for h in roots {
        let base = h.join(rel);
        if base.is_dir() {
            walk(&base, &mut out);
        }
    }
    out
}

fn cgroup_tree_exists(rel: &str) -> bool {
    !cgroup_dirs(rel).is_empty()
}

/// SIGKILLs every process (by pid) in the cgroups of `rel`; how many.
fn kill_cgroup_tree(rel: &str) -> usize {
    let mut pids: Vec<i32> = cgroup_dirs(rel)
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    for &p in &pids {
        signal(p, libc::SIGKILL);
    }
    if !pids.is_empty() {
        // Let the kernel empty the cgroups before they are removed.
        std::thread::sleep(Duration::from_millis(200));
    }
    pids.len()
}

pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// `auraed` next to our own executable (target/{debug,release}).
pub fn find_auraed(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let me = std::env::current_exe().context("locate our own executable")?;
    let candidate = me.with_file_name("auraed");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        bail!(
            "{} not found: build the workspace first (cargo build --release --workspace) or pass --auraed PATH",
            candidate.display()
        )
    }
}
