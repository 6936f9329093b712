//! Exec and Attach over the Kubernetes remotecommand protocol (the server
//! side of client-go's `tools/remotecommand`, as kubelet's
//! `pkg/cri/streaming/remotecommand` serves it).
//!
//! The client opens one SPDY stream per channel, named by its `streamType`
//! header: `error` (always), `stdin`, `stdout`, `stderr` (not with a tty)
//! and, from v3 on with a tty, `resize` (JSON `{"Width":…,"Height":…}`
//! messages). When the command ends, the error stream carries its outcome
//! — v4: a JSON `metav1.Status` (Success, or Failure with reason
//! NonZeroExitCode and an ExitCode cause); v2/v3: plain text, nothing on
//! success — and every stream is closed.

use std::{
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt},
    process::Command,
};
use tokio_util::sync::CancellationToken;

use super::spdy::{Connection, Stream, StreamReader, StreamWriter};

pub const V4: &str = "v4.channel.k8s.io";
pub const V3: &str = "v3.channel.k8s.io";
pub const V2: &str = "v2.channel.k8s.io";
/// What this server speaks, best first (v1 has a different stream set and
/// no client has needed it since Kubernetes 1.4).
pub const PROTOCOLS: &[&str] = &[V4, V3, V2];

/// How long the client may take to open its streams (kubelet's default
/// stream creation timeout).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long output is drained after the process exited (a background child
/// may hold the pipes open forever).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How often attach looks for new log lines.
const LOG_POLL: Duration = Duration::from_millis(100);

/// How an exec'd command is started.
#[derive(Debug, Clone)]
pub enum Runner {
    /// In a container: `<crun|runc> --root <root> exec [--tty] <id> CMD…`.
    Crun {
        binary: PathBuf,
        root: PathBuf,
        id: String,
        /// `cgroup.procs` of the container's cgroups: the runtime joins
        /// them before it execs, so what runs is counted with the
        /// container (as ExecSync does).
        procs_files: Vec<PathBuf>,
    },
    /// On the host, as the daemon (tests of the protocol).
    Host,
}

#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub runner: Runner,
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

