//! The streaming server end to end in-process: a client speaking HTTP/1.1
//! upgrade + SPDY/3.1 (this crate's framing in client mode) against the
//! server, with host commands and host ports as targets. With
//! `AURAE_STREAMCLIENT` naming a build of client-go's remotecommand and
//! portforward clients (see the README), the same URLs are also checked
//! with the client critest uses.

use std::{collections::HashMap, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{spdy, *};

async fn server() -> (Arc<Streaming>, CancellationToken) {
    let token = CancellationToken::new();
    let s = Streaming::start("127.0.0.1:0".parse().expect("addr"), token.clone())
        .await
        .expect("start");
    (s, token)
}

/// Sends the upgrade request and returns the status line, the response
/// headers and (on 101) the SPDY connection.
async fn upgrade(url: &str, protocols: &str) -> (u16, String, Option<spdy::Connection>) {
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').expect("path");
    let mut tcp = TcpStream::connect(host).await.expect("connect");
    let req = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
         X-Stream-Protocol-Version: {protocols}\r\nContent-Length: 0\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tcp.read(&mut b).await.expect("read");
        assert_eq!(
            n,
            1,
            "response ended early: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8(head).expect("utf8");
    let code: u16 = head[9..12].parse().expect("status");
    let conn = (code == 101).then(|| spdy::Connection::client(tcp));
    (code, head, conn)
}

fn h(t: &str) -> spdy::Headers {
    vec![("streamType".into(), t.into())]
}

async fn read_all(r: &mut spdy::StreamReader) -> Vec<u8> {
    let mut v = Vec::new();
    while let Some(b) = tokio::time::timeout(Duration::from_secs(10), r.read())
        .await
        .expect("timely data")
    {
        v.extend_from_slice(&b);
    }
    v
}

fn host_exec(cmd: &[&str], tty: bool, stdin: bool) -> Pending {
    Pending::Exec(ExecRequest {
        runner: Runner::Host,
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout: true,
        stderr: !tty,
    })
}

#[tokio::test]
async fn exec_without_tty_streams_output_and_the_exit_code() {
    let (s, stop) = server().await;
    let url = s
        .url_for(host_exec(
            &["sh", "-c", "read x; echo out $x; echo err >&2; exit 3"],
            false,
            true,
        ))
        .expect("url");
    let (code, head, conn) = upgrade(&url, "v5.channel.k8s.io, v4.channel.k8s.io").await;
    assert_eq!(code, 101, "{head}");
    assert!(head
        .to_ascii_lowercase()
        .contains("x-stream-protocol-version: v4.channel.k8s.io"));
    let mut conn = conn.expect("conn");
    let mut error = conn.open(h("error")).await.expect("error");
    let stdin = conn.open(h("stdin")).await.expect("stdin");
    let mut stdout = conn.open(h("stdout")).await.expect("stdout");
    let mut stderr = conn.open(h("stderr")).await.expect("stderr");
    stdin.writer.write(b"in\n").await.expect("stdin");
    stdin.writer.close().await.expect("fin");
    assert_eq!(read_all(&mut stdout.reader).await, b"out in\n");
    assert_eq!(read_all(&mut stderr.reader).await, b"err\n");
    let status: serde_json::Value =
        serde_json::from_slice(&read_all(&mut error.reader).await).expect("json status");
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(status["details"]["causes"][0]["message"], "3");
    conn.closed().await;
    stop.cancel();
}

#[tokio::test]
async fn exec_with_tty_runs_on_a_terminal_and_resizes_it() {
    let (s, stop) = server().await;
    let url = s
        .url_for(host_exec(
            &[
                "sh",
                "-c",
                "test -t 0 && read x && stty size && echo tty $x",
            ],
            true,
            true,
        ))
        .expect("url");
    let (code, head, conn) = upgrade(&url, "v4.channel.k8s.io").await;
    assert_eq!(code, 101, "{head}");
    let mut conn = conn.expect("conn");
    let mut error = conn.open(h("error")).await.expect("error");
    let stdin = conn.open(h("stdin")).await.expect("stdin");
    let mut stdout = conn.open(h("stdout")).await.expect("stdout");
    let resize = conn.open(h("resize")).await.expect("resize");
    resize
        .writer
        .write(br#"{"Width":100,"Height":31}"#)
        .await
        .expect("resize");
    // Give the resize a moment to land before the shell asks for the size.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stdin.writer.write(b"hi\n").await.expect("stdin");
    let out = String::from_utf8_lossy(&read_all(&mut stdout.reader).await).into_owned();
    assert!(out.contains("31 100"), "{out:?}");
    assert!(out.contains("tty hi"), "{out:?}");
    assert_eq!(
        read_all(&mut error.reader).await,
        br#"{"metadata":{},"status":"Success"}"#
    );
    stop.cancel();
}

#[tokio::test]
async fn portforward_copies_both_ways_and_reports_dial_errors() {
    let (s, stop) = server().await;
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let (mut c, _) = echo.accept().await.expect("accept");
        let mut v = Vec::new();
        c.read_to_end(&mut v).await.expect("read");
        c.write_all(b"echo:").await.expect("write");
        c.write_all(&v).await.expect("write");
    });
    let url = s
        .url_for(Pending::PortForward(PortForwardRequest {
            netns: None,
            sandbox: "test".into(),
        }))
        .expect("url");
    let (code, head, conn) = upgrade(&url, "portforward.k8s.io").await;
    assert_eq!(code, 101, "{head}");
    let mut conn = conn.expect("conn");
    let pf = |t: &str, id: &str, port: u16| {
        vec![
            ("streamType".to_string(), t.to_string()),
            ("port".to_string(), port.to_string()),
            ("requestID".to_string(), id.to_string()),
        ]
    };
    let mut e0 = conn.open(pf("error", "0", port)).await.expect("error");
    e0.writer.close().await.expect("fin");
    let mut d0 = conn.open(pf("data", "0", port)).await.expect("data");
    d0.writer.write(b"hello").await.expect("write");
    d0.writer.close().await.expect("fin");
    assert_eq!(read_all(&mut d0.reader).await, b"echo:hello");
    assert_eq!(read_all(&mut e0.reader).await, b"");
    // Nothing listens on port 1.
    let mut e1 = conn.open(pf("error", "1", 1)).await.expect("error");
    let _d1 = conn.open(pf("data", "1", 1)).await.expect("data");
    let msg = String::from_utf8(read_all(&mut e1.reader).await).expect("utf8");
    assert!(msg.contains("error forwarding port 1"), "{msg}");
    stop.cancel();
}

#[tokio::test]
async fn tokens_are_single_use_and_protocols_are_negotiated() {
    let (s, stop) = server().await;
    let url = s.url_for(host_exec(&["true"], false, false)).expect("url");
    let (code, head, _) = upgrade(&url, "v9.channel.k8s.io").await;
    assert_eq!(code, 403, "{head}");
    assert!(head
        .to_ascii_lowercase()
        .contains("x-accepted-stream-protocol-versions: v4.channel.k8s.io"));
    // The token was used up by the failed attempt.
    let (code, _, _) = upgrade(&url, "v4.channel.k8s.io").await;
    assert_eq!(code, 404);
    let url = s.url_for(host_exec(&["true"], false, false)).expect("url");
    let wrong = url.replace("/exec/", "/attach/");
    let (code, _, _) = upgrade(&wrong, "v4.channel.k8s.io").await;
    assert_eq!(code, 404);
    stop.cancel();
}

#[tokio::test]
async fn attach_streams_new_log_lines_and_feeds_the_stdin_fifo() {
    let (s, stop) = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("0.log");
    std::fs::write(&log, "2026-01-01T00:00:00Z stdout F old line\n").expect("log");
    let fifo = dir.path().join("stdin");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    // The "container": reads the FIFO, logs each line in the CRI format.
    let (f2, l2) = (fifo.clone(), log.clone());
    let container = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let r = std::io::BufReader::new(std::fs::File::open(&f2).expect("fifo"));
        let mut w = std::fs::OpenOptions::new()
            .append(true)
            .open(&l2)
            .expect("log");
        for line in r.lines() {
            let line = line.expect("line");
            writeln!(w, "2026-01-01T00:00:01Z stdout P {line}").expect("w");
            writeln!(w, "2026-01-01T00:00:01Z stdout F !").expect("w");
            writeln!(w, "2026-01-01T00:00:01Z stderr F e").expect("w");
        }
    });
    // The container holds the read end before the attach opens its end.
    let hold = std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .expect("writer");
    let url = s
        .url_for(Pending::Attach(AttachRequest {
            stdin_fifo: Some(fifo.clone()),
            log_path: log.clone(),
            exit_file: None,
            tty: false,
            stdin: true,
            stdout: true,
            stderr: true,
        }))
        .expect("url");
    let (code, head, conn) = upgrade(&url, "v4.channel.k8s.io").await;
    assert_eq!(code, 101, "{head}");
    let mut conn = conn.expect("conn");
    let mut error = conn.open(h("error")).await.expect("error");
    let stdin = conn.open(h("stdin")).await.expect("stdin");
    let mut stdout = conn.open(h("stdout")).await.expect("stdout");
    let mut stderr = conn.open(h("stderr")).await.expect("stderr");
    stdin.writer.write(b"hello\n").await.expect("stdin");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stdin.writer.close().await.expect("fin");
    assert_eq!(read_all(&mut stdout.reader).await, b"hello!\n");
    assert_eq!(read_all(&mut stderr.reader).await, b"e\n");
    assert_eq!(
        read_all(&mut error.reader).await,
        br#"{"metadata":{},"status":"Success"}"#
    );
    drop(hold);
    let _ = container.join();
    stop.cancel();
}

