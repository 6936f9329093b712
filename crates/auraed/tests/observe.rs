//! ObserveService end to end, against the real daemon: the daemon log
//! stream, subscribe/disconnect leaks, `aer observe`, and shutdown. Output
//! streams are in observe_output.rs, signals in observe_signals.rs. Tests
//! that need root say so loudly and return without it.

mod common;

use std::time::{Duration, Instant};

use aurae_client::{
    proto::observe::{
        GetAuraeDaemonLogStreamRequest, GetAuraeDaemonLogStreamResponse,
        GetPosixSignalsStreamRequest, LogChannelType,
    },
    Client,
};
use common::{observe::*, unique, Daemon};
use tonic::{Code, Streaming};

async fn log_stream(c: &Client) -> Streaming<GetAuraeDaemonLogStreamResponse> {
    c.observe()
        .get_aurae_daemon_log_stream(GetAuraeDaemonLogStreamRequest {})
        .await
        .expect("subscribe to the daemon log")
        .into_inner()
}

/// Reads the daemon log stream until a line contains `wanted`.
async fn find_log_line(s: &mut Streaming<GetAuraeDaemonLogStreamResponse>, wanted: &str) {
    let deadline = Instant::now() + STEP;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(left, s.message())
            .await
            .unwrap_or_else(|_| panic!("no log line containing {wanted:?}"))
            .expect("stream error")
            .expect("stream ended");
        let item = r.item.expect("item");
        assert_eq!(item.channel, "auraed");
        assert!(item.timestamp > 1_600_000_000_000_000_000, "ns timestamp");
        if item.line.contains(wanted) {
            return;
        }
    }
}

#[tokio::test]
async fn daemon_log_delivers_live_lines_and_backlog() {
    if !is_root() {
        return skip(
            "daemon_log_delivers_live_lines_and_backlog",
            "needs root (cells)",
        );
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let mut early = log_stream(&c).await;
    let cell = unique("obs-log");
    allocate(&c, &cell, false).await;
    let wanted = format!("allocated cell {cell}");
    find_log_line(&mut early, &wanted).await;
    // A subscriber that connects after the line still gets it (backlog).
    let mut late = log_stream(&c).await;
    find_log_line(&mut late, &wanted).await;
    free(&c, &cell).await;
    find_log_line(&mut early, &format!("freed cell {cell}")).await;
}

#[tokio::test]
async fn a_thousand_subscribe_disconnect_cycles_leak_nothing() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let host_pid = if is_root() {
        Some(start(&c, None, &unique("obs-cycle"), "exec sleep 300").await)
    } else {
        None
    };
    let cycle = |n: usize| {
        let c = c.clone();
        async move {
            for _ in 0..n {
                let mut s = log_stream(&c).await;
                // The backlog always has lines: the first one arrives.
                tokio::time::timeout(STEP, s.message())
                    .await
                    .expect("first line")
                    .expect("stream error")
                    .expect("a backlog line");
                drop(s);
                if let Some(pid) = host_pid {
                    let s = c
                        .observe()
                        .get_sub_process_stream(output_req(pid, LogChannelType::Stdout))
                        .await
                        .expect("subscribe output");
                    drop(s);
                }
            }
        }
    };
    // The signal probe loads in the background after start-up; a signal
    // stream request waits for it, so its fds are in place before counting.
    let _ = c
        .observe()
        .get_posix_signals_stream(aurae_client::proto::observe::GetPosixSignalsStreamRequest {
            workload: None,
        })
        .await;
    cycle(50).await; // warm up: connection, buffers, runtime threads
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (fds0, threads0) = (fd_count(d.pid()), thread_count(d.pid()));
    let t = Instant::now();
    cycle(1000).await;
    let took = t.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fds1, threads1) = (fd_count(d.pid()), thread_count(d.pid()));
    eprintln!(
        "1000 subscribe/disconnect cycles in {took:?}: fds {fds0} -> {fds1}, threads {threads0} -> {threads1}"
    );
    assert!(fds1 <= fds0 + 1, "fds {fds0} -> {fds1}");
    assert!(threads1 <= threads0 + 1, "threads {threads0} -> {threads1}");
    // The daemon still answers.
    log_stream(&c).await.message().await.expect("log stream");
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
async fn aer_observe_prints_plain_and_json_lines() {
    if !is_root() {
        return skip("aer_observe_prints_plain_and_json_lines", "needs root");
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let pid = start(
        &c,
        None,
        &unique("aer"),
        "echo one; echo two; echo oops >&2",
    )
    .await;
    let pid_s = pid.to_string();
    let out = aer(&d, &["observe", "output", &pid_s]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\n");
    let out = aer(&d, &["--json", "observe", "output", &pid_s, "--stderr"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(v["channel"], "stderr");
    assert_eq!(v["line"], "oops");
    assert!(v["timestamp"].as_i64().is_some());
    let out = aer(&d, &["observe", "output", "999999999"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("aer: NotFound"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = aer(&d, &["observe", "signals", "--cell", "no-such-cell"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NotFound") || err.contains("Unavailable"),
        "{err}"
    );

    // `aer observe logs` follows: read its first lines, then stop it.
    let mut child = std::process::Command::new(common::aer_bin())
        .arg("--config")
        .arg(d.client_config_path())
        .args(["--json", "observe", "logs"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("aer observe logs");
    let stdout = child.stdout.take().expect("stdout");
    let first = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut l = String::new();
        std::io::BufReader::new(stdout).read_line(&mut l).map(|_| l)
    });
    let first = tokio::time::timeout(STEP, first)
        .await
        .expect("aer observe logs printed nothing")
        .expect("join")
        .expect("read");
    let v: serde_json::Value = serde_json::from_str(&first).expect("JSON line");
    assert_eq!(v["channel"], "auraed");
    let _ = child.kill();
    let _ = child.wait();
}

/// True when a stream is over: at the end of its body, or with the status
/// a shutting-down daemon sends (or the broken connection's).
fn ended<T>(r: Result<Option<T>, tonic::Status>) -> bool {
    match r {
        Ok(Some(_)) => false,
        Ok(None) => true,
        Err(e) => {
            assert!(
                matches!(
                    e.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ),
                "{e}"
            );
            true
        }
    }
}

#[tokio::test]
async fn streams_end_when_the_daemon_shuts_down() {
    let mut d = Daemon::start().await;
    let c = d.client().await;
    let mut logs = log_stream(&c).await;
    let mut signals = match c
        .observe()
        .get_posix_signals_stream(GetPosixSignalsStreamRequest { workload: None })
        .await
    {
        Ok(s) => Some(s.into_inner()),
        Err(e) => {
            assert_eq!(e.code(), Code::Unavailable, "{e}");
            None
        }
    };
    let t = Instant::now();
    let status = d.terminate();
    assert!(status.success(), "{status:?}");
    eprintln!("daemon with open streams exited in {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(10));
    // Both streams end (with UNAVAILABLE or at the end of the body), not hang.
    let deadline = Instant::now() + STEP;
    while !ended(logs.message().await) {
        assert!(Instant::now() < deadline, "log stream did not end");
    }
    if let Some(s) = &mut signals {
        while !ended(s.message().await) {
            assert!(Instant::now() < deadline, "signal stream did not end");
        }
    }
}
