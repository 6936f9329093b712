//! The shim's command line: what the daemon tells a shim to run.
//!
//! ```text
//! aurae-shim __aurae_shim__ dir=FD status=FD pidns=FD|- procs=FD,FD..|-
//!     ns=FLAG:FD,FLAG:FD..|- unshare=FLAGS uid=N|- gid=N|- cap=BYTES
//!     [into=FD] -- COMMAND
//! ```
//!
//! Every `FD` is inherited (the daemon clears its close-on-exec flag in the
//! forked child only): `dir` the executable's directory, `status` the write
//! end of the status pipe, `pidns` the pid namespace to fork into, `procs`
//! the cgroup.procs files to join, `ns` the other namespaces as
//! `clone flag:fd`. `unshare` is a decimal mask of clone flags; `uid`/`gid`
//! are the ids to run as (`-`: keep the daemon's); `cap` the bytes of
//! output kept per channel. `into` (optional; absent in the format shims
//! of earlier releases read) is a cgroup2 directory the executable is
//! forked into with `clone3(CLONE_INTO_CGROUP)` (its `cgroup.procs` is
//! then not in `procs`; the shim writes it itself where clone3 cannot).
//! The command is the one argument after `--`. Keys come in this order,
//! each exactly once.

use std::{
    ffi::{OsStr, OsString},
    os::{fd::RawFd, unix::ffi::OsStrExt},
};

/// A parsed shim command line (without argv[0] and [`super::SHIM_ARG`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Args {
    pub dir: RawFd,
    pub status: RawFd,
    pub pid_ns: Option<RawFd>,
    pub procs: Vec<RawFd>,
    pub setns: Vec<(libc::c_int, RawFd)>,
    pub unshare: libc::c_int,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub cap: u64,
    /// A cgroup2 directory to fork the executable into.
    pub into: Option<RawFd>,
    pub command: Vec<u8>,
}

