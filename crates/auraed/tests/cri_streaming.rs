//! The CRI streaming server of the real daemon: Exec, Attach and
//! PortForward answer with single-use URLs of it, and PortForward reaches
//! a port inside the pod's network namespace (and on the host for a
//! hostNetwork pod) over SPDY/3.1, as client-go's port-forward client
//! speaks it; Exec (with and without a tty) and Attach in a container of
//! an image this test builds (the host's static busybox, served from a
//! loopback registry, as in `cri_containers.rs`).

mod common;

use std::{
    collections::HashMap,
    io::{Read, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use auraed::cri::streaming::spdy;
use auraed_cri::proto::{
    self, image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
};
use common::Daemon;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{transport::Channel, Code};

// ---------------------------------------------------------------- registry

/// What the test registry serves: path -> (content type, body).
#[derive(Default)]
struct Content {
    files: HashMap<String, (String, Vec<u8>)>,
    /// `Basic <base64>` the registry requires, if any.
    basic_auth: Option<String>,
    requests: Vec<String>,
}

/// A minimal read-only registry (distribution API v2, HTTP/1.1, one
/// request per connection) on 127.0.0.1.
struct Registry {
    addr: String,
    content: Arc<Mutex<Content>>,
}

impl Registry {
    async fn start(basic_auth: Option<String>) -> Registry {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let content = Arc::new(Mutex::new(Content {
            basic_auth,
            ..Default::default()
        }));
        let c = content.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let c = c.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).into_owned();
                    let mut lines = head.lines();
                    let first = lines.next().unwrap_or("").to_string();
                    let mut parts = first.split(' ');
                    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    let auth = lines
                        .filter_map(|l| l.split_once(':'))
                        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                        .map(|(_, v)| v.trim().to_string());
                    let (status, ctype, body, extra) = {
                        let mut c = c.lock().expect("lock");
                        c.requests.push(format!("{method} {path}"));
                        let path = path.split('?').next().unwrap_or("");
                        if c.basic_auth.is_some() && auth != c.basic_auth {
                            (
                                "401 Unauthorized",
                                "text/plain".to_string(),
                                b"unauthorized".to_vec(),
                                "WWW-Authenticate: Basic realm=\"test\"\r\n".to_string(),
                            )
                        } else if path == "/v2/" || path == "/v2" {
                            (
                                "200 OK",
                                "application/json".to_string(),
                                b"{}".to_vec(),
                                String::new(),
                            )
                        } else if let Some((t, b)) = c.files.get(path) {
                            let d = format!("sha256:{}", hex::encode(Sha256::digest(b)));
                            (
                                "200 OK",
                                t.clone(),
                                b.clone(),
                                format!("Docker-Content-Digest: {d}\r\n"),
                            )
                        } else {
                            (
                                "404 Not Found",
                                "application/json".to_string(),
                                br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}"#
                                    .to_vec(),
                                String::new(),
                            )
                        }
                    };
                    let body = if method == "HEAD" { Vec::new() } else { body };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.write_all(&body).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Registry { addr, content }
    }

    fn put(&self, path: String, ctype: &str, body: Vec<u8>) {
        self.content
            .lock()
            .expect("lock")
            .files
            .insert(path, (ctype.to_string(), body));
    }
}

fn tar_entry(
    b: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    data: &[u8],
    link: Option<&str>,
) {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).expect("path");
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    if let Some(l) = link {
        h.set_link_name(l).expect("link");
    }
    h.set_cksum();
    b.append(&h, data).expect("append");
}

/// One-layer image: the host's static busybox as /bin/busybox and /bin/sh,
/// /etc/passwd and /etc/group with a user `app` (1234:2345), /tmp.
fn publish_busybox(reg: &Registry, repo: &str) {
    let busybox = std::fs::read("/usr/bin/busybox").expect("/usr/bin/busybox (static) is needed");
    let mut b = tar::Builder::new(Vec::new());
    use tar::EntryType as T;
    tar_entry(&mut b, "bin/", T::Directory, 0o755, b"", None);
    tar_entry(&mut b, "bin/busybox", T::Regular, 0o755, &busybox, None);
    tar_entry(&mut b, "bin/sh", T::Symlink, 0o777, b"", Some("busybox"));
    tar_entry(&mut b, "etc/", T::Directory, 0o755, b"", None);
    tar_entry(
        &mut b,
        "etc/passwd",
        T::Regular,
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1234:2345::/tmp:/bin/sh\n",
        None,
    );
    tar_entry(
        &mut b,
        "etc/group",
        T::Regular,
        0o644,
        b"root:x:0:\napp:x:2345:\n",
        None,
    );
    tar_entry(&mut b, "tmp/", T::Directory, 0o1777, b"", None);
    let tar = b.into_inner().expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin", "FROM_IMAGE=1"], "WorkingDir": "/tmp"},
        "rootfs": {"type": "layers", "diff_ids": [digest(&tar)]},
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(&gz), "size": gz.len()}],
    }).to_string().into_bytes();
    reg.put(
        format!("/v2/{repo}/blobs/{}", digest(&gz)),
        "application/octet-stream",
        gz,
    );
    reg.put(
        format!("/v2/{repo}/blobs/{}", digest(&config)),
        "application/octet-stream",
        config,
    );
    reg.put(
        format!("/v2/{repo}/manifests/1"),
        "application/vnd.oci.image.manifest.v1+json",
        manifest,
    );
}

