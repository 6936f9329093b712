//! Kernel work on a pod's namespaces from the daemon's side: pinning the
//! network namespace of a sandbox's holder on a file of ours (so that CNI
//! DEL still works after the holder is gone, as containerd pins its
//! netns), and short-lived threads that `setns()` into the holder's
//! namespaces to set the hostname and write namespaced sysctls. Such a
//! thread changes only its own namespaces (`setns` of the uts, ipc and net
//! kinds is per thread) and ends right after, so nothing else of the daemon
//! ever runs in a pod's namespaces.

use std::{
    fs::File,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use nix::{
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{setns, CloneFlags},
};

#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error("cannot pin the network namespace of pid {pid} on {path}: {source}")]
    Pin {
        pid: i32,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot unpin the network namespace {path}: {source}")]
    Unpin { path: PathBuf, source: io::Error },
    #[error("cannot enter the {kind} namespace of pid {pid}: {source}")]
    Enter {
        kind: &'static str,
        pid: i32,
        source: io::Error,
    },
    #[error("sethostname {name:?}: {source}")]
    Hostname { name: String, source: io::Error },
    #[error("sysctl {name}: {source}")]
    Sysctl { name: String, source: io::Error },
    #[error("the namespace thread panicked")]
    Thread,
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Bind-mounts `/proc/<pid>/ns/net` onto `path` (created empty). Undoes
/// itself on failure.
pub fn pin_netns(pid: i32, path: &Path) -> Result<(), NsError> {
    let err = |source| NsError::Pin {
        pid,
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    File::create(path).map_err(err)?;
    let src = format!("/proc/{pid}/ns/net");
    if let Err(e) = mount(
        Some(src.as_str()),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    ) {
        let _ = std::fs::remove_file(path);
        return Err(err(errno(e)));
    }
    Ok(())
}

/// Unmounts and removes a pinned netns; a path that is not there (or not
/// mounted) is fine, so this can run any number of times.
pub fn unpin_netns(path: &Path) -> Result<(), NsError> {
    let err = |source| NsError::Unpin {
        path: path.to_owned(),
        source,
    };
    match umount2(path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (already unmounted); ENOENT: no file.
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(err(errno(e))),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// Whether `path` is a mounted namespace file (nsfs).
pub fn is_pinned(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Namespaces a thread can enter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ns {
    Net,
    Ipc,
    Uts,
}

impl Ns {
    fn name(self) -> &'static str {
        match self {
            Ns::Net => "net",
            Ns::Ipc => "ipc",
            Ns::Uts => "uts",
        }
    }
    fn flag(self) -> CloneFlags {
        match self {
            Ns::Net => CloneFlags::CLONE_NEWNET,
            Ns::Ipc => CloneFlags::CLONE_NEWIPC,
            Ns::Uts => CloneFlags::CLONE_NEWUTS,
        }
    }
}

/// Runs `f` on a new thread that first entered the namespaces `kinds` of
/// process `pid`; blocking (call it off the async runtime).
pub fn in_namespaces<T: Send>(
    pid: i32,
    kinds: &[Ns],
    f: impl FnOnce() -> Result<T, NsError> + Send,
) -> Result<T, NsError> {
    // Opened here so that a pid that is gone fails before any thread.
    let mut fds = Vec::with_capacity(kinds.len());
    for &k in kinds {
        let f = File::open(format!("/proc/{pid}/ns/{}", k.name())).map_err(|source| {
            NsError::Enter {
                kind: k.name(),
                pid,
                source,
            }
        })?;
        fds.push((k, f));
    }
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                for (k, fd) in &fds {
                    setns(fd.as_fd(), k.flag()).map_err(|e| NsError::Enter {
                        kind: k.name(),
                        pid,
                        source: errno(e),
                    })?;
                }
                f()
            })
            .join()
            .map_err(|_| NsError::Thread)?
    })
}

/// Sets the hostname in the uts namespace of `pid`.
pub fn set_hostname(pid: i32, name: &str) -> Result<(), NsError> {
    in_namespaces(pid, &[Ns::Uts], || {
        nix::unistd::sethostname(name).map_err(|e| NsError::Hostname {
            name: name.to_owned(),
            source: errno(e),
        })
    })
}

/// The kind of namespace a sysctl belongs to: the ones Kubernetes calls
/// namespaced (`net.*` per network namespace; `kernel.shm*`, `kernel.msg*`,
/// `kernel.sem`, `fs.mqueue.*` per ipc namespace). None: a node-wide one.
pub fn sysctl_namespace(path: &str) -> Option<Ns> {
    if path.starts_with("net/") {
        Some(Ns::Net)
    } else if path.starts_with("kernel/shm")
        || path.starts_with("kernel/msg")
        || path == "kernel/sem"
        || path.starts_with("fs/mqueue/")
    {
        Some(Ns::Ipc)
    } else {
        None
    }
}

/// The path under /proc/sys of a sysctl named with dots
/// (`net.ipv4.ip_forward`) or slashes (`net/ipv4/conf/eth0.100/forwarding`,
/// where a dot belongs to a component), as sysctl(8) takes both. None if
/// it could leave /proc/sys.
pub fn sysctl_path(name: &str) -> Option<String> {
    let path: String = if name.contains('/') {
        name.to_owned()
    } else {
        name.replace('.', "/")
    };
    let ok = !path.is_empty()
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
    ok.then_some(path)
}

/// Writes sysctls (`/proc/sys` path, value) inside the namespaces of
/// `pid`: procfs resolves `/proc/sys/net` and the ipc sysctls by the
/// namespaces of the thread that opens them.
pub fn write_sysctls(pid: i32, kinds: &[Ns], sysctls: &[(String, String)]) -> Result<(), NsError> {
    if sysctls.is_empty() {
        return Ok(());
    }
    in_namespaces(pid, kinds, || {
        for (path, value) in sysctls {
            std::fs::write(format!("/proc/sys/{path}"), value.as_bytes()).map_err(|source| {
                NsError::Sysctl {
                    name: path.replace('/', "."),
                    source,
                }
            })?;
        }
        Ok(())
    })
}

/// Counters of one interface from `/proc/<pid>/net/dev` (which shows the
/// network namespace of that process).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IfStats {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
}

