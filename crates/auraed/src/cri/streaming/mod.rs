//! The CRI streaming server: Exec, Attach and PortForward answer with a URL
//! of this server (`http://127.0.0.1:<port>/exec/<token>` …), and the client
//! (kubelet's proxy, the API server, critest, crictl) connects to it and
//! upgrades to SPDY/3.1 to speak the Kubernetes remotecommand
//! (`v4.channel.k8s.io` …) or portforward (`portforward.k8s.io`) protocol,
//! as kubelet's `pkg/cri/streaming` server does.
//!
//! A request is validated by the RPC, stored under a random single-use
//! token that expires after a minute (kubelet's cache does the same), and
//! carried out when its URL is used. Plain HTTP without authentication, as
//! kubelet's default for runtimes: the token is the guard, so the server
//! listens on loopback unless `--cri-streaming-addr` says otherwise.
//!
//! `spdy.rs` is the framing, `remotecommand.rs` exec and attach,
//! `portforward.rs` port forwarding. WebSocket upgrades are not served yet.

mod portforward;
mod remotecommand;
pub mod spdy;
mod ws;

use std::{
    collections::HashMap,
    convert::Infallible,
    io::Read,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use portforward::PortForwardRequest;
pub use remotecommand::{AttachRequest, ExecRequest, Runner};

/// How long a URL stays valid (kubelet: `cacheTTL`).
const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Requests waiting for their client at once (kubelet: `maxInFlight`).
const MAX_IN_FLIGHT: usize = 1000;
/// How long a connection may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The CRI-format log of a container that kubelet gave no log path (in
/// its directory `<runtime-dir>/cri/containers/<id>/`): Attach follows it.
const OUTPUT_LOG: &str = crate::cri::container::FALLBACK_LOG;

pub const HEADER_PROTOCOL: &str = "x-stream-protocol-version";
const HEADER_ACCEPTED: &str = "x-accepted-stream-protocol-versions";
const SPDY_31: &str = "SPDY/3.1";

#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    #[error("CRI streaming server: binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("too many streaming requests in flight ({MAX_IN_FLIGHT}); try again later")]
    Full,
    #[error("CRI streaming: no random token: {0}")]
    Random(std::io::Error),
}

impl From<StreamingError> for tonic::Status {
    fn from(e: StreamingError) -> Self {
        match e {
            StreamingError::Full => tonic::Status::resource_exhausted(e.to_string()),
            e => tonic::Status::internal(e.to_string()),
        }
    }
}

/// A request waiting for its client.
pub enum Pending {
    Exec(ExecRequest),
    Attach(AttachRequest),
    PortForward(PortForwardRequest),
}

impl Pending {
    fn kind(&self) -> &'static str {
        match self {
            Pending::Exec(_) => "exec",
            Pending::Attach(_) => "attach",
            Pending::PortForward(_) => "portforward",
        }
    }

    fn protocols(&self) -> &'static [&'static str] {
        match self {
            Pending::Exec(_) | Pending::Attach(_) => remotecommand::PROTOCOLS,
            Pending::PortForward(_) => portforward::PROTOCOLS,
        }
    }
}

pub struct Streaming {
    addr: SocketAddr,
    cache: Mutex<HashMap<String, (Instant, Pending)>>,
}

fn token() -> Result<String, StreamingError> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(StreamingError::Random)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Streaming {
    /// Binds `addr` and serves until `shutdown`.
    pub async fn start(
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<Arc<Streaming>, StreamingError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StreamingError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| StreamingError::Bind { addr, source })?;
        let s = Arc::new(Streaming {
            addr: bound,
            cache: Mutex::new(HashMap::new()),
        });
        tracing::info!("CRI streaming server on http://{bound}");
        tokio::spawn(serve(listener, s.clone(), shutdown));
        Ok(s)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Pending)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `req` and returns the URL that carries it out once.
    pub fn url_for(&self, req: Pending) -> Result<String, StreamingError> {
        let t = token()?;
        let kind = req.kind();
        let mut c = self.cache();
        let now = Instant::now();
        c.retain(|_, (at, _)| now.duration_since(*at) < TOKEN_TTL);
        if c.len() >= MAX_IN_FLIGHT {
            return Err(StreamingError::Full);
        }
        c.insert(t.clone(), (now, req));
        Ok(format!("http://{}/{kind}/{t}", self.addr))
    }

    /// The request stored under `token` (gone afterwards), if it has not
    /// expired.
    fn take(&self, token: &str) -> Option<Pending> {
        let (at, req) = self.cache().remove(token)?;
        (at.elapsed() < TOKEN_TTL).then_some(req)
    }
}

