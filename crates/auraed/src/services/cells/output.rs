//! Output of executables, read back from the files their shims write.
//!
//! Each executable's shim writes its stdout and stderr to size-capped
//! files in the executable's directory (the format is in
//! [`crate::host::shim::format`]). [`Outputs`] says, by host pid, where
//! those files are and which shim writes them; an [`OutputReader`] follows
//! one channel from the oldest kept line on, across rotations, until the
//! channel is closed (`<channel>.end`), the directory is removed, or the
//! shim died.
//!
//! # Waiting for new data
//!
//! Readers wait on one inotify instance shared by the whole process (a
//! dedicated thread reads its events and wakes a [`Notify`] per watched
//! directory; watches are refcounted per directory), not one instance per
//! reader: the default limit is 128 instances per user, and the daemon may
//! serve a thousand streams. It is a thread rather than a tokio task so that
//! it does not belong to one runtime (tests start many). Measured on a
//! 2-CPU dev VM (`latency_of_a_line_*` tests, release build, a line written
//! every 2-20 ms): written -> returned takes 65 µs median, 150 µs p99 with
//! inotify; with adaptive polling (1 ms after data, doubling to 50 ms while
//! idle) 3 ms median, 9 ms p99, and up to 50 ms after a long idle spell,
//! plus a wake-up and a few syscalls every 50 ms per idle reader (20,000
//! wake-ups a second for 1,000 idle streams), where inotify costs nothing
//! while nothing is written. Polling is the fallback
//! when inotify is unavailable (no instance, or no watch left): the reader
//! works the same, only slower to notice. Even with inotify a waiting
//! reader looks again every [`WATCHED_RECHECK`], which is how it notices a
//! shim that died without writing `.end` (nothing is written then).
//!
//! # Reading
//!
//! Files are read with plain blocking `read(2)` calls from the async task:
//! they are local files in the page cache, read in [`READ_BUFFER`] chunks,
//! at most [`BATCH_BYTES`] per call of [`OutputReader::next`], so a call
//! never blocks for long, and going through `spawn_blocking` per chunk
//! would cost more than the read itself. The file being read stays open, so
//! it remains readable after the shim unlinks it on rotation. A reader holds
//! one read buffer whatever was printed; a line longer than the buffer
//! cannot occur (the shim splits lines at [`format::MAX_LINE`]) and would
//! be cut rather than grow it.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

pub use crate::host::shim::format::Channel;
use crate::host::{proc::ProcId, shim::format};

/// Bytes read per `read(2)`; also the most a reader keeps between calls.
/// Must hold the longest stored line (timestamp, space, `MAX_LINE`, '\n').
pub const READ_BUFFER: usize = 128 << 10;
/// Stored bytes of the lines returned by one [`OutputReader::next`], at
/// most (plus one buffer's worth).
pub const BATCH_BYTES: usize = 512 << 10;
/// How often a reader woken by nothing looks again when inotify watches its
/// directory: a safety net, and when a dead shim is noticed.
pub const WATCHED_RECHECK: Duration = Duration::from_millis(500);
/// Polling (without inotify): the first wait after data, doubled while
/// nothing comes, up to [`POLL_MAX`].
pub const POLL_MIN: Duration = Duration::from_millis(1);
pub const POLL_MAX: Duration = Duration::from_millis(50);
/// How often a reader that has caught up checks that the shim still runs.
const LIVENESS_EVERY: Duration = Duration::from_millis(200);

const _: () = assert!(READ_BUFFER >= format::MAX_LINE + 32);

/// Where an executable's output is, and who writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSource {
    /// The executable's directory.
    pub dir: PathBuf,
    /// The shim writing the files: once it is gone, no more lines come.
    pub shim: ProcId,
}

/// Outputs of live executables by host pid. An entry exists from Start (or
/// re-adoption) until the executable's name is released (Stop or Free).
#[derive(Debug, Default)]
pub struct Outputs {
    by_pid: Mutex<HashMap<i32, OutputSource>>,
}

impl Outputs {
    pub fn insert(&self, pid: i32, src: OutputSource) {
        self.by_pid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pid, src);
    }

    pub fn remove(&self, pid: i32) {
        self.by_pid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
    }

    pub fn get(&self, pid: i32) -> Option<OutputSource> {
        self.by_pid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pid)
            .cloned()
    }
}

/// One output line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Nanoseconds since the Unix epoch, when the shim read it.
    pub timestamp: i64,
    /// The text, without its newline (invalid UTF-8 replaced).
    pub text: String,
}

/// Consecutive lines as they were stored: their text in one buffer (no
/// allocation per line), their timestamps run-length encoded (the shim
/// stamps all lines of one read of the pipe with the same time).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Each line's bytes followed by '\n' (as the executable wrote them:
    /// not necessarily UTF-8).
    text: Vec<u8>,
    /// (timestamp, lines) in order; never a run of 0 lines.
    runs: Vec<(i64, u32)>,
    lines: usize,
}

impl Batch {
    /// Lines in the batch.
    pub fn len(&self) -> usize {
        self.lines
    }

    pub fn is_empty(&self) -> bool {
        self.lines == 0
    }

    /// The lines' bytes, each followed by '\n'.
    pub fn text(&self) -> &[u8] {
        &self.text
    }

    /// (timestamp, number of lines) runs, in order.
    pub fn runs(&self) -> &[(i64, u32)] {
        &self.runs
    }

    /// The text (each line followed by '\n') and the runs.
    pub fn into_parts(self) -> (Vec<u8>, Vec<(i64, u32)>) {
        (self.text, self.runs)
    }