pub fn parse_net_dev(text: &str) -> Vec<IfStats> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let v: Vec<u64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            // rx: bytes packets errs drop fifo frame compressed multicast;
            // tx: bytes packets errs ...
            (v.len() >= 11).then(|| IfStats {
                name: name.trim().to_owned(),
                rx_bytes: v[0],
                rx_errors: v[2],
                tx_bytes: v[8],
                tx_errors: v[10],
            })
        })
        .collect()
}

pub fn net_dev(pid: i32) -> io::Result<Vec<IfStats>> {
    Ok(parse_net_dev(&std::fs::read_to_string(format!(
        "/proc/{pid}/net/dev"
    ))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_names_and_namespaces() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").as_deref(),
            Some("net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/forwarding").as_deref(),
            Some("net/ipv4/conf/eth0.100/forwarding")
        );
        assert_eq!(sysctl_path("net/../../etc"), None);
        assert_eq!(sysctl_path("net..x"), None);
        assert_eq!(sysctl_path(""), None);
        assert_eq!(sysctl_namespace("net/ipv4/ip_forward"), Some(Ns::Net));
        assert_eq!(sysctl_namespace("kernel/shm_rmid_forced"), Some(Ns::Ipc));
        assert_eq!(sysctl_namespace("kernel/msgmax"), Some(Ns::Ipc));
        assert_eq!(sysctl_namespace("kernel/sem"), Some(Ns::Ipc));
        assert_eq!(sysctl_namespace("fs/mqueue/msg_max"), Some(Ns::Ipc));
        assert_eq!(sysctl_namespace("kernel/pid_max"), None);
        assert_eq!(sysctl_namespace("vm/swappiness"), None);
    }

    #[test]
    fn net_dev_counters() {
        let t = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0\n  eth0:    5000      40    1    0    0     0          0         0     3000      30    2    0    0     0       0          0\n";
        let v = parse_net_dev(t);
        assert_eq!(v.len(), 2);
        assert_eq!(
            v[1],
            IfStats {
                name: "eth0".into(),
                rx_bytes: 5000,
                rx_errors: 1,
                tx_bytes: 3000,
                tx_errors: 2
            }
        );
    }
}
