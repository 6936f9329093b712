//! Namespaces of a cell, held open as file descriptors so that every
//! executable of the cell can enter them.

use std::{
    fs::File,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    os::unix::fs::MetadataExt,
};

use super::SpawnError;

/// The namespace kinds a cell can own, with their `/proc/PID/ns` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pid,
    Mnt,
    Uts,
    Ipc,
    Net,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Pid, Kind::Mnt, Kind::Uts, Kind::Ipc, Kind::Net];

    fn proc_name(self) -> &'static str {
        match self {
            Kind::Pid => "pid",
            Kind::Mnt => "mnt",
            Kind::Uts => "uts",
            Kind::Ipc => "ipc",
            Kind::Net => "net",
        }
    }

    pub fn clone_flag(self) -> libc::c_int {
        match self {
            Kind::Pid => libc::CLONE_NEWPID,
            Kind::Mnt => libc::CLONE_NEWNS,
            Kind::Uts => libc::CLONE_NEWUTS,
            Kind::Ipc => libc::CLONE_NEWIPC,
            Kind::Net => libc::CLONE_NEWNET,
        }
    }
}

/// The namespaces (those that differ from the daemon's own) that processes
/// of a cell enter. Empty means "the host's".
#[derive(Debug, Default)]
pub struct NsSet {
    fds: Vec<(Kind, OwnedFd)>,
}

impl NsSet {
    /// Opens the namespaces of `pid` that differ from the daemon's own.
    pub fn of_process(pid: i32) -> Result<Self, SpawnError> {
        let mut fds = Vec::new();
        for kind in Kind::ALL {
            // For pid, /proc/PID/ns/pid is the namespace the process lives in
            // (a holder is its init), which is the one its children join.
            let theirs = format!("/proc/{pid}/ns/{}", kind.proc_name());
            let ours = format!("/proc/self/ns/{}", kind.proc_name());
            let io = |path: &str| {
                let path = path.to_owned();
                move |source| SpawnError::Namespace { path, source }
            };
            let their_ino = std::fs::metadata(&theirs).map_err(io(&theirs))?.ino();
            let our_ino = std::fs::metadata(&ours).map_err(io(&ours))?.ino();
            if their_ino != our_ino {
                fds.push((kind, File::open(&theirs).map_err(io(&theirs))?.into()));
            }
        }
        Ok(Self { fds })
    }

    pub fn get(&self, kind: Kind) -> Option<RawFd> {
        self.fds
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, fd)| fd.as_raw_fd())
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Raw fds of every kind but pid, to enter in a forked child (pid is
    /// entered by the forking thread, see `super::in_pid_namespace`).
    pub fn non_pid(&self) -> Vec<(libc::c_int, RawFd)> {
        self.fds
            .iter()
            .filter(|(k, _)| *k != Kind::Pid)
            .map(|(k, fd)| (k.clone_flag(), fd.as_raw_fd()))
            .collect()
    }
}
