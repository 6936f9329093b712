//! The CRI streaming server of the real daemon: Exec, Attach and
//! PortForward answer with single-use URLs of it, and PortForward reaches
//! a port inside the pod's network namespace (and on the host for a
//! hostNetwork pod) over SPDY/3.1, as client-go's port-forward client
//! speaks it. (Exec and attach need containers; their protocol is tested
//! in-process in `src/cri/streaming/tests.rs`.)

mod common;

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use auraed::cri::streaming::spdy;
use auraed_cri::proto::{self, runtime_service_client::RuntimeServiceClient};
use common::Daemon;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{transport::Channel, Code};

struct Cri {
    _daemon: Daemon,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

async fn start() -> Cri {
    let dir = tempfile::Builder::new()
        .prefix("auraed-cri-stream-")
        .tempdir()
        .expect("tempdir");
    let socket = dir.path().join("cri.sock");
    let cni = dir.path().join("net.d");
    std::fs::create_dir_all(&cni).expect("mkdir");
    let daemon = Daemon::start_with(
        None,
        &[
            "--cri-socket",
            socket.to_str().expect("utf-8"),
            "--cni-conf-dir",
            cni.to_str().expect("utf-8"),
        ],
    )
    .await;
    Cri {
        _daemon: daemon,
        _dir: dir,
        socket,
    }
}

async fn channel(socket: &Path) -> Channel {
    let socket = socket.to_owned();
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tonic::transport::Endpoint::from_static("http://cri.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let s = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(s).await?,
                ))
            }
        }))
        .await
        .expect("connect to the CRI socket")
}

