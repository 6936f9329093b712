//! Tearing cells down: Free (graceful stop, holders, cgroup kill, rmdir
//! bottom-up), daemon shutdown, and cells left by a daemon that was killed.

use std::sync::Arc;

use tokio::task::JoinSet;

use super::{
    state::{CellEntry, Cells, Slot, HOLDER_WAIT, REMOVE_TIMEOUT},
    validation::CellName,
    CellsError,
};

impl Cells {
    /// Kills and removes cells that an earlier run of the daemon left
    /// behind (it was killed before it could clean up): they live in our
    /// own subtree, and a new Allocate of the same name would fail on them.
    pub async fn reclaim_leftovers(&self) {
        let backend = self.backend.clone();
        let reclaimed = tokio::task::spawn_blocking(move || {
            let cells = backend.leftover_cells();
            for top in cells.iter().filter(|c| c.len() == 1) {
                let path: Vec<&str> = top.iter().map(String::as_str).collect();
                if let Err(e) = backend.kill_all(&path) {
                    tracing::warn!(
                        "cannot kill the processes of leftover cell {}: {e}",
                        top.join("/")
                    );
                }
            }
            let mut removed = 0;
            for cell in cells.iter().rev() {
                let path: Vec<&str> = cell.iter().map(String::as_str).collect();
                match backend.remove(&path, REMOVE_TIMEOUT) {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::warn!("cannot remove leftover cell {}: {e}", cell.join("/")),
                }
            }
            removed
        })
        .await
        .unwrap_or(0);
        if reclaimed > 0 {
            tracing::warn!("removed {reclaimed} cells left behind by an earlier run of auraed");
        }
    }

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

    async fn teardown(
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
                Ok((Ok(info), exe)) => {
                    tracing::info!(
                        "stopped executable {:?} (pid {}): {}",
                        exe.name,
                        exe.pid,
                        info.status
                    );
                    self.outputs.remove(exe.pid);
                }
                Ok((Err(e), exe)) => {
                    tracing::warn!("{e}; the cgroup kill follows");
                    self.outputs.remove(exe.pid);
                }
                Err(e) => tracing::error!("stop task failed: {e}"),
            }
        }
        // 2. Holders (deepest first): SIGKILL ends their pid namespaces.
        for e in entries {
            let holder = e.holder.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(mut h) = holder {
                let _ = h.child.start_kill();
                if tokio::time::timeout(HOLDER_WAIT, h.child.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!("holder of cell {} (pid {}) did not exit", e.name, h.pid);
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

    /// Daemon shutdown: stop everything and free every cell, concurrently.
    pub async fn shutdown(self: &Arc<Self>) {
        let roots: Vec<CellName> = self
            .table()
            .keys()
            .filter(|k| k.parent().is_none())
            .cloned()
            .collect();
        let mut set = JoinSet::new();
        for exe in self.host.close() {
            let grace = self.stop_grace;
            set.spawn(async move {
                let _ = exe.stop(grace).await;
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
