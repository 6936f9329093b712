//! GetPosixSignalsStream: events from the eBPF probe, optionally narrowed to
//! one cell's subtree by the target's cgroup id.
//!
//! A cell's processes (executables and everything they fork) live in its
//! `_exec` leaf of the unified (cgroup2) tree, and the probe reports the
//! target's cgroup2 id, which is that directory's inode. A filter therefore
//! keeps the inodes of the `_exec` leaves of the cell and its descendants.
//! Cells allocated after subscribing are picked up lazily: an id that is not
//! known triggers one look-up of the subtree. Ids are never reused (64-bit
//! kernfs ids), so an id found not to belong is remembered as such.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt,
    sync::Arc,
    time::Duration,
};

use aurae_proto::observe::{GetPosixSignalsStreamResponse, Signal};
use tokio::{
    sync::{broadcast, mpsc},
    time::Instant,
};
use tonic::Status;

use super::ObserveError;
use crate::{
    host::ebpf::SignalEvent,
    services::cells::{validation::CellName, Cells},
};

/// Ids remembered as "not in this subtree" before the memory is reset.
const MAX_MISSES: usize = 4096;
/// How often a cell stream checks that its cell still exists.
const CELL_CHECK: Duration = Duration::from_millis(250);
/// After the cell is freed, how long to keep delivering events that were
/// still on their way (Free's SIGTERM/SIGKILL) before ending the stream.
const FREED_GRACE: Duration = Duration::from_millis(300);

type Tx = mpsc::Sender<Result<GetPosixSignalsStreamResponse, Status>>;

/// Which cells' signals a stream may show (the caller's policy).
pub(super) type Visible = Arc<dyn Fn(&CellName) -> bool + Send + Sync>;

pub(super) struct CellFilter {
    cells: Arc<Cells>,
    /// The cell whose subtree the stream follows; None: the whole host
    /// (events of processes in no cell pass too).
    root: Option<CellName>,
    /// None: every cell of the subtree.
    visible: Option<Visible>,
    /// `_exec` inode per cell of the subtree (None: not found yet).
    known: HashMap<CellName, Option<u64>>,
    /// Inode -> whether its events pass, for every cell seen so far. Kept
    /// when the cell goes (ids are never reused): late events of a freed
    /// cell must not pass for the host's.
    ids: HashMap<u64, bool>,
    misses: HashSet<u64>,
}

impl CellFilter {
    pub(super) fn new(cells: Arc<Cells>, root: CellName) -> Result<Self, ObserveError> {
        let mut f = Self::build(cells, Some(root), None)?;
        if !f.refresh() {
            let root = f.root.take().map(|r| r.to_string()).unwrap_or_default();
            return Err(ObserveError::NotFound(format!("cell {root} not found")));
        }
        Ok(f)
    }

    /// The host-wide stream of a caller who may not see every cell: the
    /// host's processes and those of the cells `visible` keeps.
    pub(super) fn host_wide(cells: Arc<Cells>, visible: Visible) -> Result<Self, ObserveError> {
        let mut f = Self::build(cells, None, Some(visible))?;
        f.refresh();
        Ok(f)
    }

    /// Shows only the cells of the subtree that `visible` keeps.
    pub(super) fn only(mut self, visible: Visible) -> Self {
        self.visible = Some(visible);
        self.ids.clear();
        self.known.clear();
        self.refresh();
        self
    }

    fn build(
        cells: Arc<Cells>,
        root: Option<CellName>,
        visible: Option<Visible>,
    ) -> Result<Self, ObserveError> {
        // Any cell's name asks whether there is a unified tree at all.
        let components = root
            .as_ref()
            .map_or_else(|| vec!["any"], CellName::components);
        if cells.backend().unified_dir(&components).is_none() {
            return Err(ObserveError::Precondition(
                "signals of a cell need a cgroup2 (unified) hierarchy, which this host lacks"
                    .into(),
            ));
        }
        Ok(Self {
            cells,
            root,
            visible,
            known: HashMap::new(),
            ids: HashMap::new(),
            misses: HashSet::new(),
        })
    }

    /// Re-reads the subtree; false if the cell itself is gone.
    fn refresh(&mut self) -> bool {
        let names = match &self.root {
            Some(root) => match self.cells.subtree(root) {
                Some(names) => names,
                None => return false,
            },
            None => self.cells.names(),
        };
        let backend = self.cells.backend();
        let mut known = HashMap::with_capacity(names.len());
        for name in names {
            let ino = match self.known.get(&name) {
                Some(Some(ino)) => Some(*ino),
                // A cgroupfs stat: microseconds, fine on the runtime.
                _ => backend
                    .unified_dir(&name.components())
                    .and_then(|d| std::fs::metadata(d).ok())
                    .map(|m| m.ino()),
            };
            if let Some(ino) = ino {
                let pass = self.visible.as_ref().is_none_or(|v| v(&name));
                self.ids.insert(ino, pass);
            }
            known.insert(name, ino);
        }
        self.known = known;
        true
    }

    fn matches(&mut self, cgroup_id: u64) -> bool {
        // Not a cell's: the host's, which only a host-wide stream shows.
        let other = self.root.is_none();
        if let Some(pass) = self.ids.get(&cgroup_id) {
            return *pass;
        }
        if self.misses.contains(&cgroup_id) {
            return other;
        }
        self.refresh();
        if let Some(pass) = self.ids.get(&cgroup_id) {
            return *pass;
        }
        if self.misses.len() >= MAX_MISSES {
            self.misses.clear();
        }
        self.misses.insert(cgroup_id);
        other
    }

    fn cell_exists(&self) -> bool {
        self.root
            .as_ref()
            .is_none_or(|r| self.cells.subtree(r).is_some())
    }
}

fn item(e: SignalEvent) -> Result<GetPosixSignalsStreamResponse, Status> {
    Ok(GetPosixSignalsStreamResponse {
        signal: Some(Signal {
            signal: e.signal,
            process_id: e.pid,
        }),
    })
}

/// Forwards matching events until the client goes away, the cell is freed
/// (the stream then ends), or the stream lags: the `Signal` message cannot
/// say "n lost", so a lagging stream ends with DATA_LOSS rather than leave
/// a gap the client cannot see.
pub(super) async fn produce(
    mut live: broadcast::Receiver<SignalEvent>,
    mut filter: Option<CellFilter>,
    tx: Tx,
) {
    let mut check = tokio::time::interval(CELL_CHECK);
    let mut freed_at: Option<Instant> = None;
    loop {
        let event = tokio::select! {
            r = live.recv() => r,
            _ = check.tick(), if filter.is_some() => {
                match (freed_at, &filter) {
                    (None, Some(f)) if !f.cell_exists() => freed_at = Some(Instant::now()),
                    (Some(t), _) if t.elapsed() >= FREED_GRACE => return,
                    _ => {}
                }
                continue;
            }
        };
        let e = match event {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!("a signal stream fell behind by {n} events; ending it");
                let msg = format!("this stream fell behind; {n} signal events were dropped");
                let _ = tx.send(Err(Status::data_loss(msg))).await;
                return;
            }
            Err(broadcast::error::RecvError::Closed) => {
                let _ = tx
                    .send(Err(Status::unavailable("the signal probe stopped")))
                    .await;
                return;
            }
        };
        if let Some(f) = &mut filter {
            if !f.matches(e.cgroup_id) {
                continue;
            }
        }
        if tx.send(item(e)).await.is_err() {
            return;
        }
    }
}
