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

/// Lines kept per stream for late subscribers.
pub const OUTPUT_BACKLOG_LINES: usize = 10_000;
/// Bytes kept per stream for late subscribers.
pub const OUTPUT_BACKLOG_BYTES: usize = 8 << 20;
/// Longer lines are split into pieces of this size, never dropped.
pub const MAX_LINE: usize = 64 << 10;
/// Live lines buffered per subscriber before it starts losing the oldest.
const LIVE_CAPACITY: usize = 8192;

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
}

impl OutputStream {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            backlog: Mutex::new(Backlog::default()),
            live: broadcast::channel(LIVE_CAPACITY).0,
        })
    }

    fn push(&self, text: &[u8]) {
        let line = Line {
            timestamp: now_nanos(),
            text: String::from_utf8_lossy(text).into(),
        };
        let mut b = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        b.bytes += line.text.len();
        b.lines.push_back(line.clone());
        while b.lines.len() > OUTPUT_BACKLOG_LINES || b.bytes > OUTPUT_BACKLOG_BYTES {
            match b.lines.pop_front() {
                Some(old) => b.bytes -= old.text.len(),
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

    pub fn is_closed(&self) -> bool {
        self.backlog
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closed
    }

    pub fn subscribe(&self) -> Subscription {
        let b = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        Subscription {
            backlog: b.lines.iter().cloned().collect(),
            closed: b.closed,
            live: self.live.subscribe(),
        }
    }

    /// Reads `pipe` to its end, line by line, into this stream.
    pub async fn drain(self: Arc<Self>, pipe: impl AsyncRead + Unpin) {
        let mut reader = BufReader::with_capacity(MAX_LINE, pipe);
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
        for i in 0..OUTPUT_BACKLOG_LINES + 10 {
            s.push(format!("{i}").as_bytes());
        }
        let sub = s.subscribe();
        assert_eq!(sub.backlog.len(), OUTPUT_BACKLOG_LINES);
        assert_eq!(&*sub.backlog[0].text, "10");
    }
}
