//! The cells of this node: allocation, executables, teardown. A std Mutex
//! guards only the name table; kernel work happens outside it, so calls on
//! different cells never wait for each other. Every cell and executable is
//! also recorded on disk (`persist`), so that a new run of the daemon
//! re-adopts them (`adopt.rs`).

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use aurae_proto::cells::{Cell, CellGraphNode, ExecutableStatus};

use super::{
    executable::{ExecTable, Executable},
    output::{OutputSource, Outputs},
    persist::{CellRecord, CellSpec, ExecRecord, HolderRecord, Store},
    validation::{self, CellName, Invalid},
    CellsError,
};
use crate::host::{
    cgroup::{CgroupBackend, Limits},
    proc::ProcId,
    shim::{self, ShimSpec},
    spawn::{self, Holder, HolderLife, HolderSpec, NsSet},
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
    pub(super) ns: Option<Arc<NsSet>>,
    /// Its own holder, if it isolates.
    pub(super) holder: Mutex<Option<Holder>>,
    /// The holders whose namespaces its processes enter (its own and its
    /// isolated ancestors'): if one is gone, so are its namespaces.
    pub(super) ns_holders: Vec<Arc<HolderLife>>,
    pub(super) execs: ExecTable,
    pub(super) procs_files: Vec<PathBuf>,
}

impl CellEntry {
    /// The first holder whose namespaces this cell needs and that is gone.
    pub(super) fn dead_holder(&self) -> Option<ProcId> {
        self.ns_holders
            .iter()
            .find(|h| !h.is_alive())
            .map(|h| h.pid)
    }
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

impl Context {
    pub fn label(&self) -> String {
        match self {
            Context::Host => "the host context".to_owned(),
            Context::Cell(c) => format!("cell {c}"),
        }
    }
}

/// What Start runs.
pub struct StartSpec {
    pub name: String,
    pub command: String,
    pub description: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Debug)]