#[derive(Debug, Clone)]
pub struct AttachRequest {
    /// The FIFO that feeds the container's stdin (None: it has none).
    pub stdin_fifo: Option<PathBuf>,
    /// The container's CRI log (`<RFC3339Nano> <stream> <P|F> <text>`).
    pub log_path: PathBuf,
    /// A file that appears when the container has exited (its monitor's
    /// `exit.json`): the attach ends then, after the last output.
    pub exit_file: Option<PathBuf>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// The channels the client opened.
struct Streams {
    error: Stream,
    stdin: Option<Stream>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
    resize: Option<Stream>,
}

impl Streams {
    /// FIN on every stream this side writes.
    async fn close(&self) {
        for s in [
            Some(&self.error),
            self.stdout.as_ref(),
            self.stderr.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            let _ = s.writer.close().await;
        }
    }
}

/// Waits for the streams the options call for (kubelet's
/// `waitStreamReply` set): error always, stdin/stdout when asked, stderr
/// when asked without a tty, resize with a tty from v3 on. Extra streams
/// are accepted and ignored.
async fn collect(
    conn: &mut Connection,
    protocol: &str,
    tty: bool,
    stdin: bool,
    stdout: bool,
    stderr: bool,
) -> Result<Streams, String> {
    let want_resize = tty && protocol != V2;
    let want_stderr = stderr && !tty;
    let mut error = None;
    let (mut si, mut so, mut se, mut rs) = (None, None, None, None);
    let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
    loop {
        let complete = error.is_some()
            && (!stdin || si.is_some())
            && (!stdout || so.is_some())
            && (!want_stderr || se.is_some())
            && (!want_resize || rs.is_some());
        if complete {
            break;
        }
        let s = match tokio::time::timeout_at(deadline, conn.incoming.recv()).await {
            Ok(Some(s)) => s,
            Ok(None) => return Err("the client went away before opening its streams".into()),
            Err(_) => return Err("timed out waiting for the client's streams".into()),
        };
        let kind = s.header("streamtype").unwrap_or("").to_owned();
        match kind.as_str() {
            "error" => error = Some(s),
            "stdin" => si = Some(s),
            "stdout" => so = Some(s),
            "stderr" => se = Some(s),
            "resize" => rs = Some(s),
            other => tracing::debug!("remotecommand: ignoring a stream of type {other:?}"),
        }
    }
    Ok(Streams {
        error: error.ok_or("no error stream")?,
        stdin: si,
        stdout: so,
        stderr: se,
        resize: rs,
    })
}

/// How a command ended.
enum Outcome {
    Exited(i32),
    Failed(String),
}

/// The error-stream message for `outcome` in `protocol` (None: nothing).
fn status_message(protocol: &str, cmd: &[String], outcome: &Outcome) -> Option<String> {
    let v4 = protocol == V4;
    match outcome {
        Outcome::Exited(0) if v4 => Some(r#"{"metadata":{},"status":"Success"}"#.to_string()),
        Outcome::Exited(0) => None,
        Outcome::Exited(code) => {
            let message = format!(
                "command terminated with non-zero exit code: error executing command {cmd:?}, exit code {code}"
            );
            if v4 {
                Some(
                    serde_json::json!({
                        "metadata": {},
                        "status": "Failure",
                        "message": message,
                        "reason": "NonZeroExitCode",
                        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
                    })
                    .to_string(),
                )
            } else {
                Some(message)
            }
        }
        Outcome::Failed(m) => {
            if v4 {
                Some(
                    serde_json::json!({
                        "metadata": {},
                        "status": "Failure",
                        "message": format!("Internal error occurred: {m}"),
                        "reason": "InternalError",
                        "code": 500,
                        "details": {"causes": [{"message": m}]},
                    })
                    .to_string(),
                )
            } else {
                Some(m.clone())
            }
        }
    }
}

async fn finish(conn: Connection, streams: Streams, protocol: &str, cmd: &[String], o: Outcome) {
    if let Some(m) = status_message(protocol, cmd, &o) {
        let _ = streams.error.writer.write(m.as_bytes()).await;
    }
    streams.close().await;
    conn.close().await;
}

/// Copies `from` to the stream until EOF.
async fn pump_out<R: AsyncRead + Unpin>(mut from: R, to: StreamWriter) {
    let mut buf = vec![0u8; super::spdy::MAX_DATA_CHUNK];
    loop {
        match from.read(&mut buf).await {
            // EIO: a pty whose other side is closed (the process is gone).
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Copies the stream to `to` until the client half-closes it, then closes
/// `to` (the command sees EOF).
async fn pump_in<W: AsyncWrite + Unpin>(mut from: StreamReader, mut to: W) {
    while let Some(b) = from.read().await {
        if to.write_all(&b).await.is_err() {
            return;
        }
        let _ = to.flush().await;
    }
    let _ = to.shutdown().await;
}

fn exit_code(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code()
        .or_else(|| s.signal().map(|sig| 128 + sig))
        .unwrap_or(-1)
}

fn command(req: &ExecRequest, tty: bool) -> Result<Command, String> {
    let (program, rest) = req
        .cmd
        .split_first()
        .ok_or_else(|| "cmd: a command is required".to_string())?;
    let mut c = match &req.runner {
        Runner::Crun {
            binary,
            root,
            id,
            procs_files,
        } => {
            let mut c = Command::new(binary);
            c.arg("--root").arg(root).arg("exec");
            if tty {
                c.arg("--tty");
            }
            c.arg(id).arg(program).args(rest);
            let files: Vec<std::fs::File> = procs_files
                .iter()
                .filter_map(|p| std::fs::OpenOptions::new().write(true).open(p).ok())
                .collect();
            // SAFETY: only write(2) on fds opened before the fork (moved
            // into the closure, so they stay open until exec).
            unsafe {
                c.pre_exec(move || {
                    for f in &files {
                        libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1);
                    }
                    Ok(())
                });
            }
            c
        }
        Runner::Host => {
            let mut c = Command::new(program);
            c.args(rest);
            c
        }
    };
    c.kill_on_drop(true);
    Ok(c)
}

pub async fn serve_exec(
    mut conn: Connection,
    protocol: &'static str,
    req: ExecRequest,
    shutdown: CancellationToken,
) {
    let mut streams = match collect(
        &mut conn, protocol, req.tty, req.stdin, req.stdout, req.stderr,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("exec: {e}");
            conn.close().await;
            return;
        }
    };
    let outcome = if req.tty {
        exec_tty(&conn, &req, &mut streams, &shutdown).await
    } else {
        exec_pipes(&conn, &req, &mut streams, &shutdown).await
    };
    finish(conn, streams, protocol, &req.cmd, outcome).await;
}

async fn exec_pipes(
    conn: &Connection,
    req: &ExecRequest,
    s: &mut Streams,
    shutdown: &CancellationToken,
) -> Outcome {
    let mut c = match command(req, false) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(e),
    };
    let piped = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
    c.stdin(piped(s.stdin.is_some()))
        .stdout(piped(s.stdout.is_some()))
        .stderr(piped(s.stderr.is_some()));
    let mut child = match c.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("starting {:?}: {e}", req.cmd[0])),
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut stdin_task = None;
    if let (Some(w), Some(st)) = (child.stdin.take(), s.stdin.as_mut()) {
        let reader = take_reader(st);
        stdin_task = Some(tokio::spawn(pump_in(reader, w)));
    }
    if let (Some(r), Some(st)) = (child.stdout.take(), s.stdout.as_ref()) {
        tasks.spawn(pump_out(r, st.writer.clone()));
    }
    if let (Some(r), Some(st)) = (child.stderr.take(), s.stderr.as_ref()) {
        tasks.spawn(pump_out(r, st.writer.clone()));
    }
    let status = tokio::select! {
        st = child.wait() => st,
        () = conn.closed() => {
            let _ = child.start_kill();
            child.wait().await
        }
        () = shutdown.cancelled() => {
            let _ = child.start_kill();
            child.wait().await
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    if let Some(t) = stdin_task {
        t.abort();
    }
    match status {
        Ok(st) => Outcome::Exited(exit_code(st)),
        Err(e) => Outcome::Failed(format!("waiting for {:?}: {e}", req.cmd[0])),
    }
}

/// The reader half of a stream, leaving an empty one behind (a stream's
/// reader is used by one task).
fn take_reader(st: &mut Stream) -> StreamReader {
    st.reader.take()
}

/// Sets the window size of the pty whose master is `fd`.
fn set_winsize(fd: &OwnedFd, width: u16, height: u16) {
    let ws = libc::winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives
    // through the call; the fd is owned and open.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r != 0 {
        tracing::debug!("exec: TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }
}

/// Applies the client's resize messages to the pty until the stream ends.
async fn resizes(mut from: StreamReader, master: OwnedFd) {
    #[derive(serde::Deserialize)]
    struct Size {
        #[serde(rename = "Width")]
        width: u16,
        #[serde(rename = "Height")]
        height: u16,
    }
    let mut pending = Vec::new();
    while let Some(b) = from.read().await {
        pending.extend_from_slice(&b);
        let mut it = serde_json::Deserializer::from_slice(&pending).into_iter::<Size>();
        let mut used = 0;
        while let Some(Ok(size)) = it.next() {
            used = it.byte_offset();
            set_winsize(&master, size.width, size.height);
        }
        pending.drain(..used);
        if pending.len() > 4096 {
            pending.clear(); // not JSON: drop it
        }
    }
}

/// A pty master for `req`'s command and the running command: the pty's
/// slave becomes the controlling terminal (and stdio) of what is started.
/// For a container that is `crun|runc exec --tty` in the foreground: the
/// runtime makes a terminal in the container and relays between it and
/// ours, and passes our size on when we resize (SIGWINCH). (With
/// `--console-socket` instead, runc insists on `--detach`, and then nobody
/// can wait for the exit code.)
async fn spawn_tty(req: &ExecRequest) -> Result<(OwnedFd, tokio::process::Child), String> {
    let pty = nix::pty::openpty(None, None).map_err(|e| format!("openpty: {e}"))?;
    let mut c = command(req, matches!(req.runner, Runner::Crun { .. }))?;
    let dup = |fd: &OwnedFd| -> Result<Stdio, String> {
        Ok(Stdio::from(
            fd.try_clone().map_err(|e| format!("dup: {e}"))?,
        ))
    };
    c.stdin(dup(&pty.slave)?)
        .stdout(dup(&pty.slave)?)
        .stderr(dup(&pty.slave)?);
    // SAFETY: setsid and ioctl are async-signal-safe; nothing is allocated
    // between fork and exec.
    unsafe {
        c.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = c
        .spawn()
        .map_err(|e| format!("starting {:?}: {e}", req.cmd[0]))?;
    drop(pty.slave);
    Ok((pty.master, child))
}

async fn exec_tty(
    conn: &Connection,
    req: &ExecRequest,
    s: &mut Streams,
    shutdown: &CancellationToken,
) -> Outcome {
    let (master, mut child) = match spawn_tty(req).await {
        Ok(x) => x,
        Err(e) => return Outcome::Failed(e),
    };
    let files = || -> std::io::Result<(tokio::fs::File, tokio::fs::File, OwnedFd)> {
        let r = tokio::fs::File::from_std(std::fs::File::from(master.try_clone()?));
        let w = tokio::fs::File::from_std(std::fs::File::from(master.try_clone()?));
        Ok((r, w, master.try_clone()?))
    };
    let (rd, wr, ctl) = match files() {
        Ok(f) => f,
        Err(e) => {
            let _ = child.start_kill();
            return Outcome::Failed(format!("pty: {e}"));
        }
    };
    drop(master);
    let mut aux = Vec::new();
    if let Some(st) = s.stdin.as_mut() {
        aux.push(tokio::spawn(pump_in(take_reader(st), wr)));
    }
    if let Some(st) = s.resize.as_mut() {
        aux.push(tokio::spawn(resizes(take_reader(st), ctl)));
    }
    let out = s
        .stdout
        .as_ref()
        .map(|st| tokio::spawn(pump_out(rd, st.writer.clone())));
    let status = tokio::select! {
        st = child.wait() => st,
        () = conn.closed() => {
            let _ = child.start_kill();
            child.wait().await
        }
        () = shutdown.cancelled() => {
            let _ = child.start_kill();
            child.wait().await
        }
    };
    if let Some(o) = out {
        let abort = o.abort_handle();
        if tokio::time::timeout(DRAIN_TIMEOUT, o).await.is_err() {
            abort.abort();
        }
    }
    for t in aux {
        t.abort();
    }
    match status {
        Ok(st) => Outcome::Exited(exit_code(st)),
        Err(e) => Outcome::Failed(format!("waiting for {:?}: {e}", req.cmd[0])),
    }
}

/// One line of a CRI log file: (stream, text with its newline if the line
/// is complete). None for a malformed line.
pub fn parse_log_line(line: &[u8]) -> Option<(&str, Vec<u8>)> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let _time = parts.next()?;
    let stream = match parts.next()? {
        b"stdout" => "stdout",
        b"stderr" => "stderr",
        _ => return None,
    };
    let tag = parts.next()?;
    let mut text = parts.next().unwrap_or(b"").to_vec();
    // Tags are `:`-separated; the first is P (partial) or F (full).
    if tag.split(|b| *b == b':').next() != Some(b"P") {
        text.push(b'\n');
    }
    Some((stream, text))
}

pub async fn serve_attach(
    mut conn: Connection,
    protocol: &'static str,
    req: AttachRequest,
    shutdown: CancellationToken,
) {
    let mut streams = match collect(
        &mut conn, protocol, req.tty, req.stdin, req.stdout, req.stderr,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("attach: {e}");
            conn.close().await;
            return;
        }
    };
    let outcome = attach(&conn, &req, &mut streams, &shutdown).await;
    finish(conn, streams, protocol, &[], outcome).await;
}

/// Opens a FIFO for writing without waiting for a reader (the container
/// holds the read end; without one, ENXIO).
fn open_fifo(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    // Writes block again (a full pipe waits for the container to read).
    let fd = f.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok(f)
}

async fn attach(
    conn: &Connection,
    req: &AttachRequest,
    s: &mut Streams,
    shutdown: &CancellationToken,
) -> Outcome {
    let mut log = match tokio::fs::File::open(&req.log_path).await {
        Ok(f) => f,
        Err(e) => {
            return Outcome::Failed(format!(
                "the container's log {}: {e}",
                req.log_path.display()
            ))
        }
    };
    // Only what is written from now on (as containerd attaches to the
    // live output, not the history), from before any input is passed on.
    let _ = log.seek(std::io::SeekFrom::End(0)).await;
    let stdin_done = CancellationToken::new();
    let mut aux = Vec::new();
    if let Some(st) = s.stdin.as_mut() {
        let reader = take_reader(st);
        let done = stdin_done.clone();
        match &req.stdin_fifo {
            Some(fifo) => match open_fifo(fifo) {
                Ok(f) => {
                    let f = tokio::fs::File::from_std(f);
                    aux.push(tokio::spawn(async move {
                        pump_in_keep_open(reader, f).await;
                        done.cancel();
                    }));
                }
                Err(e) => {
                    return Outcome::Failed(format!(
                        "the container's stdin ({}): {e}",
                        fifo.display()
                    ))
                }
            },
            None => return Outcome::Failed("the container was not created with stdin".into()),
        }
    }
    let mut partial = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    let mut ending = false;
    loop {
        let n = log.read(&mut buf).await.unwrap_or(0);
        if n > 0 {
            partial.extend_from_slice(&buf[..n]);
            while let Some(i) = memchr::memchr(b'\n', &partial) {
                let line: Vec<u8> = partial.drain(..=i).collect();
                if let Some((stream, text)) = parse_log_line(&line[..line.len() - 1]) {
                    let to = if stream == "stderr" && !req.tty {
                        s.stderr.as_ref()
                    } else {
                        s.stdout.as_ref()
                    };
                    if let Some(to) = to {
                        let _ = to.writer.write(&text).await;
                    }
                }
            }
            continue;
        }
        if ending {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(LOG_POLL) => {}
            // Attach ends when the client closes its stdin (containerd
            // does the same), or goes away.
            () = stdin_done.cancelled() => ending = true,
            () = conn.closed() => ending = true,
            () = shutdown.cancelled() => ending = true,
        }
        if !req.log_path.exists() {
            break;
        }
        if req.exit_file.as_ref().is_some_and(|f| f.exists()) {
            // Once more for what the container wrote last.
            ending = true;
        }
    }
    for t in aux {
        t.abort();
    }
    Outcome::Exited(0)
}

/// Like `pump_in`, but the target stays open at the end (the container's
/// stdin outlives one attach).
async fn pump_in_keep_open<W: AsyncWrite + Unpin>(mut from: StreamReader, mut to: W) {
    while let Some(b) = from.read().await {
        if to.write_all(&b).await.is_err() {
            return;
        }
        let _ = to.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_decode() {
        assert_eq!(
            parse_log_line(b"2026-12-03T06:00:00.000000001Z stdout F hello"),
            Some(("stdout", b"hello\n".to_vec()))
        );
        assert_eq!(
            parse_log_line(b"2026-12-03T06:00:00Z stderr P par"),
            Some(("stderr", b"par".to_vec()))
        );
        assert_eq!(
            parse_log_line(b"2026-12-03T06:00:00Z stdout F "),
            Some(("stdout", b"\n".to_vec()))
        );
        assert_eq!(
            parse_log_line(b"2026-12-03T06:00:00Z stdout F a b  c"),
            Some(("stdout", b"a b  c\n".to_vec()))
        );
        assert_eq!(parse_log_line(b"garbage"), None);
    }

    #[test]
    fn statuses_are_what_client_go_decodes() {
        let cmd = vec!["sh".to_string()];
        assert_eq!(
            status_message(V4, &cmd, &Outcome::Exited(0)).as_deref(),
            Some(r#"{"metadata":{},"status":"Success"}"#)
        );
        assert_eq!(status_message(V3, &cmd, &Outcome::Exited(0)), None);
        let v: serde_json::Value =
            serde_json::from_str(&status_message(V4, &cmd, &Outcome::Exited(3)).expect("a status"))
                .expect("json");
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
    }
}
