//! Holder mode: `auraed __aurae_cell_holder__` keeps an isolated cell's
//! namespaces alive. As PID 1 of the cell's pid namespace it also reaps
//! every orphan there. Everything was set up before exec (see
//! `ChildSetup`); it only waits. SIGTERM or SIGINT ends it (and, as init,
//! every process of its pid namespace with it).

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

pub fn main() -> ! {
    let args: Vec<String> = std::env::args().collect();
    if args.get(2).is_some_and(|a| a == NESTED) {
        nested_main(
            args.get(3).map_or("", String::as_str),
            args.get(4).is_some_and(|a| a == "net"),
        );
    }
    holder_loop()
}

/// The intermediate of a nested holder: its pid namespace for children is
/// already new (unshared before exec). It forks the holder, which becomes
/// PID 1 there, then waits for it; a signal ends both.
fn nested_main(hostname: &str, network: bool) -> ! {
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
                    holder_loop()
                }
                Err(e) => {
                    let _ = writeln!(out, "{e}");
                    std::process::exit(1)
                }
            }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            let _ = nix::unistd::close(1);
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

fn holder_loop() -> ! {
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
