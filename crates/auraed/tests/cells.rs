//! Cells end to end: real cgroups, real namespaces, real processes, checked
//! from the host (cgroup files, /proc) and from inside the cell (what an
//! executable sees, written to a file in a temp dir we can read).

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aurae_client::{
    proto::cells::{
        Cell, CellServiceAllocateRequest, CellServiceFreeRequest, CellServiceListRequest,
        CellServiceStartRequest, CellServiceStopRequest, CpuController, CpusetController,
        Executable, MemoryController,
    },
    Client,
};
use common::{unique, Daemon};
use tonic::Code;

fn cell(name: &str) -> Cell {
    Cell {
        name: name.into(),
        ..Default::default()
    }
}

fn isolated(name: &str) -> Cell {
    Cell {
        name: name.into(),
        isolate_process: true,
        isolate_network: true,
        ..Default::default()
    }
}

async fn allocate(c: &Client, cell: Cell) -> Result<bool, tonic::Status> {
    c.cells()
        .allocate(CellServiceAllocateRequest { cell: Some(cell) })
        .await
        .map(|r| r.into_inner().cgroup_v2)
}

async fn free(c: &Client, name: &str) -> Result<(), tonic::Status> {
    c.cells()
        .free(CellServiceFreeRequest {
            cell_name: name.into(),
        })
        .await
        .map(|_| ())
}

async fn start(
    c: &Client,
    cell: Option<&str>,
    name: &str,
    command: &str,
) -> Result<i32, tonic::Status> {
    c.cells()
        .start(CellServiceStartRequest {
            cell_name: cell.map(str::to_owned),
            executable: Some(Executable {
                name: name.into(),
                command: command.into(),
                description: String::new(),
            }),
            uid: None,
            gid: None,
        })
        .await
        .map(|r| r.into_inner().pid)
}

async fn stop(c: &Client, cell: Option<&str>, name: &str) -> Result<(), tonic::Status> {
    c.cells()
        .stop(CellServiceStopRequest {
            cell_name: cell.map(str::to_owned),
            executable_name: name.into(),
        })
        .await
        .map(|_| ())
}

/// The cell's directory in every hierarchy this host has (v1 controllers
/// and the unified mirror).
fn cgroup_dirs(d: &Daemon, cell: &str) -> Vec<PathBuf> {
    ["cpu", "cpuset", "memory", "pids", "unified"]
        .iter()
        .map(|h| {
            Path::new("/sys/fs/cgroup")
                .join(h)
                .join(d.cgroup_root.trim_start_matches('/'))
                .join(cell)
        })
        .collect()
}

fn v1_file(d: &Daemon, controller: &str, cell: &str, file: &str) -> String {
    let p = Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(d.cgroup_root.trim_start_matches('/'))
        .join(cell)
        .join(file);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_owned()
}

fn is_hybrid() -> bool {
    Path::new("/sys/fs/cgroup/memory").is_dir()
}

