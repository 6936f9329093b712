//! GetSubProcessStream: an executable's kept lines, then live lines, until
//! the channel is closed (or the executable's directory is removed, or its
//! shim died).
//!
//! The shim writes the output to files (`host::shim::format`); the reader
//! (`cells::output::OutputReader`) follows them, so a slow client only
//! falls behind in the files, never slows the executable or the daemon: if
//! it falls behind by more than is kept, it is told how many lines it
//! missed, in the stream itself.

use aurae_proto::observe::{
    GetSubProcessStreamRequest, GetSubProcessStreamResponse, LogBlock, LogItem,
};
use tokio::sync::mpsc;
use tonic::Status;

use crate::{
    logging::now_nanos,
    services::cells::output::{Batch, Channel, OutputReader, ReadEvent},
};

type Tx = mpsc::Sender<Result<GetSubProcessStreamResponse, Status>>;

/// The line sent in place of `n` lines that were rotated away.
pub(super) fn lost_note(n: u64, channel: Channel) -> String {
    format!(
        "auraed: {n} {} lines were rotated away before this reader got to them \
         (kept per channel: see --output-cap)",
        channel.as_str()
    )
}

/// Most lines one response carries, whatever the client asks for
/// (`max_lines_per_message` above it is taken as this).
pub(super) const MAX_LINES_PER_MESSAGE: u32 = 4096;

/// Most bytes of line text one batched response carries: well under gRPC's
/// default 4 MiB message limit, item overhead included (at most
/// [`MAX_LINES_PER_MESSAGE`] × ~30 bytes). A single longer line (the shim
/// splits lines at 64 KiB, so never in practice) still goes alone.
pub(super) const MAX_MESSAGE_TEXT: usize = 1 << 20;

/// Lines per response for a request's `max_lines_per_message`: 0 (absent,
/// old clients) and 1 mean one line per response, in `item`.
pub(super) fn lines_per_message(requested: u32) -> usize {
    requested.clamp(1, MAX_LINES_PER_MESSAGE) as usize
}

/// Gathers items into batched responses of at most `max_lines` items and
/// (unless one line alone is longer) `max_bytes` bytes of line text.
struct Batcher {
    max_lines: usize,
    max_bytes: usize,
    items: Vec<LogItem>,
    bytes: usize,
}

