//! Start-up: re-adopting what an earlier run of the daemon left running.
//!
//! Every cell and executable was recorded on disk (`persist`). A cell is
//! re-adopted if its cgroup still exists; its holder if the same process
//! (pid and start time) still runs; an executable with whatever its shim
//! recorded. What cannot be re-adopted is reported in the log and cleaned
//! up, never guessed: a cell whose cgroup is gone is forgotten (and its
//! holder killed); cgroups in our subtree that no record claims (the daemon
//! died while allocating) are killed and removed; an executable whose cell
//! is gone is stopped and forgotten.

use std::{collections::HashSet, sync::Arc};

use aurae_proto::cells::Cell;

use super::{
    executable::{release_shim, ExecTable, Executable},
    output::OutputSource,
    persist::{CellRecord, ExecRecord},
    state::{CellEntry, Cells, Context, REMOVE_TIMEOUT},
    validation::CellName,
};
use crate::host::spawn::{Holder, HolderLife};

/// What start-up found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    pub cells: usize,
    pub cells_holder_dead: usize,
    pub cells_dropped: usize,
    pub cgroups_reclaimed: usize,
    pub execs_running: usize,
    pub execs_exited: usize,
    pub execs_dropped: usize,
}

impl Cells {
    /// Re-adopts the cells and executables recorded by an earlier run, and
    /// reclaims cgroups of ours that no record claims.
    pub async fn adopt(self: &Arc<Self>) -> Adopted {
        let mut report = Adopted::default();
        let records = self.store.load_cells();
        let backend = self.backend.clone();
        let existing: HashSet<Vec<String>> =
            tokio::task::spawn_blocking(move || backend.leftover_cells().into_iter().collect())
                .await
                .unwrap_or_default();
        let mut kept: HashSet<Vec<String>> = HashSet::new();
        for r in records {
            match self.adopt_cell(&r, &existing) {
                Ok(dead) => {
                    report.cells += 1;
                    if dead {
                        report.cells_holder_dead += 1;
                    }
                    kept.insert(r.name.split('/').map(str::to_owned).collect());
                }
                Err(why) => {
                    tracing::warn!("cannot re-adopt cell {}: {why}; forgotten", r.name);
                    report.cells_dropped += 1;
                    if let Some(h) = &r.holder {
                        if let Some(p) = &h.socket {
                            let _ = std::fs::remove_file(p);
                        }
                        h.pid.signal(libc::SIGKILL);
                        if let Some(i) = h.intermediate {
                            i.signal(libc::SIGKILL);
                        }
                    }
                    self.store.remove_cell(&r.name);
                }
            }
        }
        report.cgroups_reclaimed = self.reclaim_unclaimed(&existing, &kept).await;

        for r in self.store.load_execs() {
            match self.adopt_exec(r).await {
                Some(true) => report.execs_running += 1,
                Some(false) => report.execs_exited += 1,
                None => report.execs_dropped += 1,
            }
        }
        if report != Adopted::default() {
            tracing::info!(
                "re-adopted {} cells ({} whose holder is gone) and {} executables ({} running, {} exited); dropped {} cells and {} executables; reclaimed {} unrecorded cgroups",
                report.cells,
                report.cells_holder_dead,
                report.execs_running + report.execs_exited,
                report.execs_running,
                report.execs_exited,
                report.cells_dropped,
                report.execs_dropped,
                report.cgroups_reclaimed,
            );
        }
        report
    }

