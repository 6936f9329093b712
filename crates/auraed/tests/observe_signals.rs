//! GetPosixSignalsStream end to end: host-wide and per-cell streams fed by
//! the eBPF probe. Needs root and BPF; says so loudly and returns without.

mod common;

use std::time::{Duration, Instant};

use aurae_client::{
    proto::observe::{
        GetPosixSignalsStreamRequest, GetPosixSignalsStreamResponse, Workload, WorkloadType,
    },
    Client,
};
use common::{observe::*, unique, Daemon};
use tonic::{Code, Streaming};

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
    // A pod sandbox id is 64 hex digits (tests/cri.rs streams a real pod's).
    let e = o
        .get_posix_signals_stream(call(WorkloadType::PodSandbox, "x"))
        .await
        .map(|_| ())
        .expect_err("not a sandbox id");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("workload.id"), "{e}");
    let e = o
        .get_posix_signals_stream(call(WorkloadType::PodSandbox, &"ab".repeat(32)))
        .await
        .map(|_| ())
        .expect_err("no such pod");
    if e.code() == Code::Unavailable {
        return skip(T, &format!("eBPF unavailable: {}", e.message()));
    }
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(e.message().contains("pod sandbox"), "{e}");
    // A VM's stream is its guest's, relayed (tests/vm.rs): an unknown VM
    // is NOT_FOUND, before any eBPF of the host is involved.
    let e = o
        .get_posix_signals_stream(call(WorkloadType::Vm, "x"))
        .await
        .map(|_| ())
        .expect_err("unknown VM");
    assert_eq!(e.code(), Code::NotFound, "{e}");
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

#[tokio::test]
async fn stop_of_a_sigterm_ignoring_process_shows_sigterm_then_sigkill() {
    let test = "stop_of_a_sigterm_ignoring_process_shows_sigterm_then_sigkill";
    if !is_root() {
        return skip(test, "needs root");
    }
    let d = Daemon::start_with(None, &["--stop-grace-secs", "1"]).await;
    let c = d.client().await;
    let cell = unique("stubborn");
    allocate(&c, &cell, false).await;
    let Some(mut s) = signal_stream(&c, cell_workload(&cell), test).await else {
        return free(&c, &cell).await;
    };
    // `exec` keeps one process: the shell that ignores TERM becomes sleep,
    // which inherits the ignored disposition.
    let pid = start(
        &c,
        Some(&cell),
        "ignorer",
        "trap '' TERM; echo ready; exec sleep 300",
    )
    .await;
    assert_eq!(first_line(&c, pid).await, "ready");
    stop(&c, Some(&cell), "ignorer").await;
    let seen = drain_signals(&mut s, Duration::from_millis(500)).await;
    let to_it: Vec<i32> = seen
        .iter()
        .filter(|&&(_, p)| p == pid)
        .map(|&(sig, _)| sig)
        .collect();
    // An ignored SIGTERM is not delivered (the probe reports delivered
    // signals only); the SIGKILL after the grace period is.
    assert!(
        to_it.contains(&libc::SIGKILL),
        "no SIGKILL seen for {pid}: {seen:?}"
    );
    assert!(exited(pid));
    free(&c, &cell).await;
}