async fn serve(listener: TcpListener, s: Arc<Streaming>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((c, _)) => c,
                Err(e) => {
                    tracing::warn!("CRI streaming listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let (s, shutdown) = (s.clone(), shutdown.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let s = s.clone();
                let shutdown = shutdown.clone();
                async move { Ok::<_, Infallible>(respond(&s, req, shutdown)) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await
            {
                tracing::debug!("CRI streaming connection: {e}");
            }
        });
    }
}

fn plain(code: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The first of the client's protocols (in its order, comma-separated over
/// any number of headers) that the server speaks, as apimachinery's
/// `httpstream.Handshake` picks it.
pub fn negotiate(
    headers: &http::HeaderMap,
    server: &'static [&'static str],
) -> Option<&'static str> {
    headers
        .get_all(HEADER_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| server.iter().find(|s| **s == p).copied())
}

fn respond(
    s: &Arc<Streaming>,
    mut req: Request<Incoming>,
    shutdown: CancellationToken,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().trim_matches('/').to_owned();
    let Some((kind, token)) = path.split_once('/') else {
        return plain(StatusCode::NOT_FOUND, format!("no such path /{path}\n"));
    };
    let Some(pending) = s.take(token) else {
        return plain(
            StatusCode::NOT_FOUND,
            "unknown or expired streaming token\n".into(),
        );
    };
    if pending.kind() != kind {
        return plain(StatusCode::NOT_FOUND, format!("no such path /{path}\n"));
    }
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if upgrade.eq_ignore_ascii_case("websocket") {
        return websocket(req, pending, shutdown);
    }
    if !upgrade.eq_ignore_ascii_case(SPDY_31) {
        return plain(
            StatusCode::BAD_REQUEST,
            "this URL needs an Upgrade: SPDY/3.1 or websocket request\n".into(),
        );
    }
    let Some(protocol) = negotiate(req.headers(), pending.protocols()) else {
        let mut r = plain(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: server accepts {:?}\n",
                pending.protocols()
            ),
        );
        for p in pending.protocols() {
            r.headers_mut()
                .append(HEADER_ACCEPTED, HeaderValue::from_static(p));
        }
        return r;
    };
    let upgraded = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let io = match upgraded.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!("CRI streaming: upgrade failed: {e}");
                return;
            }
        };
        let conn = spdy::Connection::server(io);
        match pending {
            Pending::Exec(r) => remotecommand::serve_exec(conn, protocol, r, shutdown).await,
            Pending::Attach(r) => remotecommand::serve_attach(conn, protocol, r, shutdown).await,
            Pending::PortForward(r) => portforward::serve(conn, r, shutdown).await,
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static(SPDY_31));
    h.insert(HEADER_PROTOCOL, HeaderValue::from_static(protocol));
    r
}

/// The three RPCs: validate, store, answer with the URL. `runtime.rs`
/// delegates to these.
pub struct StreamingRpcs {
    server: Arc<Streaming>,
    sandboxes: Arc<crate::cri::sandbox::Sandboxes>,
    runtime_dir: PathBuf,
}

