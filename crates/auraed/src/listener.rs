//! The transport: a unix socket (default) or TCP listener, and mutual TLS
//! on every accepted connection before tonic sees it.

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use aurae_client::Target;
use rustls::{
    client::danger::HandshakeSignatureValid,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        WebPkiClientVerifier,
    },
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, UnixListener},
    sync::mpsc,
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::{
    authz::{Peer, PeerIdentity},
    config::Config,
};

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot load {what} {path}: {reason}")]
    Credentials {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("another auraed is already serving on {0}; stop it or choose another --socket")]
    SocketInUse(PathBuf),
    #[error("cannot listen on {target}: {source}")]
    Bind { target: String, source: io::Error },
}

/// Builds the server side of mutual TLS: clients must present a
/// certificate that chains to the CA.
pub fn tls_config(config: &Config) -> Result<Arc<ServerConfig>, ListenError> {
    let cred = |what, path: &Path| {
        let path = path.to_owned();
        move |e: &dyn std::fmt::Display| ListenError::Credentials {
            what,
            path,
            reason: e.to_string(),
        }
    };
    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&config.ca_crt)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| cred("CA certificate", &config.ca_crt)(&e))?;
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| cred("CA certificate", &config.ca_crt)(&e))?;
    }
    let chain = CertificateDer::pem_file_iter(&config.server_crt)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| cred("server certificate", &config.server_crt)(&e))?;
    let key = PrivateKeyDer::from_pem_file(&config.server_key)
        .map_err(|e| cred("server key", &config.server_key)(&e))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| cred("CA certificate", &config.ca_crt)(&e))?;
    let verifier = Arc::new(ClientUsageVerifier(verifier));
    let mut tls = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cred("server certificate", &config.server_crt)(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| cred("server key pair", &config.server_crt)(&e))?;
    // grpc-go based clients (grpcurl) insist on ALPN h2.
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(tls))
}

/// The CA's verifier (chain, validity, signature, and the extended key
/// usage clientAuth when the certificate lists extended usages), plus what
/// webpki leaves out: a client certificate that states its key usages must
/// allow digitalSignature (the TLS client signs the handshake with it).
/// Extended key usages are checked here too, so that the rule stands
/// whichever verifier is underneath: listed, they must include clientAuth
/// (or anyExtendedKeyUsage).
#[derive(Debug)]
struct ClientUsageVerifier(Arc<dyn ClientCertVerifier>);

/// Why `der` may not be a TLS client certificate, if it may not.
fn client_usage_refusal(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let cert = match X509Certificate::from_der(der) {
        Ok((_, cert)) => cert,
        Err(e) => return Some(format!("unparsable certificate: {e}")),
    };
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.digital_signature() => {
            return Some(format!(
                "its key usage ({}) lacks digitalSignature",
                ku.value
            ))
        }
        Ok(_) => {}
        Err(e) => return Some(format!("bad keyUsage extension: {e}")),
    }
    match cert.extended_key_usage() {
        Ok(Some(eku)) if !(eku.value.client_auth || eku.value.any) => {
            Some("its extended key usage lacks clientAuth".to_owned())
        }
        Ok(_) => None,
        Err(e) => Some(format!("bad extendedKeyUsage extension: {e}")),
    }
}

impl ClientCertVerifier for ClientUsageVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        match client_usage_refusal(end_entity) {
            None => Ok(verified),
            Some(why) => Err(rustls::Error::General(format!(
                "client certificate refused: {why}"
            ))),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
    fn requires_raw_public_keys(&self) -> bool {
        self.0.requires_raw_public_keys()
    }
}

/// A bound listener; the unix socket file is removed on drop.
pub enum Listener {
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Tcp(TcpListener),
}

impl Listener {
    pub async fn bind(target: &Target) -> Result<Self, ListenError> {
        match target {
            Target::Tcp(addr) => {
                TcpListener::bind(addr)
                    .await
                    .map(Listener::Tcp)
                    .map_err(|source| ListenError::Bind {
                        target: target.to_string(),
                        source,
                    })
            }
            Target::Unix(path) => bind_unix(path).await,
        }
    }

    /// Accepts connections until `shutdown`, completes the TLS handshake of
    /// each in its own task, and yields the ones that succeed.
    pub fn incoming(
        self,
        tls: Arc<ServerConfig>,
        shutdown: CancellationToken,
    ) -> ReceiverStream<io::Result<TlsConn>> {
        let (tx, rx) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(tls);
        tokio::spawn(async move {
            loop {
                let accepted: io::Result<Box<dyn Io>> = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = self.accept() => r,
                };
                let io = match accepted {
                    Ok(io) => io,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (tx, acceptor) = (tx.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                        Ok(Ok(tls)) => {
                            let peer = peer_identity(&tls);
                            let _ = tx.send(Ok(TlsConn(tls, peer))).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!("refused a connection: TLS handshake failed: {e}")
                        }
                        Err(_) => tracing::info!("refused a connection: TLS handshake timed out"),
                    }
                });
            }
            // Dropping self here closes the listener and removes the socket.
            drop(self);
        });
        ReceiverStream::new(rx)
    }

    async fn accept(&self) -> io::Result<Box<dyn Io>> {
        Ok(match self {
            Listener::Unix { listener, .. } => Box::new(listener.accept().await?.0),
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn bind_unix(path: &Path) -> Result<Listener, ListenError> {
    let bind_err = |source| ListenError::Bind {
        target: format!("unix socket {}", path.display()),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(bind_err)?;
    }
    if path.exists() {
        // A socket that still answers belongs to a live daemon: never steal
        // it. One that refuses is left over from an earlier run.
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ListenError::SocketInUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    Ok(Listener::Unix {
        listener,
        path: path.to_owned(),
    })
}

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A connection that passed mutual TLS, and who is on the other end
/// (parsed once per connection; every request of it gets a copy).
pub struct TlsConn(TlsStream<Box<dyn Io>>, Peer);

/// The names in the client's verified certificate (for authorization).
fn peer_identity(tls: &TlsStream<Box<dyn Io>>) -> Peer {
    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    Peer(cert.map(|der| Arc::new(PeerIdentity::from_der(der))))
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.1.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::client_usage_refusal;
    use rcgen::{
        CertificateParams, ExtendedKeyUsagePurpose as Eku, KeyPair, KeyUsagePurpose as Ku,
    };

    fn cert(ku: Vec<Ku>, eku: Vec<Eku>) -> Vec<u8> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.key_usages = ku;
        p.extended_key_usages = eku;
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn usages_a_client_certificate_needs() {
        assert_eq!(client_usage_refusal(&cert(vec![], vec![])), None);
        assert_eq!(
            client_usage_refusal(&cert(vec![], vec![Eku::ClientAuth])),
            None
        );
        assert_eq!(
            client_usage_refusal(&cert(
                vec![Ku::DigitalSignature, Ku::KeyEncipherment],
                vec![Eku::ClientAuth, Eku::ServerAuth]
            )),
            None
        );
        assert_eq!(client_usage_refusal(&cert(vec![], vec![Eku::Any])), None);
        let no_sig = client_usage_refusal(&cert(vec![Ku::KeyEncipherment], vec![Eku::ClientAuth]));
        assert!(no_sig.unwrap().contains("digitalSignature"));
        let server_only = client_usage_refusal(&cert(vec![], vec![Eku::ServerAuth]));
        assert!(server_only.unwrap().contains("clientAuth"));
        assert!(client_usage_refusal(b"not a certificate").is_some());
    }
}
