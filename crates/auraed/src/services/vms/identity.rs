//! A guest's TLS identity, minted by this node's CA at Start: a server
//! certificate for the guest's daemon (so the node's clients trust it with
//! their usual config) and a client certificate the node uses to check
//! that the guest answers.

use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, KeyPair};

use crate::pki::write_private;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read the node CA {path}: {source}")]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use the node CA to sign: {0}")]
    Sign(#[from] rcgen::Error),
    #[error(transparent)]
    Write(#[from] crate::pki::PkiError),
}

/// Files written into the VM's folder.
#[derive(Debug, Clone)]
pub struct GuestIdentity {
    pub ca_crt: PathBuf,
    pub server_crt: PathBuf,
    pub server_key: PathBuf,
    pub client_crt: PathBuf,
    pub client_key: PathBuf,
}

/// The CA key lies beside the CA certificate as `ca.key` (see pki.rs).
pub fn ca_key_path(ca_crt: &Path) -> PathBuf {
    ca_crt.with_file_name("ca.key")
}

pub fn mint(ca_crt: &Path, vm_id: &str, dir: &Path) -> Result<GuestIdentity, IdentityError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| IdentityError::ReadCa {
            path: p.to_owned(),
            source,
        })
    };
    let ca_pem = read(ca_crt)?;
    let ca_key = KeyPair::from_pem(&read(&ca_key_path(ca_crt))?)?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;

    let (server_crt, server_key) =
        crate::pki::sign_server(&ca, &ca_key, &[format!("{vm_id}.vm.aurae")], &["10.0.2.15"])?;
    let (client_crt, client_key) = crate::pki::sign_client(&ca, &ca_key, "auraed-node")?;

    let id = GuestIdentity {
        ca_crt: dir.join("ca.crt"),
        server_crt: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_crt: dir.join("client.crt"),
        client_key: dir.join("client.key"),
    };
    write_private(&id.ca_crt, &ca_pem)?;
    write_private(&id.server_crt, &server_crt.pem())?;
    write_private(&id.server_key, &server_key.serialize_pem())?;
    write_private(&id.client_crt, &client_crt.pem())?;
    write_private(&id.client_key, &client_key.serialize_pem())?;
    Ok(id)
}
