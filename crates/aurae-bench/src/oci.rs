//! OCI baselines: `runc run` / `crun run` per iteration on a busybox-static
//! rootfs with the same namespaces (pid, ipc, uts, mount, network, cgroup)
//! and limits as a cell. Bundles live in the benchmark's temp dir;
//! containers are force-deleted on drop.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{bail, Context as _};
use serde_json::json;
use tokio::process::Command;

use crate::floor::{CPU_PERIOD_US, CPU_QUOTA_US, MEMORY_MAX};

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: [&str; 7] = ["true", "sh", "yes", "head", "seq", "sleep", "tr"];

pub struct Oci {
    /// "runc" or "crun".
    pub runtime: String,
    pub version: String,
    state_root: PathBuf,
    dir: PathBuf,
    rootfs: PathBuf,
    cgroup_parent: String,
    next: AtomicU64,
}

impl Oci {
    /// Finds `runtime` on PATH and makes a rootfs for it under `work`.
    pub async fn new(runtime: &str, work: &Path) -> anyhow::Result<Oci> {
        let out = Command::new(runtime)
            .arg("--version")
            .output()
            .await
            .with_context(|| format!("{runtime} is not installed (apt-get install {runtime})"))?;
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned();
        anyhow::ensure!(
            Path::new(BUSYBOX).is_file(),
            "{BUSYBOX} missing (apt-get install busybox-static)"
        );
        let dir = work.join(runtime);
        let rootfs = dir.join("rootfs");
        for d in ["bin", "proc", "dev", "sys", "tmp"] {
            std::fs::create_dir_all(rootfs.join(d)).context("create rootfs")?;
        }
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).context("copy busybox")?;
        for a in APPLETS {
            let link = rootfs.join("bin").join(a);
            if !link.exists() {
                std::os::unix::fs::symlink("busybox", &link).context("link applet")?;
            }
        }
        let state_root = dir.join("state");
        std::fs::create_dir_all(&state_root).context("create state root")?;
        Ok(Oci {
            runtime: runtime.into(),
            version,
            state_root,
            dir,
            rootfs,
            cgroup_parent: format!("aurae-bench-{}-{runtime}", std::process::id()),
            next: AtomicU64::new(0),
        })
    }

    /// Writes a bundle whose process runs `args`; returns its directory.
    /// Its containers use the cgroup `/<ours>/<name>`: run one container of
    /// a bundle at a time (concurrent workers each get their own bundle).
    pub fn bundle(&self, name: &str, args: &[&str]) -> anyhow::Result<PathBuf> {
        let b = self.dir.join(format!("bundle-{name}"));
        std::fs::create_dir_all(&b).context("create bundle")?;
        let cfg = json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": args,
                "env": ["PATH=/bin"],
                "cwd": "/",
                "noNewPrivileges": true
            },
            "root": {"path": self.rootfs, "readonly": true},
            "hostname": "bench",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
            ],
            "linux": {
                "cgroupsPath": format!("/{}/{name}", self.cgroup_parent),
                "namespaces": [
                    {"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                    {"type": "mount"}, {"type": "network"}, {"type": "cgroup"}
                ],
                "resources": {
                    "memory": {"limit": MEMORY_MAX},
                    "cpu": {"quota": CPU_QUOTA_US, "period": CPU_PERIOD_US}
                }
            }
        });
        let text = serde_json::to_string_pretty(&cfg)?;
        std::fs::write(b.join("config.json"), text).context("write config.json")?;
        Ok(b)
    }

    /// A command for `run` (`-d`: detached) of `bundle` as a fresh
    /// container; returns the command and the container id.
    pub fn run_command(&self, bundle: &Path, detach: bool) -> (Command, String) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("ab-{}-{n}", std::process::id());
        let mut cmd = Command::new(&self.runtime);
        cmd.arg("--root")
            .arg(&self.state_root)
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .args(detach.then_some("-d"))
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        (cmd, id)
    }

    /// `run` of `bundle` to its end; an error carries the runtime's stderr.
    pub async fn run_once(&self, bundle: &Path) -> anyhow::Result<()> {
        let (mut cmd, id) = self.run_command(bundle, false);
        let out = cmd
            .output()
            .await
            .with_context(|| format!("spawn {}", self.runtime))?;
        if !out.status.success() {
            self.delete(&id).await;
            let err = String::from_utf8_lossy(&out.stderr);
            let msg = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            bail!("{} run: {}: {}", self.runtime, out.status, msg.trim());
        }
        Ok(())
    }

    async fn delete(&self, id: &str) {
        let _ = Command::new(&self.runtime)
            .arg("--root")
            .arg(&self.state_root)
            .args(["delete", "-f", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }

    /// Force-deletes every container left in our state root, then our
    /// cgroups. Synchronous so that it can run from Drop.
    pub fn cleanup(&self) {
        let list = std::process::Command::new(&self.runtime)
            .arg("--root")
            .arg(&self.state_root)
            .args(["list", "-q"])
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = list {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = std::process::Command::new(&self.runtime)
                    .arg("--root")
                    .arg(&self.state_root)
                    .args(["delete", "-f", id.trim()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        crate::floor::remove_tree(&self.cgroup_parent);
    }
}

impl Drop for Oci {
    fn drop(&mut self) {
        self.cleanup();
    }
}

impl Oci {
    /// `run -d`: a long-running container for `exec` (the warm baseline).
    pub async fn start_detached(&self, bundle: &Path) -> anyhow::Result<String> {
        let (mut c, id) = self.run_command(bundle, true);
        // The container inherits our stdio: a pipe would stay open as long
        // as it runs, so its stderr goes to a file.
        let err_path = self.dir.join(format!("{id}.stderr"));
        let err = std::fs::File::create(&err_path).context("create stderr file")?;
        let status = c.stderr(err).status().await.context("spawn runtime")?;
        if !status.success() {
            self.delete(&id).await;
            let text = std::fs::read_to_string(&err_path).unwrap_or_default();
            bail!("{} run -d: {status}: {}", self.runtime, text.trim());
        }
        Ok(id)
    }

    /// `exec` of `args` in a running container, to its end.
    pub async fn exec(&self, id: &str, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new(&self.runtime)
            .arg("--root")
            .arg(&self.state_root)
            .arg("exec")
            .arg(id)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await
            .context("spawn runtime")?;
        if !out.status.success() {
            bail!(
                "{} exec: {}: {}",
                self.runtime,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    pub async fn kill_delete(&self, id: &str) {
        self.delete(id).await;
    }
}