fn alive(pid: i32) -> bool {
    // A zombie is as good as gone (its parent, the daemon, reaps it).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `script` in the cell with its output going to a file; returns the
/// file's content once the script finished (a second file marks the end:
/// a marker inside the output could be matched early, e.g. by `ps` showing
/// this very command line).
async fn run_capture(
    c: &Client,
    dir: &Path,
    cell: Option<&str>,
    name: &str,
    script: &str,
) -> String {
    let out = dir.join(format!("{name}.out"));
    let done = dir.join(format!("{name}.done"));
    let cmd = format!(
        "( {script} ) > {} 2>&1; echo $? > {}",
        out.display(),
        done.display()
    );
    start(c, cell, name, &cmd).await.unwrap();
    wait_for(
        &format!("{name} to finish"),
        Duration::from_secs(20),
        || std::fs::read_to_string(&done).is_ok_and(|s| s.ends_with('\n')),
    )
    .await;
    std::fs::read_to_string(&out).unwrap_or_default()
}

/// Processes that are children of `pid`.
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
                .flat_map(|s| {
                    s.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect::<Vec<i32>>()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn allocate_list_free_a_tree_and_two_roots() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let (a, b) = (unique("a"), unique("b"));
    for name in [
        a.clone(),
        format!("{a}/x"),
        format!("{a}/x/y"),
        format!("{a}/w"),
        b.clone(),
    ] {
        assert!(
            !allocate(&c, cell(&name)).await.unwrap(),
            "this host is hybrid: cgroup_v2 must be false"
        );
    }
    let list = c
        .cells()
        .list(CellServiceListRequest {})
        .await
        .unwrap()
        .into_inner()
        .cells;
    let names: Vec<String> = list.iter().map(|n| n.cell.clone().unwrap().name).collect();
    assert_eq!(names, [a.clone(), b.clone()]);
    let kids: Vec<String> = list[0]
        .children
        .iter()
        .map(|n| n.cell.clone().unwrap().name)
        .collect();
    assert_eq!(
        kids,
        [format!("{a}/w"), format!("{a}/x")],
        "children sorted by name, full paths"
    );
    assert_eq!(
        list[0].children[1].children[0].cell.clone().unwrap().name,
        format!("{a}/x/y")
    );

    assert_eq!(
        allocate(&c, cell(&a)).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_eq!(
        allocate(&c, cell(&format!("{b}/missing/child")))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        free(&c, &unique("nope")).await.unwrap_err().code(),
        Code::NotFound
    );

    for dir in cgroup_dirs(&d, &format!("{a}/x/y")) {
        assert!(dir.is_dir(), "{} missing", dir.display());
    }
    free(&c, &a).await.unwrap();
    free(&c, &b).await.unwrap();
    for dir in cgroup_dirs(&d, &a).into_iter().chain(cgroup_dirs(&d, &b)) {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    assert!(c
        .cells()
        .list(CellServiceListRequest {})
        .await
        .unwrap()
        .into_inner()
        .cells
        .is_empty());
}

#[tokio::test]
async fn every_validation_rule_is_invalid_argument_naming_the_field() {
    let d = Daemon::start().await;
    let c = d.client().await;
    for bad in [
        "a_b",
        "-a",
        "a-",
        "a/../b",
        "a//b",
        "",
        &"x".repeat(64),
        "a b",
        "a/",
    ] {
        let e = allocate(&c, cell(bad)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
        assert!(e.message().contains("cell.name"), "{}", e.message());
    }
    let with = |f: &dyn Fn(&mut Cell)| {
        let mut x = cell(&unique("v"));
        f(&mut x);
        x
    };
    let cases: Vec<(Cell, &str)> = vec![
        (
            with(&|x| {
                x.cpu = Some(CpuController {
                    weight: Some(0),
                    ..Default::default()
                })
            }),
            "cell.cpu.weight",
        ),
        (
            with(&|x| {
                x.cpu = Some(CpuController {
                    weight: Some(10_001),
                    ..Default::default()
                })
            }),
            "cell.cpu.weight",
        ),
        (
            with(&|x| {
                x.cpu = Some(CpuController {
                    max: Some(-1),
                    ..Default::default()
                })
            }),
            "cell.cpu.max",
        ),
        (
            with(&|x| {
                x.cpu = Some(CpuController {
                    weight: None,
                    max: Some(50_000),
                    period: Some(10),
                })
            }),
            "cell.cpu.period",
        ),
        (
            with(&|x| {
                x.cpuset = Some(CpusetController {
                    cpus: Some("1..3".into()),
                    mems: None,
                })
            }),
            "cell.cpuset.cpus",
        ),
        (
            with(&|x| {
                x.cpuset = Some(CpusetController {
                    cpus: None,
                    mems: Some("x".into()),
                })
            }),
            "cell.cpuset.mems",
        ),
        (
            with(&|x| {
                x.memory = Some(MemoryController {
                    max: Some(-1),
                    ..Default::default()
                })
            }),
            "cell.memory.max",
        ),
        (
            with(&|x| {
                x.memory = Some(MemoryController {
                    low: Some(10),
                    max: Some(5),
                    ..Default::default()
                })
            }),
            "cell.memory.low",
        ),
    ];
    for (x, field) in cases {
        let e = allocate(&c, x).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    // Nothing was created for any of them.
    assert!(c
        .cells()
        .list(CellServiceListRequest {})
        .await
        .unwrap()
        .into_inner()
        .cells
        .is_empty());
    // Executable names and commands.
    assert_eq!(
        start(&c, None, "", "true").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        start(&c, None, &"n".repeat(256), "true")
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        start(&c, None, "ok", "  ").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        start(&c, Some("bad_cell"), "ok", "true")
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        start(&c, Some(&unique("nope")), "ok", "true")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn limits_land_in_the_cgroup_files() {
    if !is_hybrid() {
        eprintln!("SKIPPED: this test reads cgroup v1 files; this host is not v1/hybrid");
        return;
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let name = unique("lim");
    let mut x = cell(&name);
    x.cpu = Some(CpuController {
        weight: Some(100),
        max: Some(50_000),
        period: Some(200_000),
    });
    x.cpuset = Some(CpusetController {
        cpus: Some("0".into()),
        mems: Some("0".into()),
    });
    x.memory = Some(MemoryController {
        low: Some(16 << 20),
        max: Some(64 << 20),
        ..Default::default()
    });
    allocate(&c, x).await.unwrap();
    assert_eq!(
        v1_file(&d, "cpu", &name, "cpu.shares"),
        "2597",
        "weight 100 → shares by 2 + (w-1)*262142/9999"
    );
    assert_eq!(v1_file(&d, "cpu", &name, "cpu.cfs_quota_us"), "50000");
    assert_eq!(v1_file(&d, "cpu", &name, "cpu.cfs_period_us"), "200000");
    assert_eq!(v1_file(&d, "cpuset", &name, "cpuset.cpus"), "0");
    assert_eq!(v1_file(&d, "cpuset", &name, "cpuset.mems"), "0");
    assert_eq!(
        v1_file(&d, "memory", &name, "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    assert_eq!(
        v1_file(&d, "memory", &name, "memory.soft_limit_in_bytes"),
        (16u64 << 20).to_string()
    );

    // A process started in the cell is in its cgroups before it runs a line.
    let pid = start(&c, Some(&name), "sleeper", "exec sleep 60")
        .await
        .unwrap();
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for ctl in [":memory:", ":cpu", ":cpuset:", "0::"] {
        let line = cg
            .lines()
            .find(|l| l.contains(ctl))
            .unwrap_or_else(|| panic!("{ctl} missing in {cg}"));
        assert!(line.contains(&name), "{line}");
    }
    free(&c, &name).await.unwrap();
    assert!(!alive(pid));

    // Limits v1 cannot apply are refused, naming the field.
    for (m, field) in [
        (
            MemoryController {
                min: Some(1 << 20),
                ..Default::default()
            },
            "cell.memory.min",
        ),
        (
            MemoryController {
                high: Some(1 << 20),
                ..Default::default()
            },
            "cell.memory.high",
        ),
    ] {
        let mut x = cell(&unique("unsup"));
        x.memory = Some(m);
        let e = allocate(&c, x).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains(field), "{}", e.message());
    }
}

#[tokio::test]
async fn a_process_over_its_memory_limit_is_oom_killed() {
    if !is_hybrid() {
        eprintln!("SKIPPED: reads v1 memory.oom_control");
        return;
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let name = unique("oom");
    let mut x = cell(&name);
    x.memory = Some(MemoryController {
        max: Some(32 << 20),
        ..Default::default()
    });
    allocate(&c, x).await.unwrap();
    // The shell keeps 200 MB in a variable: far over 32 MiB.
    let pid = start(
        &c,
        Some(&name),
        "hog",
        r#"x=$(head -c 200000000 /dev/zero | tr '\0' a); echo survived"#,
    )
    .await
    .unwrap();
    wait_for("the hog to die", Duration::from_secs(30), || !alive(pid)).await;
    let oom = v1_file(&d, "memory", &name, "memory.oom_control");
    let kills: u64 = oom
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(kills >= 1, "no OOM kill recorded: {oom}");
    free(&c, &name).await.unwrap();
}

#[tokio::test]
async fn a_cpu_max_cell_is_throttled() {
    if !is_hybrid() {
        eprintln!("SKIPPED: reads v1 cpu.stat");
        return;
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let name = unique("cpu");
    let mut x = cell(&name);
    x.cpu = Some(CpuController {
        max: Some(10_000),
        period: Some(100_000),
        ..Default::default()
    });
    allocate(&c, x).await.unwrap();
    start(&c, Some(&name), "spin", "while :; do :; done")
        .await
        .unwrap();
    let throttled = || {
        v1_file(&d, "cpu", &name, "cpu.stat")
            .lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    wait_for("throttling", Duration::from_secs(10), || throttled() >= 3).await;
    free(&c, &name).await.unwrap();
}

#[tokio::test]
async fn isolation_is_real_from_inside() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let dir = tempfile::tempdir().unwrap();
    let name = unique("iso");
    allocate(&c, isolated(&name)).await.unwrap();
    let pid = start(&c, Some(&name), "first", "exec sleep 12345")
        .await
        .unwrap();
    let out = run_capture(
        &c,
        dir.path(),
        Some(&name),
        "look",
        "for n in pid ipc uts mnt net cgroup; do echo ns $n $(readlink /proc/self/ns/$n); done; echo host $(hostname); ps -eo pid,args; ip -o link",
    )
    .await;
    for ns in ["pid", "ipc", "uts", "mnt", "net", "cgroup"] {
        let host = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("ns {ns} ")))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(
            !line.ends_with(host.to_str().unwrap()),
            "{ns} namespace is the host's: {line}"
        );
    }
    assert!(
        out.contains(&format!("host {name}")),
        "hostname must be the cell's name:\n{out}"
    );
    let procs: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert!(
        procs.iter().any(|l| l.contains("sleep 12345")),
        "the first executable must be visible:\n{out}"
    );
    // The holder (pid 1), the two executables' shims (forked by the
    // holder inside the cell), `sleep`, and `sh`, its subshell and `ps`;
    // plus the `1: lo` line of `ip -o link`.
    assert!(
        procs.len() <= 8,
        "only the cell's processes may be visible:\n{out}"
    );
    let holders = procs.iter().filter(|l| l.contains("aurae-holder")).count();
    let shims = procs.iter().filter(|l| l.ends_with(" aurae-shim")).count();
    assert_eq!((holders, shims), (1, 2), "the holder and two shims:\n{out}");
    assert!(
        procs.iter().any(|l| l.trim_start().starts_with("1 ")),
        "the cell has its own pid 1:\n{out}"
    );
    let links: Vec<&str> = out.lines().filter(|l| l.contains(": <")).collect();
    assert_eq!(links.len(), 1, "only lo:\n{out}");
    assert!(
        links[0].contains("lo:") && links[0].contains("UP"),
        "lo must be up:\n{out}"
    );
    // The host sees the executable under its host pid, in the host's view.
    assert!(alive(pid));
    // The host's mount table did not change (no /proc of the cell here).
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!host_mounts.contains(&name));
    // On pure cgroup v2 the holder was forked into the cell's leaf
    // (clone3), not migrated. (On a hybrid host the v1 controllers need
    // their migrations anyway: there it is vforked, see host::spawn.)
    if Path::new("/sys/fs/cgroup/cgroup.controllers").is_file() {
        let log = d.log();
        assert!(
            log.contains("holders are forked into their cgroup with clone3(CLONE_INTO_CGROUP)"),
            "{log}"
        );
    }
    free(&c, &name).await.unwrap();
    assert!(!alive(pid));
}

#[tokio::test]
async fn a_non_isolated_cell_shares_the_host_namespaces_but_not_cgroup_ns() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let dir = tempfile::tempdir().unwrap();
    let name = unique("plain");
    allocate(&c, cell(&name)).await.unwrap();
    let out = run_capture(
        &c,
        dir.path(),
        Some(&name),
        "look",
        "readlink /proc/self/ns/pid /proc/self/ns/net /proc/self/ns/cgroup; cat /proc/self/cgroup",
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        std::fs::read_link("/proc/self/ns/pid")
            .unwrap()
            .to_str()
            .unwrap()
    );
    assert_eq!(
        lines[1],
        std::fs::read_link("/proc/self/ns/net")
            .unwrap()
            .to_str()
            .unwrap()
    );
    assert_ne!(
        lines[2],
        std::fs::read_link("/proc/self/ns/cgroup")
            .unwrap()
            .to_str()
            .unwrap(),
        "own cgroup namespace"
    );
    // Inside its cgroup namespace the cell is the root.
    assert!(
        out.lines()
            .filter(|l| l.contains("memory:"))
            .all(|l| l.ends_with(":/")),
        "{out}"
    );
    // The cgroup2 mirror too (its `_exec` leaf): the cell's spawner (a
    // holder without namespaces of its own) joined it, and the executable,
    // forked below it, was born there.
    if Path::new("/sys/fs/cgroup/unified/cgroup.controllers").is_file() {
        assert!(out.lines().any(|l| l == "0::/"), "{out}");
        // Forked by the spawner: the shim's parent is not the daemon.
        let exe = run_capture(
            &c,
            dir.path(),
            Some(&name),
            "parent",
            "ps -o pid=,ppid=,args= -p $PPID",
        )
        .await;
        let ppid: i32 = exe
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        assert_ne!(ppid, d.pid(), "the daemon forked the shim: {exe}");
        assert!(exe.contains("aurae-shim"), "{exe}");
    }
    free(&c, &name).await.unwrap();
}

#[tokio::test]
async fn nested_cells_inherit_namespaces_and_uid_gid_apply() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let parent = unique("par");
    let child = format!("{parent}/kid");
    allocate(&c, isolated(&parent)).await.unwrap();
    allocate(&c, cell(&child)).await.unwrap();
    start(&c, Some(&parent), "p", "exec sleep 4242")
        .await
        .unwrap();
    let out = run_capture(&c, dir.path(), Some(&child), "k", "hostname; ps -eo args").await;
    assert!(
        out.starts_with(&parent),
        "the child cell shares the parent's uts namespace:\n{out}"
    );
    assert!(out.contains("sleep 4242"), "…and its pid namespace:\n{out}");

    let r = c
        .cells()
        .start(CellServiceStartRequest {
            cell_name: Some(child.clone()),
            executable: Some(Executable {
                name: "ids".into(),
                command: format!("id -u > {0}/ids; id -g >> {0}/ids", dir.path().display()),
                description: String::new(),
            }),
            uid: Some(65534),
            gid: Some(65534),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.uid, r.gid), (65534, 65534));
    let ids = dir.path().join("ids");
    wait_for("ids", Duration::from_secs(10), || {
        std::fs::read_to_string(&ids).is_ok_and(|s| s.lines().count() == 2)
    })
    .await;
    assert_eq!(std::fs::read_to_string(&ids).unwrap(), "65534\n65534\n");
    free(&c, &parent).await.unwrap();
}

#[tokio::test]
async fn executable_names_are_unique_and_stop_releases_them() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let name = unique("names");
    allocate(&c, cell(&name)).await.unwrap();
    let pid = start(&c, Some(&name), "job", "exec sleep 60")
        .await
        .unwrap();
    assert_eq!(
        start(&c, Some(&name), "job", "true")
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    stop(&c, Some(&name), "job").await.unwrap();
    assert!(!alive(pid));
    assert_eq!(
        stop(&c, Some(&name), "job").await.unwrap_err().code(),
        Code::NotFound
    );
    // An executable that already exited stops fine and frees its name.
    let pid = start(&c, Some(&name), "job", "true").await.unwrap();
    wait_for("true to exit", Duration::from_secs(10), || !alive(pid)).await;
    stop(&c, Some(&name), "job").await.unwrap();
    start(&c, Some(&name), "job", "true").await.unwrap();
    // Host context (no cell).
    let host_name = unique("host-job");
    let pid = start(&c, None, &host_name, "exec sleep 60").await.unwrap();
    assert!(alive(pid));
    stop(&c, None, &host_name).await.unwrap();
    assert!(!alive(pid));
    free(&c, &name).await.unwrap();
}

#[tokio::test]
async fn stop_kills_a_sigterm_ignoring_process_after_the_grace_period() {
    let d = Daemon::start_with(None, &["--stop-grace-secs", "1"]).await;
    let c = d.client().await;
    let name = unique("stubborn");
    allocate(&c, cell(&name)).await.unwrap();
    let pid = start(
        &c,
        Some(&name),
        "ignore",
        "trap '' TERM; while :; do sleep 0.1; done",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    stop(&c, Some(&name), "ignore").await.unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "stopped too early ({took:?}): SIGTERM was ignored"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(!alive(pid));
    free(&c, &name).await.unwrap();
}

#[tokio::test]
async fn free_with_running_executables_and_children_leaves_nothing() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let root = unique("busy");
    allocate(&c, isolated(&root)).await.unwrap();
    allocate(&c, cell(&format!("{root}/a"))).await.unwrap();
    allocate(&c, isolated_net_only(&format!("{root}/b")))
        .await
        .unwrap();
    let mut pids = vec![];
    for (cell, n) in [
        (root.clone(), "r"),
        (format!("{root}/a"), "a"),
        (format!("{root}/b"), "b"),
    ] {
        // Each also forks a background child that is not in the process group.
        pids.push(
            start(&c, Some(&cell), n, "setsid sleep 300 & exec sleep 300")
                .await
                .unwrap(),
        );
    }
    assert!(!children(d.pid()).is_empty());
    free(&c, &root).await.unwrap();
    for pid in pids {
        assert!(!alive(pid), "pid {pid} survived Free");
    }
    for dir in cgroup_dirs(&d, &root) {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    wait_for(
        "the daemon's children to be reaped",
        Duration::from_secs(5),
        || children(d.pid()).is_empty(),
    )
    .await;
}

fn isolated_net_only(name: &str) -> Cell {
    Cell {
        name: name.into(),
        isolate_network: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn daemon_sigterm_leaves_nothing_behind() {
    let mut d = Daemon::start().await;
    let c = d.client().await;
    let (a, b) = (unique("shut"), unique("shut"));
    allocate(&c, isolated(&a)).await.unwrap();
    allocate(&c, cell(&b)).await.unwrap();
    allocate(&c, cell(&format!("{b}/inner"))).await.unwrap();
    let pids = vec![
        start(&c, Some(&a), "x", "exec sleep 300").await.unwrap(),
        start(&c, Some(&format!("{b}/inner")), "y", "exec sleep 300")
            .await
            .unwrap(),
        start(&c, None, &unique("hostjob"), "exec sleep 300")
            .await
            .unwrap(),
    ];
    drop(c);
    let status = d.terminate();
    assert!(status.success(), "{status:?}\n{}", d.log());
    for pid in pids {
        assert!(!alive(pid), "pid {pid} survived the daemon");
    }
    for h in ["cpu", "cpuset", "memory", "pids", "unified"] {
        let root = Path::new("/sys/fs/cgroup")
            .join(h)
            .join(d.cgroup_root.trim_start_matches('/'));
        assert!(!root.exists(), "{} left behind", root.display());
    }
}

#[tokio::test]
async fn fifty_cells_allocated_and_freed_concurrently() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let base = unique("many");
    let names: Vec<String> = (0..50).map(|i| format!("{base}-{i}")).collect();
    let mut set = tokio::task::JoinSet::new();
    for (i, n) in names.iter().enumerate() {
        let (c, n) = (c.clone(), n.clone());
        set.spawn(async move {
            let x = if i % 5 == 0 { isolated(&n) } else { cell(&n) };
            allocate(&c, x).await.map(|_| ())?;
            start(&c, Some(&n), "s", "exec sleep 60").await.map(|_| ())
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    let list = c
        .cells()
        .list(CellServiceListRequest {})
        .await
        .unwrap()
        .into_inner()
        .cells;
    assert_eq!(list.len(), 50);
    for n in &names {
        let (c, n) = (c.clone(), n.clone());
        set.spawn(async move { free(&c, &n).await });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    assert!(c
        .cells()
        .list(CellServiceListRequest {})
        .await
        .unwrap()
        .into_inner()
        .cells
        .is_empty());
    for n in &names {
        for dir in cgroup_dirs(&d, n) {
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
    }
}

#[tokio::test]
async fn a_nested_cell_can_isolate_again() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let dir = tempfile::tempdir().unwrap();
    let parent = unique("outer");
    let inner = format!("{parent}/inner");
    allocate(&c, isolated(&parent)).await.unwrap();
    allocate(
        &c,
        Cell {
            name: inner.clone(),
            isolate_process: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let outer_pid = start(&c, Some(&parent), "o", "exec sleep 1111")
        .await
        .unwrap();
    let inner_pid = start(&c, Some(&inner), "i", "exec sleep 2222")
        .await
        .unwrap();
    let seen_inside = run_capture(
        &c,
        dir.path(),
        Some(&inner),
        "look-in",
        "hostname; readlink /proc/self/ns/pid; ps -eo args",
    )
    .await;
    let seen_outside = run_capture(
        &c,
        dir.path(),
        Some(&parent),
        "look-out",
        "hostname; readlink /proc/self/ns/pid; ps -eo args",
    )
    .await;
    let (in_lines, out_lines): (Vec<&str>, Vec<&str>) = (
        seen_inside.lines().collect(),
        seen_outside.lines().collect(),
    );
    assert_eq!(in_lines[0], "inner", "{seen_inside}");
    assert_eq!(out_lines[0], parent, "{seen_outside}");
    assert_ne!(
        in_lines[1], out_lines[1],
        "the inner cell has its own pid namespace"
    );
    assert!(
        seen_inside.contains("sleep 2222") && !seen_inside.contains("sleep 1111"),
        "{seen_inside}"
    );
    // The outer pid namespace is an ancestor: it sees the inner processes.
    assert!(
        seen_outside.contains("sleep 2222") && seen_outside.contains("sleep 1111"),
        "{seen_outside}"
    );
    free(&c, &parent).await.unwrap();
    assert!(!alive(outer_pid) && !alive(inner_pid));
    for dir in cgroup_dirs(&d, &parent) {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    wait_for(
        "the daemon's children to be reaped",
        Duration::from_secs(5),
        || children(d.pid()).is_empty(),
    )
    .await;
}

#[tokio::test]
async fn a_new_daemon_without_their_records_reclaims_cells_left_by_one_that_was_killed() {
    // The second daemon has other state directories (so no record of the
    // first one's cells) but the same cgroup root: cgroups no record claims
    // are killed and removed. (With the same directories they would be
    // re-adopted: tests/durable.rs.)
    let mut first = Daemon::start().await;
    let c = first.client().await;
    let name = unique("orphaned");
    allocate(&c, isolated(&name)).await.unwrap();
    allocate(&c, cell(&format!("{name}/inner"))).await.unwrap();
    let pids = [
        start(&c, Some(&name), "a", "exec sleep 300").await.unwrap(),
        start(&c, Some(&format!("{name}/inner")), "b", "exec sleep 300")
            .await
            .unwrap(),
    ];
    // No chance to clean up.
    common::signal(first.pid(), libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).expect("killed");
    assert!(
        pids.iter().all(|&p| alive(p)),
        "the workloads outlive a killed daemon"
    );
    assert!(cgroup_dirs(&first, &name).iter().all(|d| d.is_dir()));

    let second = Daemon::start_in_cgroup_root(&first.cgroup_root).await;
    for pid in pids {
        wait_for(
            "the leftover workload to be killed",
            Duration::from_secs(10),
            || !alive(pid),
        )
        .await;
    }
    for dir in cgroup_dirs(&second, &name) {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    assert!(
        second.log().contains("no record claims"),
        "{}",
        second.log()
    );
    // The name is usable again.
    let c2 = second.client().await;
    allocate(&c2, isolated(&name)).await.unwrap();
    free(&c2, &name).await.unwrap();
}
