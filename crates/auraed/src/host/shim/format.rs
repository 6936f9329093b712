//! What an executable's directory holds on disk. The shim writes output and
//! the exit status; the daemon writes the record and reads everything; a
//! new daemon reads it all back. Every whole-file write is atomic (temp
//! file + rename), so a reader sees the old content or the new, never half.
//!
//! ```text
//! <state>/execs/<id>/
//!   record.json        the daemon's record of the executable (cells::persist)
//!   exit.json          the exit status, written by the shim (ExitRecord)
//!   stdout.<seq>       output lines, seq = number of the file's first line
//!   stdout.end         written once stdout is closed: the number of lines
//!   stderr.<seq>, stderr.end
//! ```
//!
//! Output files hold records of two kinds, which may be mixed:
//!
//! - a block (format 2, what the shim writes): a header
//!   `\x1e<nanos> <len>\n` ([`BLOCK`], the timestamp and the byte length
//!   of what follows, both zero-padded decimal: [`BLOCK_HEADER_LEN`] bytes),
//!   then `len` bytes of lines, each `<text>\n`, all read from the pipe at
//!   `<nanos>` (nanoseconds since the epoch). One block per read of the
//!   pipe: every line of a read gets that read's timestamp, as before;
//!   storing it once per read rather than once per line makes short lines
//!   3-4× smaller on disk and saves formatting and parsing them.
//! - a line (format 1, written by shims before blocks; still read, so
//!   that a daemon re-adopts the executables of older shims):
//!   `<nanos since epoch> <text>\n`. It starts with a digit, never with
//!   [`BLOCK`], which is how a reader tells them apart.
//!
//! Text never holds its newline; a line longer than [`MAX_LINE`] is split.
//! A channel keeps at most two files: once the newest reaches half the cap
//! the shim starts `<channel>.<next seq>` and deletes the oldest, so what is
//! kept is between half the cap and the cap, and the numbers in the names
//! tell a reader exactly how many lines it missed if it fell behind.

use std::{
    io::{self, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use serde::{Deserialize, Serialize};

pub const RECORD: &str = "record.json";
pub const EXIT: &str = "exit.json";
/// Longer lines are split into pieces of this size, never dropped.
pub const MAX_LINE: usize = 64 << 10;
/// Default cap of kept output per channel of one executable.
pub const DEFAULT_OUTPUT_CAP: u64 = 16 << 20;
/// The smallest cap a shim accepts (two files of at least one long line).
pub const MIN_OUTPUT_CAP: u64 = 4 * MAX_LINE as u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Stdout,
    Stderr,
}

impl Channel {
    pub const BOTH: [Channel; 2] = [Channel::Stdout, Channel::Stderr];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Stdout => "stdout",
            Channel::Stderr => "stderr",
        }
    }

    /// The file whose first line is number `seq`.
    pub fn file(self, seq: u64) -> String {
        format!("{}.{seq}", self.as_str())
    }

    /// The marker written once the channel is closed.
    pub fn end_file(self) -> String {
        format!("{}.end", self.as_str())
    }

    /// The seq of an output file of this channel, from its name.
    pub fn parse_file(self, name: &str) -> Option<u64> {
        name.strip_prefix(self.as_str())?
            .strip_prefix('.')?
            .parse()
            .ok()
    }
}

/// How an executable ended, as its shim saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The exit code, if it exited normally.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Whether it dumped core.
    #[serde(default)]
    pub core_dumped: bool,
    /// Nanoseconds since the Unix epoch.
    pub at: i64,
}

impl std::fmt::Display for ExitRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit status: {c}"),
            (None, Some(s)) => write!(
                f,
                "signal: {s}{}",
                if self.core_dumped {
                    " (core dumped)"
                } else {
                    ""
                }
            ),
            (None, None) => write!(f, "unknown"),
        }
    }
}

/// First byte of a block header (ASCII record separator).
pub const BLOCK: u8 = 0x1e;
/// Length of a block header: mark, 19 digits, space, 10 digits, newline.
pub const BLOCK_HEADER_LEN: usize = 32;
const TS_DIGITS: usize = 19;
const LEN_DIGITS: usize = 10;

