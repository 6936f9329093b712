//! The per-executable shim (`aurae-shim`): the parent of one executable.
//!
//! Why a shim: nothing an executable needs may die with the daemon (see
//! the README's "Durability" section). The shim, not auraed, is the
//! executable's parent: it holds the read ends of its stdout and stderr
//! pipes and writes them to size-capped files in the executable's
//! directory (see [`format`]), and it is the one that sees the exit and
//! records it (`exit.json`). Started by the daemon ([`spawn`]), it runs in
//! the daemon's own namespaces and cgroup, and only the executable it
//! forks joins the cell (cgroups — by clone3 into the cell's cgroup2
//! directory where there is one, see `spawn::clone3` — then namespaces,
//! then uid/gid, as `ChildSetup` does for holders). A cell with a spawner
//! (an isolated cell's holder, or a plain cell's on v1 hierarchies) forks
//! its shims inside the cell instead ([`fork_in_cell`]).
//!
//! After the exit, the shim keeps the executable a zombie (so its pid and
//! process group id cannot be reused) while other members of its process
//! group live on or its pipes are open, so that Stop can still signal the
//! group; then it reaps it and exits. SIGUSR1 from the daemon (Stop, Free)
//! makes it reap and exit at once. It ignores SIGTERM, SIGINT and SIGHUP.
//!
//! The daemon starts it ([`spawn`]) with the fds it needs inherited and
//! their numbers on the command line (see `args.rs`); the shim forks the
//! executable (`child.rs`), says `ok <pid> <start time>` or `error <text>`
//! on a status pipe, then supervises it (`supervise.rs`, `writer.rs`).

pub mod format;

mod args;
mod child;
mod supervise;
mod writer;

use std::{
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::OpenOptionsExt,
    },
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use tokio::{io::AsyncBufReadExt, process::Command};

use crate::host::{
    proc::{self, ProcId},
    spawn::{clone3, fdpass, holder, reaper, Kind, NsSet, SpawnError},
};

/// argv[1] that makes `auraed` run as a shim (when `aurae-shim` is not
/// installed next to it).
pub const SHIM_ARG: &str = "__aurae_shim__";

/// How long a shim gets to say whether the executable started.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The spawn socket of the cell's holder, if it serves one: the shim is
    /// then forked by the holder, inside the cell (see `spawn::holder`).
    pub spawner: Option<PathBuf>,
    /// The cell's cgroup2 directory (pure v2, or the hybrid mirror): the
    /// shim forks the executable into it with `clone3(CLONE_INTO_CGROUP)`
    /// instead of having it write `into/cgroup.procs` (one of
    /// `procs_files`), see `spawn::clone3`.
    pub into: Option<PathBuf>,
}

/// The word a shim adds to its `ok` report when clone3 placed the
/// executable in its cgroup.
pub(crate) const INTO_WORD: &str = "into";

/// A started executable and its shim.
#[derive(Debug, Clone, Copy)]
pub struct Spawned {
    pub shim: ProcId,
    /// The executable (host pid).
    pub pid: ProcId,
    /// Whether clone3 forked it into its cgroup (no migration).
    pub cloned_into: bool,
}

