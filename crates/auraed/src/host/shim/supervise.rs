//! The shim program: one process, no threads, no async runtime. It forks
//! the executable (see [`super::child`]), reports `ok <pid> <start>` or
//! `error <text>` on the status pipe, then copies the executable's output
//! into files (see [`super::writer`]) and records its exit, until the
//! executable and its process group are gone or the daemon releases it
//! (SIGUSR1).

use std::{
    io::{self, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    rc::Rc,
};

use super::{
    args::Args,
    child::{self, Plan},
    format::{self, Channel, ExitRecord},
    writer::Output,
};
use crate::host::proc;

/// Bytes read from a pipe at once.
const READ_SIZE: usize = 64 << 10;
/// What a release (SIGUSR1) still copies from a pipe before it stops.
const RELEASE_DRAIN: usize = 4 << 20;
/// How often the group is looked at while it outlives the executable.
const GROUP_CHECK_MS: libc::c_int = 1000;

pub(super) fn main() -> ! {
    let mut argv = std::env::args_os().skip(1).peekable();
    if argv.peek().is_some_and(|a| a == super::SHIM_ARG) {
        argv.next();
    }
    let args = match Args::parse(argv) {
        Ok(a) => a,
        Err(e) => {
            warn(&format!("bad command line: {e}"));
            std::process::exit(2)
        }
    };
    run_with(args, false)
}

/// The shim with its arguments: as a program of its own (`in_cell`
/// false), or forked by a cell's holder (see `super::fork_in_cell`).
pub(super) fn run_with(args: Args, in_cell: bool) -> ! {
    if let Err(e) = check_fds(&args.fds()) {
        warn(&format!("bad command line: {e}"));
        std::process::exit(2)
    }
    // SAFETY: the status fd was handed to us (checked open above) and
    // nothing else owns it.
    let status = unsafe { OwnedFd::from_raw_fd(args.status) };
    let mut shim = match start(&args, &status, in_cell) {
        Ok(s) => s,
        Err(e) => {
            report(&status, &format!("error {e}"));
            std::process::exit(1)
        }
    };
    drop(status);
    if in_cell {
        // Inside the cell the kernel's OOM killer could pick the shim
        // (charged to the cell's memory cgroup) and lose the executable's
        // exit status and output: it is never the one to go. Set after
        // the fork, so the executable keeps the value it had.
        // Needs CAP_SYS_RESOURCE; without it the shim runs unprotected
        // (not worth a warning per executable).
        let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    }
    shim.run()
}

/// The inherited fds must be open, distinct and above stderr: each
/// becomes an OwnedFd.
fn check_fds(fds: &[RawFd]) -> Result<(), String> {
    for (i, &fd) in fds.iter().enumerate() {
        // SAFETY: F_GETFD only queries.
        if fd <= 2 || fds[..i].contains(&fd) || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(format!("fd {fd} is not usable"));
        }
    }
    Ok(())
}

