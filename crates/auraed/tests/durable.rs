//! Durability end to end: workloads, their output and their exit status
//! outlive the daemon. Each test kills (or stops) the real daemon, starts a
//! new one on the same directories and cgroup root, and checks from the
//! host (/proc, cgroup files) and through the API that everything was
//! re-adopted. The harness frees whatever a keep-policy test leaves, also
//! when it fails.

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aurae_client::{
    proto::{
        cells::{
            Cell, CellGraphNode, CellServiceAllocateRequest, CellServiceListRequest,
            CellServiceStartRequest, Executable, ExecutableStatus,
        },
        observe::LogChannelType,
    },
    Client,
};
use common::{
    observe::{allocate, exited, free, kill, output_req, read_output, rss_kib, start, stop},
    unique, Daemon,
};
use tonic::Code;

const KEEP: &[&str] = &["--on-exit", "keep", "--stop-grace-secs", "2"];

/// name → status of every executable, cells as `cell/exe`, host ones as
/// `/exe`; plus cell name → status.
async fn snapshot(c: &Client) -> (BTreeMap<String, ExecutableStatus>, BTreeMap<String, String>) {
    let r = c
        .cells()
        .list(CellServiceListRequest {})
        .await
        .expect("list")
        .into_inner();
    let mut execs = BTreeMap::new();
    let mut cells = BTreeMap::new();
    for e in r.host_executables {
        execs.insert(format!("/{}", e.name), e);
    }
    fn walk(
        nodes: &[CellGraphNode],
        execs: &mut BTreeMap<String, ExecutableStatus>,
        cells: &mut BTreeMap<String, String>,
    ) {
        for n in nodes {
            let name = n.cell.as_ref().map(|c| c.name.clone()).unwrap_or_default();
            for e in &n.executables {
                execs.insert(format!("{name}/{}", e.name), e.clone());
            }
            cells.insert(name, n.status.clone());
            walk(&n.children, execs, cells);
        }
    }
    walk(&r.cells, &mut execs, &mut cells);
    (execs, cells)
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn allocate_cell(c: &Client, cell: Cell) {
    let name = cell.name.clone();
    c.cells()
        .allocate(CellServiceAllocateRequest { cell: Some(cell) })
        .await
        .unwrap_or_else(|e| panic!("allocate {name}: {e}"));
}

/// The cell's directory in every hierarchy of this host.
fn cgroup_dirs(d: &Daemon, cell: &str) -> Vec<PathBuf> {
    ["cpu", "cpuset", "memory", "unified", ""]
        .iter()
        .map(|h| {
            Path::new("/sys/fs/cgroup")
                .join(h)
                .join(d.cgroup_root.trim_start_matches('/'))
                .join(cell)
        })
        .filter(|p| p.parent().is_some_and(Path::is_dir) || p.is_dir())
        .collect()
}

/// Executable directories the daemon keeps (one per executable not stopped).
/// Executables' directories (links to `lib/output/<id>`; each has its
/// `<id>.json` record beside it).
fn exec_dirs(d: &Daemon) -> usize {
    let count = |p: &str, f: &dyn Fn(&str) -> bool| {
        std::fs::read_dir(d.dir.path().join(p))
            .map(|r| {
                r.flatten()
                    .filter(|e| f(&e.file_name().to_string_lossy()))
                    .count()
            })
            .unwrap_or(0)
    };
    let links = count("run/state/execs", &|n| !n.ends_with(".json"));
    let records = count("run/state/execs", &|n| n.ends_with(".json"));
    assert_eq!(links, records, "a record beside every directory");
    // Output directories: one per executable, and at most one made ahead.
    let outputs = count("lib/output", &|_| true);
    assert!(
        outputs == links || outputs == links + 1,
        "{outputs} output directories for {links} executables"
    );
    links
}

fn hostname_of(pid: i32) -> String {
    // The uts namespace's hostname, as the process sees it.
    let out = std::process::Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-u", "hostname"])
        .output()
        .expect("nsenter");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Numbers of `lineN` lines, checked to be 0, 1, 2, … without gap or
/// duplicate.
fn check_counting(lines: &[String]) -> usize {
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l, &format!("line{i}"), "line {i} of {}", lines.len());
    }
    lines.len()
}

