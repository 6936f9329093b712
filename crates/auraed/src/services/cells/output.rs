//! Captured output of executables: one task drains each pipe (so a child
//! never blocks on a full pipe, watched or not) into an [`OutputStream`]: a
//! bounded backlog plus a broadcast of live lines. `ObserveService`
//! subscribes by host pid through [`Outputs`].

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    sync::broadcast,
};

use crate::logging::now_nanos;

/// Lines kept per stream for late (and lagging) subscribers.
pub const OUTPUT_BACKLOG_LINES: usize = 128 << 10;
/// Bytes kept per stream for late (and lagging) subscribers, counting
/// [`LINE_OVERHEAD`] per line so that many short lines are bounded too.
pub const OUTPUT_BACKLOG_BYTES: usize = 8 << 20;
/// What one kept line costs besides its text (Arc header, timestamp, seq,
/// deque slot), for the byte bound.
const LINE_OVERHEAD: usize = 64;
/// Longer lines are split into pieces of this size, never dropped.
pub const MAX_LINE: usize = 64 << 10;
/// Live lines buffered per subscriber; one that falls further behind
/// catches up from the backlog by sequence number. Kept small because the
/// broadcast channel allocates every slot up front, per stream.
const LIVE_CAPACITY: usize = 256;
/// Read buffer per pipe (longer lines are assembled across reads).
const READ_BUFFER: usize = 16 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Stdout,
    Stderr,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Stdout => "stdout",
            Channel::Stderr => "stderr",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Line {
    /// Position in this stream (0, 1, 2, ...): a subscriber that lagged
    /// behind the live channel resumes from the backlog by it.
    pub seq: u64,
    /// Nanoseconds since the Unix epoch, when the daemon read it.
    pub timestamp: i64,
    pub text: Arc<str>,
}

/// What a live subscriber receives.
#[derive(Debug, Clone)]
pub enum Event {
    Line(Line),
    /// The process closed its end of the pipe; nothing follows.
    End,
}

#[derive(Debug, Default)]
struct Backlog {
    lines: VecDeque<Line>,
    bytes: usize,
    closed: bool,
    /// The seq of the next line pushed.
    next_seq: u64,
}

/// One channel (stdout or stderr) of one executable.
#[derive(Debug)]
pub struct OutputStream {
    backlog: Mutex<Backlog>,
    live: broadcast::Sender<Event>,
}

/// A subscription: the backlog so far, then live events (unless `closed`).
pub struct Subscription {
    pub backlog: Vec<Line>,
    pub closed: bool,
    pub live: broadcast::Receiver<Event>,
    /// The seq of the first line not in `backlog`.
    pub next_seq: u64,
}

/// Lines read from the backlog by seq ([`OutputStream::read_from`]).
pub struct Since {
    /// Lines between the requested seq and the oldest kept one: gone.
    pub lost: u64,
    pub lines: Vec<Line>,
    /// The seq after the last line returned.
    pub next_seq: u64,
    /// No line follows `lines` and none ever will.
    pub closed: bool,
}

impl OutputStream {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            backlog: Mutex::new(Backlog::default()),
            live: broadcast::channel(LIVE_CAPACITY).0,
        })
    }

    fn push(&self, text: &[u8]) {
        let text: Arc<str> = String::from_utf8_lossy(text).into();
        let mut b = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        let line = Line {
            seq: b.next_seq,
            timestamp: now_nanos(),
            text,
        };
        b.next_seq += 1;
        b.bytes += line.text.len() + LINE_OVERHEAD;
        b.lines.push_back(line.clone());
        while b.lines.len() > OUTPUT_BACKLOG_LINES || b.bytes > OUTPUT_BACKLOG_BYTES {
            match b.lines.pop_front() {
                Some(old) => b.bytes -= old.text.len() + LINE_OVERHEAD,
                None => break,
            }
        }
        // Sent under the lock so a subscriber sees each line exactly once.
        let _ = self.live.send(Event::Line(line));
    }

    fn close(&self) {
        let mut b = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        b.closed = true;
        let _ = self.live.send(Event::End);
    }

    pub fn subscribe(&self) -> Subscription {
        let b = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        Subscription {
            backlog: b.lines.iter().cloned().collect(),
            closed: b.closed,
            live: self.live.subscribe(),
            next_seq: b.next_seq,
        }
    }

    /// Up to `max` kept lines from `seq` on, and how many lines from `seq`
    /// were already dropped from the backlog. Observe uses it to catch up a
    /// subscriber that lagged behind the live channel.
    pub fn read_from(&self, seq: u64, max: usize) -> Since {
        let b = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        let first = b.lines.front().map_or(b.next_seq, |l| l.seq);
        let start = seq.max(first);
        let skip = usize::try_from(start - first).unwrap_or(usize::MAX);
        let lines: Vec<Line> = b.lines.iter().skip(skip).take(max).cloned().collect();
        let next_seq = lines.last().map_or(start, |l| l.seq + 1);
        Since {
            lost: start - seq.min(start),
            closed: b.closed && next_seq == b.next_seq,
            next_seq,
            lines,
        }
    }

    /// Reads `pipe` to its end, line by line, into this stream.
    pub async fn drain(self: Arc<Self>, pipe: impl AsyncRead + Unpin) {
        let mut reader = BufReader::with_capacity(READ_BUFFER, pipe);
        let mut partial: Vec<u8> = Vec::new();
        loop {
            let buf = match reader.fill_buf().await {
                Ok([]) | Err(_) => break,
                Ok(buf) => buf,
            };
            let mut used = 0;
            while let Some(nl) = buf[used..].iter().position(|&c| c == b'\n') {
                let piece = &buf[used..used + nl];
                if partial.is_empty() {
                    self.push_split(piece);
                } else {
                    partial.extend_from_slice(piece);
                    self.push_split(&partial);
                    partial.clear();
                }
                used += nl + 1;
            }
            partial.extend_from_slice(&buf[used..]);
            let len = buf.len();
            reader.consume(len);
            // A line longer than the limit is emitted in pieces.
            while partial.len() >= MAX_LINE {
                let rest = partial.split_off(MAX_LINE);
                self.push(&partial);
                partial = rest;
            }
        }
        if !partial.is_empty() {
            self.push_split(&partial);
        }
        self.close();
    }

    fn push_split(&self, line: &[u8]) {
        if line.is_empty() {
            return self.push(line);
        }
        for chunk in line.chunks(MAX_LINE) {
            self.push(chunk);
        }
    }
}

