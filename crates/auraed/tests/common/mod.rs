//! Test harness: starts the real `auraed` binary on a temporary socket with
//! a throwaway PKI (the daemon's own first-start PKI) and temporary state
//! directories, waits until it answers, and hands back connected clients.
//! Dropping a [`Daemon`] stops it (SIGTERM, then SIGKILL) and removes
//! everything it was given.

#![allow(dead_code)]

pub mod observe;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aurae_client::{proto::discovery::DiscoverRequest, Client, ClientConfig};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique short name for kernel objects a test creates (cells, cgroups).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn auraed_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_auraed"))
}

/// `aer` is another package's binary; the test command builds it first.
pub fn aer_bin() -> PathBuf {
    let p = auraed_bin().with_file_name("aer");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (scripts/test does)",
        p.display()
    );
    p
}

pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: String,
    pub cgroup_root: String,
    stderr_path: PathBuf,
    /// The flags it was started with (a restart uses them again).
    extra: Vec<String>,
    /// A tmpfs mounted on `dir/run` (the runtime dir), unmounted on drop.
    tmpfs_run: bool,
}

pub struct Paths {
    pub ca_crt: PathBuf,
    pub server_crt: PathBuf,
    pub server_key: PathBuf,
}

impl Daemon {
    /// Starts a daemon on a temporary unix socket.
    pub async fn start() -> Self {
        Self::start_with(None, &[]).await
    }

    /// Starts a daemon listening at `socket` (None: a temp unix socket)
    /// with extra flags.
    pub async fn start_with(socket: Option<&str>, extra: &[&str]) -> Self {
        let d = Self::spawn(socket, extra);
        d.wait_ready().await;
        d
    }

    /// Starts a daemon whose cells live under `cgroup_root` (e.g. the one
    /// of an earlier daemon).
    pub async fn start_in_cgroup_root(cgroup_root: &str) -> Self {
        let d = Self::spawn_in(None, &[], Some(cgroup_root.to_owned()));
        d.wait_ready().await;
        d
    }

    /// Spawns without waiting for readiness.
    pub fn spawn(socket: Option<&str>, extra: &[&str]) -> Self {
        Self::spawn_in(socket, extra, None)
    }

