//! Tearing cells down: Free (graceful stop, holders, cgroup kill, rmdir
//! bottom-up) and daemon shutdown.

use std::sync::Arc;

use tokio::task::JoinSet;

use super::{
    state::{CellEntry, Cells, Slot, HOLDER_WAIT, REMOVE_TIMEOUT},
    validation::CellName,
    CellsError, OnExit,
};

impl Cells {
    /// Stops every executable of the cell and its descendants, then tears
    /// down holders and cgroups bottom-up.
    pub async fn free(&self, name: &CellName) -> Result<(), CellsError> {
        let mut entries: Vec<Arc<CellEntry>> = {
            let mut t = self.table();
            match t.get(name) {
                Some(Slot::Ready(_)) => {}
                Some(Slot::Freeing(_)) => {
                    return Err(CellsError::Precondition(format!(
                        "cell {name} is already being freed"
                    )))
                }
                Some(Slot::Allocating) | None => {
                    return Err(CellsError::NotFound(format!("cell {name} not found")))
                }
            }
            let names: Vec<CellName> = t
                .keys()
                .filter(|k| *k == name || k.is_descendant_of(name))
                .cloned()
                .collect();
            let mut entries = Vec::with_capacity(names.len());
            for n in &names {
                match t.get(n) {
                    Some(Slot::Ready(e)) => entries.push(e.clone()),
                    _ => {
                        return Err(CellsError::Precondition(format!(
                            "cell {n} (inside {name}) is being allocated or freed; try again"
                        )))
                    }
                }
            }
            for e in &entries {
                t.insert(e.name.clone(), Slot::Freeing(e.clone()));
            }
            entries
        };
        // Deepest first, so that children go before their parents.
        entries.sort_by_key(|e| std::cmp::Reverse(e.name.depth()));
        let result = self.teardown(name, &entries).await;
        let mut t = self.table();
        for e in &entries {
            let gone = match &result {
                Ok(()) => true,
                Err((_, removed)) => removed.contains(&e.name),
            };
            if gone {
                t.remove(&e.name);
            } else {
                e.execs.reopen();
                t.insert(e.name.clone(), Slot::Ready(e.clone()));
            }
        }
        drop(t);
        match result {
            Ok(()) => {
                tracing::info!("freed cell {name}");
                Ok(())
            }
            Err((e, _)) => Err(e),
        }
    }

    pub(super) async fn teardown(
        &self,
        name: &CellName,
        entries: &[Arc<CellEntry>],
    ) -> Result<(), (CellsError, Vec<CellName>)> {
        let t0 = std::time::Instant::now();
        // 1. Graceful stop of every executable, all at once.
        let mut stops = JoinSet::new();
        for e in entries {
            for exe in e.execs.close() {
                let grace = self.stop_grace;
                stops.spawn(async move { (exe.stop(grace).await, exe) });
            }
        }
        while let Some(r) = stops.join_next().await {
            match r {
                Ok((Ok(exit), exe)) => {
                    tracing::info!(
                        "stopped executable {:?} (pid {}): {exit}",
                        exe.name,
                        exe.pid,
                    );
                    self.forget(&exe);
                }
                Ok((Err(e), exe)) => {
                    tracing::warn!("{e}; the cgroup kill follows");
                    self.forget(&exe);
                }
                Err(e) => tracing::error!("stop task failed: {e}"),
            }
        }
        // 2. Holders (deepest first): SIGKILL ends their pid namespaces.
        for e in entries {
            let holder = e.holder.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(h) = holder {
                let pid = h.pid.pid;
                if !h.kill(HOLDER_WAIT).await {
                    tracing::warn!("holder of cell {} (pid {pid}) did not exit", e.name);
                }
            }
        }
        let t_stop = t0.elapsed();
        // 3. Whatever is left in the cgroups (forked and escaped processes).
        let backend = self.backend.clone();
        let root = name.clone();
        let killed =
            tokio::task::spawn_blocking(move || backend.kill_all(&root.components())).await;
        if let Ok(Err(e)) = killed {
            tracing::warn!("cannot kill the rest of cell {name}: {e}");
        }
        let t_kill = t0.elapsed();
        // 4. Cgroups, bottom-up.
        let mut removed = Vec::new();
        for e in entries {
            if let Err(err) = self.remove_cgroup(&e.name).await {
                return Err((err, removed));
            }
            self.store.remove_cell(e.name.as_str());
            removed.push(e.name.clone());
        }
        tracing::debug!(
            "free {name}: stop+holders {t_stop:?}, kill {:?}, rmdir {:?}",
            t_kill - t_stop,
            t0.elapsed() - t_kill
        );
        Ok(())
    }

    pub(super) async fn remove_cgroup(&self, name: &CellName) -> Result<(), CellsError> {
        let backend = self.backend.clone();
        let path = name.clone();
        tokio::task::spawn_blocking(move || backend.remove(&path.components(), REMOVE_TIMEOUT))
            .await
            .map_err(|e| CellsError::Internal(e.to_string()))?
            .map_err(Into::into)
    }

    /// Daemon shutdown. With [`OnExit::Keep`] everything is left running
    /// (recorded on disk) for the next start to re-adopt; with
    /// [`OnExit::Free`] every executable is stopped and every cell freed,
    /// concurrently.
    pub async fn shutdown(self: &Arc<Self>, policy: OnExit) {
        // The output directory made ahead for a next executable.
        self.store.drop_spare();
        if policy == OnExit::Keep {
            let cells = self.table().len();
            let execs = self.host.all().len()
                + self
                    .table()
                    .values()
                    .map(|s| match s {
                        Slot::Ready(e) | Slot::Freeing(e) => e.execs.all().len(),
                        Slot::Allocating => 0,
                    })
                    .sum::<usize>();
            tracing::info!(
                "leaving {cells} cells and {execs} executables running for the next start (--on-exit keep)"
            );
            return;
        }
        let roots: Vec<CellName> = self
            .table()
            .keys()
            .filter(|k| k.parent().is_none())
            .cloned()
            .collect();
        let mut set = JoinSet::new();
        for exe in self.host.close() {
            let cells = self.clone();
            set.spawn(async move {
                let _ = exe.stop(cells.stop_grace).await;
                cells.forget(&exe);
            });
        }
        for r in roots {
            let cells = self.clone();
            set.spawn(async move {
                if let Err(e) = cells.free(&r).await {
                    tracing::error!("cannot free cell {r} at shutdown: {e}");
                }
            });
        }
        while set.join_next().await.is_some() {}
        let backend = self.backend.clone();
        match tokio::task::spawn_blocking(move || backend.remove_root()).await {
            Ok(Err(e)) => tracing::warn!("cannot remove the cgroup root: {e}"),
            Err(e) => tracing::warn!("cannot remove the cgroup root: {e}"),
            Ok(Ok(())) => {}
        }
    }
}
