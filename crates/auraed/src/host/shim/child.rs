//! The forked child of the shim, from fork to exec: it joins the cell and
//! becomes the executable. Everything it needs is prepared before the fork
//! ([`Plan`]); after the fork it makes only async-signal-safe system calls
//! and never allocates. A failing step writes `<errno> <step>` to the error
//! pipe and exits 127; [`describe`] turns that into a message.

use std::{
    ffi::{CStr, CString},
    io,
    os::fd::RawFd,
};

/// The environment executables start with.
const PATH_ENV: &CStr = c"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const HOME_ENV: &CStr = c"HOME=/";
const SH: &CStr = c"/bin/sh";
/// Set to `0`, simple commands run through the shell too (see
/// [`exec_prefixed`]).
pub const DIRECT_EXEC_ENV: &str = "AURAE_DIRECT_EXEC";

/// Everything the child does, prepared before the fork.
pub(super) struct Plan {
    /// `cgroup.procs` files to write "0" to, first.
    pub procs: Vec<RawFd>,
    /// Namespaces to enter: (clone flag, fd).
    pub setns: Vec<(libc::c_int, RawFd)>,
    /// Flags to unshare after entering them.
    pub unshare: libc::c_int,
    /// (uid, gid) to switch to, last.
    pub ids: Option<(u32, u32)>,
    /// Becomes stdin.
    pub devnull: RawFd,
    /// Become stdout and stderr.
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// Write end of the error pipe (close-on-exec).
    pub error: RawFd,
    /// `sh -c COMMAND`; `argv` points into it (kept alive here).
    _command: CString,
    argv: [*const libc::c_char; 4],
    envp: [*const libc::c_char; 3],
    /// For a command that `sh -c` would only exec (see [`exec_prefixed`]):
    /// its words, exec'd without the shell first.
    direct: Option<Direct>,
}

/// A simple command's program and arguments, prepared before the fork.
struct Direct {
    /// The words; `argv` points into them (their bytes are on the heap).
    _words: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    /// What dash adds to the environment of what it runs: `PWD=/`.
    envp: [*const libc::c_char; 4],
}

/// `PATH` of [`PATH_ENV`], searched for a program named without a `/`.
const PATH_DIRS: &[&[u8]] = &[
    b"/usr/local/sbin",
    b"/usr/local/bin",
    b"/usr/sbin",
    b"/usr/bin",
    b"/sbin",
    b"/bin",
];