/// Writes a warning on the shim's stderr (the daemon's).
pub(super) fn warn(msg: &str) {
    // Not eprintln!, which panics if stderr is a closed pipe.
    let _ = writeln!(io::stderr(), "aurae-shim[{}]: {msg}", std::process::id());
}

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME).
pub(super) fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn report(status: &OwnedFd, line: &str) {
    let mut line = line.replace('\n', " ");
    line.push('\n');
    let mut data = line.as_bytes();
    while !data.is_empty() {
        // SAFETY: writing our own buffer to an fd of ours.
        let n = unsafe { libc::write(status.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        match usize::try_from(n) {
            Ok(n) => data = &data[n..],
            Err(_) if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            // The daemon may be gone (EPIPE, with SIGPIPE ignored): the
            // executable runs on regardless.
            Err(_) => return,
        }
    }
}

/// In a cell the pid is the cell's, and the daemon names processes by
/// host pid: the status fd is a socket, and the report carries a pidfd of
/// the executable, from which the daemon reads the host pid. Until the
/// daemon has (it closes its end), the executable is not reaped, so the
/// pidfd still names a pid however fast it exits.
fn report_in_cell(status: &OwnedFd, pid: libc::pid_t, start: u64) {
    let line = format!("ok {pid} {start}\n");
    let pidfd = match proc::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => return report(status, &format!("error pidfd_open: {e}")),
    };
    if crate::host::spawn::fdpass::send(status.as_raw_fd(), line.as_bytes(), &[pidfd.as_raw_fd()])
        .is_err()
    {
        // The daemon is gone: the executable runs on regardless.
        return;
    }
    drop(pidfd);
    // Bounded: a daemon that hangs does not stall the output for long.
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: a valid option value of its size; then one read into a
    // buffer of ours (EOF, or anything, ends the wait).
    unsafe {
        libc::setsockopt(
            status.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let mut b = [0u8; 1];
        libc::recv(status.as_raw_fd(), b.as_mut_ptr().cast(), 1, 0);
    }
}

/// Forks the executable: into the cgroup2 directory `into` with clone3
/// when there is one and the kernel can (no migration), else with fork,
/// the child then joining every cgroup by writing `cgroup.procs`. Returns
/// the pid and whether clone3 placed it.
fn fork_child(plan: &mut Plan, into: Option<&OwnedFd>) -> Result<(libc::pid_t, bool), String> {
    use crate::host::spawn::clone3::{self, Forked};
    let mut _fallback = None;
    if let Some(dir) = into {
        // SAFETY: we are single-threaded; the child only runs `plan.exec`,
        // which makes async-signal-safe calls on data prepared above.
        match unsafe { clone3::fork_into(dir.as_raw_fd()) } {
            Ok(Ok(Forked::Child)) => plan.exec(),
            Ok(Ok(Forked::Parent(pid))) => return Ok((pid, true)),
            Ok(Err(clone3::Unsupported(_))) => {
                // The old way: the child writes the cgroup's procs file.
                // SAFETY: a relative path in a directory fd of ours; the
                // new fd is owned below.
                let fd = unsafe {
                    libc::openat(
                        dir.as_raw_fd(),
                        c"cgroup.procs".as_ptr(),
                        libc::O_WRONLY | libc::O_CLOEXEC,
                    )
                };
                if fd < 0 {
                    return Err(format!(
                        "open the cgroup's cgroup.procs: {}",
                        io::Error::last_os_error()
                    ));
                }
                // SAFETY: a new fd owned by nobody else.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                plan.procs.push(fd.as_raw_fd());
                _fallback = Some(fd);
            }
            Err(e) => return Err(format!("clone3: {e}")),
        }
    }
    // SAFETY: Plan::exec makes only async-signal-safe system calls on
    // data prepared before (uids by raw syscalls), never allocates and
    // never returns.
    unsafe { crate::host::spawn::vfork::spawn(&|| plan.exec()) }
        .map(|pid| (pid, false))
        .map_err(|e| format!("clone: {e}"))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Everything before the executable runs: on error, the text for the
/// daemon.
fn start(args: &Args, status: &OwnedFd, in_cell: bool) -> Result<Shim, String> {
    let ctx = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
    // SAFETY: installing SIG_IGN for signals we never handle.
    unsafe {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    std_fds_open().map_err(ctx("open /dev/null"))?;
    close_others(&args.fds()).map_err(ctx("close inherited fds"))?;
    let signals = signal_fd().map_err(ctx("signalfd"))?;
    // Our own session: no terminal hangup reaches us. Fails only if we
    // lead a process group already, which is fine too.
    // SAFETY: plain system call.
    unsafe { libc::setsid() };
    // SAFETY: the fds were handed to us and nothing else owns them.
    let dir = Rc::new(unsafe { OwnedFd::from_raw_fd(args.dir) });
    let procs: Vec<OwnedFd> = args
        .procs
        .iter()
        // SAFETY: as above.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    let setns: Vec<(libc::c_int, OwnedFd)> = args
        .setns
        .iter()
        // SAFETY: as above.
        .map(|&(flag, fd)| (flag, unsafe { OwnedFd::from_raw_fd(fd) }))
        .collect();
    if let Some(fd) = args.pid_ns {
        // SAFETY: as above.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Only our future children are affected; we are single-threaded.
        // SAFETY: fd is a pid namespace file.
        cvt(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWPID) })
            .map_err(ctx("enter the pid namespace"))?;
    }
    let stdout = Output::new(dir.clone(), Channel::Stdout, args.cap)
        .map_err(|e| format!("create {}: {e}", Channel::Stdout.file(0)))?;
    let stderr = Output::new(dir.clone(), Channel::Stderr, args.cap)
        .map_err(|e| format!("create {}: {e}", Channel::Stderr.file(0)))?;
    let devnull = std::fs::File::open("/dev/null").map_err(ctx("open /dev/null"))?;
    let (out_r, out_w) = pipe().map_err(ctx("pipe"))?;
    let (err_r, err_w) = pipe().map_err(ctx("pipe"))?;
    let (fail_r, fail_w) = pipe().map_err(ctx("pipe"))?;
    for fd in [&out_r, &err_r] {
        set_nonblocking(fd).map_err(ctx("pipe"))?;
    }
    let ids = (args.uid.is_some() || args.gid.is_some()).then(|| {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        (args.uid.unwrap_or(uid), args.gid.unwrap_or(gid))
    });
    let mut plan = Plan::new(
        &args.command,
        procs.iter().map(AsRawFd::as_raw_fd).collect(),
        setns.iter().map(|(f, fd)| (*f, fd.as_raw_fd())).collect(),
        args.unshare,
        ids,
        devnull.as_raw_fd(),
        out_w.as_raw_fd(),
        err_w.as_raw_fd(),
        fail_w.as_raw_fd(),
    )?;
    // SAFETY: the fd was handed to us and nothing else owns it.
    let into = args.into.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    let (pid, cloned_into) = fork_child(&mut plan, into.as_ref())?;
    drop((out_w, err_w, fail_w, devnull, procs, setns, into));
    // EOF once the child exec'd (close-on-exec) or died.
    let mut msg = Vec::new();
    let _ = io::Read::read_to_end(&mut std::fs::File::from(fail_r), &mut msg);
    if !msg.is_empty() {
        reap(pid);
        return Err(child::describe(&msg));
    }
    // The child is ours and not reaped: at worst a zombie, so its stat is
    // there.
    let start = proc::stat(pid).map_or(0, |s| s.start);
    if in_cell {
        report_in_cell(status, pid, start);
    } else if cloned_into {
        // The daemon counts these (see `super::parse_status`).
        report(status, &format!("ok {pid} {start} {}", super::INTO_WORD));
    } else {
        report(status, &format!("ok {pid} {start}"));
    }
    Ok(Shim {
        dir,
        child: pid,
        pipes: [Some(out_r), Some(err_r)],
        outputs: [stdout, stderr],
        signals,
        exit: None,
        exit_written: false,
        buf: vec![0; READ_SIZE],
    })
}

struct Shim {
    dir: Rc<OwnedFd>,
    child: libc::pid_t,
    /// Read ends of stdout and stderr (None once at EOF).
    pipes: [Option<OwnedFd>; 2],
    outputs: [Output; 2],
    signals: OwnedFd,
    exit: Option<ExitRecord>,
    exit_written: bool,
    buf: Vec<u8>,
}

impl Shim {
    fn run(&mut self) -> ! {
        loop {
            let mut fds = vec![libc::pollfd {
                fd: self.signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            let mut which = Vec::new();
            for (i, p) in self.pipes.iter().enumerate() {
                if let Some(p) = p {
                    fds.push(libc::pollfd {
                        fd: p.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    which.push(i);
                }
            }
            let timeout = if self.exit.is_some() {
                GROUP_CHECK_MS
            } else {
                -1
            };
            // SAFETY: a valid array of pollfds of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    warn(&format!("poll: {e}"));
                    // SAFETY: plain system call; do not spin.
                    unsafe { libc::usleep(100_000) };
                }
                continue;
            }
            for (pfd, &i) in fds[1..].iter().zip(&which) {
                if pfd.revents != 0 {
                    self.read_once(i);
                }
            }
            for o in &mut self.outputs {
                o.flush();
            }
            let (chld, usr1) = if fds[0].revents != 0 {
                self.take_signals()
            } else {
                (false, false)
            };
            if (chld || usr1) && self.exit.is_none() {
                self.exit = exit_of(self.child);
            }
            if self.exit.is_some() && !self.exit_written {
                self.write_exit();
            }
            // Before the exit, a release is ignored (the daemon sends it
            // only after).
            if usr1 && self.exit.is_some() {
                self.release();
            }
            if self.exit_written
                && self.pipes.iter().all(Option::is_none)
                && !group_alive(self.child)
            {
                reap(self.child);
                std::process::exit(0);
            }
        }
    }

    /// One read from pipe `i`: lines to the output, or its end.
    fn read_once(&mut self, i: usize) -> bool {
        let Some(fd) = &self.pipes[i] else {
            return false;
        };
        // SAFETY: reading into our own buffer of that length.
        let n = unsafe { libc::read(fd.as_raw_fd(), self.buf.as_mut_ptr().cast(), self.buf.len()) };
        match n {
            n if n > 0 => {
                self.outputs[i].feed(&self.buf[..n as usize], now_nanos());
                true
            }
            0 => {
                self.close(i);
                false
            }
            _ => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => {}
                    _ => {
                        warn(&format!("read {}: {e}", Channel::BOTH[i].as_str()));
                        self.close(i);
                    }
                }
                false
            }
        }
    }

    fn close(&mut self, i: usize) {
        self.pipes[i] = None;
        self.outputs[i].end();
    }

    /// Drains the signalfd: (SIGCHLD seen, SIGUSR1 seen).
    fn take_signals(&mut self) -> (bool, bool) {
        let (mut chld, mut usr1) = (false, false);
        loop {
            // SAFETY: signalfd_siginfo is plain data; all zeroes is valid.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reading one record into a buffer of its size.
            let n = unsafe {
                libc::read(
                    self.signals.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    size,
                )
            };
            if n != size as isize {
                break;
            }
            match info.ssi_signo as libc::c_int {
                libc::SIGCHLD => chld = true,
                libc::SIGUSR1 => usr1 = true,
                _ => {}
            }
        }
        (chld, usr1)
    }

    fn write_exit(&mut self) {
        let Some(exit) = self.exit else {
            return;
        };
        let result = serde_json::to_vec(&exit)
            .map_err(io::Error::other)
            .and_then(|json| format::write_atomic_at(&self.dir, format::EXIT, &json));
        match result {
            Ok(()) => self.exit_written = true,
            // Tried again every GROUP_CHECK_MS.
            Err(e) => warn(&format!("write {}: {e}", format::EXIT)),
        }
    }

    /// The daemon is done with us (after the exit): copy what is in the
    /// pipes now, end both channels, reap the executable, exit.
    fn release(&mut self) -> ! {
        for i in 0..2 {
            let mut drained = 0;
            while self.pipes[i].is_some() && drained < RELEASE_DRAIN {
                if !self.read_once(i) {
                    break;
                }
                drained += READ_SIZE;
            }
            self.pipes[i] = None;
            self.outputs[i].end();
        }
        if !self.exit_written {
            self.write_exit();
        }
        reap(self.child);
        std::process::exit(0)
    }
}

/// How the child ended, if it did (it stays a zombie: WNOWAIT).
fn exit_of(child: libc::pid_t) -> Option<ExitRecord> {
    // SAFETY: siginfo_t is plain data; all zeroes is valid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid siginfo_t to fill.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            child as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
        )
    };
    let at = now_nanos();
    if r != 0 {
        // ECHILD: it is gone without us (cannot happen: nothing else
        // waits); record an unknown end rather than wait forever.
        return Some(ExitRecord {
            code: None,
            signal: None,
            core_dumped: false,
            at,
        });
    }
    // SAFETY: waitid filled the SIGCHLD fields (or left si_pid 0).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid != child {
        return None;
    }
    let (code, signal, core_dumped) = match info.si_code {
        libc::CLD_EXITED => (Some(status), None, false),
        libc::CLD_KILLED => (None, Some(status), false),
        libc::CLD_DUMPED => (None, Some(status), true),
        _ => return None,
    };
    Some(ExitRecord {
        code,
        signal,
        core_dumped,
        at,
    })
}

