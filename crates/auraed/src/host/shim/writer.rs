//! One output channel of an executable, as the shim writes it: bytes from
//! the pipe cut into lines, each read's lines one block stamped with the
//! time of the read, appended to `<channel>.<seq>` files in the
//! executable's directory, rotated at half the cap (see [`format`]).
//!
//! Writing never stops reading: if a write fails, the lines are dropped
//! (still counted), the failure is reported once on stderr, and the next
//! lines go to a new file named after the number of its first line, so
//! that file names keep telling a reader which lines it has.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    rc::Rc,
};

use super::format::{self, Channel};

/// Buffered bytes that trigger a write before the end of a poll round.
const FLUSH_AT: usize = 64 << 10;

pub(super) struct Output {
    dir: Rc<OwnedFd>,
    channel: Channel,
    /// Rotate once the current file holds this many bytes.
    half_cap: u64,
    /// The current file; None after a failed write (or open).
    file: Option<File>,
    /// Seq (name) of the current file and of the previous one.
    cur: u64,
    prev: Option<u64>,
    /// Bytes in the current file.
    size: u64,
    /// Lines made so far (the seq of the next line).
    seq: u64,
    /// Lines written (or dropped): `buf` holds lines `flushed..seq`.
    flushed: u64,
    /// Encoded records not written yet (see [`format`]).
    buf: Vec<u8>,
    /// Where the header of the block being filled is in `buf`.
    block: Option<usize>,
    /// The start of a line whose newline has not come yet.
    partial: Vec<u8>,
    /// A failure was reported and nothing has been written since.
    failing: bool,
    ended: bool,
}

impl Output {
    /// A channel with no file yet: `<channel>.0` is created by the first
    /// flush that has lines, so an executable that writes nothing to a
    /// channel costs no file (readers take a missing file as no lines; a
    /// file creation is an inode allocation, 0.1-0.3 ms on this VM's ext4,
    /// see README "Why we are fast").
    pub fn new(dir: Rc<OwnedFd>, channel: Channel, cap: u64) -> io::Result<Self> {
        Ok(Self {
            dir,
            channel,
            half_cap: cap.max(format::MIN_OUTPUT_CAP) / 2,
            file: None,
            cur: 0,
            prev: None,
            size: 0,
            seq: 0,
            flushed: 0,
            buf: Vec::new(),
            block: None,
            partial: Vec::new(),
            failing: false,
            ended: false,
        })
    }

    /// Takes bytes read from the pipe at `now` (nanoseconds since the
    /// epoch): its complete lines become one block stamped `now`.
    pub fn feed(&mut self, data: &[u8], now: i64) {
        let Some(last) = memchr::memrchr(b'\n', data) else {
            self.push_partial(data, now);
            self.close_block();
            return;
        };
        let (mut lines, rest) = data.split_at(last + 1);
        if !self.partial.is_empty() {
            // The first newline completes the line begun before.
            let nl = memchr::memchr(b'\n', lines).unwrap_or(lines.len() - 1);
            self.push_partial(&lines[..nl], now);
            let line = std::mem::take(&mut self.partial);
            self.emit(&line, now);
            self.partial = line;
            self.partial.clear();
            lines = &lines[nl + 1..];
        }
        self.emit_lines(lines, now);
        self.push_partial(rest, now);
        self.close_block();
        if self.buf.len() >= FLUSH_AT {
            self.flush();
        }
    }

    /// Appends complete lines (each ending in '\n'): copied at once, unless
    /// one of them is longer than MAX_LINE and must be split.
    fn emit_lines(&mut self, lines: &[u8], now: i64) {
        if lines.is_empty() {
            return;
        }
        let (mut n, mut prev, mut long) = (0u64, 0usize, false);
        for nl in memchr::memchr_iter(b'\n', lines) {
            long |= nl - prev > format::MAX_LINE;
            prev = nl + 1;
            n += 1;
        }
        if long {
            for mut line in lines[..lines.len() - 1].split(|&c| c == b'\n') {
                while line.len() > format::MAX_LINE {
                    self.emit(&line[..format::MAX_LINE], now);
                    line = &line[format::MAX_LINE..];
                }
                self.emit(line, now);
            }
            return;
        }
        self.open_block(now);
        self.buf.extend_from_slice(lines);
        self.seq += n;
    }

