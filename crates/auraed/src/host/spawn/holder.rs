//! Holder mode: `auraed __aurae_cell_holder__` keeps an isolated cell's
//! namespaces alive. As PID 1 of the cell's pid namespace it also reaps
//! every orphan there. Everything was set up before exec (see
//! `ChildSetup`). SIGTERM or SIGINT ends it (and, as init, every process
//! of its pid namespace with it).
//!
//! It is also the cell's spawner: with `spawn=3` on its command line, fd 3
//! is a listening unix socket (bound by the daemon under
//! `<runtime-dir>/state/holders/`) on which the daemon asks it to start an
//! executable's shim ([`SPAWN_REQUEST`]). The holder forks the shim itself
//! (no exec: the shim's code is in this binary), so the shim, and the
//! executable it forks, are born in the cell's cgroups and namespaces:
//! no write to `cgroup.procs` (a migration, which on cgroup v1 waits for an
//! RCU grace period), no setns, no fork of the large daemon.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::{
    sys::{
        signal::{SigSet, Signal},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};

/// argv[2] of a nested holder; argv[3] is the hostname, argv[4] "net" or "-".
pub const NESTED: &str = "nested";
/// What a nested holder writes to stdout once its namespaces are ready.
pub const READY: &str = "ready";

/// The last argument of a holder that serves spawn requests on [`SPAWN_FD`].
pub const SPAWN_ARG: &str = "spawn=3";
/// Where a holder finds its listening socket.
pub const SPAWN_FD: RawFd = 3;
/// First word of a spawn request (its format's version: a holder that does
/// not know it refuses, and the daemon starts the shim itself).
pub const SPAWN_REQUEST: &[u8] = b"shim/1";
/// Largest spawn request: the shim's arguments with a command of at most
/// 131,071 bytes.
const MAX_REQUEST: usize = 192 << 10;

pub fn main() -> ! {
    let args: Vec<String> = std::env::args().collect();
    let spawn = args.last().is_some_and(|a| a == SPAWN_ARG);
    if args.get(2).is_some_and(|a| a == NESTED) {
        nested_main(
            args.get(3).map_or("", String::as_str),
            args.get(4).is_some_and(|a| a == "net"),
            spawn,
        );
    }
    holder_loop(spawn)
}

/// The intermediate of a nested holder: its pid namespace for children is
/// already new (unshared before exec). It forks the holder, which becomes
/// PID 1 there, then waits for it; a signal ends both.
fn nested_main(hostname: &str, network: bool, spawn: bool) -> ! {
    use std::io::Write;
    // SAFETY: this process is single-threaded (just exec'd, no runtime).
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let r = setup_nested(hostname, network);
            let mut out = std::io::stdout();
            match r {
                Ok(()) => {
                    let _ = writeln!(out, "{READY}");
                    let _ = out.flush();
                    // Nobody reads further; let the pipe go.
                    let _ = nix::unistd::close(1);
                    holder_loop(spawn)
                }
                Err(e) => {
                    let _ = writeln!(out, "{e}");
                    std::process::exit(1)
                }
            }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            let _ = nix::unistd::close(1);
            if spawn {
                // The holder serves the socket; we do not.
                let _ = nix::unistd::close(SPAWN_FD);
            }
            let mut set = SigSet::empty();
            for s in [
                Signal::SIGTERM,
                Signal::SIGINT,
                Signal::SIGHUP,
                Signal::SIGCHLD,
            ] {
                set.add(s);
            }
            let _ = set.thread_block();
            loop {
                match set.wait() {
                    Ok(Signal::SIGCHLD) => {
                        if let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =
                            waitpid(child, Some(WaitPidFlag::WNOHANG))
                        {
                            std::process::exit(0);
                        }
                    }
                    Ok(_) => {
                        let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                        std::process::exit(0);
                    }
                    Err(_) => continue,
                }
            }
        }
        Err(_) => std::process::exit(1),
    }
}

