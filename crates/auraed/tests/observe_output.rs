//! GetSubProcessStream end to end: executables in the host context, an
//! isolated cell and a nested cell; order, volume, long lines, bad UTF-8,
//! slow and absent readers, errors. Needs root (cells).

mod common;

use std::time::{Duration, Instant};

use aurae_client::proto::observe::{GetSubProcessStreamRequest, LogChannelType};
use common::{observe::*, unique, Daemon};
use tonic::Code;

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

/// The batching extension (`max_lines_per_message = 100`): every line once,
/// in order, at most N per message in `items`, `item` unset; a request
/// without the field (an old client) still gets one line per message.
#[tokio::test]
async fn batched_output_carries_every_line_once_in_order() {
    if !is_root() {
        return skip(
            "batched_output_carries_every_line_once_in_order",
            "needs root",
        );
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let gate = d.dir.path().join("gate");
    let cmd = format!(
        "while [ ! -e {g} ]; do sleep 0.01; done; seq 1 200000",
        g = gate.display()
    );
    let pid = start(&c, None, &unique("seq"), &cmd).await;
    let mut s = c
        .observe()
        .get_sub_process_stream(GetSubProcessStreamRequest {
            max_lines_per_message: 1000,
            line_blocks: false,
            ..output_req(pid, LogChannelType::Stdout)
        })
        .await
        .expect("subscribe")
        .into_inner();
    std::fs::write(&gate, "").expect("open the gate");
    let t = Instant::now();
    let (mut n, mut msgs, mut most) = (0u32, 0u32, 0usize);
    while let Some(r) = tokio::time::timeout(STEP, s.message())
        .await
        .expect("stalled")
        .expect("stream error")
    {
        msgs += 1;
        assert!(r.item.is_none(), "item set in a batched response");
        assert!(!r.items.is_empty(), "an empty batched response");
        assert!(
            r.items.len() <= 1000,
            "{} items in one message",
            r.items.len()
        );
        most = most.max(r.items.len());
        for i in r.items {
            n += 1;
            assert_eq!(i.line, n.to_string(), "line {n}");
            assert_eq!(i.channel, "stdout");
            assert!(i.timestamp > 1_600_000_000_000_000_000, "ns timestamp");
        }
    }
    let took = t.elapsed();
    eprintln!(
        "200000 lines in {msgs} messages (at most {most} lines) in {took:?} ({:.0} lines/s)",
        f64::from(n) / took.as_secs_f64()
    );
    assert_eq!(n, 200_000);
    assert!(msgs < 200_000 / 2, "{msgs} messages: not batched");

    // An old-style request (field absent): one line per message, in `item`.
    let mut s = c
        .observe()
        .get_sub_process_stream(output_req(pid, LogChannelType::Stdout))
        .await
        .expect("subscribe")
        .into_inner();
    let mut n = 0u32;
    while let Some(r) = tokio::time::timeout(STEP, s.message())
        .await
        .expect("stalled")
        .expect("stream error")
    {
        n += 1;
        assert!(r.items.is_empty(), "items in an unbatched response");
        assert_eq!(r.item.expect("item").line, n.to_string(), "line {n}");
    }
    assert_eq!(n, 200_000);
}

/// The block extension (`line_blocks = 101`): a million lines, a line
/// longer than the shim's 64 KiB cut, invalid UTF-8 and a last line
/// without its newline all arrive, in order, each block's timestamps
/// adding up to its lines; nothing in `item` or `items`.
#[tokio::test]
async fn line_blocks_carry_every_line_once_in_order() {
    if !is_root() {
        return skip("line_blocks_carry_every_line_once_in_order", "needs root");
    }
    let d = Daemon::start().await;
    let c = d.client().await;
    let gate = d.dir.path().join("gate");
    let cmd = format!(
        "while [ ! -e {g} ]; do sleep 0.01; done; seq 1 1000000; \
         head -c 200000 /dev/zero | tr '\\0' x; echo; printf 'bad \\377'; echo; \
         printf 'no newline'",
        g = gate.display()
    );
    let pid = start(&c, None, &unique("blocks"), &cmd).await;
    let mut s = c
        .observe()
        .get_sub_process_stream(GetSubProcessStreamRequest {
            line_blocks: true,
            ..output_req(pid, LogChannelType::Stdout)
        })
        .await
        .expect("subscribe")
        .into_inner();
    std::fs::write(&gate, "").expect("open the gate");
    let t = Instant::now();
    let (mut lines, mut msgs) = (Vec::new(), 0u32);
    while let Some(r) = tokio::time::timeout(STEP, s.message())
        .await
        .expect("stalled")
        .expect("stream error")
    {
        msgs += 1;
        assert!(r.item.is_none() && r.items.is_empty(), "not a block");
        let b = r.block.expect("block");
        assert_eq!(b.channel, "stdout");
        assert!(b.text.ends_with('\n') && b.text.len() < 1 << 20);
        assert_eq!(b.timestamps.len(), b.line_counts.len());
        assert!(b.timestamps.iter().all(|&t| t > 1_600_000_000_000_000_000));
        let before = lines.len();
        lines.extend(b.text.split_terminator('\n').map(str::to_owned));
        let counted: u32 = b.line_counts.iter().sum();
        assert_eq!(
            counted as usize,
            lines.len() - before,
            "timestamps per line"
        );
    }
    eprintln!(
        "{} lines in {msgs} blocks in {:?}",
        lines.len(),
        t.elapsed()
    );
    assert_eq!(lines.len(), 1_000_000 + 4 + 2);
    for (k, l) in lines[..1_000_000].iter().enumerate() {
        assert_eq!(l, &(k + 1).to_string(), "line {}", k + 1);
    }
    let long: Vec<usize> = lines[1_000_000..1_000_004]
        .iter()
        .map(String::len)
        .collect();
    assert_eq!(long, [65536, 65536, 65536, 200_000 - 3 * 65536]);
    assert!(lines[1_000_000..1_000_004]
        .iter()
        .all(|l| l.bytes().all(|b| b == b'x')));
    assert_eq!(lines[1_000_004], "bad \u{fffd}");
    assert_eq!(lines[1_000_005], "no newline");
    assert!(msgs < 1000, "{msgs} messages: not in blocks");
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
        if r.item
            .expect("item")
            .line
            .contains("lines were rotated away")
        {
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
                max_lines_per_message: 0,
                line_blocks: false,
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

/// The runtime dir is a tmpfs (as `/run` is): an isolated cell with a
/// 64 MiB memory limit writes 160 MB of output, all of it kept
/// (`--output-cap 256M`). Kept output on the tmpfs would be unreclaimable
/// memory charged to the cell (its OOM killer took the holder); on the
/// library side it is page cache the kernel reclaims. Nothing is OOM-killed,
/// every line arrives, the tmpfs stays nearly empty.
#[tokio::test]
async fn output_on_a_tmpfs_runtime_dir_does_not_oom_the_cell() {
    use aurae_client::proto::cells::{Cell, CellServiceAllocateRequest, MemoryController};
    if !is_root() {
        return skip(
            "output_on_a_tmpfs_runtime_dir_does_not_oom_the_cell",
            "needs root",
        );
    }
    let d = Daemon::start_on_tmpfs_runtime_dir(&["--output-cap", "256M"]).await;
    let c = d.client().await;
    let name = unique("tmpfs-out");
    c.cells()
        .allocate(CellServiceAllocateRequest {
            cell: Some(Cell {
                name: name.clone(),
                isolate_process: true,
                memory: Some(MemoryController {
                    max: Some(64 << 20),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("allocate");
    const LINES: u32 = 160_000;
    let line = "x".repeat(1000);
    let pid = start(
        &c,
        Some(&name),
        &unique("chatty"),
        &format!("yes {line} | head -n {LINES}; echo done >&2"),
    )
    .await;
    let mut s = c
        .observe()
        .get_sub_process_stream(GetSubProcessStreamRequest {
            max_lines_per_message: 1000,
            ..output_req(pid, LogChannelType::Stdout)
        })
        .await
        .expect("subscribe")
        .into_inner();
    let mut n = 0u32;
    while let Some(r) = tokio::time::timeout(Duration::from_secs(60), s.message())
        .await
        .expect("stalled")
        .expect("stream error")
    {
        for i in r.items {
            n += 1;
            assert_eq!(i.line.len(), 1000, "line {n}");
        }
    }
    assert_eq!(n, LINES, "lines kept and streamed");
    assert_eq!(read_output(&c, pid, LogChannelType::Stderr).await, ["done"]);
    // The output is kept (the cap is above it), yet the tmpfs holds only
    // records: far less than the 160 MB written.
    let run = std::ffi::CString::new(d.dir.path().join("run").as_os_str().as_encoded_bytes())
        .expect("path");
    // SAFETY: a zeroed statfs is a valid out-buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and out-pointer.
    let rc = unsafe { libc::statfs(run.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statfs: {}", std::io::Error::last_os_error());
    assert_eq!(st.f_type, libc::TMPFS_MAGIC, "the runtime dir is a tmpfs");
    let used = (st.f_blocks - st.f_bfree) * st.f_bsize as u64;
    assert!(used < 8 << 20, "{used} bytes on the runtime tmpfs");
    // No OOM kill in the cell (v1: memory.oom_control, v2: memory.events).
    let root = d.cgroup_root.trim_start_matches('/');
    let (file, key) = if std::path::Path::new("/sys/fs/cgroup/memory").is_dir() {
        (
            format!("/sys/fs/cgroup/memory/{root}/{name}/memory.oom_control"),
            "oom_kill ",
        )
    } else {
        (
            format!("/sys/fs/cgroup/{root}/{name}/memory.events"),
            "oom_kill ",
        )
    };
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file}: {e}"));
    let kills: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
        .expect("oom_kill count");
    assert_eq!(kills, 0, "{file}: {text}");
    // The cell still starts executables (its holder lives).
    let again = start(&c, Some(&name), &unique("after"), "echo alive").await;
    assert_eq!(
        read_output(&c, again, LogChannelType::Stdout).await,
        ["alive"]
    );
    free(&c, &name).await;
}
