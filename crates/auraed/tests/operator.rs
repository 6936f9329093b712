//! The operator's side, end to end against the real daemon: readiness
//! notification to a `NOTIFY_SOCKET` this test creates (as systemd does
//! for `Type=notify`), syslog priority prefixes when stderr is the journal,
//! and `aer cell run`. Tests that need root say so loudly and return.

mod common;

use std::{
    io::{BufRead, BufReader},
    os::unix::{fs::MetadataExt, net::UnixDatagram},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aurae_client::{
    proto::{cells::CellServiceListRequest, discovery::DiscoverRequest},
    Client, ClientConfig,
};
use common::{observe::*, unique, Daemon};

/// An auraed started by hand (the harness does not pass environment
/// variables); SIGTERM, then SIGKILL, when dropped. It runs with
/// `--on-exit free`, so its SIGTERM removes its cgroup root.
struct Raw {
    child: Child,
    cgroup_root: String,
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            common::signal(self.child.id() as i32, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = self.child.try_wait() {
                common::signal(self.child.id() as i32, libc::SIGKILL);
                let _ = self.child.wait();
            }
        }
        for h in ["cpu", "cpuacct", "cpuset", "memory", "unified", ""] {
            let root = Path::new("/sys/fs/cgroup")
                .join(h)
                .join(self.cgroup_root.trim_start_matches('/'));
            for leaf in ["_exec", "auraed"] {
                let _ = std::fs::remove_dir(root.join(leaf));
            }
            let _ = std::fs::remove_dir(&root);
        }
    }
}

/// Starts auraed in `dir` with `NOTIFY_SOCKET=notify` and its stderr in
/// `log`, announced as the journal (`JOURNAL_STREAM` = that file's device
/// and inode, as systemd sets it for the stream it connects).
fn spawn_raw(dir: &Path, notify: &Path, log: &Path) -> Raw {
    let stderr = std::fs::File::create(log).expect("log file");
    let meta = stderr.metadata().expect("stat log");
    let p = Daemon::paths_in(dir);
    let cgroup_root = format!("/{}", unique("aurae-test-notify"));
    let child = Command::new(common::auraed_bin())
        .arg("--socket")
        .arg(dir.join("aurae.sock"))
        .arg("--ca-crt")
        .arg(&p.ca_crt)
        .arg("--server-crt")
        .arg(&p.server_crt)
        .arg("--server-key")
        .arg(&p.server_key)
        .arg("--runtime-dir")
        .arg(dir.join("run"))
        .arg("--library-dir")
        .arg(dir.join("lib"))
        .arg("--cgroup-root")
        .arg(&cgroup_root)
        .args(["--on-exit", "free"])
        .env("HOME", dir)
        .env("NOTIFY_SOCKET", notify)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn auraed");
    Raw { child, cgroup_root }
}

/// The next datagram on `sock`, as text (blocking, bounded by its timeout).
fn recv(sock: &UnixDatagram, what: &str, log: &Path) -> String {
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!(
            "no {what} datagram: {e}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
}

/// Whether a thread of `pid` waits in the kernel for room in a unix
/// datagram socket's queue (sending to our full NOTIFY_SOCKET).
fn blocked_in_unix_send(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("wchan")).is_ok_and(|w| w == "unix_wait_for_peer")
    })
}

