//! The daemon's foundation, end to end: mutual TLS on a unix socket and on
//! TCP, refusals, first-start PKI, health, reflection and clean shutdown.

mod common;

use std::{os::unix::fs::PermissionsExt, process::Command, sync::Arc, time::Duration};

use aurae_client::{
    proto::discovery::{discovery_service_client::DiscoveryServiceClient, DiscoverRequest},
    tls_config, Client, Target,
};
use common::{unique, Daemon};
use tokio_stream::StreamExt;

#[tokio::test]
async fn discover_over_unix_socket_with_mtls() {
    let d = Daemon::start().await;
    let r = d
        .client()
        .await
        .discovery()
        .discover(DiscoverRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(r.healthy);
    assert_eq!(r.version, env!("CARGO_PKG_VERSION"));
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode");
}

#[tokio::test]
async fn discover_over_tcp_when_asked() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(Some(&addr), &[]).await;
    let r = d
        .client()
        .await
        .discovery()
        .discover(DiscoverRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(r.healthy);
}

/// Connects with a hand-built rustls config (`client_auth`: the client's
/// chain and key, or none) and calls Discover.
async fn discover_with(d: &Daemon, cfg: rustls::ClientConfig) -> Result<(), String> {
    let client = Client::connect_with(Target::parse(&d.socket), Arc::new(cfg))
        .await
        .map_err(|e| e.to_string())?;
    client
        .discovery()
        .discover(DiscoverRequest {})
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn roots(ca_pem_path: &std::path::Path) -> rustls::RootCertStore {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem_path).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let d = Daemon::start().await;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(std::path::Path::new(&d.client_config().auth.ca_crt)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let err = discover_with(&d, cfg)
        .await
        .expect_err("a client without a certificate must be refused");
    assert!(!err.is_empty());
    assert!(
        d.log().contains("refused a connection"),
        "daemon log:\n{}",
        d.log()
    );
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let d = Daemon::start().await;
    let other = auraed::pki::DevPki::generate().unwrap();
    let chain = vec![CertificateDer::from_pem_slice(other.client_crt.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(other.client_key.as_bytes()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(std::path::Path::new(&d.client_config().auth.ca_crt)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    discover_with(&d, cfg)
        .await
        .expect_err("a certificate from another CA must be refused");
    // And the right one still works, so the refusal was about the CA.
    let good = tls_config(&d.client_config()).unwrap();
    discover_with(&d, (*good).clone()).await.unwrap();
}

#[tokio::test]
async fn plaintext_connection_is_refused() {
    let d = Daemon::start().await;
    let path = d.socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://auraed.local")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await;
    if let Ok(channel) = channel {
        let r = DiscoveryServiceClient::new(channel)
            .discover(DiscoverRequest {})
            .await;
        assert!(r.is_err(), "plaintext gRPC must not be answered");
    }
}

/// Listening TCP sockets owned by `pid` (inodes from /proc/PID/fd that are
/// in LISTEN state in /proc/net/tcp{,6}).
fn listening_tcp_sockets(pid: i32) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect();
    ["tcp", "tcp6"]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{f}"))
                .unwrap_or_default()
                .lines()
                .skip(1)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.get(3) == Some(&"0A") && cols.get(9).is_some_and(|i| inodes.iter().any(|x| x == i))
        })
        .count()
}

#[tokio::test]
async fn default_mode_opens_no_tcp_port() {
    let d = Daemon::start().await;
    assert_eq!(listening_tcp_sockets(d.pid()), 0);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = Daemon::start_with(Some(&format!("127.0.0.1:{port}")), &[]).await;
    assert_eq!(
        listening_tcp_sockets(t.pid()),
        1,
        "the counter itself must see a TCP listener"
    );
}

#[tokio::test]
async fn first_start_pki_is_generated_and_aer_uses_it() {
    let d = Daemon::start().await;
    let pki = d.dir.path().join("pki");
    for f in [
        "ca.crt",
        "_signed.server.crt",
        "server.key",
        "_signed.client.crt",
        "client.key",
        "client-config.toml",
    ] {
        let mode = std::fs::metadata(pki.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f} must be owner-only");
    }
    // The user's config was written too (HOME is the test dir).
    assert!(d.dir.path().join(".aurae/config").exists());
    assert!(d.log().contains("GENERATED A DEVELOPMENT PKI"));

    let out = Command::new(common::aer_bin())
        .arg("--config")
        .arg(d.client_config_path())
        .arg("discover")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "aer discover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("healthy"));
    let out = Command::new(common::aer_bin())
        .args(["--json", "--config"])
        .arg(d.client_config_path())
        .arg("discover")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["healthy"], true);
    // AURAE_CONFIG is searched first.
    let out = Command::new(common::aer_bin())
        .arg("health")
        .env("AURAE_CONFIG", d.client_config_path())
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "aer health: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));
}

#[tokio::test]
async fn partial_pki_is_refused_naming_the_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = Daemon::paths_in(dir.path());
    std::fs::create_dir_all(p.ca_crt.parent().unwrap()).unwrap();
    std::fs::write(&p.ca_crt, "not used").unwrap();
    let out = Command::new(common::auraed_bin())
        .arg("--socket")
        .arg(dir.path().join("a.sock"))
        .arg("--ca-crt")
        .arg(&p.ca_crt)
        .arg("--server-crt")
        .arg(&p.server_crt)
        .arg("--server-key")
        .arg(&p.server_key)
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("_signed.server.crt") && err.contains("server.key"),
        "{err}"
    );
    assert!(!dir.path().join("a.sock").exists());
}