/// The client critest uses (client-go over spdystream), if built.
#[tokio::test]
async fn client_go_interoperates() {
    let Ok(bin) = std::env::var("AURAE_STREAMCLIENT") else {
        eprintln!("AURAE_STREAMCLIENT not set: skipped");
        return;
    };
    let (s, stop) = server().await;
    let run = |args: Vec<String>| {
        let bin = bin.clone();
        tokio::task::spawn_blocking(move || {
            let o = std::process::Command::new(bin)
                .args(args)
                .output()
                .expect("run the client");
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            eprintln!("client-go: {out}{}", String::from_utf8_lossy(&o.stderr));
            out
        })
    };
    let url = s
        .url_for(host_exec(
            &["sh", "-c", "echo hello; echo oops >&2"],
            false,
            false,
        ))
        .expect("url");
    let out = run(vec![url]).await.expect("join");
    assert!(out.contains("STDOUT=\"hello\\n\""), "{out}");
    assert!(out.contains("STDERR=\"oops\\n\""), "{out}");
    assert!(out.contains("ERR=<nil>"), "{out}");
    let url = s
        .url_for(host_exec(&["sh", "-c", "exit 7"], false, false))
        .expect("url");
    let out = run(vec![url]).await.expect("join");
    assert!(out.contains("exit code 7"), "{out}");
    let url = s
        .url_for(host_exec(
            &["sh", "-c", "read x; echo hello $x"],
            true,
            true,
        ))
        .expect("url");
    let out = run(vec![
        "-tty".into(),
        "-stdin".into(),
        "you\\n".into(),
        "-hold".into(),
        "5s".into(),
        url,
    ])
    .await
    .expect("join");
    assert!(out.contains("hello you"), "{out}");
    assert!(out.contains("ERR=<nil>"), "{out}");

    // The same over WebSocket (v5.channel.k8s.io).
    let url = s
        .url_for(host_exec(
            &["sh", "-c", "echo hello; echo oops >&2; exit 2"],
            false,
            false,
        ))
        .expect("url");
    let out = run(vec!["-ws".into(), url]).await.expect("join");
    assert!(out.contains("STDOUT=\"hello\\n\""), "{out}");
    assert!(out.contains("STDERR=\"oops\\n\""), "{out}");
    assert!(out.contains("exit code 2"), "{out}");
    let url = s
        .url_for(host_exec(
            &["sh", "-c", "read x; echo hello $x"],
            true,
            true,
        ))
        .expect("url");
    let out = run(vec![
        "-ws".into(),
        "-tty".into(),
        "-stdin".into(),
        "ws\\n".into(),
        url,
    ])
    .await
    .expect("join");
    assert!(out.contains("hello ws"), "{out}");
    assert!(out.contains("ERR=<nil>"), "{out}");

    // Port forwarding to a host port, through a local port of the client.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let (mut c, _) = echo.accept().await.expect("accept");
        let mut v = Vec::new();
        let _ = c.read_to_end(&mut v).await;
        let _ = c.write_all(b"echo:").await;
        let _ = c.write_all(&v).await;
    });
    let local = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = s
        .url_for(Pending::PortForward(PortForwardRequest {
            netns: None,
            sandbox: "test".into(),
        }))
        .expect("url");
    let out = run(vec![
        "-mode".into(),
        "pf".into(),
        "-ports".into(),
        format!("{local}:{port}"),
        "-send".into(),
        "ping".into(),
        url,
    ])
    .await
    .expect("join");
    assert!(out.contains("RECV=\"echo:ping\""), "{out}");

    // And tunnelled over WebSocket.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let (mut c, _) = echo.accept().await.expect("accept");
        let mut v = Vec::new();
        let _ = c.read_to_end(&mut v).await;
        let _ = c.write_all(b"ws:").await;
        let _ = c.write_all(&v).await;
    });
    let local = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = s
        .url_for(Pending::PortForward(PortForwardRequest {
            netns: None,
            sandbox: "test".into(),
        }))
        .expect("url");
    let out = run(vec![
        "-ws".into(),
        "-mode".into(),
        "pf".into(),
        "-ports".into(),
        format!("{local}:{port}"),
        "-send".into(),
        "pong".into(),
        url,
    ])
    .await
    .expect("join");
    assert!(out.contains("RECV=\"ws:pong\""), "{out}");
    stop.cancel();
}