    /// Ok(true) if adopted with its namespaces lost.
    fn adopt_cell(&self, r: &CellRecord, existing: &HashSet<Vec<String>>) -> Result<bool, String> {
        let name = CellName::parse("name", &r.name).map_err(|e| e.to_string())?;
        let path: Vec<String> = name.components().iter().map(|c| (*c).to_owned()).collect();
        if !existing.contains(&path) {
            return Err("its cgroup is gone".into());
        }
        let parent = match name.parent() {
            None => None,
            Some(p) => Some(
                self.get_ready(&p)
                    .ok_or_else(|| format!("its parent {p} was not re-adopted"))?,
            ),
        };
        let (mut ns, mut ns_holders) = parent
            .map(|p| (p.ns.clone(), p.ns_holders.clone()))
            .unwrap_or_default();
        let mut holder = None;
        let mut dead = false;
        // A plain cell's holder only forks its shims (see `state.rs`): it
        // holds no namespace of the cell, and without it the daemon starts
        // the shims itself.
        let forker_only = !r.spec.isolate_process && !r.spec.isolate_network;
        if let Some(h) = r.holder.as_ref().filter(|_| forker_only) {
            holder = Holder::adopt(h.pid, h.intermediate, h.socket.clone());
            if holder.is_none() {
                if let Some(p) = &h.socket {
                    let _ = std::fs::remove_file(p);
                }
            }
        } else if let Some(h) = &r.holder {
            match Holder::adopt(h.pid, h.intermediate, h.socket.clone()) {
                Some(h) => {
                    ns = Some(h.ns.clone());
                    ns_holders.push(h.life.clone());
                    holder = Some(h);
                }
                None => {
                    if let Some(p) = &h.socket {
                        let _ = std::fs::remove_file(p);
                    }
                    ns_holders.push(HolderLife::dead(h.pid));
                    tracing::warn!(
                        "cell {name}: its holder (pid {}) is gone, and with it its namespaces; it cannot start executables until it is freed and allocated again",
                        h.pid.pid
                    );
                    dead = true;
                }
            }
        }
        dead |= ns_holders.iter().any(|h| !h.is_alive());
        let spec: Cell = r.spec.to_cell(name.as_str());
        let procs_files = self.backend.procs_files(&name.components());
        self.insert_adopted(CellEntry {
            name,
            spec,
            ns,
            holder: std::sync::Mutex::new(holder),
            ns_holders,
            execs: ExecTable::default(),
            procs_files,
        });
        Ok(dead)
    }

    /// Kills and removes cgroups below our root that no record claims.
    async fn reclaim_unclaimed(
        &self,
        existing: &HashSet<Vec<String>>,
        kept: &HashSet<Vec<String>>,
    ) -> usize {
        let mut unclaimed: Vec<Vec<String>> = existing
            .iter()
            .filter(|c| !kept.contains(*c))
            .cloned()
            .collect();
        if unclaimed.is_empty() {
            return 0;
        }
        unclaimed.sort_by_key(Vec::len);
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || {
            let set: HashSet<&Vec<String>> = unclaimed.iter().collect();
            // Kill from the topmost unclaimed cgroup of each subtree.
            for c in &unclaimed {
                let parent_unclaimed = c.len() > 1 && set.contains(&c[..c.len() - 1].to_vec());
                if !parent_unclaimed {
                    let path: Vec<&str> = c.iter().map(String::as_str).collect();
                    if let Err(e) = backend.kill_all(&path) {
                        tracing::warn!(
                            "cannot kill the processes of unrecorded cgroup {}: {e}",
                            c.join("/")
                        );
                    }
                }
            }
            let mut removed = 0;
            for c in unclaimed.iter().rev() {
                let path: Vec<&str> = c.iter().map(String::as_str).collect();
                match backend.remove(&path, REMOVE_TIMEOUT) {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::warn!("cannot remove unrecorded cgroup {}: {e}", c.join("/")),
                }
            }
            if removed > 0 {
                tracing::warn!(
                    "removed {removed} cgroups that no record claims (an earlier run stopped while allocating, or its state was lost)"
                );
            }
            removed
        })
        .await
        .unwrap_or(0)
    }

    /// Some(running?) if adopted; None if dropped.
    async fn adopt_exec(&self, r: ExecRecord) -> Option<bool> {
        let dir = self.store.exec_dir(&r.id);
        let (table, context) = match &r.cell {
            None => (None, Context::Host),
            Some(c) => {
                let entry = CellName::parse("cell", c)
                    .ok()
                    .and_then(|n| self.get_ready(&n));
                match entry {
                    Some(e) => {
                        let ctx = Context::Cell(e.name.clone());
                        (Some(e), ctx)
                    }
                    None => {
                        tracing::warn!(
                            "executable {:?} (pid {}): its cell {c} is gone; stopped and forgotten",
                            r.name,
                            r.pid.pid
                        );
                        if r.pid.is_running() {
                            // SAFETY: kill(2); the group is anchored by its
                            // running leader (checked just above).
                            unsafe { libc::kill(-r.pid.pid, libc::SIGKILL) };
                        }
                        release_shim(r.shim).await;
                        self.store.remove_exec(&r.id);
                        return None;
                    }
                }
            }
        };
        let table_entry = table.clone();
        let table = table.as_ref().map_or(&self.host, |e| &e.execs);
        let running = r.pid.is_running();
        let label = context.label();
        let shim = r.shim;
        let name = r.name.clone();
        if table.reserve(&name, &label).is_err() {
            tracing::warn!("executable {name:?} in {label} is recorded twice; keeping the first");
            return None;
        }
        let exe = Executable::watch(r, dir.clone(), label, self.scope_of(table_entry.as_ref()));
        self.outputs.insert(exe.pid, OutputSource { dir, shim });
        table.fill(exe);
        Some(running)
    }
}
