//! Authorization end to end: a real daemon with `--authz-policy`, client
//! certificates minted by `auraed pki issue-client` (roles granted in the
//! policy file, applied with SIGHUP), and what each identity may do.
//! Cells and signals need root (and BPF for the signal parts, which say so
//! loudly and are skipped without it).

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use aurae_client::{
    proto::{
        cells::{
            CellGraphNode, CellServiceFreeRequest, CellServiceListRequest, CellServiceListResponse,
            CellServiceStartRequest, CellServiceStopRequest, Executable,
        },
        discovery::DiscoverRequest,
        observe::{
            GetAuraeDaemonLogStreamRequest, GetPosixSignalsStreamRequest,
            GetPosixSignalsStreamResponse, LogChannelType, Workload, WorkloadType,
        },
        vms::VmServiceListRequest,
    },
    Client, ClientConfig,
};
use common::{auraed_bin, observe::*, Daemon};
use tonic::{Code, Status, Streaming};

const POLICY: &str = r#"# Test policy: the harness's own client is the admin.
[identities]
aurae-client = ["admin"]

[[roles.admin.rules]]
methods = ["*"]
cells = ["**"]
host = true

[[roles.observer.rules]]
name = "observers read everything"
methods = ["aurae.cells.v0.CellService/List", "aurae.observe.v0.ObserveService/*"]
cells = ["**"]
host = true

[[roles.observer.rules]]
name = "observers change nothing"
effect = "deny"
methods = [
  "aurae.cells.v0.CellService/Allocate",
  "aurae.cells.v0.CellService/Free",
  "aurae.cells.v0.CellService/Start",
  "aurae.cells.v0.CellService/Stop",
]
cells = ["**"]
host = true

[[roles.tenant-a.rules]]
methods = [
  "aurae.cells.v0.CellService/*",
  "aurae.observe.v0.ObserveService/GetSubProcessStream",
  "aurae.observe.v0.ObserveService/GetPosixSignalsStream",
]
cells = ["team-a/**"]

[[roles.tenant-a.rules]]
name = "host-wide signals, filtered to its cells"
methods = ["aurae.observe.v0.ObserveService/GetPosixSignalsStream"]
host = true

[[roles.tenant-b.rules]]
methods = [
  "aurae.cells.v0.CellService/*",
  "aurae.observe.v0.ObserveService/GetSubProcessStream",
  "aurae.observe.v0.ObserveService/GetPosixSignalsStream",
]
cells = ["team-b/**"]
"#;