impl Batcher {
    fn new(max_lines: usize, max_bytes: usize) -> Self {
        Self {
            max_lines,
            max_bytes,
            items: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds `item`; returns the batch gathered so far when `item` does not
    /// fit in it (`item` then starts the next one). `more` is how many
    /// items are known to follow (for the next batch's capacity).
    fn push(&mut self, item: LogItem, more: usize) -> Option<Vec<LogItem>> {
        let len = item.line.len();
        let full = !self.items.is_empty()
            && (self.items.len() >= self.max_lines || self.bytes + len > self.max_bytes);
        let out = full.then(|| self.take());
        if self.items.capacity() == 0 {
            self.items.reserve_exact((more + 1).min(self.max_lines));
        }
        self.bytes += len;
        self.items.push(item);
        out
    }

    /// The batch gathered so far (None if empty).
    fn flush(&mut self) -> Option<Vec<LogItem>> {
        (!self.items.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> Vec<LogItem> {
        self.bytes = 0;
        std::mem::take(&mut self.items)
    }
}

/// How a stream's lines are put into responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// One line per response in `item` (upstream; old clients).
    One,
    /// Up to this many lines per response in `items`.
    Items(usize),
    /// Whatever the reader returned at once, as one `block`.
    Blocks,
}

impl Shape {
    pub(super) fn of(request: &GetSubProcessStreamRequest) -> Self {
        if request.line_blocks {
            return Shape::Blocks;
        }
        match lines_per_message(request.max_lines_per_message) {
            1 => Shape::One,
            n => Shape::Items(n),
        }
    }
}

/// The text of a batch as a string (invalid UTF-8 replaced; no copy when
/// it is valid).
fn lossy(text: Vec<u8>) -> String {
    String::from_utf8(text).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn lossy_line(text: &[u8]) -> String {
    String::from_utf8_lossy(text).into_owned()
}

/// A response with `batch` as one block.
fn block_of(channel: Channel, batch: Batch) -> GetSubProcessStreamResponse {
    let (text, runs) = batch.into_parts();
    let (timestamps, line_counts) = runs.into_iter().unzip();
    GetSubProcessStreamResponse {
        item: None,
        items: Vec::new(),
        block: Some(LogBlock {
            channel: channel.as_str().into(),
            text: lossy(text),
            timestamps,
            line_counts,
        }),
    }
}

/// Sends the lines `reader` returns until the end of the channel, an
/// error, or the client going away (a failed send), shaped as `shape`
/// says.
pub(super) async fn produce(mut reader: OutputReader, channel: Channel, shape: Shape, tx: Tx) {
    let item = |line: String, timestamp: i64| LogItem {
        channel: channel.as_str().into(),
        line,
        timestamp,
    };
    let one = |line: String, timestamp: i64| {
        tx.send(Ok(GetSubProcessStreamResponse {
            item: Some(item(line, timestamp)),
            ..Default::default()
        }))
    };
    let many = |items: Vec<LogItem>| {
        tx.send(Ok(GetSubProcessStreamResponse {
            items,
            ..Default::default()
        }))
    };
    let mut batch = Batcher::new(
        match shape {
            Shape::Items(n) => n,
            _ => 1,
        },
        MAX_MESSAGE_TEXT,
    );
    loop {
        let event = match reader.next().await {
            Ok(e) => e,
            Err(e) => {
                let msg = format!("reading the {} of the executable: {e}", channel.as_str());
                tracing::warn!("GetSubProcessStream: {msg}");
                let _ = tx.send(Err(Status::internal(msg))).await;
                return;
            }
        };
        match (event, shape) {
            (ReadEvent::Lines(lines), Shape::One) => {
                for (ts, text) in lines.iter() {
                    if one(lossy_line(text), ts).await.is_err() {
                        return;
                    }
                }
            }
            (ReadEvent::Lines(lines), Shape::Items(_)) => {
                let mut left = lines.len();
                for (ts, text) in lines.iter() {
                    left -= 1;
                    if let Some(b) = batch.push(item(lossy_line(text), ts), left) {
                        if many(b).await.is_err() {
                            return;
                        }
                    }
                }
                // Never hold lines back waiting for more.
                if let Some(b) = batch.flush() {
                    if many(b).await.is_err() {
                        return;
                    }
                }
            }
            (ReadEvent::Lines(lines), Shape::Blocks) => {
                if tx.send(Ok(block_of(channel, lines))).await.is_err() {
                    return;
                }
            }
            (ReadEvent::Lost(n), shape) => {
                let (line, t) = (lost_note(n, channel), now_nanos());
                let sent = match shape {
                    Shape::One => one(line, t).await,
                    Shape::Items(_) => many(vec![item(line, t)]).await,
                    Shape::Blocks => {
                        let mut b = Batch::default();
                        b.push(t, line.as_bytes());
                        tx.send(Ok(block_of(channel, b))).await
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
            (ReadEvent::End, _) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write, time::Duration};

    use super::*;
    use crate::{
        host::{proc::ProcId, shim::format},
        services::cells::output::OutputSource,
    };

    fn write_lines(path: &std::path::Path, lines: std::ops::Range<i64>) {
        let mut buf = Vec::new();
        for i in lines {
            format::encode_line(&mut buf, i, format!("line {i}").as_bytes());
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
            .write_all(&buf)
            .unwrap();
    }

    /// Writes lines `lines` as the shim does: blocks of `per_block` lines,
    /// each block stamped with its first line's number.
    fn write_blocks(path: &std::path::Path, lines: std::ops::Range<i64>, per_block: i64) {
        let mut buf = Vec::new();
        let mut i = lines.start;
        while i < lines.end {
            let at = format::begin_block(&mut buf, i);
            for k in i..(i + per_block).min(lines.end) {
                buf.extend_from_slice(format!("line {k}\n").as_bytes());
            }
            format::end_block(&mut buf, at);
            i += per_block;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
            .write_all(&buf)
            .unwrap();
    }

    fn me() -> ProcId {
        ProcId::of(i32::try_from(std::process::id()).unwrap()).unwrap()
    }

    /// Every line of a stream of blocks: (timestamp, text), checking that
    /// each block's counts add up to its lines.
    async fn block_lines(
        mut rx: mpsc::Receiver<Result<GetSubProcessStreamResponse, Status>>,
    ) -> Vec<(i64, String)> {
        let mut out = Vec::new();
        while let Some(m) = rx.recv().await {
            let m = m.unwrap();
            assert!(m.item.is_none() && m.items.is_empty());
            let b = m.block.expect("a block");
            assert_eq!(b.channel, "stdout");
            assert_eq!(b.timestamps.len(), b.line_counts.len());
            assert!(b.text.ends_with('\n') && b.text.len() < 1 << 20);
            let mut ts = b
                .timestamps
                .iter()
                .zip(&b.line_counts)
                .flat_map(|(&t, &n)| std::iter::repeat_n(t, n as usize));
            for line in b.text.split_terminator('\n') {
                out.push((ts.next().expect("a timestamp per line"), line.to_owned()));
            }
            assert!(ts.next().is_none(), "more timestamps than lines");
        }
        out
    }

    #[tokio::test]
    async fn blocks_carry_the_lines_in_order_with_their_timestamps() {
        let d = tempfile::tempdir().unwrap();
        // Lines 0..3 were rotated away; 3..5 kept as an older shim wrote
        // them, 5..1005 in blocks of 7, then one with invalid UTF-8.
        write_lines(&d.path().join("stdout.3"), 3..5);
        write_blocks(&d.path().join("stdout.3"), 5..1005, 7);
        let mut bad = Vec::new();
        let at = format::begin_block(&mut bad, 1005);
        bad.extend_from_slice(b"x\xffy\n");
        format::end_block(&mut bad, at);
        std::fs::OpenOptions::new()
            .append(true)
            .open(d.path().join("stdout.3"))
            .unwrap()
            .write_all(&bad)
            .unwrap();
        format::write_atomic(d.path(), "stdout.end", b"1006").unwrap();
        let src = OutputSource {
            dir: d.path().to_owned(),
            shim: me(),
        };
        let reader = OutputReader::open(&src, Channel::Stdout).unwrap();
        let (tx, rx) = mpsc::channel(8);
        let task = tokio::spawn(produce(reader, Channel::Stdout, Shape::Blocks, tx));
        let got = block_lines(rx).await;
        task.await.unwrap();
        assert_eq!(got.len(), 1 + 1003);
        assert_eq!(got[0].1, lost_note(3, Channel::Stdout));
        for (k, (ts, line)) in got[1..1003].iter().enumerate() {
            let n = k as i64 + 3;
            assert_eq!(line, &format!("line {n}"));
            // Format 1 lines carry their own; blocks their first line's.
            let want = if n < 5 { n } else { 5 + (n - 5) / 7 * 7 };
            assert_eq!(*ts, want, "line {n}");
        }
        assert_eq!(got[1003], (1005, "x\u{fffd}y".to_owned()));
    }

    /// A million lines in the shim's blocks, through each shape of
    /// response: all of them, in order, nothing else.
    #[tokio::test]
    async fn a_million_lines_arrive_complete_and_in_order() {
        const N: i64 = 1_000_000;
        let d = tempfile::tempdir().unwrap();
        write_blocks(&d.path().join("stdout.0"), 0..N, 4000);
        format::write_atomic(d.path(), "stdout.end", N.to_string().as_bytes()).unwrap();
        let src = OutputSource {
            dir: d.path().to_owned(),
            shim: me(),
        };
        for shape in [Shape::Blocks, Shape::Items(4096)] {
            let reader = OutputReader::open(&src, Channel::Stdout).unwrap();
            let (tx, mut rx) = mpsc::channel(8);
            let task = tokio::spawn(produce(reader, Channel::Stdout, shape, tx));
            let lines: Vec<String> = if shape == Shape::Blocks {
                block_lines(rx).await.into_iter().map(|(_, l)| l).collect()
            } else {
                let mut v = Vec::new();
                while let Some(m) = rx.recv().await {
                    let m = m.unwrap();
                    assert!(m.items.len() <= 4096);
                    v.extend(m.items.into_iter().map(|i| i.line));
                }
                v
            };
            task.await.unwrap();
            assert_eq!(lines.len(), N as usize, "{shape:?}");
            for (k, l) in lines.iter().enumerate() {
                assert_eq!(l, &format!("line {k}"), "{shape:?}");
            }
        }
    }

    #[tokio::test]
    async fn lines_and_gaps_become_messages() {
        let d = tempfile::tempdir().unwrap();
        // Lines 0..3 were rotated away; 3..5 are kept, then the end.
        write_lines(&d.path().join("stderr.3"), 3..5);
        format::write_atomic(d.path(), "stderr.end", b"5").unwrap();
        let src = OutputSource {
            dir: d.path().to_owned(),
            shim: ProcId::of(i32::try_from(std::process::id()).unwrap()).unwrap(),
        };
        let reader = OutputReader::open(&src, Channel::Stderr).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        tokio::time::timeout(
            Duration::from_secs(10),
            produce(reader, Channel::Stderr, Shape::One, tx),
        )
        .await
        .unwrap();
        let mut items = Vec::new();
        while let Some(m) = rx.recv().await {
            items.push(m.unwrap().item.unwrap());
        }
        assert_eq!(items.len(), 3);
        assert!(items.iter().all(|i| i.channel == "stderr"));
        assert_eq!(items[0].line, lost_note(3, Channel::Stderr));
        assert!(items[0]
            .line
            .starts_with("auraed: 3 stderr lines were rotated away"));
        assert!(items[0].timestamp > 1_000_000_000_000_000_000);
        assert_eq!((items[1].line.as_str(), items[1].timestamp), ("line 3", 3));
        assert_eq!((items[2].line.as_str(), items[2].timestamp), ("line 4", 4));
    }

    /// Lines through the producer into the channel, as many as the
    /// reader's throughput test (`AURAED_OUTPUT_BENCH_LINES`, 200,000).
    #[tokio::test]
    async fn producer_throughput() {
        let n: i64 = std::env::var("AURAED_OUTPUT_BENCH_LINES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        let d = tempfile::tempdir().unwrap();
        write_lines(&d.path().join("stdout.0"), 0..n);
        format::write_atomic(d.path(), "stdout.end", n.to_string().as_bytes()).unwrap();
        let src = OutputSource {
            dir: d.path().to_owned(),
            shim: ProcId::of(i32::try_from(std::process::id()).unwrap()).unwrap(),
        };
        let t = std::time::Instant::now();
        let reader = OutputReader::open(&src, Channel::Stdout).unwrap();
        let (tx, mut rx) = mpsc::channel(128);
        let task = tokio::spawn(produce(reader, Channel::Stdout, Shape::One, tx));
        let mut got = 0;
        while let Some(m) = rx.recv().await {
            assert_eq!(m.unwrap().item.unwrap().timestamp, got);
            got += 1;
        }
        task.await.unwrap();
        assert_eq!(got, n);
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{n} lines through the producer in {secs:.3} s: {:.0} lines/s",
            n as f64 / secs
        );
    }

    fn it(line: &str) -> LogItem {
        LogItem {
            channel: "stdout".into(),
            line: line.into(),
            timestamp: 0,
        }
    }

    #[test]
    fn the_request_chooses_the_shape() {
        let r = |max_lines_per_message, line_blocks| GetSubProcessStreamRequest {
            max_lines_per_message,
            line_blocks,
            ..Default::default()
        };
        assert_eq!(Shape::of(&r(0, false)), Shape::One);
        assert_eq!(Shape::of(&r(1, false)), Shape::One);
        assert_eq!(Shape::of(&r(100, false)), Shape::Items(100));
        assert_eq!(Shape::of(&r(0, true)), Shape::Blocks);
        assert_eq!(Shape::of(&r(100, true)), Shape::Blocks);
    }

    #[test]
    fn lines_per_message_defaults_to_one_and_is_capped() {
        assert_eq!(lines_per_message(0), 1);
        assert_eq!(lines_per_message(1), 1);
        assert_eq!(lines_per_message(1000), 1000);
        assert_eq!(lines_per_message(u32::MAX), MAX_LINES_PER_MESSAGE as usize);
    }

    #[test]
    fn batches_never_exceed_the_byte_cap() {
        // Cap of 10 bytes of text, 100 lines: 4-byte lines go 2 per batch.
        let mut b = Batcher::new(100, 10);
        let mut out = Vec::new();
        for i in 0..5 {
            out.extend(b.push(it(&format!("l{i:03}")), 0));
        }
        out.extend(b.flush());
        let sizes: Vec<usize> = out.iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 2, 1]);
        let lines: Vec<&str> = out.iter().flatten().map(|i| i.line.as_str()).collect();
        assert_eq!(lines, ["l000", "l001", "l002", "l003", "l004"]);
        // A line longer than the cap goes alone; exactly the cap fits.
        let mut b = Batcher::new(100, 10);
        let mut out = Vec::new();
        for l in ["a", &"x".repeat(25), "bbbbbbbbb", "c", "d"] {
            out.extend(b.push(it(l), 0));
        }
        out.extend(b.flush());
        let sizes: Vec<usize> = out.iter().map(Vec::len).collect();
        assert_eq!(sizes, [1, 1, 2, 1]);
        assert!(b.flush().is_none());
        // The real cap: 1 MiB of 64 KiB lines is 16 per message.
        let mut b = Batcher::new(4096, MAX_MESSAGE_TEXT);
        let big = "y".repeat(64 << 10);
        let mut out = Vec::new();
        for _ in 0..40 {
            out.extend(b.push(it(&big), 0));
        }
        out.extend(b.flush());
        let sizes: Vec<usize> = out.iter().map(Vec::len).collect();
        assert_eq!(sizes, [16, 16, 8]);
        assert!(out
            .iter()
            .all(|m| m.iter().map(|i| i.line.len()).sum::<usize>() <= MAX_MESSAGE_TEXT));
    }

    #[tokio::test]
    async fn batched_messages_carry_items_in_order() {
        let d = tempfile::tempdir().unwrap();
        // Lines 0..3 were rotated away; 3..2503 are kept, then the end.
        write_lines(&d.path().join("stdout.3"), 3..2503);
        format::write_atomic(d.path(), "stdout.end", b"2503").unwrap();
        let src = OutputSource {
            dir: d.path().to_owned(),
            shim: ProcId::of(i32::try_from(std::process::id()).unwrap()).unwrap(),
        };
        let reader = OutputReader::open(&src, Channel::Stdout).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let task = tokio::spawn(produce(reader, Channel::Stdout, Shape::Items(1000), tx));
        let mut msgs = Vec::new();
        while let Some(m) = rx.recv().await {
            let m = m.unwrap();
            assert!(m.item.is_none());
            assert!(!m.items.is_empty() && m.items.len() <= 1000);
            msgs.push(m.items);
        }
        task.await.unwrap();
        // The note is an item of its own message (its own event).
        assert_eq!(msgs[0].len(), 1);
        assert_eq!(msgs[0][0].line, lost_note(3, Channel::Stdout));
        let rest: Vec<LogItem> = msgs[1..].iter().flatten().cloned().collect();
        assert_eq!(rest.len(), 2500);
        for (k, i) in rest.iter().enumerate() {
            let n = k as i64 + 3;
            assert_eq!(
                (i.line.as_str(), i.timestamp),
                (format!("line {n}").as_str(), n)
            );
            assert_eq!(i.channel, "stdout");
        }
    }

    /// The same through the batched producer (1024 lines per message).
    #[tokio::test]
    async fn batched_producer_throughput() {
        let n: i64 = std::env::var("AURAED_OUTPUT_BENCH_LINES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        let d = tempfile::tempdir().unwrap();
        write_lines(&d.path().join("stdout.0"), 0..n);
        format::write_atomic(d.path(), "stdout.end", n.to_string().as_bytes()).unwrap();
        let src = OutputSource {
            dir: d.path().to_owned(),
            shim: ProcId::of(i32::try_from(std::process::id()).unwrap()).unwrap(),
        };
        let t = std::time::Instant::now();
        let reader = OutputReader::open(&src, Channel::Stdout).unwrap();
        let (tx, mut rx) = mpsc::channel(128);
        let task = tokio::spawn(produce(reader, Channel::Stdout, Shape::Items(1024), tx));
        let mut got = 0;
        while let Some(m) = rx.recv().await {
            for i in m.unwrap().items {
                assert_eq!(i.timestamp, got);
                got += 1;
            }
        }
        task.await.unwrap();
        assert_eq!(got, n);
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{n} lines through the batched producer in {secs:.3} s: {:.0} lines/s",
            n as f64 / secs
        );
    }

    #[tokio::test]
    async fn stops_when_the_client_goes_away() {
        let d = tempfile::tempdir().unwrap();
        write_lines(&d.path().join("stdout.0"), 0..1000);
        let src = OutputSource {
            dir: d.path().to_owned(),
            shim: ProcId::of(i32::try_from(std::process::id()).unwrap()).unwrap(),
        };
        let reader = OutputReader::open(&src, Channel::Stdout).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(produce(reader, Channel::Stdout, Shape::One, tx));
        let first = rx.recv().await.unwrap().unwrap().item.unwrap();
        assert_eq!(first.line, "line 0");
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the producer did not stop")
            .unwrap();
    }
}