/// Both channels of one executable.
#[derive(Debug)]
pub struct ProcessOutput {
    pub stdout: Arc<OutputStream>,
    pub stderr: Arc<OutputStream>,
}

impl ProcessOutput {
    pub fn channel(&self, c: Channel) -> &Arc<OutputStream> {
        match c {
            Channel::Stdout => &self.stdout,
            Channel::Stderr => &self.stderr,
        }
    }
}

/// Outputs of live executables by host pid. An entry exists from Start
/// until the executable's name is released (Stop or Free).
#[derive(Debug, Default)]
pub struct Outputs {
    by_pid: Mutex<HashMap<i32, Arc<ProcessOutput>>>,
}

impl Outputs {
    pub fn insert(&self, pid: i32, out: Arc<ProcessOutput>) {
        self.by_pid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pid, out);
    }
    pub fn remove(&self, pid: i32) {
        self.by_pid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
    }
    pub fn get(&self, pid: i32) -> Option<Arc<ProcessOutput>> {
        self.by_pid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pid)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(input: &'static [u8]) -> Vec<String> {
        let s = OutputStream::new();
        s.clone().drain(input).await;
        let sub = s.subscribe();
        assert!(sub.closed);
        sub.backlog.iter().map(|l| l.text.to_string()).collect()
    }

    #[tokio::test]
    async fn splits_lines_keeps_order_and_replaces_bad_utf8() {
        assert_eq!(collect(b"a\nb\n\nc").await, ["a", "b", "", "c"]);
        assert_eq!(collect(b"x\xffy\n").await, ["x\u{fffd}y"]);
    }

    #[tokio::test]
    async fn long_lines_are_split_not_dropped() {
        let long: &'static [u8] = Box::leak(vec![b'z'; MAX_LINE * 2 + 5].into_boxed_slice());
        let lines = collect(long).await;
        assert_eq!(
            lines.iter().map(String::len).collect::<Vec<_>>(),
            [MAX_LINE, MAX_LINE, 5]
        );
    }

    #[tokio::test]
    async fn backlog_is_bounded() {
        let s = OutputStream::new();
        // Empty lines: the line bound binds before the byte bound.
        for _ in 0..OUTPUT_BACKLOG_LINES + 10 {
            s.push(b"");
        }
        let sub = s.subscribe();
        assert_eq!(sub.backlog.len(), OUTPUT_BACKLOG_LINES);
        assert_eq!(sub.backlog[0].seq, 10);
        assert_eq!(sub.next_seq, (OUTPUT_BACKLOG_LINES + 10) as u64);
        let r = s.read_from(3, 5);
        assert_eq!(r.lost, 7);
        assert_eq!(r.lines.len(), 5);
        assert_eq!(r.lines[0].seq, 10);
        assert_eq!(r.next_seq, 15);
        assert!(!r.closed);
        let end = s.read_from(sub.next_seq, 5);
        assert!(end.lines.is_empty() && end.lost == 0);
        s.close();
        assert!(s.read_from(sub.next_seq, 5).closed);
    }

    #[test]
    fn many_short_lines_are_bounded_by_bytes() {
        let s = OutputStream::new();
        for _ in 0..OUTPUT_BACKLOG_LINES {
            s.push(&[b'x'; 100]);
        }
        let sub = s.subscribe();
        let bytes: usize = sub
            .backlog
            .iter()
            .map(|l| l.text.len() + LINE_OVERHEAD)
            .sum();
        assert!(bytes <= OUTPUT_BACKLOG_BYTES, "{bytes}");
        assert!(sub.backlog.len() < OUTPUT_BACKLOG_LINES);
    }
}