pub struct Cells {
    pub(super) backend: Arc<dyn CgroupBackend>,
    pub(super) outputs: Arc<Outputs>,
    pub(super) stop_grace: Duration,
    pub(super) store: Store,
    output_cap: u64,
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
        store: Store,
        stop_grace: Duration,
        output_cap: u64,
    ) -> Self {
        Self {
            backend,
            outputs: Arc::new(Outputs::default()),
            stop_grace,
            store,
            output_cap,
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

    /// The host pid of the cell's own namespace holder: the process whose
    /// `/proc/<pid>/ns/*` CRI containers join (their pod's namespaces).
    /// None when the cell is not ready or does not isolate.
    pub fn holder_pid(&self, name: &CellName) -> Option<i32> {
        let e = self.ready(name).ok()?;
        let h = e.holder.lock().unwrap_or_else(|p| p.into_inner());
        h.as_ref().map(|h| h.pid.pid)
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
        let parent = {
            let mut t = self.table();
            if t.contains_key(&name) {
                return Err(CellsError::AlreadyExists(format!(
                    "cell {name} already exists"
                )));
            }
            let parent = match name.parent() {
                None => None,
                Some(p) => match t.get(&p) {
                    Some(Slot::Ready(e)) => {
                        if let Some(h) = e.dead_holder() {
                            return Err(CellsError::Precondition(format!(
                                "parent cell {p} has lost its namespaces (its holder, pid {}, is gone); free it",
                                h.pid
                            )));
                        }
                        Some(e.clone())
                    }
                    Some(Slot::Freeing(_)) => {
                        return Err(CellsError::Precondition(format!(
                            "parent cell {p} is being freed"
                        )))
                    }
                    _ => return Err(CellsError::NotFound(format!("parent cell {p} not found"))),
                },
            };
            t.insert(name.clone(), Slot::Allocating);
            parent
        };
        if let Err(e) = self.check_cpuset(&name, &limits) {
            self.table().remove(&name);
            return Err(e.into());
        }
        let (parent_ns, parent_holders) = parent
            .map(|p| (p.ns.clone(), p.ns_holders.clone()))
            .unwrap_or_default();
        spec.name = name.to_string();
        match self
            .create(&name, &spec, &limits, parent_ns, parent_holders)
            .await
        {
            Ok(entry) => {
                let entry = Arc::new(CellEntry { spec, ..entry });
                let holder = entry
                    .holder
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .map(|h| HolderRecord {
                        pid: h.pid,
                        intermediate: h.intermediate,
                        socket: h.spawner.clone(),
                    });
                let record = CellRecord {
                    name: name.to_string(),
                    spec: CellSpec::of(&entry.spec),
                    holder,
                    created_at: crate::logging::now_nanos(),
                };
                if let Err(e) = self.store.write_cell(&record) {
                    self.table()
                        .insert(name.clone(), Slot::Freeing(entry.clone()));
                    let _ = self.teardown(&name, &[entry]).await;
                    self.table().remove(&name);
                    return Err(CellsError::Internal(format!(
                        "cannot record cell {name}: {e}"
                    )));
                }
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

    /// The cpus and mems asked for must be the parent's (or, for a
    /// top-level cell, the root subtree's): the kernel refuses others.
    fn check_cpuset(&self, name: &CellName, limits: &Limits) -> Result<(), Invalid> {
        if limits.cpus.is_none() && limits.mems.is_none() {
            return Ok(());
        }
        let parent = name.parent();
        let components = parent
            .as_ref()
            .map(CellName::components)
            .unwrap_or_default();
        let Some((cpus, mems)) = self.backend.cpuset_available(&components) else {
            return Ok(());
        };
        if let Some(c) = &limits.cpus {
            validation::cpuset_within("cell.cpuset.cpus", c, &cpus)?;
        }
        if let Some(m) = &limits.mems {
            validation::cpuset_within("cell.cpuset.mems", m, &mems)?;
        }
        Ok(())
    }

    /// The kernel work of Allocate; undoes itself on failure.
    async fn create(
        &self,
        name: &CellName,
        spec: &Cell,
        limits: &Limits,
        parent_ns: Option<Arc<NsSet>>,
        mut ns_holders: Vec<Arc<HolderLife>>,
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
                parent_ns: parent_ns.clone(),
                new_process: spec.isolate_process,
                new_network: spec.isolate_network,
                hostname: name.leaf().to_owned(),
                socket: self.store.new_holder_socket(),
                into: self.backend.unified_dir(&name.components()),
            };
            match spawn::spawn_holder(hs).await {
                Ok(h) => {
                    ns = Some(h.ns.clone());
                    ns_holders.push(h.life.clone());
                    holder = Some(h);
                }
                Err(e) => {
                    self.remove_cgroup(name).await.ok();
                    return Err(e.into());
                }
            }
        }
        if holder.is_none() && !self.backend.is_v2() && plain_spawner_enabled() {
            // A plain cell on v1 hierarchies: a holder without namespaces
            // of its own (the parent's, and a cgroup namespace rooted at
            // the cell) forks the cell's shims, so executables are born in
            // the cell's cgroups. It migrates once, here; each Start would
            // otherwise migrate its executable (on v1 a write to
            // `cgroup.procs` waits for an RCU grace period when none ran
            // lately: ~11 ms on a 2-vCPU host). On v2 the shim clones the
            // executable into the cell instead. Without it (it failed, or
            // died later) the daemon starts the shims as before.
            let hs = HolderSpec {
                procs_files: procs_files.clone(),
                parent_ns: parent_ns.clone(),
                new_process: false,
                new_network: false,
                hostname: name.leaf().to_owned(),
                socket: self.store.new_holder_socket(),
                into: self.backend.unified_dir(&name.components()),
            };
            match spawn::spawn_holder(hs).await {
                Ok(h) => holder = Some(h),
                Err(e) => tracing::warn!(
                    "cell {name}: no spawner ({e}); the daemon starts its executables"
                ),
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
            ns_holders,
            execs: ExecTable::default(),
            procs_files,
        })
    }

    pub async fn start(&self, context: Context, spec: StartSpec) -> Result<Started, CellsError> {
        let entry = match &context {
            Context::Host => None,
            Context::Cell(c) => {
                let e = self.ready(c)?;
                if let Some(h) = e.dead_holder() {
                    return Err(CellsError::Precondition(format!(
                        "cell {c} cannot start executables: the holder of its namespaces (pid {}) is gone; free the cell",
                        h.pid
                    )));
                }
                Some(e)
            }
        };
        let label = context.label();
        let table = entry.as_ref().map_or(&self.host, |e| &e.execs);
        let name = spec.name;
        table.reserve(&name, &label)?;
        let result = self
            .spawn(
                &context,
                entry.as_ref(),
                &name,
                spec.command,
                spec.description,
                spec.uid,
                spec.gid,
            )
            .await;
        let exe = match result {
            Ok(exe) => exe,
            Err(e) => {
                table.unreserve(&name);
                return Err(match &context {
                    Context::Cell(c) => self.gone_meanwhile(c, entry.as_ref()).unwrap_or(e),
                    Context::Host => e,
                });
            }
        };
        let pid = exe.pid;
        let (uid, gid) = (exe.record.uid, exe.record.gid);
        self.outputs.insert(
            pid,
            OutputSource {
                dir: exe.dir.clone(),
                shim: exe.record.shim,
            },
        );
        if !table.fill(exe.clone()) {
            // Free closed the cell while we were starting: undo.
            let _ = exe.stop(Duration::ZERO).await;
            self.forget(&exe);
            table.remove(&name);
            return Err(CellsError::Precondition(format!("{label} is being freed")));
        }
        tracing::info!("started executable {name:?} in {label}: pid {pid}");
        Ok(Started { pid, uid, gid })
    }

    /// After a failed spawn into cell `c`: the error to give when the cell
    /// went away meanwhile (freed or being freed, or its namespaces' holder
    /// died), which is then the cause (a fork into a pid namespace whose
    /// init is gone fails with ENOMEM, a write to a removed cgroup with
    /// ENODEV...). None when the cell is still there as it was.
    fn gone_meanwhile(&self, c: &CellName, entry: Option<&Arc<CellEntry>>) -> Option<CellsError> {
        let same = match self.table().get(c) {
            None | Some(Slot::Allocating) => {
                return Some(CellsError::NotFound(format!(
                    "cell {c} was freed while the executable was starting"
                )))
            }
            Some(Slot::Freeing(_)) => {
                return Some(CellsError::Precondition(format!("cell {c} is being freed")))
            }
            Some(Slot::Ready(now)) => entry.is_some_and(|e| Arc::ptr_eq(e, now)),
        };
        if !same {
            return Some(CellsError::Precondition(format!(
                "cell {c} was freed and allocated again while the executable was starting"
            )));
        }
        let e = entry?;
        if e.execs.is_closed() {
            return Some(CellsError::Precondition(format!("cell {c} is being freed")));
        }
        e.dead_holder().map(|h| {
            CellsError::Precondition(format!(
                "cell {c} cannot start executables: the holder of its namespaces (pid {}) is gone; free the cell",
                h.pid
            ))
        })
    }

    /// Starts the shim and the executable, and records them.
    #[allow(clippy::too_many_arguments)]
    async fn spawn(
        &self,
        context: &Context,
        entry: Option<&Arc<CellEntry>>,
        name: &str,
        command: String,
        description: String,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<Arc<Executable>, CellsError> {
        let (id, dir) = self.store.new_exec_dir().map_err(|e| {
            CellsError::Internal(format!("cannot make the executable's directory: {e}"))
        })?;
        let spec = ShimSpec {
            dir: dir.clone(),
            command: command.clone(),
            procs_files: entry.map(|e| e.procs_files.clone()).unwrap_or_default(),
            ns: entry.and_then(|e| e.ns.clone()),
            uid,
            gid,
            output_cap: self.output_cap,
            // Only the cell's own holder is in its cgroups (a nested cell
            // without one has cgroups of its own).
            spawner: entry.and_then(|e| {
                e.holder
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .and_then(|h| h.spawner.clone())
            }),
            // The cell's cgroup2 leaf: the shim forks the executable into
            // it with clone3 (it is one of `procs_files`).
            into: entry.and_then(|e| self.backend.unified_dir(&e.name.components())),
        };
        let spawned = match shim::spawn(spec).await {
            Ok(s) => s,
            Err(e) => {
                self.store.remove_exec(&id);
                return Err(e.into());
            }
        };
        // SAFETY: getuid/getgid cannot fail.
        let (my_uid, my_gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let record = ExecRecord {
            id,
            name: name.to_owned(),
            cell: match context {
                Context::Host => None,
                Context::Cell(c) => Some(c.to_string()),
            },
            command,
            description,
            uid: uid.unwrap_or(my_uid),
            gid: gid.unwrap_or(my_gid),
            shim: spawned.shim,
            pid: spawned.pid,
            started_at: crate::logging::now_nanos(),
        };
        let exe = Executable::watch(record, dir, context.label(), self.scope_of(entry));
        if let Err(e) = self.store.write_exec(&exe.record) {
            let _ = exe.stop(Duration::ZERO).await;
            self.store.remove_exec(&exe.record.id);
            return Err(CellsError::Internal(format!(
                "cannot record executable {name:?}: {e}"
            )));
        }
        Ok(exe)
    }

    /// Where Stop looks for the live members of an executable's process
    /// group: the cell's cgroup2 directory (the parent of its `_exec` leaf).
    pub(super) fn scope_of(&self, entry: Option<&Arc<CellEntry>>) -> Option<std::path::PathBuf> {
        let e = entry?;
        let leaf = self.backend.unified_dir(&e.name.components())?;
        leaf.parent().map(std::path::Path::to_path_buf)
    }

    /// Drops a stopped executable's output and record.
    pub(super) fn forget(&self, exe: &Executable) {
        self.outputs.remove(exe.pid);
        self.store.remove_exec(&exe.record.id);
    }

    pub async fn stop(&self, context: Context, name: &str) -> Result<(), CellsError> {
        let entry = match &context {
            Context::Host => None,
            Context::Cell(c) => Some(self.ready(c)?),
        };
        let table = entry.as_ref().map_or(&self.host, |e| &e.execs);
        let exe = table.get(name).ok_or_else(|| {
            CellsError::NotFound(format!(
                "executable {name:?} not found in {}",
                context.label()
            ))
        })?;
        let exit = exe.stop(self.stop_grace).await?;
        tracing::info!(
            "stopped executable {:?} (pid {}): {exit}",
            exe.name,
            exe.pid
        );
        self.forget(&exe);
        table.remove(name);
        Ok(())
    }

    /// Where the executable with host pid `pid` runs: `Some(Context::Host)`
    /// for one started outside cells, None for a pid of no executable.
    pub fn owner_of(&self, pid: i32) -> Option<Context> {
        if self.host.all().iter().any(|e| e.pid == pid) {
            return Some(Context::Host);
        }
        let cells: Vec<Arc<CellEntry>> = self
            .table()
            .values()
            .filter_map(|s| match s {
                Slot::Ready(e) | Slot::Freeing(e) => Some(e.clone()),
                Slot::Allocating => None,
            })
            .collect();
        cells
            .into_iter()
            .find(|c| c.execs.all().iter().any(|e| e.pid == pid))
            .map(|c| Context::Cell(c.name.clone()))
    }

    /// Names of every cell (any state).
    pub fn names(&self) -> Vec<CellName> {
        self.table().keys().cloned().collect()
    }

    /// The executables of the host context.
    pub fn host_executables(&self) -> Vec<ExecutableStatus> {
        self.host.all().iter().map(|e| e.status()).collect()
    }

    /// The cell forest, sorted by name.
    pub fn list(&self) -> Vec<CellGraphNode> {
        let cells: Vec<(Arc<CellEntry>, bool)> = self
            .table()
            .values()
            .filter_map(|s| match s {
                Slot::Ready(e) => Some((e.clone(), false)),
                Slot::Freeing(e) => Some((e.clone(), true)),
                Slot::Allocating => None,
            })
            .collect();
        let mut children: HashMap<Option<CellName>, Vec<&(Arc<CellEntry>, bool)>> = HashMap::new();
        for c in &cells {
            children.entry(c.0.name.parent()).or_default().push(c);
        }
        fn build(
            of: Option<CellName>,
            children: &HashMap<Option<CellName>, Vec<&(Arc<CellEntry>, bool)>>,
        ) -> Vec<CellGraphNode> {
            let mut v = children.get(&of).cloned().unwrap_or_default();
            v.sort_by(|a, b| a.0.name.cmp(&b.0.name));
            v.into_iter()
                .map(|(c, freeing)| CellGraphNode {
                    cell: Some(c.spec.clone()),
                    children: build(Some(c.name.clone()), children),
                    executables: c.execs.all().iter().map(|e| e.status()).collect(),
                    status: if *freeing {
                        "freeing"
                    } else if c.dead_holder().is_some() {
                        "holder-dead"
                    } else {
                        "ready"
                    }
                    .to_owned(),
                })
                .collect()
        }
        build(None, &children)
    }

    /// Puts a re-adopted cell in the table (see `adopt.rs`).
    pub(super) fn insert_adopted(&self, entry: CellEntry) -> Arc<CellEntry> {
        let e = Arc::new(entry);
        self.table().insert(e.name.clone(), Slot::Ready(e.clone()));
        e
    }

    pub(super) fn get_ready(&self, name: &CellName) -> Option<Arc<CellEntry>> {
        match self.table().get(name) {
            Some(Slot::Ready(e)) => Some(e.clone()),
            _ => None,
        }
    }
}

/// `AURAE_PLAIN_CELL_SPAWNER=0` in the daemon's environment: plain cells
/// get no spawner (their shims are the daemon's, as before), for
/// before/after figures.
fn plain_spawner_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("AURAE_PLAIN_CELL_SPAWNER").is_none_or(|v| v != "0"))
}
