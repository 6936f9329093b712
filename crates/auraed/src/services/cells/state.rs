//! The cells of this node: allocation, executables, teardown. A std Mutex
//! guards only the name table; kernel work happens outside it, so calls on
//! different cells never wait for each other.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use aurae_proto::cells::{Cell, CellGraphNode};

use super::{
    executable::{ExecTable, Executable},
    output::Outputs,
    validation::CellName,
    CellsError,
};
use crate::host::{
    cgroup::{CgroupBackend, Limits},
    spawn::{self, ExecSpec, Holder, HolderSpec, NsSet},
};

/// How long Free waits for a cell's cgroups to empty.
pub(super) const REMOVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long Free waits for a holder to die after SIGKILL.
pub(super) const HOLDER_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct CellEntry {
    pub name: CellName,
    /// The cell as allocated (name normalized to the full path).
    pub spec: Cell,
    /// Namespaces its processes enter (None: the host's).
    ns: Option<Arc<NsSet>>,
    pub(super) holder: Mutex<Option<Holder>>,
    pub(super) execs: ExecTable,
    procs_files: Vec<std::path::PathBuf>,
}

#[derive(Debug, Clone)]
pub(super) enum Slot {
    Allocating,
    Ready(Arc<CellEntry>),
    Freeing(Arc<CellEntry>),
}

/// Where an executable runs.
pub enum Context {
    Host,
    Cell(CellName),
}

#[derive(Debug)]
pub struct Cells {
    pub(super) backend: Arc<dyn CgroupBackend>,
    pub(super) outputs: Arc<Outputs>,
    pub(super) stop_grace: Duration,
    table: Mutex<BTreeMap<CellName, Slot>>,
    pub(super) host: ExecTable,
}

pub struct Started {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl Cells {
    pub fn new(
        backend: Arc<dyn CgroupBackend>,
        outputs: Arc<Outputs>,
        stop_grace: Duration,
    ) -> Self {
        Self {
            backend,
            outputs,
            stop_grace,
            table: Mutex::new(BTreeMap::new()),
            host: ExecTable::default(),
        }
    }

    pub fn is_v2(&self) -> bool {
        self.backend.is_v2()
    }

    pub fn outputs(&self) -> &Arc<Outputs> {
        &self.outputs
    }

    /// The cgroup backend (the signal observer matches cells by cgroup).
    pub fn backend(&self) -> &Arc<dyn CgroupBackend> {
        &self.backend
    }

    pub(super) fn table(&self) -> MutexGuard<'_, BTreeMap<CellName, Slot>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ready(&self, name: &CellName) -> Result<Arc<CellEntry>, CellsError> {
        match self.table().get(name) {
            Some(Slot::Ready(e)) => Ok(e.clone()),
            Some(Slot::Freeing(_)) => Err(CellsError::Precondition(format!(
                "cell {name} is being freed"
            ))),
            Some(Slot::Allocating) | None => {
                Err(CellsError::NotFound(format!("cell {name} not found")))
            }
        }
    }

    /// Names of a cell and its descendants, if it exists (any state).
    pub fn subtree(&self, name: &CellName) -> Option<Vec<CellName>> {
        let t = self.table();
        t.contains_key(name).then(|| {
            t.keys()
                .filter(|k| *k == name || k.is_descendant_of(name))
                .cloned()
                .collect()
        })
    }

    pub async fn allocate(
        &self,
        name: CellName,
        mut spec: Cell,
        limits: Limits,
    ) -> Result<(), CellsError> {
        self.backend.check_supported(&limits)?;
        let parent_ns = {
            let mut t = self.table();
            if t.contains_key(&name) {
                return Err(CellsError::AlreadyExists(format!(
                    "cell {name} already exists"
                )));
            }
            let parent_ns = match name.parent() {
                None => None,
                Some(p) => match t.get(&p) {
                    Some(Slot::Ready(e)) => e.ns.clone(),
                    Some(Slot::Freeing(_)) => {
                        return Err(CellsError::Precondition(format!(
                            "parent cell {p} is being freed"
                        )))
                    }
                    _ => return Err(CellsError::NotFound(format!("parent cell {p} not found"))),
                },
            };
            t.insert(name.clone(), Slot::Allocating);
            parent_ns
        };
        match self.create(&name, &spec, &limits, parent_ns).await {
            Ok(entry) => {
                spec.name = name.to_string();
                let entry = Arc::new(CellEntry { spec, ..entry });
                self.table().insert(name.clone(), Slot::Ready(entry));
                tracing::info!("allocated cell {name}");
                Ok(())
            }
            Err(e) => {
                self.table().remove(&name);
                Err(e)
            }
        }
    }

