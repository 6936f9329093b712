//! CRI containers on crun (issue 13).
//!
//! A container is an OCI bundle run by crun inside its pod: its rootfs is
//! an overlay of the image's layers (`rootfs.rs`), its `config.json` comes
//! from the CRI config (`spec.rs`) and joins the pod's network, IPC, UTS
//! (and, for `pid: POD`, pid) namespaces through the sandbox holder's
//! `/proc/<pid>/ns/*`, and its cgroup is a nested cell
//! `<sandbox cell>/c-<id prefix>` (the pod cell's limits apply; the
//! container's own memory/cpu limits sit on the nested cell; the cells
//! layer persists it, and stats and OOM counts come from its cgroup).
//! A monitor process per container (`crun.rs`) runs `crun create`, writes
//! the CRI log and records the exit; it outlives auraed.
//!
//! Layout (a contract with the streaming side: exec/attach):
//!
//! ```text
//! <runtime-dir>/cri/oci-runtime           the runtime's path (crun, or runc: see crun.rs)
//! <runtime-dir>/cri/crun/                its --root (container id = CRI id)
//! <runtime-dir>/cri/containers/<id>/
//!   config.json rootfs/ upper/ work/     the OCI bundle
//!   record.json                          our record (Record)
//!   monitor.json exit.json crun.log      the monitor's input, result, crun's messages
//!   stdin                                FIFO, for `stdin: true` containers
//!   container.log                        the output (CRI format) when kubelet gave no log path
//! ```
//!
//! Exec/attach use [`Containers::exec_command`] (`<runtime> --root .. exec
//! [--tty] <id> CMD`, joined to the container's cgroups),
//! [`Containers::stdin_fifo`] and [`Containers::output_log`].
//!
//! Not yet: tty containers (`terminal` needs a console socket), devices,
//! seccomp/AppArmor profiles, image volumes, UpdateContainerResources
//! beyond memory/cpu, user namespaces; an image removed while a container
//! uses its layers is not kept.

mod crun;
pub mod log;
mod rootfs;
mod spec;

use std::{
    collections::{BTreeMap, HashMap},
    io::Read,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aurae_proto::cells::{Cell, CpuController, MemoryController};
use auraed_cri::{
    image::{ImageName, Store},
    proto,
};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

pub use crun::{monitor_main, FALLBACK_LOG, MONITOR_ARG};

use super::sandbox::{Sandbox, Sandboxes};
use crate::{
    host::proc::ProcId,
    services::cells::{validation::CellName, Cells, CellsError},
};

/// ExecSync output kept per stream.
const EXEC_OUTPUT_CAP: usize = 16 << 20;
/// How long a monitor may take to say the container is created.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a SIGKILLed container may take to be recorded as exited.
const KILL_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error(transparent)]
    Cells(#[from] CellsError),
    #[error("{0}")]
    Internal(String),
}

impl From<ContainerError> for tonic::Status {
    fn from(e: ContainerError) -> Self {
        match e {
            ContainerError::Invalid(m) => tonic::Status::invalid_argument(m),
            ContainerError::NotFound(m) => tonic::Status::not_found(m),
            ContainerError::AlreadyExists(m) => tonic::Status::already_exists(m),
            ContainerError::Precondition(m) => tonic::Status::failed_precondition(m),
            ContainerError::DeadlineExceeded(m) => tonic::Status::deadline_exceeded(m),
            ContainerError::Unimplemented(m) => tonic::Status::unimplemented(m),
            ContainerError::Cells(c) => c.into(),
            ContainerError::Internal(m) => tonic::Status::internal(m),
        }
    }
}

