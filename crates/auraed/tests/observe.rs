//! ObserveService end to end, against the real daemon: the daemon log
//! stream, executables' output streams and the eBPF POSIX signal stream.
//! Cell tests need root (cgroups, namespaces) and the signal tests also need
//! BPF; without them they say so loudly and return.

mod common;

use std::time::{Duration, Instant};

use aurae_client::{
    proto::{
        cells::{
            Cell, CellServiceAllocateRequest, CellServiceFreeRequest, CellServiceStartRequest,
            CellServiceStopRequest, Executable,
        },
        observe::{
            GetAuraeDaemonLogStreamRequest, GetAuraeDaemonLogStreamResponse,
            GetPosixSignalsStreamRequest, GetPosixSignalsStreamResponse,
            GetSubProcessStreamRequest, LogChannelType, Workload, WorkloadType,
        },
    },
    Client,
};
use common::{unique, Daemon};
use tonic::{Code, Streaming};

const STEP: Duration = Duration::from_secs(20);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn skip(test: &str, why: &str) {
    eprintln!("!!!!! SKIPPED {test}: {why} !!!!!");
}

async fn allocate(c: &Client, name: &str, isolate: bool) {
    c.cells()
        .allocate(CellServiceAllocateRequest {
            cell: Some(Cell {
                name: name.into(),
                isolate_process: isolate,
                ..Default::default()
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("allocate {name}: {e}"));
}

async fn free(c: &Client, name: &str) {
    c.cells()
        .free(CellServiceFreeRequest {
            cell_name: name.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("free {name}: {e}"));
}

/// Starts `sh -c command` in `cell` (None: host context); returns the pid.
async fn start(c: &Client, cell: Option<&str>, name: &str, command: &str) -> i32 {
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
        .unwrap_or_else(|e| panic!("start {name}: {e}"))
        .into_inner()
        .pid
}

async fn stop(c: &Client, cell: Option<&str>, name: &str) {
    c.cells()
        .stop(CellServiceStopRequest {
            cell_name: cell.map(str::to_owned),
            executable_name: name.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("stop {name}: {e}"));
}

fn output_req(pid: i32, channel: LogChannelType) -> GetSubProcessStreamRequest {
    GetSubProcessStreamRequest {
        channel_type: channel.into(),
        process_id: pid,
    }
}

/// Every line of one channel until the stream ends (bounded wait).
async fn read_output(c: &Client, pid: i32, channel: LogChannelType) -> Vec<String> {
    let mut s = c
        .observe()
        .get_sub_process_stream(output_req(pid, channel))
        .await
        .expect("subscribe")
        .into_inner();
    let want = if channel == LogChannelType::Stdout {
        "stdout"
    } else {
        "stderr"
    };
    let mut lines = Vec::new();
    while let Some(r) = tokio::time::timeout(STEP, s.message())
        .await
        .expect("output stream stalled")
        .expect("stream error")
    {
        let item = r.item.expect("item");
        assert_eq!(item.channel, want);
        assert!(item.timestamp > 1_600_000_000_000_000_000, "ns timestamp");
        lines.push(item.line);
    }
    lines
}

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

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .count()
}

fn thread_count(pid: i32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("Threads: line")
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|n| n.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS: line")
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

#[tokio::test]
async fn output_streams_in_host_isolated_and_nested_cells() {
    if !is_root() {
        return skip(
            "output_streams_in_host_isolated_and_nested_cells",
            "needs root",
        );
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let iso = unique("obs-iso");
    let nested = format!("{iso}/{}", unique("inner"));
    allocate(&c, &iso, true).await;
    allocate(&c, &nested, false).await;
    // Some lines are in the backlog when we subscribe, some arrive live.
    let script = "echo out1; echo err1 >&2; sleep 0.5; echo out2; echo err2 >&2; echo out3";
    for cell in [None, Some(iso.as_str()), Some(nested.as_str())] {
        let pid = start(&c, cell, &unique("talk"), script).await;
        let (out, err) = tokio::join!(
            read_output(&c, pid, LogChannelType::Stdout),
            read_output(&c, pid, LogChannelType::Stderr)
        );
        assert_eq!(out, ["out1", "out2", "out3"], "stdout in {cell:?}");
        assert_eq!(err, ["err1", "err2"], "stderr in {cell:?}");
        // After the end, a new subscriber still gets the kept lines.
        let again = read_output(&c, pid, LogChannelType::Stdout).await;
        assert_eq!(
            again,
            ["out1", "out2", "out3"],
            "late subscriber in {cell:?}"
        );
    }
    free(&c, &iso).await;
}

#[tokio::test]
async fn a_hundred_thousand_lines_arrive_once_in_order() {
    if !is_root() {
        return skip(
            "a_hundred_thousand_lines_arrive_once_in_order",
            "needs root",
        );
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let gate = d.dir.path().join("gate");
    let cmd = format!(
        "while [ ! -e {g} ]; do sleep 0.01; done; seq 1 100000; echo e1 >&2; echo e2 >&2",
        g = gate.display()
    );
    let pid = start(&c, None, &unique("seq"), &cmd).await;
    let mut s = c
        .observe()
        .get_sub_process_stream(output_req(pid, LogChannelType::Stdout))
        .await
        .expect("subscribe")
        .into_inner();
    // Subscribed (headers are back): now let it write, as fast as it can.
    std::fs::write(&gate, "").expect("open the gate");
    let t = Instant::now();
    let mut n = 0u32;
    while let Some(r) = tokio::time::timeout(STEP, s.message())
        .await
        .expect("stalled")
        .expect("stream error")
    {
        n += 1;
        let line = r.item.expect("item").line;
        assert_eq!(line, n.to_string(), "line {n}");
    }
    let took = t.elapsed();
    eprintln!(
        "100000 lines in {took:?} ({:.0} lines/s)",
        f64::from(n) / took.as_secs_f64()
    );
    assert_eq!(n, 100_000);
    assert_eq!(
        read_output(&c, pid, LogChannelType::Stderr).await,
        ["e1", "e2"]
    );
}

#[tokio::test]
async fn long_lines_are_split_and_invalid_utf8_is_replaced() {
    if !is_root() {
        return skip(
            "long_lines_are_split_and_invalid_utf8_is_replaced",
            "needs root",
        );
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let cmd = "head -c 204800 /dev/zero | tr '\\0' a; echo; printf 'x\\377y\\n'; echo end";
    let pid = start(&c, None, &unique("long"), cmd).await;
    let lines = read_output(&c, pid, LogChannelType::Stdout).await;
    let lens: Vec<usize> = lines.iter().map(String::len).collect();
    assert_eq!(lens[..4], [65536, 65536, 65536, 8192], "200 KiB line split");
    assert!(lines[..4].iter().all(|l| l.bytes().all(|b| b == b'a')));
    assert_eq!(lines[4..], ["x\u{fffd}y", "end"]);
}

/// True once `pid` has exited (gone, or a zombie not yet reaped).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[tokio::test]
async fn an_unwatched_chatty_executable_never_blocks() {
    if !is_root() {
        return skip("an_unwatched_chatty_executable_never_blocks", "needs root");
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let rss0 = rss_kib(d.pid());
    // 50 MiB of 100-byte lines, then a marker; nobody subscribed.
    let line = "a".repeat(99);
    let cmd = format!("yes {line} | head -c 52428800; echo done");
    let pid = start(&c, None, &unique("chatty"), &cmd).await;
    let t = Instant::now();
    while !exited(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "it blocked on its pipe"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t.elapsed();
    let kept = read_output(&c, pid, LogChannelType::Stdout).await;
    let rss1 = rss_kib(d.pid());
    eprintln!(
        "50 MiB unwatched in {took:?}; kept {} lines; daemon RSS {rss0} -> {rss1} KiB",
        kept.len()
    );
    assert_eq!(kept.last().map(String::as_str), Some("done"));
    assert!(kept.len() < 524_288 / 4, "backlog bounded: {}", kept.len());
    assert!(rss1 < rss0 + 64 * 1024, "RSS {rss0} -> {rss1} KiB");
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_grow_the_daemon() {
    if !is_root() {
        return skip(
            "a_client_that_never_reads_does_not_grow_the_daemon",
            "needs root",
        );
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let gate = d.dir.path().join("gate");
    let line = "b".repeat(99);
    let cmd = format!(
        "while [ ! -e {g} ]; do sleep 0.01; done; yes {line} | head -c 104857600; echo done",
        g = gate.display()
    );
    let pid = start(&c, None, &unique("flood"), &cmd).await;
    let rss0 = rss_kib(d.pid());
    let mut stuck = c
        .observe()
        .get_sub_process_stream(output_req(pid, LogChannelType::Stdout))
        .await
        .expect("subscribe")
        .into_inner();
    std::fs::write(&gate, "").expect("open the gate");
    let t = Instant::now();
    while !exited(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "it blocked on its pipe"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss1 = rss_kib(d.pid());
    eprintln!("100 MiB with a client that never reads: daemon RSS {rss0} -> {rss1} KiB");
    assert!(rss1 < rss0 + 64 * 1024, "RSS {rss0} -> {rss1} KiB");
    // The stuck client is told it lost lines once it reads.
    let first = stuck.message().await.expect("stream").expect("an item");
    let _ = first;
    let mut told = false;
    while let Ok(Ok(Some(r))) = tokio::time::timeout(STEP, stuck.message()).await {
        if r.item.expect("item").line.contains("lines were dropped") {
            told = true;
            break;
        }
    }
    assert!(told, "a lagging subscriber is told how many lines it lost");
}

#[tokio::test]
async fn output_stream_errors() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let code = |r: Result<_, tonic::Status>| r.map(|_| ()).expect_err("must fail").code();
    let mut o = c.observe();
    let unknown = o
        .get_sub_process_stream(output_req(i32::MAX, LogChannelType::Stdout))
        .await;
    assert_eq!(code(unknown), Code::NotFound);
    if !is_root() {
        return skip("output_stream_errors (after NOT_FOUND)", "needs root");
    }
    let name = unique("sleeper");
    let pid = start(&c, None, &name, "exec sleep 300").await;
    for bad in [0, 7, -1] {
        let r = o
            .get_sub_process_stream(GetSubProcessStreamRequest {
                channel_type: bad,
                process_id: pid,
            })
            .await;
        let e = r.map(|_| ()).expect_err("bad channel");
        assert_eq!(e.code(), Code::InvalidArgument, "channel {bad}");
        assert!(e.message().contains("channel_type"), "{}", e.message());
    }
    let bad_pid = o
        .get_sub_process_stream(output_req(0, LogChannelType::Stdout))
        .await;
    assert_eq!(code(bad_pid), Code::InvalidArgument);
    stop(&c, None, &name).await;
    let gone = o
        .get_sub_process_stream(output_req(pid, LogChannelType::Stdout))
        .await;
    assert_eq!(code(gone), Code::NotFound);
}

type SignalStream = Streaming<GetPosixSignalsStreamResponse>;

fn cell_workload(cell: &str) -> Option<Workload> {
    Some(Workload {
        workload_type: WorkloadType::Cell.into(),
        id: cell.into(),
    })
}

/// Opens a signal stream; None (after a loud message) when the daemon
/// could not load the probe here.
async fn signal_stream(c: &Client, workload: Option<Workload>, test: &str) -> Option<SignalStream> {
    match c
        .observe()
        .get_posix_signals_stream(GetPosixSignalsStreamRequest { workload })
        .await
    {
        Ok(s) => Some(s.into_inner()),
        Err(e) if e.code() == Code::Unavailable => {
            skip(test, &format!("eBPF unavailable: {}", e.message()));
            None
        }
        Err(e) => panic!("signal stream: {e}"),
    }
}

/// Reads until (signal, pid) is seen; panics after a while.
async fn expect_signal(s: &mut SignalStream, signal: i32, pid: i32) {
    let deadline = Instant::now() + STEP;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(left, s.message())
            .await
            .unwrap_or_else(|_| panic!("signal {signal} to pid {pid} not seen"))
            .expect("stream error")
            .expect("stream ended");
        let sig = r.signal.expect("signal");
        if sig.signal == signal && sig.process_id == pid {
            return;
        }
    }
}

/// Everything the stream delivers within `wait`.
async fn drain_signals(s: &mut SignalStream, wait: Duration) -> Vec<(i32, i32)> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.message()).await {
            Ok(Ok(Some(r))) => {
                let sig = r.signal.expect("signal");
                seen.push((sig.signal, sig.process_id));
            }
            Ok(Ok(None)) | Err(_) => return seen,
            Ok(Err(e)) => panic!("stream error: {e}"),
        }
    }
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill {pid}: {}", std::io::Error::last_os_error());
}

/// The first stdout line of `pid` (waits for it).
async fn first_line(c: &Client, pid: i32) -> String {
    let mut s = c
        .observe()
        .get_sub_process_stream(output_req(pid, LogChannelType::Stdout))
        .await
        .expect("subscribe")
        .into_inner();
    let r = tokio::time::timeout(STEP, s.message())
        .await
        .expect("no output")
        .expect("stream error")
        .expect("ended without a line");
    r.item.expect("item").line
}

#[tokio::test]
async fn signals_are_scoped_to_the_target_cell() {
    const T: &str = "signals_are_scoped_to_the_target_cell";
    if !is_root() {
        return skip(T, "needs root (cells, eBPF)");
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let Some(mut host) = signal_stream(&c, None, T).await else {
        return;
    };
    let (a, b) = (unique("sig-a"), unique("sig-b"));
    allocate(&c, &a, false).await;
    allocate(&c, &b, false).await;
    let mut sa = signal_stream(&c, cell_workload(&a), T).await.expect("A");
    let mut sb = signal_stream(&c, cell_workload(&b), T).await.expect("B");

    // kill -USR1 a process in A: on A's stream and the host's, not on B's.
    let pa = start(&c, Some(&a), "target", "exec sleep 300").await;
    let pb = start(&c, Some(&b), "victim", "exec sleep 300").await;
    kill(pa, libc::SIGUSR1);
    expect_signal(&mut sa, libc::SIGUSR1, pa).await;
    expect_signal(&mut host, libc::SIGUSR1, pa).await;

    // A process in A signals B's process: that is B's signal, not A's
    // (matched by target, not by sender).
    let sender = format!("kill -USR2 {pb}; echo sent; exec sleep 300");
    let ps = start(&c, Some(&a), "sender", &sender).await;
    assert_eq!(first_line(&c, ps).await, "sent");
    expect_signal(&mut sb, libc::SIGUSR2, pb).await;
    expect_signal(&mut host, libc::SIGUSR2, pb).await;

    // Stop's SIGTERM is seen on the cell's stream.
    stop(&c, Some(&a), "sender").await;
    expect_signal(&mut sa, libc::SIGTERM, ps).await;

    let on_a = drain_signals(&mut sa, Duration::from_millis(500)).await;
    assert!(
        !on_a.iter().any(|&(_, pid)| pid == pb),
        "A's stream saw B's signal: {on_a:?}"
    );
    let on_b = drain_signals(&mut sb, Duration::from_millis(100)).await;
    assert!(
        !on_b.iter().any(|&(_, pid)| pid == pa || pid == ps),
        "B's stream saw A's signals: {on_b:?}"
    );
    free(&c, &a).await;
    free(&c, &b).await;
    // A freed cell's stream ends.
    let rest = drain_signals(&mut sa, Duration::from_secs(3)).await;
    let ended = tokio::time::timeout(Duration::from_secs(2), sa.message()).await;
    assert!(
        matches!(ended, Ok(Ok(None))),
        "A's stream did not end after Free (then saw {rest:?})"
    );
}

#[tokio::test]
async fn signals_to_a_grandchild_in_a_nested_cell_allocated_later_are_seen() {
    const T: &str = "signals_to_a_grandchild_in_a_nested_cell_allocated_later_are_seen";
    if !is_root() {
        return skip(T, "needs root (cells, eBPF)");
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let parent = unique("sig-parent");
    allocate(&c, &parent, false).await;
    let Some(mut sp) = signal_stream(&c, cell_workload(&parent), T).await else {
        return free(&c, &parent).await;
    };
    let mut host = signal_stream(&c, None, T).await.expect("host stream");
    // Allocated after subscribing.
    let child = format!("{parent}/{}", unique("kid"));
    allocate(&c, &child, false).await;
    let pid = start(&c, Some(&child), "forker", "sleep 300 & echo $!; wait").await;
    let grandchild: i32 = first_line(&c, pid).await.parse().expect("a pid");
    assert_ne!(grandchild, pid);
    kill(grandchild, libc::SIGUSR1);
    expect_signal(&mut sp, libc::SIGUSR1, grandchild).await;
    expect_signal(&mut host, libc::SIGUSR1, grandchild).await;
    free(&c, &parent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_signals_to_a_cell_are_all_reported() {
    const T: &str = "ten_thousand_signals_to_a_cell_are_all_reported";
    const SENT: usize = 10_000;
    if !is_root() {
        return skip(T, "needs root (cells, eBPF)");
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let cell = unique("sig-10k");
    allocate(&c, &cell, false).await;
    let Some(mut s) = signal_stream(&c, cell_workload(&cell), T).await else {
        return free(&c, &cell).await;
    };
    // The target blocks SIGRTMIN+1, so each signal is queued (delivered to
    // its pending queue), never merged with one still pending, never fatal.
    let sig = libc::SIGRTMIN() + 1;
    let cmd = "exec perl -MPOSIX -e 'sigprocmask(SIG_BLOCK, POSIX::SigSet->new(POSIX::SIGRTMIN()+1)) or die; $|=1; print \"ready\\n\"; exec(\"sleep\", \"300\")'";
    let pid = start(&c, Some(&cell), "blocker", cmd).await;
    assert_eq!(first_line(&c, pid).await, "ready");
    let t = Instant::now();
    let sender = tokio::task::spawn_blocking(move || {
        for _ in 0..SENT {
            kill(pid, sig);
        }
    });
    let mut seen = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen < SENT {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(left, s.message())
            .await
            .unwrap_or_else(|_| panic!("only {seen} of {SENT} signals seen"))
            .expect("stream error")
            .expect("stream ended");
        let e = r.signal.expect("signal");
        if e.signal == sig && e.process_id == pid {
            seen += 1;
        }
    }
    sender.await.expect("sender");
    eprintln!(
        "{SENT} signals to a process in a cell: {seen} seen in {:?}",
        t.elapsed()
    );
    assert_eq!(seen, SENT);
    free(&c, &cell).await;
}

#[tokio::test]
async fn signal_stream_errors() {
    const T: &str = "signal_stream_errors";
    let d = Daemon::start().await;
    let c = d.client().await;
    let mut o = c.observe();
    let call = |t: WorkloadType, id: &str| GetPosixSignalsStreamRequest {
        workload: Some(Workload {
            workload_type: t.into(),
            id: id.into(),
        }),
    };
    for t in [WorkloadType::PodSandbox, WorkloadType::Vm] {
        let e = o
            .get_posix_signals_stream(call(t, "x"))
            .await
            .map(|_| ())
            .expect_err("not implemented");
        if e.code() == Code::Unavailable {
            return skip(T, &format!("eBPF unavailable: {}", e.message()));
        }
        assert_eq!(e.code(), Code::Unimplemented, "{t:?}: {e}");
        assert!(!e.message().is_empty());
    }
    let e = o
        .get_posix_signals_stream(call(WorkloadType::Cell, "no-such-cell"))
        .await
        .map(|_| ())
        .expect_err("unknown cell");
    if e.code() == Code::Unavailable {
        return skip(T, &format!("eBPF unavailable: {}", e.message()));
    }
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = o
        .get_posix_signals_stream(call(WorkloadType::Cell, "bad name!"))
        .await
        .map(|_| ())
        .expect_err("bad name");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
}