#[tokio::test]
async fn no_auto_pki_refuses_to_generate() {
    let mut d = Daemon::spawn(None, &["--no-auto-pki"]);
    let status = d.wait_exit(Duration::from_secs(20)).expect("must exit");
    assert!(!status.success());
    assert!(d.log().contains("--no-auto-pki"), "{}", d.log());
    assert!(!d.dir.path().join("pki/ca.crt").exists());
}

#[tokio::test]
async fn health_and_reflection_answer() {
    use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let d = Daemon::start().await;
    let c = d.client().await;
    for service in ["", "aurae.discovery.v0.DiscoveryService"] {
        let r = c
            .health()
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service}");
    }
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(c.channel())
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(Ok(resp)) = stream.next().await else {
        panic!("no reflection answer")
    };
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "aurae.discovery.v0.DiscoveryService",
        "aurae.cells.v0.CellService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn sigterm_exits_zero_and_removes_the_socket() {
    let mut d = Daemon::start().await;
    assert!(std::path::Path::new(&d.socket).exists());
    let status = d.terminate();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        d.log()
    );
    assert!(
        !std::path::Path::new(&d.socket).exists(),
        "socket left behind"
    );
}

#[tokio::test]
async fn a_second_daemon_does_not_steal_a_live_socket_but_replaces_a_stale_one() {
    let mut first = Daemon::start().await;
    // Same socket, same PKI files: must refuse while the first answers.
    let out = Command::new(common::auraed_bin())
        .arg("--socket")
        .arg(&first.socket)
        .arg("--ca-crt")
        .arg(first.dir.path().join("pki/ca.crt"))
        .arg("--server-crt")
        .arg(first.dir.path().join("pki/_signed.server.crt"))
        .arg("--server-key")
        .arg(first.dir.path().join("pki/server.key"))
        .env("HOME", first.dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already serving"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    first
        .client()
        .await
        .discovery()
        .discover(DiscoverRequest {})
        .await
        .unwrap();

    // A stale socket file (nobody listening) is replaced.
    let stale_dir = tempfile::tempdir().unwrap();
    let stale = stale_dir.path().join(format!("{}.sock", unique("stale")));
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let d = Daemon::start_with(Some(stale.to_str().unwrap()), &[]).await;
    d.client()
        .await
        .discovery()
        .discover(DiscoverRequest {})
        .await
        .unwrap();
    first.terminate();
}

#[tokio::test]
async fn aer_connection_failure_is_one_clear_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start().await;
    let mut cfg = d.client_config();
    cfg.system.socket = dir.path().join("nobody.sock").display().to_string();
    let path = dir.path().join("config");
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let out = Command::new(common::aer_bin())
        .arg("--config")
        .arg(&path)
        .arg("discover")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("nobody.sock") && err.contains("cannot connect"),
        "{err}"
    );
}

#[tokio::test]
async fn python_grpcio_client_calls_discover() {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: python3 with grpcio and grpcio-tools is not installed (scripts/test installs them)");
        return;
    }
    let d = Daemon::start().await;
    let cfg = d.client_config();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("python3")
        .arg(root.join("tests/interop/grpcio_discover.py"))
        .arg(root.join("api"))
        .arg(&d.socket)
        .args([&cfg.auth.ca_crt, &cfg.auth.client_crt, &cfg.auth.client_key])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["healthy"], true);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
}