/// The OCI runtime that created container `id` under `root`: runc keeps a
/// `state.json` there, crun does not (the two read each other's state
/// wrong, so exec must use the one the container layer chose).
fn oci_runtime_of(root: &std::path::Path, id: &str) -> PathBuf {
    let name = if root.join(id).join("state.json").is_file() {
        "runc"
    } else {
        "crun"
    };
    for dir in [
        "/usr/bin",
        "/usr/sbin",
        "/usr/local/bin",
        "/usr/local/sbin",
        "/bin",
    ] {
        let p = std::path::Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from(name)
}

fn invalid(m: &str) -> tonic::Status {
    tonic::Status::invalid_argument(m.to_string())
}

/// kubelet's `validateExecRequest` / `validateAttachRequest`.
fn validate_streams(
    tty: bool,
    stdin: bool,
    stdout: bool,
    stderr: bool,
) -> Result<(), tonic::Status> {
    if tty && stderr {
        return Err(invalid("tty and stderr cannot both be true"));
    }
    if !stdin && !stdout && !stderr {
        return Err(invalid("one of stdin, stdout, or stderr must be set"));
    }
    Ok(())
}

/// The checks of an ExecRequest that need no container.
pub fn validate_exec(req: &auraed_cri::proto::ExecRequest) -> Result<(), tonic::Status> {
    validate_streams(req.tty, req.stdin, req.stdout, req.stderr)?;
    if req.cmd.is_empty() {
        return Err(invalid("cmd: a command is required"));
    }
    Ok(())
}

/// The checks of an AttachRequest that need no container.
pub fn validate_attach(req: &auraed_cri::proto::AttachRequest) -> Result<(), tonic::Status> {
    validate_streams(req.tty, req.stdin, req.stdout, req.stderr)
}

impl StreamingRpcs {
    pub fn new(
        server: Arc<Streaming>,
        sandboxes: Arc<crate::cri::sandbox::Sandboxes>,
        runtime_dir: PathBuf,
    ) -> StreamingRpcs {
        StreamingRpcs {
            server,
            sandboxes,
            runtime_dir,
        }
    }

    /// crun's state root for CRI containers (shared with the container
    /// RPCs: crun id = CRI container id).
    fn crun_root(&self) -> PathBuf {
        self.runtime_dir.join("cri/crun")
    }

    /// The container's directory of the CRI layer.
    fn container_dir(&self, id: &str) -> PathBuf {
        self.runtime_dir.join("cri/containers").join(id)
    }

    /// The container's `cgroup.procs` files, from the monitor's
    /// configuration the container layer wrote (none if unreadable: the
    /// exec then stays in the runtime's cgroup).
    fn procs_files(&self, id: &str) -> Vec<PathBuf> {
        #[derive(serde::Deserialize)]
        struct Monitor {
            #[serde(default)]
            procs_files: Vec<PathBuf>,
        }
        std::fs::read(self.container_dir(id).join("monitor.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Monitor>(&b).ok())
            .map(|m| m.procs_files)
            .unwrap_or_default()
    }

    fn require_container(&self, id: &str) -> Result<(), tonic::Status> {
        if id.trim().is_empty() {
            return Err(invalid("container_id: an id is required"));
        }
        if id.contains('/') || id.starts_with('.') {
            return Err(invalid("container_id: not a container id"));
        }
        // crun keeps a directory per container it created.
        if !self.crun_root().join(id).is_dir() {
            return Err(tonic::Status::not_found(format!(
                "container {id:?} not found"
            )));
        }
        Ok(())
    }

    pub fn exec(
        &self,
        req: auraed_cri::proto::ExecRequest,
    ) -> Result<auraed_cri::proto::ExecResponse, tonic::Status> {
        validate_streams(req.tty, req.stdin, req.stdout, req.stderr)?;
        if req.cmd.is_empty() {
            return Err(invalid("cmd: a command is required"));
        }
        self.require_container(&req.container_id)?;
        let url = self.server.url_for(Pending::Exec(ExecRequest {
            runner: Runner::Crun {
                binary: oci_runtime_of(&self.crun_root(), &req.container_id),
                root: self.crun_root(),
                procs_files: self.procs_files(&req.container_id),
                id: req.container_id,
            },
            cmd: req.cmd,
            tty: req.tty,
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
        }))?;
        Ok(auraed_cri::proto::ExecResponse { url })
    }

    /// `log_path`: the container's CRI log (ContainerStatus.log_path);
    /// None: kubelet gave it none, and its output goes to
    /// [`OUTPUT_LOG`] in the container's directory.
    pub fn attach(
        &self,
        req: auraed_cri::proto::AttachRequest,
        log_path: Option<PathBuf>,
    ) -> Result<auraed_cri::proto::AttachResponse, tonic::Status> {
        validate_streams(req.tty, req.stdin, req.stdout, req.stderr)?;
        self.require_container(&req.container_id)?;
        let log_path =
            log_path.unwrap_or_else(|| self.container_dir(&req.container_id).join(OUTPUT_LOG));
        let fifo = self.container_dir(&req.container_id).join("stdin");
        if req.stdin && !fifo.exists() {
            return Err(tonic::Status::failed_precondition(format!(
                "container {:?} was not created with stdin",
                req.container_id
            )));
        }
        let url = self.server.url_for(Pending::Attach(AttachRequest {
            stdin_fifo: req.stdin.then_some(fifo),
            log_path,
            exit_file: Some(self.container_dir(&req.container_id).join("exit.json")),
            tty: req.tty,
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
        }))?;
        Ok(auraed_cri::proto::AttachResponse { url })
    }

    pub fn port_forward(
        &self,
        req: auraed_cri::proto::PortForwardRequest,
    ) -> Result<auraed_cri::proto::PortForwardResponse, tonic::Status> {
        if req.pod_sandbox_id.trim().is_empty() {
            return Err(invalid("pod_sandbox_id: an id is required"));
        }
        let s = self.sandboxes.resolve(&req.pod_sandbox_id).ok_or_else(|| {
            tonic::Status::not_found(format!("pod sandbox {:?} not found", req.pod_sandbox_id))
        })?;
        if !s.ready {
            return Err(tonic::Status::failed_precondition(format!(
                "pod sandbox {} is not ready",
                s.id
            )));
        }
        let netns = if s.ns_network == crate::cri::sandbox::MODE_NODE {
            None
        } else {
            let pid = self.sandboxes.holder_pid(&s).ok_or_else(|| {
                tonic::Status::failed_precondition(format!(
                    "pod sandbox {}: its network namespace is gone",
                    s.id
                ))
            })?;
            Some(PathBuf::from(format!("/proc/{pid}/ns/net")))
        };
        let url = self
            .server
            .url_for(Pending::PortForward(PortForwardRequest {
                netns,
                sandbox: s.id,
            }))?;
        Ok(auraed_cri::proto::PortForwardResponse { url })
    }
}

/// The WebSocket handshake (RFC 6455), with the protocol negotiated in
/// `Sec-WebSocket-Protocol`: the channels of `v5.channel.k8s.io` for exec
/// and attach, SPDY tunnelled in binary messages for port forwarding.
fn websocket(
    mut req: Request<Incoming>,
    pending: Pending,
    shutdown: CancellationToken,
) -> Response<Full<Bytes>> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return plain(StatusCode::BAD_REQUEST, "no Sec-WebSocket-Key\n".into());
    };
    let protocol = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| {
            let ours: &[&'static str] = match pending {
                Pending::PortForward(_) => &[ws::PORTFORWARD_TUNNEL],
                _ => ws::PROTOCOLS,
            };
            ours.iter().find(|s| **s == p).copied()
        });
    let Some(protocol) = protocol else {
        return plain(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: server accepts {:?}\n",
                ws::PROTOCOLS
            ),
        );
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgraded = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let io = match upgraded.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!("CRI streaming: upgrade failed: {e}");
                return;
            }
        };
        // v5's status and streams are v4's.
        let v4 = remotecommand::V4;
        match pending {
            Pending::Exec(r) => {
                let conn = ws::connection(io).await;
                remotecommand::serve_exec(conn, v4, r, shutdown).await
            }
            Pending::Attach(r) => {
                let conn = ws::connection(io).await;
                remotecommand::serve_attach(conn, v4, r, shutdown).await
            }
            Pending::PortForward(r) => {
                let conn = spdy::Connection::server(ws::tunnel(io).await);
                portforward::serve(conn, r, shutdown).await
            }
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    h.insert("sec-websocket-protocol", HeaderValue::from_static(protocol));
    r
}

#[cfg(test)]
mod tests;
