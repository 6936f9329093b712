//! A throwaway `auraed`: temp socket, throwaway PKI (the daemon's own
//! first-start PKI, kept under the benchmark's temp dir), its own cgroup
//! root. Dropping a [`Daemon`] stops it (SIGTERM, then SIGKILL); the daemon
//! frees its cells on SIGTERM.

use std::{
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

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Daemon {
    child: Child,
    dir: PathBuf,
    pub cgroup_root: String,
    pki: PathBuf,
}

impl Daemon {
    /// Spawns `bin` with its state under `work/<tag>-N` and the PKI in
    /// `pki` (generated on first start, reused after). Not yet ready.
    pub fn spawn(bin: &Path, work: &Path, pki: &Path) -> anyhow::Result<Daemon> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = work.join(format!("auraed-{n}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let cgroup_root = format!("/aurae-bench-{}-d{n}", std::process::id());
        let log = std::fs::File::create(dir.join("auraed.log")).context("create auraed.log")?;
        let child = Command::new(bin)
            .arg("--socket")
            .arg(dir.join("aurae.sock"))
            .arg("--ca-crt")
            .arg(pki.join("ca.crt"))
            .arg("--server-crt")
            .arg(pki.join("_signed.server.crt"))
            .arg("--server-key")
            .arg(pki.join("server.key"))
            .arg("--runtime-dir")
            .arg(dir.join("run"))
            .arg("--library-dir")
            .arg(dir.join("lib"))
            .arg("--cgroup-root")
            .arg(&cgroup_root)
            .arg("--stop-grace-secs")
            .arg("1")
            // The first-start PKI also writes ~/.aurae/config: keep it in here.
            .env("HOME", &dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: Ctrl-C reaches only the benchmark,
            // which then stops the daemon in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Daemon {
            child,
            dir,
            cgroup_root,
            pki: pki.to_owned(),
        })
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

    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("auraed.log")).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// SIGTERM, bounded wait, SIGKILL. Idempotent.
    pub fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("auraed (pid {}) ignored SIGTERM: SIGKILL", self.pid());
        signal(self.pid(), libc::SIGKILL);
        let _ = self.child.wait();
        // It could not clean up after itself.
        crate::floor::remove_tree(self.cgroup_root.trim_start_matches('/'));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
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