fn reap(pid: libc::pid_t) {
    loop {
        // SAFETY: plain system call; the status is not needed.
        let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        if r >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// Whether a process other than `pgrp` itself (the zombie executable) is
/// alive in process group `pgrp`.
fn group_alive(pgrp: libc::pid_t) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        e.file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
            .filter(|&pid| pid != pgrp)
            .and_then(proc::stat)
            .is_some_and(|s| s.pgrp == pgrp && s.state != 'Z' && s.state != 'X')
    })
}

/// A signalfd for SIGCHLD and SIGUSR1, which are blocked from now on (a
/// SIGCHLD that comes before the first poll stays pending for it).
fn signal_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data, initialized by sigemptyset.
    let fd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        cvt(libc::sigprocmask(
            libc::SIG_BLOCK,
            &set,
            std::ptr::null_mut(),
        ))?;
        cvt(libc::signalfd(
            -1,
            &set,
            libc::SFD_CLOEXEC | libc::SFD_NONBLOCK,
        ))?
    };
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: a valid array of two fds to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: two new fds owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd of ours.
    unsafe {
        let flags = cvt(libc::fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
        cvt(libc::fcntl(
            fd.as_raw_fd(),
            libc::F_SETFL,
            flags | libc::O_NONBLOCK,
        ))?;
    }
    Ok(())
}

