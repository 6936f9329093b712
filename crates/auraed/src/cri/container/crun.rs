//! crun, the low-level OCI runtime, and the per-container monitor.
//!
//! Why a monitor of our own rather than the cells layer's shim: a CRI
//! container is created (CreateContainer) before it runs (StartContainer),
//! its init process is crun's child, not ours, its output must become the
//! CRI log format in a file kubelet names and rotates (ReopenContainerLog),
//! and an unterminated last line must stay recognisable (`P`). The shim
//! runs one `sh -c` command and keeps capped output files of its own
//! format; bending it to all of that would cost more than this small
//! process (the role conmon plays for CRI-O).
//!
//! The monitor is this binary re-executed ([`MONITOR_ARG`] `<container
//! dir>`), in a session of its own, so nothing about it dies with auraed:
//!
//! 1. it becomes a child subreaper and runs `crun create` with the
//!    container's stdout/stderr being pipes it reads (crun's own messages go
//!    to `crun.log`), the child joining the container's cell cgroups before
//!    exec (crun runs with `--cgroup-manager=disabled`: the cells layer owns
//!    the cgroups, so the pod cell's limits apply, the container's own sit
//!    on its nested cell, and stats/OOM counts come from the cell);
//! 2. crun exits once the container is created; the container's init is
//!    re-parented to the monitor, which says `ok <pid>` on its stdout (the
//!    daemon's status pipe) and closes it;
//! 3. it writes the output to the CRI log until both pipes end, reaps the
//!    init, and records `exit.json` (exit code, finish time) last, so that
//!    whoever sees EXITED also sees the whole log. SIGUSR1 reopens the log.
//!
//! stdin: for `stdin: true` containers the daemon makes the FIFO
//! `<container dir>/stdin` and the monitor opens it read-write as the
//! container's stdin, so the container never sees EOF while the monitor
//! lives (an attach writes into the FIFO; closing an attach is not EOF).

use std::{
    fs::File,
    io::{self, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::log::{CriLog, Stream};

/// argv[1] that makes `auraed` run as a container monitor.
pub const MONITOR_ARG: &str = "__aurae_cri_monitor__";
pub const MONITOR_CONFIG: &str = "monitor.json";
pub const EXIT_FILE: &str = "exit.json";
pub const CRUN_LOG: &str = "crun.log";
pub const STDIN_FIFO: &str = "stdin";
/// The CRI log of a container kubelet gave no log path.
pub const FALLBACK_LOG: &str = "container.log";
/// How long the monitor keeps reading after the init exited while other
/// processes still hold the pipes.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// What the monitor needs (written by the daemon to `monitor.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MonitorConfig {
    pub runtime: Runtime,
    pub root: PathBuf,
    pub id: String,
    pub bundle: PathBuf,
    pub log_path: Option<PathBuf>,
    /// `cgroup.procs` files of the container's cell.
    pub procs_files: Vec<PathBuf>,
    pub stdin: bool,
}

/// Written by the monitor once the container's init is reaped and its
/// output drained.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ExitRecord {
    pub exit_code: i32,
    /// ns since the epoch.
    pub finished_at: i64,
    /// The kernel's OOM killer killed something in the container's cgroup.
    #[serde(default)]
    pub oom_killed: bool,
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The low-level runtime: crun, or runc where crun cannot run (crun 1.8
/// refuses cgroup v1/v2 hybrid hosts whose v2 tree has controllers, even
/// with `--cgroup-manager=disabled`: "cgroups in hybrid mode not
/// supported"). Both take the same commands (`create`, `start`, `kill`,
/// `exec`, `delete`) and state root.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Runtime {
    pub path: PathBuf,
    pub runc: bool,
}

fn find(name: &str) -> Option<PathBuf> {
    [
        "/usr/bin",
        "/usr/sbin",
        "/usr/local/bin",
        "/usr/local/sbin",
        "/bin",
        "/sbin",
    ]
    .iter()
    .map(|d| Path::new(d).join(name))
    .find(|p| p.is_file())
}

/// A hybrid host whose v2 tree holds controllers (crun's refusal).
fn hybrid_with_v2_controllers() -> bool {
    let unified = Path::new("/sys/fs/cgroup/unified/cgroup.controllers");
    std::fs::read_to_string(unified).is_ok_and(|c| !c.trim().is_empty())
}

impl Runtime {
    pub fn detect() -> Runtime {
        let crun = find("crun");
        let runc = find("runc");
        match (crun, runc) {
            (Some(c), Some(r)) => {
                if hybrid_with_v2_controllers() {
                    Runtime {
                        path: r,
                        runc: true,
                    }
                } else {
                    Runtime {
                        path: c,
                        runc: false,
                    }
                }
            }
            (Some(c), None) => Runtime {
                path: c,
                runc: false,
            },
            (None, Some(r)) => Runtime {
                path: r,
                runc: true,
            },
            (None, None) => Runtime {
                path: PathBuf::from("crun"),
                runc: false,
            },
        }
    }

    /// `--root <root> [--log <file>]` and, for crun, no cgroup management
    /// (the monitor already put it in the container's cell). runc has no
    /// such switch: it makes a cgroup named by the container id below its
    /// own (the cell's), which `delete` removes.
    pub fn global_args(&self, root: &Path, log: Option<&Path>) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec!["--root".into(), root.into()];
        if let Some(l) = log {
            a.push("--log".into());
            if self.runc {
                a.push(l.into());
            } else {
                a.push(format!("file:{}", l.display()).into());
            }
        }
        if !self.runc {
            a.push("--cgroup-manager=disabled".into());
        }
        a
    }

    pub fn command(&self, root: &Path, log: Option<&Path>) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.path);
        c.args(self.global_args(root, log));
        c.stdin(Stdio::null());
        c
    }
}