/// Starts a shim that starts the executable; returns once the executable
/// was exec'd (or why it could not be).
pub async fn spawn(spec: ShimSpec) -> Result<Spawned, SpawnError> {
    let failed = |why: String| SpawnError::Start {
        what: "executable",
        source: io::Error::other(why),
    };
    if spec.command.contains('\0') {
        return Err(SpawnError::Start {
            what: "executable",
            source: io::Error::new(io::ErrorKind::InvalidInput, "the command holds a NUL byte"),
        });
    }
    let dir: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(&spec.dir)
        .map_err(|e| failed(format!("cannot open {}: {e}", spec.dir.display())))?
        .into();
    if let Some(sock) = &spec.spawner {
        match spawn_in_cell(&spec, sock, &dir).await {
            Err(InCell::Unreachable(e)) => tracing::debug!(
                "holder socket {} does not answer ({e}): the daemon starts the shim",
                sock.display()
            ),
            Err(InCell::Failed(why)) => return Err(failed(why)),
            Ok(s) => return Ok(s),
        }
    }
    // With `into`, the executable is born in that cgroup: its procs file is
    // not written (the shim opens it itself where clone3 cannot).
    let into = spec.into.as_ref().and_then(|d| match clone3::open_dir(d) {
        Ok(fd) => Some((d.join("cgroup.procs"), fd)),
        Err(e) => {
            tracing::debug!("cannot open {}: {e}; joining by cgroup.procs", d.display());
            None
        }
    });
    let procs_files: Vec<PathBuf> = spec
        .procs_files
        .iter()
        .filter(|p| into.as_ref().is_none_or(|(skip, _)| *p != skip))
        .cloned()
        .collect();
    let procs = open_procs(&procs_files)?;
    let (status_r, status_w) = pipe().map_err(|source| SpawnError::Start {
        what: "shim",
        source,
    })?;
    let ns = spec.ns.as_deref();
    let args = args::Args {
        dir: dir.as_raw_fd(),
        status: status_w.as_raw_fd(),
        pid_ns: ns.and_then(|ns| ns.get(Kind::Pid)),
        procs: procs.iter().map(AsRawFd::as_raw_fd).collect(),
        setns: ns.map(NsSet::non_pid).unwrap_or_default(),
        unshare: if spec.procs_files.is_empty() {
            0
        } else {
            libc::CLONE_NEWCGROUP
        },
        uid: spec.uid,
        gid: spec.gid,
        cap: spec.output_cap.max(format::MIN_OUTPUT_CAP),
        into: into.as_ref().map(|(_, fd)| fd.as_raw_fd()),
        command: spec.command.clone().into_bytes(),
    };
    let inherit = args.fds();
    let mut cmd = Command::new(program());
    cmd.arg(SHIM_ARG)
        .args(args.to_argv())
        // Workloads must not speak for the daemon (see systemd.rs).
        .env_remove(crate::systemd::NOTIFY_SOCKET_ENV)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(false);
    // SAFETY: the closure only calls fcntl on fds that are open in the
    // forked child (from a Vec allocated before the fork) and setrlimit,
    // both async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            crate::host::rlimit::restore_nofile();
            Ok(())
        })
    };
    let mut child = reaper::spawn_owned(&mut cmd).map_err(|source| SpawnError::Start {
        what: "shim",
        source,
    })?;
    // Ours now, the shim's copies stay open there.
    drop((status_w, dir, procs, into));
    // Not reaped while we hold `child`, so it is there (at worst a zombie).
    let shim = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .and_then(ProcId::of)
        .ok_or_else(|| failed("the shim is gone".into()))?;
    let status = tokio::time::timeout(STATUS_TIMEOUT, read_status(status_r)).await;
    let line = match status {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => {
            let _ = child.start_kill();
            return Err(failed(format!("cannot read the shim's status: {e}")));
        }
        Err(_) => {
            // A stuck shim: the executable (if forked) runs unsupervised.
            let _ = child.start_kill();
            return Err(failed(format!(
                "the shim did not report within {STATUS_TIMEOUT:?}"
            )));
        }
    };
    // Dropped without waiting: the shim outlives this call (tokio reaps it
    // in the background once it exits).
    drop(child);
    let pid = parse_status(&line).map_err(failed)?;
    let cloned_into = line.split_whitespace().nth(3) == Some(INTO_WORD);
    if cloned_into {
        crate::host::spawn::note_into("executables", spec.into.as_deref());
    }
    Ok(Spawned {
        shim,
        pid,
        cloned_into,
    })
}

/// Overwrites this process's command line (what /proc/PID/cmdline and
/// `ps` show) in place, as setproctitle does: a shim forked by a holder
/// would otherwise show the holder's. The text is cut to the space the
/// original arguments took; the rest is zeroed. Only for the forked shim,
/// which reads no `std::env::args` after this.
fn set_cmdline(text: &[u8]) {
    let Some(stat) = std::fs::read_to_string("/proc/self/stat").ok() else {
        return;
    };
    // Fields 48 and 49 (arg_start, arg_end), counted after "(comm) ",
    // which is field 3.
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return;
    };
    let mut f = rest.split_whitespace().skip(45);
    let (Some(Ok(start)), Some(Ok(end))) = (
        f.next().map(str::parse::<usize>),
        f.next().map(str::parse::<usize>),
    ) else {
        return;
    };
    if start == 0 || end <= start {
        return;
    }
    let len = end - start;
    // SAFETY: [arg_start, arg_end) is this process's own argument area,
    // writable memory on its stack that nothing in this (single-threaded,
    // just forked) process reads any more.
    unsafe {
        let area = std::slice::from_raw_parts_mut(start as *mut u8, len);
        area.fill(0);
        let n = text.len().min(len.saturating_sub(1));
        area[..n].copy_from_slice(&text[..n]);
    }
}

enum InCell {
    /// The holder cannot be asked (no socket, an older holder): the
    /// daemon starts the shim itself.
    Unreachable(io::Error),
    Failed(String),
}