const IMAGE: &str = "registry.test.invalid/ctr/busybox:1";

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

struct Cri {
    _daemon: Daemon,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

/// A daemon with the CRI on a temporary socket; `mirror`: a registry name
/// mapped to an `http://` address through certs.d.
async fn start_with(mirror: Option<(&str, &str)>) -> Cri {
    let dir = tempfile::Builder::new()
        .prefix("auraed-cri-stream-")
        .tempdir()
        .expect("tempdir");
    let socket = dir.path().join("cri.sock");
    let certs = dir.path().join("certs.d");
    let cni = dir.path().join("net.d");
    std::fs::create_dir_all(&cni).expect("mkdir");
    // Pods need a CNI network: the loopback plugin alone (Debian's
    // containernetworking-plugins); port-forward dials 127.0.0.1 in the pod.
    std::fs::write(
        cni.join("99-loopback.conf"),
        r#"{"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}"#,
    )
    .expect("cni config");
    if let Some((name, url)) = mirror {
        std::fs::create_dir_all(certs.join(name)).expect("mkdir");
        std::fs::write(
            certs.join(name).join("hosts.toml"),
            format!(
                "server = \"{url}\"\n[host.\"{url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .expect("hosts.toml");
    }
    let daemon = Daemon::start_with(
        None,
        &[
            "--cri-socket",
            socket.to_str().expect("utf-8"),
            "--registry-config-dir",
            certs.to_str().expect("utf-8"),
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

async fn start() -> Cri {
    start_with(None).await
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

fn streams(kinds: &[&str]) -> Vec<spdy::Headers> {
    kinds
        .iter()
        .map(|k| vec![("streamType".to_string(), k.to_string())])
        .collect()
}

/// A pod with one running `sh` container (stdin open, no log path).
async fn shell_container(rt: &mut RuntimeServiceClient<Channel>) -> (String, String) {
    let pod = run_pod(rt, false).await;
    let id = container_in(rt, &pod, &["sh"]).await;
    (pod, id)
}

/// A running container in `pod` (stdin open, no log path).
async fn container_in(rt: &mut RuntimeServiceClient<Channel>, pod: &str, cmd: &[&str]) -> String {
    let name = common::unique("c");
    let id = rt
        .create_container(proto::CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(proto::ContainerConfig {
                metadata: Some(proto::ContainerMetadata {
                    name: name.clone(),
                    attempt: 0,
                }),
                image: Some(proto::ImageSpec {
                    image: IMAGE.into(),
                    ..Default::default()
                }),
                command: cmd.iter().map(|s| s.to_string()).collect(),
                stdin: true,
                stdin_once: true,
                ..Default::default()
            }),
            sandbox_config: None,
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    rt.start_container(proto::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("StartContainer");
    id
}

#[tokio::test]
async fn exec_and_attach_in_a_container() {
    let reg = Registry::start(None).await;
    publish_busybox(&reg, "ctr/busybox");
    let mirror = format!("http://{}", reg.addr);
    let cri = start_with(Some(("registry.test.invalid", &mirror))).await;
    let ch = channel(&cri.socket).await;
    ImageServiceClient::new(ch.clone())
        .pull_image(proto::PullImageRequest {
            image: Some(proto::ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: None,
        })
        .await
        .expect("PullImage");
    let mut rt = RuntimeServiceClient::new(ch);
    let (pod, id) = shell_container(&mut rt).await;

    // Exec without a tty: stdout, stderr and the exit code.
    let url = rt
        .exec(proto::ExecRequest {
            container_id: id.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "echo out; echo err >&2; exit 4".into(),
            ],
            tty: false,
            stdin: false,
            stdout: true,
            stderr: true,
        })
        .await
        .expect("Exec")
        .into_inner()
        .url;
    let (code, conn) = upgrade(&url, "v4.channel.k8s.io").await;
    assert_eq!(code, 101);
    let mut conn = conn.expect("connection");
    let mut s = Vec::new();
    for h in streams(&["error", "stdout", "stderr"]) {
        s.push(conn.open(h).await.expect("stream"));
    }
    assert_eq!(read_all(&mut s[1].reader).await, b"out\n");
    assert_eq!(read_all(&mut s[2].reader).await, b"err\n");
    let status = String::from_utf8_lossy(&read_all(&mut s[0].reader).await).into_owned();
    assert!(
        status.contains("NonZeroExitCode") && status.contains(r#""message":"4""#),
        "{status}"
    );

    // Exec with a tty: the command runs on a terminal of the size asked.
    let url = rt
        .exec(proto::ExecRequest {
            container_id: id.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "read x; stty size; echo tty $x".into(),
            ],
            tty: true,
            stdin: true,
            stdout: true,
            stderr: false,
        })
        .await
        .expect("Exec")
        .into_inner()
        .url;
    let (code, conn) = upgrade(&url, "v4.channel.k8s.io").await;
    assert_eq!(code, 101);
    let mut conn = conn.expect("connection");
    let mut s = Vec::new();
    for h in streams(&["error", "stdin", "stdout", "resize"]) {
        s.push(conn.open(h).await.expect("stream"));
    }
    s[3].writer
        .write(br#"{"Width":77,"Height":22}"#)
        .await
        .expect("resize");
    tokio::time::sleep(Duration::from_millis(500)).await;
    s[1].writer.write(b"yes\n").await.expect("stdin");
    let out = String::from_utf8_lossy(&read_all(&mut s[2].reader).await).into_owned();
    assert!(out.contains("22 77") && out.contains("tty yes"), "{out:?}");
    assert_eq!(
        read_all(&mut s[0].reader).await,
        br#"{"metadata":{},"status":"Success"}"#
    );

    // Attach: what is typed reaches the container's stdin, its output
    // comes back, and closing stdin ends the attach.
    let url = rt
        .attach(proto::AttachRequest {
            container_id: id.clone(),
            stdin: true,
            tty: false,
            stdout: true,
            stderr: true,
        })
        .await
        .expect("Attach")
        .into_inner()
        .url;
    let (code, conn) = upgrade(&url, "v4.channel.k8s.io").await;
    assert_eq!(code, 101);
    let mut conn = conn.expect("connection");
    let mut s = Vec::new();
    for h in streams(&["error", "stdin", "stdout", "stderr"]) {
        s.push(conn.open(h).await.expect("stream"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    s[1].writer
        .write(b"echo -n hello; echo oops >&2\n")
        .await
        .expect("stdin");
    let got = tokio::time::timeout(Duration::from_secs(10), s[2].reader.read())
        .await
        .expect("output in time");
    // A partial line too (critest's `echo -n hello`).
    assert_eq!(got.as_deref(), Some(&b"hello"[..]));
    let got = tokio::time::timeout(Duration::from_secs(10), s[3].reader.read())
        .await
        .expect("output in time");
    assert_eq!(got.as_deref(), Some(&b"oops\n"[..]));
    s[1].writer.close().await.expect("fin");
    assert_eq!(
        read_all(&mut s[0].reader).await,
        br#"{"metadata":{},"status":"Success"}"#
    );

    // An attach without stdin ends when the container exits, after its
    // last output.
    let id = container_in(&mut rt, &pod, &["sh", "-c", "sleep 2; echo bye"]).await;
    let url = rt
        .attach(proto::AttachRequest {
            container_id: id,
            stdin: false,
            tty: false,
            stdout: true,
            stderr: true,
        })
        .await
        .expect("Attach")
        .into_inner()
        .url;
    let (code, conn) = upgrade(&url, "v4.channel.k8s.io").await;
    assert_eq!(code, 101);
    let mut conn = conn.expect("connection");
    let mut s = Vec::new();
    for h in streams(&["error", "stdout", "stderr"]) {
        s.push(conn.open(h).await.expect("stream"));
    }
    assert_eq!(read_all(&mut s[1].reader).await, b"bye\n");
    assert_eq!(
        read_all(&mut s[0].reader).await,
        br#"{"metadata":{},"status":"Success"}"#
    );

    rt.remove_pod_sandbox(proto::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("RemovePodSandbox");
}
