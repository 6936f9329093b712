//! Starting the holders of isolated cells, and the setup every process of
//! a cell goes through before exec (`ChildSetup`: joined to the cell's
//! cgroups first, so memory is charged to the cell from the first page,
//! then the cell's namespaces, always a cgroup namespace of its own).
//! Executables are started by their shim (`host::shim`), which applies the
//! same steps in its child.
//!
//! How a process gets into a pid namespace: `setns(CLONE_NEWPID)` and
//! `unshare(CLONE_NEWPID)` only change the namespace of the caller's future
//! children, and only for the calling thread. So the fork happens on a
//! short-lived thread that first enters (or creates) the pid namespace;
//! every other namespace is entered in the forked child, before exec.
//!
//! An isolated cell keeps its namespaces alive with a holder: `auraed`
//! itself re-executed in holder mode (see [`holder`]), PID 1 of the cell's
//! pid namespace, which only reaps orphans until it is killed.

pub mod fdpass;
pub mod holder;
pub mod namespaces;
pub mod reaper;

use std::{
    ffi::CString,
    fs::OpenOptions,
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::PathBuf,
    process::Stdio,
    sync::Arc,
};

use tokio::process::{Child, Command};

pub use namespaces::{Kind, NsSet};

use crate::host::proc::{self, ProcId};

/// argv[1] that makes `auraed` run as a cell's namespace holder.
pub const HOLDER_ARG: &str = "__aurae_cell_holder__";

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot open {path}: {source}")]
    Namespace { path: String, source: io::Error },
    #[error("cannot open cgroup file {path}: {source}")]
    CgroupFile { path: PathBuf, source: io::Error },
    #[error("cannot enter the pid namespace: {0}")]
    PidNamespace(io::Error),
    #[error("cannot start {what}: {source}")]
    Start {
        what: &'static str,
        source: io::Error,
    },
    #[error("the spawner thread died")]
    Thread,
}

/// What a cell's holder sets up.
#[derive(Debug)]
pub struct HolderSpec {
    /// `cgroup.procs` files of the cell.
    pub procs_files: Vec<PathBuf>,
    /// Namespaces inherited from the nearest isolated ancestor.
    pub parent_ns: Option<Arc<NsSet>>,
    /// New pid, ipc, uts and mount namespaces with a fresh /proc.
    pub new_process: bool,
    /// A new network namespace with loopback up.
    pub new_network: bool,
    pub hostname: String,
    /// Where the holder listens for spawn requests (see [`holder`]); None:
    /// the daemon starts every shim itself.
    pub socket: Option<PathBuf>,
}

/// A running holder and the namespaces it keeps alive. It is not tied to
/// the daemon's process: a new daemon re-adopts it by pid and start time
/// ([`Holder::adopt`]).
#[derive(Debug)]
pub struct Holder {
    /// The process whose namespaces the cell uses (PID 1 of its pid ns).
    pub pid: ProcId,
    /// For a nested pid namespace: the intermediate process (in the parent
    /// cell's pid namespace) whose child the holder is.
    pub intermediate: Option<ProcId>,
    pub ns: Arc<NsSet>,
    /// Whether it still runs; shared with the cells nested in it.
    pub life: Arc<HolderLife>,
    /// Its spawn socket, if it serves one.
    pub spawner: Option<PathBuf>,
}

/// A holder's liveness, answered from a pidfd (one poll, no /proc read:
/// List asks it for every cell).
#[derive(Debug)]
pub struct HolderLife {
    pub pid: ProcId,
    /// Readable once the holder has exited; None if it was already gone
    /// when the daemon looked.
    pidfd: Option<OwnedFd>,
}

impl HolderLife {
    pub fn is_alive(&self) -> bool {
        self.pidfd.as_ref().is_some_and(|fd| !proc::has_exited(fd))
    }

    /// A holder recorded by an earlier run that is gone.
    pub fn dead(pid: ProcId) -> Arc<Self> {
        Arc::new(Self { pid, pidfd: None })
    }
}

impl Holder {
    fn new(
        pid: i32,
        intermediate: Option<i32>,
        spawner: Option<PathBuf>,
    ) -> Result<Self, SpawnError> {
        let gone = || SpawnError::Start {
            what: "holder",
            source: io::Error::other("it exited right away"),
        };
        let id = ProcId::of(pid).ok_or_else(gone)?;
        let pidfd = id.open().ok_or_else(gone)?;
        let ns = Arc::new(NsSet::of_process(pid)?);
        Ok(Self {
            pid: id,
            intermediate: intermediate.and_then(ProcId::of),
            ns,
            life: Arc::new(HolderLife {
                pid: id,
                pidfd: Some(pidfd),
            }),
            spawner,
        })
    }