    /// The kernel work of Allocate; undoes itself on failure.
    async fn create(
        &self,
        name: &CellName,
        spec: &Cell,
        limits: &Limits,
        parent_ns: Option<Arc<NsSet>>,
    ) -> Result<CellEntry, CellsError> {
        let t0 = std::time::Instant::now();
        let backend = self.backend.clone();
        let (path, l) = (name.clone(), limits.clone());
        tokio::task::spawn_blocking(move || backend.create(&path.components(), &l))
            .await
            .map_err(|e| CellsError::Internal(e.to_string()))??;
        let procs_files = self.backend.procs_files(&name.components());
        let t_cgroup = t0.elapsed();
        let mut holder = None;
        let mut ns = parent_ns.clone();
        if spec.isolate_process || spec.isolate_network {
            let hs = HolderSpec {
                procs_files: procs_files.clone(),
                parent_ns,
                new_process: spec.isolate_process,
                new_network: spec.isolate_network,
                hostname: name.leaf().to_owned(),
            };
            match spawn::spawn_holder(hs).await {
                Ok(h) => {
                    ns = Some(h.ns.clone());
                    holder = Some(h);
                }
                Err(e) => {
                    self.remove_cgroup(name).await.ok();
                    return Err(e.into());
                }
            }
        }
        tracing::debug!(
            "cell {name}: cgroups {t_cgroup:?}, holder {:?}",
            t0.elapsed() - t_cgroup
        );
        Ok(CellEntry {
            name: name.clone(),
            spec: Cell::default(),
            ns,
            holder: Mutex::new(holder),
            execs: ExecTable::default(),
            procs_files,
        })
    }

    pub async fn start(
        &self,
        context: Context,
        name: String,
        command: String,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<Started, CellsError> {
        let (entry, label) = match &context {
            Context::Host => (None, "the host context".to_owned()),
            Context::Cell(c) => (Some(self.ready(c)?), format!("cell {c}")),
        };
        let table = entry.as_ref().map_or(&self.host, |e| &e.execs);
        table.reserve(&name, &label)?;
        let spec = ExecSpec {
            command,
            procs_files: entry
                .as_ref()
                .map(|e| e.procs_files.clone())
                .unwrap_or_default(),
            ns: entry.as_ref().and_then(|e| e.ns.clone()),
            uid,
            gid,
        };
        let child = match spawn::spawn_executable(spec).await {
            Ok(c) => c,
            Err(e) => {
                table.unreserve(&name);
                return Err(e.into());
            }
        };
        let exe = match Executable::watch(name.clone(), child, &self.outputs, label.clone()) {
            Ok(x) => x,
            Err(e) => {
                table.unreserve(&name);
                return Err(e);
            }
        };
        let pid = exe.pid;
        if !table.fill(exe.clone()) {
            // Free closed the cell while we were starting: undo.
            let _ = exe.stop(Duration::ZERO).await;
            self.outputs.remove(pid);
            table.remove(&name);
            return Err(CellsError::Precondition(format!("{label} is being freed")));
        }
        // SAFETY: getuid/getgid cannot fail.
        let (my_uid, my_gid) = unsafe { (libc::getuid(), libc::getgid()) };
        tracing::info!("started executable {name:?} in {label}: pid {pid}");
        Ok(Started {
            pid,
            uid: uid.unwrap_or(my_uid),
            gid: gid.unwrap_or(my_gid),
        })
    }

    pub async fn stop(&self, context: Context, name: &str) -> Result<(), CellsError> {
        let entry = match &context {
            Context::Host => None,
            Context::Cell(c) => Some(self.ready(c)?),
        };
        let table = entry.as_ref().map_or(&self.host, |e| &e.execs);
        let where_ = match &context {
            Context::Host => "the host context".to_owned(),
            Context::Cell(c) => format!("cell {c}"),
        };
        let exe = table.get(name).ok_or_else(|| {
            CellsError::NotFound(format!("executable {name:?} not found in {where_}"))
        })?;
        self.stop_one(&exe).await?;
        table.remove(name);
        Ok(())
    }

    async fn stop_one(&self, exe: &Executable) -> Result<(), CellsError> {
        let info = exe.stop(self.stop_grace).await?;
        tracing::info!(
            "stopped executable {:?} (pid {}): {}",
            exe.name,
            exe.pid,
            info.status
        );
        self.outputs.remove(exe.pid);
        Ok(())
    }

    /// The cell forest, sorted by name.
    pub fn list(&self) -> Vec<CellGraphNode> {
        let cells: Vec<Arc<CellEntry>> = self
            .table()
            .values()
            .filter_map(|s| match s {
                Slot::Ready(e) | Slot::Freeing(e) => Some(e.clone()),
                Slot::Allocating => None,
            })
            .collect();
        let mut children: HashMap<Option<CellName>, Vec<&Arc<CellEntry>>> = HashMap::new();
        for c in &cells {
            children.entry(c.name.parent()).or_default().push(c);
        }
        fn build(
            of: Option<CellName>,
            children: &HashMap<Option<CellName>, Vec<&Arc<CellEntry>>>,
        ) -> Vec<CellGraphNode> {
            let mut v: Vec<&Arc<CellEntry>> = children.get(&of).cloned().unwrap_or_default();
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v.into_iter()
                .map(|c| CellGraphNode {
                    cell: Some(c.spec.clone()),
                    children: build(Some(c.name.clone()), children),
                    executables: Vec::new(),
                    status: String::new(),
                })
                .collect()
        }
        build(None, &children)
    }
}
