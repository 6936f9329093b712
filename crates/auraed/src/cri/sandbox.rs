//! Pod sandboxes on cells: a sandbox is an isolated cell (`cri-<id prefix>`)
//! whose namespace holder (`aurae-holder`) is the sandbox process, so no
//! pause image is needed. Its network namespace is the holder's unless the
//! pod uses the host network; pid/ipc/uts/mount likewise unless both pid and
//! ipc are the host's.
//!
//! Records live in memory and in `<runtime-dir>/cri/sandboxes/<id>.json`
//! (written whole), so a restarted daemon lists the sandboxes it had; the
//! cells themselves are re-adopted by the cells layer.
//!
//! Network (CNI), hostname, DNS and sysctls: `pod.rs`, called after the
//! cell is allocated and at Stop/Remove.
//!
//! Not yet: cgroup parent and resources from the config, host-IPC-only or host-PID-only pods (either is
//! treated as "isolated"), containers in the sandbox.

use std::{
    collections::{BTreeMap, HashMap},
    io::Read,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aurae_proto::cells::Cell;
use serde::{Deserialize, Serialize};

use super::pod::{self, OwnNs, PodError, PodNetwork, PodRef, PodSpec, Pods};
use crate::services::cells::{validation::CellName, Cells, CellsError};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error(transparent)]
    Cells(#[from] CellsError),
    #[error(transparent)]
    Pod(#[from] PodError),
    #[error("sandbox record {path}: {source}")]
    Record {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<SandboxError> for tonic::Status {
    fn from(e: SandboxError) -> Self {
        match e {
            SandboxError::Invalid(m) => tonic::Status::invalid_argument(m),
            SandboxError::NotFound(m) => tonic::Status::not_found(m),
            SandboxError::AlreadyExists(m) => tonic::Status::already_exists(m),
            SandboxError::Cells(c) => c.into(),
            SandboxError::Pod(PodError::Invalid(m)) => tonic::Status::invalid_argument(m),
            // The network is not ready (Status says so too).
            SandboxError::Pod(e @ PodError::Cni(super::cni::CniError::NoConfig(_))) => {
                tonic::Status::failed_precondition(e.to_string())
            }
            SandboxError::Pod(e) => {
                tracing::warn!("pod sandbox: {e}");
                tonic::Status::internal(e.to_string())
            }
            e @ SandboxError::Record { .. } => tonic::Status::internal(e.to_string()),
        }
    }
}

/// What the CRI says about a sandbox, kept as given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub runtime_handler: String,
    /// ns since the epoch.
    pub created_at: i64,
    pub ready: bool,
    pub cell: String,
    /// NamespaceMode values (0 POD, 1 CONTAINER, 2 NODE, 3 TARGET).
    pub ns_network: i32,
    pub ns_pid: i32,
    pub ns_ipc: i32,
    /// The pod's hostname (the host's for hostNetwork pods).
    #[serde(default)]
    pub hostname: String,
    /// Its CNI attachment; None for hostNetwork pods.
    #[serde(default)]
    pub network: Option<PodNetwork>,
}

impl Sandbox {
    pub(super) fn pod_ref(&self) -> PodRef<'_> {
        PodRef {
            id: &self.id,
            name: &self.name,
            namespace: &self.namespace,
            uid: &self.uid,
        }
    }
}

/// The CRI's namespace modes (runtime.v1.NamespaceMode).
pub const MODE_NODE: i32 = 2;

pub struct NewSandbox {
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub runtime_handler: String,
    pub ns_network: i32,
    pub ns_pid: i32,
    pub ns_ipc: i32,
    /// Network, DNS, hostname; `sysctls` is filled in from `sysctls`.
    pub pod: PodSpec,
    pub sysctls: HashMap<String, String>,
}

pub struct Sandboxes {
    cells: Arc<Cells>,
    pods: Pods,
    samples: super::stats::CpuSamples,
    dir: PathBuf,
    table: Mutex<HashMap<String, Sandbox>>,
    /// Serializes Run/Stop/Remove (cell allocation and free are slow and
    /// must not interleave for one id).
    ops: tokio::sync::Mutex<()>,
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The cell of the pod sandbox `id` (64 lowercase hex digits, as RunPodSandbox
/// makes them): `cri-<first 16>`. None for anything that is not such an id.
pub fn cell_of(id: &str) -> Option<String> {
    let ok = id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then(|| format!("cri-{}", &id[..16]))
}

fn random_id() -> Result<String, std::io::Error> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Sandboxes {
    /// Loads the records under `runtime_dir/cri/sandboxes`; a sandbox whose
    /// cell is gone is not ready.
    pub fn open(
        cells: Arc<Cells>,
        runtime_dir: &Path,
        cni: super::cni::Cni,
    ) -> Result<Sandboxes, SandboxError> {
        let dir = runtime_dir.join("cri/sandboxes");
        std::fs::create_dir_all(&dir).map_err(|source| SandboxError::Record {
            path: dir.clone(),
            source,
        })?;
        let live: std::collections::HashSet<String> = cells
            .list()
            .into_iter()
            .filter_map(|c| c.cell.map(|c| c.name))
            .collect();
        let mut table = HashMap::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    continue; // a pod's files (`pod.rs`)
                }
                if p.extension().and_then(|x| x.to_str()) != Some("json") {
                    let _ = std::fs::remove_file(&p); // a torn temp file
                    continue;
                }
                match std::fs::read(&p)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Sandbox>(&b).ok())
                {
                    Some(mut s) => {
                        if s.ready && !live.contains(&s.cell) {
                            tracing::warn!(
                                "pod sandbox {}: its cell {} is gone; not ready",
                                s.id,
                                s.cell
                            );
                            s.ready = false;
                        }
                        table.insert(s.id.clone(), s);
                    }
                    None => {
                        tracing::warn!("unreadable pod sandbox record {}; removed", p.display());
                        let _ = std::fs::remove_file(&p);
                    }
                }
            }
        }
        Ok(Sandboxes {
            cells,
            pods: Pods::new(cni, runtime_dir, &dir),
            samples: Default::default(),
            dir,
            table: Mutex::new(table),
            ops: tokio::sync::Mutex::new(()),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Sandbox>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, s: &Sandbox) -> Result<(), SandboxError> {
        let path = self.dir.join(format!("{}.json", s.id));
        let tmp = self.dir.join(format!("{}.tmp", s.id));
        let bytes = serde_json::to_vec(s).map_err(|e| SandboxError::Record {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|source| SandboxError::Record { path, source })
    }

    /// The sandbox `id` names: the full id or a unique prefix.
    pub fn resolve(&self, id: &str) -> Option<Sandbox> {
        let t = self.table();
        if let Some(s) = t.get(id) {
            return Some(s.clone());
        }
        let mut hits = t.values().filter(|s| s.id.starts_with(id));
        match (hits.next(), hits.next()) {
            (Some(one), None) if !id.is_empty() => Some(one.clone()),
            _ => None,
        }
    }

    /// The pid of the process holding the sandbox's namespaces, if its
    /// cell is ready and has one.
    pub fn holder_pid(&self, s: &Sandbox) -> Option<i32> {
        let name = CellName::parse("cell", &s.cell).ok()?;
        self.cells.holder_pid(&name)
    }

    pub fn cells(&self) -> &Arc<Cells> {
        &self.cells
    }

    pub fn pods(&self) -> &Pods {
        &self.pods
    }

    pub fn cpu_samples(&self) -> &super::stats::CpuSamples {
        &self.samples
    }

    pub fn list(&self) -> Vec<Sandbox> {
        let mut v: Vec<Sandbox> = self.table().values().cloned().collect();
        v.sort_by_key(|s| s.created_at);
        v
    }

    pub async fn run(&self, mut req: NewSandbox) -> Result<Sandbox, SandboxError> {
        if req.name.is_empty() || req.namespace.is_empty() || req.uid.is_empty() {
            return Err(SandboxError::Invalid(
                "config.metadata: name, namespace and uid are required".into(),
            ));
        }
        let isolate_process = !(req.ns_pid == MODE_NODE && req.ns_ipc == MODE_NODE);
        let own = OwnNs {
            net: req.ns_network != MODE_NODE,
            ipc_uts: isolate_process,
        };
        req.pod.sysctls = pod::check_sysctls(&req.sysctls, own)?;
        pod::check_hostname(&req.pod.hostname)?;
        let _op = self.ops.lock().await;
        if let Some(s) = self.table().values().find(|s| {
            s.name == req.name
                && s.namespace == req.namespace
                && s.uid == req.uid
                && s.attempt == req.attempt
        }) {
            return Err(SandboxError::AlreadyExists(format!(
                "pod sandbox {}/{} (uid {}, attempt {}) already exists as {}",
                req.namespace, req.name, req.uid, req.attempt, s.id
            )));
        }
        let id = random_id().map_err(|source| SandboxError::Record {
            path: "/dev/urandom".into(),
            source,
        })?;
        let cell =
            cell_of(&id).ok_or_else(|| SandboxError::Invalid(format!("bad sandbox id {id}")))?;
        let spec = Cell {
            name: cell.clone(),
            isolate_process,
            isolate_network: own.net,
            ..Default::default()
        };
        let name = CellName::parse("cell", &cell).map_err(CellsError::from)?;
        let limits = crate::services::cells::validation::limits(&spec).map_err(CellsError::from)?;
        self.cells.allocate(name.clone(), spec, limits).await?;
        let mut s = Sandbox {
            id: id.clone(),
            name: req.name,
            uid: req.uid,
            namespace: req.namespace,
            attempt: req.attempt,
            labels: req.labels,
            annotations: req.annotations,
            runtime_handler: req.runtime_handler,
            created_at: now_ns(),
            ready: true,
            cell,
            ns_network: req.ns_network,
            ns_pid: req.ns_pid,
            ns_ipc: req.ns_ipc,
            hostname: String::new(),
            network: None,
        };
        let holder = self.cells.holder_pid(&name);
        match self.pods.setup(s.pod_ref(), holder, own, &req.pod).await {
            Ok(setup) => {
                s.hostname = setup.hostname;
                s.network = setup.network;
            }
            Err(e) => {
                self.free_cell(&s.cell).await;
                return Err(e.into());
            }
        }
        if let Err(e) = self.save(&s) {
            // Without a record nothing could find the cell (or the
            // network) again.
            self.teardown_pod(&mut s).await;
            self.free_cell(&s.cell).await;
            let _ = self.pods.release(&s.id, s.network.as_ref());
            return Err(e);
        }
        self.table().insert(id, s.clone());
        tracing::info!(
            "pod sandbox {}/{} is {} (cell {})",
            s.namespace,
            s.name,
            s.id,
            s.cell
        );
        Ok(s)
    }

    /// CNI DEL (logged, not returned: for undoing a failed Run).
    async fn teardown_pod(&self, s: &mut Sandbox) {
        let id = s.id.clone();
        let (name, namespace, uid) = (s.name.clone(), s.namespace.clone(), s.uid.clone());
        if let Some(n) = s.network.as_mut() {
            let r = PodRef {
                id: &id,
                name: &name,
                namespace: &namespace,
                uid: &uid,
            };
            if let Err(e) = self.pods.detach(r, n).await {
                tracing::warn!("pod sandbox {id}: {e}");
            }
        }
    }

    /// CNI DEL if the pod is attached; the record notes it. A failure is
    /// returned (kubelet retries Stop), the record still attached.
    async fn detach(&self, s: &mut Sandbox) -> Result<(), SandboxError> {
        let Some(mut n) = s.network.clone().filter(|n| n.attached) else {
            return Ok(());
        };
        self.pods.detach(s.pod_ref(), &mut n).await?;
        s.network = Some(n);
        self.save(s)?;
        self.table().insert(s.id.clone(), s.clone());
        Ok(())
    }

    async fn free_cell(&self, cell: &str) {
        let Ok(name) = CellName::parse("cell", cell) else {
            return;
        };
        match self.cells.free(&name).await {
            Ok(()) | Err(CellsError::NotFound(_)) => {}
            Err(e) => tracing::warn!("freeing sandbox cell {cell}: {e}"),
        }
    }

    /// Stops the sandbox (its cell and everything in it go); the record
    /// stays, not ready, until Remove. Unknown ids succeed (idempotent).
    pub async fn stop(&self, id: &str) -> Result<(), SandboxError> {
        let _op = self.ops.lock().await;
        let Some(mut s) = self.resolve(id) else {
            return Ok(());
        };
        self.detach(&mut s).await?;
        self.free_cell(&s.cell).await;
        if s.ready {
            s.ready = false;
            self.save(&s)?;
            self.table().insert(s.id.clone(), s);
        }
        Ok(())
    }

    /// Removes the sandbox (stopping it first). Unknown ids succeed.
    pub async fn remove(&self, id: &str) -> Result<(), SandboxError> {
        let _op = self.ops.lock().await;
        let Some(mut s) = self.resolve(id) else {
            return Ok(());
        };
        self.detach(&mut s).await?;
        self.free_cell(&s.cell).await;
        self.pods.release(&s.id, s.network.as_ref())?;
        let path = self.dir.join(format!("{}.json", s.id));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(SandboxError::Record { path, source }),
        }
        self.table().remove(&s.id);
        Ok(())
    }
}