impl Plan {
    /// Fails if the command holds a NUL byte.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        command: &[u8],
        procs: Vec<RawFd>,
        setns: Vec<(libc::c_int, RawFd)>,
        unshare: libc::c_int,
        ids: Option<(u32, u32)>,
        devnull: RawFd,
        stdout: RawFd,
        stderr: RawFd,
        error: RawFd,
    ) -> Result<Self, String> {
        // AURAE_DIRECT_EXEC=0 in the daemon's environment (inherited by
        // holders and shims): every command through `sh -c` as given, for
        // before/after figures.
        let prefixed = if std::env::var_os(DIRECT_EXEC_ENV).is_some_and(|v| v == "0") {
            None
        } else {
            exec_prefixed(command)
        };
        let direct = prefixed.is_some().then(|| Direct::new(command)).flatten();
        let command = CString::new(prefixed.unwrap_or_else(|| command.to_vec()))
            .map_err(|_| "the command holds a NUL byte")?;
        Ok(Self {
            procs,
            setns,
            unshare,
            ids,
            devnull,
            stdout,
            stderr,
            error,
            // The CString's bytes live on the heap: moving it (into Self)
            // does not move them, so the pointer stays valid.
            argv: [
                c"sh".as_ptr(),
                c"-c".as_ptr(),
                command.as_ptr(),
                std::ptr::null(),
            ],
            envp: [PATH_ENV.as_ptr(), HOME_ENV.as_ptr(), std::ptr::null()],
            _command: command,
            direct,
        })
    }

    /// Runs in the forked child: set up, then exec. Never returns.
    ///
    /// Order matters (as in `ChildSetup::apply`): join the cgroups first (as
    /// root, before any namespace change), enter the cell's namespaces, make
    /// new ones, drop privileges last.
    pub fn exec(&self) -> ! {
        for (i, &fd) in self.procs.iter().enumerate() {
            // SAFETY: fd is an open cgroup.procs file; "0" means "me".
            if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
                self.fail(b"join cgroup (cgroup.procs #", Some(i as u64), b")");
            }
        }
        for &(flag, fd) in &self.setns {
            // SAFETY: fd is an open namespace file of kind `flag`.
            if unsafe { libc::setns(fd, flag) } != 0 {
                self.fail(ns_step(flag), None, b"");
            }
        }
        // SAFETY: plain system call in a single-threaded child.
        if self.unshare != 0 && unsafe { libc::unshare(self.unshare) } != 0 {
            self.fail(b"unshare(", Some(self.unshare as u64), b")");
        }
        if let Some((uid, gid)) = self.ids {
            // Raw system calls, not the C library's wrappers: those make
            // every thread of the process change ids (a broadcast over the
            // library's thread list, which a CLONE_VM child shares with
            // the shim); the system calls change only this task.
            // SAFETY: plain system call; the group list is emptied so no
            // supplementary group of the daemon leaks into the workload.
            if unsafe {
                libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>())
            } != 0
            {
                self.fail(b"setgroups(0)", None, b"");
            }
            // SAFETY: plain system call.
            if unsafe { libc::syscall(libc::SYS_setgid, gid as libc::c_long) } != 0 {
                self.fail(b"setgid(", Some(gid.into()), b")");
            }
            // SAFETY: plain system call.
            if unsafe { libc::syscall(libc::SYS_setuid, uid as libc::c_long) } != 0 {
                self.fail(b"setuid(", Some(uid.into()), b")");
            }
        }
        // The executable leads its own process group: Stop signals it.
        // SAFETY: plain system call on ourselves.
        if unsafe { libc::setpgid(0, 0) } != 0 {
            self.fail(b"setpgid", None, b"");
        }
        for (from, to) in [(self.devnull, 0), (self.stdout, 1), (self.stderr, 2)] {
            // SAFETY: both are fds of this process; the shim keeps 0, 1 and
            // 2 open, so `from` (opened later) is never one of them.
            if unsafe { libc::dup2(from, to) } < 0 {
                self.fail(b"dup2", None, b"");
            }
        }
        // SAFETY: a constant C string.
        if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
            self.fail(b"chdir(/)", None, b"");
        }
        // The shim ignores some signals and blocks others; both would be
        // inherited through exec.
        // SAFETY: a zeroed sigaction is SIG_DFL with an empty mask; setting
        // a signal the C library reserves fails harmlessly.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            for sig in 1..=64 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::sigaction(sig, &dfl, std::ptr::null_mut());
                }
            }
        }
        // SAFETY: an emptied sigset_t is valid.
        let r = unsafe {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut())
        };
        if r != 0 {
            self.fail(b"sigprocmask", None, b"");
        }
        if let Some(d) = &self.direct {
            // What `sh -c 'exec COMMAND'` would do, without the shell: the
            // program by its path, or found in PATH like execvp. If that
            // fails for any reason (not found, not executable, no `#!`),
            // the shell below runs it and says why, exactly as before.
            d.exec();
        }
        // SAFETY: NUL-terminated arrays of valid C strings, kept alive by
        // `self` (and statics).
        unsafe { libc::execve(SH.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr()) };
        self.fail(b"execve(/bin/sh)", None, b"")
    }

    /// Reports `errno` and the failed step on the error pipe; exits 127.
    fn fail(&self, step: &[u8], arg: Option<u64>, tail: &[u8]) -> ! {
        // Os errors carry no allocation.
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut msg = Msg::default();
        msg.num(errno.unsigned_abs().into());
        msg.push(b" ");
        msg.push(step);
        if let Some(arg) = arg {
            msg.num(arg);
        }
        msg.push(tail);
        // SAFETY: writing our own buffer to an fd of ours, then exiting
        // without running any destructor or atexit handler.
        unsafe {
            libc::write(self.error, msg.buf.as_ptr().cast(), msg.len);
            libc::_exit(127)
        }
    }
}