    /// Takes over the holder a previous run of the daemon started; None if
    /// that process is gone.
    pub fn adopt(
        pid: ProcId,
        intermediate: Option<ProcId>,
        spawner: Option<PathBuf>,
    ) -> Option<Self> {
        let pidfd = pid.open()?;
        let ns = NsSet::of_process(pid.pid).ok()?;
        // The namespaces were opened by pid: make sure it is still ours.
        pid.exists().then(|| Self {
            pid,
            intermediate,
            ns: Arc::new(ns),
            life: Arc::new(HolderLife {
                pid,
                pidfd: Some(pidfd),
            }),
            spawner: spawner.filter(|p| p.exists()),
        })
    }

    /// Whether the holder still runs (its namespaces can take processes).
    pub fn is_alive(&self) -> bool {
        self.life.is_alive()
    }

    /// SIGKILLs the holder (ending its pid namespace) and its intermediate,
    /// and waits, bounded, for the holder to be gone.
    pub async fn kill(self, timeout: std::time::Duration) -> bool {
        if let Some(p) = &self.spawner {
            let _ = std::fs::remove_file(p);
        }
        if let Some(i) = self.intermediate {
            i.signal(libc::SIGKILL);
        }
        let Some(fd) = self.life.pidfd.as_ref().and_then(|f| f.try_clone().ok()) else {
            return true;
        };
        let _ = proc::pidfd_send_signal(&fd, libc::SIGKILL);
        tokio::time::timeout(timeout, proc::exited(fd))
            .await
            .is_ok()
    }
}