async fn run_pod(rt: &mut RuntimeServiceClient<Channel>, host_network: bool) -> String {
    let name = common::unique("pf");
    rt.run_pod_sandbox(proto::RunPodSandboxRequest {
        config: Some(proto::PodSandboxConfig {
            metadata: Some(proto::PodSandboxMetadata {
                name: name.clone(),
                uid: format!("uid-{name}"),
                namespace: "test".into(),
                attempt: 0,
            }),
            linux: Some(proto::LinuxPodSandboxConfig {
                security_context: Some(proto::LinuxSandboxSecurityContext {
                    namespace_options: Some(proto::NamespaceOption {
                        network: if host_network { 2 } else { 0 },
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        runtime_handler: String::new(),
    })
    .await
    .expect("RunPodSandbox")
    .into_inner()
    .pod_sandbox_id
}

/// The pod's `aurae-holder`: the process of its cell's cgroup.
fn holder_of(sandbox: &str) -> i32 {
    let cell = format!("cri-{}", &sandbox[..16]);
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if comm.trim() == "aurae-holder" && cg.contains(&format!("/{cell}")) {
            return pid;
        }
    }
    panic!("no holder for cell {cell}");
}

/// An echo server on 127.0.0.1 (any port) in the network namespace of
/// `pid` (None: the host's), on a thread of its own: answers one
/// connection with "pod:" and what it read.
fn echo_in(pid: Option<i32>) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Some(pid) = pid {
            let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("netns");
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        tx.send(l.local_addr().expect("addr").port()).expect("send");
        if let Ok((mut c, _)) = l.accept() {
            let mut v = Vec::new();
            let _ = c.read_to_end(&mut v);
            let _ = c.write_all(b"pod:");
            let _ = c.write_all(&v);
        }
    });
    rx.recv().expect("port")
}

/// Upgrades `url` to SPDY/3.1 with `protocol`; the HTTP status and, on
/// 101, the connection.
async fn upgrade(url: &str, protocol: &str) -> (u16, Option<spdy::Connection>) {
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_once('/').expect("a path");
    let mut tcp = tokio::net::TcpStream::connect(host).await.expect("connect");
    let req = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
         X-Stream-Protocol-Version: {protocol}\r\nContent-Length: 0\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tcp.read(&mut b).await.expect("read"), 1, "response ended");
        head.push(b[0]);
    }
    let code: u16 = String::from_utf8_lossy(&head[9..12])
        .parse()
        .expect("status");
    (code, (code == 101).then(|| spdy::Connection::client(tcp)))
}

async fn read_all(r: &mut spdy::StreamReader) -> Vec<u8> {
    let mut v = Vec::new();
    while let Some(b) = tokio::time::timeout(Duration::from_secs(15), r.read())
        .await
        .expect("timely data")
    {
        v.extend_from_slice(&b);
    }
    v
}

/// Forwards one connection to `port` through `url` and returns what came
/// back for "hello" and the error stream's text.
async fn forward_once(url: &str, port: u16) -> (Vec<u8>, String) {
    let (code, conn) = upgrade(url, "portforward.k8s.io").await;
    assert_eq!(code, 101);
    let mut conn = conn.expect("connection");
    let h = |t: &str| {
        vec![
            ("streamType".to_string(), t.to_string()),
            ("port".to_string(), port.to_string()),
            ("requestID".to_string(), "0".to_string()),
        ]
    };
    let mut error = conn.open(h("error")).await.expect("error stream");
    error.writer.close().await.expect("fin");
    let mut data = conn.open(h("data")).await.expect("data stream");
    data.writer.write(b"hello").await.expect("write");
    data.writer.close().await.expect("fin");
    let got = read_all(&mut data.reader).await;
    let err = String::from_utf8_lossy(&read_all(&mut error.reader).await).into_owned();
    (got, err)
}

async fn port_forward_url(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> String {
    rt.port_forward(proto::PortForwardRequest {
        pod_sandbox_id: id.to_string(),
        port: vec![],
    })
    .await
    .expect("PortForward")
    .into_inner()
    .url
}

#[tokio::test]
async fn portforward_reaches_the_pods_network_namespace() {
    let cri = start().await;
    let mut rt = RuntimeServiceClient::new(channel(&cri.socket).await);
    let id = run_pod(&mut rt, false).await;
    let holder = holder_of(&id);
    let port = echo_in(Some(holder));
    let url = port_forward_url(&mut rt, &id).await;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert!(url.contains("/portforward/"), "{url}");
    let (got, err) = forward_once(&url, port).await;
    assert_eq!(got, b"pod:hello", "error stream: {err}");
    assert_eq!(err, "");
    // The URL was used up.
    assert_eq!(upgrade(&url, "portforward.k8s.io").await.0, 404);

    // A port nothing listens on in the pod: the error stream says so.
    let url = port_forward_url(&mut rt, &id).await;
    let (got, err) = forward_once(&url, 1).await;
    assert!(got.is_empty());
    assert!(err.contains("error forwarding port 1"), "{err}");

    rt.remove_pod_sandbox(proto::RemovePodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await
    .expect("RemovePodSandbox");
    let e = rt
        .port_forward(proto::PortForwardRequest {
            pod_sandbox_id: id,
            port: vec![],
        })
        .await
        .expect_err("a removed pod");
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn portforward_of_a_host_network_pod_reaches_the_host() {
    let cri = start().await;
    let mut rt = RuntimeServiceClient::new(channel(&cri.socket).await);
    let id = run_pod(&mut rt, true).await;
    let port = echo_in(None);
    let url = port_forward_url(&mut rt, &id).await;
    let (got, err) = forward_once(&url, port).await;
    assert_eq!(got, b"pod:hello", "error stream: {err}");
    rt.remove_pod_sandbox(proto::RemovePodSandboxRequest { pod_sandbox_id: id })
        .await
        .expect("RemovePodSandbox");
}

#[tokio::test]
async fn exec_and_attach_requests_are_validated() {
    let cri = start().await;
    let mut rt = RuntimeServiceClient::new(channel(&cri.socket).await);
    let exec = |id: &str, tty: bool, stderr: bool, cmd: &[&str]| proto::ExecRequest {
        container_id: id.to_string(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin: false,
        stdout: true,
        stderr,
    };
    let e = rt
        .exec(exec("nope", false, true, &["true"]))
        .await
        .expect_err("unknown container");
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    let e = rt
        .exec(exec("nope", true, true, &["true"]))
        .await
        .expect_err("tty and stderr");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = rt
        .exec(exec("nope", false, false, &[]))
        .await
        .expect_err("no command");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = rt
        .attach(proto::AttachRequest {
            container_id: "nope".into(),
            stdin: true,
            tty: false,
            stdout: true,
            stderr: true,
        })
        .await
        .expect_err("unknown container");
    assert_eq!(e.code(), Code::NotFound);
    let e = rt
        .attach(proto::AttachRequest {
            container_id: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("no streams");
    assert_eq!(e.code(), Code::InvalidArgument);
}
