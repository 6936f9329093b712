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

pub fn main() -> ! {
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