#[tokio::test]
async fn kill9_restart_readopts_every_kind_of_workload() {
    let mut d = Daemon::start_with(None, KEEP).await;
    let c = d.client().await;
    let p = unique("plain");
    let i = unique("iso");
    let n = format!("{i}/nested");
    allocate(&c, &p, false).await;
    allocate_cell(
        &c,
        Cell {
            name: i.clone(),
            isolate_process: true,
            isolate_network: true,
            ..Default::default()
        },
    )
    .await;
    allocate(&c, &n, true).await;

    let host = start(&c, None, &unique("host"), "sleep 1000").await;
    let host_name = {
        let (execs, _) = snapshot(&c).await;
        execs
            .iter()
            .find(|(_, e)| e.pid == host)
            .map(|(k, _)| k.clone())
            .expect("host executable listed")
    };
    let counter = start(
        &c,
        Some(&p),
        "counter",
        "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.005; done",
    )
    .await;
    let exit7 = start(&c, Some(&p), "exit7", "sleep 2; exit 7").await;
    let victim = start(&c, Some(&p), "victim", "sleep 1000").await;
    let sleeper = start(&c, Some(&i), "sleeper", "sleep 1000").await;
    let nested = start(&c, Some(&n), "nested", "sleep 1000").await;
    // Some output before the crash.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The crash. Then, while no daemon runs: one exits with 7, one is
    // killed by a signal, the counter keeps printing.
    let old = d.pid();
    d.stop_with(libc::SIGKILL);
    kill(victim, libc::SIGTERM);
    wait_until("exit7 to exit", Duration::from_secs(10), || exited(exit7)).await;
    wait_until("victim to exit", Duration::from_secs(10), || exited(victim)).await;
    // The counter prints on meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.respawn(None).await;
    assert_ne!(d.pid(), old);
    let c = d.client().await;

    for pid in [host, counter, sleeper, nested] {
        assert!(!exited(pid), "pid {pid} survived the crash");
    }
    let mut execs = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        execs = snapshot(&c).await.0;
        if execs
            .get(&format!("{p}/exit7"))
            .is_some_and(|e| e.state == "exited")
            && execs
                .get(&format!("{p}/victim"))
                .is_some_and(|e| e.state == "exited")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, cells) = snapshot(&c).await;
    assert_eq!(cells.get(&p).map(String::as_str), Some("ready"));
    assert_eq!(cells.get(&i).map(String::as_str), Some("ready"));
    assert_eq!(cells.get(&n).map(String::as_str), Some("ready"));
    let e = &execs[&format!("{p}/exit7")];
    assert_eq!(
        (e.state.as_str(), e.exit_code, e.signal),
        ("exited", Some(7), None)
    );
    assert_eq!(e.pid, exit7);
    let e = &execs[&format!("{p}/victim")];
    assert_eq!(
        (e.state.as_str(), e.exit_code, e.signal),
        ("exited", None, Some(libc::SIGTERM))
    );
    for (name, pid) in [
        (host_name.clone(), host),
        (format!("{p}/counter"), counter),
        (format!("{i}/sleeper"), sleeper),
        (format!("{n}/nested"), nested),
    ] {
        let e = execs
            .get(&name)
            .unwrap_or_else(|| panic!("{name} listed: {execs:?}"));
        assert_eq!((e.state.as_str(), e.pid), ("running", pid), "{name}");
    }

    // The counter's output: from line0, no gap, no duplicate, and it goes
    // on past the crash (what it printed meanwhile is there).
    let mut s = c
        .observe()
        .get_sub_process_stream(output_req(counter, LogChannelType::Stdout))
        .await
        .expect("subscribe")
        .into_inner();
    let mut lines = Vec::new();
    while lines.len() < 400 {
        let m = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("counter output stalled")
            .expect("stream")
            .expect("stream ended early");
        lines.push(m.item.expect("item").line);
    }
    drop(s);
    check_counting(&lines);

    // Control after re-adoption: Start in the re-adopted isolated cells
    // (their namespaces are the same), Stop, Free.
    let probe = start(&c, Some(&i), "probe", "sleep 1000").await;
    assert_eq!(hostname_of(probe), hostname_of(sleeper));
    assert_eq!(hostname_of(probe), i);
    let probe2 = start(&c, Some(&n), "probe", "sleep 1000").await;
    assert_eq!(hostname_of(probe2), "nested");
    stop(&c, Some(&p), "counter").await;
    assert!(exited(counter));
    stop(&c, Some(&p), "exit7").await;
    stop(&c, None, host_name.trim_start_matches('/')).await;
    assert!(exited(host));
    let e = c
        .cells()
        .stop(aurae_client::proto::cells::CellServiceStopRequest {
            cell_name: Some(p.clone()),
            executable_name: "exit7".into(),
        })
        .await
        .expect_err("stopped twice");
    assert_eq!(e.code(), Code::NotFound);
    free(&c, &i).await;
    free(&c, &p).await;
    for pid in [sleeper, nested, probe, probe2, victim] {
        assert!(exited(pid), "pid {pid} gone after Free");
    }
    for cell in [&p, &i] {
        for dir in cgroup_dirs(&d, cell) {
            assert!(!dir.exists(), "{} removed", dir.display());
        }
    }
    assert_eq!(exec_dirs(&d), 0, "every executable directory removed");
}

