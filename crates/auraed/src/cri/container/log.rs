//! The CRI container log format kubelet reads (`kubectl logs`):
//!
//! ```text
//! 2016-10-06T00:17:09.669794202Z stdout P The content of the log entry 1
//! 2016-10-06T00:17:10.113242941Z stderr F The content of the log entry 2
//! ```
//!
//! One record per line of output: the time it was read (RFC 3339, UTC,
//! nanoseconds), the stream, `F` for a full line or `P` for a partial one,
//! then the text without its newline. A line longer than [`MAX_LINE`] is
//! split into `P` records ending with an `F` one; output that ends without a
//! newline ends with a `P` record (as containerd writes it).

use std::{
    fs::File,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

/// Longest text of one record (containerd's default, 16 KiB).
pub const MAX_LINE: usize = 16 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// `secs`.`nanos` since the epoch as RFC 3339 with nanoseconds, UTC.
pub fn rfc3339_nano(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// One record of a CRI log, as [`parse`] reads it.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// ns since the epoch.
    pub timestamp: i64,
    pub stream: Stream,
    /// `P`: the line goes on in the next record of its stream.
    pub partial: bool,
    pub text: &'a [u8],
}

/// Reads one record (without its newline): `<RFC 3339 UTC> <stream> <P|F> <text>`.
/// None for anything else (a line of another writer, a torn last line).
pub fn parse(line: &[u8]) -> Option<Parsed<'_>> {
    let mut parts = line.splitn(4, |&b| b == b' ');
    let ts = parts.next()?;
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let partial = match parts.next()? {
        b"P" => true,
        b"F" => false,
        _ => return None,
    };
    Some(Parsed {
        timestamp: parse_rfc3339_utc(ts)?,
        stream,
        partial,
        text: parts.next().unwrap_or_default(),
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` to ns since the epoch (the inverse
/// of [`rfc3339_nano`]; Howard Hinnant's days_from_civil).
fn parse_rfc3339_utc(ts: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(ts).ok()?.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || frac.len() > 9 {
        return None;
    }
    let nanos = if frac.is_empty() {
        0
    } else {
        frac.parse::<i64>().ok()? * 10_i64.pow(9 - frac.len() as u32)
    };
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000_000) + nanos)
}

fn now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339_nano(d.as_secs() as i64, d.subsec_nanos())
}

/// Turns a stream's bytes into records: complete lines at once, the rest
/// kept until its newline comes (or it grows past [`MAX_LINE`], or the
/// stream ends).
#[derive(Debug)]
pub struct LineSplitter {
    stream: Stream,
    pending: Vec<u8>,
}

impl LineSplitter {
    pub fn new(stream: Stream) -> Self {
        LineSplitter {
            stream,
            pending: Vec::new(),
        }
    }

    /// Appends the records `data` completes to `out`, stamped `ts`.
    pub fn feed(&mut self, data: &[u8], ts: &str, out: &mut Vec<u8>) {
        self.pending.extend_from_slice(data);
        let mut start = 0;
        while let Some(nl) = memchr::memchr(b'\n', &self.pending[start..]) {
            let line = &self.pending[start..start + nl];
            record(out, ts, self.stream, line);
            start += nl + 1;
        }
        self.pending.drain(..start);
        while self.pending.len() >= MAX_LINE {
            let piece: Vec<u8> = self.pending.drain(..MAX_LINE).collect();
            partial(out, ts, self.stream, &piece);
        }
    }

    /// The stream ended: what is left is a partial line.
    pub fn finish(&mut self, ts: &str, out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            partial(out, ts, self.stream, &self.pending);
            self.pending.clear();
        }
    }
}

/// Full lines longer than MAX_LINE are split into P pieces and an F end.
fn record(out: &mut Vec<u8>, ts: &str, stream: Stream, line: &[u8]) {
    let mut rest = line;
    while rest.len() > MAX_LINE {
        partial(out, ts, stream, &rest[..MAX_LINE]);
        rest = &rest[MAX_LINE..];
    }
    push(out, ts, stream, b'F', rest);
}

fn partial(out: &mut Vec<u8>, ts: &str, stream: Stream, text: &[u8]) {
    push(out, ts, stream, b'P', text);
}

fn push(out: &mut Vec<u8>, ts: &str, stream: Stream, tag: u8, text: &[u8]) {
    out.extend_from_slice(ts.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_str().as_bytes());
    out.push(b' ');
    out.push(tag);
    out.push(b' ');
    out.extend_from_slice(text);
    out.push(b'\n');
}

/// The log file (None: the container has no log path; output is dropped).
/// Reopened on request (kubelet renames the file, then asks for a new one).
#[derive(Debug)]
pub struct CriLog {
    path: Option<PathBuf>,
    file: Option<File>,
    out: LineSplitter,
    err: LineSplitter,
    buf: Vec<u8>,
}

fn open(path: &Path) -> io::Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl CriLog {
    pub fn open(path: Option<PathBuf>) -> io::Result<Self> {
        let file = path.as_deref().map(open).transpose()?;
        Ok(CriLog {
            path,
            file,
            out: LineSplitter::new(Stream::Stdout),
            err: LineSplitter::new(Stream::Stderr),
            buf: Vec::new(),
        })
    }

    pub fn reopen(&mut self) -> io::Result<()> {
        if let Some(p) = &self.path {
            self.file = Some(open(p)?);
        }
        Ok(())
    }

    pub fn feed(&mut self, stream: Stream, data: &[u8]) {
        let ts = now();
        match stream {
            Stream::Stdout => self.out.feed(data, &ts, &mut self.buf),
            Stream::Stderr => self.err.feed(data, &ts, &mut self.buf),
        }
        self.flush();
    }

    pub fn finish(&mut self, stream: Stream) {
        let ts = now();
        match stream {
            Stream::Stdout => self.out.finish(&ts, &mut self.buf),
            Stream::Stderr => self.err.finish(&ts, &mut self.buf),
        }
        self.flush();
    }

    fn flush(&mut self) {
        if let Some(f) = &mut self.file {
            if !self.buf.is_empty() {
                // A full disk loses log lines, never the container.
                let _ = f.write_all(&self.buf);
            }
        }
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn records_parse_back() {
        let ts = rfc3339_nano(1_764_748_800, 123_456_789);
        let line = format!("{ts} stderr P some text with spaces");
        let p = parse(line.as_bytes()).expect("parses");
        assert_eq!(p.timestamp, 1_764_748_800_123_456_789);
        assert_eq!(p.stream, Stream::Stderr);
        assert!(p.partial);
        assert_eq!(p.text, b"some text with spaces");
        let p = parse(b"2016-10-06T00:17:10.1Z stdout F ").expect("empty line");
        assert_eq!((p.text, p.partial), (&b""[..], false));
        assert_eq!(p.timestamp % 1_000_000_000, 100_000_000);
        for (secs, n) in [(0, 0), (951_782_400, 5), (4_102_444_799, 999_999_999)] {
            let t = rfc3339_nano(secs, n);
            assert_eq!(
                parse_rfc3339_utc(t.as_bytes()),
                Some(secs * 1_000_000_000 + i64::from(n)),
                "{t}"
            );
        }
        assert_eq!(parse(b"garbage"), None);
        assert_eq!(parse(b"2016-10-06T00:17:10Z stdin F x"), None);
        assert_eq!(parse(b"2016-13-06T00:17:10Z stdout F x"), None);
    }

    use super::*;

    #[test]
    fn timestamps_are_rfc3339_nano() {
        assert_eq!(rfc3339_nano(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339_nano(1_475_713_029, 669_794_202),
            "2016-10-06T00:17:09.669794202Z"
        );
        assert_eq!(
            rfc3339_nano(951_782_400, 5),
            "2000-02-29T00:00:00.000000005Z"
        );
    }

    #[test]
    fn lines_full_partial_and_long() {
        let mut s = LineSplitter::new(Stream::Stdout);
        let mut out = Vec::new();
        s.feed(b"one\ntw", "T", &mut out);
        s.feed(b"o\nthree", "U", &mut out);
        s.finish("V", &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "T stdout F one\nU stdout F two\nV stdout P three\n"
        );
        let mut e = LineSplitter::new(Stream::Stderr);
        let mut out = Vec::new();
        let long = vec![b'x'; MAX_LINE + 3];
        e.feed(&long, "T", &mut out);
        e.feed(b"\n", "T", &mut out);
        let text = String::from_utf8_lossy(&out);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("T stderr P xxx"));
        assert_eq!(lines[1], "T stderr F xxx");
    }
}
