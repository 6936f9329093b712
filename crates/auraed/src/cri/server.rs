//! Binds the CRI socket and serves the RuntimeService and ImageService on
//! it until the daemon shuts down.

use std::{
    future::Future,
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use auraed_cri::{
    image::{ImageServiceImpl, Puller, RegistryHosts, Store},
    proto::{
        image_service_server::ImageServiceServer, runtime_service_server::RuntimeServiceServer,
    },
};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use super::{runtime::RuntimeServiceImpl, CriSettings};

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("CRI socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("another runtime is already serving on the CRI socket {0}; stop it or choose another --cri-socket")]
    InUse(PathBuf),
    #[error("CRI pod sandboxes: {0}")]
    Sandboxes(#[from] super::sandbox::SandboxError),
    #[error(transparent)]
    Streaming(#[from] super::streaming::StreamingError),
    #[error("CRI image store: {0}")]
    Store(#[from] auraed_cri::image::store::StoreError),
    #[error("CRI containers: {0}")]
    Containers(#[from] super::container::ContainerError),
}

/// Removes the socket file when the server stops.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn bind(path: &Path) -> Result<UnixListener, CriError> {
    let err = |source| CriError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    if path.exists() {
        // One that still answers belongs to a live runtime: never steal it.
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(CriError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

/// Binds the socket and opens the image store (errors here stop the
/// daemon's start), then serves in the background until `token` is
/// cancelled.
pub async fn start(
    settings: CriSettings,
    cells: Arc<crate::services::cells::Cells>,
    token: CancellationToken,
) -> Result<Cri, CriError> {
    let cni = super::cni::Cni {
        conf_dir: settings.cni_conf_dir.clone(),
        bin_dirs: settings.cni_bin_dirs.clone(),
    };
    let sandboxes = Arc::new(super::sandbox::Sandboxes::open(
        cells.clone(),
        &settings.runtime_dir,
        cni,
    )?);
    let store = Arc::new(Store::open(settings.library_dir.join("cri/images"))?);
    let containers = Arc::new(super::container::Containers::open(
        cells,
        sandboxes.clone(),
        store.clone(),
        &settings.runtime_dir,
    )?);
    let puller = Arc::new(Puller::new(
        store,
        RegistryHosts::new(&settings.registry_config_dir),
    ));
    let listener = bind(&settings.socket).await?;
    let socket = SocketFile(settings.socket.clone());
    let streaming =
        super::streaming::Streaming::start(settings.streaming_addr, token.clone()).await?;
    let streaming = Arc::new(super::streaming::StreamingRpcs::new(
        streaming,
        sandboxes.clone(),
        settings.runtime_dir.clone(),
    ));
    let router = tonic::transport::Server::builder()
        .layer(ExplainUnimplementedLayer)
        .add_service(RuntimeServiceServer::new(
            RuntimeServiceImpl::new(settings.cni_conf_dir.clone(), sandboxes, containers.clone())
                .with_streaming(streaming),
        ))
        .add_service(ImageServiceServer::new(ImageServiceImpl::new(puller)));
    tracing::info!(
        "Kubernetes CRI serving on {} (plain gRPC; registry hosts from {})",
        settings.socket.display(),
        settings.registry_config_dir.display()
    );
    let task = tokio::spawn(async move {
        let incoming = UnixListenerStream::new(listener);
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
            .await
        {
            tracing::error!("CRI server failed: {e}");
        }
        drop(socket);
    });
    Ok(Cri { task, containers })
}

/// The running CRI server.
pub struct Cri {
    /// Ends when the server has stopped (its token cancelled).
    pub task: tokio::task::JoinHandle<()>,
    /// The containers, for the observe service (their output).
    pub containers: Arc<super::container::Containers>,
}

/// The message of the generated default stubs ("Not yet implemented") is
/// replaced by one naming the RPC and what it waits for, so that kubelet's
/// and crictl's errors say why.
#[derive(Clone, Copy)]
struct ExplainUnimplementedLayer;

impl<S> tower::Layer<S> for ExplainUnimplementedLayer {
    type Service = ExplainUnimplemented<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ExplainUnimplemented(inner)
    }
}

#[derive(Clone)]
struct ExplainUnimplemented<S>(S);

/// Why an RPC answers UNIMPLEMENTED (ASCII without `%`: it goes into the
/// grpc-message header as it is).
fn reason(path: &str) -> String {
    let method = path.rsplit('/').next().unwrap_or(path);
    let what = if method.contains("PodSandbox") {
        "pod sandboxes on cells are not implemented yet"
    } else if ["Exec", "Attach", "PortForward"].contains(&method) {
        "streaming (exec, attach, port-forward) is not implemented yet"
    } else if method.contains("Container") {
        "container checkpoints and events are not implemented yet"
    } else if method.starts_with("Stream") {
        "the streaming list RPCs are not implemented yet"
    } else {
        "not implemented yet"
    };
    format!(
        "{}: {what} in auraed (issue 13)",
        path.trim_start_matches('/')
    )
}

impl<S, B, RB> tower::Service<http::Request<B>> for ExplainUnimplemented<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let fut = self.0.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            let stub = resp.headers().get("grpc-status").is_some_and(|v| v == "12")
                && resp.headers().get("grpc-message").is_some_and(|v| {
                    v.as_bytes().starts_with(b"Not%20yet") || v.as_bytes().starts_with(b"Not yet")
                });
            if stub {
                if let Ok(v) = http::HeaderValue::from_str(&reason(&path)) {
                    resp.headers_mut().insert("grpc-message", v);
                }
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_the_rpc_and_are_header_safe() {
        for p in [
            "/runtime.v1.RuntimeService/RunPodSandbox",
            "/runtime.v1.RuntimeService/CreateContainer",
            "/runtime.v1.RuntimeService/ExecSync",
            "/runtime.v1.ImageService/StreamImages",
            "/runtime.v1.RuntimeService/UpdateRuntimeConfig",
        ] {
            let r = reason(p);
            assert!(r.starts_with(&p[1..]), "{r}");
            assert!(!r.contains('%') && r.is_ascii() && http::HeaderValue::from_str(&r).is_ok());
        }
        assert!(reason("/runtime.v1.RuntimeService/Exec").contains("streaming"));
    }
}