    /// Adds the start of a line; a piece of MAX_LINE bytes becomes a line of
    /// its own once more bytes follow.
    fn push_partial(&mut self, mut text: &[u8], now: i64) {
        while !text.is_empty() {
            if self.partial.len() == format::MAX_LINE {
                let line = std::mem::take(&mut self.partial);
                self.emit(&line, now);
                self.partial = line;
                self.partial.clear();
            }
            let n = text.len().min(format::MAX_LINE - self.partial.len());
            self.partial.extend_from_slice(&text[..n]);
            text = &text[n..];
        }
    }

    /// Appends one line (without its newline) to the open block.
    fn emit(&mut self, text: &[u8], now: i64) {
        self.open_block(now);
        self.buf.extend_from_slice(text);
        self.buf.push(b'\n');
        self.seq += 1;
    }

    fn open_block(&mut self, now: i64) {
        if self.block.is_none() {
            self.block = Some(format::begin_block(&mut self.buf, now));
        }
    }

    fn close_block(&mut self) {
        if let Some(at) = self.block.take() {
            format::end_block(&mut self.buf, at);
        }
    }

    /// Writes the buffered lines; rotates if the file is full.
    pub fn flush(&mut self) {
        self.close_block();
        if self.buf.is_empty() {
            return;
        }
        if self.file.is_none() {
            self.next_file();
        }
        let result = match &mut self.file {
            Some(f) => f.write_all(&self.buf),
            None => Err(io::Error::other("no file")),
        };
        match result {
            Ok(()) => {
                self.size += self.buf.len() as u64;
                self.failing = false;
            }
            Err(e) => {
                self.report(&format!("write {}", self.channel.file(self.cur)), &e);
                // The next lines start a new file named after their number.
                self.file = None;
            }
        }
        self.flushed = self.seq;
        self.buf.clear();
        // A burst may have grown the buffer; give the memory back. (A feed
        // adds at most a read of the pipe and a partial line to the
        // FLUSH_AT held before it.)
        if self.buf.capacity() > 4 * FLUSH_AT {
            self.buf = Vec::new();
        }
        if self.file.is_some() && self.size >= self.half_cap {
            self.next_file();
        }
    }

    /// Starts `<channel>.<flushed>` and deletes the file before the
    /// current one: two files at most.
    fn next_file(&mut self) {
        if self.file.is_some() && self.flushed == self.cur {
            return;
        }
        let name = self.channel.file(self.flushed);
        match open_at(&self.dir, &name) {
            Ok(f) => {
                if let Some(old) = self.prev {
                    if let Err(e) = unlink_at(&self.dir, &self.channel.file(old)) {
                        if e.kind() != io::ErrorKind::NotFound {
                            self.report(&format!("delete {}", self.channel.file(old)), &e);
                        }
                    }
                }
                if self.flushed != self.cur {
                    self.prev = Some(self.cur);
                }
                self.cur = self.flushed;
                self.file = Some(f);
                self.size = 0;
            }
            // With the current file still open, it keeps growing until a
            // later flush manages to rotate.
            Err(e) => self.report(&format!("create {name}"), &e),
        }
    }

    /// The pipe is closed: writes the last (partial) line and the end
    /// marker with the number of lines.
    pub fn end(&mut self) {
        if self.ended {
            return;
        }
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.emit(&line, super::supervise::now_nanos());
        }
        self.partial = Vec::new();
        self.flush();
        self.file = None;
        self.ended = true;
        let name = self.channel.end_file();
        if let Err(e) = format::write_replaced_at(&self.dir, &name, self.seq.to_string().as_bytes())
        {
            self.failing = false;
            self.report(&format!("write {name}"), &e);
        }
    }

    fn report(&mut self, what: &str, e: &io::Error) {
        if !self.failing {
            self.failing = true;
            super::supervise::warn(&format!("{what}: {e} (dropping output until it works)"));
        }
    }
}