/// How long a nested holder gets to report that its namespaces are ready.
const NESTED_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts the holder of an isolated cell.
pub async fn spawn_holder(spec: HolderSpec) -> Result<Holder, SpawnError> {
    let nested_pid = spec
        .parent_ns
        .as_ref()
        .is_some_and(|ns| ns.get(Kind::Pid).is_some());
    if spec.new_process && nested_pid {
        return spawn_nested_holder(spec).await;
    }
    let procs = open_procs(&spec.procs_files)?;
    let listener = listen(spec.socket.as_deref());
    let mut setup = ChildSetup {
        spawn_fd: listener.as_ref().map(AsRawFd::as_raw_fd),
        procs: procs.iter().map(AsRawFd::as_raw_fd).collect(),
        setns: spec
            .parent_ns
            .as_ref()
            .map(|ns| ns.non_pid())
            .unwrap_or_default(),
        unshare: libc::CLONE_NEWCGROUP,
        new_mount_proc: spec.new_process,
        hostname: None,
        loopback_up: spec.new_network,
        ids: None,
    };
    if spec.new_process {
        setup.unshare |= libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        setup.hostname = Some(CString::new(spec.hostname).map_err(|e| SpawnError::Start {
            what: "holder",
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?);
    }
    if spec.new_network {
        setup.unshare |= libc::CLONE_NEWNET;
    }
    let pid_ns = if spec.new_process {
        PidNs::New
    } else {
        spec.parent_ns.clone().map_or(PidNs::Inherit, PidNs::Enter)
    };
    let serving = listener.is_some();
    let child = fork_with(pid_ns, move || {
        let mut cmd = Command::new(holder_program());
        cmd.arg(HOLDER_ARG);
        if serving {
            cmd.arg(holder::SPAWN_ARG);
        }
        cmd.env_remove(crate::systemd::NOTIFY_SOCKET_ENV)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // It outlives the daemon (see Holder).
            .kill_on_drop(false);
        // SAFETY: the closure only makes async-signal-safe system calls
        // on data prepared before the fork (see ChildSetup::apply).
        unsafe { cmd.pre_exec(move || setup.apply()) };
        reaper::spawn_owned(&mut cmd).map_err(|source| SpawnError::Start {
            what: "holder",
            source,
        })
    })
    .await?;
    drop((procs, listener));
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or(SpawnError::Thread)?;
    // Not waited for here: dropped, tokio reaps it once it exits.
    drop(child);
    Holder::new(pid, None, spec.socket.filter(|_| serving))
}

/// A new pid namespace inside a cell that already has one. A thread cannot
/// unshare a pid namespace below the one it entered with setns, so an
/// intermediate process (in the parent cell's pid namespace) unshares it and
/// forks the holder, which sets up the other namespaces itself and reports
/// "ready" on the pipe (see `holder::nested_main`).
async fn spawn_nested_holder(spec: HolderSpec) -> Result<Holder, SpawnError> {
    use tokio::io::AsyncBufReadExt;
    let procs = open_procs(&spec.procs_files)?;
    let listener = listen(spec.socket.as_deref());
    let serving = listener.is_some();
    let setup = ChildSetup {
        spawn_fd: listener.as_ref().map(AsRawFd::as_raw_fd),
        procs: procs.iter().map(AsRawFd::as_raw_fd).collect(),
        setns: spec
            .parent_ns
            .as_ref()
            .map(|ns| ns.non_pid())
            .unwrap_or_default(),
        unshare: libc::CLONE_NEWPID | libc::CLONE_NEWCGROUP,
        new_mount_proc: false,
        hostname: None,
        loopback_up: false,
        ids: None,
    };
    let hostname = spec.hostname.clone();
    let net = if spec.new_network { "net" } else { "-" };
    let mut child = fork_with(
        spec.parent_ns.clone().map_or(PidNs::Inherit, PidNs::Enter),
        move || {
            let mut cmd = Command::new(holder_program());
            cmd.args([HOLDER_ARG, holder::NESTED, &hostname, net]);
            if serving {
                cmd.arg(holder::SPAWN_ARG);
            }
            cmd.env_remove(crate::systemd::NOTIFY_SOCKET_ENV)
                .current_dir("/")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                // It outlives the daemon (see Holder).
                .kill_on_drop(false);
            // SAFETY: the closure only makes async-signal-safe system calls
            // on data prepared before the fork (see ChildSetup::apply).
            unsafe { cmd.pre_exec(move || setup.apply()) };
            cmd.spawn().map_err(|source| SpawnError::Start {
                what: "holder",
                source,
            })
        },
    )
    .await?;
    drop((procs, listener));
    let not_ready = |why: String| SpawnError::Start {
        what: "nested holder",
        source: io::Error::other(why),
    };
    let inter = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or(SpawnError::Thread)?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| not_ready("no pipe".into()))?;
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(stdout);
    match tokio::time::timeout(NESTED_READY_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) if line.trim() == holder::READY => {}
        Ok(_) => return Err(not_ready(format!("it failed: {}", line.trim()))),
        Err(_) => return Err(not_ready("it did not get ready in time".into())),
    }
    // The holder is the intermediate's only child; /proc shows it by host pid.
    let children =
        std::fs::read_to_string(format!("/proc/{inter}/task/{inter}/children")).unwrap_or_default();
    let pid: i32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| not_ready("its holder process is gone".into()))?;
    drop(child);
    Holder::new(pid, Some(inter), spec.socket.filter(|_| serving))
}

/// The holder's listening spawn socket at `path` (root only); None (the
/// daemon then starts the cell's shims itself) if it cannot be made.
fn listen(path: Option<&std::path::Path>) -> Option<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let path = path?;
    let _ = std::fs::remove_file(path);
    match fdpass::seqpacket(path, true).and_then(|fd| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(fd)
    }) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::warn!(
                "cannot listen on {}: {e}; the daemon starts this cell's shims",
                path.display()
            );
            let _ = std::fs::remove_file(path);
            None
        }
    }
}

fn open_procs(files: &[PathBuf]) -> Result<Vec<OwnedFd>, SpawnError> {
    files
        .iter()
        .map(|p| {
            OpenOptions::new()
                .write(true)
                .open(p)
                .map(OwnedFd::from)
                .map_err(|source| SpawnError::CgroupFile {
                    path: p.clone(),
                    source,
                })
        })
        .collect()
}

