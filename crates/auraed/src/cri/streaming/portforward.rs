//! PortForward over the Kubernetes portforward protocol
//! (`portforward.k8s.io`, the server side of client-go's
//! `tools/portforward`, as kubelet's `pkg/cri/streaming/portforward`
//! serves it).
//!
//! For each forwarded connection the client opens two streams with the
//! same `requestID` and `port` headers: `streamType: error` and
//! `streamType: data`. The server connects to 127.0.0.1:<port> in the pod's
//! network namespace and copies both ways; a failure is written, as text,
//! to the error stream. When the pod's side closes, the data and error
//! streams are closed.
//!
//! A socket stays in the network namespace it was created in, so the
//! connection is made on a short-lived thread of its own that enters the
//! pod's namespace first (setns only changes the calling thread; a tokio
//! worker must never be moved, it would take every later task with it).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::spdy::{Connection, Stream, CANCEL};

pub const V1: &str = "portforward.k8s.io";
pub const PROTOCOLS: &[&str] = &[V1];

/// How long connecting to the pod's port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct PortForwardRequest {
    /// The pod's network namespace (`/proc/<holder>/ns/net`); None: the
    /// host's (hostNetwork pods).
    pub netns: Option<PathBuf>,
    /// The sandbox id, for messages.
    pub sandbox: String,
}

#[derive(Default)]
struct Pair {
    error: Option<Stream>,
    data: Option<Stream>,
}

pub async fn serve(mut conn: Connection, req: PortForwardRequest, shutdown: CancellationToken) {
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let s = tokio::select! {
            s = conn.incoming.recv() => match s {
                Some(s) => s,
                None => break,
            },
            () = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let id = s.header("requestid").unwrap_or("").to_owned();
        let kind = s.header("streamtype").unwrap_or("").to_owned();
        let pair = pairs.entry(id.clone()).or_default();
        match kind.as_str() {
            "error" => pair.error = Some(s),
            "data" => pair.data = Some(s),
            other => {
                tracing::debug!("portforward: ignoring a stream of type {other:?}");
                s.writer.reset(CANCEL).await;
                continue;
            }
        }
        if pair.error.is_some() && pair.data.is_some() {
            if let Some(Pair {
                error: Some(e),
                data: Some(d),
            }) = pairs.remove(&id)
            {
                tasks.spawn(forward(e, d, req.clone()));
            }
        }
    }
    tasks.abort_all();
    conn.close().await;
}

/// The port a stream names, as kubelet parses it.
fn port_of(s: &Stream) -> Result<u16, String> {
    let p = s.header("port").unwrap_or("");
    match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("invalid port {p:?} in the port-forward request")),
    }
}

/// Connects to 127.0.0.1:`port` in the network namespace `netns` (None:
/// here) on a thread of its own, and hands the socket back.
pub async fn connect_in(netns: Option<&Path>, port: u16) -> Result<tokio::net::TcpStream, String> {
    let netns = netns.map(Path::to_owned);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("aurae-portfwd".into())
        .spawn(move || {
            let r = (|| -> Result<std::net::TcpStream, String> {
                if let Some(ns) = &netns {
                    let f = std::fs::File::open(ns).map_err(|e| {
                        format!("the pod's network namespace {}: {e}", ns.display())
                    })?;
                    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                        format!("entering the pod's network namespace {}: {e}", ns.display())
                    })?;
                }
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                let s = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
                    .map_err(|e| format!("dial tcp {addr}: {e}"))?;
                s.set_nonblocking(true).map_err(|e| e.to_string())?;
                Ok(s)
            })();
            let _ = tx.send(r);
        })
        .map_err(|e| format!("port-forward thread: {e}"))?;
    let s = rx
        .await
        .map_err(|_| "port-forward thread died".to_string())??;
    tokio::net::TcpStream::from_std(s).map_err(|e| e.to_string())
}

async fn forward(error: Stream, mut data: Stream, req: PortForwardRequest) {
    let r = async {
        let port = port_of(&data)?;
        let tcp = connect_in(req.netns.as_deref(), port)
            .await
            .map_err(|e| format!("error forwarding port {port} to pod {}: {e}", req.sandbox))?;
        let (mut rd, mut wr) = tcp.into_split();
        let mut reader = data.reader.take();
        let writer = data.writer.clone();
        // Client to pod: on the client's FIN, half-close towards the pod
        // (it may still answer); on a reset, stop everything.
        let inbound = async move {
            while let Some(b) = reader.read().await {
                if wr.write_all(&b).await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
            if !writer.is_reset() {
                std::future::pending::<()>().await;
            }
        };
        // Pod to client, until the pod closes.
        let w = data.writer.clone();
        let outbound = async move {
            let mut buf = vec![0u8; super::spdy::MAX_DATA_CHUNK];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if w.write(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        };
        tokio::select! {
            () = inbound => {}
            () = outbound => {}
        }
        Ok::<(), String>(())
    }
    .await;
    if let Err(m) = r {
        tracing::debug!("portforward: {m}");
        let _ = error.writer.write(m.as_bytes()).await;
    }
    let _ = data.writer.close().await;
    let _ = error.writer.close().await;
}
