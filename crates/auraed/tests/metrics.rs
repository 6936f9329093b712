//! Stats and metrics against the real kernel and the real Prometheus tools:
//!
//! - `stats_follow_a_real_workload`: CellService.Stats of a cell whose
//!   process holds 40 MiB and spins under a 10 % CPU quota: CPU time grows
//!   between two calls, the cell is throttled, memory usage covers the
//!   40 MiB, the limit is the cell's memory max, pids are counted; a child
//!   cell shows up with `recursive`; an unknown cell is NOT_FOUND; a cell
//!   whose process went over its memory max counts the OOM kill. `aer cell
//!   stats --json` and `aer top --iterations 2` (not a terminal: plain
//!   repeated tables) print the same cell.
//! - `metrics_pass_promtool_and_a_real_prometheus_scrapes_them`: auraed
//!   with `--metrics-listen 127.0.0.1:0`; `/metrics` passes `promtool check
//!   metrics`, has the cell's cAdvisor series typed as counters and gauges
//!   and the gRPC calls by method and code; then a real Prometheus server
//!   (on a free loopback port, a 1 s scrape interval, a temp config and
//!   data dir, killed by pid at the end) scrapes it, and its HTTP query API
//!   returns the cell's series with the values the daemon reports.
//!
//! Needs root (cells); Prometheus and promtool come from Debian's
//! `prometheus` package (scripts/test installs it): without them the
//! second test says so loudly and stops there.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aurae_client::{
    proto::{
        cells::{
            Cell, CellServiceAllocateRequest, CellServiceFreeRequest, CellServiceListRequest,
            CellServiceStartRequest, CellServiceStatsRequest, CellStats, CpuController, Executable,
            MemoryController,
        },
        observe::{GetSubProcessStreamRequest, LogChannelType},
    },
    Client,
};
use common::{observe::is_root, unique, Daemon};
use tonic::Code;

const MEM_MAX: i64 = 256 << 20;
/// What the workload keeps resident: dd's buffer, blocked writing to a
/// pipe nobody reads.
const HELD: u64 = 40 << 20;
const WORKLOAD: &str =
    "dd if=/dev/zero bs=40M count=1 2>/dev/null | sleep 600 & while :; do :; done";

async fn allocate(c: &Client, name: &str, cpu_max: Option<i64>, mem_max: i64) {
    let cell = Cell {
        name: name.into(),
        cpu: cpu_max.map(|m| CpuController {
            max: Some(m),
            period: Some(100_000),
            ..Default::default()
        }),
        memory: Some(MemoryController {
            max: Some(mem_max),
            ..Default::default()
        }),
        ..Default::default()
    };
    c.cells()
        .allocate(CellServiceAllocateRequest { cell: Some(cell) })
        .await
        .expect("allocate");
}

async fn start(c: &Client, cell: &str, name: &str, command: &str) -> i32 {
    c.cells()
        .start(CellServiceStartRequest {
            cell_name: Some(cell.into()),
            executable: Some(Executable {
                name: name.into(),
                command: command.into(),
                description: String::new(),
            }),
            uid: None,
            gid: None,
        })
        .await
        .expect("start")
        .into_inner()
        .pid
}

async fn free(c: &Client, name: &str) {
    c.cells()
        .free(CellServiceFreeRequest {
            cell_name: name.into(),
        })
        .await
        .expect("free");
}

async fn stats(c: &Client, name: &str, recursive: bool) -> Result<Vec<CellStats>, tonic::Status> {
    c.cells()
        .stats(CellServiceStatsRequest {
            cell_name: name.into(),
            recursive,
        })
        .await
        .map(|r| r.into_inner().cells)
}

/// The host pid of the cell's only executable.
async fn text_pid(c: &Client, cell: &str) -> i32 {
    let r = c
        .cells()
        .list(CellServiceListRequest {})
        .await
        .expect("list")
        .into_inner();
    let node = r
        .cells
        .iter()
        .find(|n| n.cell.as_ref().is_some_and(|x| x.name == cell))
        .expect("the cell in List");
    node.executables.first().expect("its executable").pid
}

async fn one(c: &Client, name: &str) -> CellStats {
    let mut v = stats(c, name, false).await.expect("stats");
    assert_eq!(v.len(), 1, "{v:?}");
    v.remove(0)
}