#[tokio::test]
async fn sigterm_keeps_workloads_by_default_and_free_policy_leaves_nothing() {
    let mut d = Daemon::start_with(None, KEEP).await;
    let c = d.client().await;
    let cell = unique("keep");
    allocate(&c, &cell, true).await;
    let pid = start(&c, Some(&cell), "svc", "echo hello; sleep 1000").await;
    let host = start(&c, None, &unique("h"), "sleep 1000").await;

    d.restart(libc::SIGTERM, None).await;
    assert!(
        !exited(pid) && !exited(host),
        "SIGTERM with keep leaves them"
    );
    let c = d.client().await;
    let (execs, _) = snapshot(&c).await;
    assert_eq!(execs[&format!("{cell}/svc")].state, "running");
    assert_eq!(
        read_first_lines(&c, pid, 1).await,
        vec!["hello".to_owned()],
        "output kept across the restart"
    );

    // The free policy: SIGTERM stops everything and leaves nothing behind.
    let holder_dirs = cgroup_dirs(&d, &cell);
    d.restart(
        libc::SIGTERM,
        Some(&["--on-exit", "free", "--stop-grace-secs", "2"]),
    )
    .await;
    let c = d.client().await;
    assert_eq!(snapshot(&c).await.0.len(), 2, "still re-adopted");
    common::signal(d.pid(), libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(30)).is_some());
    assert!(exited(pid) && exited(host));
    for dir in holder_dirs {
        assert!(!dir.exists(), "{} removed", dir.display());
    }
    assert_eq!(exec_dirs(&d), 0);
    let cells_left = std::fs::read_dir(d.dir.path().join("run/state/cells"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(cells_left, 0, "no cell records left");
}

async fn read_first_lines(c: &Client, pid: i32, n: usize) -> Vec<String> {
    let mut s = c
        .observe()
        .get_sub_process_stream(output_req(pid, LogChannelType::Stdout))
        .await
        .expect("subscribe")
        .into_inner();
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("output stalled")
            .expect("stream")
            .expect("ended early");
        out.push(m.item.expect("item").line);
    }
    out
}

fn our_processes(d: &Daemon) -> usize {
    // Processes whose command line mentions this test's state directory
    // (shims are started with it) or that live in our cgroup root.
    let marker = d.dir.path().display().to_string();
    std::fs::read_dir("/proc")
        .map(|r| {
            r.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.parse::<i32>().is_ok())
                })
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("cgroup"))
                        .is_ok_and(|c| c.contains(d.cgroup_root.trim_start_matches('/')))
                        || std::fs::read(e.path().join("cmdline"))
                            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker))
                })
                .count()
        })
        .unwrap_or(0)
}

fn mounts() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().count())
        .unwrap_or(0)
}

