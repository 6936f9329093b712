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

pub mod clone3;
pub mod fdpass;
pub mod holder;
pub mod namespaces;
pub mod reaper;
pub mod vfork;

use std::{
    ffi::CString,
    fs::OpenOptions,
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::PathBuf,
    process::Stdio,
    sync::Arc,
};

use tokio::process::Command;

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
    /// The cell's cgroup2 directory (pure v2, or the hybrid mirror), whose
    /// `cgroup.procs` is one of `procs_files`: the holder is forked into it
    /// with `clone3(CLONE_INTO_CGROUP)` (see [`clone3`]) where the kernel
    /// can, instead of migrating there.
    pub into: Option<PathBuf>,
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
    let into = spec
        .into
        .as_ref()
        .filter(|_| !clone3::known_unsupported())
        .and_then(|d| {
            let skip = d.join("cgroup.procs");
            let i = spec.procs_files.iter().position(|p| *p == skip)?;
            clone3::open_dir(d).ok().map(|fd| (i, fd))
        });
    // clone3 into the cgroup2 directory only where it makes every
    // migration needless (pure v2). Where v1 controllers still need their
    // `cgroup.procs` writes (hybrid), the first of them waits for an RCU
    // grace period anyway, and the holder is started with vfork instead
    // (below), which a clone3 without a stack of its own cannot do.
    let into = into.filter(|_| spec.procs_files.len() == 1);
    if let Some((skip, dir)) = into {
        // The same setup without the write the clone makes needless.
        let mut fast = setup.clone();
        fast.procs.remove(skip);
        let mut argv = vec![HOLDER_ARG];
        if serving {
            argv.push(holder::SPAWN_ARG);
        }
        let exec = Exec::new(holder_program(), &argv)?;
        let pid_ns_fast = match &pid_ns {
            PidNs::Inherit => PidNs::Inherit,
            PidNs::Enter(ns) => PidNs::Enter(ns.clone()),
            PidNs::New => PidNs::New,
        };
        let r = fork_with(pid_ns_fast, move || {
            let r = spawn_into(Some(&dir), &fast, &exec);
            drop(dir);
            r
        })
        .await?;
        if let Some(pid) = r {
            drop((procs, listener));
            note_into("holders", spec.into.as_deref());
            return Holder::new(pid, None, spec.socket.filter(|_| serving));
        }
        // Unsupported: nothing was forked; the old way below.
    }
    let mut argv = vec![HOLDER_ARG];
    if serving {
        argv.push(holder::SPAWN_ARG);
    }
    let exec = Exec::new(holder_program(), &argv)?;
    let vforked = fork_with(pid_ns, move || spawn_into(None, &setup, &exec)).await?;
    drop((procs, listener));
    let pid = vforked.ok_or(SpawnError::Thread)?;
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

/// Says once in the log that clone3 placed a process in its cgroup (the
/// VM test looks for the line), with the first directory.
pub(crate) fn note_into(what: &str, dir: Option<&std::path::Path>) {
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
    if said.iter().any(|w| w == what) {
        return;
    }
    said.push(what.to_owned());
    tracing::info!(
        "start path: {what} are forked into their cgroup with clone3(CLONE_INTO_CGROUP) (first: {})",
        dir.map_or_else(String::new, |d| d.display().to_string())
    );
}