/// Starts a block of lines read at `nanos`: appends its header with length
/// 0 and returns where it is, for [`end_block`] once the lines follow it.
pub fn begin_block(out: &mut Vec<u8>, nanos: i64) -> usize {
    let at = out.len();
    out.push(BLOCK);
    put_digits(out, nanos.max(0) as u64, TS_DIGITS);
    out.push(b' ');
    put_digits(out, 0, LEN_DIGITS);
    out.push(b'\n');
    at
}

/// Sets the length of the block whose header is at `at` to the bytes
/// after it. Returns false (and removes the header) if the block is empty.
pub fn end_block(out: &mut Vec<u8>, at: usize) -> bool {
    let len = out.len() - at - BLOCK_HEADER_LEN;
    if len == 0 {
        out.truncate(at);
        return false;
    }
    let start = at + 1 + TS_DIGITS + 1;
    let mut n = len as u64;
    for b in out[start..start + LEN_DIGITS].iter_mut().rev() {
        *b = b'0' + (n % 10) as u8;
        n /= 10;
    }
    true
}

fn put_digits(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut d = [b'0'; 20];
    for b in d[..width].iter_mut().rev() {
        *b = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&d[..width]);
}

/// Parses a block header (without its newline; starting with [`BLOCK`]):
/// the timestamp and the length of the block. None if it is not one.
pub fn parse_block_header(h: &[u8]) -> Option<(i64, usize)> {
    let rest = h.strip_prefix(&[BLOCK])?;
    let sp = rest.iter().position(|&c| c == b' ')?;
    let num = |b: &[u8]| -> Option<u64> {
        if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(b).ok()?.parse().ok()
    };
    let ts = i64::try_from(num(&rest[..sp])?).ok()?;
    let len = usize::try_from(num(&rest[sp + 1..])?).ok()?;
    Some((ts, len))
}

/// Decodes a whole stored file into (timestamp, text) lines, both formats
/// (for tests and tools; the daemon's reader follows files as they grow).
/// A torn last record gives what is complete of it.
pub fn decode_file(data: &[u8]) -> Vec<(i64, &[u8])> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let nl = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
        let head = &rest[..nl];
        rest = rest.get(nl + 1..).unwrap_or_default();
        if let Some((ts, len)) = parse_block_header(head) {
            let (block, after) = rest.split_at(len.min(rest.len()));
            rest = after;
            out.extend(block.split(|&c| c == b'\n').map(|l| (ts, l)));
            // The split yields an empty piece after the last newline.
            if block.last() == Some(&b'\n') || block.is_empty() {
                out.pop();
            }
        } else {
            out.push(decode_line(head));
        }
    }
    out
}

/// Encodes one output line as it is stored in format 1 (the format of
/// older shims; tests write it to check that it is still read).
pub fn encode_line(out: &mut Vec<u8>, nanos: i64, text: &[u8]) {
    let _ = write!(out, "{nanos} ");
    out.extend_from_slice(text);
    out.push(b'\n');
}

/// Splits a stored line (without its newline) into timestamp and text.
/// A line that does not parse is returned whole with timestamp 0.
pub fn decode_line(line: &[u8]) -> (i64, &[u8]) {
    if let Some(sp) = line.iter().position(|&c| c == b' ') {
        if let Some(ts) = std::str::from_utf8(&line[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
        {
            return (ts, &line[sp + 1..]);
        }
    }
    (0, line)
}

/// Writes `name` in `dir` atomically: a temp file, renamed over.
///
/// Not fsync'd, on purpose: the records describe processes, which a crash
/// of the daemon (or of a shim) leaves running and the page cache keeps
/// every renamed file whole for the next reader. Only a crash of the
/// kernel could lose or tear one, and it ends every process the record
/// describes as well (the runtime directory's contents do not outlive a
/// boot); a torn record is reported and removed at start. An fsync costs a
/// journal commit (milliseconds on ext4) on every Allocate, Start and exit.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> io::Result<()> {
    let tmp = dir.join(temp_name(name));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
    }
    std::fs::rename(&tmp, dir.join(name))
}

/// [`write_atomic`] relative to a directory fd, without allocation-heavy
/// path handling: what the shim uses (its directory is an inherited fd).
pub fn write_atomic_at(dir: &OwnedFd, name: &str, data: &[u8]) -> io::Result<()> {
    write_renamed_at(dir, name, data)
}