#[tokio::test]
async fn ten_kill9_restart_cycles_leak_nothing() {
    let mut d = Daemon::start_with(None, KEEP).await;
    let cell = unique("cycle");
    let c = d.client().await;
    allocate(&c, &cell, true).await;
    let steady = start(
        &c,
        Some(&cell),
        "steady",
        "while true; do echo x; sleep 0.05; done",
    )
    .await;
    let mounts_before = mounts();
    let mut fds = Vec::new();
    for round in 0..10 {
        let c = d.client().await;
        // A little load: one that exits, one that runs, one stopped.
        start(&c, Some(&cell), &format!("short{round}"), "echo done").await;
        start(&c, Some(&cell), &format!("long{round}"), "sleep 1000").await;
        start(
            &c,
            None,
            &format!("host{round}-{}", std::process::id()),
            "true",
        )
        .await;
        if round > 0 {
            stop(&c, Some(&cell), &format!("long{}", round - 1)).await;
            stop(
                &c,
                None,
                &format!("host{}-{}", round - 1, std::process::id()),
            )
            .await;
        }
        fds.push(common::observe::fd_count(d.pid()));
        d.restart(libc::SIGKILL, None).await;
    }
    let c = d.client().await;
    let (execs, cells) = snapshot(&c).await;
    assert_eq!(cells.len(), 1);
    // steady + 10 short + long9 + host9.
    assert_eq!(execs.len(), 13, "{:?}", execs.keys().collect::<Vec<_>>());
    assert_eq!(exec_dirs(&d), 13);
    assert!(!exited(steady));
    assert_eq!(mounts(), mounts_before, "no mount left behind");
    // Processes: holder, steady (+ its sleep) and long9 with their shims,
    // host9's shim at most; never one per cycle.
    let procs = our_processes(&d);
    assert!(procs <= 12, "{procs} processes of ours after 10 cycles");
    // The daemon's fds do not grow with restarts (each new daemon starts
    // from scratch; this checks re-adoption opens a bounded number).
    let now = common::observe::fd_count(d.pid());
    assert!(now <= fds[1] + 8, "fds {fds:?} → {now}");
    free(&c, &cell).await;
    for e in execs.keys().filter(|k| k.starts_with('/')) {
        stop(&c, None, e.trim_start_matches('/')).await;
    }
    assert_eq!(exec_dirs(&d), 0);
    assert!(exited(steady));
}

#[tokio::test]
async fn a_slow_reader_gets_every_line_and_never_slows_the_workload() {
    let d = Daemon::start_with(None, &["--output-cap", "64M"]).await;
    let c = d.client().await;
    let cell = unique("slow");
    allocate(&c, &cell, false).await;
    let t0 = Instant::now();
    let pid = start(&c, Some(&cell), "seq", "seq 1 1000000").await;
    let mut s = c
        .observe()
        .get_sub_process_stream(output_req(pid, LogChannelType::Stdout))
        .await
        .expect("subscribe")
        .into_inner();
    // The reader takes a line, then sleeps a second, three times; the
    // workload must finish meanwhile (nothing waits for the reader).
    let mut lines: Vec<String> = Vec::with_capacity(1_000_000);
    for _ in 0..3 {
        let m = s.message().await.expect("stream").expect("line");
        lines.push(m.item.expect("item").line);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(exited(pid), "seq finished while the reader slept");
    let took = t0.elapsed();
    while let Some(m) = tokio::time::timeout(Duration::from_secs(30), s.message())
        .await
        .expect("stalled")
        .expect("stream")
    {
        lines.push(m.item.expect("item").line);
    }
    assert_eq!(lines.len(), 1_000_000, "every line");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l, &(i + 1).to_string(), "line {i}");
    }
    eprintln!("seq 1000000 finished within {took:?} of a reader sleeping 1 s per line");
    free(&c, &cell).await;
}