/// Runs `auraed pki issue-client`; the client config it wrote.
fn issue(d: &Daemon, name: &str, role: Option<&str>, policy: &Path, out: &Path) -> PathBuf {
    let mut cmd = Command::new(auraed_bin());
    cmd.args(["pki", "issue-client", "--name", name, "--pki-dir"])
        .arg(d.dir.path().join("pki"))
        .arg("--out")
        .arg(out)
        .args(["--socket", &d.socket]);
    if let Some(role) = role {
        cmd.args(["--role", role, "--policy"]).arg(policy);
    }
    let o = cmd.output().expect("run auraed pki issue-client");
    assert!(
        o.status.success(),
        "issue-client {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let config = out.join(format!("{name}.toml"));
    assert!(config.exists(), "{}", String::from_utf8_lossy(&o.stdout));
    config
}

async fn connect(config: &Path) -> Client {
    Client::connect(&ClientConfig::from_file(config).expect("client config"))
        .await
        .expect("connect")
}

#[track_caller]
fn denied<T: std::fmt::Debug>(r: Result<T, Status>, needles: &[&str]) -> String {
    let e = r.expect_err("should be denied");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    for n in needles {
        assert!(e.message().contains(n), "{:?} lacks {n:?}", e.message());
    }
    e.message().to_owned()
}

async fn list(c: &Client) -> Result<CellServiceListResponse, Status> {
    c.cells()
        .list(CellServiceListRequest {})
        .await
        .map(|r| r.into_inner())
}

fn names(nodes: &[CellGraphNode], out: &mut Vec<String>) {
    for n in nodes {
        out.push(n.cell.as_ref().map(|c| c.name.clone()).unwrap_or_default());
        names(&n.children, out);
    }
}

async fn cell_names(c: &Client) -> Vec<String> {
    let mut v = Vec::new();
    names(&list(c).await.expect("list").cells, &mut v);
    v.sort();
    v
}

async fn try_start(c: &Client, cell: Option<&str>, name: &str) -> Result<i32, Status> {
    c.cells()
        .start(CellServiceStartRequest {
            cell_name: cell.map(str::to_owned),
            executable: Some(Executable {
                name: name.into(),
                command: "exec sleep 300".into(),
                description: String::new(),
            }),
            uid: None,
            gid: None,
        })
        .await
        .map(|r| r.into_inner().pid)
}

async fn try_allocate(c: &Client, name: &str) -> Result<(), Status> {
    c.cells()
        .allocate(aurae_client::proto::cells::CellServiceAllocateRequest {
            cell: Some(aurae_client::proto::cells::Cell {
                name: name.into(),
                ..Default::default()
            }),
        })
        .await
        .map(|_| ())
}

async fn try_stop(c: &Client, cell: &str, name: &str) -> Result<(), Status> {
    c.cells()
        .stop(CellServiceStopRequest {
            cell_name: Some(cell.into()),
            executable_name: name.into(),
        })
        .await
        .map(|_| ())
}

async fn try_free(c: &Client, cell: &str) -> Result<(), Status> {
    c.cells()
        .free(CellServiceFreeRequest {
            cell_name: cell.into(),
        })
        .await
        .map(|_| ())
}

async fn try_output(c: &Client, pid: i32) -> Result<String, Status> {
    let mut s = c
        .observe()
        .get_sub_process_stream(output_req(pid, LogChannelType::Stdout))
        .await?
        .into_inner();
    let r = tokio::time::timeout(STEP, s.message())
        .await
        .expect("no output")?
        .expect("ended without a line");
    Ok(r.item.expect("item").line)
}

type Signals = Streaming<GetPosixSignalsStreamResponse>;

async fn signals(c: &Client, cell: Option<&str>) -> Result<Signals, Status> {
    let workload = cell.map(|id| Workload {
        workload_type: WorkloadType::Cell.into(),
        id: id.into(),
    });
    c.observe()
        .get_posix_signals_stream(GetPosixSignalsStreamRequest { workload })
        .await
        .map(|s| s.into_inner())
}

/// (signal, pid) pairs until `until` is seen (panics if it is not), then
/// whatever else comes within `linger`.
async fn collect(s: &mut Signals, until: (i32, i32), linger: Duration) -> Vec<(i32, i32)> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + STEP;
    while !seen.contains(&until) {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(left, s.message())
            .await
            .unwrap_or_else(|_| panic!("{until:?} not seen; saw {seen:?}"))
            .expect("stream error")
            .expect("stream ended");
        let sig = r.signal.expect("signal");
        seen.push((sig.signal, sig.process_id));
    }
    let end = Instant::now() + linger;
    while let Ok(Ok(Some(r))) =
        tokio::time::timeout(end.saturating_duration_since(Instant::now()), s.message()).await
    {
        let sig = r.signal.expect("signal");
        seen.push((sig.signal, sig.process_id));
    }
    seen
}