/// In the nested holder (PID 1 of the new pid namespace): new mount, uts,
/// ipc (and network) namespaces, a private mount tree with a fresh /proc.
fn setup_nested(hostname: &str, network: bool) -> Result<(), String> {
    use nix::{mount::MsFlags, sched::CloneFlags};
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
    if network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    nix::sched::unshare(flags).map_err(|e| format!("unshare: {e}"))?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("make / private: {e}"))?;
    nix::mount::mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("mount /proc: {e}"))?;
    nix::unistd::sethostname(hostname).map_err(|e| format!("sethostname: {e}"))?;
    if network {
        super::loopback_up().map_err(|e| format!("loopback up: {e}"))?;
    }
    Ok(())
}

fn holder_loop(spawn: bool) -> ! {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        std::process::exit(1);
    }
    if spawn {
        // SAFETY: fd 3 was handed to us as the listening socket and
        // nothing else in this process owns it.
        let listener = unsafe { OwnedFd::from_raw_fd(SPAWN_FD) };
        // Not inherited by anything we start.
        // SAFETY: setting a flag on an fd of ours.
        unsafe { libc::fcntl(SPAWN_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
        serve(&set, listener)
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => reap_all(),
            Ok(_) => std::process::exit(0),
            Err(_) => continue,
        }
    }
}

fn reap_all() {
    while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// The holder's loop as a spawner: signals (reap, or end) and spawn
/// requests, one at a time (each is a fork and two short messages).
fn serve(set: &SigSet, listener: OwnedFd) -> ! {
    // SAFETY: a valid signal set; the new fd is owned below.
    let sfd = unsafe { libc::signalfd(-1, set.as_ref(), libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if sfd < 0 {
        std::process::exit(1);
    }
    // SAFETY: a new fd owned by nobody else.
    let sfd = unsafe { OwnedFd::from_raw_fd(sfd) };
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: a valid array of two pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            loop {
                // SAFETY: signalfd_siginfo is plain data.
                let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
                let size = std::mem::size_of::<libc::signalfd_siginfo>();
                // SAFETY: reading one record into a buffer of its size.
                let n = unsafe {
                    libc::read(
                        sfd.as_raw_fd(),
                        (&mut info as *mut libc::signalfd_siginfo).cast(),
                        size,
                    )
                };
                if n != size as isize {
                    break;
                }
                if info.ssi_signo as i32 == libc::SIGCHLD {
                    reap_all();
                } else {
                    std::process::exit(0);
                }
            }
        }
        if fds[1].revents != 0 {
            serve_one(&listener, &mut buf);
        }
    }
}

/// Answers one connection: `ok` with a pidfd of the shim, or `error TEXT`.
fn serve_one(listener: &OwnedFd, buf: &mut [u8]) {
    // SAFETY: accepting on our listening socket; the new fd is owned below.
    let conn = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if conn < 0 {
        return;
    }
    // SAFETY: a new fd owned by nobody else.
    let conn = unsafe { OwnedFd::from_raw_fd(conn) };
    // Only the daemon (root) can connect; still, never hang on a client
    // that sends nothing.
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: a valid option value of its size.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let reply = match super::fdpass::recv(conn.as_raw_fd(), buf, 0) {
        Ok((n, fds)) => handle(&buf[..n], fds),
        Err(e) => Err(format!("bad request: {e}")),
    };
    let _ = match reply {
        Ok(pidfd) => super::fdpass::send(conn.as_raw_fd(), b"ok", &[pidfd.as_raw_fd()]),
        Err(text) => super::fdpass::send(conn.as_raw_fd(), format!("error {text}").as_bytes(), &[]),
    };
}

fn handle(data: &[u8], fds: Vec<OwnedFd>) -> Result<OwnedFd, String> {
    use std::os::unix::ffi::OsStrExt;
    let mut words = data.split(|&b| b == 0);
    if words.next() != Some(SPAWN_REQUEST) {
        return Err("unknown request".into());
    }
    let argv: Vec<std::ffi::OsString> = words
        .map(|w| std::ffi::OsStr::from_bytes(w).to_owned())
        .collect();
    let pid = crate::host::shim::fork_in_cell(argv, fds)?;
    // Our child, not reaped before we reap (after this reply): the pid is
    // still its own.
    crate::host::proc::pidfd_open(pid).map_err(|e| format!("pidfd_open: {e}"))
}
