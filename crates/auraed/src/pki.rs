//! Development PKI: on first start, when no certificate file exists, the
//! daemon makes a CA, a server certificate for `server.unsafe.aurae.io` and
//! a client certificate, so that it works out of the box. Never for
//! production: the CA key lies beside the certificates.

use std::{
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use aurae_client::{AuthConfig, ClientConfig, SystemConfig, SERVER_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("incomplete PKI: {missing} missing while {present} exist; provide all three or none (then a development PKI is generated)")]
    Partial { missing: String, present: String },
    #[error("no PKI: {missing} missing and --no-auto-pki was given")]
    Absent { missing: String },
    #[error("cannot generate certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// PEM texts of a freshly generated development PKI.
pub struct DevPki {
    pub ca_crt: String,
    pub ca_key: String,
    pub server_crt: String,
    pub server_key: String,
    pub client_crt: String,
    pub client_key: String,
}

impl DevPki {
    /// A new CA with one server and one client certificate signed by it.
    pub fn generate() -> Result<Self, rcgen::Error> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name
            .push(DnType::CommonName, "Aurae development CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?;

        let (server_cert, server_key) = sign_server(&ca_cert, &ca_key, &[], &[])?;
        let (client_cert, client_key) = sign_client(&ca_cert, &ca_key, "aurae-client")?;

        Ok(Self {
            ca_crt: ca_cert.pem(),
            ca_key: ca_key.serialize_pem(),
            server_crt: server_cert.pem(),
            server_key: server_key.serialize_pem(),
            client_crt: client_cert.pem(),
            client_key: client_key.serialize_pem(),
        })
    }
}

/// A server certificate for `server.unsafe.aurae.io`, `localhost`, the
/// loopback addresses and the `extra` names and IP addresses, signed by
/// the CA.
pub fn sign_server(
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
    extra_names: &[String],
    extra_ips: &[&str],
) -> Result<(rcgen::Certificate, KeyPair), rcgen::Error> {
    let mut names = vec![SERVER_NAME.to_owned(), "localhost".to_owned()];
    names.extend_from_slice(extra_names);
    let mut server = CertificateParams::new(names)?;
    for ip in ["127.0.0.1", "::1"].iter().chain(extra_ips) {
        if let Ok(ip) = ip.parse() {
            server.subject_alt_names.push(SanType::IpAddress(ip));
        }
    }
    server
        .distinguished_name
        .push(DnType::CommonName, SERVER_NAME);
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = server.signed_by(&key, ca, ca_key)?;
    Ok((cert, key))
}

/// A client certificate named `common_name`, signed by the CA.
pub fn sign_client(
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
    common_name: &str,
) -> Result<(rcgen::Certificate, KeyPair), rcgen::Error> {
    let mut client = CertificateParams::new(Vec::<String>::new())?;
    client
        .distinguished_name
        .push(DnType::CommonName, common_name);
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = client.signed_by(&key, ca, ca_key)?;
    Ok((cert, key))
}

/// What [`ensure`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum PkiOutcome {
    Existing,
    /// Generated; the path of the client config written beside the PKI.
    Generated {
        client_config: PathBuf,
    },
}

/// Makes sure the three files the server needs exist, generating a
/// development PKI (and a client config) when none of them does.
pub fn ensure(config: &Config) -> Result<PkiOutcome, PkiError> {
    let files = [&config.ca_crt, &config.server_crt, &config.server_key];
    let (present, missing): (Vec<&PathBuf>, Vec<&PathBuf>) = files.iter().partition(|p| p.exists());
    let list = |v: &[&PathBuf]| {
        v.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if missing.is_empty() {
        return Ok(PkiOutcome::Existing);
    }
    if !present.is_empty() {
        return Err(PkiError::Partial {
            missing: list(&missing),
            present: list(&present),
        });
    }
    if config.no_auto_pki {
        return Err(PkiError::Absent {
            missing: list(&missing),
        });
    }

    let pki = DevPki::generate()?;
    let dir = config.ca_crt.parent().unwrap_or(Path::new(".")).to_owned();
    let client_crt = dir.join("_signed.client.crt");
    let client_key = dir.join("client.key");
    write_private(&config.ca_crt, &pki.ca_crt)?;
    write_private(&dir.join("ca.key"), &pki.ca_key)?;
    write_private(&config.server_crt, &pki.server_crt)?;
    write_private(&config.server_key, &pki.server_key)?;
    write_private(&client_crt, &pki.client_crt)?;
    write_private(&client_key, &pki.client_key)?;

    let client = ClientConfig {
        auth: AuthConfig {
            ca_crt: abs(&config.ca_crt),
            client_crt: abs(&client_crt),
            client_key: abs(&client_key),
        },
        system: SystemConfig {
            socket: if config.socket.parse::<std::net::SocketAddr>().is_ok() {
                config.socket.clone()
            } else {
                abs(Path::new(&config.socket))
            },
        },
    };
    let client_config = dir.join("client-config.toml");
    write_private(&client_config, &client.to_toml())?;
    tracing::warn!(
        "GENERATED A DEVELOPMENT PKI (not for production): CA {}, server {}, client {} (key {}); client config {}",
        config.ca_crt.display(),
        config.server_crt.display(),
        client_crt.display(),
        client_key.display(),
        client_config.display()
    );

    // The user's own config, unless they already have one.
    if let Some(home) = std::env::var_os("HOME") {
        let user_config = Path::new(&home).join(".aurae/config");
        if user_config.exists() {
            tracing::warn!(
                "{} exists and was left alone; use `aer --config {}` for this daemon",
                user_config.display(),
                client_config.display()
            );
        } else {
            write_private(&user_config, &client.to_toml())?;
            tracing::warn!("wrote client config {}", user_config.display());
        }
    }
    Ok(PkiOutcome::Generated { client_config })
}

fn abs(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_owned())
        .display()
        .to_string()
}

/// Writes `text` to `path` readable by the owner only, creating missing
/// parent directories with mode 0700. The file appears whole or not at all
/// (written beside it, then renamed), so a reader never sees half of it.
pub fn write_private(path: &Path, text: &str) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(err)?;
    }
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}
