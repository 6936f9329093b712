//! Connecting to auraed: a unix socket or TCP, always with mutual TLS.

use std::{fmt, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use aurae_proto::{
    cells::cell_service_client::CellServiceClient,
    discovery::discovery_service_client::DiscoveryServiceClient,
    observe::observe_service_client::ObserveServiceClient, vms::vm_service_client::VmServiceClient,
};
use hyper_util::rt::TokioIo;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    ClientConfig as TlsConfig, RootCertStore,
};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::health_client::HealthClient;

use crate::config::ClientConfig;

/// The name on the server certificate that Aurae clients verify.
pub const SERVER_NAME: &str = "server.unsafe.aurae.io";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 flow-control window per stream (the connection gets twice that).
const STREAM_WINDOW: u32 = 2 << 20;

/// Where the daemon listens: a unix socket path, or `IP:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Target {
    /// `IP:PORT` (IPv6 in brackets) means TCP; anything else is a socket path.
    pub fn parse(s: &str) -> Self {
        match s.parse::<SocketAddr>() {
            Ok(addr) => Target::Tcp(addr),
            Err(_) => Target::Unix(PathBuf::from(s)),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "unix socket {}", p.display()),
            Target::Tcp(a) => write!(f, "tcp {a}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read {what} {path}: {reason}")]
    Credentials {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("cannot connect to auraed at {target}: {reason}")]
    Connect { target: Target, reason: String },
}

/// A connected client. Cloning is cheap (one shared HTTP/2 connection).
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
}

impl Client {
    /// Connects as the client config says.
    pub async fn connect(config: &ClientConfig) -> Result<Self, ConnectError> {
        let tls = tls_config(config)?;
        Self::connect_with(Target::parse(&config.system.socket), tls).await
    }

    /// Connects to `target` with an already built TLS config.
    pub async fn connect_with(target: Target, tls: Arc<TlsConfig>) -> Result<Self, ConnectError> {
        let connector = TlsConnector::from(tls);
        let t = target.clone();
        // The URI is only a placeholder: the connector below decides where to go.
        // HTTP/2 windows larger than the 64 KiB default: a stream of
        // output sends up to ~640 KiB per message, and a small window
        // makes the daemon wait for a window update several times per
        // message instead of sending ahead.
        let endpoint = Endpoint::from_static("http://auraed.local")
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(2 * STREAM_WINDOW);
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let (t, connector) = (t.clone(), connector.clone());
                async move {
                    let name = ServerName::try_from(SERVER_NAME).map_err(std::io::Error::other)?;
                    let io: Box<dyn Io> = match t {
                        Target::Unix(p) => Box::new(
                            connector
                                .connect(name, UnixStream::connect(p).await?)
                                .await?,
                        ),
                        Target::Tcp(a) => {
                            let s = TcpStream::connect(a).await?;
                            s.set_nodelay(true)?;
                            Box::new(connector.connect(name, s).await?)
                        }
                    };
                    Ok::<_, std::io::Error>(TokioIo::new(io))
                }
            }))
            .await
            .map_err(|e| ConnectError::Connect {
                target,
                reason: error_chain(&e),
            })?;
        Ok(Self { channel })
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }
    pub fn discovery(&self) -> DiscoveryServiceClient<Channel> {
        DiscoveryServiceClient::new(self.channel.clone())
    }
    pub fn cells(&self) -> CellServiceClient<Channel> {
        CellServiceClient::new(self.channel.clone())
    }
    pub fn observe(&self) -> ObserveServiceClient<Channel> {
        ObserveServiceClient::new(self.channel.clone())
    }
    pub fn vms(&self) -> VmServiceClient<Channel> {
        VmServiceClient::new(self.channel.clone())
    }
    pub fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// Builds the client side of mutual TLS from the PEM files the config names.
pub fn tls_config(config: &ClientConfig) -> Result<Arc<TlsConfig>, ConnectError> {
    let a = &config.auth;
    let cred_err = |what: &'static str, path: &str| {
        let path = path.to_owned();
        move |e: rustls::pki_types::pem::Error| ConnectError::Credentials {
            what,
            path,
            reason: e.to_string(),
        }
    };
    let mut roots = RootCertStore::empty();
    for ca in
        CertificateDer::pem_file_iter(&a.ca_crt).map_err(cred_err("CA certificate", &a.ca_crt))?
    {
        let ca = ca.map_err(cred_err("CA certificate", &a.ca_crt))?;
        roots.add(ca).map_err(|e| ConnectError::Credentials {
            what: "CA certificate",
            path: a.ca_crt.clone(),
            reason: e.to_string(),
        })?;
    }
    let chain = CertificateDer::pem_file_iter(&a.client_crt)
        .map_err(cred_err("client certificate", &a.client_crt))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(cred_err("client certificate", &a.client_crt))?;
    let key = PrivateKeyDer::from_pem_file(&a.client_key)
        .map_err(cred_err("client key", &a.client_key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = TlsConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
        })
        .map_err(|e| ConnectError::Credentials {
            what: "client key pair",
            path: a.client_crt.clone(),
            reason: e.to_string(),
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Joins an error and its sources into one line, without repeats.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![];
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}