fn open_at(dir: &OwnedFd, name: &str) -> io::Result<File> {
    let name = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: a valid directory fd and C string; the new fd is owned below.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn unlink_at(dir: &OwnedFd, name: &str) -> io::Result<()> {
    let name = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: a valid directory fd and C string.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(dir: &std::path::Path, name: &str) -> Vec<Vec<u8>> {
        let data = std::fs::read(dir.join(name)).unwrap();
        format::decode_file(&data)
            .into_iter()
            .map(|(_, l)| l.to_vec())
            .collect()
    }

    fn output(d: &tempfile::TempDir, cap: u64) -> Output {
        let fd: OwnedFd = File::open(d.path()).unwrap().into();
        Output::new(Rc::new(fd), Channel::Stdout, cap).unwrap()
    }

    #[test]
    fn splits_lines_across_reads_and_long_lines() {
        let d = tempfile::tempdir().unwrap();
        let mut o = output(&d, u64::MAX);
        o.feed(b"ab", 1);
        o.feed(b"c\nd\n\ne", 2);
        let long = vec![b'x'; 2 * format::MAX_LINE + 5];
        o.feed(b"\n", 3);
        o.feed(&long, 4);
        o.feed(b"\n", 4);
        o.feed(&long[..format::MAX_LINE], 5);
        o.feed(b"\n", 5);
        o.feed(&long[..10], 6);
        o.feed(&long[..format::MAX_LINE], 6);
        o.feed(b"tail", 7);
        o.end();
        let got = lines(d.path(), "stdout.0");
        let want: Vec<&[u8]> = vec![
            b"abc",
            b"d",
            b"",
            b"e",
            &long[..format::MAX_LINE],
            &long[..format::MAX_LINE],
            b"xxxxx",
            &long[..format::MAX_LINE],
            &long[..format::MAX_LINE],
            b"xxxxxxxxxxtail",
        ];
        assert_eq!(got, want);
        assert_eq!(std::fs::read(d.path().join("stdout.end")).unwrap(), b"10");
        // Same input in one piece.
        let d2 = tempfile::tempdir().unwrap();
        let mut o = output(&d2, u64::MAX);
        let mut all = b"abc\nd\n\ne\n".to_vec();
        all.extend_from_slice(&long);
        o.feed(&all, 1);
        o.feed(b"\n", 1);
        o.end();
        assert_eq!(std::fs::read(d2.path().join("stdout.end")).unwrap(), b"7");
    }

    #[test]
    fn a_silent_channel_has_no_file_only_its_end_marker() {
        let d = tempfile::tempdir().unwrap();
        let mut o = output(&d, u64::MAX);
        o.feed(b"", 1);
        o.flush();
        assert!(!d.path().join("stdout.0").exists());
        o.end();
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["stdout.end"]);
        assert_eq!(std::fs::read(d.path().join("stdout.end")).unwrap(), b"0");
    }

    #[test]
    fn one_block_per_read_stamped_with_its_time() {
        let d = tempfile::tempdir().unwrap();
        let mut o = output(&d, u64::MAX);
        o.feed(b"a\nb\npart", 100);
        o.feed(b"ial\n", 200);
        o.feed(b"no newline yet", 300);
        o.feed(b"\nc\n", 400);
        o.end();
        let data = std::fs::read(d.path().join("stdout.0")).unwrap();
        assert_eq!(data[0], format::BLOCK);
        let got: Vec<(i64, &[u8])> = format::decode_file(&data);
        let want: Vec<(i64, &[u8])> = vec![
            (100, b"a"),
            (100, b"b"),
            (200, b"partial"),
            (400, b"no newline yet"),
            (400, b"c"),
        ];
        assert_eq!(got, want);
        // Three blocks (the read without a newline made none).
        let headers = data.iter().filter(|&&c| c == format::BLOCK).count();
        assert_eq!(headers, 3);
        assert_eq!(
            data.len(),
            3 * format::BLOCK_HEADER_LEN + "a\nb\npartial\nno newline yet\nc\n".len()
        );
    }

    #[test]
    fn rotates_keeping_two_files() {
        let d = tempfile::tempdir().unwrap();
        let mut o = output(&d, format::MIN_OUTPUT_CAP);
        let mut n = 0u64;
        for _ in 0..400 {
            let mut chunk = Vec::new();
            for _ in 0..100 {
                n += 1;
                chunk.extend_from_slice(format!("line {n}\n").as_bytes());
            }
            o.feed(&chunk, 1);
            o.flush();
        }
        o.end();
        let mut seqs: Vec<u64> = std::fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| Channel::Stdout.parse_file(e.unwrap().file_name().to_str()?))
            .collect();
        seqs.sort();
        assert_eq!(seqs.len(), 2, "{seqs:?}");
        assert!(seqs[0] > 0);
        let first = lines(d.path(), &Channel::Stdout.file(seqs[0]));
        assert_eq!(seqs[0] + first.len() as u64, seqs[1]);
        let mut all = first;
        all.extend(lines(d.path(), &Channel::Stdout.file(seqs[1])));
        for (i, line) in all.iter().enumerate() {
            assert_eq!(line, format!("line {}", seqs[0] + i as u64 + 1).as_bytes());
        }
        assert_eq!(all.last().unwrap(), b"line 40000");
        assert_eq!(
            std::fs::read(d.path().join("stdout.end")).unwrap(),
            b"40000"
        );
    }
}
