//! The Kubernetes CRI socket of the real daemon: runtime identity and
//! readiness, UNIMPLEMENTED with reasons, and the ImageService end to end
//! against a registry this test serves on loopback (plain HTTP, reached
//! through a containerd-style certs.d mirror mapping, as critest's setup
//! configures runtimes): pull, verification, content-addressed store and
//! layer unpacking, list/status/remove, credentials.

mod common;

use std::{
    collections::HashMap,
    io::Write,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
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

    fn requests(&self) -> Vec<String> {
        self.content.lock().expect("lock").requests.clone()
    }
}

// ---------------------------------------------------------------- images

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

struct Layer {
    tar: Vec<u8>,
    gz: Vec<u8>,
}

fn layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Layer {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    let tar = b.into_inner().expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    Layer {
        gz: gz.finish().expect("gzip"),
        tar,
    }
}

fn entry(
    b: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    data: &[u8],
    link: Option<&str>,
) {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).expect("path");
    h.set_entry_type(kind);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
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

/// A two-layer image: a base with files, a hard link and a directory, and
/// an upper layer that whites out a file and makes a directory opaque.
/// Returns (manifest bytes, config digest, layer blob digests).
fn publish(
    reg: &Registry,
    repo: &str,
    tags: &[&str],
    user: &str,
    tamper: bool,
) -> (Vec<u8>, String, Vec<String>) {
    let base = layer(|b| {
        entry(b, "bin/", tar::EntryType::Directory, b"", None);
        entry(
            b,
            "bin/busybox",
            tar::EntryType::Regular,
            b"#!busybox",
            None,
        );
        entry(b, "bin/sh", tar::EntryType::Link, b"", Some("bin/busybox"));
        entry(b, "etc/", tar::EntryType::Directory, b"", None);
        entry(b, "etc/motd", tar::EntryType::Regular, b"hello", None);
        entry(b, "var/", tar::EntryType::Directory, b"", None);
        entry(b, "var/cache/", tar::EntryType::Directory, b"", None);
        entry(b, "var/cache/old", tar::EntryType::Regular, b"old", None);
    });
    let upper = layer(|b| {
        entry(b, "etc/.wh.motd", tar::EntryType::Regular, b"", None);
        entry(
            b,
            "var/cache/.wh..wh..opq",
            tar::EntryType::Regular,
            b"",
            None,
        );
        entry(
            b,
            "var/cache/new",
            tar::EntryType::Regular,
            repo.as_bytes(),
            None,
        );
    });
    let layers = [&base, &upper];
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"User": user, "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| digest(&l.tar)).collect::<Vec<_>>()},
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len()},
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(&l.gz), "size": l.gz.len()
        })).collect::<Vec<_>>(),
    })
    .to_string()
    .into_bytes();
    for l in layers {
        let mut body = l.gz.clone();
        if tamper {
            let last = body.len() - 1;
            body[last] ^= 0xff;
        }
        reg.put(
            format!("/v2/{repo}/blobs/{}", digest(&l.gz)),
            "application/octet-stream",
            body,
        );
    }
    reg.put(
        format!("/v2/{repo}/blobs/{}", digest(&config)),
        "application/octet-stream",
        config.clone(),
    );
    for t in tags {
        reg.put(
            format!("/v2/{repo}/manifests/{t}"),
            "application/vnd.oci.image.manifest.v1+json",
            manifest.clone(),
        );
    }
    reg.put(
        format!("/v2/{repo}/manifests/{}", digest(&manifest)),
        "application/vnd.oci.image.manifest.v1+json",
        manifest.clone(),
    );
    (
        manifest,
        digest(&config),
        layers.iter().map(|l| digest(&l.gz)).collect(),
    )
}

// ---------------------------------------------------------------- daemon

