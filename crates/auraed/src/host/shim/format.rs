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
//! Output files hold one line per line: `<nanos since epoch> <text>\n`
//! (text without its newline; a line longer than [`MAX_LINE`] is split).
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

/// Encodes one output line as it is stored.
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
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
    }
    std::fs::rename(&tmp, dir.join(name))
}

/// [`write_atomic`] relative to a directory fd, without allocation-heavy
/// path handling: what the shim uses (its directory is an inherited fd).
pub fn write_atomic_at(dir: &OwnedFd, name: &str, data: &[u8]) -> io::Result<()> {
    let tmp = std::ffi::CString::new(format!(".{name}.tmp")).map_err(io::Error::other)?;
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
        assert!(read_json::<ExitRecord>(&d.path().join("none"))
            .unwrap()
            .is_none());
    }
}