    /// (timestamp, text without newline) of each line, in order.
    pub fn iter(&self) -> impl Iterator<Item = (i64, &[u8])> + '_ {
        let mut runs = self
            .runs
            .iter()
            .flat_map(|&(ts, n)| std::iter::repeat_n(ts, n as usize));
        let mut rest = &self.text[..];
        std::iter::from_fn(move || {
            let nl = memchr::memchr(b'\n', rest)?;
            let line = &rest[..nl];
            rest = &rest[nl + 1..];
            Some((runs.next().unwrap_or(0), line))
        })
    }

    /// The lines with their text as (lossy) UTF-8.
    pub fn to_lines(&self) -> Vec<Line> {
        self.iter()
            .map(|(timestamp, t)| Line {
                timestamp,
                text: String::from_utf8_lossy(t).into_owned(),
            })
            .collect()
    }

    /// Adds one line (`text` without its newline).
    pub fn push(&mut self, timestamp: i64, text: &[u8]) {
        self.text.extend_from_slice(text);
        self.text.push(b'\n');
        self.add_run(timestamp, 1);
    }

    /// Adds `n` lines, `lines` being their bytes each followed by '\n'.
    fn push_lines(&mut self, timestamp: i64, lines: &[u8], n: u32) {
        self.text.extend_from_slice(lines);
        self.add_run(timestamp, n);
    }

    fn add_run(&mut self, timestamp: i64, n: u32) {
        self.lines += n as usize;
        match self.runs.last_mut() {
            Some((ts, k)) if *ts == timestamp && k.checked_add(n).is_some() => *k += n,
            _ => self.runs.push((timestamp, n)),
        }
    }
}

/// What [`OutputReader::next`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadEvent {
    /// The next lines, in order (never empty).
    Lines(Batch),
    /// This many lines were rotated away before the reader got to them;
    /// the lines that follow come after them.
    Lost(u64),
    /// No line follows, ever.
    End,
}

/// Follows one channel of one executable. See the module documentation.
pub struct OutputReader {
    dir: PathBuf,
    channel: Channel,
    shim: ProcId,
    /// Woken when something changes in `dir` (never, when polling).
    notify: Arc<Notify>,
    /// Keeps `dir` watched; None: polling.
    watch: Option<DirWatch>,
    poll_delay: Duration,
    /// The file being read and the seq of its first line.
    cur: Option<(u64, File)>,
    /// The file after `cur`, opened once seen: `cur` is complete then.
    next_file: Option<(u64, File)>,
    /// The seq of the next line to return.
    next_line: u64,
    /// Lines skipped when switching files, to report before anything else.
    pending_lost: u64,
    buf: Vec<u8>,
    /// Unparsed bytes (a partial line) are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Inside a block (format 2): its timestamp and the bytes of it that
    /// are not parsed yet (0: at a record boundary).
    block_ts: i64,
    block_left: usize,
    /// `.end` was seen and everything was read once more since.
    end_rechecked: bool,
    shim_dead: bool,
    last_liveness: Option<Instant>,
    done: bool,
}

enum Step {
    Event(ReadEvent),
    /// Something changed: look again at once.
    Again,
    /// Nothing to do until something is written.
    Wait,
}

/// What a look at the directory found.
enum Oldest {
    Found(u64, File),
    NoFile,
    DirGone,
}

impl OutputReader {
    /// A reader of `channel` from the oldest kept line on. Fails with
    /// `NotFound` if the directory does not exist.
    pub fn open(src: &OutputSource, channel: Channel) -> io::Result<Self> {
        Self::open_with(src, channel, true)
    }