impl Args {
    /// Every fd the shim inherits.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.dir, self.status];
        fds.extend(self.pid_ns);
        fds.extend(&self.procs);
        fds.extend(self.setns.iter().map(|&(_, fd)| fd));
        fds.extend(self.into);
        fds
    }

    /// The arguments after [`super::SHIM_ARG`].
    pub fn to_argv(&self) -> Vec<OsString> {
        fn opt<T: ToString>(v: Option<T>) -> String {
            v.map_or_else(|| "-".to_owned(), |v| v.to_string())
        }
        fn list<T>(v: &[T], f: impl Fn(&T) -> String) -> String {
            if v.is_empty() {
                "-".to_owned()
            } else {
                v.iter().map(f).collect::<Vec<_>>().join(",")
            }
        }
        let mut argv: Vec<OsString> = [
            format!("dir={}", self.dir),
            format!("status={}", self.status),
            format!("pidns={}", opt(self.pid_ns)),
            format!("procs={}", list(&self.procs, i32::to_string)),
            format!("ns={}", list(&self.setns, |(f, fd)| format!("{f}:{fd}"))),
            format!("unshare={}", self.unshare),
            format!("uid={}", opt(self.uid)),
            format!("gid={}", opt(self.gid)),
            format!("cap={}", self.cap),
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        if let Some(fd) = self.into {
            argv.push(format!("into={fd}").into());
        }
        argv.push("--".into());
        argv.push(OsStr::from_bytes(&self.command).to_owned());
        argv
    }

    /// Parses what [`Args::to_argv`] made.
    pub fn parse(mut argv: impl Iterator<Item = OsString>) -> Result<Self, String> {
        let mut next = |key: &str| -> Result<String, String> {
            let arg = argv.next().ok_or_else(|| format!("missing {key}="))?;
            let arg = arg
                .into_string()
                .map_err(|a| format!("bad argument {a:?}"))?;
            match arg.strip_prefix(key).and_then(|a| a.strip_prefix('=')) {
                Some(v) => Ok(v.to_owned()),
                None => Err(format!("expected {key}=, got {arg:?}")),
            }
        };
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, String> {
            v.parse().map_err(|_| format!("bad {key}={v}"))
        }
        fn opt<T: std::str::FromStr>(key: &str, v: &str) -> Result<Option<T>, String> {
            if v == "-" {
                Ok(None)
            } else {
                num(key, v).map(Some)
            }
        }
        fn list<T>(v: &str, f: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
            if v == "-" {
                Ok(Vec::new())
            } else {
                v.split(',').map(f).collect()
            }
        }
        let dir = num("dir", &next("dir")?)?;
        let status = num("status", &next("status")?)?;
        let pid_ns = opt("pidns", &next("pidns")?)?;
        let procs = list(&next("procs")?, |v| num("procs", v))?;
        let setns = list(&next("ns")?, |v| {
            let (flag, fd) = v.split_once(':').ok_or_else(|| format!("bad ns={v}"))?;
            Ok((num("ns", flag)?, num("ns", fd)?))
        })?;
        let unshare = num("unshare", &next("unshare")?)?;
        let uid = opt("uid", &next("uid")?)?;
        let gid = opt("gid", &next("gid")?)?;
        let cap = num("cap", &next("cap")?)?;
        let mut into = None;
        let mut sep = argv.next();
        if let Some(v) = sep
            .as_ref()
            .and_then(|a| a.to_str())
            .and_then(|a| a.strip_prefix("into="))
        {
            into = Some(num("into", v)?);
            sep = argv.next();
        }
        if sep.is_none_or(|a| a != "--") {
            return Err("expected -- before the command".to_owned());
        }
        let command = argv.next().ok_or("missing the command")?;
        if argv.next().is_some() {
            return Err("extra arguments after the command".to_owned());
        }
        Ok(Self {
            dir,
            status,
            pid_ns,
            procs,
            setns,
            unshare,
            uid,
            gid,
            cap,
            into,
            command: command.as_bytes().to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let full = Args {
            dir: 3,
            status: 4,
            pid_ns: Some(5),
            procs: vec![6, 7],
            setns: vec![(libc::CLONE_NEWNET, 8), (libc::CLONE_NEWNS, 9)],
            unshare: libc::CLONE_NEWCGROUP,
            uid: Some(1000),
            gid: None,
            cap: 1 << 20,
            into: Some(10),
            command: b"echo 'a b' -- x=1".to_vec(),
        };
        let empty = Args {
            pid_ns: None,
            procs: vec![],
            setns: vec![],
            unshare: 0,
            uid: None,
            into: None,
            command: Vec::new(),
            ..full.clone()
        };
        for args in [full, empty] {
            let argv = args.to_argv();
            assert_eq!(Args::parse(argv.into_iter()), Ok(args));
        }
        assert_eq!(full_fds(), vec![3, 4, 5, 6, 7, 8, 9]);
    }

    fn full_fds() -> Vec<RawFd> {
        Args {
            dir: 3,
            status: 4,
            pid_ns: Some(5),
            procs: vec![6],
            setns: vec![(libc::CLONE_NEWNET, 7), (libc::CLONE_NEWNS, 8)],
            unshare: 0,
            uid: None,
            gid: None,
            cap: 0,
            into: Some(9),
            command: Vec::new(),
        }
        .fds()
    }

    #[test]
    fn rejects_garbage() {
        let parse = |v: &[&str]| Args::parse(v.iter().map(OsString::from));
        assert!(parse(&[]).is_err());
        assert!(parse(&["dir=x"]).is_err());
        let mut ok = vec![
            "dir=3",
            "status=4",
            "pidns=-",
            "procs=-",
            "ns=-",
            "unshare=0",
            "uid=-",
            "gid=-",
            "cap=9",
            "--",
            "true",
        ];
        assert!(parse(&ok).is_ok());
        ok.push("extra");
        assert!(parse(&ok).is_err());
        ok.pop();
        ok.insert(9, "into=5");
        assert_eq!(parse(&ok).map(|a| a.into), Ok(Some(5)));
        ok[9] = "into=x";
        assert!(parse(&ok).is_err());
        ok.remove(9);
        ok[4] = "ns=1:2:3";
        assert!(parse(&ok).is_err());
    }
}