#[tokio::test]
async fn finished_executables_keep_daemon_memory_flat() {
    let d = Daemon::start_with(None, &["--output-cap", "2M"]).await;
    let c = d.client().await;
    let cell = unique("mem");
    allocate(&c, &cell, false).await;
    // 1 MiB each: 1024 lines of 1023 characters and a newline.
    let cmd = "head -c 1047552 /dev/zero | tr '\\0' x | fold -w 1023; echo";
    let mut rss = Vec::new();
    let total = 1000;
    let mut pids = Vec::new();
    for i in 0..total {
        pids.push(start(&c, Some(&cell), &format!("e{i}"), cmd).await);
        if i == 99 || i == total - 1 {
            for p in &pids {
                wait_until("exit", Duration::from_secs(60), || exited(*p)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            rss.push(rss_kib(d.pid()));
        }
    }
    let (execs, _) = snapshot(&c).await;
    assert_eq!(execs.len(), total);
    assert!(execs
        .values()
        .all(|e| e.state == "exited" && e.exit_code == Some(0)));
    let stdout = read_output(&c, pids[500], LogChannelType::Stdout).await;
    assert_eq!(stdout.len(), 1024);
    assert!(stdout.iter().all(|l| l.len() == 1023));
    eprintln!(
        "daemon RSS after 100 finished executables of 1 MiB output: {} KiB; after {total}: {} KiB",
        rss[0], rss[1]
    );
    assert!(
        rss[1] < rss[0] + 16 * 1024,
        "RSS grew from {} to {} KiB",
        rss[0],
        rss[1]
    );
    // No shim lingers for an executable that exited with no stragglers.
    let shims = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("stat"))
                .is_ok_and(|s| s.split_whitespace().nth(3) == Some(&d.pid().to_string()))
        })
        .count();
    assert!(shims < 10, "{shims} children of the daemon still alive");
    free(&c, &cell).await;
}

#[tokio::test]
async fn a_cell_whose_holder_died_refuses_start_and_is_still_freed() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let cell = unique("dead");
    allocate(&c, &cell, true).await;
    let child = format!("{cell}/inner");
    allocate(&c, &child, false).await;
    let pid = start(&c, Some(&cell), "s", "sleep 1000").await;
    // The holder is the init of the executable's pid namespace.
    let holder = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "for p in /proc/[0-9]*; do if [ \"$(readlink $p/ns/pid)\" = \"$(readlink /proc/{pid}/ns/pid)\" ] && grep -q '^NSpid:.*\\s1$' $p/status; then basename $p; fi; done"
        ))
        .output()
        .expect("find holder");
    let holder: i32 = String::from_utf8_lossy(&holder.stdout)
        .trim()
        .parse()
        .expect("holder pid");
    kill(holder, libc::SIGKILL);
    wait_until("holder gone", Duration::from_secs(10), || exited(holder)).await;
    for name in [&cell, &child] {
        let e = c
            .cells()
            .start(CellServiceStartRequest {
                cell_name: Some(name.clone()),
                executable: Some(Executable {
                    name: "x".into(),
                    command: "true".into(),
                    description: String::new(),
                }),
                uid: None,
                gid: None,
            })
            .await
            .expect_err("start in a cell without its holder");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("holder"), "{}", e.message());
    }
    let (_, cells) = snapshot(&c).await;
    assert_eq!(cells[&cell], "holder-dead");
    assert_eq!(cells[&child], "holder-dead");
    free(&c, &cell).await;
    assert!(exited(pid));
    for dir in cgroup_dirs(&d, &cell) {
        assert!(!dir.exists());
    }
}

fn aer(d: &Daemon, args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::aer_bin())
        .arg("--config")
        .arg(d.client_config_path())
        .args(args)
        .output()
        .expect("run aer")
}