pub fn read_exit(dir: &Path) -> Option<ExitRecord> {
    let b = std::fs::read(dir.join(EXIT_FILE)).ok()?;
    serde_json::from_slice(&b).ok()
}

fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}

static REOPEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    REOPEN.store(true, Ordering::SeqCst);
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills both fds on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fds we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn say(status: &mut Option<File>, text: &str) {
    if let Some(mut f) = status.take() {
        let _ = writeln!(f, "{text}");
    }
}

/// The monitor process (see the module comment). Never returns.
pub fn monitor_main() -> ! {
    // SAFETY: fd 1 is the status pipe the daemon gave us.
    let mut status = Some(unsafe { File::from_raw_fd(1) });
    let dir = match std::env::args_os().nth(2) {
        Some(d) => PathBuf::from(d),
        None => {
            say(&mut status, "error: no container directory");
            std::process::exit(2)
        }
    };
    let code = match run_monitor(&dir, &mut status) {
        Ok(()) => 0,
        Err(e) => {
            say(&mut status, &format!("error {e}"));
            1
        }
    };
    std::process::exit(code)
}

fn run_monitor(dir: &Path, status: &mut Option<File>) -> io::Result<()> {
    let cfg: MonitorConfig = serde_json::from_slice(&std::fs::read(dir.join(MONITOR_CONFIG))?)
        .map_err(io::Error::other)?;
    // SAFETY: plain syscalls with no memory arguments, a handler that only
    // stores an atomic.
    unsafe {
        libc::setsid();
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    let mut log = CriLog::open(cfg.log_path.clone())?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let stdin: Stdio = if cfg.stdin {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join(STDIN_FIFO))?
            .into()
    } else {
        Stdio::null()
    };
    // Opened here: the child only writes (no allocation after fork).
    let procs: Vec<File> = cfg
        .procs_files
        .iter()
        .map(|p| std::fs::OpenOptions::new().write(true).open(p))
        .collect::<io::Result<_>>()?;
    let procs_fds: Vec<RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
    let pid_file = dir.join("init.pid");
    let _ = std::fs::remove_file(&pid_file);
    let mut cmd = Command::new(&cfg.runtime.path);
    cmd.args(
        cfg.runtime
            .global_args(&cfg.root, Some(&dir.join(CRUN_LOG))),
    )
    .arg("create")
    .arg("--bundle")
    .arg(&cfg.bundle)
    .arg("--pid-file")
    .arg(&pid_file)
    .arg(&cfg.id)
    .stdin(stdin)
    .stdout(Stdio::from(out_w))
    .stderr(Stdio::from(err_w));
    // SAFETY: only write(2) on fds opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &procs_fds {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let out = cmd.status();
    drop(cmd); // our copies of the pipes' write ends
    drop(procs);
    let st = out?;
    if !st.success() {
        let why = std::fs::read_to_string(dir.join(CRUN_LOG)).unwrap_or_default();
        return Err(io::Error::other(format!(
            "{} create: {st}: {}",
            cfg.runtime.path.display(),
            why.lines().last().unwrap_or("").trim()
        )));
    }
    let init: i32 = std::fs::read_to_string(&pid_file)?
        .trim()
        .parse()
        .map_err(|_| io::Error::other("crun wrote no init pid"))?;
    say(status, &format!("ok {init}"));
    // Nothing else to say: stdout and stderr go nowhere from now on.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto our own stdio fds.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
            libc::dup2(null.as_raw_fd(), 2);
        }
    }
    let exit_code = pump(out_r, err_r, init, &mut log);
    let rec = ExitRecord {
        exit_code,
        finished_at: now_ns(),
        oom_killed: oom_kills(&cfg.procs_files, &cfg.id) > 0,
    };
    write_atomic(
        dir,
        EXIT_FILE,
        &serde_json::to_vec(&rec).map_err(io::Error::other)?,
    )
}