struct Cri {
    daemon: Daemon,
    _dir: tempfile::TempDir,
    socket: PathBuf,
    cni_dir: PathBuf,
    store: PathBuf,
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
    let store = daemon.dir.path().join("lib/cri/images");
    Cri {
        daemon,
        _dir: dir,
        socket,
        cni_dir,
        store,
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

fn spec(image: &str) -> Option<proto::ImageSpec> {
    Some(proto::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

async fn pull(
    images: &mut ImageServiceClient<Channel>,
    image: &str,
    auth: Option<proto::AuthConfig>,
) -> Result<String, tonic::Status> {
    images
        .pull_image(proto::PullImageRequest {
            image: spec(image),
            auth,
            sandbox_config: None,
        })
        .await
        .map(|r| r.into_inner().image_ref)
}

async fn status(
    images: &mut ImageServiceClient<Channel>,
    image: &str,
    verbose: bool,
) -> proto::ImageStatusResponse {
    images
        .image_status(proto::ImageStatusRequest {
            image: spec(image),
            verbose,
        })
        .await
        .expect("ImageStatus")
        .into_inner()
}

fn hexof(d: &str) -> &str {
    d.trim_start_matches("sha256:")
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn runtime_identity_readiness_and_unimplemented_reasons() {
    let cri = start(&[]).await;
    let mode = std::fs::metadata(&cri.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o660,
        "the CRI socket is rw for root and its group only"
    );
    let mut rt = RuntimeServiceClient::new(channel(&cri.socket).await);

    let v = rt
        .version(proto::VersionRequest::default())
        .await
        .expect("Version")
        .into_inner();
    assert_eq!(
        (
            v.runtime_name.as_str(),
            v.runtime_api_version.as_str(),
            v.version.as_str()
        ),
        ("auraed", "v1", "0.1.0")
    );

    let ready = |s: &proto::StatusResponse, kind: &str| {
        s.status
            .as_ref()
            .and_then(|st| st.conditions.iter().find(|c| c.r#type == kind))
            .map(|c| c.status)
    };
    let s = rt
        .status(proto::StatusRequest { verbose: true })
        .await
        .expect("Status")
        .into_inner();
    assert_eq!(ready(&s, "RuntimeReady"), Some(true));
    assert_eq!(ready(&s, "NetworkReady"), Some(false), "no CNI config yet");
    std::fs::write(cri.cni_dir.join("10-net.conflist"), "{}").expect("cni config");
    let s = rt
        .status(proto::StatusRequest::default())
        .await
        .expect("Status")
        .into_inner();
    assert_eq!(ready(&s, "NetworkReady"), Some(true));

    let c = rt
        .runtime_config(proto::RuntimeConfigRequest::default())
        .await
        .expect("RuntimeConfig")
        .into_inner();
    assert_eq!(
        c.linux.map(|l| l.cgroup_driver),
        Some(proto::CgroupDriver::Cgroupfs as i32)
    );

    let e = rt
        .create_container(proto::CreateContainerRequest::default())
        .await
        .expect_err("CreateContainer without a sandbox");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = rt
        .checkpoint_container(proto::CheckpointContainerRequest::default())
        .await
        .expect_err("CheckpointContainer is not there yet");
    assert_eq!(e.code(), Code::Unimplemented);
    assert!(
        e.message().contains("CheckpointContainer") && e.message().contains("not implemented"),
        "{}",
        e.message()
    );

    // Idempotent stops and removes of unknown ids succeed; status is NOT_FOUND.
    rt.stop_pod_sandbox(proto::StopPodSandboxRequest {
        pod_sandbox_id: "nope".into(),
    })
    .await
    .expect("StopPodSandbox of an unknown id");
    rt.remove_container(proto::RemoveContainerRequest {
        container_id: "nope".into(),
    })
    .await
    .expect("RemoveContainer of an unknown id");
    let e = rt
        .pod_sandbox_status(proto::PodSandboxStatusRequest {
            pod_sandbox_id: "nope".into(),
            verbose: false,
        })
        .await
        .expect_err("unknown sandbox");
    assert_eq!(e.code(), Code::NotFound);
    let e = rt
        .stop_pod_sandbox(proto::StopPodSandboxRequest::default())
        .await
        .expect_err("empty id");
    assert_eq!(e.code(), Code::InvalidArgument);

    // The daemon removes the socket when it stops.
    let socket = cri.socket.clone();
    drop(cri);
    assert!(!socket.exists(), "CRI socket left behind");
}

#[tokio::test]
async fn images_pull_through_a_mirror_list_status_remove() {
    let reg = Registry::start(None).await;
    let (manifest, id, blobs) = publish(&reg, "demo/app", &["1", "2"], "1002:1003", false);
    let mirror = format!("http://{}", reg.addr);
    let cri = start(&[("registry.test.invalid", &mirror)]).await;
    let mut images = ImageServiceClient::new(channel(&cri.socket).await);

    let got = pull(&mut images, "registry.test.invalid/demo/app:1", None)
        .await
        .expect("pull :1");
    assert_eq!(got, id, "the image id is the config digest");
    assert!(
        reg.requests()
            .iter()
            .any(|r| r.contains("/v2/demo/app/manifests/1")),
        "pulled through the mirror: {:?}",
        reg.requests()
    );
    // The same manifest under another tag: one image, both tags, blobs
    // fetched once.
    let blob_gets = |reg: &Registry| {
        reg.requests()
            .iter()
            .filter(|r| r.starts_with("GET") && r.contains("/blobs/"))
            .count()
    };
    let before = blob_gets(&reg);
    assert_eq!(
        pull(&mut images, "registry.test.invalid/demo/app:2", None)
            .await
            .expect("pull :2"),
        id
    );
    assert_eq!(blob_gets(&reg), before, "nothing downloaded twice");

    let list = images
        .list_images(proto::ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner();
    assert_eq!(list.images.len(), 1);
    let img = &list.images[0];
    assert_eq!(img.id, id);
    assert_eq!(
        img.repo_tags,
        [
            "registry.test.invalid/demo/app:1",
            "registry.test.invalid/demo/app:2"
        ]
    );
    assert_eq!(
        img.repo_digests,
        [format!(
            "registry.test.invalid/demo/app@{}",
            digest(&manifest)
        )]
    );
    assert_eq!(img.uid.as_ref().map(|u| u.value), Some(1002));
    assert!(img.size > 0);

    // Status by tag, id, short id and digest reference; verbose has the config.
    for name in [
        "registry.test.invalid/demo/app:2".to_string(),
        id.clone(),
        hexof(&id)[..12].to_string(),
        format!("registry.test.invalid/demo/app@{}", digest(&manifest)),
    ] {
        let s = status(&mut images, &name, false).await;
        assert_eq!(s.image.map(|i| i.id), Some(id.clone()), "status of {name}");
    }
    let s = status(&mut images, "registry.test.invalid/demo/app:1", true).await;
    let info: serde_json::Value =
        serde_json::from_str(&s.info["info"]).expect("verbose info is JSON");
    assert_eq!(info["imageSpec"]["config"]["User"], "1002:1003");
    assert!(
        status(&mut images, "registry.test.invalid/demo/app:9", false)
            .await
            .image
            .is_none()
    );

    // The layers, unpacked once each into overlayfs lower directories.
    let base = cri.store.join("layers/sha256").join(hexof(&blobs[0]));
    let upper = cri.store.join("layers/sha256").join(hexof(&blobs[1]));
    let ino = |p: PathBuf| std::fs::metadata(p).expect("file").ino();
    assert_eq!(
        ino(base.join("bin/sh")),
        ino(base.join("bin/busybox")),
        "hard link"
    );
    assert_eq!(
        std::fs::read(base.join("etc/motd")).expect("motd"),
        b"hello"
    );
    let wh = std::fs::symlink_metadata(upper.join("etc/motd")).expect("whiteout");
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout is a 0/0 char device"
    );
    assert!(!upper.join("etc/.wh.motd").exists());
    assert!(
        auraed_cri::image::unpack::is_opaque(&upper.join("var/cache")),
        "opaque dir marked"
    );
    assert_eq!(
        std::fs::read(upper.join("var/cache/new")).expect("new"),
        b"demo/app"
    );
    for b in &blobs {
        assert!(cri.store.join("blobs/sha256").join(hexof(b)).exists());
    }

    let fs = images
        .image_fs_info(proto::ImageFsInfoRequest::default())
        .await
        .expect("ImageFsInfo")
        .into_inner();
    let usage = &fs.image_filesystems[0];
    assert!(usage.used_bytes.as_ref().map(|u| u.value).unwrap_or(0) > 0);
    assert!(usage
        .fs_id
        .as_ref()
        .is_some_and(|f| f.mountpoint.ends_with("cri/images")));

    // Remove by one tag removes the image (all its tags) and its files;
    // removing again is fine.
    images
        .remove_image(proto::RemoveImageRequest {
            image: spec("registry.test.invalid/demo/app:1"),
        })
        .await
        .expect("RemoveImage");
    assert!(status(&mut images, &id, false).await.image.is_none());
    assert!(
        !base.exists() && !upper.exists(),
        "layers of a removed image are deleted"
    );
    assert!(!cri.store.join("blobs/sha256").join(hexof(&id)).exists());
    images
        .remove_image(proto::RemoveImageRequest { image: spec(&id) })
        .await
        .expect("RemoveImage again");

    // A restart keeps pulled images.
    pull(&mut images, "registry.test.invalid/demo/app:1", None)
        .await
        .expect("pull again");
    let mut cri = cri;
    cri.daemon.restart(libc::SIGTERM, None).await;
    let mut images = ImageServiceClient::new(channel(&cri.socket).await);
    assert_eq!(
        status(&mut images, "registry.test.invalid/demo/app:1", false)
            .await
            .image
            .map(|i| i.id),
        Some(id)
    );
}

#[tokio::test]
async fn images_are_verified_and_credentials_used() {
    let user_pass = "tester:s3cret";
    let reg = Registry::start(Some(format!(
        "Basic {}",
        base64_encode(user_pass.as_bytes())
    )))
    .await;
    publish(&reg, "private/app", &["1"], "www-data", false);
    let (_, bad_id, bad_blobs) = publish(&reg, "bad/app", &["1"], "", true);
    let mirror = format!("http://{}", reg.addr);
    let cri = start(&[("registry.test.invalid", &mirror)]).await;
    let mut images = ImageServiceClient::new(channel(&cri.socket).await);

    let e = pull(&mut images, "registry.test.invalid/private/app:1", None)
        .await
        .expect_err("no credentials");
    assert_ne!(e.code(), Code::Ok);
    let auth = proto::AuthConfig {
        username: "tester".into(),
        password: "s3cret".into(),
        ..Default::default()
    };
    let id = pull(
        &mut images,
        "registry.test.invalid/private/app:1",
        Some(auth.clone()),
    )
    .await
    .expect("with credentials");
    let s = status(&mut images, &id, false).await.image.expect("pulled");
    assert_eq!((s.uid, s.username.as_str()), (None, "www-data"));
    // The `auth` form (base64 of user:password) works too.
    images
        .remove_image(proto::RemoveImageRequest { image: spec(&id) })
        .await
        .expect("remove");
    let auth64 = proto::AuthConfig {
        auth: base64_encode(user_pass.as_bytes()),
        ..Default::default()
    };
    pull(
        &mut images,
        "registry.test.invalid/private/app:1",
        Some(auth64),
    )
    .await
    .expect("auth form");

    // Tampered layer blobs are refused and leave nothing behind.
    let e = pull(&mut images, "registry.test.invalid/bad/app:1", Some(auth))
        .await
        .expect_err("tampered");
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(status(&mut images, &bad_id, false).await.image.is_none());
    // (Its base layer is the good image's, already stored: only the upper
    // one is fetched, and refused.)
    let upper = hexof(&bad_blobs[1]);
    assert!(!cri.store.join("layers/sha256").join(upper).exists());
    assert!(!cri.store.join("blobs/sha256").join(upper).exists());
    assert!(
        std::fs::read_dir(cri.store.join("tmp"))
            .expect("tmp")
            .next()
            .is_none(),
        "no partial download left in tmp/"
    );
    // Unknown images and bad references.
    let e = pull(
        &mut images,
        "registry.test.invalid/private/none:1",
        Some(proto::AuthConfig {
            username: "tester".into(),
            password: "s3cret".into(),
            ..Default::default()
        }),
    )
    .await
    .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = pull(&mut images, "Not A Reference", None)
        .await
        .expect_err("bad reference");
    assert_eq!(e.code(), Code::InvalidArgument);
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The names of the daemon's top-level cells (Aurae API).
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

#[tokio::test]
async fn pod_sandboxes_are_cells() {
    let cri = start(&[]).await;
    // Pods need a CNI network (tests/cri_network.rs has a real one): the
    // loopback plugin alone (Debian's containernetworking-plugins).
    std::fs::write(
        cri.cni_dir.join("99-loopback.conf"),
        r#"{"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}"#,
    )
    .expect("cni config");
    let mut rt = RuntimeServiceClient::new(channel(&cri.socket).await);
    let name = common::unique("pod");
    let config = |attempt| proto::PodSandboxConfig {
        metadata: Some(proto::PodSandboxMetadata {
            name: name.clone(),
            uid: format!("uid-{name}"),
            namespace: "test".into(),
            attempt,
        }),
        labels: [("app".to_string(), "demo".to_string())].into(),
        annotations: [("note".to_string(), "kept".to_string())].into(),
        ..Default::default()
    };
    let run = |attempt| proto::RunPodSandboxRequest {
        config: Some(config(attempt)),
        runtime_handler: String::new(),
    };
    let id = rt
        .run_pod_sandbox(run(0))
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    let e = rt
        .run_pod_sandbox(run(0))
        .await
        .expect_err("the same pod twice");
    assert_eq!(e.code(), Code::AlreadyExists);

    // The sandbox is a cell of the daemon's, listed by the Aurae API too.
    let cell = format!("cri-{}", &id[..16]);
    assert!(cell_names(&cri).await.contains(&cell));

    let st = rt
        .pod_sandbox_status(proto::PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner()
        .status
        .expect("status");
    assert_eq!(st.state, proto::PodSandboxState::SandboxReady as i32);
    assert_eq!(st.metadata.map(|m| m.name), Some(name.clone()));
    assert_eq!(st.labels.get("app").map(String::as_str), Some("demo"));
    assert_eq!(st.annotations.get("note").map(String::as_str), Some("kept"));

    let lister = rt.clone();
    let list = |filter: proto::PodSandboxFilter| {
        let mut rt = lister.clone();
        async move {
            rt.list_pod_sandbox(proto::ListPodSandboxRequest {
                filter: Some(filter),
            })
            .await
            .expect("ListPodSandbox")
            .into_inner()
            .items
        }
    };
    let by_id = proto::PodSandboxFilter {
        id: id[..12].to_string(),
        ..Default::default()
    };
    assert_eq!(list(by_id).await.len(), 1);
    let by_label = proto::PodSandboxFilter {
        label_selector: [("app".to_string(), "other".to_string())].into(),
        ..Default::default()
    };
    assert!(list(by_label).await.is_empty());

    // Stop frees the cell and keeps the record (not ready); twice is fine.
    for _ in 0..2 {
        rt.stop_pod_sandbox(proto::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .expect("StopPodSandbox");
    }
    let not_ready = proto::PodSandboxFilter {
        state: Some(proto::PodSandboxStateValue {
            state: proto::PodSandboxState::SandboxNotready as i32,
        }),
        ..Default::default()
    };
    assert_eq!(list(not_ready).await.len(), 1);
    assert!(!cell_names(&cri).await.contains(&cell), "the cell is freed");

    rt.remove_pod_sandbox(proto::RemovePodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await
    .expect("RemovePodSandbox");
    let e = rt
        .pod_sandbox_status(proto::PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .expect_err("removed");
    assert_eq!(e.code(), Code::NotFound);

    // A sandbox survives a crash of the daemon (its cell is re-adopted).
    let id2 = rt
        .run_pod_sandbox(run(1))
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    let mut cri = cri;
    cri.daemon.restart(libc::SIGKILL, None).await;
    let mut rt = RuntimeServiceClient::new(channel(&cri.socket).await);
    let items = rt
        .list_pod_sandbox(proto::ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert_eq!(
        items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        [id2.as_str()]
    );
    assert_eq!(items[0].state, proto::PodSandboxState::SandboxReady as i32);
    rt.remove_pod_sandbox(proto::RemovePodSandboxRequest {
        pod_sandbox_id: id2,
    })
    .await
    .expect("RemovePodSandbox");
}

/// GetPosixSignalsStream with WORKLOAD_TYPE_POD_SANDBOX (id = the sandbox
/// id): the signals delivered inside that pod, not those of another pod.
#[tokio::test]
async fn signals_of_a_pod_sandbox() {
    use aurae_client::proto::observe::{GetPosixSignalsStreamRequest, Workload, WorkloadType};
    use common::observe::{kill, start as start_exe, STEP};
    let cri = start(&[]).await;
    // Pods need a CNI network: the loopback plugin alone.
    std::fs::write(
        cri.cni_dir.join("99-loopback.conf"),
        r#"{"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}"#,
    )
    .expect("cni config");
    let mut rt = RuntimeServiceClient::new(channel(&cri.socket).await);
    let mut pods = Vec::new();
    for n in ["sig-a", "sig-b"] {
        let name = common::unique(n);
        let id = rt
            .run_pod_sandbox(proto::RunPodSandboxRequest {
                config: Some(proto::PodSandboxConfig {
                    metadata: Some(proto::PodSandboxMetadata {
                        name: name.clone(),
                        uid: format!("uid-{name}"),
                        namespace: "test".into(),
                        attempt: 0,
                    }),
                    ..Default::default()
                }),
                runtime_handler: String::new(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id;
        pods.push(id);
    }
    let c = cri.daemon.client().await;
    let stream = c
        .observe()
        .get_posix_signals_stream(GetPosixSignalsStreamRequest {
            workload: Some(Workload {
                workload_type: WorkloadType::PodSandbox.into(),
                id: pods[0].clone(),
            }),
        })
        .await;
    let mut stream = match stream {
        Ok(s) => s.into_inner(),
        Err(e) if e.code() == Code::Unavailable => {
            eprintln!("SKIPPED signals_of_a_pod_sandbox: eBPF unavailable: {e}");
            for id in pods {
                let _ = rt
                    .remove_pod_sandbox(proto::RemovePodSandboxRequest { pod_sandbox_id: id })
                    .await;
            }
            return;
        }
        Err(e) => panic!("signal stream of the pod: {e}"),
    };
    // A process in pod B gets SIGUSR2 first, then one in pod A SIGUSR1:
    // the first event of A's stream must be A's.
    let cell = |id: &str| format!("cri-{}", &id[..16]);
    let pa = start_exe(&c, Some(&cell(&pods[0])), "target", "exec sleep 300").await;
    let pb = start_exe(&c, Some(&cell(&pods[1])), "other", "exec sleep 300").await;
    kill(pb, libc::SIGUSR2);
    kill(pa, libc::SIGUSR1);
    let r = tokio::time::timeout(STEP, stream.message())
        .await
        .expect("a signal of pod A")
        .expect("stream")
        .expect("open");
    let sig = r.signal.expect("signal");
    assert_eq!((sig.signal, sig.process_id), (libc::SIGUSR1, pa), "{sig:?}");
    for id in pods {
        rt.remove_pod_sandbox(proto::RemovePodSandboxRequest { pod_sandbox_id: id })
            .await
            .expect("RemovePodSandbox");
    }
}