/// Opens /dev/null on whichever of fds 0, 1, 2 is closed, so that every fd
/// we open later is above them (and dup2 onto them in the child is safe).
fn std_fds_open() -> io::Result<()> {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            // SAFETY: a constant C string; the lowest free fd is `fd`.
            let new = cvt(unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) })?;
            if new != fd {
                return Err(io::Error::other(format!("got fd {new} for {fd}")));
            }
        }
    }
    Ok(())
}

/// Closes every inherited fd above stderr but `keep` (the daemon's other
/// files, say a pipe it got without close-on-exec, must neither be pinned
/// by us nor reach the executable) and marks those in `keep`
/// close-on-exec: the executable gets none of them.
fn close_others(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .collect();
    keep.sort_unstable();
    let mut from = 3u32;
    let mut ranged = true;
    for hole in keep.iter().map(Some).chain([None]) {
        let to = hole.map_or(u32::MAX, |&fd| fd.saturating_sub(1));
        if ranged && from <= to {
            // SAFETY: closes fds nothing in this process owns: it has
            // opened nothing above stderr yet, and `keep` stays open.
            ranged = unsafe { libc::syscall(libc::SYS_close_range, from, to, 0u32) } == 0;
        }
        from = hole.map_or(u32::MAX, |&fd| fd.saturating_add(1));
    }
    if !ranged {
        // Before Linux 5.9: one by one.
        let open: Vec<u32> = std::fs::read_dir("/proc/self/fd")?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|fd| *fd > 2 && !keep.contains(fd))
            .collect();
        for fd in open {
            // SAFETY: as above; the read_dir's own (already closed) fd
            // fails harmlessly with EBADF.
            unsafe { libc::close(fd as RawFd) };
        }
    }
    for &fd in &keep {
        // SAFETY: setting a flag on an fd of ours.
        cvt(unsafe { libc::fcntl(fd as RawFd, libc::F_SETFD, libc::FD_CLOEXEC) })?;
    }
    Ok(())
}