#[tokio::test]
async fn observer_tenants_and_admin() {
    const T: &str = "observer_tenants_and_admin";
    if !is_root() {
        return skip(T, "needs root (cells)");
    }
    let pdir = tempfile::tempdir().expect("temp dir");
    let policy = pdir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).expect("write policy");
    let policy_arg = policy.display().to_string();
    let d = Daemon::start_with(None, &["--authz-policy", &policy_arg]).await;
    assert!(d.log().contains("authorization policy"), "{}", d.log());
    let admin = d.client().await;

    let out = pdir.path().join("clients");
    let obs_cfg = issue(&d, "observer", Some("observer"), &policy, &out);
    let ta_cfg = issue(&d, "tenant-a", Some("tenant-a"), &policy, &out);
    let tb_cfg = issue(&d, "tenant-b", Some("tenant-b"), &policy, &out);
    let nobody_cfg = issue(&d, "nobody", None, &policy, &out);
    let text = std::fs::read_to_string(&policy).unwrap();
    assert!(text.starts_with("# Test policy"), "comments kept: {text}");
    assert!(text.contains("observer = [\"observer\"]"), "{text}");

    let obs = connect(&obs_cfg).await;
    // The running daemon has not read the new grants yet.
    denied(list(&obs).await, &["identity \"observer\"", "roles: none"]);
    common::signal(d.pid(), libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while list(&obs).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ta = connect(&ta_cfg).await;
    let tb = connect(&tb_cfg).await;
    let nobody = connect(&nobody_cfg).await;

    // The admin sets up both tenants' cells and a host executable.
    allocate(&admin, "team-a", false).await;
    allocate(&admin, "team-b", false).await;
    let pb = start(
        &admin,
        Some("team-b"),
        "b-job",
        "echo hello-b; exec sleep 300",
    )
    .await;
    let ph = start(&admin, None, "h-job", "echo hello-host; exec sleep 300").await;
    let probe = signals(&admin, None).await;
    let bpf = match &probe {
        Ok(_) => true,
        Err(e) if e.code() == Code::Unavailable => {
            skip(
                T,
                &format!("signal parts: eBPF unavailable: {}", e.message()),
            );
            false
        }
        Err(e) => panic!("admin's signal stream: {e}"),
    };
    drop(probe);

    // Observer: reads everything...
    assert_eq!(cell_names(&obs).await, ["team-a", "team-b"]);
    let host_exes = list(&obs).await.unwrap().host_executables;
    assert!(host_exes.iter().any(|e| e.name == "h-job"), "{host_exes:?}");
    assert_eq!(try_output(&obs, pb).await.unwrap(), "hello-b");
    assert_eq!(try_output(&obs, ph).await.unwrap(), "hello-host");
    let mut logs = obs
        .observe()
        .get_aurae_daemon_log_stream(GetAuraeDaemonLogStreamRequest {})
        .await
        .expect("observer's log stream")
        .into_inner();
    let line = tokio::time::timeout(STEP, logs.message()).await;
    assert!(matches!(line, Ok(Ok(Some(_)))), "{line:?}");
    let mut obs_signals = if bpf {
        Some(signals(&obs, None).await.expect("observer's signal stream"))
    } else {
        None
    };
    // ... and changes nothing, told which rule says so.
    let rule = [
        "identity \"observer\"",
        "denied by role \"observer\" rule 2 \"observers change nothing\" (policy.toml:",
    ];
    let m = denied(try_allocate(&obs, "team-c").await, &rule);
    assert!(
        m.contains("may not call aurae.cells.v0.CellService/Allocate"),
        "{m}"
    );
    denied(try_start(&obs, Some("team-a"), "x").await, &rule);
    denied(try_start(&obs, None, "x").await, &rule);
    denied(try_stop(&obs, "team-b", "b-job").await, &rule);
    denied(try_free(&obs, "team-b").await, &rule);
    denied(
        obs.vms().list(VmServiceListRequest {}).await,
        &["no rule allows identity \"observer\"", "VmService/List"],
    );
    assert!(d.log().contains("denied: identity \"observer\""), "logged");

    // Tenant A: its own subtree...
    try_allocate(&ta, "team-a/web")
        .await
        .expect("tenant allocates in team-a");
    let pa = start(
        &ta,
        Some("team-a/web"),
        "a-job",
        "echo hello-a; exec sleep 300",
    )
    .await;
    assert_eq!(try_output(&ta, pa).await.unwrap(), "hello-a");
    assert_eq!(cell_names(&ta).await, ["team-a", "team-a/web"]);
    let l = list(&ta).await.unwrap();
    assert!(l.host_executables.is_empty(), "{:?}", l.host_executables);
    // ... nothing of team-b's, nor of the host.
    let no = ["no rule allows identity \"tenant-a\" (roles: tenant-a)"];
    denied(try_start(&ta, Some("team-b"), "x").await, &no);
    denied(try_start(&ta, None, "x").await, &["on the host context"]);
    denied(try_stop(&ta, "team-b", "b-job").await, &no);
    denied(try_free(&ta, "team-b").await, &no);
    denied(try_allocate(&ta, "team-b/x").await, &no);
    denied(try_allocate(&ta, "team-ab").await, &no);
    let m = denied(try_output(&ta, pb).await, &[no[0], &format!("on pid {pb}")]);
    assert!(!m.contains("team-b"), "names the other tenant's cell: {m}");
    denied(try_output(&ta, ph).await, &no);
    denied(try_output(&ta, 999_999_999).await, &no);
    denied(signals(&ta, Some("team-b")).await, &no);
    denied(
        ta.observe()
            .get_aurae_daemon_log_stream(GetAuraeDaemonLogStreamRequest {})
            .await,
        &no,
    );
    // Tenant B sees its own cell only, and has no host-wide stream.
    assert_eq!(cell_names(&tb).await, ["team-b"]);
    denied(try_output(&tb, pa).await, &["identity \"tenant-b\""]);
    denied(signals(&tb, None).await, &["on the host context"]);
    // Discovery and health need no rule; anything else does.
    for c in [&tb, &nobody] {
        assert!(c.discovery().discover(DiscoverRequest {}).await.is_ok());
    }
    denied(list(&nobody).await, &["identity \"nobody\" (roles: none)"]);

    if bpf {
        let mut ta_cell = signals(&ta, Some("team-a")).await.expect("team-a stream");
        let mut ta_host = signals(&ta, None).await.expect("tenant-a host-wide");
        let mut tb_cell = signals(&tb, Some("team-b")).await.expect("team-b stream");
        // B's first: were it delivered to A, it would come before A's.
        kill(pb, libc::SIGUSR1);
        kill(pa, libc::SIGUSR1);
        kill(ph, libc::SIGUSR2);
        let linger = Duration::from_millis(300);
        let on_cell = collect(&mut ta_cell, (libc::SIGUSR1, pa), linger).await;
        let on_host = collect(&mut ta_host, (libc::SIGUSR2, ph), linger).await;
        assert!(on_host.contains(&(libc::SIGUSR1, pa)), "{on_host:?}");
        for seen in [&on_cell, &on_host] {
            assert!(
                !seen.iter().any(|&(_, p)| p == pb),
                "tenant A saw team-b's signal: {seen:?}"
            );
        }
        assert!(!on_cell.iter().any(|&(_, p)| p == ph), "{on_cell:?}");
        let on_b = collect(&mut tb_cell, (libc::SIGUSR1, pb), linger).await;
        assert!(!on_b.iter().any(|&(_, p)| p == pa), "{on_b:?}");
        // The observer's host-wide stream is not filtered.
        if let Some(s) = &mut obs_signals {
            let all = collect(s, (libc::SIGUSR2, ph), Duration::ZERO).await;
            assert!(all.contains(&(libc::SIGUSR1, pb)), "{all:?}");
            assert!(all.contains(&(libc::SIGUSR1, pa)), "{all:?}");
        }
    }

    // A policy that no longer parses is refused on SIGHUP; the old one
    // stays in force.
    std::fs::write(&policy, "[identities]\nobserver = [\"ghost\"]\n").unwrap();
    common::signal(d.pid(), libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log().contains("the previous policy stays in force") {
        assert!(
            Instant::now() < deadline,
            "no reload error; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(d
        .log()
        .contains("policy.toml:2: identity \"observer\": no role \"ghost\""));
    assert!(list(&obs).await.is_ok());
    denied(try_free(&obs, "team-b").await, &rule);

    // The admin may do everything.
    admin
        .vms()
        .list(VmServiceListRequest {})
        .await
        .expect("admin lists VMs");
    stop(&admin, None, "h-job").await;
    free(&admin, "team-a").await;
    free(&admin, "team-b").await;
    assert!(cell_names(&admin).await.is_empty());
}

#[tokio::test]
async fn malformed_policy_stops_start_up() {
    let pdir = tempfile::tempdir().expect("temp dir");
    let cases = [
        (
            "[[roles.r.rules]]\nmethods = [\n  \"aurae.cells.v0.CellService/List\",\n  \"aurae.cells.v0.CellService/Strat\",\n]\ncells = [\"**\"]\n",
            "policy.toml:4: this daemon serves no method aurae.cells.v0.CellService/Strat",
        ),
        (
            "[identities]\nalice = [\"admin\"\n",
            "policy.toml:3: invalid array: expected `]`",
        ),
    ];
    for (text, needle) in cases {
        let policy = pdir.path().join("policy.toml");
        std::fs::write(&policy, text).unwrap();
        let p = policy.display().to_string();
        let mut d = Daemon::spawn(None, &["--authz-policy", &p]);
        let status = d
            .wait_exit(Duration::from_secs(30))
            .expect("auraed should exit");
        assert!(!status.success());
        let log = d.log();
        assert!(log.contains(needle), "{needle:?} not in:\n{log}");
        assert!(log.contains("auraed: authorization policy "), "{log}");
        assert!(!d.client_config_path().exists(), "started anyway");
    }
}

#[tokio::test]
async fn no_policy_means_everything_is_allowed() {
    const T: &str = "no_policy_means_everything_is_allowed";
    if !is_root() {
        return skip(T, "needs root (cells)");
    }
    let d = Daemon::start().await;
    assert!(
        d.log()
            .contains("no --authz-policy: every client certificate"),
        "{}",
        d.log()
    );
    let out = d.dir.path().join("clients");
    let cfg = issue(&d, "someone", None, Path::new("unused"), &out);
    let c = connect(&cfg).await;
    let cell = common::unique("open");
    allocate(&c, &cell, false).await;
    let pid = start(&c, Some(&cell), "job", "echo hi; exec sleep 300").await;
    assert_eq!(first_line(&c, pid).await, "hi");
    assert_eq!(cell_names(&c).await, std::slice::from_ref(&cell));
    let pid = start(&c, None, "host-job", "echo host; exec sleep 300").await;
    assert_eq!(first_line(&c, pid).await, "host");
    stop(&c, None, "host-job").await;
    free(&c, &cell).await;
}