/// The fast path: the cell's holder forks the shim, which is then born in
/// the cell's cgroups and namespaces, and so is the executable it forks.
/// Nothing migrates between cgroups and nothing enters a namespace, and
/// the fork is of the small single-threaded holder, not of the daemon.
async fn spawn_in_cell(spec: &ShimSpec, sock: &Path, dir: &OwnedFd) -> Result<Spawned, InCell> {
    use std::os::unix::ffi::OsStrExt;
    let conn = fdpass::seqpacket(sock, false).map_err(InCell::Unreachable)?;
    // The shim's status channel: a socket, so that its report can carry a
    // pidfd of the executable (see `supervise::report_in_cell`).
    let (status_r, status_w) =
        fdpass::seqpacket_pair().map_err(|e| InCell::Failed(format!("socketpair: {e}")))?;
    let args = args::Args {
        dir: -1,
        status: -1,
        pid_ns: None,
        procs: Vec::new(),
        setns: Vec::new(),
        // Its own cgroup namespace, rooted at the cell (as on the other path).
        unshare: libc::CLONE_NEWCGROUP,
        uid: spec.uid,
        gid: spec.gid,
        cap: spec.output_cap.max(format::MIN_OUTPUT_CAP),
        into: None,
        command: spec.command.clone().into_bytes(),
    };
    let mut request = holder::SPAWN_REQUEST.to_vec();
    for a in args.to_argv() {
        request.push(0);
        request.extend_from_slice(a.as_bytes());
    }
    fdpass::send(
        conn.as_raw_fd(),
        &request,
        &[dir.as_raw_fd(), status_w.as_raw_fd()],
    )
    .map_err(InCell::Unreachable)?;
    drop(status_w);
    let conn = async_fd(conn).map_err(|e| InCell::Failed(format!("holder socket: {e}")))?;
    let (text, fds) = match tokio::time::timeout(STATUS_TIMEOUT, recv_async(&conn)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(InCell::Unreachable(e)),
        Err(_) => return Err(InCell::Failed("the cell's holder did not answer".into())),
    };
    drop(conn);
    if text.is_empty() {
        // Closed without an answer: not a holder that serves requests.
        return Err(InCell::Unreachable(io::Error::other("no answer")));
    }
    if let Some(why) = text.strip_prefix(b"error ") {
        return Err(InCell::Failed(format!(
            "the cell's holder: {}",
            String::from_utf8_lossy(why)
        )));
    }
    let pidfd = match (text.as_slice(), fds.into_iter().next()) {
        (b"ok", Some(fd)) => fd,
        _ => return Err(InCell::Failed("the cell's holder answered garbage".into())),
    };
    let shim = fdpass::pidfd_pid(&pidfd)
        .and_then(ProcId::of)
        .ok_or_else(|| InCell::Failed("the shim is gone".into()))?;
    let kill = || {
        let _ = proc::pidfd_send_signal(&pidfd, libc::SIGKILL);
    };
    let status = async_fd(status_r).map_err(|e| InCell::Failed(format!("status socket: {e}")))?;
    let (line, fds) = match tokio::time::timeout(STATUS_TIMEOUT, recv_async(&status)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            kill();
            return Err(InCell::Failed(format!(
                "cannot read the shim's status: {e}"
            )));
        }
        Err(_) => {
            kill();
            return Err(InCell::Failed(format!(
                "the shim did not report within {STATUS_TIMEOUT:?}"
            )));
        }
    };
    let line = String::from_utf8_lossy(&line);
    // The shim reports the pid in the cell's pid namespace; the daemon
    // names processes by host pid, which the executable's pidfd tells
    // (the shim does not reap it before we close the status socket).
    let local = parse_status(&line).map_err(InCell::Failed)?;
    let pid = fds.first().and_then(fdpass::pidfd_pid).ok_or_else(|| {
        InCell::Failed(format!(
            "the executable (pid {} in the cell) is gone",
            local.pid
        ))
    })?;
    drop(status);
    Ok(Spawned {
        shim,
        pid: ProcId {
            pid,
            start: local.start,
        },
        // Born in the cell: nothing to migrate, nothing to clone into.
        cloned_into: false,
    })
}

fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    set_nonblocking(&fd)?;
    // SAFETY: an OwnedFd keeps its one fd open until it is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))
}