fn internal(what: &str) -> impl FnOnce(std::io::Error) -> ContainerError + '_ {
    move |e| ContainerError::Internal(format!("{what}: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Created,
    Running,
    Exited,
}

impl State {
    pub fn cri(self) -> i32 {
        match self {
            State::Created => proto::ContainerState::ContainerCreated as i32,
            State::Running => proto::ContainerState::ContainerRunning as i32,
            State::Exited => proto::ContainerState::ContainerExited as i32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub container_path: String,
    pub host_path: String,
    pub readonly: bool,
    pub propagation: i32,
}

/// One container, as the CRI reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub sandbox_id: String,
    pub name: String,
    pub attempt: u32,
    /// As the CRI named it.
    pub image: String,
    /// The image id (`sha256:<config digest>`).
    pub image_ref: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    /// The CRI log file ("" when kubelet gave none).
    pub log_path: String,
    pub cell: String,
    pub monitor: Option<ProcId>,
    pub init_pid: i32,
    pub state: State,
    pub mounts: Vec<MountRecord>,
    pub stdin: bool,
    pub tty: bool,
    pub uid: u32,
    pub gid: u32,
    pub memory_limit: i64,
}

impl Record {
    pub fn metadata(&self) -> proto::ContainerMetadata {
        proto::ContainerMetadata {
            name: self.name.clone(),
            attempt: self.attempt,
        }
    }
}

/// What CreateContainer asks for.
pub struct NewContainer {
    pub sandbox_id: String,
    pub config: proto::ContainerConfig,
    pub sandbox_config: proto::PodSandboxConfig,
}

pub struct Containers {
    cells: Arc<Cells>,
    sandboxes: Arc<Sandboxes>,
    images: Arc<Store>,
    runtime_dir: PathBuf,
    dir: PathBuf,
    crun_root: PathBuf,
    crun: crun::Runtime,
    table: Mutex<HashMap<String, Record>>,
    /// Serializes Create/Remove (names must stay unique; cells allocate).
    ops: tokio::sync::Mutex<()>,
}

fn random_id() -> Result<String, ContainerError> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(internal("/dev/urandom"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn components(cell: &str) -> Vec<&str> {
    cell.split('/').collect()
}

impl Containers {
    pub fn open(
        cells: Arc<Cells>,
        sandboxes: Arc<Sandboxes>,
        images: Arc<Store>,
        runtime_dir: &Path,
    ) -> Result<Containers, ContainerError> {
        let dir = runtime_dir.join("cri/containers");
        let crun_root = runtime_dir.join("cri/crun");
        for d in [&dir, &crun_root] {
            std::fs::create_dir_all(d).map_err(internal("container directory"))?;
        }
        let mut table = HashMap::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let p = e.path().join("record.json");
                match std::fs::read(&p)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
                {
                    Some(r) => {
                        table.insert(r.id.clone(), r);
                    }
                    None => tracing::warn!(
                        "container directory {} has no readable record; left alone",
                        e.path().display()
                    ),
                }
            }
        }
        let c = Containers {
            cells,
            sandboxes,
            images,
            runtime_dir: runtime_dir.to_owned(),
            dir,
            crun_root,
            crun: crun::Runtime::detect(),
            table: Mutex::new(table),
            ops: tokio::sync::Mutex::new(()),
        };
        // Exec/attach (the streaming side) must drive the same runtime.
        let _ = std::fs::write(
            runtime_dir.join("cri/oci-runtime"),
            format!("{}\n", c.crun.path.display()),
        );
        tracing::info!(
            "CRI containers run with {} (state in {})",
            c.crun.path.display(),
            c.crun_root.display()
        );
        let ids: Vec<String> = c.table().keys().cloned().collect();
        for id in ids {
            c.refresh(&id);
        }
        Ok(c)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cdir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn save(&self, r: &Record) -> Result<(), ContainerError> {
        let bytes = serde_json::to_vec(r).map_err(|e| ContainerError::Internal(e.to_string()))?;
        write_atomic(&self.cdir(&r.id).join("record.json"), &bytes)
            .map_err(internal("container record"))
    }

    /// The container `id` names: the full id or a unique prefix.
    fn resolve_id(&self, id: &str) -> Option<String> {
        let t = self.table();
        if t.contains_key(id) {
            return Some(id.to_owned());
        }
        let mut hits = t.keys().filter(|k| k.starts_with(id));
        match (hits.next(), hits.next()) {
            (Some(one), None) if !id.is_empty() => Some(one.clone()),
            _ => None,
        }
    }

    /// Brings a record's state up to date with the monitor's exit.json.
    fn refresh(&self, id: &str) -> Option<Record> {
        let mut r = self.table().get(id).cloned()?;
        if r.state == State::Exited {
            return Some(r);
        }
        let dir = self.cdir(id);
        let exit = crun::read_exit(&dir).or_else(|| {
            let gone = r.monitor.is_none_or(|m| !m.is_running());
            // Gone without a word (killed, or the host rebooted): re-read
            // once (it may have just written), else unknown.
            gone.then(|| {
                crun::read_exit(&dir).unwrap_or(crun::ExitRecord {
                    exit_code: 255,
                    finished_at: crun::now_ns(),
                    oom_killed: false,
                })
            })
        });
        let Some(e) = exit else {
            return Some(r); // still created or running
        };
        r.state = State::Exited;
        r.exit_code = e.exit_code;
        r.finished_at = e.finished_at.max(r.started_at);
        let oom = self
            .cells
            .backend()
            .stats(&components(&r.cell))
            .ok()
            .and_then(|s| s.oom_kills)
            .unwrap_or(0);
        r.reason = if (oom > 0 || e.oom_killed) && e.exit_code != 0 {
            "OOMKilled".into()
        } else if e.exit_code == 0 {
            "Completed".into()
        } else {
            "Error".into()
        };
        if let Err(err) = self.save(&r) {
            tracing::warn!("container {id}: {err}");
        }
        self.table().insert(id.to_owned(), r.clone());
        Some(r)
    }

    pub fn status(&self, id: &str) -> Result<Record, ContainerError> {
        let full = self
            .resolve_id(id)
            .ok_or_else(|| ContainerError::NotFound(format!("container {id:?} not found")))?;
        self.refresh(&full)
            .ok_or_else(|| ContainerError::NotFound(format!("container {id:?} not found")))
    }

    pub fn list(&self) -> Vec<Record> {
        let ids: Vec<String> = self.table().keys().cloned().collect();
        let mut v: Vec<Record> = ids.iter().filter_map(|id| self.refresh(id)).collect();
        v.sort_by_key(|r| r.created_at);
        v
    }

    fn pod_namespaces(&self, s: &Sandbox) -> Result<spec::PodNamespaces, ContainerError> {
        const NODE: i32 = 2;
        let name = CellName::parse("cell", &s.cell).map_err(CellsError::from)?;
        let holder = self.cells.holder_pid(&name);
        let path = |kind: &str| holder.map(|p| PathBuf::from(format!("/proc/{p}/ns/{kind}")));
        if holder.is_none() && (s.ns_network != NODE || s.ns_ipc != NODE || s.ns_pid != NODE) {
            return Err(ContainerError::Precondition(format!(
                "pod sandbox {} has lost its namespaces (no holder); stop and remove it",
                s.id
            )));
        }
        Ok(spec::PodNamespaces {
            network: path("net").filter(|_| s.ns_network != NODE),
            ipc: path("ipc").filter(|_| s.ns_ipc != NODE),
            // The host's UTS goes with the host's network (kubelet's rule).
            uts: path("uts").filter(|_| s.ns_network != NODE),
            pid: path("pid").filter(|_| s.ns_pid != NODE),
        })
    }

    pub async fn create(&self, req: NewContainer) -> Result<String, ContainerError> {
        let config = req.config;
        let meta = config
            .metadata
            .clone()
            .ok_or_else(|| ContainerError::Invalid("config.metadata: is required".into()))?;
        if meta.name.is_empty() {
            return Err(ContainerError::Invalid(
                "config.metadata.name: is required".into(),
            ));
        }
        let image_spec = config
            .image
            .as_ref()
            .map(|i| i.image.trim().to_owned())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| ContainerError::Invalid("config.image: is required".into()))?;
        let sandbox = self.sandboxes.resolve(&req.sandbox_id).ok_or_else(|| {
            ContainerError::NotFound(format!("pod sandbox {:?} not found", req.sandbox_id))
        })?;
        if !sandbox.ready {
            return Err(ContainerError::Precondition(format!(
                "pod sandbox {} is not ready",
                sandbox.id
            )));
        }
        let _op = self.ops.lock().await;
        if let Some(other) = self.table().values().find(|r| {
            r.sandbox_id == sandbox.id && r.name == meta.name && r.attempt == meta.attempt
        }) {
            return Err(ContainerError::AlreadyExists(format!(
                "container {} (attempt {}) already exists in pod sandbox {} as {}",
                meta.name, meta.attempt, sandbox.id, other.id
            )));
        }
        let reference = ImageName::parse(&image_spec).ok().map(|n| n.canonical());
        let image = self
            .images
            .find(&image_spec, reference.as_deref())
            .ok_or_else(|| ContainerError::NotFound(format!("image {image_spec:?} not found")))?;
        let id = random_id()?;
        let dir = self.cdir(&id);
        std::fs::create_dir_all(&dir).map_err(internal("container directory"))?;
        let cell = format!("{}/c-{}", sandbox.cell, &id[..16]);
        let mut made = Made::default();
        let res = self
            .create_in(
                &id,
                &dir,
                &cell,
                &sandbox,
                &config,
                &req.sandbox_config,
                &image,
                &mut made,
            )
            .await;
        match res {
            Ok(mut r) => {
                r.name = meta.name;
                r.attempt = meta.attempt;
                r.image = image_spec;
                if let Err(e) = self.save(&r) {
                    self.undo(&id, &dir, &cell, &made).await;
                    return Err(e);
                }
                self.table().insert(id.clone(), r);
                tracing::info!("container {id} created in pod sandbox {}", sandbox.id);
                Ok(id)
            }
            Err(e) => {
                self.undo(&id, &dir, &cell, &made).await;
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_in(
        &self,
        id: &str,
        dir: &Path,
        cell: &str,
        sandbox: &Sandbox,
        config: &proto::ContainerConfig,
        sandbox_config: &proto::PodSandboxConfig,
        image: &auraed_cri::image::store::ImageRecord,
        made: &mut Made,
    ) -> Result<Record, ContainerError> {
        // The rootfs.
        let layers: Vec<PathBuf> = image
            .layers
            .iter()
            .map(|l| self.images.layer_path(&l.digest))
            .collect::<Result<_, _>>()
            .map_err(|e| ContainerError::Internal(e.to_string()))?;
        for l in &layers {
            if !l.is_dir() {
                return Err(ContainerError::Precondition(format!(
                    "image {} lacks its unpacked layer {}; pull it again",
                    image.id,
                    l.display()
                )));
            }
        }
        let rootfs = rootfs::mount(dir, &layers).map_err(internal("rootfs"))?;
        made.mounted = true;
        let image_config = self
            .images
            .read_blob(&image.id)
            .map(|b| spec::ImageConfig::parse(&b))
            .map_err(|e| ContainerError::Internal(e.to_string()))?;

        // The cgroup: a nested cell with the container's own limits.
        let res = config
            .linux
            .as_ref()
            .and_then(|l| l.resources.clone())
            .unwrap_or_default();
        let spec_cell = cell_spec(cell, &res);
        let name = CellName::parse("cell", cell).map_err(CellsError::from)?;
        let limits =
            crate::services::cells::validation::limits(&spec_cell).map_err(CellsError::from)?;
        self.cells.allocate(name, spec_cell, limits).await?;
        made.cell = true;

        // The OCI spec.
        let pod = self.pod_namespaces(sandbox)?;
        let sbdir = self.runtime_dir.join("cri/sandboxes").join(&sandbox.id);
        let sandbox_files = [
            ("/etc/hosts", "hosts"),
            ("/etc/resolv.conf", "resolv.conf"),
            ("/etc/hostname", "hostname"),
        ]
        .iter()
        .map(|(dest, f)| (dest.to_string(), sbdir.join(f)))
        .filter(|(_, p)| p.is_file())
        .collect();
        let sysctls = sandbox_config
            .linux
            .as_ref()
            .map(|l| {
                l.sysctls
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let (oci, user) = spec::build(&spec::Inputs {
            config,
            image: &image_config,
            rootfs: &rootfs,
            pod,
            sandbox_files,
            sysctls,
            hostname: sandbox_config.hostname.clone(),
        })?;
        let bytes =
            serde_json::to_vec_pretty(&oci).map_err(|e| ContainerError::Internal(e.to_string()))?;
        write_atomic(&dir.join("config.json"), &bytes).map_err(internal("config.json"))?;

        if config.stdin {
            nix::unistd::mkfifo(
                &dir.join(crun::STDIN_FIFO),
                nix::sys::stat::Mode::from_bits_truncate(0o600),
            )
            .map_err(|e| ContainerError::Internal(format!("stdin FIFO: {e}")))?;
        }
        let log_path = log_path(&sandbox_config.log_directory, &config.log_path);
        let mcfg = crun::MonitorConfig {
            runtime: self.crun.clone(),
            root: self.crun_root.clone(),
            id: id.to_owned(),
            bundle: dir.to_owned(),
            // Without a kubelet log path the output still goes somewhere an
            // attach can follow (kubelet always gives one; critest may not).
            log_path: Some(
                log_path
                    .clone()
                    .unwrap_or_else(|| dir.join(crun::FALLBACK_LOG)),
            ),
            procs_files: self.cells.backend().procs_files(&components(cell)),
            stdin: config.stdin,
        };
        let bytes =
            serde_json::to_vec(&mcfg).map_err(|e| ContainerError::Internal(e.to_string()))?;
        write_atomic(&dir.join(crun::MONITOR_CONFIG), &bytes).map_err(internal("monitor.json"))?;
        made.crun = true;
        let (monitor, init_pid) = spawn_monitor(dir).await?;
        Ok(Record {
            id: id.to_owned(),
            sandbox_id: sandbox.id.clone(),
            name: String::new(),
            attempt: 0,
            image: String::new(),
            image_ref: image.id.clone(),
            labels: config
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            annotations: config
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            created_at: crun::now_ns(),
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            log_path: log_path
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            cell: cell.to_owned(),
            monitor: Some(monitor),
            init_pid,
            state: State::Created,
            mounts: config
                .mounts
                .iter()
                .map(|m| MountRecord {
                    container_path: m.container_path.clone(),
                    host_path: m.host_path.clone(),
                    readonly: m.readonly,
                    propagation: m.propagation,
                })
                .collect(),
            stdin: config.stdin,
            tty: config.tty,
            uid: user.uid,
            gid: user.gid,
            memory_limit: res.memory_limit_in_bytes,
        })
    }

    /// Undoes what a failed create made.
    async fn undo(&self, id: &str, dir: &Path, cell: &str, made: &Made) {
        if made.crun {
            self.crun_delete(id).await;
        }
        if made.cell {
            self.free_cell(cell).await;
        }
        if made.mounted {
            if let Err(e) = rootfs::unmount(dir) {
                tracing::warn!("container {id}: {e}; its directory stays");
                return;
            }
        }
        remove_dir(dir);
    }

    async fn crun_delete(&self, id: &str) {
        let out = self
            .crun
            .command(&self.crun_root, None)
            .args(["delete", "--force", id])
            .output()
            .await;
        if let Ok(o) = out {
            let err = String::from_utf8_lossy(&o.stderr);
            if !o.status.success() && !err.contains("does not exist") {
                tracing::debug!("crun delete {id}: {}", err.trim());
            }
        }
    }

    async fn free_cell(&self, cell: &str) {
        let Ok(name) = CellName::parse("cell", cell) else {
            return;
        };
        match self.cells.free(&name).await {
            Ok(()) | Err(CellsError::NotFound(_)) => {}
            Err(e) => tracing::warn!("freeing container cell {cell}: {e}"),
        }
    }

    pub async fn start(&self, id: &str) -> Result<(), ContainerError> {
        let r = self.status(id)?;
        match r.state {
            State::Created => {}
            State::Running => {
                return Err(ContainerError::Precondition(format!(
                    "container {} is already running",
                    r.id
                )))
            }
            State::Exited => {
                return Err(ContainerError::Precondition(format!(
                    "container {} has exited; it cannot start again",
                    r.id
                )))
            }
        }
        // Taken before: a quick container may have exited (and recorded
        // its finish time) by the time `start` returns.
        let started = crun::now_ns();
        let out = self
            .crun
            .command(&self.crun_root, None)
            .args(["start", &r.id])
            .output()
            .await
            .map_err(internal("crun start"))?;
        if !out.status.success() {
            return Err(ContainerError::Internal(format!(
                "crun start {}: {}",
                r.id,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let mut t = self.table();
        if let Some(rec) = t.get_mut(&r.id) {
            if rec.state == State::Created {
                rec.state = State::Running;
            }
            if rec.started_at == 0 {
                rec.started_at = started;
            }
            if rec.finished_at != 0 && rec.finished_at < rec.started_at {
                rec.finished_at = rec.started_at;
            }
            let rec = rec.clone();
            drop(t);
            self.save(&rec)?;
        }
        Ok(())
    }

    async fn kill(&self, r: &Record, signal: &str) {
        let _ = self
            .crun
            .command(&self.crun_root, None)
            .args(["kill", &r.id, signal])
            .output()
            .await;
    }

    /// Waits until the monitor recorded the exit (or `within` passed).
    async fn wait_exit(&self, id: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.refresh(id).is_some_and(|r| r.state == State::Exited) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, `timeout` s, SIGKILL (and everything in its cgroup).
    /// Unknown and exited containers succeed.
    pub async fn stop(&self, id: &str, timeout: i64) -> Result<(), ContainerError> {
        let Ok(r) = self.status(id) else {
            return Ok(());
        };
        if r.state == State::Exited {
            return Ok(());
        }
        if r.state == State::Running && timeout > 0 {
            self.kill(&r, "TERM").await;
            if self
                .wait_exit(&r.id, Duration::from_secs(timeout as u64))
                .await
            {
                return Ok(());
            }
        }
        self.kill(&r, "KILL").await;
        let backend = self.cells.backend().clone();
        let cell = r.cell.clone();
        let _ = tokio::task::spawn_blocking(move || backend.kill_all(&components(&cell))).await;
        if !self.wait_exit(&r.id, KILL_WAIT).await {
            return Err(ContainerError::Internal(format!(
                "container {} did not exit after SIGKILL",
                r.id
            )));
        }
        Ok(())
    }

    /// Stops (if needed) and removes everything of the container. Unknown
    /// ids succeed.
    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let Some(full) = self.resolve_id(id) else {
            return Ok(());
        };
        let _op = self.ops.lock().await;
        let Some(r) = self.refresh(&full) else {
            return Ok(());
        };
        if r.state != State::Exited {
            self.stop(&r.id, 0).await?;
        }
        if let Some(m) = r.monitor {
            m.signal(libc::SIGKILL);
        }
        self.crun_delete(&r.id).await;
        self.free_cell(&r.cell).await;
        let dir = self.cdir(&r.id);
        rootfs::unmount(&dir).map_err(internal("rootfs"))?;
        remove_dir(&dir);
        self.table().remove(&r.id);
        tracing::info!("container {} removed", r.id);
        Ok(())
    }

    pub fn in_sandbox(&self, sandbox_id: &str) -> Vec<String> {
        self.table()
            .values()
            .filter(|r| r.sandbox_id == sandbox_id)
            .map(|r| r.id.clone())
            .collect()
    }

    /// StopPodSandbox: its containers are killed (kubelet stopped them
    /// gracefully before, if it wanted to).
    pub async fn stop_sandbox(&self, sandbox_id: &str) -> Result<(), ContainerError> {
        for id in self.in_sandbox(sandbox_id) {
            self.stop(&id, 0).await?;
            // runc's cgroup below the container's cell must go before the
            // sandbox cell is freed; the record keeps the status.
            self.crun_delete(&id).await;
        }
        Ok(())
    }

    pub async fn remove_sandbox(&self, sandbox_id: &str) -> Result<(), ContainerError> {
        for id in self.in_sandbox(sandbox_id) {
            self.remove(&id).await?;
        }
        Ok(())
    }

    /// Runs `cmd` in the container (`crun exec`, in its cell's cgroups);
    /// `timeout` s (0: none) → DeadlineExceeded, and the process is killed.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout: i64,
    ) -> Result<proto::ExecSyncResponse, ContainerError> {
        if cmd.is_empty() {
            return Err(ContainerError::Invalid("cmd: is required".into()));
        }
        let r = self.status(id)?;
        if r.state != State::Running {
            return Err(ContainerError::Precondition(format!(
                "container {} is not running",
                r.id
            )));
        }
        let pid_file = self
            .cdir(&r.id)
            .join(format!("exec-{}.pid", &random_id()?[..12]));
        let mut c = self.exec_command(&r, false, Some(&pid_file), cmd);
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = c.spawn().map_err(internal("crun exec"))?;
        // In a task of its own: the client gives up at its deadline (which
        // drops this future), yet the command must still be killed.
        let cmd = cmd.to_vec();
        let id = r.id.clone();
        let task = tokio::spawn(async move {
            let mut so = child.stdout.take();
            let mut se = child.stderr.take();
            let run = async {
                let (a, b) = tokio::join!(read_capped(so.as_mut()), read_capped(se.as_mut()));
                (a, b)
            };
            let res = if timeout > 0 {
                tokio::time::timeout(Duration::from_secs(timeout as u64), run).await
            } else {
                Ok(run.await)
            };
            let out = match res {
                Ok((stdout, stderr)) => {
                    let st = child.wait().await.map_err(internal("crun exec"))?;
                    use std::os::unix::process::ExitStatusExt;
                    let code = st
                        .code()
                        .or_else(|| st.signal().map(|s| 128 + s))
                        .unwrap_or(255);
                    Ok(proto::ExecSyncResponse {
                        stdout,
                        stderr,
                        exit_code: code,
                    })
                }
                Err(_) => {
                    // The exec'd process (and what it started), not only the
                    // runtime: it must be gone. Under load the runtime may not
                    // have written its pid yet: wait for it while it runs.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    loop {
                        let pid = std::fs::read_to_string(&pid_file)
                            .ok()
                            .and_then(|s| s.trim().parse::<i32>().ok());
                        if let Some(pid) = pid {
                            kill_tree(pid);
                            // The runtime reaps it (a zombie still shows in
                            // ps/pgrep inside the container until then).
                            let _ =
                                tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                            break;
                        }
                        if Instant::now() >= deadline || child.try_wait().ok().flatten().is_some() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let _ = child.kill().await;
                    Err(ContainerError::DeadlineExceeded(format!(
                        "command {cmd:?} in container {id} timed out after {timeout} s"
                    )))
                }
            };
            let _ = std::fs::remove_file(&pid_file);
            out
        });
        task.await
            .map_err(|e| ContainerError::Internal(format!("exec task: {e}")))?
    }

    /// `<runtime> --root <root> exec [--tty] [--pid-file F] <id> CMD...`,
    /// joining the container's cell cgroups before exec (crun runs without
    /// cgroup management; runc joins its own as well): the command the
    /// streaming side (Exec) runs too. stdio is the caller's to set.
    pub fn exec_command(
        &self,
        r: &Record,
        tty: bool,
        pid_file: Option<&Path>,
        cmd: &[String],
    ) -> tokio::process::Command {
        use std::os::unix::ffi::OsStrExt;
        let procs: Vec<std::ffi::CString> = self
            .cells
            .backend()
            .procs_files(&components(&r.cell))
            .iter()
            .filter_map(|p| std::ffi::CString::new(p.as_os_str().as_bytes()).ok())
            .collect();
        let mut c = self.crun.command(&self.crun_root, None);
        c.arg("exec");
        if tty {
            c.arg("--tty");
        }
        if let Some(f) = pid_file {
            c.arg("--pid-file").arg(f);
        }
        c.arg(&r.id).args(cmd);
        // SAFETY: open/write/close on paths built before the fork; nothing
        // allocates in the child.
        unsafe {
            c.pre_exec(move || {
                for p in &procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd >= 0 {
                        libc::write(fd, b"0".as_ptr().cast(), 1);
                        libc::close(fd);
                    }
                }
                Ok(())
            });
        }
        c
    }

    /// The FIFO feeding a `stdin: true` container (None otherwise).
    /// The OCI runtime containers run with (`runc` or `crun`).
    pub fn runtime_name(&self) -> &'static str {
        if self.crun.runc {
            "runc"
        } else {
            "crun"
        }
    }

    pub fn stdin_fifo(&self, r: &Record) -> Option<PathBuf> {
        r.stdin.then(|| self.cdir(&r.id).join(crun::STDIN_FIFO))
    }

    /// Where the container's output is written (CRI format): the kubelet's
    /// log path, else `<container dir>/container.log`.
    pub fn output_log(&self, r: &Record) -> PathBuf {
        if r.log_path.is_empty() {
            self.cdir(&r.id).join(crun::FALLBACK_LOG)
        } else {
            PathBuf::from(&r.log_path)
        }
    }

    pub fn stats(&self, r: &Record) -> proto::ContainerStats {
        let now = crun::now_ns();
        let s = self.cells.backend().stats(&components(&r.cell)).ok();
        let (bytes, inodes) = rootfs::usage(&self.cdir(&r.id).join("upper"));
        let u64v = |v: Option<u64>| v.map(|value| proto::UInt64Value { value });
        proto::ContainerStats {
            attributes: Some(proto::ContainerAttributes {
                id: r.id.clone(),
                metadata: Some(r.metadata()),
                labels: r.labels.clone().into_iter().collect(),
                annotations: r.annotations.clone().into_iter().collect(),
            }),
            cpu: Some(proto::CpuUsage {
                timestamp: now,
                usage_core_nano_seconds: u64v(s.as_ref().and_then(|s| s.cpu_usage_ns).or(Some(0))),
                ..Default::default()
            }),
            memory: Some(proto::MemoryUsage {
                timestamp: now,
                working_set_bytes: u64v(
                    s.as_ref()
                        .and_then(|s| s.memory_working_set_bytes)
                        .or(Some(0)),
                ),
                usage_bytes: u64v(s.as_ref().and_then(|s| s.memory_usage_bytes)),
                rss_bytes: u64v(s.as_ref().and_then(|s| s.memory_rss_bytes)),
                ..Default::default()
            }),
            writable_layer: Some(proto::FilesystemUsage {
                timestamp: now,
                fs_id: Some(proto::FilesystemIdentifier {
                    mountpoint: self.dir.display().to_string(),
                }),
                used_bytes: Some(proto::UInt64Value { value: bytes }),
                inodes_used: Some(proto::UInt64Value { value: inodes }),
            }),
            swap: None,
            io: None,
        }
    }

    /// Has the monitor reopen the log file (kubelet renamed it).
    pub async fn reopen_log(&self, id: &str) -> Result<(), ContainerError> {
        let r = self.status(id)?;
        if r.state != State::Running {
            return Err(ContainerError::Precondition(format!(
                "container {} is not running",
                r.id
            )));
        }
        if r.log_path.is_empty() {
            return Ok(());
        }
        let sent = r.monitor.is_some_and(|m| m.signal(libc::SIGUSR1));
        if !sent {
            return Err(ContainerError::Precondition(format!(
                "container {}: its monitor is gone",
                r.id
            )));
        }
        let path = PathBuf::from(&r.log_path);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !path.exists() {
            if Instant::now() >= deadline {
                return Err(ContainerError::Internal(format!(
                    "container {}: log {} was not reopened",
                    r.id, r.log_path
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// UpdateContainerResources: memory and cpu limits of its cell's
    /// cgroup, written directly (the cells layer has no update yet).
    pub fn update_resources(
        &self,
        id: &str,
        res: &proto::LinuxContainerResources,
    ) -> Result<(), ContainerError> {
        let r = self.status(id)?;
        let dirs: Vec<PathBuf> = self
            .cells
            .backend()
            .procs_files(&components(&r.cell))
            .iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .map(|d| {
                if d.file_name().is_some_and(|n| n == "_exec") {
                    d.parent().map(Path::to_path_buf).unwrap_or(d)
                } else {
                    d
                }
            })
            .collect();
        let write = |file: &str, value: String| {
            for d in &dirs {
                let p = d.join(file);
                if p.exists() {
                    std::fs::write(&p, &value)
                        .map_err(|e| ContainerError::Internal(format!("{}: {e}", p.display())))?;
                }
            }
            Ok::<(), ContainerError>(())
        };
        if res.memory_limit_in_bytes > 0 {
            write(
                "memory.limit_in_bytes",
                res.memory_limit_in_bytes.to_string(),
            )?;
            write("memory.max", res.memory_limit_in_bytes.to_string())?;
        }
        if res.cpu_period > 0 {
            write("cpu.cfs_period_us", res.cpu_period.to_string())?;
        }
        if res.cpu_quota != 0 {
            write("cpu.cfs_quota_us", res.cpu_quota.to_string())?;
            if res.cpu_quota > 0 {
                let period = if res.cpu_period > 0 {
                    res.cpu_period
                } else {
                    100_000
                };
                write("cpu.max", format!("{} {period}", res.cpu_quota))?;
            }
        }
        if res.cpu_shares > 0 {
            write("cpu.shares", res.cpu_shares.to_string())?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Made {
    mounted: bool,
    cell: bool,
    crun: bool,
}

/// The nested cell of a container: its CRI memory and cpu limits.
fn cell_spec(cell: &str, res: &proto::LinuxContainerResources) -> Cell {
    let memory = (res.memory_limit_in_bytes > 0).then(|| MemoryController {
        max: Some(res.memory_limit_in_bytes),
        ..Default::default()
    });
    let cpu = (res.cpu_quota > 0 || res.cpu_shares > 0).then(|| CpuController {
        weight: (res.cpu_shares > 0).then(|| shares_to_weight(res.cpu_shares as u64)),
        max: (res.cpu_quota > 0).then_some(res.cpu_quota.max(1000)),
        period: (res.cpu_quota > 0).then_some(if res.cpu_period > 0 {
            (res.cpu_period as u64).clamp(1000, 1_000_000)
        } else {
            100_000
        }),
    });
    Cell {
        name: cell.to_owned(),
        cpu,
        memory,
        ..Default::default()
    }
}

/// v2 cpu.weight for v1 cpu.shares (the inverse of runc's formula).
fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(2, 262_144);
    (1 + (s - 2) * 9_999 / 262_142).clamp(1, 10_000)
}

/// The CRI log file: the sandbox's log directory joined with the
/// container's (relative) log path.
fn log_path(log_directory: &str, log_path: &str) -> Option<PathBuf> {
    if log_path.is_empty() {
        return None;
    }
    let p = Path::new(log_path);
    if p.is_absolute() {
        return Some(p.to_owned());
    }
    if log_directory.is_empty() {
        return None;
    }
    Some(Path::new(log_directory).join(p))
}

/// Removes a container directory, never across a mount still there.
fn remove_dir(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let rootfs = dir.join("rootfs");
    if let (Ok(a), Ok(b)) = (std::fs::metadata(dir), std::fs::metadata(&rootfs)) {
        if a.dev() != b.dev() {
            tracing::warn!("{} is still mounted; left alone", rootfs.display());
            return;
        }
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}

/// SIGKILLs `pid` and its descendants (found by parent pid in /proc).
fn kill_tree(pid: i32) {
    let mut all: Vec<(i32, i32)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(st) = crate::host::proc::stat(p) {
                all.push((p, st.ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    for p in tree {
        if let Some(id) = ProcId::of(p) {
            id.signal(libc::SIGKILL);
        }
    }
}

/// Reads all of `r`, keeping the first EXEC_OUTPUT_CAP bytes.
async fn read_capped<R: tokio::io::AsyncRead + Unpin>(r: Option<&mut R>) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(r) = r else {
        return out;
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => {
                let room = EXEC_OUTPUT_CAP.saturating_sub(out.len());
                out.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// Starts the monitor (`auraed __aurae_cri_monitor__ <dir>`) and waits for
/// `ok <init pid>`; the monitor stays the daemon's child only until it
/// exits (reaped by a task) or the daemon does.
async fn spawn_monitor(dir: &Path) -> Result<(ProcId, i32), ContainerError> {
    let err_file = std::fs::File::create(dir.join("monitor.err")).map_err(internal("monitor"))?;
    let mut child = tokio::process::Command::new("/proc/self/exe")
        .arg(MONITOR_ARG)
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(err_file)
        .spawn()
        .map_err(internal("starting the container monitor"))?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    let monitor = ProcId::of(pid);
    let mut line = String::new();
    let read = async {
        if let Some(mut so) = child.stdout.take() {
            let _ = so.read_to_string(&mut line).await;
        }
    };
    let timed_out = tokio::time::timeout(CREATE_TIMEOUT, read).await.is_err();
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    if timed_out {
        if let Some(m) = monitor {
            m.signal(libc::SIGKILL);
        }
        return Err(ContainerError::Internal(
            "crun create did not finish in time".into(),
        ));
    }
    let line = line.trim();
    match line.strip_prefix("ok ").map(|p| p.trim().parse::<i32>()) {
        Some(Ok(init)) => {
            let monitor = monitor.ok_or_else(|| {
                ContainerError::Internal("the container monitor exited at once".into())
            })?;
            Ok((monitor, init))
        }
        _ => Err(ContainerError::Internal(format!(
            "creating the container: {}",
            line.strip_prefix("error ").unwrap_or(line)
        ))),
    }
}

/// GetSubProcessStream of a container's init pid (services::observe).
impl crate::services::observe::ContainerLogs for Containers {
    fn by_pid(&self, pid: i32) -> Option<crate::services::observe::ContainerLog> {
        let id = self
            .table()
            .values()
            .find(|r| r.init_pid == pid && pid > 0)
            .map(|r| r.id.clone())?;
        let r = self.refresh(&id)?;
        Some(crate::services::observe::ContainerLog {
            path: self.output_log(&r),
            cell: r.cell.clone(),
            id,
        })
    }

    fn live(&self, id: &str) -> bool {
        self.refresh(id).is_some_and(|r| r.state != State::Exited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_paths_join_the_pod_directory() {
        assert_eq!(log_path("/var/log/pods/x", ""), None);
        assert_eq!(
            log_path("/var/log/pods/x", "c/0.log"),
            Some(PathBuf::from("/var/log/pods/x/c/0.log"))
        );
        assert_eq!(log_path("", "c/0.log"), None);
        assert_eq!(log_path("", "/abs.log"), Some(PathBuf::from("/abs.log")));
    }

    #[test]
    fn shares_map_back_to_weights() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1024), 39);
    }
}
