//! The per-executable shim (`aurae-shim`): the parent of one executable.
//!
//! Why a shim: nothing an executable needs may die with the daemon (see
//! the README's "Durability" section). The shim, not auraed, is the
//! executable's parent: it holds the read ends of its stdout and stderr
//! pipes and writes them to size-capped files in the executable's
//! directory (see [`format`]), and it is the one that sees the exit and
//! records it (`exit.json`). It runs in the daemon's own namespaces and
//! cgroup; only the executable it forks joins the cell (cgroups, then
//! namespaces, then uid/gid, as `ChildSetup` does for holders).
//!
//! After the exit, the shim keeps the executable a zombie (so its pid and
//! process group id cannot be reused) while other members of its process
//! group live on or its pipes are open, so that Stop can still signal the
//! group; then it reaps it and exits. SIGUSR1 from the daemon (Stop, Free)
//! makes it reap and exit at once. It ignores SIGTERM, SIGINT and SIGHUP.

pub mod format;

use std::{path::PathBuf, sync::Arc};

use crate::host::{
    proc::ProcId,
    spawn::{NsSet, SpawnError},
};

/// argv[1] that makes `auraed` run as a shim (when `aurae-shim` is not
/// installed next to it).
pub const SHIM_ARG: &str = "__aurae_shim__";

/// What to start, where.
#[derive(Debug)]
pub struct ShimSpec {
    /// The executable's directory (exists; output and exit.json go here).
    pub dir: PathBuf,
    /// Run as `/bin/sh -c COMMAND`.
    pub command: String,
    /// `cgroup.procs` files of the cell; empty for the host context.
    pub procs_files: Vec<PathBuf>,
    /// The cell's namespaces (None: the host's).
    pub ns: Option<Arc<NsSet>>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Bytes of output kept per channel.
    pub output_cap: u64,
}

/// A started executable and its shim.
#[derive(Debug, Clone, Copy)]
pub struct Spawned {
    pub shim: ProcId,
    /// The executable (host pid).
    pub pid: ProcId,
}

/// Starts a shim that starts the executable; returns once the executable
/// was exec'd (or why it could not be).
pub async fn spawn(spec: ShimSpec) -> Result<Spawned, SpawnError> {
    let _ = spec;
    Err(SpawnError::Thread)
}

/// The shim program.
pub fn main() -> ! {
    std::process::exit(1)
}