/// One message (and its fds) from a non-blocking socket; empty at EOF.
async fn recv_async(fd: &tokio::io::unix::AsyncFd<OwnedFd>) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = [0u8; 4096];
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|c| fdpass::recv(c.as_raw_fd(), &mut buf, 0)) {
            Ok(r) => {
                let (n, fds) = r?;
                return Ok((buf[..n].to_vec(), fds));
            }
            Err(_would_block) => continue,
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd of ours.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The shim's verdict: `ok <pid> <start>` or `error <text>`.
fn parse_status(line: &str) -> Result<ProcId, String> {
    let line = line.trim_end_matches('\n');
    if let Some(text) = line.strip_prefix("error ") {
        return Err(text.to_owned());
    }
    let mut f = line.strip_prefix("ok ").map(str::split_whitespace);
    let pid = f.as_mut().and_then(|f| f.next()?.parse::<i32>().ok());
    let start = f.as_mut().and_then(|f| f.next()?.parse::<u64>().ok());
    match (pid, start) {
        (Some(pid), Some(start)) if start != 0 => Ok(ProcId { pid, start }),
        (Some(pid), _) => ProcId::of(pid).ok_or_else(|| format!("process {pid} is gone")),
        _ if line.is_empty() => Err("the shim exited before reporting".to_owned()),
        _ => Err(format!("the shim said {line:?}")),
    }
}

async fn read_status(fd: OwnedFd) -> io::Result<String> {
    use tokio::io::AsyncReadExt;
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?;
    let mut reader = tokio::io::BufReader::new(rx.take(4096));
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await?;
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: a valid array of two fds to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two new fds owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn open_procs(files: &[PathBuf]) -> Result<Vec<OwnedFd>, SpawnError> {
    files
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
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

/// The shim program: `aurae-shim` next to the daemon's binary when it is
/// there (small: each running executable has one), else the daemon itself
/// re-executed. Resolved once, while `current_exe` still names the binary
/// we run.
fn program() -> &'static Path {
    static PROGRAM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PROGRAM.get_or_init(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| find_shim(&exe))
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
    })
}

fn find_shim(exe: &Path) -> Option<PathBuf> {
    let here = exe.with_file_name("aurae-shim");
    if here.is_file() {
        return Some(here);
    }
    // Cargo's test binaries live in target/<profile>/deps, its binaries one
    // level up.
    let dir = exe.parent()?;
    if dir.file_name()? != "deps" {
        return None;
    }
    Some(dir.parent()?.join("aurae-shim")).filter(|p| p.is_file())
}

/// The shim program.
pub fn main() -> ! {
    supervise::main()
}