/// OOM kills in the container's cgroups: the cell's (crun, and the v2
/// `events` count descendants) and runc's child named by the id (on v1 the
/// count stays in the cgroup where the kill happened).
pub fn oom_kills(procs_files: &[PathBuf], id: &str) -> u64 {
    let mut n = 0;
    for p in procs_files {
        let Some(dir) = p.parent() else { continue };
        let dir = if dir.file_name().is_some_and(|f| f == "_exec") {
            dir.parent().unwrap_or(dir)
        } else {
            dir
        };
        for d in [dir.to_path_buf(), dir.join(id)] {
            for f in ["memory.oom_control", "memory.events"] {
                let text = std::fs::read_to_string(d.join(f)).unwrap_or_default();
                for l in text.lines() {
                    if let Some(v) = l.strip_prefix("oom_kill ") {
                        n = n.max(v.trim().parse().unwrap_or(0));
                    }
                }
            }
        }
    }
    n
}

/// Copies output to the log until both pipes end (or a while after the init
/// exited), reaping children; returns the init's exit code.
fn pump(out_r: OwnedFd, err_r: OwnedFd, init: i32, log: &mut CriLog) -> i32 {
    let mut files: [Option<File>; 2] = [Some(File::from(out_r)), Some(File::from(err_r))];
    let streams = [Stream::Stdout, Stream::Stderr];
    let mut exit: Option<i32> = None;
    let mut exited_at: Option<Instant> = None;
    let mut buf = vec![0u8; 32 << 10];
    loop {
        if REOPEN.swap(false, Ordering::SeqCst) {
            let _ = log.reopen();
        }
        reap(init, &mut exit, &mut exited_at);
        let open: Vec<usize> = (0..2).filter(|i| files[*i].is_some()).collect();
        if open.is_empty() {
            if exit.is_some() {
                break;
            }
            // Pipes closed, init alive (it closed its stdio): wait for it.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if exited_at.is_some_and(|t| t.elapsed() > DRAIN_AFTER_EXIT) {
            for i in open {
                log.finish(streams[i]);
            }
            break;
        }
        let mut pfds: Vec<libc::pollfd> = open
            .iter()
            .map(|i| libc::pollfd {
                fd: files[*i].as_ref().map_or(-1, |f| f.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: pfds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 200) };
        if n <= 0 {
            continue; // timeout or EINTR (SIGUSR1, SIGCHLD)
        }
        for (k, i) in open.iter().enumerate() {
            if pfds[k].revents == 0 {
                continue;
            }
            let Some(f) = files[*i].as_mut() else {
                continue;
            };
            match f.read(&mut buf) {
                Ok(0) => {
                    log.finish(streams[*i]);
                    files[*i] = None;
                }
                Ok(n) => log.feed(streams[*i], &buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    log.finish(streams[*i]);
                    files[*i] = None;
                }
            }
        }
    }
    while exit.is_none() {
        reap(init, &mut exit, &mut exited_at);
        if exit.is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    exit.unwrap_or(255)
}

/// Reaps every exited child (we are a subreaper: the container's orphans
/// come to us); records the init's status as a shell would (128+signal).
fn reap(init: i32, exit: &mut Option<i32>, exited_at: &mut Option<Instant>) {
    loop {
        let mut st: libc::c_int = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        if pid == init {
            let code = if libc::WIFEXITED(st) {
                libc::WEXITSTATUS(st)
            } else if libc::WIFSIGNALED(st) {
                128 + libc::WTERMSIG(st)
            } else {
                255
            };
            *exit = Some(code);
            *exited_at = Some(Instant::now());
        }
    }
}