/// Exec in a real container: `AURAE_TEST_CONTAINER=<binary>:<root>:<id>`
/// names one (crun or runc, its state root and the container id).
#[tokio::test]
async fn exec_in_a_container() {
    let Ok(spec) = std::env::var("AURAE_TEST_CONTAINER") else {
        eprintln!("AURAE_TEST_CONTAINER not set: skipped");
        return;
    };
    let mut parts = spec.splitn(3, ':');
    let (Some(bin), Some(root), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("AURAE_TEST_CONTAINER: <binary>:<root>:<id>");
    };
    let runner = Runner::Crun {
        binary: bin.into(),
        root: root.into(),
        id: id.into(),
        procs_files: vec![],
    };
    let (s, stop) = server().await;
    for tty in [false, true] {
        let url = s
            .url_for(Pending::Exec(ExecRequest {
                runner: runner.clone(),
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "read x; echo hello $x; if test -t 1; then stty size; fi".into(),
                ],
                tty,
                stdin: true,
                stdout: true,
                stderr: !tty,
            }))
            .expect("url");
        let (code, head, conn) = upgrade(&url, "v4.channel.k8s.io").await;
        assert_eq!(code, 101, "{head}");
        let mut conn = conn.expect("conn");
        let mut error = conn.open(h("error")).await.expect("error");
        let stdin = conn.open(h("stdin")).await.expect("stdin");
        let mut stdout = conn.open(h("stdout")).await.expect("stdout");
        let _stderr_or_resize = if tty {
            let r = conn.open(h("resize")).await.expect("resize");
            r.writer
                .write(br#"{"Width":90,"Height":20}"#)
                .await
                .expect("resize");
            tokio::time::sleep(Duration::from_millis(300)).await;
            r
        } else {
            conn.open(h("stderr")).await.expect("stderr")
        };
        let _ = stdin.writer.write(b"there\n").await;
        let out = String::from_utf8_lossy(&read_all(&mut stdout.reader).await).into_owned();
        let err = String::from_utf8_lossy(&read_all(&mut error.reader).await).into_owned();
        eprintln!("tty={tty}: out={out:?} error={err:?}");
        assert!(out.contains("hello there"), "{out:?} {err}");
        if tty {
            assert!(out.contains("20 90"), "{out:?}");
        }
        assert_eq!(err, r#"{"metadata":{},"status":"Success"}"#);
    }
    stop.cancel();
}

#[tokio::test]
async fn exec_over_websocket_v5() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let (s, stop) = server().await;
    let url = s
        .url_for(host_exec(
            &["sh", "-c", "read x; echo got $x; exit 5"],
            false,
            true,
        ))
        .expect("url");
    let mut req = url
        .replace("http://", "ws://")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        http::HeaderValue::from_static("v5.channel.k8s.io"),
    );
    let host = url["http://".len()..]
        .split('/')
        .next()
        .expect("host")
        .to_owned();
    let tcp = TcpStream::connect(host).await.expect("connect");
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("handshake");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"v5.channel.k8s.io"[..])
    );
    ws.send(Message::Binary(b"\x00in\n".to_vec().into()))
        .await
        .expect("stdin");
    // v5: the client closed its stdin.
    ws.send(Message::Binary(vec![255, 0].into()))
        .await
        .expect("close");
    let mut by_channel: HashMap<u8, Vec<u8>> = HashMap::new();
    while let Some(Ok(m)) = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("timely")
    {
        if let Message::Binary(b) = m {
            by_channel
                .entry(b[0])
                .or_default()
                .extend_from_slice(&b[1..]);
        }
    }
    assert_eq!(
        by_channel.get(&1).map(Vec::as_slice),
        Some(&b"got in\n"[..])
    );
    let status = String::from_utf8_lossy(by_channel.get(&3).expect("a status")).into_owned();
    assert!(
        status.contains("NonZeroExitCode") && status.contains(r#""message":"5""#),
        "{status}"
    );
    stop.cancel();
}