    /// Starts a daemon whose --runtime-dir is a tmpfs of its own (as
    /// `/run` is on systemd hosts); needs root.
    pub async fn start_on_tmpfs_runtime_dir(extra: &[&str]) -> Self {
        let dir = Self::temp_dir();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).expect("mkdir run");
        let target = std::ffi::CString::new(run.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: valid C strings; a fresh tmpfs on a directory of ours.
        let rc = unsafe {
            libc::mount(
                c"aurae-test".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"mode=0700,size=512m".as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
        let mut d = Self::spawn_at(dir, None, extra, None);
        d.tmpfs_run = true;
        d.wait_ready().await;
        d
    }

    fn temp_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("auraed-test-")
            .tempdir()
            .expect("temp dir")
    }

    fn spawn_in(socket: Option<&str>, extra: &[&str], cgroup_root: Option<String>) -> Self {
        Self::spawn_at(Self::temp_dir(), socket, extra, cgroup_root)
    }

    fn spawn_at(
        dir: tempfile::TempDir,
        socket: Option<&str>,
        extra: &[&str],
        cgroup_root: Option<String>,
    ) -> Self {
        let socket = socket
            .map(str::to_owned)
            .unwrap_or_else(|| dir.path().join("aurae.sock").display().to_string());
        let cgroup_root = cgroup_root.unwrap_or_else(|| format!("/{}", unique("aurae-test")));
        let stderr_path = dir.path().join("auraed.log");
        // Test daemons free everything when they stop, unless the test is
        // about keeping workloads across restarts.
        let mut extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        if !extra.iter().any(|a| a == "--on-exit") {
            extra.extend(["--on-exit".to_owned(), "free".to_owned()]);
        }
        let child = Self::exec(dir.path(), &socket, &cgroup_root, &extra, &stderr_path);
        Daemon {
            child,
            dir,
            socket,
            cgroup_root,
            stderr_path,
            extra,
            tmpfs_run: false,
        }
    }

    fn exec(dir: &Path, socket: &str, cgroup_root: &str, extra: &[String], log: &Path) -> Child {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let p = Self::paths_in(dir);
        Command::new(auraed_bin())
            .arg("--socket")
            .arg(socket)
            .arg("--ca-crt")
            .arg(&p.ca_crt)
            .arg("--server-crt")
            .arg(&p.server_crt)
            .arg("--server-key")
            .arg(&p.server_key)
            .arg("--runtime-dir")
            .arg(dir.join("run"))
            .arg("--library-dir")
            .arg(dir.join("lib"))
            .arg("--cgroup-root")
            .arg(cgroup_root)
            .args(extra)
            // The first-start PKI also writes ~/.aurae/config: keep it in here.
            .env("HOME", dir)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn auraed")
    }

    /// Stops the daemon with `sig` (SIGKILL: a crash) and starts a new one
    /// with the same directories, cgroup root and flags (`extra` replaces
    /// them if given); waits until it answers.
    pub async fn restart(&mut self, sig: i32, extra: Option<&[&str]>) {
        self.stop_with(sig);
        self.respawn(extra).await;
    }

    /// Sends `sig` and waits for the daemon to exit.
    pub fn stop_with(&mut self, sig: i32) {
        signal(self.pid(), sig);
        if self.wait_exit(Duration::from_secs(30)).is_none() {
            signal(self.pid(), libc::SIGKILL);
            let _ = self.child.wait();
            panic!(
                "auraed did not exit after signal {sig}; log:\n{}",
                self.log()
            );
        }
    }

    /// Starts a new daemon after [`Daemon::stop_with`] (see `restart`).
    pub async fn respawn(&mut self, extra: Option<&[&str]>) {
        if let Some(extra) = extra {
            self.extra = extra.iter().map(|s| (*s).to_owned()).collect();
        }
        self.child = Self::exec(
            self.dir.path(),
            &self.socket,
            &self.cgroup_root,
            &self.extra,
            &self.stderr_path,
        );
        self.wait_ready().await;
    }

    /// Whether it was started with `--on-exit keep`.
    fn keeps(&self) -> bool {
        self.extra
            .windows(2)
            .any(|w| w[0] == "--on-exit" && w[1] == "keep")
    }

    pub fn paths_in(dir: &Path) -> Paths {
        Paths {
            ca_crt: dir.join("pki/ca.crt"),
            server_crt: dir.join("pki/_signed.server.crt"),
            server_key: dir.join("pki/server.key"),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn client_config_path(&self) -> PathBuf {
        self.dir.path().join("pki/client-config.toml")
    }

    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::from_file(&self.client_config_path()).expect("client config")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.client_config())
            .await
            .expect("connect to auraed")
    }

    async fn wait_ready(&self) {
        assert!(
            answers_within(&self.client_config_path(), Duration::from_secs(30)).await,
            "auraed did not become ready; log:\n{}",
            self.log()
        );
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        signal(self.pid(), libc::SIGTERM);
        self.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| {
            signal(self.pid(), libc::SIGKILL);
            panic!(
                "auraed did not exit within 30s of SIGTERM; log:\n{}",
                self.log()
            )
        })
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether a daemon answers Discover (with the client config at `path`)
/// within `timeout`.
pub async fn answers_within(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        // The config may not be written yet (or only partly).
        if let Ok(config) = ClientConfig::from_file(path) {
            if let Ok(c) = Client::connect(&config).await {
                if c.discovery().discover(DiscoverRequest {}).await.is_ok() {
                    return true;
                }
            }
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("AURAE_TEST_LOG").is_some() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- auraed log (last 60 lines) ----");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if let Ok(None) = self.child.try_wait() {
            signal(self.pid(), libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(30)).is_none() {
                signal(self.pid(), libc::SIGKILL);
                let _ = self.child.wait();
            }
        }
        if self.keeps() {
            // It left its workloads running (as asked): a daemon with the
            // free policy on the same directories re-adopts and frees them,
            // also when the test failed half-way.
            let mut extra = self.extra.clone();
            if let Some(i) = extra.iter().position(|a| a == "--on-exit") {
                extra.drain(i..(i + 2).min(extra.len()));
            }
            extra.extend(["--on-exit".to_owned(), "free".to_owned()]);
            let mut child = Self::exec(
                self.dir.path(),
                &self.socket,
                &self.cgroup_root,
                &extra,
                &self.stderr_path,
            );
            // Once it answers (re-adoption done, signal handlers in
            // place), SIGTERM makes it free everything. Drop may run inside
            // the test's runtime: wait on a thread with a runtime of its own.
            let config = self.client_config_path();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(answers_within(&config, Duration::from_secs(30)))
            })
            .join();
            signal(child.id() as i32, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = child.try_wait() {
                signal(child.id() as i32, libc::SIGKILL);
                let _ = child.wait();
            }
        }
        // Hygiene if the daemon could not clean up (killed, or a test
        // failed half-way): remove this test's cgroup root where it is
        // empty. Tests that check the daemon's own clean-up assert on it.
        for h in [
            "cpu", "cpuacct", "cpuset", "memory", "pids", "freezer", "unified", "",
        ] {
            let root = Path::new("/sys/fs/cgroup")
                .join(h)
                .join(self.cgroup_root.trim_start_matches('/'));
            if root.is_dir() {
                for leaf in ["_exec", "auraed"] {
                    let _ = std::fs::remove_dir(root.join(leaf));
                }
                let _ = std::fs::remove_dir(&root);
            }
        }
        if self.tmpfs_run {
            if let Ok(run) =
                std::ffi::CString::new(self.dir.path().join("run").as_os_str().as_encoded_bytes())
            {
                // SAFETY: a valid C string; the tmpfs this harness mounted.
                unsafe { libc::umount2(run.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}