    fn open_with(src: &OutputSource, channel: Channel, use_inotify: bool) -> io::Result<Self> {
        if !std::fs::metadata(&src.dir)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a directory", src.dir.display()),
            ));
        }
        let watch = if use_inotify {
            match DirWatch::new(&src.dir) {
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
                Err(e) => {
                    tracing::debug!(
                        "cannot watch {} ({e}); polling for output",
                        src.dir.display()
                    );
                    None
                }
            }
        } else {
            None
        };
        let notify = watch
            .as_ref()
            .map_or_else(|| Arc::new(Notify::new()), |w| w.notify.clone());
        let mut reader = Self {
            dir: src.dir.clone(),
            channel,
            shim: src.shim,
            notify,
            watch,
            poll_delay: POLL_MIN,
            cur: None,
            next_file: None,
            next_line: 0,
            pending_lost: 0,
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
            block_ts: 0,
            block_left: 0,
            end_rechecked: false,
            shim_dead: false,
            last_liveness: None,
            done: false,
        };
        // Pin the oldest file now, so the reader starts where the output
        // was when it was asked for, however late it first reads.
        if let Oldest::Found(seq, f) = reader.oldest_after(None)? {
            reader.switch_to(seq, f);
        }
        Ok(reader)
    }

    /// The next lines, a gap, or the end. Waits while there is nothing new.
    /// Cancel-safe: it only awaits while it has nothing to return.
    pub async fn next(&mut self) -> io::Result<ReadEvent> {
        loop {
            if self.done {
                self.finish();
                return Ok(ReadEvent::End);
            }
            // Registered before looking, so a change made after the look
            // wakes the wait below.
            let notify = self.notify.clone();
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.step()? {
                Step::Event(e) => {
                    match &e {
                        ReadEvent::Lines(_) => self.poll_delay = POLL_MIN,
                        ReadEvent::End => self.finish(),
                        ReadEvent::Lost(_) => {}
                    }
                    return Ok(e);
                }
                Step::Again => {}
                Step::Wait => {
                    let wait = if self.watch.as_ref().is_some_and(DirWatch::live) {
                        WATCHED_RECHECK
                    } else {
                        let d = self.poll_delay;
                        self.poll_delay = (d * 2).min(POLL_MAX);
                        d
                    };
                    let _ = tokio::time::timeout(wait, notified).await;
                }
            }
        }
    }

    fn finish(&mut self) {
        self.done = true;
        self.cur = None;
        self.next_file = None;
        self.buf = Vec::new();
        self.watch = None;
    }

    fn step(&mut self) -> io::Result<Step> {
        if self.pending_lost > 0 {
            let n = std::mem::take(&mut self.pending_lost);
            return Ok(Step::Event(ReadEvent::Lost(n)));
        }
        if self.cur.is_none() {
            return match self.oldest_after(None)? {
                Oldest::Found(seq, f) => {
                    self.switch_to(seq, f);
                    Ok(Step::Again)
                }
                Oldest::DirGone => Ok(Step::Event(ReadEvent::End)),
                Oldest::NoFile => self.idle(),
            };
        }
        let mut batch = Batch::default();
        self.read_batch(&mut batch)?;
        if !batch.is_empty() {
            return Ok(Step::Event(ReadEvent::Lines(batch)));
        }
        self.at_eof()
    }

    /// Reads from the current file until its end (for now) or a batch is
    /// full, appending complete lines.
    fn read_batch(&mut self, out: &mut Batch) -> io::Result<()> {
        loop {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                // A "line" longer than any the shim writes: cut it rather
                // than grow the buffer.
                let (ts, in_block) = (self.block_ts, self.block_left > 0);
                self.block_left = self.block_left.saturating_sub(self.end);
                push_stored(out, &self.buf[..self.end], in_block, ts);
                self.next_line += 1;
                self.end = 0;
            }
            let Some((_, file)) = self.cur.as_mut() else {
                return Ok(());
            };
            let n = match file.read(&mut self.buf[self.end..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(());
            }
            self.end += n;
            if out.text.capacity() == 0 {
                // A full read means more is likely waiting: room for a whole
                // batch at once rather than regrowing the text buffer.
                out.text.reserve(if n >= READ_BUFFER / 2 {
                    BATCH_BYTES + READ_BUFFER
                } else {
                    n
                });
            }
            self.parse(out);
            if out.text.len() >= BATCH_BYTES {
                return Ok(());
            }
        }
    }

    /// Moves the complete lines of `buf[start..end]` to `out`.
    fn parse(&mut self, out: &mut Batch) {
        let (buf, end) = (&self.buf, self.end);
        let mut pos = self.start;
        while pos < end {
            if self.block_left > 0 {
                // Inside a block: its complete lines, at once.
                let avail = &buf[pos..end.min(pos + self.block_left)];
                let Some(last) = memchr::memrchr(b'\n', avail) else {
                    break;
                };
                let lines = &avail[..=last];
                let n = memchr::memchr_iter(b'\n', lines).count();
                out.push_lines(self.block_ts, lines, n as u32);
                self.next_line += n as u64;
                self.block_left -= lines.len();
                pos += lines.len();
                continue;
            }
            let Some(nl) = memchr::memchr(b'\n', &buf[pos..end]) else {
                break;
            };
            let record = &buf[pos..pos + nl];
            pos += nl + 1;
            if record.first() == Some(&format::BLOCK) {
                if let Some((ts, len)) = format::parse_block_header(record) {
                    self.block_ts = ts;
                    self.block_left = len;
                    continue;
                }
            }
            // A line of format 1 (or a damaged header, kept as text).
            let (ts, text) = format::decode_line(record);
            out.push(ts, text);
            self.next_line += 1;
        }
        self.start = pos;
    }

    /// The current file has nothing more for now.
    fn at_eof(&mut self) -> io::Result<Step> {
        if let Some((seq, f)) = self.next_file.take() {
            // The next file exists, so the current one is complete (the shim
            // creates it after its last write to this one, and the read that
            // just hit the end came after it was seen).
            let partial = (self.start < self.end).then(|| {
                self.next_line += 1;
                let mut b = Batch::default();
                let stored = &self.buf[self.start..self.end];
                push_stored(&mut b, stored, self.block_left > 0, self.block_ts);
                b
            });
            self.switch_to(seq, f);
            return Ok(match partial {
                Some(b) => Step::Event(ReadEvent::Lines(b)),
                None => Step::Again,
            });
        }
        let cur_seq = self.cur.as_ref().map_or(0, |(seq, _)| *seq);
        // At a line boundary, past the file's first line (the next file's
        // seq is above this one's; `<channel>.<cur_seq>` is this file): has
        // the shim moved on to the next file?
        if self.start == self.end && self.next_line > cur_seq {
            let name = self.dir.join(self.channel.file(self.next_line));
            match File::open(name) {
                Ok(f) => {
                    // Read the current file once more before switching.
                    self.next_file = Some((self.next_line, f));
                    return Ok(Step::Again);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let unlinked = match &self.cur {
            Some((_, f)) => f.metadata()?.nlink() == 0,
            None => false,
        };
        if unlinked {
            // The next file is gone too (or the directory is): the shim
            // rotated past us at least twice. Go on from the oldest kept.
            let after = self.cur.as_ref().map(|(seq, _)| *seq);
            return match self.oldest_after(after)? {
                Oldest::Found(seq, f) => {
                    self.next_file = Some((seq, f));
                    Ok(Step::Again)
                }
                Oldest::NoFile | Oldest::DirGone => Ok(Step::Event(ReadEvent::End)),
            };
        }
        self.idle()
    }

    /// Nothing new to read: is the channel closed, the shim dead, or is
    /// there only to wait?
    fn idle(&mut self) -> io::Result<Step> {
        match self.read_end_marker()? {
            Some(Some(total)) if self.next_line >= total => {
                return Ok(Step::Event(ReadEvent::End));
            }
            Some(total) => {
                if !self.end_rechecked {
                    // Everything written before `.end` is visible now: look
                    // once more (the current file, the next one).
                    self.end_rechecked = true;
                    return Ok(Step::Again);
                }
                if self.cur.is_some() {
                    // Lines are missing: a newer file than the one probed?
                    let after = self.cur.as_ref().map(|(seq, _)| *seq);
                    if let Oldest::Found(seq, f) = self.oldest_after(after)? {
                        self.next_file = Some((seq, f));
                        return Ok(Step::Again);
                    }
                }
                return Ok(Step::Event(match total {
                    Some(total) if total > self.next_line => {
                        let n = total - self.next_line;
                        self.next_line = total;
                        self.done = true;
                        ReadEvent::Lost(n)
                    }
                    _ => ReadEvent::End,
                }));
            }
            None => {}
        }
        if self.shim_dead {
            // Everything was read once more since the shim was seen dead.
            return Ok(Step::Event(ReadEvent::End));
        }
        if self
            .last_liveness
            .is_none_or(|t| t.elapsed() >= LIVENESS_EVERY)
        {
            self.last_liveness = Some(Instant::now());
            if !self.shim.is_running() {
                // No `.end` will come; what the shim wrote before dying is
                // all there is: read it, then end.
                self.shim_dead = true;
                return Ok(Step::Again);
            }
        }
        // (A removed directory was noticed by the look that came first.)
        Ok(Step::Wait)
    }

    /// `Some(total)` once the channel is closed (`Some(None)` if the
    /// marker does not hold a number).
    fn read_end_marker(&self) -> io::Result<Option<Option<u64>>> {
        match std::fs::read_to_string(self.dir.join(self.channel.end_file())) {
            Ok(s) => Ok(Some(s.trim().parse().ok())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes `f` (whose first line is `seq`) the current file.
    fn switch_to(&mut self, seq: u64, f: File) {
        if seq > self.next_line {
            self.pending_lost += seq - self.next_line;
        }
        // (A file starting before `next_line` would mean the files disagree
        // with what was read; the names are the authority.)
        self.next_line = seq;
        self.cur = Some((seq, f));
        self.start = 0;
        self.end = 0;
        self.block_left = 0;
        self.end_rechecked = false;
    }

    /// Opens the oldest file of the channel whose seq is above `after`.
    fn oldest_after(&self, after: Option<u64>) -> io::Result<Oldest> {
        loop {
            let entries = match std::fs::read_dir(&self.dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Oldest::DirGone),
                Err(e) => return Err(e),
            };
            let mut oldest: Option<u64> = None;
            for entry in entries {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Oldest::DirGone),
                    Err(e) => return Err(e),
                };
                let name = entry.file_name();
                let Some(seq) = name.to_str().and_then(|n| self.channel.parse_file(n)) else {
                    continue;
                };
                if after.is_none_or(|a| seq > a) && oldest.is_none_or(|o| seq < o) {
                    oldest = Some(seq);
                }
            }
            let Some(seq) = oldest else {
                return Ok(Oldest::NoFile);
            };
            match File::open(self.dir.join(self.channel.file(seq))) {
                Ok(f) => return Ok(Oldest::Found(seq, f)),
                // Unlinked meanwhile: a newer one exists; look again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Adds stored bytes that are not a complete record (a torn write, a cut
/// overlong line) as one line: text of the block being read, or a line of
/// format 1.
fn push_stored(out: &mut Batch, stored: &[u8], in_block: bool, block_ts: i64) {
    if in_block {
        out.push(block_ts, stored);
    } else {
        let (ts, text) = format::decode_line(stored);
        out.push(ts, text);
    }
}

/// The process-wide inotify instance and the directories it watches.
struct Hub {
    watches: inotify::Watches,
    /// By watch descriptor number.
    dirs: Mutex<HashMap<i32, Watched>>,
    /// The event thread stopped: waits fall back to polling.
    broken: AtomicBool,
}

struct Watched {
    wd: inotify::WatchDescriptor,
    refs: usize,
    notify: Arc<Notify>,
}

/// What wakes readers: anything written, created or renamed in the
/// directory, and the directory's own removal.
fn watch_mask() -> inotify::WatchMask {
    use inotify::WatchMask as M;
    M::MODIFY | M::CREATE | M::MOVED_TO | M::DELETE_SELF | M::MOVE_SELF | M::ONLYDIR
}

fn hub() -> Option<&'static Arc<Hub>> {
    static HUB: OnceLock<Option<Arc<Hub>>> = OnceLock::new();
    HUB.get_or_init(|| {
        let inotify = match inotify::Inotify::init() {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("no inotify instance ({e}); output streams poll");
                return None;
            }
        };
        let hub = Arc::new(Hub {
            watches: inotify.watches(),
            dirs: Mutex::new(HashMap::new()),
            broken: AtomicBool::new(false),
        });
        let h = hub.clone();
        let spawned = std::thread::Builder::new()
            .name("auraed-inotify".into())
            .spawn(move || run_hub(&h, inotify));
        match spawned {
            Ok(_) => Some(hub),
            Err(e) => {
                tracing::warn!("cannot start the inotify thread ({e}); output streams poll");
                None
            }
        }
    })
    .as_ref()
}

fn run_hub(hub: &Hub, mut inotify: inotify::Inotify) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let events = match inotify.read_events_blocking(&mut buf) {
            Ok(events) => events,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("reading inotify events failed ({e}); output streams poll");
                hub.broken.store(true, Ordering::Relaxed);
                for w in lock(&hub.dirs).values() {
                    w.notify.notify_waiters();
                }
                return;
            }
        };
        let mut dirs = lock(&hub.dirs);
        let mut last = None;
        for e in events {
            if e.mask.contains(inotify::EventMask::Q_OVERFLOW) {
                // Events were dropped: wake everyone to look.
                for w in dirs.values() {
                    w.notify.notify_waiters();
                }
                continue;
            }
            let id = e.wd.get_watch_descriptor_id();
            if e.mask.contains(inotify::EventMask::IGNORED) {
                // The watch is gone (directory removed, or we removed it).
                if let Some(w) = dirs.remove(&id) {
                    w.notify.notify_waiters();
                }
                last = None;
                continue;
            }
            if last == Some(id) {
                continue;
            }
            last = Some(id);
            if let Some(w) = dirs.get(&id) {
                w.notify.notify_waiters();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A reference to the watch of one directory.
struct DirWatch {
    hub: &'static Hub,
    id: i32,
    notify: Arc<Notify>,
}

impl DirWatch {
    /// None when there is no inotify (poll instead).
    fn new(dir: &Path) -> io::Result<Option<Self>> {
        let Some(hub) = hub() else {
            return Ok(None);
        };
        if hub.broken.load(Ordering::Relaxed) {
            return Ok(None);
        }
        // Under the lock, so that a concurrent last drop cannot remove the
        // kernel watch between our add (which returns the existing one for
        // the same directory) and our refcount.
        let mut dirs = lock(&hub.dirs);
        let wd = hub.watches.clone().add(dir, watch_mask())?;
        let id = wd.get_watch_descriptor_id();
        let w = dirs.entry(id).or_insert_with(|| Watched {
            wd,
            refs: 0,
            notify: Arc::new(Notify::new()),
        });
        w.refs += 1;
        Ok(Some(Self {
            hub,
            id,
            notify: w.notify.clone(),
        }))
    }

    fn live(&self) -> bool {
        !self.hub.broken.load(Ordering::Relaxed)
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        let mut dirs = lock(&self.hub.dirs);
        let Some(w) = dirs.get_mut(&self.id) else {
            return;
        };
        // The entry may be a newer watch that reuses the number.
        if !Arc::ptr_eq(&w.notify, &self.notify) {
            return;
        }
        w.refs -= 1;
        if w.refs == 0 {
            if let Some(w) = dirs.remove(&self.id) {
                let _ = self.hub.watches.clone().remove(w.wd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, io::Write, time::Duration};

    use super::*;

    /// Writes a channel's files the way the shim does: encoded lines
    /// appended in chunks, a new file once the newest reaches `half_cap`
    /// (created after the last write to the previous one), then the oldest
    /// of three unlinked; `.end` written atomically.
    struct ShimWriter {
        dir: PathBuf,
        channel: Channel,
        half_cap: u64,
        file: File,
        file_bytes: u64,
        /// Complete lines written (or pending).
        lines: u64,
        files: VecDeque<u64>,
        pending: Vec<u8>,
        /// Format 2 (blocks, as today's shim) rather than format 1 (a
        /// timestamp per line, as older shims): the open block's header
        /// position in `pending` and its timestamp.
        blocks: bool,
        block: Option<(usize, i64)>,
    }

    impl ShimWriter {
        /// Writes format 1 (lines of older shims).
        fn new(dir: &Path, channel: Channel, half_cap: u64) -> Self {
            let file = File::create(dir.join(channel.file(0))).unwrap();
            Self {
                dir: dir.to_owned(),
                channel,
                half_cap,
                file,
                file_bytes: 0,
                lines: 0,
                files: VecDeque::from([0]),
                pending: Vec::new(),
                blocks: false,
                block: None,
            }
        }

        /// Writes format 2: consecutive lines with the same timestamp go
        /// into one block.
        fn blocks(dir: &Path, channel: Channel, half_cap: u64) -> Self {
            Self {
                blocks: true,
                ..Self::new(dir, channel, half_cap)
            }
        }

        fn either(blocks: bool, dir: &Path, channel: Channel, half_cap: u64) -> Self {
            if blocks {
                Self::blocks(dir, channel, half_cap)
            } else {
                Self::new(dir, channel, half_cap)
            }
        }

        fn close_block(&mut self) {
            if let Some((at, _)) = self.block.take() {
                format::end_block(&mut self.pending, at);
            }
        }

        /// Buffers one line; written by `flush` (or when a chunk is full,
        /// or the file must rotate).
        fn push(&mut self, ts: i64, text: &[u8]) {
            if self.blocks {
                if self.block.is_some_and(|(_, t)| t != ts) {
                    self.close_block();
                }
                if self.block.is_none() {
                    self.block = Some((format::begin_block(&mut self.pending, ts), ts));
                }
                self.pending.extend_from_slice(text);
                self.pending.push(b'\n');
            } else {
                format::encode_line(&mut self.pending, ts, text);
            }
            self.lines += 1;
            if self.file_bytes + self.pending.len() as u64 >= self.half_cap {
                self.flush();
                self.rotate();
            } else if self.pending.len() >= 64 << 10 {
                self.flush();
            }
        }

        fn line(&mut self, ts: i64, text: &str) {
            self.push(ts, text.as_bytes());
            self.flush();
        }

        fn flush(&mut self) {
            self.close_block();
            self.file.write_all(&self.pending).unwrap();
            self.file_bytes += self.pending.len() as u64;
            self.pending.clear();
        }

        /// Bytes that are not (yet) a whole line.
        fn raw(&mut self, bytes: &[u8]) {
            self.flush();
            self.file.write_all(bytes).unwrap();
            self.file_bytes += bytes.len() as u64;
        }

        /// Starts the next file now (unless the newest has no line yet)
        /// and drops the oldest beyond two.
        fn rotate(&mut self) {
            self.flush();
            if self.file_bytes == 0 {
                return;
            }
            self.file = File::create(self.dir.join(self.channel.file(self.lines))).unwrap();
            self.file_bytes = 0;
            self.files.push_back(self.lines);
            if self.files.len() > 2 {
                let old = self.files.pop_front().unwrap();
                std::fs::remove_file(self.dir.join(self.channel.file(old))).unwrap();
            }
        }

        fn close(&mut self) {
            self.flush();
            format::write_atomic(
                &self.dir,
                &self.channel.end_file(),
                self.lines.to_string().as_bytes(),
            )
            .unwrap();
        }
    }

    fn me() -> ProcId {
        ProcId::of(i32::try_from(std::process::id()).unwrap()).unwrap()
    }

    fn src(dir: &Path) -> OutputSource {
        OutputSource {
            dir: dir.to_owned(),
            shim: me(),
        }
    }

    fn text(i: u64) -> String {
        format!("line {i}")
    }

    /// Writes lines `range` (text `line N`, timestamp N).
    fn write_range(w: &mut ShimWriter, range: std::ops::Range<u64>) {
        for i in range {
            w.push(i as i64, text(i).as_bytes());
        }
        w.flush();
    }

    async fn next(r: &mut OutputReader) -> ReadEvent {
        tokio::time::timeout(Duration::from_secs(10), r.next())
            .await
            .expect("no event within 10 s")
            .expect("read failed")
    }

    /// Reads lines `range`, in order, in however many batches.
    async fn expect_range(r: &mut OutputReader, range: std::ops::Range<u64>) {
        let mut i = range.start;
        while i < range.end {
            match next(r).await {
                ReadEvent::Lines(lines) => {
                    for l in lines.to_lines() {
                        assert_eq!(l.text, text(i), "line {i}");
                        assert_eq!(l.timestamp, i as i64);
                        i += 1;
                    }
                }
                e => panic!("expected line {i}, got {e:?}"),
            }
        }
        assert_eq!(i, range.end, "read past the range");
    }

    fn lines_of(e: ReadEvent) -> Vec<Line> {
        match e {
            ReadEvent::Lines(b) => b.to_lines(),
            e => panic!("expected lines, got {e:?}"),
        }
    }

    async fn nothing_for(r: &mut OutputReader, ms: u64) {
        if let Ok(e) = tokio::time::timeout(Duration::from_millis(ms), r.next()).await {
            panic!("expected nothing, got {e:?}");
        }
    }

    #[tokio::test]
    async fn lines_in_order_with_timestamps_then_end() {
        let d = tempfile::tempdir().unwrap();
        let mut w = ShimWriter::new(d.path(), Channel::Stdout, 1 << 20);
        w.line(11, "hello world");
        w.line(12, "");
        w.push(13, b"x\xffy");
        w.close();
        let mut r = OutputReader::open(&src(d.path()), Channel::Stdout).unwrap();
        let want = [(11, "hello world"), (12, ""), (13, "x\u{fffd}y")];
        let want: Vec<Line> = want
            .iter()
            .map(|(ts, t)| Line {
                timestamp: *ts,
                text: (*t).into(),
            })
            .collect();
        assert_eq!(lines_of(next(&mut r).await), want);
        assert_eq!(next(&mut r).await, ReadEvent::End);
        assert_eq!(next(&mut r).await, ReadEvent::End);
        // The other channel has no file at all and no end yet: waits.
        let mut e = OutputReader::open(&src(d.path()), Channel::Stderr).unwrap();
        nothing_for(&mut e, 50).await;
        ShimWriter::new(d.path(), Channel::Stderr, 1 << 20).close();
        assert_eq!(next(&mut e).await, ReadEvent::End);
    }

    #[tokio::test]
    async fn a_partial_line_waits_for_its_newline() {
        for inotify in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let mut w = ShimWriter::new(d.path(), Channel::Stderr, 1 << 20);
            let mut r = OutputReader::open_with(&src(d.path()), Channel::Stderr, inotify).unwrap();
            w.raw(b"5 hel");
            nothing_for(&mut r, 100).await;
            w.raw(b"lo");
            nothing_for(&mut r, 20).await;
            w.raw(b"\n6 wor");
            let want = Line {
                timestamp: 5,
                text: "hello".into(),
            };
            assert_eq!(lines_of(next(&mut r).await), [want]);
            w.raw(b"ld\n");
            let want = Line {
                timestamp: 6,
                text: "world".into(),
            };
            assert_eq!(lines_of(next(&mut r).await), [want]);
        }
    }

    #[tokio::test]
    async fn blocks_and_old_lines_mix_and_a_partial_block_line_waits() {
        let d = tempfile::tempdir().unwrap();
        // A file an older shim began (format 1), continued in blocks.
        let mut w = ShimWriter::new(d.path(), Channel::Stdout, 1 << 20);
        w.line(1, "old");
        let mut r = OutputReader::open(&src(d.path()), Channel::Stdout).unwrap();
        let mut block = Vec::new();
        let at = format::begin_block(&mut block, 50);
        block.extend_from_slice(b"a\nb\n\x1e0 3\nc\xff\n");
        format::end_block(&mut block, at);
        // The header and the first line and a half, then the rest.
        w.raw(&block[..format::BLOCK_HEADER_LEN + 3]);
        let l = |timestamp, text: &str| Line {
            timestamp,
            text: text.into(),
        };
        assert_eq!(lines_of(next(&mut r).await), [l(1, "old"), l(50, "a")]);
        nothing_for(&mut r, 30).await;
        w.raw(&block[format::BLOCK_HEADER_LEN + 3..]);
        // A line inside a block that looks like a header is text.
        let want = [l(50, "b"), l(50, "\x1e0 3"), l(50, "c\u{fffd}")];
        assert_eq!(lines_of(next(&mut r).await), want);
        w.line(60, "old again");
        assert_eq!(lines_of(next(&mut r).await), [l(60, "old again")]);
        nothing_for(&mut r, 20).await;
        // Four lines, one block: one run.
        let mut w2 = ShimWriter::blocks(d.path(), Channel::Stderr, 1 << 20);
        for t in ["w", "x", "y", "z"] {
            w2.push(70, t.as_bytes());
        }
        w2.close();
        let mut e = OutputReader::open(&src(d.path()), Channel::Stderr).unwrap();
        let ReadEvent::Lines(b) = next(&mut e).await else {
            panic!("expected lines");
        };
        assert_eq!(
            (b.len(), b.text(), b.runs()),
            (4, &b"w\nx\ny\nz\n"[..], &[(70, 4)][..])
        );
        assert_eq!(next(&mut e).await, ReadEvent::End);
    }

    #[tokio::test]
    async fn follows_a_growing_file() {
        for (inotify, blocks) in [(true, false), (false, false), (true, true), (false, true)] {
            let d = tempfile::tempdir().unwrap();
            let mut w = ShimWriter::either(blocks, d.path(), Channel::Stdout, 1 << 20);
            let mut r = OutputReader::open_with(&src(d.path()), Channel::Stdout, inotify).unwrap();
            let writer = std::thread::spawn(move || {
                for k in 0..20 {
                    write_range(&mut w, k * 10..k * 10 + 10);
                    std::thread::sleep(Duration::from_millis(3));
                }
                w.close();
            });
            expect_range(&mut r, 0..200).await;
            assert_eq!(next(&mut r).await, ReadEvent::End);
            writer.join().unwrap();
        }
    }

    #[tokio::test]
    async fn rotation_while_reading_loses_and_repeats_nothing() {
        for blocks in [false, true] {
            rotation_while_reading(blocks).await;
        }
    }

    async fn rotation_while_reading(blocks: bool) {
        let d = tempfile::tempdir().unwrap();
        // About 14 lines per file (5 with blocks): many rotations, the
        // reader never more than one file behind.
        let mut w = ShimWriter::either(blocks, d.path(), Channel::Stdout, 200);
        let mut r = OutputReader::open(&src(d.path()), Channel::Stdout).unwrap();
        let mut written = 0;
        for round in 0..60u64 {
            let n = 1 + round % 9;
            write_range(&mut w, written..written + n);
            expect_range(&mut r, written..written + n).await;
            written += n;
            if round % 7 == 0 {
                // Rotation right at the reader's position.
                w.rotate();
            }
        }
        assert!(w.files.back().copied().unwrap_or(0) > 200, "{:?}", w.files);
        w.close();
        assert_eq!(next(&mut r).await, ReadEvent::End);
    }

    #[tokio::test]
    async fn a_reader_behind_two_rotations_gets_the_exact_loss() {
        for blocks in [false, true] {
            behind_two_rotations(blocks).await;
        }
    }

    async fn behind_two_rotations(blocks: bool) {
        let d = tempfile::tempdir().unwrap();
        let mut w = ShimWriter::either(blocks, d.path(), Channel::Stdout, 1 << 20);
        write_range(&mut w, 0..5);
        let mut r = OutputReader::open(&src(d.path()), Channel::Stdout).unwrap();
        expect_range(&mut r, 0..5).await;
        // The reader is in the middle of stdout.0; the shim goes on to
        // stdout.10 and stdout.20 (unlinking stdout.0), then to stdout.30
        // (unlinking stdout.10).
        write_range(&mut w, 5..10);
        w.rotate();
        write_range(&mut w, 10..20);
        w.rotate();
        write_range(&mut w, 20..30);
        w.rotate();
        write_range(&mut w, 30..35);
        assert_eq!(Vec::from(w.files.clone()), [20, 30]);
        // The rest of the unlinked stdout.0 is still read through its fd.
        expect_range(&mut r, 5..10).await;
        assert_eq!(next(&mut r).await, ReadEvent::Lost(10));
        expect_range(&mut r, 20..35).await;
        nothing_for(&mut r, 30).await;
        write_range(&mut w, 35..40);
        w.close();
        expect_range(&mut r, 35..40).await;
        assert_eq!(next(&mut r).await, ReadEvent::End);
    }

    #[tokio::test]
    async fn a_new_reader_after_rotation_is_told_what_it_missed() {
        let d = tempfile::tempdir().unwrap();
        let mut w = ShimWriter::new(d.path(), Channel::Stdout, 1 << 20);
        write_range(&mut w, 0..10);
        w.rotate();
        write_range(&mut w, 10..20);
        w.rotate();
        write_range(&mut w, 20..25);
        let mut r = OutputReader::open(&src(d.path()), Channel::Stdout).unwrap();
        assert_eq!(next(&mut r).await, ReadEvent::Lost(10));
        expect_range(&mut r, 10..25).await;
        w.close();
        assert_eq!(next(&mut r).await, ReadEvent::End);
    }

    #[tokio::test]
    async fn end_comes_when_the_channel_closes() {
        let d = tempfile::tempdir().unwrap();
        let mut w = ShimWriter::new(d.path(), Channel::Stdout, 1 << 20);
        let mut r = OutputReader::open(&src(d.path()), Channel::Stdout).unwrap();
        write_range(&mut w, 0..3);
        expect_range(&mut r, 0..3).await;
        let waiting = tokio::spawn(async move {
            let e = next(&mut r).await;
            (e, next(&mut r).await)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The last line and the marker right after it: the line first.
        write_range(&mut w, 3..4);
        w.close();
        let (first, second) = waiting.await.unwrap();
        let line = Line {
            timestamp: 3,
            text: text(3),
        };
        assert_eq!(lines_of(first), [line]);
        assert_eq!(second, ReadEvent::End);
    }

    /// The shim creates a channel's first file with its first line: a
    /// reader before it waits, and a silent channel ends at its marker.
    #[tokio::test]
    async fn a_channel_without_a_file_waits_then_reads_or_ends() {
        let d = tempfile::tempdir().unwrap();
        let mut r = OutputReader::open(&src(d.path()), Channel::Stdout).unwrap();
        let mut e = OutputReader::open(&src(d.path()), Channel::Stderr).unwrap();
        nothing_for(&mut r, 50).await;
        let mut w = ShimWriter::new(d.path(), Channel::Stdout, 1 << 20);
        write_range(&mut w, 0..2);
        expect_range(&mut r, 0..2).await;
        w.close();
        assert_eq!(next(&mut r).await, ReadEvent::End);
        format::write_atomic(d.path(), &Channel::Stderr.end_file(), b"0").unwrap();
        assert_eq!(next(&mut e).await, ReadEvent::End);
    }

    #[tokio::test]
    async fn end_comes_when_the_directory_is_removed() {
        for inotify in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let dir = d.path().join("exec");
            std::fs::create_dir(&dir).unwrap();
            let mut w = ShimWriter::new(&dir, Channel::Stdout, 1 << 20);
            write_range(&mut w, 0..3);
            let mut r = OutputReader::open_with(&src(&dir), Channel::Stdout, inotify).unwrap();
            expect_range(&mut r, 0..3).await;
            // Also a reader that has not found a file yet.
            let mut e = OutputReader::open_with(&src(&dir), Channel::Stderr, inotify).unwrap();
            nothing_for(&mut r, 20).await;
            let t = Instant::now();
            std::fs::remove_dir_all(&dir).unwrap();
            assert_eq!(next(&mut r).await, ReadEvent::End);
            assert_eq!(next(&mut e).await, ReadEvent::End);
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            let gone = OutputReader::open(&src(&dir), Channel::Stdout).err();
            assert_eq!(gone.map(|e| e.kind()), Some(io::ErrorKind::NotFound));
        }
    }

    #[tokio::test]
    async fn end_comes_after_what_a_dead_shim_wrote() {
        let d = tempfile::tempdir().unwrap();
        let mut w = ShimWriter::new(d.path(), Channel::Stdout, 1 << 20);
        write_range(&mut w, 0..10);
        w.rotate();
        write_range(&mut w, 10..13);
        w.raw(b"13 never finish");
        let dead = ProcId {
            start: me().start + 1,
            ..me()
        };
        let s = OutputSource {
            dir: d.path().to_owned(),
            shim: dead,
        };
        let mut r = OutputReader::open(&s, Channel::Stdout).unwrap();
        expect_range(&mut r, 0..13).await;
        assert_eq!(next(&mut r).await, ReadEvent::End);
        // No file at all.
        let mut e = OutputReader::open(&s, Channel::Stderr).unwrap();
        assert_eq!(next(&mut e).await, ReadEvent::End);
    }

    #[tokio::test]
    async fn readers_share_one_watch_per_directory() {
        let d = tempfile::tempdir().unwrap();
        let mut w = ShimWriter::new(d.path(), Channel::Stdout, 1 << 20);
        let mut readers: Vec<OutputReader> = (0..100)
            .map(|_| OutputReader::open(&src(d.path()), Channel::Stdout).unwrap())
            .collect();
        assert!(
            readers.iter().all(|r| r.watch.is_some()),
            "no inotify here?"
        );
        let n = |h: &Hub| {
            lock(&h.dirs)
                .get(&readers[0].watch.as_ref().unwrap().id)
                .map(|w| w.refs)
        };
        let h = hub().unwrap();
        assert_eq!(n(h), Some(100));
        write_range(&mut w, 0..2);
        for r in &mut readers {
            expect_range(r, 0..2).await;
        }
        let id = readers[0].watch.as_ref().unwrap().id;
        drop(readers);
        assert!(lock(&h.dirs).get(&id).is_none());
    }

    /// Writes one line at a time to a waiting reader; returns how long
    /// each took to come out (median, p99, max).
    async fn latency(inotify: bool) -> (Duration, Duration, Duration) {
        const N: u64 = 100;
        let d = tempfile::tempdir().unwrap();
        let mut w = ShimWriter::new(d.path(), Channel::Stdout, 1 << 20);
        let mut r = OutputReader::open_with(&src(d.path()), Channel::Stdout, inotify).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let writer = std::thread::spawn(move || {
            for i in 0..N {
                // Idle spells of 2..20 ms: the reader is waiting each time
                // (unless it is slower than that).
                std::thread::sleep(Duration::from_micros(2000 + (i * 7919) % 18000));
                let t = Instant::now();
                write_range(&mut w, i..i + 1);
                let _ = tx.send(t);
            }
        });
        let mut took = Vec::new();
        while (took.len() as u64) < N {
            let lines = lines_of(next(&mut r).await);
            let done = Instant::now();
            for l in lines {
                assert_eq!(l.text, text(took.len() as u64));
                let t = rx.recv().await.unwrap();
                took.push(done.saturating_duration_since(t));
            }
        }
        writer.join().unwrap();
        took.sort();
        (took[50], took[98], took[99])
    }

    #[tokio::test]
    async fn latency_of_a_line_with_inotify() {
        let (median, p99, max) = latency(true).await;
        println!("inotify: line written -> returned: median {median:?}, p99 {p99:?}, max {max:?}");
        assert!(median < Duration::from_millis(20), "{median:?}");
    }

    #[tokio::test]
    async fn latency_of_a_line_with_polling() {
        let (median, p99, max) = latency(false).await;
        println!("polling: line written -> returned: median {median:?}, p99 {p99:?}, max {max:?}");
        assert!(median < POLL_MAX + Duration::from_millis(20), "{median:?}");
    }

    /// Reads everything until End, checking the order (each line ends with
    /// its number); returns lines read and lines reported lost.
    async fn read_all(r: &mut OutputReader) -> (u64, u64) {
        let (mut i, mut lost) = (0, 0);
        loop {
            match tokio::time::timeout(Duration::from_secs(60), r.next())
                .await
                .expect("stalled")
                .expect("read failed")
            {
                ReadEvent::Lines(lines) => {
                    for (_, l) in lines.iter() {
                        let l = std::str::from_utf8(l).unwrap();
                        let n = l.rsplit(' ').next().and_then(|n| n.parse().ok());
                        assert_eq!(n, Some(i + lost), "{l:?}");
                        i += 1;
                    }
                }
                ReadEvent::Lost(n) => lost += n,
                ReadEvent::End => return (i, lost),
            }
        }
    }

    fn count() -> u64 {
        std::env::var("AURAED_OUTPUT_BENCH_LINES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000)
    }

    /// Reads `n` lines made by `make` written beforehand (the reader
    /// alone), then while a writer thread writes them with rotations at
    /// 16 MiB per file (a real shim is another process; this writer shares
    /// the test's CPUs). Prints lines/s and MiB/s.
    async fn throughput(what: &str, n: u64, make: fn(u64) -> String) {
        let d = tempfile::tempdir().unwrap();
        let mut w = ShimWriter::blocks(d.path(), Channel::Stdout, u64::MAX);
        for i in 0..n {
            w.push(0, make(i).as_bytes());
        }
        w.close();
        let bytes = std::fs::metadata(d.path().join("stdout.0")).unwrap().len() as f64;
        let t = Instant::now();
        let mut r = OutputReader::open(&src(d.path()), Channel::Stdout).unwrap();
        assert_eq!(read_all(&mut r).await, (n, 0));
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{what}: read {n} written lines in {secs:.3} s: {:.0} lines/s, {:.0} MiB/s",
            n as f64 / secs,
            bytes / secs / f64::from(1 << 20)
        );
        drop(d);

        let d = tempfile::tempdir().unwrap();
        let mut w = ShimWriter::blocks(d.path(), Channel::Stdout, 16 << 20);
        let mut r = OutputReader::open(&src(d.path()), Channel::Stdout).unwrap();
        let t = Instant::now();
        let writer = std::thread::spawn(move || {
            for i in 0..n {
                w.push(0, make(i).as_bytes());
            }
            w.close();
            t.elapsed()
        });
        let (read, lost) = read_all(&mut r).await;
        let secs = t.elapsed().as_secs_f64();
        let wrote = writer.join().unwrap().as_secs_f64();
        assert_eq!(read + lost, n);
        println!(
            "{what}: followed a writer of {n} lines (it took {wrote:.3} s): {read} read, {lost} \
             lost, in {secs:.3} s: {:.0} lines/s, {:.0} MiB/s",
            n as f64 / secs,
            bytes / secs / f64::from(1 << 20)
        );
    }

    /// `AURAED_OUTPUT_BENCH_LINES` short lines, default 200,000 (keep the
    /// debug run fast; in release: `AURAED_OUTPUT_BENCH_LINES=10000000
    /// cargo test --release -p auraed --lib -- throughput --nocapture`).
    #[tokio::test]
    async fn throughput_of_short_lines() {
        throughput("short lines", count(), |i| format!("short line {i}")).await;
    }

    /// A tenth as many 1 KiB lines (1,000,000: about 1 GiB).
    #[tokio::test]
    async fn throughput_of_long_lines() {
        throughput("1 KiB lines", count() / 10, |i| format!("{i:>1024}")).await;
    }
}