/// The same as [`write_atomic_at`] (no write here is fsync'd, see
/// [`write_atomic`]), named for `<channel>.end`, which a reader waits for at
/// the end of every stream: an fsync there cost 2-15 ms on this disk, and an
/// output file's end is worth nothing after a reboot.
pub fn write_replaced_at(dir: &OwnedFd, name: &str, data: &[u8]) -> io::Result<()> {
    write_renamed_at(dir, name, data)
}

/// The temp file a whole-file write of `name` goes through (then renamed).
pub fn temp_name(name: &str) -> String {
    format!(".{name}.tmp")
}

fn write_renamed_at(dir: &OwnedFd, name: &str, data: &[u8]) -> io::Result<()> {
    let tmp = std::ffi::CString::new(temp_name(name)).map_err(io::Error::other)?;
    let dst = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: valid dir fd and C strings; the new fd is owned below.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            tmp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // Not fsync'd: see write_atomic.
    f.write_all(data)?;
    drop(f);
    // SAFETY: valid dir fd and C strings.
    let r = unsafe { libc::renameat(dir.as_raw_fd(), tmp.as_ptr(), dir.as_raw_fd(), dst.as_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads and parses a JSON file; None if it does not exist.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let mut v = Vec::new();
        encode_line(&mut v, 123, b"hello world");
        assert_eq!(v, b"123 hello world\n");
        assert_eq!(decode_line(&v[..v.len() - 1]), (123, &b"hello world"[..]));
        assert_eq!(decode_line(b"junk"), (0, &b"junk"[..]));
    }

    #[test]
    fn blocks_round_trip_and_mix_with_lines() {
        let mut v = Vec::new();
        encode_line(&mut v, 5, b"old line");
        let at = begin_block(&mut v, 1_764_000_000_123_456_789);
        assert_eq!(v.len() - at, BLOCK_HEADER_LEN);
        v.extend_from_slice(b"a\n\n\x1e not a header\n");
        assert!(end_block(&mut v, at));
        let empty = begin_block(&mut v, 7);
        assert!(!end_block(&mut v, empty));
        assert_eq!(
            &v[at..at + BLOCK_HEADER_LEN],
            b"\x1e1764000000123456789 0000000018\n"
        );
        encode_line(&mut v, 6, b"another");
        let at = begin_block(&mut v, 8);
        v.extend_from_slice(b"torn\nlast");
        end_block(&mut v, at);
        let ts = 1_764_000_000_123_456_789;
        let want: Vec<(i64, &[u8])> = vec![
            (5, b"old line"),
            (ts, b"a"),
            (ts, b""),
            (ts, b"\x1e not a header"),
            (6, b"another"),
            (8, b"torn"),
            (8, b"last"),
        ];
        assert_eq!(decode_file(&v), want);
        assert_eq!(parse_block_header(b"\x1e12 34"), Some((12, 34)));
        assert_eq!(parse_block_header(b"\x1e12 -3"), None);
        assert_eq!(parse_block_header(b"\x1e99999999999999999999 3"), None);
        assert_eq!(parse_block_header(b"12 34"), None);
    }

    #[test]
    fn file_names() {
        assert_eq!(Channel::Stdout.file(7), "stdout.7");
        assert_eq!(Channel::Stdout.parse_file("stdout.7"), Some(7));
        assert_eq!(Channel::Stdout.parse_file("stdout.end"), None);
        assert_eq!(Channel::Stdout.parse_file("stderr.7"), None);
    }

    #[test]
    fn atomic_writes() {
        let d = tempfile::tempdir().unwrap();
        write_atomic(d.path(), EXIT, b"{\"code\":7,\"signal\":null,\"at\":1}").unwrap();
        let r: ExitRecord = read_json(&d.path().join(EXIT)).unwrap().unwrap();
        assert_eq!(r.code, Some(7));
        let fd: OwnedFd = std::fs::File::open(d.path()).unwrap().into();
        write_atomic_at(&fd, "x", b"1").unwrap();
        assert_eq!(std::fs::read(d.path().join("x")).unwrap(), b"1");
        write_replaced_at(&fd, "x", b"22").unwrap();
        assert_eq!(std::fs::read(d.path().join("x")).unwrap(), b"22");
        assert!(!d.path().join(".x.tmp").exists());
        assert!(read_json::<ExitRecord>(&d.path().join("none"))
            .unwrap()
            .is_none());
    }
}
