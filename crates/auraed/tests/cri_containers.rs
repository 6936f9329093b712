//! CRI containers end to end on the real daemon (issue 13): a pod and
//! containers from an image this test builds (the host's static busybox)
//! and serves from a loopback registry; start, the CRI log format (with a
//! partial line), ExecSync (output, exit code, timeout), stop → EXITED
//! with the exit code, OOMKilled, two containers sharing the pod's network
//! namespace, and remove leaving no mount, cgroup or process behind.
//! Needs root, busybox (static) and crun or runc, like the daemon tests.

mod common;

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

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

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

struct Cri {
    daemon: Daemon,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

/// A daemon with the CRI on a temporary socket; `mirrors` maps registry
/// names to `http://` addresses through certs.d.
async fn start(mirrors: &[(&str, &str)]) -> Cri {
    let dir = tempfile::Builder::new()
        .prefix("auraed-cri-")
        .tempdir()
        .expect("tempdir");
    let socket = dir.path().join("cri.sock");
    let certs = dir.path().join("certs.d");
    let cni_dir = dir.path().join("net.d");
    std::fs::create_dir_all(&cni_dir).expect("mkdir");
    // Pods need a CNI network (tests/cri_network.rs has a real one): the
    // loopback plugin alone (Debian's containernetworking-plugins).
    std::fs::write(
        cni_dir.join("99-loopback.conf"),
        r#"{"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}"#,
    )
    .expect("cni config");
    for (name, url) in mirrors {
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
            cni_dir.to_str().expect("utf-8"),
        ],
    )
    .await;
    Cri {
        daemon,
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
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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

struct Env {
    cri: Cri,
    rt: RuntimeServiceClient<Channel>,
    _reg: Registry,
    logs: tempfile::TempDir,
}

/// A failed assertion must not leave container rootfs mounts behind on
/// the shared host: whatever the daemon mounted under its directory goes.
impl Drop for Env {
    fn drop(&mut self) {
        let root = self.cri.daemon.dir.path().display().to_string();
        for line in mounts().lines() {
            let Some(point) = line.split(' ').nth(4) else {
                continue;
            };
            if point.starts_with(&root) {
                if let Ok(c) = std::ffi::CString::new(point) {
                    // SAFETY: a valid NUL-terminated path.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
        }
    }
}

async fn env() -> Env {
    let reg = Registry::start(None).await;
    publish_busybox(&reg, "ctr/busybox");
    let mirror = format!("http://{}", reg.addr);
    let cri = start(&[("registry.test.invalid", &mirror)]).await;
    let ch = channel(&cri.socket).await;
    let mut images = ImageServiceClient::new(ch.clone());
    images
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
    Env {
        cri,
        rt: RuntimeServiceClient::new(ch),
        _reg: reg,
        logs: tempfile::tempdir().expect("tempdir"),
    }
}

fn pod_config(env: &Env, name: &str) -> proto::PodSandboxConfig {
    proto::PodSandboxConfig {
        metadata: Some(proto::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "test".into(),
            attempt: 0,
        }),
        log_directory: env.logs.path().join(name).display().to_string(),
        ..Default::default()
    }
}

async fn run_pod(env: &mut Env, config: &proto::PodSandboxConfig) -> String {
    env.rt
        .run_pod_sandbox(proto::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id
}

fn ctr(name: &str, command: &[&str]) -> proto::ContainerConfig {
    proto::ContainerConfig {
        metadata: Some(proto::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(proto::ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

async fn create(
    env: &mut Env,
    pod: &str,
    pod_config: &proto::PodSandboxConfig,
    config: proto::ContainerConfig,
) -> String {
    env.rt
        .create_container(proto::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id
}

async fn start_ctr(env: &mut Env, id: &str) {
    env.rt
        .start_container(proto::StartContainerRequest {
            container_id: id.into(),
        })
        .await
        .expect("StartContainer");
}

async fn cstatus(env: &mut Env, id: &str) -> proto::ContainerStatus {
    env.rt
        .container_status(proto::ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        })
        .await
        .expect("ContainerStatus")
        .into_inner()
        .status
        .expect("status")
}

async fn wait_exited(env: &mut Env, id: &str) -> proto::ContainerStatus {
    for _ in 0..200 {
        let s = cstatus(env, id).await;
        if s.state == proto::ContainerState::ContainerExited as i32 {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("container {id} did not exit");
}

async fn exec(
    env: &mut Env,
    id: &str,
    cmd: &[&str],
    timeout: i64,
) -> Result<proto::ExecSyncResponse, tonic::Status> {
    env.rt
        .exec_sync(proto::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout,
        })
        .await
        .map(|r| r.into_inner())
}

fn mounts() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()
}

#[tokio::test]
async fn containers_run_log_exec_stop_and_remove() {
    let mut env = env().await;
    let pc = pod_config(&env, &common::unique("pod"));
    let pod = run_pod(&mut env, &pc).await;

    // Output in the CRI format, a partial last line, env and cwd from the image and the config.
    let mut c = ctr(
        "echo",
        &[
            "/bin/sh",
            "-c",
            "echo one; echo two >&2; echo \"$FROM_IMAGE $MINE $(pwd) $(id -u)\"; printf tail",
        ],
    );
    c.envs = vec![proto::KeyValue {
        key: "MINE".into(),
        value: b"2".to_vec(),
    }];
    let id = create(&mut env, &pod, &pc, c).await;
    let s = cstatus(&mut env, &id).await;
    assert_eq!(s.state, proto::ContainerState::ContainerCreated as i32);
    start_ctr(&mut env, &id).await;
    let s = wait_exited(&mut env, &id).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"));
    assert!(s.started_at > 0 && s.finished_at >= s.started_at);
    let log = std::fs::read_to_string(&s.log_path).expect("log file");
    let recs: Vec<(String, String, String)> = log
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.splitn(4, ' ').collect();
            assert_eq!(f.len(), 4, "{l:?}");
            assert!(f[0].ends_with('Z') && f[0].contains('T'), "{l:?}");
            (f[1].to_string(), f[2].to_string(), f[3].to_string())
        })
        .collect();
    let has = |s: &str, t: &str, m: &str| recs.iter().any(|r| r.0 == s && r.1 == t && r.2 == m);
    assert!(has("stdout", "F", "one"), "{log}");
    assert!(has("stderr", "F", "two"), "{log}");
    assert!(has("stdout", "F", "1 2 /tmp 0"), "{log}");
    assert!(has("stdout", "P", "tail"), "{log}");

    // A long-running one: exec_sync, user from the image's passwd, timeout.
    let mut c = ctr(
        "sleeper",
        &[
            "/bin/sh",
            "-c",
            "trap 'exit 7' TERM; while true; do sleep 0.1; done",
        ],
    );
    c.linux = Some(proto::LinuxContainerConfig {
        security_context: Some(proto::LinuxContainerSecurityContext {
            run_as_username: "app".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let id2 = create(&mut env, &pod, &pc, c).await;
    start_ctr(&mut env, &id2).await;
    let out = exec(
        &mut env,
        &id2,
        &["/bin/sh", "-c", "id -u; id -g; echo err >&2; exit 3"],
        10,
    )
    .await
    .expect("ExecSync");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1234\n2345\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(out.exit_code, 3);
    // As critest does it: the client's deadline is the timeout too (the
    // server must still kill the command once the client has gone).
    let mut req = tonic::Request::new(proto::ExecSyncRequest {
        container_id: id2.clone(),
        cmd: vec!["/bin/busybox".into(), "sleep".into(), "4321".into()],
        timeout: 1,
    });
    req.set_timeout(Duration::from_secs(1));
    let e = env.rt.exec_sync(req).await.expect_err("timeout");
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    let e = exec(&mut env, &id2, &["/bin/sh", "-c", "sleep 30"], 1)
        .await
        .expect_err("timeout");
    assert_eq!(e.code(), Code::DeadlineExceeded);
    let out = exec(
        &mut env,
        &id2,
        &["/bin/sh", "-c", "ps -o args | grep '[s]leep [34]' || true"],
        10,
    )
    .await
    .expect("ExecSync");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "",
        "the timed-out processes are gone"
    );

    // Stats of a running container.
    let st = env
        .rt
        .container_stats(proto::ContainerStatsRequest {
            container_id: id2.clone(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .expect("stats");
    assert!(st.cpu.as_ref().is_some_and(|c| c.timestamp > 0));
    assert!(st
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes)
        .is_some());

    // Stop: SIGTERM is trapped → exit 7.
    env.rt
        .stop_container(proto::StopContainerRequest {
            container_id: id2.clone(),
            timeout: 10,
        })
        .await
        .expect("StopContainer");
    let s = cstatus(&mut env, &id2).await;
    assert_eq!(s.state, proto::ContainerState::ContainerExited as i32);
    assert_eq!((s.exit_code, s.reason.as_str()), (7, "Error"));
    // Idempotent; unknown ids are fine.
    env.rt
        .stop_container(proto::StopContainerRequest {
            container_id: id2.clone(),
            timeout: 0,
        })
        .await
        .expect("again");
    env.rt
        .remove_container(proto::RemoveContainerRequest {
            container_id: "0".repeat(64),
        })
        .await
        .expect("unknown");
    let e = env
        .rt
        .container_status(proto::ContainerStatusRequest {
            container_id: "0".repeat(64),
            verbose: false,
        })
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound);

    // List with filters.
    let list = env
        .rt
        .list_containers(proto::ListContainersRequest {
            filter: Some(proto::ContainerFilter {
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("List")
        .into_inner()
        .containers;
    assert_eq!(list.len(), 2);

    // Remove leaves nothing: no mount, no directory, no cell.
    for cid in [&id, &id2] {
        env.rt
            .remove_container(proto::RemoveContainerRequest {
                container_id: cid.to_string(),
            })
            .await
            .expect("RemoveContainer");
        let dir = env
            .cri
            .daemon
            .dir
            .path()
            .join("run/cri/containers")
            .join(cid);
        assert!(!dir.exists(), "{} is removed", dir.display());
        assert!(
            !mounts().contains(cid.as_str()),
            "no mount of {cid} is left"
        );
    }
    let cells = cell_names(&env.cri).await;
    assert!(!cells.iter().any(|c| c.contains("/c-")), "{cells:?}");
    env.rt
        .remove_pod_sandbox(proto::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .expect("RemovePodSandbox");
}

#[tokio::test]
async fn containers_share_the_pod_network_and_oom_is_reported() {
    let mut env = env().await;
    let pc = pod_config(&env, &common::unique("pod"));
    let pod = run_pod(&mut env, &pc).await;
    let loop_cmd = ["/bin/sh", "-c", "while true; do sleep 0.1; done"];
    let a = create(&mut env, &pod, &pc, ctr("a", &loop_cmd)).await;
    let b = create(&mut env, &pod, &pc, ctr("b", &loop_cmd)).await;
    start_ctr(&mut env, &a).await;
    start_ctr(&mut env, &b).await;
    let ns = |o: proto::ExecSyncResponse| String::from_utf8_lossy(&o.stdout).trim().to_string();
    let na = ns(exec(
        &mut env,
        &a,
        &["/bin/busybox", "readlink", "/proc/self/ns/net"],
        10,
    )
    .await
    .expect("exec a"));
    let nb = ns(exec(
        &mut env,
        &b,
        &["/bin/busybox", "readlink", "/proc/self/ns/net"],
        10,
    )
    .await
    .expect("exec b"));
    assert!(na.starts_with("net:["), "{na}");
    assert_eq!(na, nb, "one network namespace per pod");
    let host = std::fs::read_link("/proc/self/ns/net")
        .expect("ns")
        .display()
        .to_string();
    assert_ne!(na, host, "not the host's");
    let ma = ns(exec(
        &mut env,
        &a,
        &["/bin/busybox", "readlink", "/proc/self/ns/mnt"],
        10,
    )
    .await
    .expect("exec a"));
    let mb = ns(exec(
        &mut env,
        &b,
        &["/bin/busybox", "readlink", "/proc/self/ns/mnt"],
        10,
    )
    .await
    .expect("exec b"));
    assert_ne!(ma, mb, "a mount namespace each");

    // A memory hog in a 32 MiB container is OOM-killed and says so.
    // (tail keeps the one endless "line" of /dev/zero in memory.)
    let mut c = ctr("hog", &["/bin/busybox", "tail", "/dev/zero"]);
    c.linux = Some(proto::LinuxContainerConfig {
        resources: Some(proto::LinuxContainerResources {
            memory_limit_in_bytes: 32 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let hog = create(&mut env, &pod, &pc, c).await;
    start_ctr(&mut env, &hog).await;
    let s = wait_exited(&mut env, &hog).await;
    assert_ne!(s.exit_code, 0);
    assert_eq!(s.reason, "OOMKilled", "{s:?}");

    // A crash of the daemon: the containers run on (their monitors are not
    // its children), are listed again and still answer.
    env.cri.daemon.restart(libc::SIGKILL, None).await;
    env.rt = RuntimeServiceClient::new(channel(&env.cri.socket).await);
    let s = cstatus(&mut env, &a).await;
    assert_eq!(s.state, proto::ContainerState::ContainerRunning as i32);
    let s = cstatus(&mut env, &hog).await;
    assert_eq!(s.reason, "OOMKilled");
    let out = exec(&mut env, &b, &["/bin/busybox", "echo", "still"], 10)
        .await
        .expect("exec after the restart");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "still\n");

    // Removing the pod removes its containers.
    env.rt
        .stop_pod_sandbox(proto::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("StopPodSandbox");
    let s = cstatus(&mut env, &a).await;
    assert_eq!(s.state, proto::ContainerState::ContainerExited as i32);
    env.rt
        .remove_pod_sandbox(proto::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .expect("RemovePodSandbox");
    let list = env
        .rt
        .list_containers(proto::ListContainersRequest::default())
        .await
        .expect("List")
        .into_inner()
        .containers;
    assert!(list.is_empty(), "{list:?}");
    for id in [&a, &b, &hog] {
        assert!(!mounts().contains(id.as_str()));
    }
}

async fn cell_names(cri: &Cri) -> Vec<String> {
    cri.daemon
        .client()
        .await
        .cells()
        .list(aurae_client::proto::cells::CellServiceListRequest::default())
        .await
        .expect("List")
        .into_inner()
        .cells
        .into_iter()
        .filter_map(|c| c.cell.map(|c| c.name))
        .collect()
}

/// GetSubProcessStream of a container's init pid (verbose ContainerStatus
/// names it): its stdout or stderr lines from the CRI log, P pieces joined,
/// live while it runs, ending once it exited and all is read.
#[tokio::test]
async fn a_containers_output_streams_by_its_pid() {
    use aurae_client::proto::observe::{GetSubProcessStreamRequest, LogChannelType};
    let mut env = env().await;
    let pc = pod_config(&env, &common::unique("pod"));
    let pod = run_pod(&mut env, &pc).await;
    // A line longer than a CRI record (16 KiB) arrives as P pieces + F.
    let script = "echo one; echo two >&2; sleep 1; head -c 20000 /dev/zero | tr '\\0' x; echo; \
                  echo three; printf tail";
    let id = create(
        &mut env,
        &pod,
        &pc,
        ctr("talker", &["/bin/sh", "-c", script]),
    )
    .await;
    start_ctr(&mut env, &id).await;
    let info = env
        .rt
        .container_status(proto::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: true,
        })
        .await
        .expect("ContainerStatus")
        .into_inner()
        .info;
    let v: serde_json::Value = serde_json::from_str(&info["info"]).expect("info json");
    let pid = v["pid"].as_i64().expect("pid") as i32;
    assert!(pid > 0, "{v}");
    let client = env.cri.daemon.client().await;
    let read = |channel: LogChannelType, blocks: bool| {
        let client = client.clone();
        async move {
            let mut s = client
                .observe()
                .get_sub_process_stream(GetSubProcessStreamRequest {
                    channel_type: channel.into(),
                    process_id: pid,
                    max_lines_per_message: 0,
                    line_blocks: blocks,
                })
                .await
                .expect("GetSubProcessStream of a container pid")
                .into_inner();
            let mut lines = Vec::new();
            let ended = tokio::time::timeout(std::time::Duration::from_secs(30), async {
                while let Some(r) = s.message().await.expect("stream") {
                    lines.extend(r.item.map(|i| i.line));
                    if let Some(b) = r.block {
                        lines.extend(b.text.lines().map(str::to_string));
                    }
                }
            })
            .await;
            assert!(ended.is_ok(), "the stream did not end: {lines:?}");
            lines
        }
    };
    // Opened while the container runs: follows it to its end.
    let (out, err) = tokio::join!(
        read(LogChannelType::Stdout, false),
        read(LogChannelType::Stderr, true)
    );
    let long = "x".repeat(20000);
    assert_eq!(out, ["one", long.as_str(), "three", "tail"]);
    assert_eq!(err, ["two"]);
    let s = wait_exited(&mut env, &id).await;
    assert_eq!(s.exit_code, 0);
    // After the exit: the whole log again, then the end.
    assert_eq!(read(LogChannelType::Stderr, false).await, ["two"]);
    env.rt
        .remove_container(proto::RemoveContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("RemoveContainer");
    env.rt
        .remove_pod_sandbox(proto::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .expect("RemovePodSandbox");
}