#[tokio::test]
async fn ready_is_notified_once_the_socket_answers_and_stopping_at_shutdown() {
    if !is_root() {
        return skip(
            "ready_is_notified_once_the_socket_answers_and_stopping_at_shutdown",
            "needs root (cgroups)",
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("auraed-test-notify-")
        .tempdir()
        .expect("temp dir");
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).expect("bind NOTIFY_SOCKET");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // The queue is filled first, so the daemon's first notification
    // blocks in send(2) (in the kernel's unix_wait_for_peer) until this
    // test reads: the daemon is caught at the moment it notifies.
    let filler = UnixDatagram::unbound().expect("socket");
    filler.connect(&notify).expect("connect filler");
    filler.set_nonblocking(true).expect("nonblocking");
    let mut filled = 0;
    while filler.send(b"FILLER=1\n").is_ok() {
        filled += 1;
    }
    assert!(filled > 0, "could not fill the notify queue");
    let log = dir.path().join("auraed.log");
    let mut d = spawn_raw(dir.path(), &notify, &log);
    let pid = d.child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !blocked_in_unix_send(pid) {
        assert!(
            Instant::now() < deadline,
            "auraed never notified; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            matches!(d.child.try_wait(), Ok(None)),
            "auraed exited; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // At that moment the gRPC socket is already bound and listening.
    std::os::unix::net::UnixStream::connect(dir.path().join("aurae.sock"))
        .expect("the gRPC socket is bound before the daemon notifies");

    // The first datagram after the filler is READY=1, and then the socket
    // answers: one Discover, no retry.
    let sock = std::sync::Arc::new(sock);
    let first = {
        let (sock, log) = (sock.clone(), log.clone());
        tokio::task::spawn_blocking(move || loop {
            let m = recv(&sock, "READY", &log);
            if m != "FILLER=1\n" {
                return m;
            }
        })
        .await
        .expect("join")
    };
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    assert!(
        first.lines().any(|l| l.starts_with("STATUS=serving on ")),
        "{first:?}"
    );
    let config = ClientConfig::from_file(&dir.path().join("pki/client-config.toml"))
        .expect("client config written before READY");
    let c = Client::connect(&config)
        .await
        .expect("connect right after READY");
    c.discovery()
        .discover(DiscoverRequest {})
        .await
        .expect("Discover right after READY");

    // Workloads do not inherit NOTIFY_SOCKET (they must not speak for the
    // daemon). The shim keeps the output, so it is there after the exit.
    let pid = start(
        &c,
        None,
        &unique("env"),
        "echo NOTIFY_SOCKET=${NOTIFY_SOCKET-unset}",
    )
    .await;
    let out = read_output(
        &c,
        pid,
        aurae_client::proto::observe::LogChannelType::Stdout,
    )
    .await;
    assert_eq!(out, ["NOTIFY_SOCKET=unset"]);

    // SIGTERM: STOPPING=1 comes while the daemon shuts down.
    common::signal(d.child.id() as i32, libc::SIGTERM);
    let second = {
        let (sock, log) = (sock.clone(), log.clone());
        tokio::task::spawn_blocking(move || recv(&sock, "STOPPING", &log))
            .await
            .expect("join")
    };
    assert!(second.lines().any(|l| l == "STOPPING=1"), "{second:?}");
    let status = d.child.wait().expect("wait auraed");
    assert!(status.success(), "{status:?}");

    // With JOURNAL_STREAM naming its stderr, every line carries its syslog
    // priority (journald strips it into PRIORITY), no colour codes and no
    // timestamp of its own.
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(!text.contains('\x1b'), "ANSI codes in the journal:\n{text}");
    let serving = text
        .lines()
        .find(|l| l.contains("serving on"))
        .unwrap_or_else(|| panic!("no serving line:\n{text}"));
    assert!(serving.starts_with("<6> INFO auraed: "), "{serving:?}");
    for line in text.lines() {
        let prio = line
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .map(|(p, _)| p);
        assert!(
            matches!(prio, Some("3" | "4" | "6" | "7")),
            "a line without a priority: {line:?}\n{text}"
        );
    }
}

#[tokio::test]
async fn plain_stderr_has_no_priority_prefix() {
    if !is_root() {
        return skip("plain_stderr_has_no_priority_prefix", "needs root");
    }
    // The harness's daemon writes to a file without JOURNAL_STREAM.
    let d = Daemon::start().await;
    drop(d.client().await);
    let log = d.log();
    let serving = log
        .lines()
        .find(|l| l.contains("serving on"))
        .unwrap_or_else(|| panic!("no serving line:\n{log}"));
    assert!(!serving.starts_with('<'), "{serving:?}");
    assert!(serving.contains("INFO"), "{serving:?}");
}

fn aer_cmd(d: &Daemon, args: &[&str]) -> Command {
    let mut cmd = Command::new(common::aer_bin());
    cmd.arg("--config").arg(d.client_config_path()).args(args);
    cmd
}

#[tokio::test]
async fn aer_cell_run_streams_both_channels_and_exits_with_the_code() {
    if !is_root() {
        return skip(
            "aer_cell_run_streams_both_channels_and_exits_with_the_code",
            "needs root",
        );
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let cell = unique("run");
    allocate(&c, &cell, true).await;
    // Interleaved channels, more lines than one batch (1024), a line
    // without a final newline on stderr.
    const N: usize = 5000;
    let script =
        format!("i=1; while [ $i -le {N} ]; do echo out$i; echo err$i >&2; i=$((i+1)); done; printf tail >&2; exit 7");
    let out = tokio::task::spawn_blocking({
        let mut cmd = aer_cmd(&d, &["cell", "run", &cell, "loud", "--", &script]);
        move || cmd.output().expect("aer")
    })
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    let stderr = String::from_utf8(out.stderr).expect("utf8");
    let want_out: Vec<String> = (1..=N).map(|i| format!("out{i}")).collect();
    let mut want_err: Vec<String> = (1..=N).map(|i| format!("err{i}")).collect();
    want_err.push("tail".to_owned());
    assert_eq!(stdout.lines().collect::<Vec<_>>(), want_out);
    assert_eq!(stderr.lines().collect::<Vec<_>>(), want_err);

    // Its record is gone, so the name runs again; a signal's code is 128+N.
    let out = aer_cmd(&d, &["cell", "run", &cell, "loud", "--", "kill -9 $$"])
        .output()
        .expect("aer");
    assert_eq!(out.status.code(), Some(128 + 9), "{out:?}");
    // --keep leaves it for `aer cell wait`.
    let out = aer_cmd(
        &d,
        &["cell", "run", "--keep", &cell, "kept", "--", "exit 3"],
    )
    .output()
    .expect("aer");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = aer_cmd(&d, &["cell", "wait", &cell, "kept"])
        .output()
        .expect("aer");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // A failing Start is one sentence and exit 1.
    let out = aer_cmd(&d, &["cell", "run", "no-such-cell", "x", "--", "true"])
        .output()
        .expect("aer");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("aer: "),
        "{out:?}"
    );
    free(&c, &cell).await;
}

#[tokio::test]
async fn aer_cell_run_sigint_stops_the_executable() {
    if !is_root() {
        return skip("aer_cell_run_sigint_stops_the_executable", "needs root");
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let cell = unique("runint");
    allocate(&c, &cell, false).await;
    let mut aer = aer_cmd(
        &d,
        &[
            "cell",
            "run",
            &cell,
            "sleeper",
            "--",
            "echo started; exec sleep 1000",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("aer");
    let mut lines = BufReader::new(aer.stdout.take().expect("stdout")).lines();
    let first = tokio::task::spawn_blocking(move || lines.next())
        .await
        .expect("join");
    assert_eq!(first.and_then(Result::ok).as_deref(), Some("started"));

    let list = c
        .cells()
        .list(CellServiceListRequest {})
        .await
        .expect("list")
        .into_inner();
    let node = list
        .cells
        .iter()
        .find(|n| n.cell.as_ref().is_some_and(|x| x.name == cell))
        .expect("the cell");
    let pid = node
        .executables
        .iter()
        .find(|e| e.name == "sleeper")
        .expect("the executable")
        .pid;
    assert!(!exited(pid));

    common::signal(aer.id() as i32, libc::SIGINT);
    let status = tokio::task::spawn_blocking(move || aer.wait_with_output())
        .await
        .expect("join")
        .expect("wait aer");
    assert_eq!(status.status.code(), Some(130), "{status:?}");
    // Stop returned: the executable is gone (its shim reaps it) and so is
    // its record.
    let deadline = Instant::now() + STEP;
    while !exited(pid) {
        assert!(Instant::now() < deadline, "pid {pid} still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let list = c
        .cells()
        .list(CellServiceListRequest {})
        .await
        .expect("list")
        .into_inner();
    let node = list
        .cells
        .iter()
        .find(|n| n.cell.as_ref().is_some_and(|x| x.name == cell))
        .expect("the cell");
    assert!(node.executables.is_empty(), "{:?}", node.executables);
    free(&c, &cell).await;
}
