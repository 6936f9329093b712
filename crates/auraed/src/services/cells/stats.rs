//! `CellService.Stats` (an extension): each cell's usage, read from its
//! cgroup files at the time of the call, through the backend that is
//! active (`host::cgroup`). The metrics endpoint reads the same numbers.

use std::{collections::BTreeMap, io, sync::Arc, time::SystemTime};

use aurae_proto::cells::CellStats as ProtoStats;

use super::{
    state::{CellEntry, Cells, Slot},
    validation::CellName,
    CellsError,
};
use crate::host::cgroup::{CellStats, CgroupError};

impl Cells {
    /// (name, stats) of `of` (with `recursive`, also every cell below it),
    /// or of every ready cell when `of` is None, sorted by name. A named
    /// cell that is not there (or being freed) is NotFound; in the other
    /// cases a cell freed while we read is left out.
    pub async fn stats(
        self: &Arc<Self>,
        of: Option<&CellName>,
        recursive: bool,
    ) -> Result<Vec<(CellName, CellStats)>, CellsError> {
        let cells = self.clone();
        let of = of.cloned();
        // Reading a few small files per cell: blocking, off the runtime.
        tokio::task::spawn_blocking(move || cells.read_stats(of.as_ref(), recursive))
            .await
            .map_err(|e| CellsError::Internal(format!("stats reader failed: {e}")))?
    }

    /// [`Cells::stats`], blocking (the metrics collector runs on a blocking thread).
    pub fn read_stats(
        &self,
        of: Option<&CellName>,
        recursive: bool,
    ) -> Result<Vec<(CellName, CellStats)>, CellsError> {
        let names: Vec<CellName> = {
            let table = self.table();
            if let Some(name) = of {
                if !matches!(table.get(name), Some(Slot::Ready(_))) {
                    return Err(CellsError::NotFound(format!("cell {name} not found")));
                }
            }
            table
                .iter()
                .filter(|(_, slot)| matches!(slot, Slot::Ready(_)))
                .map(|(n, _)| n)
                .filter(|n| match of {
                    None => true,
                    Some(o) => *n == o || (recursive && n.is_descendant_of(o)),
                })
                .cloned()
                .collect()
        };
        let named = of.is_some() && !recursive;
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            match self.backend.stats(&n.components()) {
                Ok(s) => out.push((n, s)),
                Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    if named {
                        return Err(CellsError::NotFound(format!("cell {n} not found")));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// How many cells are ready, and how many executables (host context
    /// included) are in each state (`running`, `exited`, `unknown`).
    pub fn counts(&self) -> (u64, BTreeMap<String, u64>) {
        let entries: Vec<Arc<CellEntry>> = self
            .table()
            .values()
            .filter_map(|s| match s {
                Slot::Ready(e) => Some(e.clone()),
                _ => None,
            })
            .collect();
        let mut states: BTreeMap<String, u64> = ["running", "exited", "unknown"]
            .into_iter()
            .map(|s| (s.to_owned(), 0))
            .collect();
        let execs = entries
            .iter()
            .flat_map(|e| e.execs.all())
            .chain(self.host.all());
        for x in execs {
            *states.entry(x.status().state).or_default() += 1;
        }
        (entries.len() as u64, states)
    }
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub fn to_proto(name: &CellName, s: &CellStats) -> ProtoStats {
    ProtoStats {
        cell_name: name.to_string(),
        cpu_usage_ns: s.cpu_usage_ns,
        cpu_user_ns: s.cpu_user_ns,
        cpu_system_ns: s.cpu_system_ns,
        cpu_periods: s.cpu_periods,
        cpu_throttled_periods: s.cpu_throttled_periods,
        cpu_throttled_ns: s.cpu_throttled_ns,
        memory_usage_bytes: s.memory_usage_bytes,
        memory_working_set_bytes: s.memory_working_set_bytes,
        memory_rss_bytes: s.memory_rss_bytes,
        memory_cache_bytes: s.memory_cache_bytes,
        memory_limit_bytes: s.memory_limit_bytes,
        oom_kills: s.oom_kills,
        pids_current: s.pids_current,
        pids_limit: s.pids_limit,
        io_read_bytes: s.io_read_bytes,
        io_write_bytes: s.io_write_bytes,
        io_read_ops: s.io_read_ops,
        io_write_ops: s.io_write_ops,
    }
}