/// In a cell's holder (see `spawn::holder`): forks a shim from a spawn
/// request, the shim's arguments (dir and status fds as `-1`, no pid
/// namespace, cgroups or namespaces to enter: the holder is in them) and
/// the fds `[dir, status]`. The child runs the shim's code without an
/// exec. Returns its pid (in the holder's pid namespace).
pub fn fork_in_cell(
    argv: Vec<std::ffi::OsString>,
    fds: Vec<OwnedFd>,
) -> Result<libc::pid_t, String> {
    let mut args = args::Args::parse(argv.into_iter())?;
    let [dir, status]: [OwnedFd; 2] = fds
        .try_into()
        .map_err(|f: Vec<OwnedFd>| format!("expected 2 fds, got {}", f.len()))?;
    if args.pid_ns.is_some() || !args.procs.is_empty() || !args.setns.is_empty() {
        return Err("a shim forked in the cell enters nothing".into());
    }
    args.dir = dir.as_raw_fd();
    args.status = status.as_raw_fd();
    // SAFETY: the holder is single-threaded; the child only runs the shim
    // (which owns the two fds from now on) and never returns.
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", io::Error::last_os_error())),
        0 => {
            use std::os::fd::IntoRawFd;
            let _ = (dir.into_raw_fd(), status.into_raw_fd());
            // SAFETY: a constant C string; names this process in `ps`.
            unsafe { libc::prctl(libc::PR_SET_NAME, c"aurae-shim".as_ptr()) };
            set_cmdline(b"aurae-shim");
            supervise::run_with(args, true)
        }
        pid => Ok(pid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use format::{Channel, ExitRecord};
    use std::time::Instant;

    fn spec(dir: &Path, command: &str) -> ShimSpec {
        assert_ne!(
            program(),
            Path::new("/proc/self/exe"),
            "no aurae-shim binary: run `cargo build -p auraed --bins` first"
        );
        ShimSpec {
            dir: dir.to_owned(),
            command: command.to_owned(),
            procs_files: Vec::new(),
            ns: None,
            uid: None,
            gid: None,
            output_cap: format::DEFAULT_OUTPUT_CAP,
            spawner: None,
            into: None,
        }
    }

    async fn wait_until(what: &str, secs: u64, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn lines(dir: &Path, name: &str) -> Vec<String> {
        stamped(dir, name).into_iter().map(|(_, l)| l).collect()
    }

    fn stamped(dir: &Path, name: &str) -> Vec<(i64, String)> {
        let data = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        format::decode_file(&data)
            .into_iter()
            .map(|(ts, l)| (ts, String::from_utf8_lossy(l).into_owned()))
            .collect()
    }

    fn exit_record(dir: &Path) -> Option<ExitRecord> {
        format::read_json(&dir.join(format::EXIT)).unwrap()
    }

    /// Output files of a channel, by seq.
    fn files(dir: &Path, ch: Channel) -> Vec<u64> {
        let mut seqs: Vec<u64> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| ch.parse_file(e.ok()?.file_name().to_str()?))
            .collect();
        seqs.sort_unstable();
        seqs
    }

    /// A shim that exited (a zombie until tokio reaps it) runs no more.
    async fn wait_gone(s: &Spawned) {
        wait_until("the shim to exit", 10, || !s.shim.is_running()).await;
        wait_until("the executable to be reaped", 10, || !s.pid.exists()).await;
    }

    /// Kills what a test started, its shim and the executable's process
    /// group, when the test ends, also by a panic (a shim waits for its
    /// release, ignoring SIGTERM). While the shim runs it holds the
    /// executable (a zombie at worst), so the group id is still ours.
    struct Reap(Spawned);

    impl Drop for Reap {
        fn drop(&mut self) {
            if self.0.shim.is_running() {
                kill_group(self.0.pid.pid);
                self.0.shim.signal(libc::SIGKILL);
            }
        }
    }

    fn kill_group(pgrp: i32) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(-pgrp, libc::SIGKILL) };
    }

    #[tokio::test]
    async fn records_output_and_exit() {
        let d = tempfile::tempdir().unwrap();
        let cmd = "printf 'a\\nb\\n'; echo err >&2; printf 'no newline'; exit 7";
        let s = spawn(spec(d.path(), cmd)).await.unwrap();
        assert_ne!(s.shim.pid, s.pid.pid);
        wait_until("exit.json", 10, || d.path().join(format::EXIT).exists()).await;
        let exit = exit_record(d.path()).unwrap();
        assert_eq!(
            (exit.code, exit.signal, exit.core_dumped),
            (Some(7), None, false)
        );
        assert!(exit.at > 0);
        wait_gone(&s).await;
        assert_eq!(lines(d.path(), "stdout.0"), ["a", "b", "no newline"]);
        assert_eq!(read(d.path(), "stdout.end"), "3");
        assert_eq!(lines(d.path(), "stderr.0"), ["err"]);
        assert_eq!(read(d.path(), "stderr.end"), "1");
        let ts = stamped(d.path(), "stdout.0")[0].0;
        assert!((ts - exit.at).abs() < 60_000_000_000, "{ts} vs {}", exit.at);
    }

    /// A simple command runs without the shell (its pid is the program's,
    /// with the environment dash would give it); one the shell cannot
    /// find still fails the shell's way.
    #[tokio::test]
    async fn simple_commands_run_without_the_shell() {
        let d = tempfile::tempdir().unwrap();
        let s = spawn(spec(d.path(), "printenv")).await.unwrap();
        wait_until("exit.json", 10, || d.path().join(format::EXIT).exists()).await;
        assert_eq!(exit_record(d.path()).unwrap().code, Some(0));
        wait_gone(&s).await;
        let mut env = lines(d.path(), "stdout.0");
        env.sort();
        assert_eq!(
            env,
            [
                "HOME=/",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "PWD=/"
            ]
        );
        let d = tempfile::tempdir().unwrap();
        let s = spawn(spec(d.path(), "sleep 5")).await.unwrap();
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", s.pid.pid)).unwrap();
        assert_eq!(
            comm.trim(),
            "sleep",
            "the pid is the program's, not a shell's"
        );
        // SAFETY: kill(2) of the process group we started.
        unsafe { libc::kill(-s.pid.pid, libc::SIGKILL) };
        wait_until("exit.json", 10, || d.path().join(format::EXIT).exists()).await;
        assert_eq!(exit_record(d.path()).unwrap().signal, Some(libc::SIGKILL));
        wait_gone(&s).await;
        let d = tempfile::tempdir().unwrap();
        let s = spawn(spec(d.path(), "no-such-program-x1 a")).await.unwrap();
        wait_until("exit.json", 10, || d.path().join(format::EXIT).exists()).await;
        assert_eq!(exit_record(d.path()).unwrap().code, Some(127));
        wait_gone(&s).await;
        let err = lines(d.path(), "stderr.0").join("\n");
        assert!(err.contains("no-such-program-x1: not found"), "{err}");
    }

    #[tokio::test]
    async fn records_signals_and_a_clean_environment() {
        let d = tempfile::tempdir().unwrap();
        let cmd = "env | sort; pwd; trap - TERM; ls /proc/self/fd; kill -TERM $$";
        let s = spawn(spec(d.path(), cmd)).await.unwrap();
        wait_until("exit.json", 10, || d.path().join(format::EXIT).exists()).await;
        let exit = exit_record(d.path()).unwrap();
        assert_eq!((exit.code, exit.signal), (None, Some(libc::SIGTERM)));
        wait_gone(&s).await;
        let out = lines(d.path(), "stdout.0");
        let env: Vec<&str> = out
            .iter()
            .map(String::as_str)
            .filter(|l| l.contains('='))
            .collect();
        // sh adds PWD (and maybe OLDPWD/SHLVL); nothing of ours leaks.
        assert!(env.contains(&"HOME=/"), "{out:?}");
        assert!(env.contains(&"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"));
        assert!(
            !env.iter()
                .any(|l| l.starts_with("CARGO") || l.starts_with("RUST")),
            "{env:?}"
        );
        assert!(out.contains(&"/".to_owned()), "{out:?}");
        // Only stdin, stdout, stderr (and ls's own directory fd).
        let fds: Vec<&String> = out.iter().filter(|l| l.parse::<u32>().is_ok()).collect();
        assert!(fds.len() <= 4, "{fds:?}");
    }

    #[tokio::test]
    async fn rotation_keeps_two_files() {
        let d = tempfile::tempdir().unwrap();
        let mut sp = spec(d.path(), "seq 100000");
        sp.output_cap = format::MIN_OUTPUT_CAP;
        let s = spawn(sp).await.unwrap();
        wait_until("stdout.end", 30, || d.path().join("stdout.end").exists()).await;
        wait_gone(&s).await;
        assert_eq!(read(d.path(), "stdout.end"), "100000");
        let seqs = files(d.path(), Channel::Stdout);
        assert_eq!(seqs.len(), 2, "{seqs:?}");
        assert!(seqs[0] > 0);
        let first = lines(d.path(), &Channel::Stdout.file(seqs[0]));
        assert_eq!(
            seqs[0] + first.len() as u64,
            seqs[1],
            "files are contiguous"
        );
        let mut all = first;
        all.extend(lines(d.path(), &Channel::Stdout.file(seqs[1])));
        for (i, l) in all.iter().enumerate() {
            assert_eq!(l, &(seqs[0] + i as u64 + 1).to_string());
        }
        assert_eq!(all.last().map(String::as_str), Some("100000"));
        let kept: u64 = seqs
            .iter()
            .map(|&q| {
                std::fs::metadata(d.path().join(Channel::Stdout.file(q)))
                    .unwrap()
                    .len()
            })
            .sum();
        assert!(
            kept <= format::MIN_OUTPUT_CAP + format::MAX_LINE as u64 * 2,
            "{kept}"
        );
        // A silent channel has no file (created with its first line), only
        // its end marker.
        assert!(files(d.path(), Channel::Stderr).is_empty());
        assert_eq!(read(d.path(), "stderr.end"), "0");
    }

    #[tokio::test]
    async fn straggler_holding_the_pipes_waits_for_release() {
        let d = tempfile::tempdir().unwrap();
        let s = spawn(spec(d.path(), "echo hi; sleep 100 & exit 3"))
            .await
            .unwrap();
        let _reap = Reap(s);
        wait_until("exit.json", 10, || d.path().join(format::EXIT).exists()).await;
        assert_eq!(exit_record(d.path()).unwrap().code, Some(3));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(s.shim.is_running(), "the shim waits for the straggler");
        assert!(s.pid.exists(), "the executable stays a zombie");
        assert!(!d.path().join("stdout.end").exists(), "sleep holds stdout");
        // Ignored: it outlives SIGTERM, SIGHUP.
        assert!(s.shim.signal(libc::SIGTERM) && s.shim.signal(libc::SIGHUP));
        assert!(s.shim.signal(libc::SIGUSR1));
        wait_gone(&s).await;
        assert_eq!(read(d.path(), "stdout.end"), "1");
        assert_eq!(read(d.path(), "stderr.end"), "0");
        assert_eq!(lines(d.path(), "stdout.0"), ["hi"]);
        kill_group(s.pid.pid);
    }

    #[tokio::test]
    async fn straggler_in_the_group_waits_for_release() {
        let d = tempfile::tempdir().unwrap();
        let cmd = "sleep 100 >/dev/null 2>&1 & echo $!";
        let s = spawn(spec(d.path(), cmd)).await.unwrap();
        let _reap = Reap(s);
        wait_until("stdout.end", 10, || d.path().join("stdout.end").exists()).await;
        wait_until("exit.json", 10, || d.path().join(format::EXIT).exists()).await;
        let sleeper: i32 = lines(d.path(), "stdout.0")[0].parse().unwrap();
        assert_eq!(proc::stat(sleeper).unwrap().pgrp, s.pid.pid);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(s.shim.is_running() && s.pid.exists());
        // Once the group is empty the shim ends on its own.
        kill_group(s.pid.pid);
        wait_gone(&s).await;
        assert_eq!(exit_record(d.path()).unwrap().code, Some(0));

        // Same, released by the daemon.
        let d = tempfile::tempdir().unwrap();
        let s = spawn(spec(d.path(), cmd)).await.unwrap();
        let _reap2 = Reap(s);
        wait_until("exit.json", 10, || d.path().join(format::EXIT).exists()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(s.shim.is_running());
        assert!(s.shim.signal(libc::SIGUSR1));
        wait_gone(&s).await;
        assert_eq!(read(d.path(), "stdout.end"), "1");
        kill_group(s.pid.pid);
    }

    #[tokio::test]
    async fn bad_ids_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let mut sp = spec(d.path(), "true");
        sp.uid = Some(u32::MAX);
        let e = spawn(sp).await.unwrap_err().to_string();
        assert!(e.contains("setuid(4294967295)"), "{e}");
        let mut sp = spec(d.path(), "true");
        sp.gid = Some(u32::MAX);
        let e = spawn(sp).await.unwrap_err().to_string();
        assert!(e.contains("setgid(4294967295)"), "{e}");
        assert!(!d.path().join(format::EXIT).exists());
        // A bad directory is reported, not hidden.
        let e = spawn(spec(&d.path().join("none"), "true"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
    }

    #[tokio::test]
    async fn runs_as_the_given_ids() {
        let d = tempfile::tempdir().unwrap();
        let mut sp = spec(d.path(), "id -u; id -g; id -G");
        sp.uid = Some(65534);
        sp.gid = Some(65533);
        let s = spawn(sp).await.unwrap();
        wait_until("exit.json", 10, || d.path().join(format::EXIT).exists()).await;
        wait_gone(&s).await;
        assert_eq!(lines(d.path(), "stdout.0"), ["65534", "65533", "65533"]);
    }

    /// A cell-like context: a cgroup, and pid, mount, uts and net
    /// namespaces held by a process that `unshare(1)` starts (the cell
    /// holder needs the `aurae-holder` binary, which test binaries lack).
    #[tokio::test]
    async fn joins_cgroups_and_namespaces() {
        let cg = PathBuf::from(format!(
            "/sys/fs/cgroup/pids/aurae-shim-test-{}",
            std::process::id()
        ));
        if let Err(e) = std::fs::create_dir(&cg) {
            eprintln!("skipped: cannot make {}: {e}", cg.display());
            return;
        }
        let mut unshare = std::process::Command::new("unshare")
            .args(["-p", "-f", "-m", "-u", "-n", "--mount-proc", "sh", "-c"])
            .arg("hostname shim-test && exec sleep 100")
            .spawn()
            .unwrap();
        let u = unshare.id();
        let holder = std::cell::Cell::new(0);
        wait_until("the namespaces", 10, || {
            let kids = std::fs::read_to_string(format!("/proc/{u}/task/{u}/children"));
            let pid = kids
                .ok()
                .and_then(|k| k.split_whitespace().next()?.parse().ok());
            holder.set(pid.unwrap_or(0));
            pid.and_then(|p: i32| std::fs::read_to_string(format!("/proc/{p}/comm")).ok())
                .is_some_and(|c| c.trim() == "sleep")
        })
        .await;
        let holder = holder.get();
        let ns = Arc::new(NsSet::of_process(holder).unwrap());
        assert!(ns.get(Kind::Pid).is_some() && ns.get(Kind::Net).is_some());
        let d = tempfile::tempdir().unwrap();
        let cmd = "echo $$; hostname; grep pids /proc/self/cgroup; \
                   ip -o link 2>/dev/null | wc -l; sleep 1";
        let mut sp = spec(d.path(), cmd);
        sp.procs_files = vec![cg.join("cgroup.procs")];
        sp.ns = Some(ns);
        let s = spawn(sp).await.unwrap();
        let procs = read(&cg, "cgroup.procs");
        assert!(procs.lines().any(|l| l == s.pid.pid.to_string()), "{procs}");
        wait_until("exit.json", 10, || d.path().join(format::EXIT).exists()).await;
        wait_gone(&s).await;
        let out = lines(d.path(), "stdout.0");
        let inner: i32 = out[0].parse().unwrap();
        assert!(
            inner != s.pid.pid && inner < 100,
            "{out:?} host pid {}",
            s.pid.pid
        );
        assert_eq!(out[1], "shim-test");
        // Its own cgroup namespace: its cgroup is its root.
        assert!(out[2].ends_with("pids:/"), "{out:?}");
        // Its own network namespace: only loopback.
        assert_eq!(out[3], "1", "{out:?}");
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(holder, libc::SIGKILL) };
        let _ = unshare.wait();
        let _ = std::fs::remove_dir(&cg);
    }

    /// With `into` (a cgroup2 directory), the executable is born there
    /// (clone3) and the shim says so; its cgroup namespace is rooted there.
    #[tokio::test]
    async fn forks_into_a_cgroup2_directory() {
        let base = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.controllers").is_file());
        let Some(base) = base else {
            eprintln!("skipped: no cgroup2 mount");
            return;
        };
        let cg = base.join(format!("aurae-shim-into-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir(&cg) {
            eprintln!("skipped: cannot make {}: {e}", cg.display());
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let mut sp = spec(d.path(), "cat /proc/self/cgroup; sleep 1");
        sp.procs_files = vec![cg.join("cgroup.procs")];
        sp.into = Some(cg.clone());
        let s = spawn(sp).await.unwrap();
        let procs = read(&cg, "cgroup.procs");
        wait_until("exit.json", 10, || d.path().join(format::EXIT).exists()).await;
        wait_gone(&s).await;
        let _ = std::fs::remove_dir(&cg);
        eprintln!("executable in {}: clone3 {}", cg.display(), s.cloned_into);
        assert!(procs.lines().any(|l| l == s.pid.pid.to_string()), "{procs}");
        let out = lines(d.path(), "stdout.0");
        assert!(out.iter().any(|l| l == "0::/"), "{out:?}");
        // Kernels since 5.7 can; this test runs on newer ones.
        assert!(s.cloned_into, "the shim did not use clone3");
    }

    /// What a shim costs: prints its RSS and PSS while it supervises.
    #[tokio::test]
    async fn small_and_ignores_early_release() {
        let d = tempfile::tempdir().unwrap();
        // A daemon's file without close-on-exec: the shim must not keep it.
        let mut leak = [0; 2];
        // SAFETY: a valid array of two fds to fill.
        assert_eq!(unsafe { libc::pipe(leak.as_mut_ptr()) }, 0);
        let leaked = std::fs::read_link(format!("/proc/self/fd/{}", leak[1])).unwrap();
        let s = spawn(spec(d.path(), "sleep 100")).await;
        // SAFETY: closing the two fds made above, owned by nobody else.
        unsafe { (libc::close(leak[0]), libc::close(leak[1])) };
        let s = s.unwrap();
        let _reap = Reap(s);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let fds: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{}/fd", s.shim.pid))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .collect();
        assert!(!fds.contains(&leaked), "{fds:?}");
        // stdin/out/err, dir, signalfd, 2 pipes (`sleep` writes nothing:
        // no output file is open).
        assert_eq!(fds.len(), 7, "{fds:?}");
        // A release before the exit is ignored.
        assert!(s.shim.signal(libc::SIGUSR1));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(s.shim.is_running());
        let rollup = read(Path::new(&format!("/proc/{}", s.shim.pid)), "smaps_rollup");
        let kib = |key: &str| -> u64 {
            rollup
                .lines()
                .find_map(|l| {
                    l.strip_prefix(key)?
                        .trim()
                        .strip_suffix("kB")?
                        .trim()
                        .parse()
                        .ok()
                })
                .unwrap_or(0)
        };
        let (rss, pss) = (kib("Rss:"), kib("Pss:"));
        eprintln!("shim {}: Rss {rss} kB, Pss {pss} kB", program().display());
        assert!(rss > 0 && rss < 16 << 10, "{rollup}");
        kill_group(s.pid.pid);
        wait_until("exit.json", 10, || d.path().join(format::EXIT).exists()).await;
        assert_eq!(exit_record(d.path()).unwrap().signal, Some(libc::SIGKILL));
        wait_gone(&s).await;
    }

    #[test]
    fn statuses() {
        assert_eq!(
            parse_status("error setuid(1): nope\n"),
            Err("setuid(1): nope".into())
        );
        assert_eq!(
            parse_status("ok 12 34\n").unwrap(),
            ProcId { pid: 12, start: 34 }
        );
        assert_eq!(
            parse_status(""),
            Err("the shim exited before reporting".into())
        );
        assert!(parse_status("huh").is_err());
    }

    #[test]
    fn finds_the_shim_next_to_cargo_test_binaries() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("deps")).unwrap();
        assert_eq!(find_shim(&d.path().join("deps/t")), None);
        std::fs::write(d.path().join("aurae-shim"), "").unwrap();
        assert_eq!(
            find_shim(&d.path().join("deps/t")),
            Some(d.path().join("aurae-shim"))
        );
        assert_eq!(
            find_shim(&d.path().join("auraed")),
            Some(d.path().join("aurae-shim"))
        );
        std::fs::create_dir(d.path().join("bin")).unwrap();
        assert_eq!(find_shim(&d.path().join("bin/auraed")), None);
    }
}