impl Direct {
    /// The words of a command [`exec_prefixed`] accepted (split on blanks,
    /// as the shell splits it: no quoting or expansion is left in it).
    fn new(command: &[u8]) -> Option<Self> {
        let words: Vec<CString> = command
            .split(|b| *b == b' ' || *b == b'\t')
            .filter(|w| !w.is_empty())
            .map(|w| CString::new(w).ok())
            .collect::<Option<_>>()?;
        let first = words.first()?;
        // Longer names than a path buffer holds go through the shell.
        if first.as_bytes().len() > 200 {
            return None;
        }
        let mut argv: Vec<*const libc::c_char> = words.iter().map(|w| w.as_ptr()).collect();
        argv.push(std::ptr::null());
        Some(Self {
            _words: words,
            argv,
            envp: [
                PATH_ENV.as_ptr(),
                HOME_ENV.as_ptr(),
                c"PWD=/".as_ptr(),
                std::ptr::null(),
            ],
        })
    }

    /// execve of the program, in the child: returns only if every try
    /// failed. No allocation: paths are built on the stack.
    fn exec(&self) {
        let prog = self.argv[0];
        // SAFETY: `prog` is one of our NUL-terminated words.
        let name = unsafe { CStr::from_ptr(prog) }.to_bytes();
        if name.contains(&b'/') {
            // SAFETY: NUL-terminated arrays of valid C strings kept alive
            // by `self` (and statics).
            unsafe { libc::execve(prog, self.argv.as_ptr(), self.envp.as_ptr()) };
            return;
        }
        let mut path = [0u8; 256];
        for dir in PATH_DIRS {
            let n = dir.len() + 1 + name.len();
            if n >= path.len() {
                continue;
            }
            path[..dir.len()].copy_from_slice(dir);
            path[dir.len()] = b'/';
            path[dir.len() + 1..n].copy_from_slice(name);
            path[n] = 0;
            // SAFETY: `path` is NUL-terminated; the arrays as above.
            unsafe { libc::execve(path.as_ptr().cast(), self.argv.as_ptr(), self.envp.as_ptr()) };
            // ENOEXEC (a script without `#!`): the shell runs those.
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENOEXEC) {
                return;
            }
        }
    }
}

/// `exec COMMAND` when COMMAND is one simple command that the shell would
/// run as a program: then `sh -c` replaces itself with it, as bash does
/// for the last command of `-c` (dash forks, waits and exits with its
/// status). One process per executable instead of two: no fork, no
/// waiting shell, signals and the exit status are the program's own.
/// None (run as given) when anything could make a difference: quotes,
/// expansions, redirections, operators, globs, comments, an assignment
/// first, or a first word that is a shell keyword or builtin.
fn exec_prefixed(command: &[u8]) -> Option<Vec<u8>> {
    /// dash's keywords and builtins (`exec` of these would look for a
    /// program of that name, or fail).
    const SHELL_WORDS: &[&[u8]] = &[
        b"!",
        b".",
        b":",
        b"[",
        b"alias",
        b"bg",
        b"break",
        b"case",
        b"cd",
        b"command",
        b"continue",
        b"do",
        b"done",
        b"echo",
        b"elif",
        b"else",
        b"esac",
        b"eval",
        b"exec",
        b"exit",
        b"export",
        b"false",
        b"fg",
        b"fi",
        b"for",
        b"getopts",
        b"hash",
        b"if",
        b"in",
        b"jobs",
        b"kill",
        b"local",
        b"printf",
        b"pwd",
        b"read",
        b"readonly",
        b"return",
        b"set",
        b"shift",
        b"test",
        b"then",
        b"times",
        b"trap",
        b"true",
        b"type",
        b"ulimit",
        b"umask",
        b"unalias",
        b"unset",
        b"until",
        b"wait",
        b"while",
        b"{",
        b"}",
        b"time",
        b"function",
    ];
    let plain = |b: &u8| b.is_ascii_alphanumeric() || b"_./:,+%@=-".contains(b);
    if !command
        .iter()
        .all(|b| plain(b) || *b == b' ' || *b == b'\t')
    {
        return None;
    }
    let first = command
        .split(|b| *b == b' ' || *b == b'\t')
        .find(|w| !w.is_empty())?;
    if first.contains(&b'=') || first.starts_with(b"-") || SHELL_WORDS.contains(&first) {
        return None;
    }
    let mut out = b"exec ".to_vec();
    out.extend_from_slice(command);
    Some(out)
}