#[tokio::test]
async fn aer_cell_wait_exits_with_the_executables_code_across_a_restart() {
    let mut d = Daemon::start_with(None, KEEP).await;
    let c = d.client().await;
    let cell = unique("wait");
    allocate(&c, &cell, false).await;
    start(&c, Some(&cell), "seven", "sleep 1; exit 7").await;
    let killed = start(&c, Some(&cell), "killed", "sleep 1000").await;
    start(&c, None, &format!("{cell}-h"), "exit 3").await;

    // The daemon restarts while aer waits: aer rides it out.
    let cfg = d.client_config_path();
    let waiter = std::thread::spawn({
        let cell = cell.clone();
        move || {
            std::process::Command::new(common::aer_bin())
                .arg("--config")
                .arg(cfg)
                .args(["cell", "wait", &cell, "seven", "--timeout", "60"])
                .output()
                .expect("aer")
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.restart(libc::SIGKILL, None).await;
    let out = tokio::task::spawn_blocking(move || waiter.join().expect("join"))
        .await
        .expect("join");
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "exited 7");

    kill(killed, libc::SIGKILL);
    let out = aer(&d, &["cell", "wait", &cell, "killed", "--timeout", "10"]);
    assert_eq!(out.status.code(), Some(128 + 9), "{out:?}");
    let out = aer(
        &d,
        &["cell", "wait", &format!("{cell}-h"), "--timeout", "10"],
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = aer(&d, &["cell", "wait", &cell, "nope", "--timeout", "10"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let running = start(&c_after(&d).await, Some(&cell), "runs", "sleep 1000").await;
    let out = aer(&d, &["cell", "wait", &cell, "runs", "--timeout", "0.3"]);
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(!exited(running));

    let out = aer(&d, &["cell", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("seven") && text.contains("exited 7"),
        "{text}"
    );
    assert!(
        text.contains(&format!("pid {running}")) && text.contains("running"),
        "{text}"
    );
    assert!(text.contains("(host)"), "{text}");
    let out = aer(&d, &["--json", "cell", "list"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let execs = v
        .as_array()
        .and_then(|cells| cells.iter().find(|c| c["name"] == cell.as_str()))
        .map(|c| c["executables"].clone())
        .expect("cell in JSON");
    assert!(
        execs.as_array().is_some_and(|e| e
            .iter()
            .any(|x| x["name"] == "seven" && x["exit_code"] == 7)),
        "{execs}"
    );
    let c = d.client().await;
    free(&c, &cell).await;
    stop(&c, None, &format!("{cell}-h")).await;
}

async fn c_after(d: &Daemon) -> Client {
    d.client().await
}

fn ppid(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = stat.rsplit_once(") ").expect("stat format").1;
    rest.split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("ppid")
}

fn proc_file(pid: i32, file: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/{file}: {e}"))
}

fn ns(pid: i32, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).expect("ns link")
}

/// The start path (README "Why we are fast"): in an isolated cell the
/// holder forks the shim, so the shim and the executable are born in the
/// cell's cgroups and pid namespace (no migration); in a plain cell the
/// daemon's shim stays in the daemon's cgroups and only the executable
/// joins the cell. Either way the shim records the exit while no daemon
/// runs, and a new daemon re-adopts both.
#[tokio::test]
async fn shims_live_where_the_start_path_puts_them_and_record_exits_without_a_daemon() {
    let mut d = Daemon::start_with(None, KEEP).await;
    let c = d.client().await;
    let iso = unique("fast");
    let plain = unique("slow");
    allocate(&c, &iso, true).await;
    allocate(&c, &plain, false).await;
    let daemon = d.pid();

    let sleeper = start(&c, Some(&iso), "sleeper", "sleep 1000").await;
    let quitter = start(&c, Some(&iso), "quitter", "sleep 1; exit 9").await;
    let plain_sleeper = start(&c, Some(&plain), "sleeper", "sleep 1000").await;

    // Isolated: the shim is the executable's parent, forked by the holder
    // (pid 1 of the cell), in the same cgroups and pid namespace.
    let shim = ppid(sleeper);
    let holder = ppid(shim);
    assert_ne!(holder, daemon, "the holder forks the shim, not the daemon");
    assert_eq!(proc_file(shim, "comm").trim(), "aurae-shim");
    assert_eq!(
        proc_file(shim, "cmdline").trim_end_matches('\0'),
        "aurae-shim"
    );
    assert_eq!(proc_file(shim, "cgroup"), proc_file(sleeper, "cgroup"));
    assert!(
        proc_file(sleeper, "cgroup").contains(&iso),
        "{}",
        proc_file(sleeper, "cgroup")
    );
    assert_eq!(ns(shim, "pid"), ns(sleeper, "pid"));
    assert_eq!(ns(shim, "net"), ns(sleeper, "net"));
    assert_ne!(ns(shim, "pid"), ns(daemon, "pid"));
    assert!(
        proc_file(holder, "status")
            .lines()
            .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1")),
        "the holder is pid 1 of the cell"
    );
    // The cell's OOM killer never takes the shim (and with it the exit
    // status); the executable keeps the usual score.
    // (Lowering the score needs CAP_SYS_RESOURCE, bit 24, which some
    // hosts lack.)
    let caps = proc_file(std::process::id() as i32, "status")
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    if caps & (1 << 24) != 0 {
        assert_eq!(proc_file(shim, "oom_score_adj").trim(), "-1000");
    } else {
        eprintln!("no CAP_SYS_RESOURCE: the shim's OOM protection is not checked");
    }
    assert_ne!(proc_file(sleeper, "oom_score_adj").trim(), "-1000");
    // Workloads get the open-file limit the daemon was given, not its own.
    let limit = |pid: i32| {
        proc_file(pid, "limits")
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .map(str::to_owned)
            .expect("limits")
    };
    let my_limit = limit(std::process::id() as i32);
    assert_eq!(limit(sleeper), my_limit);

    let plain_shim = ppid(plain_sleeper);
    if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").is_file() {
        // Plain on pure v2: the shim is the daemon's child and in the
        // daemon's cgroups (it clones the executable into the cell).
        assert_eq!(ppid(plain_shim), daemon);
        assert_eq!(proc_file(plain_shim, "cgroup"), proc_file(daemon, "cgroup"));
        assert_ne!(
            proc_file(plain_shim, "cgroup"),
            proc_file(plain_sleeper, "cgroup")
        );
    } else {
        // Plain on v1 hierarchies: the cell's spawner (a holder without
        // namespaces of its own, the daemon's child) forks the shim in the
        // cell's cgroups, in the daemon's pid and net namespaces.
        let spawner = ppid(plain_shim);
        assert_ne!(spawner, daemon, "the cell's spawner forks the shim");
        assert_eq!(ppid(spawner), daemon);
        assert_eq!(
            proc_file(plain_shim, "cgroup"),
            proc_file(plain_sleeper, "cgroup")
        );
        assert_eq!(ns(plain_shim, "pid"), ns(daemon, "pid"));
        assert_eq!(ns(plain_sleeper, "net"), ns(daemon, "net"));
    }
    assert!(proc_file(plain_sleeper, "cgroup").contains(&plain));

    // No daemon while `quitter` exits 9: its shim in the cell records it.
    d.stop_with(libc::SIGKILL);
    wait_until("quitter to exit", Duration::from_secs(10), || {
        exited(quitter)
    })
    .await;
    assert!(!exited(sleeper) && !exited(shim) && !exited(plain_sleeper));
    d.respawn(None).await;
    let c = d.client().await;
    let mut execs = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        execs = snapshot(&c).await.0;
        if execs
            .get(&format!("{iso}/quitter"))
            .is_some_and(|e| e.state == "exited")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let q = &execs[&format!("{iso}/quitter")];
    assert_eq!(
        (q.state.as_str(), q.exit_code),
        ("exited", Some(9)),
        "{q:?}"
    );
    let s = &execs[&format!("{iso}/sleeper")];
    assert_eq!((s.state.as_str(), s.pid), ("running", sleeper), "{s:?}");
    // The re-adopted holder still serves: a new Start lands in the cell.
    let again = start(&c, Some(&iso), "again", "sleep 1000").await;
    assert_eq!(ppid(ppid(again)), holder);
    assert_eq!(ns(again, "pid"), ns(sleeper, "pid"));

    stop(&c, Some(&iso), "sleeper").await;
    assert!(exited(sleeper));
    wait_until("its shim to exit", Duration::from_secs(10), || exited(shim)).await;
    free(&c, &iso).await;
    free(&c, &plain).await;
    for pid in [again, holder, plain_sleeper, plain_shim] {
        assert!(exited(pid), "pid {pid} left behind");
    }
    for dir in cgroup_dirs(&d, &iso) {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    let socks = std::fs::read_dir(d.dir.path().join("run/state/holders"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(socks, 0, "holder sockets left behind");
}