/// Polls `f` until it is Some, or panics after `timeout`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn stats_follow_a_real_workload() {
    if !is_root() {
        common::observe::skip("stats_follow_a_real_workload", "needs root (cells)");
        return;
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let name = unique("stats");
    allocate(&c, &name, Some(10_000), MEM_MAX).await;
    let child = format!("{name}/child");
    allocate(&c, &child, None, MEM_MAX).await;
    start(&c, &name, "busy", WORKLOAD).await;

    let first = eventually("the workload's memory", Duration::from_secs(30), || async {
        let s = one(&c, &name).await;
        (s.memory_usage_bytes? >= HELD).then_some(s)
    })
    .await;
    let later = eventually(
        "CPU time to grow and throttling",
        Duration::from_secs(60),
        || async {
            let s = one(&c, &name).await;
            // 300 ms of CPU: enough ticks for v1's user/system split.
            let grown = s.cpu_usage_ns? >= first.cpu_usage_ns? + 300_000_000;
            (grown && s.cpu_throttled_periods? > 0).then_some(s)
        },
    )
    .await;
    eprintln!("first: {first:?}\nlater: {later:?}");
    assert_eq!(later.cell_name, name);
    assert_eq!(
        later.memory_limit_bytes,
        Some(MEM_MAX as u64),
        "limit = memory max"
    );
    let usage = later.memory_usage_bytes.expect("usage");
    let ws = later.memory_working_set_bytes.expect("working set");
    assert!(
        ws <= usage && ws >= HELD / 2,
        "working set {ws} vs usage {usage}"
    );
    assert!(later.memory_rss_bytes.expect("rss") >= HELD, "{later:?}");
    assert!(later.memory_cache_bytes.is_some(), "{later:?}");
    assert!(
        later.pids_current.expect("pids") >= 3,
        "sh, dd, sleep: {later:?}"
    );
    assert_eq!(later.oom_kills, Some(0));
    let (user, sys) = (
        later.cpu_user_ns.expect("user"),
        later.cpu_system_ns.expect("sys"),
    );
    let total = later.cpu_usage_ns.expect("usage");
    // user/system come in ticks (v1) or µs (v2): allow a few ticks.
    assert!(user + sys <= total + 50_000_000, "{user}+{sys} vs {total}");
    assert!(user > 0, "a busy loop runs in user mode");
    assert!(later.cpu_periods.expect("periods") >= later.cpu_throttled_periods.expect("thr"));
    assert!(later.cpu_throttled_ns.expect("throttled time") > 0);
    // No made-up zeroes: pids.max is unlimited.
    assert_eq!(later.pids_limit, None);

    // A subtree, everything, an unknown cell.
    let names: Vec<String> = stats(&c, &name, true)
        .await
        .expect("subtree")
        .into_iter()
        .map(|s| s.cell_name)
        .collect();
    assert_eq!(names, vec![name.clone(), child.clone()]);
    let all = stats(&c, "", false).await.expect("all");
    assert!(all.iter().any(|s| s.cell_name == child), "{all:?}");
    let e = stats(&c, &format!("{name}-nope"), false).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = stats(&c, "bad_name", false).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // aer: the same numbers, as JSON and as a repeated table.
    let aer = |args: &[&str]| {
        let out = Command::new(common::aer_bin())
            .arg("--config")
            .arg(d.client_config_path())
            .args(args)
            .output()
            .expect("run aer");
        assert!(out.status.success(), "aer {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let j: serde_json::Value =
        serde_json::from_str(&aer(&["--json", "cell", "stats", &name])).expect("json");
    assert_eq!(j["cells"][0]["cell_name"], name.as_str(), "{j}");
    assert_eq!(j["cells"][0]["memory_limit_bytes"], MEM_MAX, "{j}");
    assert!(
        j["cells"][0].get("pids_limit").is_none(),
        "absent stays absent: {j}"
    );
    let table = aer(&["cell", "stats", &name, "-r"]);
    assert!(table.starts_with("CELL"), "{table}");
    assert!(
        table.contains(&child) && table.contains("256.0M"),
        "{table}"
    );
    let top = aer(&["top", &name, "--interval", "0.3", "--iterations", "2"]);
    eprintln!("aer top:\n{top}");
    assert_eq!(top.matches("%CPU").count(), 2, "two refreshes: {top}");
    assert!(
        !top.contains('\x1b'),
        "no escapes when not a terminal: {top}"
    );
    let busy = top
        .lines()
        .rev()
        .find(|l| l.starts_with(&name))
        .expect("the cell's row");
    let cpu: f64 = busy
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .expect("%CPU");
    // 10 % quota: between a trickle and a little over the quota.
    assert!(cpu > 0.5 && cpu < 20.0, "{busy}");

    // Over its memory max: the OOM kill is counted.
    let hog = unique("stats-oom");
    allocate(&c, &hog, None, 32 << 20).await;
    start(
        &c,
        &hog,
        "hog",
        "dd if=/dev/zero bs=64M count=1 of=/dev/null",
    )
    .await;
    let kills = eventually("the OOM kill", Duration::from_secs(30), || async {
        one(&c, &hog).await.oom_kills.filter(|&k| k >= 1)
    })
    .await;
    assert!(kills >= 1);

    free(&c, &hog).await;
    free(&c, &name).await;
    let e = stats(&c, &name, false).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "freed: {e:?}");
}

/// A plain HTTP/1.0 GET on loopback: (status line, content type, body).
fn http_get(addr: &str, path: &str, accept: Option<&str>) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n").expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.lines().next().unwrap_or_default().to_owned();
    let ctype = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, ctype, body.to_owned())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Kills the Prometheus server by pid when dropped (pass or fail).
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The value of the first sample an instant query returns, if any.
fn query(prom: &str, q: &str) -> Option<f64> {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, _, body) = http_get(prom, &format!("/api/v1/query?query={enc}"), None);
    assert!(status.contains("200"), "{status}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("query JSON");
    assert_eq!(v["status"], "success", "{v}");
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test]
async fn metrics_pass_promtool_and_a_real_prometheus_scrapes_them() {
    if !is_root() {
        common::observe::skip("metrics_pass_promtool...", "needs root (cells)");
        return;
    }
    let d = Daemon::start_with(None, &["--metrics-listen", "127.0.0.1:0"]).await;
    let addr = d
        .log()
        .lines()
        .find_map(|l| {
            l.split("metrics on http://")
                .nth(1)?
                .split('/')
                .next()
                .map(str::to_owned)
        })
        .expect("the metrics address in the log");
    let c = d.client().await;
    let name = unique("metrics");
    allocate(&c, &name, Some(10_000), MEM_MAX).await;
    start(&c, &name, "busy", WORKLOAD).await;
    eventually("the workload's memory", Duration::from_secs(30), || async {
        (one(&c, &name).await.memory_usage_bytes? >= HELD).then_some(())
    })
    .await;
    // One failed call, for the by-code counter.
    assert!(stats(&c, "nope-nope", false).await.is_err());

    let (status, ctype, text) = http_get(&addr, "/metrics", None);
    assert!(status.contains("200"), "{status}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let cell = format!("{{cell=\"{name}\"}}");
    for want in [
        "# TYPE container_cpu_usage_seconds_total counter".to_owned(),
        "# TYPE container_cpu_cfs_throttled_periods_total counter".to_owned(),
        "# TYPE container_memory_working_set_bytes gauge".to_owned(),
        "# TYPE container_spec_memory_limit_bytes gauge".to_owned(),
        "# TYPE container_oom_events_total counter".to_owned(),
        "# TYPE grpc_server_handling_seconds histogram".to_owned(),
        format!("container_cpu_usage_seconds_total{cell} "),
        format!("container_cpu_user_seconds_total{cell} "),
        format!("container_cpu_system_seconds_total{cell} "),
        format!("container_cpu_cfs_periods_total{cell} "),
        format!("container_cpu_cfs_throttled_seconds_total{cell} "),
        format!("container_memory_usage_bytes{cell} "),
        format!("container_memory_rss{cell} "),
        format!("container_memory_cache{cell} "),
        format!("container_spec_memory_limit_bytes{cell} {MEM_MAX}.0"),
        format!("container_oom_events_total{cell} 0.0"),
        r#"grpc_server_handled_total{grpc_service="aurae.cells.v0.CellService",grpc_method="Stats",grpc_type="unary",grpc_code="NotFound"} 1"#.to_owned(),
        r#"grpc_server_started_total{grpc_service="aurae.cells.v0.CellService",grpc_method="Allocate",grpc_type="unary"} 1"#.to_owned(),
        "\nauraed_cells 1.0\n".to_owned(),
        r#"auraed_executables{state="running"} 1.0"#.to_owned(),
    ] {
        assert!(text.contains(&want), "missing {want:?} in\n{text}");
    }
    // pids.max is unlimited: no series rather than a made-up number.
    assert!(
        !text.contains(&format!("container_threads_max{cell}")),
        "{text}"
    );
    // An open server stream is counted open; once the client drops it, it
    // is closed and handled as Canceled.
    let busy_pid = text_pid(&c, &name).await;
    let mut stream = c
        .observe()
        .get_sub_process_stream(GetSubProcessStreamRequest {
            channel_type: LogChannelType::Stdout as i32,
            process_id: busy_pid,
            ..Default::default()
        })
        .await
        .expect("open an output stream")
        .into_inner();
    let sub = r#"{grpc_service="aurae.observe.v0.ObserveService",grpc_method="GetSubProcessStream",grpc_type="server_stream""#;
    let scrape = |addr: String| async move {
        tokio::task::spawn_blocking(move || http_get(&addr, "/metrics", None).2)
            .await
            .expect("scrape")
    };
    let open = scrape(addr.clone()).await;
    assert!(
        open.contains(&format!("grpc_server_open_calls{sub}}} 1")),
        "{open}"
    );
    // Nothing printed yet; the stream stays open until dropped.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.message())
            .await
            .is_err()
    );
    drop(stream);
    let closed = format!("grpc_server_handled_total{sub},grpc_code=\"Canceled\"}} 1");
    eventually(
        "the dropped stream to be counted",
        Duration::from_secs(10),
        || {
            let a = addr.clone();
            let closed = closed.clone();
            let sub = sub.to_owned();
            async move {
                let t = scrape(a).await;
                (t.contains(&closed) && t.contains(&format!("grpc_server_open_calls{sub}}} 0")))
                    .then_some(())
            }
        },
    )
    .await;

    let (_, ctype, om) = http_get(&addr, "/metrics", Some("application/openmetrics-text"));
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(http_get(&addr, "/nope", None).0.contains("404"));

    if !have("promtool") || !have("prometheus") {
        common::observe::skip(
            "metrics_pass_promtool_and_a_real_prometheus_scrapes_them (promtool/Prometheus part)",
            "no promtool/prometheus: apt-get install prometheus (scripts/test does)",
        );
        free(&c, &name).await;
        return;
    }
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = check.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::Builder::new()
        .prefix("auraed-prom-")
        .tempdir()
        .expect("tmp");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: auraed\n    scrape_interval: 1s\n    \
             static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .expect("config");
    let prom_addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
    let prom = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
    );
    let prom_log =
        || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    let ready = Instant::now() + Duration::from_secs(60);
    // Listening comes before ready (the TSDB opens meanwhile: 503).
    while TcpStream::connect(&prom_addr).is_err()
        || !http_get(&prom_addr, "/-/ready", None).0.contains("200")
    {
        assert!(
            Instant::now() < ready,
            "prometheus is not ready:\n{}",
            prom_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let q = |s: String| {
        let p = prom_addr.clone();
        async move {
            tokio::task::spawn_blocking(move || query(&p, &s))
                .await
                .expect("query")
        }
    };
    let sel = format!("{{cell=\"{name}\",job=\"auraed\"}}");
    let limit = eventually(
        "Prometheus to scrape the cell",
        Duration::from_secs(60),
        || q(format!("container_spec_memory_limit_bytes{sel}")),
    )
    .await;
    assert_eq!(limit, MEM_MAX as f64);
    assert_eq!(q(r#"up{job="auraed"}"#.into()).await, Some(1.0));
    let mem = q(format!("container_memory_usage_bytes{sel}"))
        .await
        .expect("memory");
    assert!(mem >= HELD as f64, "{mem}");
    // Counters: a rate over a few scrapes is positive (the loop spins).
    let cpu_rate = eventually(
        "a CPU rate over several scrapes",
        Duration::from_secs(60),
        || {
            let f = q(format!("rate(container_cpu_usage_seconds_total{sel}[5s])"));
            async move { f.await.filter(|r| *r > 0.0) }
        },
    )
    .await;
    eprintln!("Prometheus: limit {limit}, memory {mem}, cpu rate {cpu_rate:.3} CPUs");
    assert!(cpu_rate < 0.5, "10 % quota, got {cpu_rate}");
    let handled = q(
        r#"grpc_server_handled_total{grpc_method="Stats",grpc_code="NotFound",job="auraed"}"#
            .into(),
    )
    .await;
    assert_eq!(handled, Some(1.0));
    drop(prom);
    free(&c, &name).await;
    assert!(Path::new(&dir.path().join("data")).is_dir());
}