fn ns_step(flag: libc::c_int) -> &'static [u8] {
    match flag {
        libc::CLONE_NEWNS => b"setns(mnt)",
        libc::CLONE_NEWUTS => b"setns(uts)",
        libc::CLONE_NEWIPC => b"setns(ipc)",
        libc::CLONE_NEWNET => b"setns(net)",
        libc::CLONE_NEWPID => b"setns(pid)",
        libc::CLONE_NEWCGROUP => b"setns(cgroup)",
        libc::CLONE_NEWUSER => b"setns(user)",
        _ => b"setns",
    }
}

/// A message built on the stack.
struct Msg {
    buf: [u8; 128],
    len: usize,
}

impl Default for Msg {
    fn default() -> Self {
        Self {
            buf: [0; 128],
            len: 0,
        }
    }
}

impl Msg {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn num(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// What the child wrote on the error pipe, as a message:
/// `setuid(4294967295): Invalid argument (os error 22)`.
pub(super) fn describe(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    match text.split_once(' ') {
        Some((errno, step)) => match errno.parse::<i32>() {
            Ok(e) => format!("{step}: {}", io::Error::from_raw_os_error(e)),
            Err(_) => text.into_owned(),
        },
        None => text.into_owned(),
    }
}

#[cfg(test)]
mod exec_tests {
    use super::exec_prefixed;

    #[test]
    fn simple_commands_are_execd() {
        let e = |c: &str| exec_prefixed(c.as_bytes()).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(e("/bin/true").as_deref(), Some("exec /bin/true"));
        assert_eq!(e("sleep 100").as_deref(), Some("exec sleep 100"));
        assert_eq!(
            e("  python3 -m http.server 8000").as_deref(),
            Some("exec   python3 -m http.server 8000")
        );
        assert_eq!(
            e("prog --opt=value").as_deref(),
            Some("exec prog --opt=value")
        );
        for kept in [
            "",
            "   ",
            "echo hi",
            "exit 3",
            "cd /tmp",
            "true",
            "VAR=1 prog",
            "a; b",
            "a && b",
            "a | b",
            "a > f",
            "echo $HOME",
            "ls *",
            "'quoted'",
            "\"q\"",
            "prog # c",
            "~/bin/x",
            "if true",
            "-x y",
            "a\nb",
            "kill -9 1",
            "(sub)",
            "x `y`",
            "a\\b",
        ] {
            assert_eq!(e(kept), None, "{kept:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let mut m = Msg::default();
        m.num(22);
        m.push(b" setuid(");
        m.num(u64::from(u32::MAX));
        m.push(b")");
        assert_eq!(&m.buf[..m.len], b"22 setuid(4294967295)");
        assert!(describe(&m.buf[..m.len]).starts_with("setuid(4294967295): Invalid argument"));
        let mut z = Msg::default();
        z.num(0);
        assert_eq!(&z.buf[..z.len], b"0");
        let mut long = Msg::default();
        long.push(&[b'x'; 300]);
        assert_eq!(long.len, 128);
        assert_eq!(describe(b"junk"), "junk");
    }
}