/// A program and its argv/envp as C arrays, built before a fork.
struct Exec {
    _strings: Vec<CString>,
    program: *const libc::c_char,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

// SAFETY: the pointers point into `_strings`, owned by the value and never
// changed; moving it to the spawner thread moves them together.
unsafe impl Send for Exec {}

impl Exec {
    /// `program argv..` with the daemon's environment minus NOTIFY_SOCKET
    /// (workloads must not speak for the daemon, see systemd.rs).
    fn new(program: &std::path::Path, args: &[&str]) -> Result<Self, SpawnError> {
        use std::os::unix::ffi::OsStrExt;
        let bad = |e: std::ffi::NulError| SpawnError::Start {
            what: "holder",
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        };
        let mut strings = vec![CString::new(program.as_os_str().as_bytes()).map_err(bad)?];
        for a in args {
            strings.push(CString::new(*a).map_err(bad)?);
        }
        let n_args = strings.len();
        for (k, v) in std::env::vars_os() {
            if k == crate::systemd::NOTIFY_SOCKET_ENV {
                continue;
            }
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            // A variable with a NUL cannot be passed; std skips it too.
            if let Ok(c) = CString::new(kv) {
                strings.push(c);
            }
        }
        // A CString's bytes live on the heap: moving the Vec does not move
        // them, so these pointers stay valid.
        let mut argv: Vec<_> = strings[..n_args].iter().map(|c| c.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<_> = strings[n_args..].iter().map(|c| c.as_ptr()).collect();
        envp.push(std::ptr::null());
        Ok(Self {
            program: strings[0].as_ptr(),
            _strings: strings,
            argv,
            envp,
        })
    }
}

/// Starts a child that applies `setup`, puts /dev/null on stdin and
/// stdout (stderr is the daemon's) and execs `exec`: with
/// `clone3(CLONE_INTO_CGROUP)` into the cgroup2 directory `dir` when one
/// is given, else the way posix_spawn does (`clone(CLONE_VM |
/// CLONE_VFORK)` on a stack of its own: the daemon's memory, tens of MiB
/// over many threads, is neither copied nor made copy-on-write, and this
/// thread sleeps until the exec). Returns once it exec'd (an error pipe
/// with close-on-exec tells), None if the kernel cannot clone into a
/// cgroup (nothing was forked). The child is recorded as owned and reaped
/// by a task of its own once it exits (nobody reads its status).
fn spawn_into(
    dir: Option<&OwnedFd>,
    setup: &ChildSetup,
    exec: &Exec,
) -> Result<Option<i32>, SpawnError> {
    let fail = |source: io::Error| SpawnError::Start {
        what: "holder",
        source,
    };
    let devnull: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(fail)?
        .into();
    let mut p = [0 as RawFd; 2];
    // SAFETY: a valid array of two fds to fill.
    check(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }).map_err(fail)?;
    // SAFETY: two new fds owned by nobody else.
    let (err_r, err_w) = unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1]))
    };
    let guard = reaper::lock_owned();
    let pid = match dir {
        Some(dir) => {
            // SAFETY: the child makes only async-signal-safe calls
            // (ChildSetup::apply, dup2, chdir, sigaction, sigprocmask,
            // execve, write, _exit) on data prepared above, and never
            // returns.
            let forked = unsafe { clone3::fork_into(dir.as_raw_fd()) }.map_err(fail)?;
            match forked {
                Err(clone3::Unsupported(e)) => {
                    tracing::info!(
                        "clone3(CLONE_INTO_CGROUP) unavailable ({e}): processes migrate into their cgroups"
                    );
                    return Ok(None);
                }
                Ok(clone3::Forked::Child) => {
                    child_exec(setup, exec, devnull.as_raw_fd(), err_w.as_raw_fd())
                }
                Ok(clone3::Forked::Parent(pid)) => pid,
            }
        }
        // SAFETY: child_exec makes only async-signal-safe calls on data
        // prepared above (ids by raw syscalls) and never returns.
        None => unsafe {
            vfork::spawn(&|| child_exec(setup, exec, devnull.as_raw_fd(), err_w.as_raw_fd()))
        }
        .map_err(fail)?,
    };
    reaper::record_locked(guard, pid);
    drop(err_w);
    let mut buf = [0u8; 4];
    let n = loop {
        // SAFETY: reading into a buffer of ours.
        let n = unsafe { libc::read(err_r.as_raw_fd(), buf.as_mut_ptr().cast(), 4) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    if n > 0 {
        // SAFETY: waiting for our own child, which exits right away.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        let errno = if n == 4 {
            i32::from_ne_bytes(buf)
        } else {
            libc::EIO
        };
        return Err(fail(io::Error::from_raw_os_error(errno)));
    }
    // Reap it when it ends (a holder may run for as long as its cell).
    if let Ok(fd) = proc::pidfd_open(pid) {
        tokio::spawn(async move {
            let _ = proc::exited(fd).await;
            // SAFETY: our child, recorded as owned: nobody else reaps it.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        });
    }
    Ok(Some(pid))
}

/// The child of [`spawn_into`]: never returns.
fn child_exec(setup: &ChildSetup, exec: &Exec, devnull: RawFd, err: RawFd) -> ! {
    let r = (|| -> io::Result<()> {
        // Stdio first: `apply` ends by moving the spawn socket to fd 3,
        // which /dev/null's number may have been.
        // SAFETY: plain system calls on fds of ours.
        unsafe {
            check(libc::dup2(devnull, 0))?;
            check(libc::dup2(devnull, 1))?;
        }
        setup.apply()?;
        // SAFETY: plain system calls on a constant string; a zeroed
        // sigaction is SIG_DFL with an empty mask.
        unsafe {
            check(libc::chdir(c"/".as_ptr()))?;
            // As std's Command: SIGPIPE (ignored by the daemon) back to
            // the default, no signal blocked.
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGPIPE, &dfl, std::ptr::null_mut());
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            check(libc::sigprocmask(
                libc::SIG_SETMASK,
                &none,
                std::ptr::null_mut(),
            ))?;
            libc::execve(exec.program, exec.argv.as_ptr(), exec.envp.as_ptr());
        }
        Err(io::Error::last_os_error())
    })();
    let errno = r.err().and_then(|e| e.raw_os_error()).unwrap_or(libc::EIO);
    // SAFETY: writing 4 bytes of ours, then exiting without destructors.
    unsafe {
        libc::write(err, errno.to_ne_bytes().as_ptr().cast(), 4);
        libc::_exit(127)
    }
}

/// Which pid namespace the child is forked into.
enum PidNs {
    Inherit,
    Enter(Arc<NsSet>),
    New,
}

/// Runs `spawn` (which forks) on a thread whose children land in `pid_ns`.
async fn fork_with<F, T>(pid_ns: PidNs, spawn: F) -> Result<T, SpawnError>
where
    F: FnOnce() -> Result<T, SpawnError> + Send + 'static,
    T: Send + 'static,
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
#[derive(Clone)]
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

/// A raw system call's result as a C int (they are -1 or small here).
fn raw(r: libc::c_long) -> libc::c_int {
    libc::c_int::try_from(r).unwrap_or(-1)
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
            // Raw system calls: the C library's wrappers change the ids of
            // every thread in its thread list, which a CLONE_VM child
            // shares with the daemon; the system calls change this task.
            // SAFETY: plain system calls; the group list is emptied so no
            // supplementary group of the daemon leaks into the workload.
            unsafe {
                check(raw(libc::syscall(
                    libc::SYS_setgroups,
                    0usize,
                    std::ptr::null::<libc::gid_t>(),
                )))?;
                check(raw(libc::syscall(libc::SYS_setgid, gid as libc::c_long)))?;
                check(raw(libc::syscall(libc::SYS_setuid, uid as libc::c_long)))?;
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