/// The holder program: `aurae-holder` next to the daemon's binary when it
/// is there (small: a few hundred KiB less per isolated cell), else the
/// daemon itself re-executed. The path is resolved once, at the first cell,
/// while it still names the binary we run.
fn holder_program() -> &'static std::path::Path {
    static PROGRAM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PROGRAM.get_or_init(|| {
        std::env::current_exe()
            .ok()
            .map(|exe| exe.with_file_name("aurae-holder"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
    })
}

/// Which pid namespace the child is forked into.
enum PidNs {
    Inherit,
    Enter(Arc<NsSet>),
    New,
}

/// Runs `spawn` (which forks) on a thread whose children land in `pid_ns`.
async fn fork_with<F>(pid_ns: PidNs, spawn: F) -> Result<Child, SpawnError>
where
    F: FnOnce() -> Result<Child, SpawnError> + Send + 'static,
{
    let enter: Option<(RawFd, Arc<NsSet>)> = match &pid_ns {
        PidNs::Enter(ns) => ns.get(Kind::Pid).map(|fd| (fd, ns.clone())),
        _ => None,
    };
    let new = matches!(pid_ns, PidNs::New);
    if enter.is_none() && !new {
        // Same pid namespace as the daemon: fork right here.
        return spawn();
    }
    let handle = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("aurae-spawn".into())
        .spawn(move || {
            let _rt = handle.enter();
            let r = (|| {
                if let Some((fd, _keep_open)) = &enter {
                    // SAFETY: fd is a namespace fd kept open by `_keep_open`.
                    if unsafe { libc::setns(*fd, libc::CLONE_NEWPID) } != 0 {
                        return Err(SpawnError::PidNamespace(io::Error::last_os_error()));
                    }
                }
                // SAFETY: unshare only affects this thread's future children.
                if new && unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
                    return Err(SpawnError::PidNamespace(io::Error::last_os_error()));
                }
                spawn()
            })();
            let _ = tx.send(r);
            // This thread's pid namespace for children is now changed: it
            // ends here and is never reused.
        })
        .map_err(|source| SpawnError::Start {
            what: "spawner thread",
            source,
        })?;
    rx.await.map_err(|_| SpawnError::Thread)?
}

/// Everything the forked child does before exec, prepared in the parent so
/// that the child makes only async-signal-safe system calls.
struct ChildSetup {
    /// The holder's spawn socket, moved to fd [`holder::SPAWN_FD`] last.
    spawn_fd: Option<RawFd>,
    procs: Vec<RawFd>,
    setns: Vec<(libc::c_int, RawFd)>,
    unshare: libc::c_int,
    new_mount_proc: bool,
    hostname: Option<CString>,
    loopback_up: bool,
    ids: Option<(u32, u32)>,
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl ChildSetup {
    /// Runs in the forked child. Order matters: join the cgroups first (as
    /// root, before any namespace change), enter inherited namespaces, make
    /// new ones, and drop privileges last.
    fn apply(&self) -> io::Result<()> {
        // The daemon raised its own open-file limit; workloads (forked by
        // the holder's shims) get the one it was given.
        crate::host::rlimit::restore_nofile();
        for &fd in &self.procs {
            // SAFETY: fd is an open cgroup.procs file; "0" means "me".
            if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        for &(flag, fd) in &self.setns {
            // SAFETY: fd is an open namespace file of kind `flag`.
            check(unsafe { libc::setns(fd, flag) })?;
        }
        if self.unshare != 0 {
            // SAFETY: plain system call on a single-threaded child.
            check(unsafe { libc::unshare(self.unshare) })?;
        }
        if self.new_mount_proc {
            // SAFETY: constant C strings; the mount namespace is our own
            // (made private first, so nothing propagates to the host).
            unsafe {
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                check(libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ))?;
            }
        }
        if let Some(name) = &self.hostname {
            // SAFETY: name is a valid C string of the given length.
            check(unsafe { libc::sethostname(name.as_ptr(), name.as_bytes().len()) })?;
        }
        if self.loopback_up {
            loopback_up()?;
        }
        if let Some((uid, gid)) = self.ids {
            // SAFETY: plain system calls; the group list is emptied so no
            // supplementary group of the daemon leaks into the workload.
            unsafe {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
            }
        }
        if let Some(fd) = self.spawn_fd {
            // Last: the fds used above may have had that number.
            if fd == holder::SPAWN_FD {
                // SAFETY: clearing close-on-exec on an fd of ours.
                check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) })?;
            } else {
                // SAFETY: plain system call on an fd of ours; the copy has
                // close-on-exec cleared.
                check(unsafe { libc::dup2(fd, holder::SPAWN_FD) })?;
            }
        }
        Ok(())
    }
}

/// `ip link set lo up` with two ioctls.
pub(crate) fn loopback_up() -> io::Result<()> {
    // SAFETY: a zeroed ifreq is valid; the name fits; the socket is closed
    // on every path.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        check(sock)?;
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l' as libc::c_char;
        req.ifr_name[1] = b'o' as libc::c_char;
        let mut r = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req);
        if r == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            r = libc::ioctl(sock, libc::SIOCSIFFLAGS, &req);
        }
        let err = io::Error::last_os_error();
        libc::close(sock);
        if r < 0 {
            return Err(err);
        }
    }
    Ok(())
}
